"""Tests for vae.py: our autoencoders against diffusers (a test-only oracle), weight layouts, downloads, errors.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_vae.py
"""

import hashlib
import os
import re
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sources.download import hub_location
from weights import vae
from conftest import hub_cache_with, rel_err

KEYS_DIR = Path(__file__).resolve().parents[2] / "shared" / "notes" / "keys"
TINY = dict(block_out_channels=(32, 64))          # two levels: f=2, widths divisible by 32 groups
TINY_VQ = dict(block_out_channels=(32, 64), num_codes=64)



def randomise(model, seed):
    """Perturb every parameter so that GroupNorm affines and biases are not their trivial defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


# ---- diffusers oracles (saved once per module, in the real diffusers layout) ----


@pytest.fixture(scope="module")
def kl_ref(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                  layers_per_block=2, norm_num_groups=32)
    randomise(ref, 1)
    path = tmp_path_factory.mktemp("kl") / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return ref, path


@pytest.fixture(scope="module")
def vq_ref(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.VQModel(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3, num_vq_embeddings=64,
                            layers_per_block=2, norm_num_groups=32)
    randomise(ref, 2)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():  # a codebook on the latents' scale, so decoding picks many different codes
        h = ref.encode(x).latents
        ref.quantize.embedding.weight.copy_(torch.randn(64, 3, generator=torch.Generator().manual_seed(4)) * h.std())
    path = tmp_path_factory.mktemp("vq") / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return ref, path, x


def images(seed=5, b=2, size=32):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- architecture of the real configs ----


@pytest.mark.parametrize("kind, keyfile, n_params, n_tensors, f, channels, scale", [
    ("kl-f8", "kl-f8_sd-vae_diffusers_state_dict.txt", 83_653_863, 248, 8, 4, 0.18215),
    ("vq-f4", "vq-f4_diffusers_state_dict.txt", 55_322_782, 205, 4, 3, 1.0),
])
def test_full_size_layout_matches_released_files(kind, keyfile, n_params, n_tensors, f, channels, scale):
    with torch.device("meta"):  # shapes only, no memory, no init cost
        model = vae.build_vae(kind)
    sd = model.state_dict()
    assert len(sd) == n_tensors
    assert sum(v.numel() for v in sd.values()) == n_params
    listed = [f"{k} {tuple(v.shape)}" for k, v in sd.items()]
    if KEYS_DIR.is_dir():
        expected = (KEYS_DIR / keyfile).read_text().splitlines()
        assert listed == [line.strip() for line in expected if line.strip()]
    assert (model.downsample, model.latent_channels, model.scale_factor, model.kind) == (f, channels, scale, kind)


# ---- numerical agreement with diffusers ----


def test_kl_matches_diffusers(kl_ref):
    ref, path = kl_ref
    ours = vae.load_vae("kl-f8", path, **TINY)
    x = images()
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        mean, std = ours.encode_moments(x)
        assert rel_err(mean, post.mean * 0.18215) <= 1e-5
        assert rel_err(std, post.std * 0.18215) <= 1e-5
        sample = ours.encode(x, generator=torch.Generator().manual_seed(7))
        ref_sample = post.sample(generator=torch.Generator().manual_seed(7)) * 0.18215
        assert rel_err(sample, ref_sample) <= 1e-5
        assert not torch.allclose(sample, mean)                 # it is a sample, not the mean
        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(8))
        assert rel_err(ours.decode(z), ref.decode(z / 0.18215).sample) <= 1e-5
    assert mean.shape == (2, 4, 16, 16) and mean.dtype == torch.float32


def test_kl_log_variance_is_clamped_like_diffusers(kl_ref, tmp_path):
    import copy
    ref = copy.deepcopy(kl_ref[0])
    with torch.no_grad():  # push two log-variance channels far outside [-30, 20]
        ref.quant_conv.bias[4] += 80.0
        ref.quant_conv.bias[5] -= 80.0
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    ours = vae.load_vae("kl-f8", tmp_path / "w.safetensors", **TINY)
    x = images()
    with torch.no_grad():
        _, std = ours.encode_moments(x)
        assert rel_err(std, ref.encode(x).latent_dist.std * 0.18215) <= 1e-5
    assert torch.allclose(std[:, 0], torch.tensor(torch.e ** 10 * 0.18215))
    assert torch.allclose(std[:, 1], torch.tensor(torch.e ** -15 * 0.18215))


def test_vq_matches_diffusers(vq_ref):
    ref, path, x = vq_ref
    ours = vae.load_vae("vq-f4", path, **TINY_VQ)
    assert ours.scale_factor == 1.0
    with torch.no_grad():
        h = ref.encode(x).latents
        z, std = ours.encode_moments(x)
        assert rel_err(z, h) <= 1e-5 and rel_err(ours.encode(x), h) <= 1e-5
        assert torch.count_nonzero(std) == 0
        assert ours.quantize.indices(z).unique().numel() > 8    # decoding really chooses between codes
        assert rel_err(ours.decode(z), ref.decode(h).sample) <= 1e-5   # diffusers quantises inside decode
        # a latent already on a code decodes exactly like the raw latent (quantisation is idempotent)
        snapped = ours.quantize(z)
        assert torch.equal(ours.decode(snapped), ours.decode(z))


def test_bf16_weights_give_float32_outputs_close_to_fp32(kl_ref):
    _, path = kl_ref
    fp32 = vae.load_vae("kl-f8", path, **TINY)
    bf16 = vae.load_vae("kl-f8", path, dtype=torch.bfloat16, **TINY)
    x = images()
    with torch.no_grad():
        a, b = fp32.encode_moments(x)[0], bf16.encode_moments(x)[0]
        assert b.dtype == torch.float32 and rel_err(b, a) < 3e-2
        assert bf16.decode(a).dtype == torch.float32


# ---- other weight layouts ----


def to_compvis(sd, levels):
    """Diffusers names -> the original CompVis .ckpt names (written from anchors.md §4.6, independently of vae.py)."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, v in sd.items():
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.block.\2.", key)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"up.{levels - 1 - int(m[1])}.block.{m[2]}.", k)
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample.", k)
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        k = k.replace("conv_shortcut.", "nin_shortcut.").replace("conv_norm_out.", "norm_out.")
        for new, old in attn.items():
            k = k.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
        if ".attn_1." in k and k.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]                         # CompVis uses 1x1 convs there
        out[k] = v.clone()
    return out


class LightningCallback:  # pickled by reference: weights_only loading refuses it, as with real Lightning ckpts
    def __init__(self):
        self.best = 0.5


class Payload:  # would create a folder if it were ever unpickled for real
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kind", ["kl-f8", "vq-f4"])
def test_compvis_checkpoint_loads_identical_tensors(kind, kl_ref, vq_ref, tmp_path):
    path, over = (kl_ref[1], TINY) if kind == "kl-f8" else (vq_ref[1], TINY_VQ)
    reference = vae.load_vae(kind, path, **over)
    compvis = to_compvis(reference.state_dict(), levels=2)
    # the decoder's first level (CompVis index 1) is the widest; index 0 holds the 64 -> 32 shortcut
    assert "decoder.up.0.block.0.nin_shortcut.weight" in compvis and "encoder.mid.attn_1.q.weight" in compvis
    assert ("quantize.embedding.weight" in compvis) == (kind == "vq-f4")
    marker = tmp_path / "payload-ran"
    lightning = {"epoch": 3, "global_step": 10, "callbacks": {LightningCallback: {"best": torch.tensor(1.0)}},
                 "extra": Payload(str(marker)),
                 "state_dict": {**compvis, "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4)}}
    ckpt = tmp_path / "model.ckpt"
    torch.save(lightning, ckpt)
    with pytest.raises(Exception):  # plain weights_only loading refuses this file
        torch.load(ckpt, weights_only=True)
    assert_same_weights(vae.load_vae(kind, ckpt, **over), reference)
    assert not marker.exists()                              # nothing but tensors was rebuilt
    # a whole-LDM checkpoint: the autoencoder under first_stage_model., next to the diffusion model's weights
    full = {f"first_stage_model.{k}": v for k, v in compvis.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 3, 3, 3)
    torch.save({"state_dict": full}, tmp_path / "ldm.ckpt")
    assert_same_weights(vae.load_vae(kind, tmp_path / "ldm.ckpt", **over), reference)


def test_legacy_attention_names_load(kl_ref, tmp_path):
    _, path = kl_ref
    reference = vae.load_vae("kl-f8", path, **TINY)
    legacy = {}
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for k, v in reference.state_dict().items():
        for new, old in names.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = v.clone()
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    torch.save(legacy, tmp_path / "diffusion_pytorch_model.bin")
    assert_same_weights(vae.load_vae("kl-f8", tmp_path / "diffusion_pytorch_model.bin", **TINY), reference)


# ---- bad files ----


def test_strict_loading_lists_missing_unexpected_and_misshapen_keys(kl_ref, vq_ref, tmp_path):
    sd = vae.read_state_dict(kl_ref[1])
    broken = dict(sd)
    del broken["decoder.conv_out.weight"]
    broken["decoder.surprise.weight"] = torch.zeros(1)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing keys \(decoder\.conv_out\.weight\).*"
                                         r"1 unexpected keys \(decoder\.surprise\.weight\)"):
        vae.load_vae("kl-f8", tmp_path / "broken.safetensors", **TINY)
    with pytest.raises(ValueError, match=r"missing keys .*quantize\.embedding\.weight.*shape mismatches"):
        vae.load_vae("vq-f4", kl_ref[1], **TINY_VQ)               # a KL file is not a VQ autoencoder
    with pytest.raises(ValueError, match=r"unexpected keys \(quantize\.embedding\.weight\)"):
        vae.load_vae("kl-f8", vq_ref[1], block_out_channels=(32, 64), latent_channels=3)


def test_truncated_or_foreign_files_raise_clear_errors(kl_ref, tmp_path):
    good = kl_ref[1].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    torch.save(vae.read_state_dict(kl_ref[1]), tmp_path / "full.ckpt")
    ckpt = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(ckpt[: len(ckpt) // 2])
    (tmp_path / "notes.txt").write_text("hello, not weights")
    (tmp_path / "empty.bin").write_bytes(b"")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pt")
    for name in ["cut.safetensors", "cut.ckpt", "notes.txt", "empty.bin", "list.pt"]:
        with pytest.raises(ValueError, match=re.escape(name)) as info:
            vae.load_vae("kl-f8", tmp_path / name, **TINY)
        assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        vae.load_vae("kl-f8", tmp_path / "nope.safetensors", **TINY)
    with pytest.raises(ValueError, match="unknown VAE kind"):
        vae.load_vae("kl-f16", kl_ref[1])
    assert vae.load_vae("none") is None


def test_encode_rejects_bad_shapes(kl_ref):
    ours = vae.load_vae("kl-f8", kl_ref[1], **TINY)
    with pytest.raises(ValueError, match="multiple of 2"):
        ours.encode(torch.zeros(1, 3, 31, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ours.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        ours.decode(torch.zeros(1, 3, 16, 16))


# ---- downloads (file:// URLs only: tests never touch the network) ----


def test_download_checks_sha256_and_leaves_nothing_on_mismatch(kl_ref, tmp_path):
    src = kl_ref[1]
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="sha256 mismatch"):
        vae.download(src.as_uri(), cache / "w.safetensors", sha256="0" * 64)
    assert list(cache.iterdir()) == []
    out = vae.download(src.as_uri(), cache / "w.safetensors", sha256=good)
    assert out.read_bytes() == src.read_bytes() and sorted(p.name for p in cache.iterdir()) == ["w.safetensors"]
    with pytest.raises(ConnectionError, match="could not download"):
        vae.download((tmp_path / "missing.bin").as_uri(), cache / "x.bin")
    assert sorted(p.name for p in cache.iterdir()) == ["w.safetensors"]


def test_load_vae_without_path_downloads_into_cache(kl_ref, vq_ref, tmp_path, monkeypatch):
    src = tmp_path / "served.safetensors"
    src.write_bytes(kl_ref[1].read_bytes())
    monkeypatch.setitem(vae.WEIGHTS, "kl-f8", vae.Weights(src.as_uri(), "sd-vae-test.safetensors"))
    monkeypatch.setenv("NANOCEP_CACHE", str(tmp_path / "env-cache"))
    reference = vae.load_vae("kl-f8", kl_ref[1], **TINY)
    assert_same_weights(vae.load_vae("kl-f8", **TINY), reference)
    cached = tmp_path / "env-cache" / "vae" / "sd-vae-test.safetensors"
    assert cached.is_file()
    src.unlink()                                             # the second load must come from the cache
    assert_same_weights(vae.load_vae("kl-f8", **TINY), reference)
    # the vq-f4 entry ships as a zip holding model.ckpt; cache_dir wins over $NANOCEP_CACHE
    with zipfile.ZipFile(tmp_path / "vq-f4.zip", "w") as zf:
        zf.write(vq_ref[1], "model.ckpt")
    monkeypatch.setitem(vae.WEIGHTS, "vq-f4", vae.Weights("unused://", "vq-test.ckpt", member="model.ckpt"))
    got = vae.load_vae("vq-f4", cache_dir=tmp_path / "c2", url=(tmp_path / "vq-f4.zip").as_uri(), **TINY_VQ)
    assert_same_weights(got, vae.load_vae("vq-f4", vq_ref[1], **TINY_VQ))
    assert [p.name for p in (tmp_path / "c2" / "vae").iterdir()] == ["vq-test.ckpt"]
    with pytest.raises(ValueError, match="no known weights"):
        vae.load_vae("kl-f8", weights="kl-f8-ultra", **TINY)


def test_released_kl_f8_comes_from_the_hub_cache_offline(kl_ref, offline_hub):
    """kl-f8's weights live on the Hub: with HF_HUB_OFFLINE=1 they load from a pre-populated huggingface_hub cache,
    no socket tried; the file's repo, revision and name are those of the WEIGHTS table's URL."""
    cache, attempts = offline_hub
    repo, revision, filename = hub_location(vae.WEIGHTS["kl-f8"].url)
    assert (repo, revision, filename) == ("stabilityai/sd-vae-ft-ema", "main", "diffusion_pytorch_model.safetensors")
    hub_cache_with(cache, repo, {filename: kl_ref[1].read_bytes()}, "e" * 40)
    assert_same_weights(vae.load_vae("kl-f8", **TINY), vae.load_vae("kl-f8", kl_ref[1], **TINY))
    assert vae.fetch_weights("kl-f8") == cache / "models--stabilityai--sd-vae-ft-ema" / "snapshots" / ("e" * 40) / \
        filename
    assert attempts == []


# ---- CLI ----


def test_cli_roundtrip_and_bad_input(kl_ref, tmp_path, monkeypatch, capsys):
    from PIL import Image
    import numpy as np
    monkeypatch.setitem(vae.PRESETS, "kl-f8", vae.VAEConfig("kl-f8", (32, 64), 2, 4))   # tiny, f=2
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    out = tmp_path / "recon.png"
    args = ["roundtrip", str(tmp_path / "img.png"), "--kind", "kl-f8", "--size", "32", "-o", str(out)]
    assert vae.main(args + ["--vae-path", str(kl_ref[1])]) == 0
    assert Image.open(out).size == (32, 32) and "PSNR" in capsys.readouterr().out
    out.unlink()
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 truncated")
    for bad in (args + ["--vae-path", str(tmp_path / "bad.ckpt")],
                ["roundtrip", str(tmp_path / "none.png"), "--vae-path", str(kl_ref[1]), "-o", str(out)],
                ["bench", "--size", "0"]):
        assert vae.main(bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("python -m weights.vae: error:") and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_diffusers_folder_with_config_sets_the_architecture(tmp_path):
    """A diffusers component folder (config.json + weights) loads a custom-width autoencoder without overrides."""
    import json
    from safetensors.torch import save_file
    torch.manual_seed(0)
    small = vae.build_vae("kl-f8", block_out_channels=(32, 32, 32, 32), layers_per_block=1)
    save_file(small.state_dict(), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1,
                                                      "latent_channels": 4, "norm_num_groups": 32}))
    ae = vae.load_vae("kl-f8", str(tmp_path))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert ae.downsample == 8 and ae.scale_factor == 0.18215
    assert torch.equal(ae.encode_moments(x)[0], small.eval().encode_moments(x)[0])
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model"):
        vae.load_vae("kl-f8", str(tmp_path.parent))


# ---- precision regime: delicate steps in fp32 whatever the caller's autocast ----


def test_nearest_code_search_and_decode_ignore_bf16_autocast():
    # 8192 codes in 3-d (vq-f4's shape): neighbours lie so close that a bf16 matmul flips many of the argmins
    torch.manual_seed(0)
    book = vae.Codebook(8192, 3)
    z = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        exact = book.indices(z)
        brute = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 3).double(), book.embedding.weight.double()).argmin(1)
        assert torch.equal(exact.flatten(), brute)                     # the fp32 search is the true nearest code
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(book.indices(z), exact)
        ae = randomise(vae.build_vae("vq-f4", block_out_channels=(32, 64), num_codes=8192), 5)
        lat = torch.randn(1, 3, 8, 8)
        ref = ae.decode(lat)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(ae.quantize.indices(lat), ae.quantize.indices(lat.float()))
            out = ae.decode(lat)
        assert out.dtype == torch.float32 and torch.equal(out, ref)


def test_kl_posterior_ignores_bf16_autocast(kl_ref):
    _, path = kl_ref
    ae = vae.load_vae("kl-f8", path, **TINY)
    x = images()
    with torch.no_grad():
        mean, std = ae.encode_moments(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = ae.encoder(x)                                           # the encoder body follows the caller's autocast
            m2, s2 = ae.encode_moments(x)
        want_mean, want_logvar = ae.quant_conv(h.float()).chunk(2, dim=1)  # ... but the posterior head is fp32
        assert m2.dtype == s2.dtype == torch.float32
        assert torch.equal(m2, want_mean * ae.scale_factor)
        assert torch.equal(s2, torch.exp(0.5 * want_logvar.clamp(*vae.LOGVAR_RANGE)) * ae.scale_factor)
        assert rel_err(m2, mean) < 3e-2
