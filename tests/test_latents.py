"""Tests for latents.py: the latent cache (round trip, both flips, resume, sharding, refusals, CLI).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_latents.py
"""
import json
import os
import subprocess
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import data
from weights import latents
from weights import vae
from conftest import rel_err

REPO = Path(__file__).resolve().parents[1]
TINY = dict(block_out_channels=(32, 64), layers_per_block=1)      # f=2: 16 px images -> 8x8 latents
N, SIZE, BATCH = 10, 16, 4                                       # 3 batches, the last one short


def tiny_vae(kind="kl-f8", seed=0):
    """A tiny autoencoder with every parameter perturbed, so biases and norms are not their trivial defaults."""
    torch.manual_seed(seed)
    ae = vae.build_vae(kind, **TINY, **({"num_codes": 32} if kind == "vq-f4" else {}))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return ae.eval().requires_grad_(False)



def builtin(n=N, seed=0):
    return data.BuiltinShapes(size=SIZE, length=n, seed=seed)


def build(tmp_path, name, ae, ds=None, **kw):
    out = str(tmp_path / name)
    kw.setdefault("batch_size", BATCH)
    kw.setdefault("progress", False)
    res = latents.build_cache(ds if ds is not None else builtin(), ae, out, **kw)
    return out, res


def load_array(out):
    return np.load(os.path.join(out, "latents.npy"))


@pytest.fixture(scope="module")
def kl():
    return tiny_vae("kl-f8", 0)


# ---- contents ----


def test_kl_round_trip_both_flips_and_posterior_std(tmp_path, kl):
    src = builtin()
    out, res = build(tmp_path, "c", kl, src, dtype="float32")
    assert res == {"encoded": N, "remaining": 0, "complete": True}
    ds = latents.LatentDataset(out)
    assert len(ds) == N and ds.vae == "kl-f8" and ds.channels == 4 and ds.latent_size == 8 and ds.image_size == SIZE
    keys = [0, 1, 2 * 5, 2 * 5 + 1, 2 * 9 + 1]                    # both orientations, first and short last batch
    x_src = torch.stack([src[k][0] for k in keys])               # the dataset's own flip (key bit), not the cache's
    cached = torch.stack([ds[k][0] for k in keys])               # (5, 8, 8, 8) = cat[mean, std]
    assert [ds[k][1] for k in keys] == [int(src.labels[k >> 1]) for k in keys]
    mean_c, std_c = cached.chunk(2, dim=1)
    with torch.no_grad():
        mean_f, std_f = kl.encode_moments(x_src)
        # the posterior std from the raw encoder output, independent of encode_moments
        logvar = kl.quant_conv(kl.encoder(x_src))[:, 4:]
        std_ref = torch.exp(0.5 * logvar.clamp(-30, 20)) * kl.scale_factor
        assert rel_err(kl.decode(mean_c), kl.decode(mean_f)) < 1e-5   # batched vs single-image conv numerics only
    assert rel_err(mean_c, mean_f) < 1e-5
    assert rel_err(std_c, std_ref) < 1e-5
    assert (mean_c[0] - mean_c[1]).abs().max() > 1e-2             # orientation 1 is a different encoding
    # float16 storage: within half-precision rounding of the float32 cache
    out16, _ = build(tmp_path, "c16", kl, src)
    a16, a32 = load_array(out16), load_array(out)
    assert a16.dtype == np.float16 and a16.shape == (N, 2, 2, 4, 8, 8)
    np.testing.assert_allclose(a16.astype(np.float32), a32, rtol=2 ** -11, atol=1e-7)


def test_vq_cache_holds_prequant_latents(tmp_path):
    ae = tiny_vae("vq-f4", 1)
    src = builtin(6)
    out, _ = build(tmp_path, "vq", ae, src, dtype="float32")
    ds = latents.LatentDataset(out)
    assert load_array(out).shape == (6, 2, 1, 3, 8, 8) and ds.meta["moments"] == ["latent"]
    x, y = ds[2 * 4 + 1]
    assert x.shape == (3, 8, 8) and y == int(src.labels[4])
    with torch.no_grad():
        fresh, _ = ae.encode_moments(src[2 * 4 + 1][0][None])
        assert rel_err(x[None], fresh) < 1e-5
        assert rel_err(ae.decode(x[None]), ae.decode(fresh)) < 1e-5
    assert torch.equal(latents.posterior_sample(x[None]), x[None])           # 3 channels: VQ passes through


def test_labels_captions_alignment_and_corruption_stays_out(tmp_path, kl):
    src = builtin(N, seed=3)
    out, _ = build(tmp_path, "c", kl, src)
    ds = latents.LatentDataset(out)
    assert ds.captions == [src.captions[i] for i in range(N)]
    assert np.array_equal(ds.labels, src.labels) and ds.labels.dtype == np.int64
    assert ds.class_names == src.class_names and ds.num_classes == 10
    data.apply_corruption(ds, 0.5, seed=0)                       # corrupts the loaded copy...
    flipped = np.flatnonzero(ds.labels != src.labels)
    assert len(flipped) == 5 and ds[2 * int(flipped[0])][1] == ds.labels[flipped[0]] != src.labels[flipped[0]]
    assert np.array_equal(latents.LatentDataset(out).labels, src.labels)   # ...never the cache on disk


def test_posterior_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 4, 4)
    x[:, 4:] = x[:, 4:].abs()
    z = latents.posterior_sample(x, torch.Generator().manual_seed(5))
    eps = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, x[:, :4] + x[:, 4:] * eps)
    torch.testing.assert_close(latents.posterior_sample(x, noise=eps, channels=4), z)
    # statistics: many draws around a fixed mean/std
    big = torch.cat([torch.full((1, 4, 64, 64), 0.5), torch.full((1, 4, 64, 64), 0.2)], 1)
    s = latents.posterior_sample(big, g)
    assert abs(s.mean().item() - 0.5) < 0.01 and abs(s.std().item() - 0.2) < 0.01
    vq = torch.randn(2, 4, 4, 4)
    assert torch.equal(latents.posterior_sample(vq, channels=4), vq)        # even VQ channels need channels=
    assert torch.equal(latents.posterior_sample(torch.ones(1, 3, 2, 2)), torch.ones(1, 3, 2, 2))
    with pytest.raises(ValueError, match="channels"):
        latents.posterior_sample(x, channels=3)


# ---- resume, sharding, refusals ----


def test_interrupted_build_resumes_to_identical_arrays(tmp_path, kl, monkeypatch):
    ref, _ = build(tmp_path, "ref", kl)
    # interruption 1: stop after one batch
    out, res = build(tmp_path, "cut", kl, max_batches=1)
    assert res == {"encoded": BATCH, "remaining": N - BATCH, "complete": False}
    with pytest.raises(ValueError, match="incomplete"):
        latents.LatentDataset(out)
    # interruption 2: the encoder crashes on the next call (the first batch must not be redone)
    calls = {"n": 0}
    real = kl.encode_moments

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(x)

    monkeypatch.setattr(kl, "encode_moments", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        build(tmp_path, "cut", kl)
    monkeypatch.undo()
    done = np.load(os.path.join(out, "done.npy"))
    assert done.tolist() == [1] * (2 * BATCH) + [0] * (N - 2 * BATCH)   # batch 2 flushed before the crash
    _, res = build(tmp_path, "cut", kl)
    assert res == {"encoded": N - 2 * BATCH, "remaining": 0, "complete": True}
    assert np.array_equal(load_array(out), load_array(ref))
    assert json.load(open(os.path.join(out, "meta.json")))["complete"] is True
    _, res = build(tmp_path, "cut", kl)                         # a finished cache: nothing to do
    assert res == {"encoded": 0, "remaining": 0, "complete": True}


def test_two_ranks_in_process_equal_one(tmp_path, kl):
    ref, _ = build(tmp_path, "ref", kl)
    out, r0 = build(tmp_path, "ddp", kl, rank=0, world=2)
    assert r0 == {"encoded": BATCH + 2, "remaining": BATCH, "complete": False}   # batches 0 and 2 (4 + 2 items)
    with pytest.raises(ValueError, match="incomplete"):
        latents.LatentDataset(out)
    _, r1 = build(tmp_path, "ddp", kl, rank=1, world=2)                             # batch 1, then marks complete
    assert r1 == {"encoded": BATCH, "remaining": 0, "complete": True}
    assert np.array_equal(load_array(out), load_array(ref))


def test_mismatched_rerun_refused_and_nothing_overwritten(tmp_path, kl):
    out, _ = build(tmp_path, "c", kl)
    before = load_array(out)
    with pytest.raises(ValueError, match="vae_params_sha256"):
        build(tmp_path, "c", tiny_vae("kl-f8", 7))
    with pytest.raises(ValueError, match="dtype"):
        build(tmp_path, "c", kl, dtype="float32")
    with pytest.raises(ValueError, match="labels_sha256|num_items"):
        build(tmp_path, "c", kl, builtin(N + 2))
    cut, _ = build(tmp_path, "cut", kl, max_batches=1)          # an unfinished cache is protected too
    with pytest.raises(ValueError, match="unfinished"):
        build(tmp_path, "cut", kl, builtin(N, seed=1))
    assert np.array_equal(load_array(out), before)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        build(tmp_path, "foreign", kl)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        latents.LatentDataset(str(tmp_path / "nowhere"))


def test_float16_overflow_is_an_error(tmp_path, kl, monkeypatch):
    monkeypatch.setattr(kl, "encode_moments", lambda x: (torch.full((len(x), 4, 8, 8), 1e6), torch.ones(len(x), 4, 8, 8)))
    with pytest.raises(ValueError, match="float32"):
        build(tmp_path, "c", kl)


# ---- CLI ----


@pytest.fixture(scope="module")
def kl_file(tmp_path_factory, kl):
    path = tmp_path_factory.mktemp("w") / "tiny-kl.safetensors"
    save_file({k: v.contiguous() for k, v in kl.state_dict().items()}, str(path))
    return path


def test_cli_reads_tiny_config_and_two_process_build_equals_one(tmp_path, kl, kl_file):
    assert vae.infer_architecture("kl-f8", kl_file) == {"block_out_channels": (32, 64), "layers_per_block": 1}
    ref, _ = build(tmp_path, "ref", kl, builtin(12), batch_size=3, dtype="float32")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "weights.latents",
           "--data", "builtin", "--image-size", str(SIZE), "--vae", "kl-f8", "--vae-path", str(kl_file),
           "--out", str(out), "--builtin-length", "12", "--batch-size", "3", "--dtype", "float32", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))   # same kernels as the reference
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "complete" in proc.stdout
    assert np.array_equal(load_array(str(out)), load_array(ref))
    meta = latents.read_meta(str(out))
    assert meta["complete"] and meta["vae_params_sha256"] == latents.params_sha256(kl)
    assert meta["vae_file_sha256"] == latents.file_hash(kl_file)
    # in-process CLI: rerun with the same arguments is a no-op, with other arguments exit 2
    args = ["--data", "builtin", "--image-size", str(SIZE), "--vae", "kl-f8", "--vae-path", str(kl_file),
            "--out", str(out), "--builtin-length", "12", "--dtype", "float32", "--device", "cpu"]
    assert latents.main(args) == 0
    folder = tmp_path / "vae"                                     # a diffusers vae/ folder names its weights file
    folder.mkdir()
    shutil.copy(kl_file, folder / "diffusion_pytorch_model.safetensors")
    assert latents.main([*args[:args.index("--vae-path") + 1], str(folder), "--out", str(tmp_path / "from_folder"),
                         "--builtin-length", "12", "--batch-size", "3", "--dtype", "float32", "--device", "cpu"]) == 0
    assert np.array_equal(load_array(str(tmp_path / "from_folder")), load_array(ref))
    assert latents.main(["bench", str(out), "--batch-size", "8", "--steps", "2"]) == 0
    assert latents.main(args[:-4] + ["--dtype", "float16", "--device", "cpu"]) == 2


def run_cli(argv, capsys):
    try:
        rc = latents.main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("case", ["no-folder", "bad-size", "no-weights", "bad-kind", "bad-batch", "bench-missing",
                                  "bad-weights", "wrong-kind"])
def test_cli_bad_input_one_line_exit_2(tmp_path, kl_file, capsys, case):
    base = ["--data", "builtin", "--image-size", "16", "--vae", "kl-f8", "--vae-path", str(kl_file),
            "--out", str(tmp_path / "o"), "--builtin-length", "4", "--device", "cpu"]
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 40)
    argv, expect = {
        "no-folder": (["--data", str(tmp_path / "missing")] + base[2:], "data folder not found"),
        "bad-size": (base[:2] + ["--image-size", "15"] + base[4:], "multiple"),
        "no-weights": (base[:6] + ["--vae-path", str(tmp_path / "x.safetensors")] + base[8:], "not found"),
        "bad-kind": (base[:4] + ["--vae", "kl-f16"] + base[6:], "--vae"),
        "bad-batch": (base + ["--batch-size", "0"], "--batch-size"),
        "bench-missing": (["bench", str(tmp_path / "none")], "meta.json"),
        "bad-weights": (base[:6] + ["--vae-path", str(junk)] + base[8:], "junk.safetensors"),
        "wrong-kind": (base[:4] + ["--vae", "vq-f4"] + base[6:], "a KL autoencoder, not vq-f4"),
    }[case]
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "o").exists()


def test_dit_trains_from_cache_end_to_end(tmp_path):
    """encode -> cache -> train_dit --latents -> sample grid decoded by the same autoencoder, all on CPU."""
    import train_dit
    torch.manual_seed(0)
    f8 = vae.build_vae("kl-f8", block_out_channels=(32, 32, 32, 32), layers_per_block=1)   # a real f=8 geometry
    weights = tmp_path / "kl-f8-small.safetensors"
    save_file({k: v.contiguous() for k, v in f8.state_dict().items()}, str(weights))
    cache, res = build(tmp_path, "cache", vae.load_vae("kl-f8", str(weights)), data.BuiltinShapes(size=32, length=24))
    assert res["complete"]
    run = tmp_path / "run"
    rc = train_dit.main(["--latents", cache, "--vae", "kl-f8", "--vae-path", str(weights), "--image-size", "32",
                         "--batch-size", "8", "--steps", "2", "--log-every", "1", "--sample-every", "2",
                         "--sample-steps", "2", "--sample-per-class", "1", "--out", str(run)])
    assert rc == 0
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["model"]["pixel_in.weight"].shape[1] == 4 and state["config"]["latents"] == cache   # 4 latent channels
    assert (run / "samples" / "step_0000002.png").is_file()
    wrong = train_dit.main(["--latents", cache, "--vae", "kl-f8", "--image-size", "64", "--out", str(tmp_path / "x")])
    assert wrong == 2                                   # the cache's image size must match the run's
