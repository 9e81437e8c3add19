"""
Train a class- or text-conditional DiT (Peebles & Xie, 2023) under condition corruption and CEP.

    python train_dit.py                                            # tiny DiT on the built-in dataset, CPU, 7.7-9.5 min
    python train_dit.py --corrupt 0.05 --cep uniform               # 5% flipped labels + CEP-U (paper §5)
    python train_dit.py --cond text --corrupt 0.05 --cep uniform   # captions: 5% swapped + CEP-U on the text encoder
    python train_dit.py --cond text --data /data/cc3m --tokenizer gpt2.tiktoken    # img2dataset folder, GPT-2 BPE
    torchrun --nproc_per_node 8 train_dit.py --preset dit-xl2-in1k --data /data/imagenet/train --corrupt 0.05
    python train_dit.py --out runs/dit --resume auto               # continue where the run in runs/dit stopped

The file reads top to bottom: the config (the shared config.TrainConfig plus the DiT's own fields, every one a flag),
the presets (the paper's recipes), how a config is checked, then main(): flags -> data -> model (dit.from_config: the
DiT with its condition encoder, models/encoders.py) -> trainer.train().
"""
import sys
from dataclasses import dataclass, replace

import torch

from plumbing.common import RunError, setup_distributed
from config import Family, TrainConfig, opt, parse_config, print_config, resolve_run_config
from models import controlnet, dit
from models.encoders import encoder_from_config
from scoring import judge
from sources.tokenizer import get_tokenizer
from trackers import tracking
from runio import resumed_config
from trainer import exit_codes, load_data, train
from weights import latents, pretrained, vae


# ----------------------------------------------------------------------------------------------------------------------
# Config: the shared training fields (config.TrainConfig) + the DiT's; every field is a command-line flag

@dataclass
class DiTConfig(TrainConfig):
    model: str = opt("DiT-T/2", "DiT size/patch: DiT-{T,S,B,L,XL}/{2,4,8}", arch=True)
    text_pooled: bool = opt(True, "also add the masked mean of the text context to adaLN's timestep embedding",
                            arch=True)
    t_freq_shift: float = opt(0.0, "timestep frequency shift: 0 = DiT, 1 = diffusers' DiT port (fine-tune its releases)",
                              arch=True)
    mlp_norm_eps: float = opt(1e-6, "eps of the LayerNorm before each MLP: 1e-6 = DiT, 1e-5 = diffusers' DiT port",
                              arch=True)
    pixel_channels: int = opt(-1, "width of the time-conditioned ResBlocks at the input's resolution (pixels or "
                              "latents) around the transformer (models/dit.py); 0 = the official DiT; -1 = auto: 32 "
                              "for the tiny DiT-T (its crosses need them and --token-conv), 0 for DiT-S to XL",
                              arch=True)
    token_conv: bool | None = opt(None, "a depthwise 3x3 conv over the token grid in every MLP (Mix-FFN; "
                                  "models/dit.py); off = the official DiT; default: on for DiT-T, off for DiT-S to XL",
                                  arch=True)
    mlp_ratio: float = opt(0.0, "width of each block's MLP as a multiple of the model width; 4 = the official DiT; "
                           "0 = auto: 2 for the tiny DiT-T (its crosses are as good and a CPU step 1.2x cheaper), "
                           "4 for DiT-S to XL", arch=True)
    control_blocks: int = opt(0, "--control: the DiT ControlNet's trainable copies of the first N blocks (PixArt-δ: "
                              "13 of 28; unlike PixArt-δ, a pixel hint encoder feeds block 0's input, "
                              "models/controlnet.py); 0 = half the depth", arch=True, control=True)
    optimizer: str = opt("muon", "adamw | muon: Muon on the transformer blocks' weight matrices, AdamW on the rest "
                         "(trainer.py; the CPU default: muon, its crosses gain +0.03 at the same steps; DiT: adamw)",
                         choices=["adamw", "muon"], experiment=True)
    lr: float = opt(4e-3, "learning rate of AdamW and Muon (constant; DiT uses 1e-4, the tiny CPU default learned fastest at 4e-3 "
                    "at batch 64; at 32, 3e-3 and 5.5e-3 score the same)")
    grad_clip: float = opt(1.0, "clip the gradient norm to this value; 0 = off (DiT uses none; the CPU "
                           "default was tuned with 1 at lr 4e-3)")
    steps: int = opt(3000, "training steps (the CPU default: about 8-10 min on 2 cores; docs/cpu-default.md)")
    batch_size: int = opt(32, "global batch size (split over processes; the CPU default: 32, twice the updates of 64 "
                          "for the same images and time, which its crosses need; DiT: 256)", experiment=True)
    lr_warmdown: int = opt(1000, "decay the learning rate linearly to 0 over the last N steps (the CPU default: 1000 "
                           "of 3000; DiT: 0 = constant)")
    min_snr: float = opt(5.0, "Min-SNR-gamma loss weighting (Hang et al. 2023; the CPU default: 5; DiT: 0 = off)",
                         experiment=True)
    t_focus: float = opt(0.5, "timestep focus: each timestep comes with this probability uniformly from the focus "
                         "band (--t-focus-min/max-log-snr), else from all steps (the CPU default: 0.5, where its "
                         "crosses form; DiT: 0 = uniform)", experiment=True)
    sample_every: int = opt(1000, "write an EMA sample grid every N steps; 0 = never (the CPU default: 1000; a DDPM-50 "
                            "grid makes twice the model calls of a DPM-Solver++-25 one, which took about 7 s)")
    sample_sampler: str = opt("ddpm", "sampler of the sample grids: dpm++ | ddim | ddpm (the CPU default: ddpm, 50 "
                              "steps, whose fresh noise at every step draws straighter crosses than DPM-Solver++)",
                              choices=["dpm++", "ddim", "ddpm"])
    sample_steps: int = opt(50, "sampling steps of the sample grids (the CPU default: 50 DDPM steps)")
    out: str = opt("runs/dit", "run folder: checkpoints, log.jsonl, samples/")


PRESETS = {
    # DiT-XL/2 on ImageNet-1K 256^2, the paper's recipe (Table 4 + official DiT train.py): 400K steps, 32/GPU x 8.
    "dit-xl2-in1k": dict(model="DiT-XL/2", image_size=256, num_classes=1000, vae="kl-f8", steps=400_000,
                         batch_size=256, lr=1e-4, weight_decay=0.0, grad_clip=0.0, ema_decay=0.9999, class_dropout=0.1,
                         learn_sigma=True, schedule="linear", log_every=100, ckpt_every=10_000, keep_every=50_000,
                         sample_every=10_000, sample_cfg=1.5, sample_steps=50, sample_per_class=4, lr_warmdown=0,
                         min_snr=0.0, t_focus=0.0, optimizer="adamw", sample_sampler="dpm++"),
    # A small ImageNet model for ablations on one GPU node (DiT README: B/4 FID-50K ~68 at 400K steps, cfg 1).
    "dit-b4-in1k": dict(model="DiT-B/4", image_size=256, num_classes=1000, vae="kl-f8", steps=400_000,
                        batch_size=256, lr=1e-4, weight_decay=0.0, grad_clip=0.0, ema_decay=0.9999, learn_sigma=True,
                        log_every=100, ckpt_every=10_000, keep_every=50_000, sample_every=10_000, sample_cfg=1.5,
                        sample_steps=50, sample_per_class=4, lr_warmdown=0, min_snr=0.0, t_focus=0.0, optimizer="adamw",
                        sample_sampler="dpm++"),
    # ControlNet-Canny over a pre-trained DiT (--init-from BASE --data IN-100/train): train_ldm's in100-controlnet
    # recipe (the paper's, Table 2 has LDMs only) with PixArt-δ's count of 13 copied blocks of DiT-XL/2's 28 (the branch
    # itself differs from PixArt-δ's: models/controlnet.py).
    "in100-controlnet": dict(control="canny", canny_low=100.0, canny_high=200.0, control_blocks=13, steps=79_000,
                             batch_size=16, lr=5e-6, weight_decay=1e-2, ema_decay=0.9999, class_dropout=0.1,
                             grad_clip=0.0, log_every=100, ckpt_every=5_000, keep_every=20_000, sample_every=5_000,
                             sample_cfg=1.75, sample_steps=50, sample_per_class=4, lr_warmdown=0, min_snr=0.0,
                             t_focus=0.0, optimizer="adamw", sample_sampler="dpm++"),
    # The CPU ControlNet on the built-in shapes (docs/controlnet.md): --init-from a run of the
    # CPU default (docs/controlnet.md's measured base: the plain DiT-T, --mlp-ratio 4 --pixel-channels 0 --no-token-conv); the
    # branch learns to draw the shape whose Canny edges it is given, in its class's colour.
    "builtin-controlnet": dict(control="canny", canny_low=100.0, canny_high=200.0, control_blocks=2, steps=300,
                               batch_size=32, lr=1e-3, grad_clip=1.0, ema_decay=0.99, log_every=25, ckpt_every=100,
                               sample_every=300, sample_cfg=2.0, sample_steps=25, lr_warmdown=0, min_snr=0.0,
                               t_focus=0.0, optimizer="adamw", sample_sampler="dpm++"),
}

# --init-from a release takes this preset's optimiser (lr, weight decay, clip, EMA, batch), not the CPU default's;
# a nanoCEP checkpoint keeps its own (weights/pretrained.py init_weights). Explicit flags win.
FINE_TUNE = "dit-xl2-in1k"


# ----------------------------------------------------------------------------------------------------------------------
# Config -> model and diffusion; main

def resolve(cfg: DiTConfig) -> DiTConfig:
    """The checked config with every 'auto' decided (a new config; bad values raise RunError)."""
    if cfg.model not in dit.DiT_models:
        raise RunError(f"unknown --model {cfg.model!r}; choose one of {', '.join(dit.DiT_models)}")
    cfg = resolve_run_config(cfg)
    side, patch = cfg.latent_shape[1], int(cfg.model.split("/")[1])
    if side % patch:
        raise RunError(f"{cfg.model} needs an input side divisible by {patch}, got {side}")
    if cfg.pixel_channels != -1 and (cfg.pixel_channels < 0 or cfg.pixel_channels % 8):
        raise RunError(f"--pixel-channels must be -1 (auto), 0 or a positive multiple of 8 (GroupNorm's 8 groups), "
                       f"got {cfg.pixel_channels}")
    width = dit.size_of(cfg.model)["hidden_size"]
    if not 0 <= cfg.mlp_ratio <= 64 or (cfg.mlp_ratio and int(width * cfg.mlp_ratio) < 1):
        raise RunError(f"--mlp-ratio must be 0 (auto) or in (0, 64] with {cfg.model}'s MLPs (width {width} x ratio) at "
                       f"least 1 wide, got {cfg.mlp_ratio:g}")
    cfg = replace(cfg, **dit.default_arch(cfg.model, cfg.pixel_channels, cfg.token_conv, cfg.mlp_ratio))
    return cfg


def build_model(cfg):
    """The DiT of a resolved config and its condition encoder, inside a ControlNet when --control asks for one."""
    return controlnet.from_config(cfg, dit.from_config(cfg, encoder_from_config))


FAMILY = Family(DiTConfig, PRESETS, resolve, build_model)   # how evaluate.py rebuilds its checkpoints


def configure(argv=None):
    """(the run's config, init): preset and flags applied, --init-from SOURCE's architecture taken, checked, 'auto'
    decided; init(model) loads SOURCE's weights (None without --init-from)."""
    cfg = parse_config(DiTConfig, argv, PRESETS, description=__doc__.split("\n\n")[0].strip(), printable=True)
    cfg, init = pretrained.init_from(cfg, "dit", argv, (FINE_TUNE, PRESETS[FINE_TUNE]), PRESETS)   # --init-from SOURCE
    cfg = resumed_config(cfg, argv, PRESETS)             # a checkpoint older than a recipe flag: as trained
    return resolve(cfg), init


@exit_codes("train_dit.py")
def main(argv=None) -> int:
    """Flags -> data (corrupted as asked) -> DiT + diffusion -> train. Bad input: one line, exit 2."""
    cfg, init = configure(argv)
    if print_config(cfg, argv, "train_dit.py"):    # --print-config: a recipe checked before any GPU hour
        return 0
    if cfg.cond == "text":
        get_tokenizer(cfg.tokenizer)                    # a missing / bad tokenizer fails now, not after data loading
    d = setup_distributed(cfg.device)
    sinks = tracking.sinks_for_run(cfg, d.main)          # --log: W&B / TensorBoard get every log record (rank 0)
    data = load_data(cfg, d, open_cache=latents.LatentDataset, load_vae=vae.load_vae)
    cfg = replace(cfg, num_classes=data.num_classes)    # 0 = the dataset's count
    torch.manual_seed(cfg.seed)                          # the same initial weights on every rank and every rerun
    model, diffusion = FAMILY.build(cfg)
    train(cfg, model, diffusion, data, kind="dit", d=d, init=init, judge_grid=judge.judge_final_grid, sinks=sinks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
