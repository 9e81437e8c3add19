"""--init-from: fine-tuning train_dit.py / train_ldm.py from a release (random weights, diffusers layout) or a nanoCEP
checkpoint: config from the source, its EMA weights, fresh optimizer; contradicting flags are one-line errors."""
import dataclasses
import json

import pytest
import torch

import diffusion as diff
from models.encoders import encoder_from_config
from models import dit
from weights import pretrained
import train_dit
from models import unet
from runio import load_checkpoint

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def dit_t2_release(tmp_path_factory):
    """A DiTPipeline folder whose transformer has DiT-T/2's shape (4 blocks, width 128, 4 heads) on 4x4 latents, and
    a tiny 8x-downsampling KL autoencoder, so a 32px run can fine-tune it offline."""
    folder = tmp_path_factory.mktemp("dit_t2")
    transformer = diffusers.DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=4,
                                                  out_channels=8, num_layers=4, sample_size=4, patch_size=2,
                                                  num_embeds_ada_norm=1000)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for blk in transformer.transformer_blocks[1:]:   # one shared t/y embedder, as facebookresearch/DiT trains
            blk.norm1.emb.load_state_dict(transformer.transformer_blocks[0].norm1.emb.state_dict())
    vae = diffusers.AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                                  layers_per_block=1, sample_size=32)
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False)
    diffusers.DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler).save_pretrained(folder)
    return folder


def test_release_config_and_weights_equal_the_loaded_release(dit_t2_release):
    cfg, sd, note = pretrained.init_weights(str(dit_t2_release), train_dit.DiTConfig(), "dit")
    assert (cfg.model, cfg.image_size, cfg.vae, cfg.schedule) == ("DiT-T/2", 32, "kl-f8", "linear") and cfg.learn_sigma
    assert (cfg.t_freq_shift, cfg.mlp_norm_eps, cfg.cond) == (1.0, 1e-5, "class")   # diffusers' numerics
    assert cfg.vae_path == str(dit_t2_release / "vae") and "diffusers-dit DiT-T/2" in note
    model = dit.from_config(dataclasses.replace(cfg, num_classes=1000), encoder_from_config).eval()
    assert pretrained.load_init(model, sd) == "class table loaded (1001 rows)"
    ref = pretrained.load_pretrained(dit_t2_release, with_vae=False)["model"]
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 4, 4, 4, generator=g), torch.tensor([3, 500, 999]), torch.tensor([7, 1000, 42])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), ref(x, t, y), rtol=0, atol=0)
    fresh = dit.from_config(dataclasses.replace(cfg, num_classes=10), encoder_from_config)
    assert pretrained.load_init(fresh, sd).startswith("class table re-initialised: SOURCE has 1001 rows, this run 11")
    torch.testing.assert_close(fresh.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_release_fine_tunes_two_steps_and_resumes(dit_t2_release, tmp_path, capsys):
    run = tmp_path / "ft"
    args = ["--init-from", str(dit_t2_release), "--batch-size", "4", "--sample-every", "0", "--builtin-length", "16",
            "--log-every", "1", "--cep", "uniform", "--out", str(run)]
    assert train_dit.main(args + ["--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "init from" in out and "class table re-initialised: SOURCE has 1001 rows, this run 11" in out
    # the release's recipe (dit-xl2-in1k's optimiser), not the CPU default's lr 4e-3 / clip 1 / EMA 0.995, on the
    # start line; the batch size given explicitly wins
    assert "global batch 4 " in out and "| adamw lr 0.0001 wd 0 clip 0 EMA 0.9999 |" in out
    ckpt = load_checkpoint(str(run / "last.pt"))
    assert {k: ckpt["config"][k] for k in pretrained.OPTIMISER_FIELDS} == dict(
        optimizer="adamw", lr=1e-4, lr_warmdown=0, weight_decay=0.0, grad_clip=0.0, ema_decay=0.9999, batch_size=4,
        min_snr=0.0,
        t_focus=0.0, t_focus_min_log_snr=-2.0, t_focus_max_log_snr=3.5)   # uniform timesteps, as DiT trains
    assert ckpt["step"] == 2 and ckpt["config"]["model"] == "DiT-T/2" and ckpt["config"]["image_size"] == 32
    assert ckpt["config"]["init_from"] == str(dit_t2_release)
    assert all(s["step"] == 2 for s in ckpt["opt"]["state"].values())                # a fresh optimizer
    cfg = train_dit.DiTConfig(**{k: v for k, v in ckpt["config"].items()})
    assert ckpt["model"].keys() == dit.from_config(cfg, encoder_from_config).state_dict().keys() == ckpt["ema"].keys()
    assert train_dit.main(args + ["--steps", "3", "--resume", "auto"]) == 0
    assert load_checkpoint(str(run / "last.pt"))["step"] == 3
    events = [json.loads(line).get("event") for line in (run / "log.jsonl").read_text().splitlines()]
    assert events.count("init_from") == 1 and events[0] == "init_from"            # logged once, not on resume


def test_release_recipe_fills_what_the_flags_leave(dit_t2_release):
    recipe = (train_dit.FINE_TUNE, train_dit.PRESETS[train_dit.FINE_TUNE])
    cfg, _, note = pretrained.init_weights(str(dit_t2_release), train_dit.DiTConfig(lr=3e-4), "dit", {"lr"}, recipe)
    assert (cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.ema_decay, cfg.batch_size) == (3e-4, 0.0, 0.0, 0.9999, 256)
    assert ("optimiser the dit-xl2-in1k preset's (flags or --preset given: lr): optimizer=adamw, lr=0.0003, "
            "lr_warmdown=0, weight_decay=0, grad_clip=0") in note
    assert cfg.optimizer == "adamw"                   # DiT's AdamW, not the CPU default's Muon


def test_nanocep_checkpoint_first_loss_is_its_ema_models_loss(tmp_path):
    import data
    from trainer import step_draws
    base = ["--image-size", "8", "--batch-size", "4", "--sample-every", "0", "--builtin-length", "16", "--log-every",
            "1", "--ema-decay", "0.5"]
    assert train_dit.main(base + ["--steps", "3", "--out", str(tmp_path / "a"), "--lr", "2e-3", "--grad-clip", "0.5",
                                  "--weight-decay", "0.01"]) == 0
    assert train_dit.main(base + ["--steps", "1", "--seed", "7", "--init-from", str(tmp_path / "a" / "last.pt"),
                                  "--out", str(tmp_path / "b")]) == 0
    # a checkpoint source keeps its own optimiser fields (not the CPU default's lr 4e-3, clip 1, wd 0)
    b = load_checkpoint(str(tmp_path / "b" / "last.pt"))["config"]
    assert (b["lr"], b["grad_clip"], b["weight_decay"], b["ema_decay"]) == (2e-3, 0.5, 0.01, 0.5)
    logged = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    first = next(r["loss"] for r in logged if "loss" in r)

    a = load_checkpoint(str(tmp_path / "a" / "last.pt"))
    cfg = train_dit.DiTConfig(**a["config"])
    ds = data.build_dataset("builtin", 8, seed=7, builtin_length=16)
    keys = data.StepSampler(len(ds), 4, 0, 1, 7, 0, 1).keys(0)
    x, y = torch.utils.data.default_collate([ds[k] for k in keys])
    band = diff.focus_band(diff.schedule_log_snr(cfg.schedule), cfg.t_focus_min_log_snr, cfg.t_focus_max_log_snr)
    draws = step_draws(7, 0, 4, (3, 8, 8), 1000, cfg.class_dropout, torch.device("cpu"), focus=(cfg.t_focus, *band))
    t, noise, drop = draws.t, draws.noise, draws.drop
    diffusion = diff.from_config(cfg)

    def loss_of(weights):
        model = dit.from_config(cfg, encoder_from_config)
        if weights is not None:
            model.load_state_dict(weights)
        yd = model.cond.drop(y, drop)
        with torch.no_grad():
            return diffusion.training_losses(lambda xt, tt: model(xt, tt, yd), x, t, noise)["loss"].mean().item()

    assert first == pytest.approx(loss_of(a["ema"]), rel=1e-6)
    assert first != pytest.approx(loss_of(a["model"]), rel=1e-4)       # the EMA, not the raw weights


def test_contradicting_flag_and_wrong_script_are_one_line_exit_2(dit_t2_release, tmp_path, capsys):
    import train_ldm
    common = ["--steps", "1", "--sample-every", "0", "--out", str(tmp_path / "x")]
    assert train_dit.main(["--init-from", str(dit_t2_release), "--model", "DiT-S/2"] + common) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_dit.py: error: --init-from") and "--model DiT-T/2" in err[0]
    assert train_dit.main(["--init-from", str(dit_t2_release), "--image-size", "64"] + common) == 2
    assert "needs --image-size 32" in capsys.readouterr().err
    assert train_ldm.main(["--init-from", str(dit_t2_release)] + common) == 2
    assert "fine-tune it with train_dit.py" in capsys.readouterr().err
    assert train_dit.main(["--init-from", str(tmp_path / "missing.pt")] + common) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def ldm_tiny_release(tmp_path_factory):
    """An LDMClassToImagePipeline folder whose U-Net has train_ldm's unet-tiny shape, on 4x4 latents of a tiny VQ-f4."""
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("ldm_tiny")
    unet = diffusers.UNet2DConditionModel(
        sample_size=4, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4)
    unet.eval().save_pretrained(folder / "unet")
    (folder / "class_embedder").mkdir()
    save_file({"embedding.weight": torch.randn(11, 64, generator=torch.Generator().manual_seed(3))},
              str(folder / "class_embedder" / "diffusion_pytorch_model.safetensors"))
    (folder / "class_embedder" / "config.json").write_text(json.dumps({"embed_dim": 64, "n_classes": 11}))
    diffusers.VQModel(block_out_channels=(8,) * 3, down_block_types=("DownEncoderBlock2D",) * 3,
                      up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=3, num_vq_embeddings=16,
                      norm_num_groups=4, layers_per_block=1, sample_size=16).eval().save_pretrained(folder / "vqvae")
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                            clip_sample=False).save_config(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "LDMClassToImagePipeline"}))
    return folder


def test_ldm_release_maps_to_unet_tiny_and_trains(ldm_tiny_release, tmp_path, capsys):
    import train_ldm
    cfg, sd, note = pretrained.init_weights(str(ldm_tiny_release), train_ldm.LDMConfig(), "ldm")
    assert (cfg.model, cfg.image_size, cfg.vae, cfg.schedule, cfg.learn_sigma) == ("unet-tiny", 16, "vq-f4",
                                                                                     "scaled_linear", False)
    model = unet.from_config(dataclasses.replace(cfg, num_classes=10), encoder_from_config).eval()
    assert pretrained.load_init(model, sd) == "class table loaded (11 rows)"
    ref = pretrained.load_pretrained(ldm_tiny_release, with_vae=False)["model"]
    x, t, y = torch.randn(2, 3, 4, 4), torch.tensor([5, 900]), torch.tensor([3, 10])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), ref(x, t, y), rtol=0, atol=0)
    # the LDM release's recipe (ldm4-in1k's optimiser, batch included), not the CPU default's, on the start line
    assert train_ldm.main(["--init-from", str(ldm_tiny_release), "--steps", "1", "--micro-batch-size", "128",
                           "--sample-every", "0", "--builtin-length", "16", "--out", str(tmp_path / "r")]) == 0
    assert "global batch 512 = 1 x 4 x 128 " in (out := capsys.readouterr().out)
    assert "| adamw lr 0.0001 wd 0.01 clip 0 EMA 0.9999 |" in out and "optimiser the ldm4-in1k preset's:" in out
    ckpt = load_checkpoint(str(tmp_path / "r" / "last.pt"))
    assert ckpt["config"]["model"] == "unet-tiny"
    assert {k: ckpt["config"][k] for k in ("optimizer", "lr", "weight_decay", "grad_clip", "ema_decay",
                                           "batch_size")} == dict(optimizer="adamw", lr=1e-4, weight_decay=0.01,
                                                                  grad_clip=0.0, ema_decay=0.9999, batch_size=512)
