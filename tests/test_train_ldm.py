"""train_ldm.py: the CompVis cin256-v2 U-Net layout, a diffusers numerical oracle, init, CFG, shapes, training, resume,
bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tools import bench
import diffusion
import train_ldm
from models.encoders import encoder_from_config
from config import parse_config
from conftest import ROOT, TINY, run_tiny, check_resume_is_bit_identical, expect_one_line_error, randomize, train_and_check_learning
from conftest import load_ckpt as ckpt
from models import unet as unet_lib
from models.unet import LDM, UNetModel, build_unet

KEYS = os.path.join(os.path.dirname(__file__), "data", "ldm4-cin256-v2_unet_compvis_state_dict.txt")


def tiny_ldm(**cfg_overrides):
    cfg = parse_config(train_ldm.LDMConfig, ["--num-classes", "5"])
    for k, v in cfg_overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return unet_lib.from_config(cfg, encoder_from_config)


# ---- architecture ----

def test_cin256_v2_unet_matches_compvis_keys_shapes_order_and_count():
    cfg = parse_config(train_ldm.LDMConfig, ["--preset", "ldm4-in1k", "--num-classes", "1000"], train_ldm.PRESETS)
    with torch.device("meta"):                  # no memory, no init work (build_model = LDM(these two))
        unet = build_unet(cfg.model, in_channels=cfg.latent_shape[0], learn_sigma=cfg.learn_sigma)
    model = LDM(unet, encoder_from_config(cfg, unet.context_dim))   # (a meta normal_ costs ~4 s)
    ours = [(k, tuple(v.shape)) for k, v in model.diffusion_model.state_dict().items()]
    with open(KEYS) as f:
        theirs = [(ln.split(" (")[0], tuple(int(s) for s in ln.split(" (")[1].rstrip(")\n").split(",") if s.strip()))
                  for ln in f if ln.strip()]
    assert len(theirs) == 688
    assert ours == theirs                       # same names, shapes and order as the CompVis state_dict
    assert sum(p.numel() for p in model.diffusion_model.parameters()) == 400_920_579
    # the class table (1000 classes + the null row, width 512) lives beside the U-Net, not inside it
    assert tuple(model.cond_stage_model.embedding_table.weight.shape) == (1001, 512)
    assert sum(p.numel() for p in model.parameters()) == 400_920_579 + 1001 * 512


@pytest.mark.parametrize("side", [16, 24])
def test_unet_equals_diffusers_on_converted_compvis_weights(side):
    """Independent oracle: diffusers builds its UNet2DConditionModel from the CompVis config values and converts our
    (CompVis-named) state dict with its own key mapping; both nets must compute the same function. The odd channel
    multipliers (1, 2, 3, 5), attention at ds (8, 4, 2), 2 heads, and a side (24) that is not a power of two."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)
    arch = dict(model_channels=32, channel_mult=[1, 2, 3, 5], num_res_blocks=2, attention_resolutions=[8, 4, 2],
                num_heads=2, context_dim=24, transformer_depth=1)
    ours = randomize(UNetModel(in_channels=3, out_channels=3, **arch), std=0.1, seed=1).eval()
    compvis = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    yaml = {"model": {"params": {"unet_config": {"params": dict(in_channels=3, out_channels=3, **arch)},
                                 "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4]}}}}}}
    config = create_unet_diffusers_config_from_ldm(yaml, compvis)
    ref = UNet2DConditionModel(**config).eval()
    ref.load_state_dict(convert_ldm_unet_checkpoint(compvis, config), strict=True)
    torch.manual_seed(2)
    x, t, ctx = torch.randn(2, 3, side, side), torch.tensor([3, 700]), torch.randn(2, 1, 24)
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = ref(x, t, encoder_hidden_states=ctx).sample
    assert a.shape == (2, 3, side, side)
    assert a.abs().mean() > 0.05
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_zero_init_output_means_zero_initial_prediction():
    model = tiny_ldm(cep="gaussian")                 # train mode, CEP on: the output is still exactly zero
    x, t, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 4, 5])
    assert torch.count_nonzero(model(x, t, y)) == 0
    # the zero comes from the initialisation, not from a broken graph: one SGD step makes it non-zero
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (model(x, t, y) - torch.randn_like(x)).pow(2).mean().backward()
    opt.step()
    assert torch.count_nonzero(model(x, t, y)) > 0


def test_cfg_scale_one_is_the_conditional_prediction_and_guidance_is_the_cfg_formula():
    model = randomize(tiny_ldm(), std=0.1, seed=1).eval()
    torch.manual_seed(3)
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([5, 400, 900]), torch.tensor([0, 2, 4])
    null = model.cond.null_like(y)
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        assert not torch.allclose(cond, uncond, atol=1e-3)         # the label really reaches the U-Net
        assert torch.equal(diffusion.cfg_model_fn(model, y, null, 1.0)(x, t), cond)
        guided = diffusion.cfg_model_fn(model, y, null, 3.0)(x, t)  # one forward on the doubled batch
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_class_embedding_is_one_context_token_and_cep_perturbs_it_only_in_training():
    model = tiny_ldm(cep="gaussian")
    y = torch.tensor([1, 2])
    context, mask = model.context(y)
    assert context.shape == (2, 1, 64) and mask is None
    assert not torch.equal(model.context(y)[0], model.context(y)[0])   # fresh CEP noise on every call
    model.eval()
    assert torch.equal(model.context(y)[0], model.cond.embedding_table(y)[:, None])


def test_context_mask_hides_padding_tokens():
    """The text interface: masked context tokens have no effect, i.e. the same output as leaving them out."""
    unet = randomize(build_unet("unet-tiny", context_dim=8), std=0.1, seed=1).eval()
    torch.manual_seed(4)
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([10, 600]), torch.randn(2, 3, 8)
    keep = torch.tensor([[True, True, False], [True, False, False]])
    with torch.no_grad():
        masked = unet(x, t, ctx, keep)
        alone = torch.cat([unet(x[i:i + 1], t[i:i + 1], ctx[i:i + 1, keep[i]]) for i in range(2)])
        unmasked = unet(x, t, ctx)
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(masked, unmasked, atol=1e-3)             # the padding tokens did matter unmasked


def test_non_square_and_indivisible_inputs_are_rejected_clearly():
    unet = build_unet("ldm4-cin256", model_channels=32, context_dim=8)    # 4 levels: side % 8 == 0
    t, ctx = torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match="square"):
        unet(torch.zeros(1, 3, 16, 24), t, ctx)
    with pytest.raises(ValueError, match=r"not divisible by 2\^\(levels-1\) = 8"):
        unet(torch.zeros(1, 3, 20, 20), t, ctx)
    with pytest.raises(ValueError, match="context must be"):
        unet(torch.zeros(1, 3, 16, 16), t, torch.zeros(1, 1, 9))
    with pytest.raises(ValueError, match="multiple of 32"):
        UNetModel(model_channels=48, channel_mult=(1, 3))


# ---- training through main(argv) ----

def test_default_trains_loss_falls_writes_grid_and_checkpoint_rebuilds(tmp_path):
    man = train_and_check_learning(train_ldm.main, tmp_path, 30, "--batch-size", "8", "--sample-steps", "3",
                                   "--sample-per-class", "1", "--cep", "gaussian")
    assert man["num_corrupted"] == round(0.05 * 256)
    c = ckpt(tmp_path)
    assert c["step"] == 30 and c["kind"] == "ldm" and c["config"]["cep"] == "gaussian"
    # what evaluate.py does: rebuild the model from the checkpoint's config alone and load the EMA strictly
    cfg = train_ldm.LDMConfig(**c["config"])
    model = unet_lib.from_config(cfg, encoder_from_config)
    model.load_state_dict(c["ema"], strict=True)
    assert isinstance(diffusion.from_config(cfg), diffusion.GaussianDiffusion)


def test_resume_is_bit_identical(tmp_path):
    b = check_resume_is_bit_identical(train_ldm.main, tmp_path, "--cep", "uniform", "--corrupt", "0.1")
    assert b["step"] == 4


def _expect_error(capsys, argv, needle):
    expect_one_line_error(capsys, train_ldm.main, "train_ldm.py", argv, needle)


def test_bad_inputs_one_line_exit_2(tmp_path, capsys):
    base = TINY + ["--steps", "1"]
    _expect_error(capsys, base + ["--corrupt", "1.5", "--out", str(tmp_path / "o1")], "--corrupt")
    _expect_error(capsys, base + ["--model", "unet-huge", "--out", str(tmp_path / "o2")], "unknown --model")
    _expect_error(capsys, base + ["--model", "unet-small", "--image-size", "18", "--out", str(tmp_path / "o3")],
                  "divisible by 4")
    _expect_error(capsys, base + ["--vae", "vq-f4", "--image-size", "30", "--out", str(tmp_path / "o4")],
                  "multiple of 4")
    _expect_error(capsys, base + ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o5")], "not found")
    assert run_tiny(train_ldm.main, tmp_path / "t2", "--steps", 1) == 0
    _expect_error(capsys, base + ["--model", "unet-small", "--resume", str(tmp_path / "t2" / "last.pt"),
                                  "--out", str(tmp_path / "o6")], "model")
    _expect_error(capsys, base + ["--out", str(tmp_path / "t2")], "already holds a run")
    for name in ("o1", "o2", "o3", "o4", "o5", "o6"):
        assert not os.path.exists(tmp_path / name / "last.pt")
    _expect_error(capsys, base + ["--cond", "text", "--corrupt-type", "symmetric", "--corrupt", "0.1",
                                  "--out", str(tmp_path / "o7")], "flips class labels")


def test_cli_exit_code_is_2_for_real(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_ldm.py"), "--image-size", "18", "--model",
                        "unet-small", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("train_ldm.py: error:") and len(p.stderr.strip().splitlines()) == 1


def test_presets_parse():
    cfg = parse_config(train_ldm.LDMConfig, ["--preset", "ldm4-in1k", "--steps", "7"], train_ldm.PRESETS)
    assert (cfg.steps, cfg.model, cfg.vae, cfg.batch_size, cfg.lr) == (7, "ldm4-cin256", "vq-f4", 512, 1e-4)
    assert cfg.latent_shape == (3, 64, 64) and not cfg.learn_sigma and cfg.schedule == "scaled_linear"
    cfg = train_ldm.resolve(cfg)


def test_bench_runs_the_unet(capsys):
    assert bench.main(["--script", "train_ldm", "--image-size", "8", "--batch-size", "2", "--iters", "1",
                       "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "unet-tiny" in out and "GFLOP fwd/img" in out


def test_on_the_fly_vq_f4_latents_train_and_grid_decodes(tmp_path):
    """LDM-4's latent path: a small random VQ-f4 autoencoder (diffusers folder) turns 16px images into 4x4x3 latents."""
    from weights import vae
    from safetensors.torch import save_file
    torch.manual_seed(0)
    ae = vae.build_vae("vq-f4", block_out_channels=(32, 32, 32), layers_per_block=1, num_codes=64)
    folder = tmp_path / "vqvae"
    folder.mkdir()
    save_file(ae.state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"block_out_channels": [32] * 3, "layers_per_block": 1,
                                                    "latent_channels": 3, "num_vq_embeddings": 64}))
    rc = train_ldm.main(TINY + ["--image-size", "16", "--vae", "vq-f4", "--vae-path", str(folder), "--steps", "2",
                                "--sample-every", "2", "--sample-steps", "2", "--sample-per-class", "1",
                                "--out", str(tmp_path / "run")])
    assert rc == 0
    c = ckpt(tmp_path / "run")
    assert c["model"]["diffusion_model.input_blocks.0.0.weight"].shape[1] == 3      # 3-channel VQ latents in
    from PIL import Image
    assert Image.open(tmp_path / "run" / "samples" / "step_0000002.png").size[0] >= 64   # decoded to 16px images


def test_text_conditional_unet_trains_writes_captions_and_resumes(tmp_path):
    """--cond text: the text encoder's tokens are the U-Net's context; swap corruption, CEP, grid + captions, resume."""
    text = ["--cond", "text", "--text-depth", "1", "--context-length", "24", "--corrupt", "0.1", "--cep", "gaussian"]
    assert run_tiny(train_ldm.main, tmp_path / "straight", "--steps", 4, *text) == 0
    assert run_tiny(train_ldm.main, tmp_path / "split", "--steps", 2, *text) == 0
    assert run_tiny(train_ldm.main, tmp_path / "split", "--steps", 4, "--resume", "auto", "--sample-every", 4, "--sample-steps", 2,
               "--sample-per-class", 1, *text) == 0
    a, b = ckpt(tmp_path / "straight"), ckpt(tmp_path / "split")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["config"]["text_width"] == 64                             # unet-tiny's context width
    assert "cond_stage_model.token_embedding.weight" in a["model"] or any("cond_stage_model" in k for k in a["model"])
    assert json.load(open(tmp_path / "straight" / "corruption.json"))["kind"] == "swap"
    captions = (tmp_path / "split" / "samples" / "captions.txt").read_text().splitlines()
    assert len(captions) == 10 and "red disc" in captions[0]
    assert (tmp_path / "split" / "samples" / "step_0000004.png").is_file()


def test_cc3m_preset_is_the_paper_shape():
    cfg = parse_config(train_ldm.LDMConfig, ["--preset", "ldm4-cc3m", "--tokenizer", "bytes"], train_ldm.PRESETS)
    cfg = train_ldm.resolve(cfg)
    assert (cfg.cond, cfg.text_width, cfg.text_depth, cfg.steps, cfg.corrupt_type) == ("text", 768, 12, 396_000, "swap")
    with torch.device("meta"):
        unet = build_unet(cfg.model, context_dim=cfg.text_width)
    assert unet.context_dim == 768
