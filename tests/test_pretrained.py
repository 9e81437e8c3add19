"""pretrained.py: released layouts (random weights, tiny configs) loaded into nanoCEP modules, checked against diffusers
as the oracle; schedulers, downloads (file://, the Hub's cache offline, never the network) and bad input."""
import argparse
import hashlib
import io
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate as ev
from weights import pretrained
from models.dit import DiT

from conftest import DATA, hub_cache_with, randomize, read_key_listing

diffusers = pytest.importorskip("diffusers")


# ---- a tiny DiT release in the DiTPipeline layout (transformer/, vae/, scheduler/, model_index.json) ----


@pytest.fixture(scope="module")
def dit_release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit_release")
    transformer = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                  out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                                  num_embeds_ada_norm=1000)   # the pipeline hard-codes null = 1000
    randomize(transformer, 0.2)
    for blk in transformer.transformer_blocks[1:]:   # a DiT trained by facebookresearch/DiT: one shared t/y embedder
        blk.norm1.emb.load_state_dict(transformer.transformer_blocks[0].norm1.emb.state_dict())
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                  layers_per_block=1, sample_size=16, scaling_factor=0.5)
    randomize(vae, 0.1, seed=1)
    # a DDIM config as diffusers' DiT converter writes it, with the spacing keys a 0.27 save adds
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False, timestep_spacing="leading",
                                        steps_offset=1)
    pipe = diffusers.DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder, pipe


def test_dit_release_equals_diffusers_transformer(dit_release):
    folder, pipe = dit_release
    p = pretrained.load_pretrained(folder)
    cfg, model = p["config"], p["model"]
    assert (cfg["format"], cfg["kind"], p["null_class"], cfg["guide_channels"]) == ("diffusers-dit", "dit", 1000, None)
    assert cfg["learn_sigma"] and cfg["latent_size"] == 8 and p["vae"].scale_factor == 0.5
    torch.testing.assert_close(p["betas"].float(), pipe.scheduler.betas, rtol=1e-6, atol=0)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 17, 500, 999]), torch.tensor([3, 999, 1000, 42])
    with torch.no_grad():
        theirs = pipe.transformer(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(model(x, t, y), theirs, rtol=1e-5, atol=1e-5)
        dit_numerics = pretrained.load_pretrained(folder, with_vae=False, numerics="dit")["model"](x, t, y)
    assert (dit_numerics - theirs).abs().max() > 1e-3     # the frequency shift and eps options are what make it match
    # the fork saves the same weights as Transformer2DModel: same mapping
    conf = json.loads((folder / "transformer" / "config.json").read_text())
    sd = pretrained.read_weights(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    ours = pretrained.dit_from_diffusers(sd, {**conf, "_class_name": "Transformer2DModel"})
    assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items() if k != "pos_embed")


def test_per_block_embedders_must_be_identical(dit_release):
    folder, _ = dit_release
    conf = json.loads((folder / "transformer" / "config.json").read_text())
    sd = pretrained.read_weights(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    sd["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"][7] += 1e-3
    with pytest.raises(ValueError, match="block 1's class_embedder.embedding_table.weight differs from block 0's"):
        pretrained.dit_from_diffusers(sd, conf)
    sd = pretrained.read_weights(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    del sd["proj_out_2.bias"]
    with pytest.raises(ValueError, match="no proj_out_2.bias"):
        pretrained.dit_from_diffusers(sd, conf)


def test_pipeline_samples_equal_diffusers_dit_pipeline(dit_release):
    """evaluate.py's --pretrained sampler == DiTPipeline + DPMSolverMultistepScheduler.from_config (as the paper's
    script): same noise, CFG on all 4 channels with null 1000, the release's 'leading' spacing, vae scaling_factor."""
    folder, pipe = dit_release
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = diffusers.DiTPipeline(transformer=pipe.transformer, vae=pipe.vae, scheduler=dpm)
    pipe.set_progress_bar_config(disable=True)
    sample_fn, info = ev.load_pretrained_sampler(folder, steps=6)
    assert info["timestep_spacing"] == "leading" and info["guide_channels"] == 4
    dpm.set_timesteps(6)
    assert pretrained.dpm_timesteps(dict(pipe.scheduler.config), 6) == dpm.timesteps.tolist()
    for label, seed in [(5, 11), (999, 12)]:
        theirs = pipe([label], guidance_scale=3.0, num_inference_steps=6, output_type="np",
                      generator=torch.Generator().manual_seed(seed)).images[0] * 255   # (16, 16, 3) in [0, 255]
        ours = sample_fn(torch.tensor([label]), [seed], 3.0)[0].astype(np.float64)
        assert 0.05 < (theirs > 0).mean() and (theirs < 255).mean() > 0.05   # not a saturated image
        # ours maps x -> floor(127.5 x + 128), diffusers -> 127.5 x + 127.5: at most half a level apart
        assert np.abs(ours - theirs).max() <= 0.5 + 1e-3


def test_evaluate_pretrained_end_to_end_and_preview(dit_release, tmp_path):
    folder, _ = dit_release
    extractor = tmp_path / "extractor.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(PoolFeatures()).save(str(extractor))
    rng = np.random.default_rng(0)
    (tmp_path / "ref").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "ref" / f"{i}.png")
    out = tmp_path / "eval"
    code = ev.main(["--pretrained", str(folder), "--num-samples", "10", "--cfg-scales", "1,2", "--steps", "3",
                    "--batch-size", "5", "--features", str(extractor), "--ref", str(tmp_path / "ref"),
                    "--out", str(out), "--is-splits", "2", "--resize", "none", "--npz"])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["cfg_scale"] for r in rows] == [1.0, 2.0] and all(np.isfinite(r["fid"]) for r in rows)
    assert rows[0]["format"] == "diffusers-dit" and rows[0]["null_class"] == 1000 and rows[0]["checkpoint"] == str(folder)
    assert np.load(out / "cfg2" / "samples.npz")["arr_0"].shape == (10, 16, 16, 3)
    grid = tmp_path / "preview.png"
    assert ev.main(["--pretrained", str(folder), "--classes", "88,207,360", "--per-class", "2", "--grid", str(grid),
                    "--steps", "2", "--cfg-scales", "4"]) == 0
    assert Image.open(grid).size == (2 * 16, 3 * 16)


class PoolFeatures(torch.nn.Module):
    """A stand-in feature network (TorchScript): 6-d features and 4 logits from a 2x2 average pool."""

    def forward(self, x):
        f = torch.tanh(F.adaptive_avg_pool2d(x / 255.0, 2).flatten(1)[:, :6] * 3 - 1.5)
        return f, f[:, :4] * 2


# ---- official DiT layout ----


def test_official_xl2_listing_loads_strict():
    """The official DiT-XL/2 key listing (names and shapes) loads strictly into DiT_models["DiT-XL/2"] (meta tensors)."""
    sd = read_key_listing(DATA / "dit-xl-2_official_state_dict.txt")
    model, name, kwargs = pretrained.build_dit(sd)
    assert name == "DiT-XL/2" and sum(p.numel() for p in model.parameters()) == 675_129_632
    assert (kwargs["input_size"], kwargs["num_classes"], kwargs["num_heads"], kwargs["learn_sigma"]) == (32, 1000, 16, True)
    sd["pos_embed"] = torch.empty(1, 1024, 1152, device="meta")                      # the 512px model
    assert pretrained.dit_architecture(sd)[0]["input_size"] == 64


@pytest.mark.parametrize("wrap", ["raw", "train_dict", "safetensors"])
def test_official_file_loads(wrap, tmp_path):
    torch.manual_seed(0)
    ema = randomize(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=4, num_heads=4,
                        num_classes=1000)).state_dict()                                 # DiT-T/2 at 8x8 latents
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.pt")
    if wrap == "safetensors":
        from safetensors.torch import save_file
        save_file(ema, str(path))
    elif wrap == "raw":
        torch.save(ema, path)
    else:   # DiT train.py: {"model", "ema", "opt", "args": argparse.Namespace} (the Namespace is never built)
        torch.save({"model": {k: v * 0 for k, v in ema.items()}, "ema": ema, "opt": {"state": {}},
                    "args": argparse.Namespace(model="DiT-T/2", lr=1e-4)}, path)
    p = pretrained.load_pretrained(path, with_vae=False)
    assert (p["config"]["format"], p["config"]["name"], p["null_class"], p["config"]["guide_channels"]) == \
        ("official-dit", "DiT-T/2", 1000, 3)
    assert all(torch.equal(v, ema[k]) for k, v in p["model"].state_dict().items())
    assert p["model"].t_embedder.freq_shift == 0 and p["model"].blocks[0].norm2.eps == 1e-6
    assert pretrained.load_pretrained(path, with_vae=False, guide_channels=0)["config"]["guide_channels"] is None


# ---- schedulers ----


@pytest.mark.parametrize("cls,kwargs", [("DDIMScheduler", dict()),
                                        ("DDIMScheduler", dict(timestep_spacing="leading", steps_offset=1)),
                                        ("DDIMScheduler", dict(timestep_spacing="trailing")),
                                        ("DDPMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.0015,
                                                               beta_end=0.0195, timestep_spacing="leading")),
                                        ("DDIMScheduler", dict(trained_betas=(np.linspace(1e-4, 0.03, 1000) ** 1.5)
                                                               .tolist()))])
def test_scheduler_betas_and_dpm_timesteps_match_diffusers(cls, kwargs):
    saved = dict(getattr(diffusers, cls)(**kwargs).config)              # what a release's scheduler_config.json holds
    if "timestep_spacing" not in kwargs:
        saved.pop("timestep_spacing")                                    # an old save without the key: DPM's default
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(saved)
    torch.testing.assert_close(pretrained.scheduler_betas(saved).float(), dpm.betas, rtol=2e-6, atol=0)
    for steps in (7, 25, 50):
        dpm.set_timesteps(steps)
        assert pretrained.dpm_timesteps(saved, steps) == dpm.timesteps.tolist()


def test_scheduler_defaults_and_unsupported_options():
    ldm = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195)
    torch.testing.assert_close(pretrained.scheduler_betas({}, "scaled_linear").float(), ldm.betas, rtol=2e-6, atol=0)
    with pytest.raises(ValueError, match="prediction_type='v_prediction'"):
        pretrained.scheduler_betas({"prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="beta_schedule 'squaredcos_cap_v2'"):
        pretrained.scheduler_betas({"beta_schedule": "squaredcos_cap_v2"})


# ---- downloads: file:// URLs, huggingface_hub offline from a pre-populated cache, or faked (no network) ----


def test_url_download_checks_sha256_and_caches(tmp_path):
    src = tmp_path / "DiT-T.pt"
    torch.save(randomize(DiT(input_size=8, hidden_size=128, depth=4, num_heads=4, num_classes=10)).state_dict(), src)
    url = src.resolve().as_uri()
    with pytest.raises(ValueError, match="sha256 mismatch"):
        pretrained.load_pretrained(url, root=tmp_path / "cache", sha256="0" * 64, with_vae=False)
    assert not any(f.is_file() for f in (tmp_path / "cache").rglob("*"))               # nothing half-written left
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    p = pretrained.load_pretrained(url, root=tmp_path / "cache", sha256=digest, with_vae=False)
    assert p["config"]["num_classes"] == 10 and len(list((tmp_path / "cache").rglob("*.pt"))) == 1
    src.unlink()                                                                         # served from the cache now
    assert pretrained.load_pretrained(url, root=tmp_path / "cache", with_vae=False)["null_class"] == 10
    with pytest.raises(FileNotFoundError):
        pretrained.resolve((tmp_path / "missing.pt").resolve().as_uri(), root=tmp_path / "cache")


def test_hf_repo_offline_comes_from_the_hub_cache_without_network(dit_release, offline_hub):
    """A pipeline repo pre-populated in huggingface_hub's cache (the vae as .bin only, an older repo) loads with
    HF_HUB_OFFLINE=1 and no socket; the local-path route still works; a repo not cached is one ConnectionError."""
    folder, _ = dit_release
    cache, attempts = offline_hub
    files = {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}
    files["vae/diffusion_pytorch_model.bin"] = files.pop("vae/diffusion_pytorch_model.safetensors")
    commit = "c0ffee" + "0" * 34
    hub_cache_with(cache, "org/dit-tiny", files, commit, ref="v1")
    p = pretrained.load_pretrained("org/dit-tiny@v1")
    local = pretrained.load_pretrained(folder)
    assert p["config"]["format"] == "diffusers-dit" and p["vae"] is not None and attempts == []
    assert all(torch.equal(v, local["model"].state_dict()[k]) for k, v in p["model"].state_dict().items())
    assert pretrained.resolve("org/dit-tiny@v1") == cache / "models--org--dit-tiny" / "snapshots" / commit
    with pytest.raises(ConnectionError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        pretrained.load_pretrained("org/other-dit")
    assert attempts == []


def test_hf_repo_files_are_asked_of_huggingface_hub_at_one_commit(dit_release, tmp_path, monkeypatch):
    """Every load asks huggingface_hub for model_index.json at the revision asked (it revalidates a branch), then
    for each file at the commit that resolved to; .safetensors first, .bin when the repo has none; a gated repo is
    one line naming HF_TOKEN, an ldm_cc3m repo is refused before any request."""
    import huggingface_hub
    from huggingface_hub import errors
    folder, _ = dit_release
    files = {str(f.relative_to(folder)): f for f in folder.rglob("*") if f.is_file()}
    files["vae/diffusion_pytorch_model.bin"] = files.pop("vae/diffusion_pytorch_model.safetensors")
    commit, calls = "ab" * 20, []

    def http_error(cls, message):                # the error types hf_hub_download raises, without an HTTP response
        err = cls.__new__(cls)
        Exception.__init__(err, message)
        return err

    def fake_download(repo_id, filename, *, revision=None, cache_dir=None):
        calls.append((repo_id, filename, revision, cache_dir))
        if repo_id == "org/gated":
            raise http_error(errors.GatedRepoError, "access to model org/gated is restricted")
        if filename not in files:
            raise http_error(errors.RemoteEntryNotFoundError, f"404: {filename}")
        snap = tmp_path / "snap" / commit / filename               # where the Hub's cache would put it
        snap.parent.mkdir(parents=True, exist_ok=True)
        snap.write_bytes(files[filename].read_bytes())
        return str(snap)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    p = pretrained.load_pretrained("org/dit-tiny@v1", root=tmp_path / "root")
    assert p["config"]["format"] == "diffusers-dit" and p["vae"] is not None
    assert calls[0] == ("org/dit-tiny", "model_index.json", "v1", tmp_path / "root" / "hub")
    assert {c[2] for c in calls[1:]} == {commit} and {c[0] for c in calls} == {"org/dit-tiny"}
    asked = [c[1] for c in calls]
    assert asked.index("vae/diffusion_pytorch_model.safetensors") < asked.index("vae/diffusion_pytorch_model.bin")
    n = len(calls)
    pretrained.load_pretrained("org/dit-tiny", with_vae=False)
    assert calls[n][1:3] == ("model_index.json", "main") and calls[n][3] is None    # the shared HF cache
    n = len(calls)
    with pytest.raises(ValueError, match="bert-base-uncased"):
        pretrained.load_pretrained("DiffusionNoise/ldm_cc3m_clean")
    with pytest.raises(ValueError, match="HF_TOKEN"):
        pretrained.load_pretrained("org/gated")
    assert len(calls) == n + 1


# ---- bad input: one clear line, exit code 2, nothing written ----


def test_bad_sources_give_one_line_and_exit_2(dit_release, tmp_path, capsys):
    folder, _ = dit_release
    good = (folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    buf = io.BytesIO()
    torch.save({"a.weight": torch.zeros(64, 64)}, buf)
    (tmp_path / "truncated.pt").write_bytes(buf.getvalue()[:300])
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    torch.save({"kind": "dit", "config": {}, "model": {}}, tmp_path / "nanocep.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    shutil.copy(folder / "vae" / "diffusion_pytorch_model.safetensors", tmp_path / "vae.safetensors")
    shutil.copy(folder / "transformer" / "diffusion_pytorch_model.safetensors", tmp_path / "transformer.safetensors")
    text = tmp_path / "text_release"
    text.mkdir()
    (text / "model_index.json").write_text(json.dumps({"_class_name": "LDMTextToImagePipeline",
                                                       "bert": ["transformers", "BertModel"]}))
    cases = {"truncated.safetensors": "truncated or corrupt", "truncated.pt": "truncated or corrupt",
             "foreign.pt": "unrecognised checkpoint", "nanocep.pt": "is a nanoCEP checkpoint",
             "empty.pt": "empty file", "vae.safetensors": "an autoencoder", "text_release": "bert-base-uncased",
             "transformer.safetensors": "pass its pipeline folder", "missing.pt": "not found"}
    for name, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            pretrained.load_pretrained(tmp_path / name, with_vae=False)
        grid = tmp_path / "grid.png"
        assert ev.main(["--pretrained", str(tmp_path / name), "--classes", "1", "--grid", str(grid)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and not grid.exists()
    assert ev.main(["--pretrained", str(folder), "--classes", "1000", "--grid", str(tmp_path / "g.png")]) == 2
    assert ev.main([str(tmp_path / "foreign.pt"), "--pretrained", str(folder)]) == 2
    assert pretrained.main([str(tmp_path / "foreign.pt")]) == 2
    assert "unrecognised" in capsys.readouterr().err


# ---- the paper's LDM-4 IN-1K layout (LDMClassToImagePipeline) and the CompVis cin256-v2 checkpoint ----


@pytest.fixture(scope="module")
def ldm_release(tmp_path_factory):
    """unet/ (UNet2DConditionModel), class_embedder/ (the fork's ClassEmbedder: embedding.weight, n_classes = 10 + null),
    vqvae/ (VQModel), scheduler/ (DDIM with trained_betas), model_index.json, as the fork's pipeline saves them."""
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("ldm_release")
    # attention only at the deepest level, so one up level has an upsampler without attention (CompVis sub-index 1)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=16, attention_head_dim=2)
    randomize(unet, 0.05, seed=2)
    unet.eval().save_pretrained(folder / "unet")
    table = torch.randn(11, 16, generator=torch.Generator().manual_seed(3))
    (folder / "class_embedder").mkdir()
    save_file({"embedding.weight": table}, str(folder / "class_embedder" / "diffusion_pytorch_model.safetensors"))
    (folder / "class_embedder" / "config.json").write_text(json.dumps({"_class_name": "ClassEmbedder",
                                                                        "embed_dim": 16, "n_classes": 11}))
    vq = diffusers.VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3, num_vq_embeddings=64,
                           norm_num_groups=4, layers_per_block=1, sample_size=16)
    randomize(vq, 0.1, seed=4)
    vq.eval().save_pretrained(folder / "vqvae")        # its scaling_factor 0.18215 must NOT be applied (class pipeline)
    betas = (torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2).tolist()
    diffusers.DDIMScheduler(trained_betas=betas, clip_sample=False, set_alpha_to_one=False,
                            steps_offset=1).save_config(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "LDMClassToImagePipeline", "class_embedder": ["latent_diffusion", "ClassEmbedder"],
        "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vqvae": ["diffusers", "VQModel"]}))
    return folder, unet, table, vq


def test_ldm_release_equals_diffusers_unet_with_class_context(ldm_release):
    folder, unet, table, _ = ldm_release
    p = pretrained.load_pretrained(folder)
    cfg, model = p["config"], p["model"]
    assert (cfg["format"], p["null_class"], cfg["num_classes"], cfg["latent_size"]) == ("diffusers-ldm", 10, 10, 8)
    assert p["vae"].scale_factor == 1.0 and not cfg["learn_sigma"]
    g = torch.Generator().manual_seed(5)
    x, t, y = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([3, 420, 999]), torch.tensor([0, 7, 10])
    with torch.no_grad():
        theirs = unet(x, t, encoder_hidden_states=table[y][:, None]).sample     # a one-token class context
        torch.testing.assert_close(model(x, t, y), theirs, rtol=1e-5, atol=1e-5)


def reference_class_pipeline(unet, table, vq, scheduler, label, noise, scale, steps):
    """LDMClassToImagePipeline's loop as the authors' fork writes it (checkpoints.md §1.3): null = n_classes - 1, CFG
    when scale != 1 on the batch [uncond, cond], no latent rescaling, VQ decode (which quantizes) -> [0, 1]."""
    null = table.shape[0] - 1
    context = torch.stack([table[[null]], table[[label]]])                            # (2, 1, D): uncond first
    scheduler.set_timesteps(steps)
    latents = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_u, eps_c = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample.chunk(2)
            latents = scheduler.step(eps_u + scale * (eps_c - eps_u), t, latents).prev_sample
        return (vq.decode(latents).sample / 2 + 0.5).clamp(0, 1)


def test_ldm_sampling_equals_reference_class_pipeline(ldm_release):
    folder, unet, table, vq = ldm_release
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(config)
    sample_fn, info = ev.load_pretrained_sampler(folder, steps=5)
    assert info["null_class"] == 10 and info["timestep_spacing"] == "leading"
    for label, seed in [(3, 21), (9, 22)]:
        noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        theirs = reference_class_pipeline(unet, table, vq, dpm, label, noise, 2.5, 5)[0].permute(1, 2, 0).numpy() * 255
        ours = sample_fn(torch.tensor([label]), [seed], 2.5)[0].astype(np.float64)
        assert 0.05 < (theirs > 0).mean() and (theirs < 255).mean() > 0.05
        assert np.abs(ours - theirs).max() <= 0.5 + 1e-3


def test_full_size_unet_mapping_gives_the_compvis_cin256_layout():
    """diffusers' cin256-v2 U-Net config (meta tensors) maps onto exactly the CompVis key listing, names and shapes,
    and its architecture read back is train_ldm's ldm4-cin256."""
    from models.unet import UNET_CONFIGS
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(
            sample_size=64, in_channels=3, out_channels=3, block_out_channels=(192, 384, 576, 960), layers_per_block=2,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), cross_attention_dim=512, attention_head_dim=1)
    ours = {k: tuple(v.shape) for k, v in pretrained.unet_to_compvis(unet.state_dict()).items()}
    listing = {k: tuple(v.shape) for k, v in read_key_listing(DATA / "ldm4-cin256-v2_unet_compvis_state_dict.txt").items()}
    assert ours == listing
    model, arch = pretrained.build_ldm(read_key_listing(DATA / "ldm4-cin256-v2_unet_compvis_state_dict.txt"),
                                       torch.empty(1001, 512, device="meta"))
    assert {k: arch[k] for k in UNET_CONFIGS["ldm4-cin256"]} == UNET_CONFIGS["ldm4-cin256"]
    assert sum(p.numel() for p in model.diffusion_model.parameters()) == 400_920_579
    assert model.cond.null_id == 1000


def test_compvis_lightning_checkpoint(ldm_release, tmp_path):
    """A cin256-v2-style Lightning .ckpt (model.diffusion_model.*, cond_stage_model.embedding.weight,
    first_stage_model.*, DDPM buffers, pickled callbacks) loads to the same model as the diffusers release."""
    folder, unet, table, _ = ldm_release
    vq = randomize(diffusers.VQModel(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                     up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3, num_vq_embeddings=64,
                                     layers_per_block=1), 0.1, seed=6).eval()   # CompVis: 32 groups, no config needed
    sd = {f"model.diffusion_model.{k}": v for k, v in pretrained.unet_to_compvis(unet.state_dict()).items()}
    sd.update({f"first_stage_model.{k}": v for k, v in vq.state_dict().items()})
    betas = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2
    sd.update({"cond_stage_model.embedding.weight": table, "betas": betas.float(),
               "alphas_cumprod": torch.cumprod(1 - betas, 0).float()})
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 7, "callbacks": {"ckpt": argparse.Namespace(monitor="val")}}, ckpt)
    p = pretrained.load_pretrained(ckpt)
    ref = pretrained.load_pretrained(folder)
    assert (p["config"]["format"], p["null_class"]) == ("compvis-ldm", 10)
    torch.testing.assert_close(p["betas"], betas, rtol=1e-6, atol=0)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 900]), torch.tensor([10, 4])
    z = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(p["model"](x, t, y), ref["model"](x, t, y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p["vae"].decode(z), vq.decode(z).sample, rtol=1e-4, atol=1e-4)
    del sd["cond_stage_model.embedding.weight"]
    torch.save({"state_dict": sd}, ckpt)
    with pytest.raises(ValueError, match="without a class embedder"):
        pretrained.load_pretrained(ckpt)
