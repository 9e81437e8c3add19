"""
Train a class- or text-conditional latent diffusion U-Net (LDM-4, Rombach et al. 2022) under condition corruption and CEP.

    python train_ldm.py                                            # tiny U-Net on the built-in dataset, CPU, minutes
    python train_ldm.py --corrupt 0.05 --cep gaussian              # 5% flipped labels + CEP-G (paper §5)
    torchrun --nproc_per_node 8 train_ldm.py --preset ldm4-in1k --data /data/imagenet/train --corrupt 0.05
    python train_ldm.py --out runs/ldm --resume auto               # continue where the run in runs/ldm stopped
    python -m tools.bench --script train_ldm --model ldm4-cin256 --image-size 256 --vae vq-f4 --batch-size 8

The file reads top to bottom like train_dit.py: the config (config.TrainConfig plus the U-Net's fields, every one a
flag), the presets (the paper's recipes), how a config is checked, then main(): flags -> data -> model
(unet.from_config: the CompVis U-Net in the LDM wrapper with its condition encoder) -> trainer.train().
A class label is one cross-attention token; --cond text hands the U-Net a caption encoder's tokens instead.
"""
import math
import sys
from dataclasses import dataclass, replace

import torch

from plumbing.common import RunError, setup_distributed
from config import (LATENT_GEOMETRY, Family, TrainConfig, opt, parse_config, print_config,
                    resolve_run_config)
from models import controlnet, unet
from models.encoders import encoder_from_config
from scoring import judge
from sources.tokenizer import get_tokenizer
from trackers import tracking
from runio import resumed_config
from trainer import exit_codes, load_data, train
from weights import latents, pretrained, vae


# ----------------------------------------------------------------------------------------------------------------------
# Config: the shared training fields (config.TrainConfig) + the U-Net's; every field is a command-line flag

@dataclass
class LDMConfig(TrainConfig):
    model: str = opt("unet-tiny", "U-Net size: unet-tiny | unet-small | ldm4-cin256 (the CompVis cin256-v2 U-Net)",
                     arch=True)
    schedule: str = opt("scaled_linear", "beta schedule: scaled_linear (LDM, sqrt-linear 0.0015..0.0195) or linear "
                        "(DiT)", arch=True)
    text_width: int = opt(0, "text encoder width = the U-Net's context width; 0 = the --model's context_dim", arch=True)
    out: str = opt("runs/ldm", "run folder: checkpoints, log.jsonl, samples/")
    sample_cfg: float = opt(2.0, "guidance scale of the sample grids (paper Table 1: 2.0 for LDM-4 IN-1K)")


PRESETS = {
    # LDM-4 on ImageNet-1K 256^2, the paper's recipe (Table 3, §4.1) on the CompVis cin256-v2 config: VQ-f4 latents
    # 64x64x3, lr 1e-4, 64/GPU x 8 GPUs, 178K steps. Not stated by the paper, taken from upstream CompVis: AdamW's
    # default weight decay 0.01. EMA: CompVis's DDPM default is LitEma 0.9999, but cin256-v2.yaml sets use_ema: False,
    # so upstream trains and samples the raw weights. We keep an EMA 0.9999 (no LitEma warmup) beside them: it costs
    # nothing, evaluate.py samples it by default and `evaluate.py --no-ema` samples the raw weights as upstream does.
    # CFG dropout 0.1 follows DiT (CompVis has none).
    "ldm4-in1k": dict(model="ldm4-cin256", image_size=256, num_classes=1000, vae="vq-f4", steps=178_000,
                      batch_size=512, lr=1e-4, weight_decay=0.01, grad_clip=0.0, ema_decay=0.9999, class_dropout=0.1,
                      learn_sigma=False, schedule="scaled_linear", log_every=100, ckpt_every=10_000,
                      keep_every=50_000, sample_every=10_000, sample_cfg=2.0, sample_steps=50, sample_per_class=4),
    # LDM-4 on CC3M 256^2 (Table 3): the same U-Net with a 768-wide context, 396K steps. The paper fine-tunes a
    # pre-trained bert-base-uncased (12 layers, 768 wide, WordPiece); nanoCEP trains a text encoder of that shape from
    # scratch with GPT-2's BPE instead (LDM's own txt2img recipe trains its encoder jointly from scratch too).
    "ldm4-cc3m": dict(model="ldm4-cin256", cond="text", image_size=256, vae="vq-f4", tokenizer="gpt2",
                      context_length=77, text_width=768, text_depth=12, text_heads=12, steps=396_000, batch_size=512,
                      lr=1e-4, weight_decay=0.01, ema_decay=0.9999, class_dropout=0.1, learn_sigma=False,
                      schedule="scaled_linear", log_every=100, ckpt_every=10_000, keep_every=50_000,
                      sample_every=10_000, sample_cfg=3.0, sample_steps=50, sample_per_class=4),
    # ControlNet-Canny on ImageNet-100 over a pre-trained LDM-4 IN-1K base (paper §4.4, Table 2): pass --init-from BASE
    # (the architecture comes from it) and --data IN-100/train. The paper states: diffusers' train_controlnet.py with
    # its default learning rate and batch size, 10 epochs on IN-100, 4 GPUs, Canny thresholds 100 / 200. The defaults
    # of diffusers' examples/controlnet/train_controlnet.py: lr 5e-6, batch 4 per device (x 4 = 16), weight decay 1e-2,
    # constant lr after 500 warm-up steps (we have no warm-up). 10 epochs of ~126K images at 16 = 79K steps. It keeps no
    # EMA (sample the raw weights with evaluate.py --no-ema to match); CFG dropout 0.1 keeps the base's null class in
    # use so the grid can be guided (diffusers' default drops no prompt).
    "in100-controlnet": dict(control="canny", canny_low=100.0, canny_high=200.0, steps=79_000, batch_size=16,
                             lr=5e-6, weight_decay=1e-2, ema_decay=0.9999, class_dropout=0.1, log_every=100,
                             ckpt_every=5_000, keep_every=20_000, sample_every=5_000, sample_cfg=2.25,
                             sample_steps=50, sample_per_class=4),
}

# --init-from a release takes this preset's optimiser (lr, weight decay, clip, EMA, batch), not the CPU default's;
# a nanoCEP checkpoint keeps its own (weights/pretrained.py init_weights). Explicit flags win.
FINE_TUNE = "ldm4-in1k"


# ----------------------------------------------------------------------------------------------------------------------
# Config -> model and diffusion; main

def resolve(cfg: LDMConfig) -> LDMConfig:
    """The checked config with every 'auto' decided (a new config; bad values raise RunError)."""
    if cfg.model not in unet.UNET_CONFIGS:
        raise RunError(f"unknown --model {cfg.model!r}; choose one of {', '.join(unet.UNET_CONFIGS)}")
    if cfg.optimizer == "muon":
        raise RunError("--optimizer muon trains a DiT's transformer-block matrices; the U-Net has none (use adamw)")
    # the text encoder feeds the U-Net's context directly: its width defaults to the model's context width
    cfg = resolve_run_config(cfg, text_width=cfg.text_width or unet.UNET_CONFIGS[cfg.model]["context_dim"])
    side, f = cfg.latent_shape[1], 2 ** (len(unet.UNET_CONFIGS[cfg.model]["channel_mult"]) - 1)
    down = LATENT_GEOMETRY[cfg.vae][1]
    if side % f:
        raise RunError(f"{cfg.model} halves its input {int(math.log2(f))} times: the input side must be divisible "
                       f"by {f}, got {side}" + (f" (--image-size {cfg.image_size} / {down})" if down > 1 else ""))
    return cfg


def build_model(cfg):
    """The LDM of a resolved config and its condition encoder, inside a ControlNet when --control asks for one."""
    return controlnet.from_config(cfg, unet.from_config(cfg, encoder_from_config))


FAMILY = Family(LDMConfig, PRESETS, resolve, build_model)   # how evaluate.py rebuilds its checkpoints


def configure(argv=None):
    """(the run's config, init): preset and flags applied, --init-from SOURCE's architecture taken, checked, 'auto'
    decided; init(model) loads SOURCE's weights (None without --init-from)."""
    cfg = parse_config(LDMConfig, argv, PRESETS, description=__doc__.split("\n\n")[0].strip(), printable=True)
    cfg, init = pretrained.init_from(cfg, "ldm", argv, (FINE_TUNE, PRESETS[FINE_TUNE]), PRESETS)   # --init-from SOURCE
    cfg = resumed_config(cfg, argv, PRESETS)             # a checkpoint older than a recipe flag: as trained
    return resolve(cfg), init


@exit_codes("train_ldm.py")
def main(argv=None) -> int:
    """Flags -> data (corrupted as asked) -> U-Net + diffusion -> train. Bad input: one line, exit 2."""
    cfg, init = configure(argv)
    if print_config(cfg, argv, "train_ldm.py"):    # --print-config: a recipe checked before any GPU hour
        return 0
    if cfg.cond == "text":
        get_tokenizer(cfg.tokenizer)                    # a missing / bad tokenizer fails now, not after data loading
    d = setup_distributed(cfg.device)
    sinks = tracking.sinks_for_run(cfg, d.main)          # --log: W&B / TensorBoard get every log record (rank 0)
    data = load_data(cfg, d, open_cache=latents.LatentDataset, load_vae=vae.load_vae)
    cfg = replace(cfg, num_classes=data.num_classes)    # 0 = the dataset's count
    torch.manual_seed(cfg.seed)                          # the same initial weights on every rank and every rerun
    model, diffusion = FAMILY.build(cfg)
    train(cfg, model, diffusion, data, kind="ldm", d=d, init=init, judge_grid=judge.judge_final_grid, sinks=sinks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
