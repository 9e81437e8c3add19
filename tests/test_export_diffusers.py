"""weights/export_diffusers.py: a tiny nanoCEP DiT checkpoint (random weights, written offline) exported to a
DiTPipeline folder: diffusers' transformer equals our forward (both MLP eps), --init-from the folder is exact,
DiTPipeline loads and samples it (equal to evaluate.py's sampler of the same folder), refusals in one line."""
import dataclasses
import importlib.metadata
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import evaluate as ev
from models.encoders import encoder_from_config
from models import dit
from train_dit import DiTConfig
from weights import export_diffusers as export
from weights import pretrained

diffusers = pytest.importorskip("diffusers")


def randomize(module, std, seed):
    """Every trained parameter N(0, std^2) (adaLN-Zero starts at 0, which would make any comparison trivial); the
    fixed sin-cos pos_embed stays."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def write_checkpoint(path, vae_dir, **fields):
    """A nanoCEP DiT checkpoint as runio.RunIO.save writes it: 10 built-in classes on 32px kl-f8 latents (4x4x4)."""
    cfg = DiTConfig(vae="kl-f8", image_size=32, num_classes=10, learn_sigma=True, t_freq_shift=1.0,
                    vae_path=str(vae_dir), **{"pixel_channels": 0, "token_conv": False, "mlp_ratio": 4.0, **fields})
    model = dit.from_config(cfg, encoder_from_config)
    randomize(model, 0.2, 0)
    ema = randomize(dit.from_config(cfg, encoder_from_config), 0.2, 1)
    torch.save({"version": 1, "kind": "dit", "step": 7, "config": dataclasses.asdict(cfg), "model": model.state_dict(),
                "ema": ema.state_dict(), "opt": {}, "rng": None, "data": {}}, path)
    return cfg, ema.eval()


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                  layers_per_block=1, sample_size=8)
    randomize(vae, 0.1, 2).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("eps", [1e-5, 1e-6])           # diffusers' port's MLP LayerNorm eps, and DiT's
def test_exported_transformer_equals_our_forward_and_round_trips(tmp_path, tiny_vae, eps):
    cfg, ours = write_checkpoint(tmp_path / "last.pt", tiny_vae, mlp_norm_eps=eps)
    index = export.export(str(tmp_path / "last.pt"), str(tmp_path / "out"))
    assert index["id2label"]["0"] == "red disc" and len(index["id2label"]) == 10
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "out" / "transformer").eval()
    assert theirs.config.norm_eps == eps
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(12, 4, 4, 4, generator=g), torch.randint(0, 1000, (12,), generator=g)
    y = torch.tensor([0, 3, 9, 10, 10, 5, 1, 2, 4, 6, 7, 8])            # 10 = our null row
    with torch.no_grad():
        a = ours(x, t, y)
        torch.testing.assert_close(theirs(x, timestep=t, class_labels=y).sample, a, rtol=1e-5, atol=1e-5)
        # DiTPipeline's null label 1000 is our null row
        torch.testing.assert_close(theirs(x, timestep=t, class_labels=torch.full_like(y, 1000)).sample,
                                   ours(x, t, torch.full_like(y, 10)), rtol=1e-5, atol=1e-5)
    # the round trip: --init-from the folder gives back the EMA weights and the architecture fields exactly
    back, sd, note = pretrained.init_weights(str(tmp_path / "out"), DiTConfig(), "dit")
    assert {k: getattr(back, k) for k in ("model", "image_size", "vae", "learn_sigma", "t_freq_shift", "mlp_norm_eps",
                                          "schedule")} == {k: getattr(cfg, k) for k in (
                                              "model", "image_size", "vae", "learn_sigma", "t_freq_shift",
                                              "mlp_norm_eps", "schedule")}
    assert sd.keys() == ours.state_dict().keys() and all(torch.equal(sd[k], v) for k, v in ours.state_dict().items())
    assert "10 classes" in note and back.vae_path == str(tmp_path / "out" / "vae")


def test_a_label_smoothing_dit_exports_the_embedding_it_samples_with(tmp_path, tiny_vae):
    _, ours = write_checkpoint(tmp_path / "last.pt", tiny_vae, label_smoothing=0.2)
    export.export(str(tmp_path / "last.pt"), str(tmp_path / "smooth"))
    assert export.main([str(tmp_path / "last.pt"), "--out", str(tmp_path / "raw"), "--raw-class-embedding"]) == 0
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 4, 4, generator=g), torch.randint(0, 1000, (4,), generator=g)
    y = torch.tensor([0, 4, 9, 10])                                      # 10 = our null row, never smoothed
    for folder, raw in (("smooth", False), ("raw", True)):              # evaluate.py's default, --raw-class-embedding
        theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / folder / "transformer").eval()
        ours.cond.raw_at_sampling = raw
        with torch.no_grad():
            torch.testing.assert_close(theirs(x, timestep=t, class_labels=y).sample, ours(x, t, y),
                                       rtol=1e-5, atol=1e-5)
    key = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    smooth, raw = (load_file(str(tmp_path / f / "transformer" / "diffusion_pytorch_model.safetensors"))[key]
                   for f in ("smooth", "raw"))
    assert not torch.allclose(smooth[:10], raw[:10]) and torch.equal(smooth[10:], raw[10:])   # classes differ only


def test_dit_pipeline_samples_the_export_as_our_sampler_does(tmp_path, tiny_vae):
    write_checkpoint(tmp_path / "last.pt", tiny_vae)
    assert export.main([str(tmp_path / "last.pt"), "--out", str(tmp_path / "out")]) == 0
    pipe = diffusers.DiTPipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, diffusers.DPMSolverMultistepScheduler)
    label = pipe.get_label_ids(["magenta cross"])[0]
    assert label == 9
    theirs = pipe([label], guidance_scale=3.0, num_inference_steps=4, output_type="np",
                  generator=torch.Generator().manual_seed(5)).images[0] * 255        # (8, 8, 3), CFG with null 1000
    sample_fn, _ = ev.load_pretrained_sampler(tmp_path / "out", steps=4)
    ours = sample_fn(torch.tensor([label]), [5], 3.0)[0].astype(np.float64)
    assert np.isfinite(theirs).all() and theirs.std() > 1
    assert np.abs(ours - theirs).max() <= 0.5 + 1e-3        # ours rounds 127.5 x + 128 down: half a level apart


def test_the_export_stamps_the_installed_diffusers_and_says_what_its_padding_rows_do(tmp_path, tiny_vae, capsys,
                                                                                   monkeypatch):
    """_diffusers_version is the installed release (0.30.0, the oldest that loads it, without diffusers); rows 10..1000
    of the class table are our null row, and the export's line says labels 10..999 sample unconditionally."""
    _, ours = write_checkpoint(tmp_path / "last.pt", tiny_vae)
    assert export.main([str(tmp_path / "last.pt"), "--out", str(tmp_path / "out")]) == 0
    line = capsys.readouterr().out
    configs = ("model_index.json", "transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json")
    stamped = {json.loads((tmp_path / "out" / c).read_text())["_diffusers_version"] for c in configs}
    assert stamped == {importlib.metadata.version("diffusers")} == {diffusers.__version__}
    key = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    table = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))[key]
    null = ours.state_dict()["y_embedder.embedding_table.weight"][10]
    assert table.shape[0] == 1001 and torch.equal(table[10:], null.expand(991, -1))
    assert "labels 10..999 are no classes and sample unconditionally" in line
    assert f"stamped diffusers {diffusers.__version__} (installed)" in line
    real = importlib.metadata.version

    def without_diffusers(name):
        if name == "diffusers":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(importlib.metadata, "version", without_diffusers)
    assert export.main([str(tmp_path / "last.pt"), "--out", str(tmp_path / "bare")]) == 0
    bare = json.loads((tmp_path / "bare" / "transformer" / "config.json").read_text())
    assert bare["_diffusers_version"] == "0.30.0"
    assert "diffusers 0.30.0 (diffusers is not installed: the oldest release" in capsys.readouterr().out


def test_refusals_are_one_line(tmp_path, tiny_vae, capsys):
    cases = [(dict(t_freq_shift=0.0), "--t-freq-shift 0"), (dict(cond="text"), "text-conditional"),
             (dict(pixel_channels=32), "--pixel-channels 32"), (dict(token_conv=True), "--token-conv True"),
             (dict(mlp_ratio=2.0), "2x-wide MLPs")]
    for i, (fields, needle) in enumerate(cases):
        write_checkpoint(tmp_path / f"{i}.pt", tiny_vae)
        ckpt = torch.load(tmp_path / f"{i}.pt", weights_only=True)
        ckpt["config"].update(fields)
        torch.save(ckpt, tmp_path / f"{i}.pt")
        assert export.main([str(tmp_path / f"{i}.pt"), "--out", str(tmp_path / f"out{i}")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and not (tmp_path / f"out{i}").exists(), err
    ckpt["config"].update(cond="class", t_freq_shift=1.0, vae="none")
    torch.save(ckpt, tmp_path / "pixels.pt")
    assert export.main([str(tmp_path / "pixels.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "pixel space" in capsys.readouterr().err
    assert export.main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
