"""
ControlNet (Zhang et al. 2023) for both model families: a frozen pre-trained base (clean, corrupted or CEP) and a
trainable control branch that steers it with a spatial map (Canny edges, a segmentation colour map), as in the
paper's downstream experiment (§4.4, Table 2).

    base = dit.from_config(cfg, encoder_from_config)         # weights loaded (--init-from BASE)
    model = ControlledDiT(base, blocks=4, hint_down=8 * 2)   # or ControlledLDM(ldm, hint_down=4)
    model.init_control_from_base()                           # the branch starts as a copy of the loaded base
    eps = model(x, t, y, control=maps)                       # maps (B, 3, H_img, W_img) in [0, 1]

U-Net (the CompVis / lllyasviel layout): a trainable copy of the time embedding, the input blocks and the middle
block; a small hint encoder takes the control image down to the latent resolution and is added after the copy's first
block; each copied block's output goes through a zero-initialised 1x1 convolution into the base's skip connection of
the same block, and the copied middle block's into the base's middle block output.
DiT (after PixArt-δ's ControlNet-Transformer, Chen et al. 2024, but not the same network): trainable copies of the
first N blocks read the base's tokens plus the embedded control image; copy i's output goes through a zero-initialised
linear layer and is added to the base's block i output, i.e. where base block i + 1 starts, as in PixArt-δ (its
after_proj; N = 13 of 28 there). It differs from PixArt-δ in two ways (its checkpoints and numbers are not ours):
- the control input: PixArt-δ VAE-encodes the control image and embeds that latent with the base's frozen patch
  embedder (plus the positional embedding), then a zero-initialised linear (before_proj); here ControlNet's trainable
  conv hint encoder (HintEncoder, last conv zero-initialised) takes the control *pixels* straight to the token grid: no
  VAE pass, no patch embedder, no positional embedding of its own.
- what the first copy reads: PixArt-δ runs base block 0 first and feeds its *output* (plus the embedded control) to the
  copy of block 0, so each copy runs one block deeper than the block it copies; here the copy of block 0 reads block
  0's *input* (the embedded noisy input plus the hint), as the U-Net ControlNet's copies read their blocks' inputs.

Every path from the control image into the base ends in a zero-initialised layer, so at step 0 the controlled model is
the base bit for bit; the base's parameters are frozen (requires_grad False) and the optimizer only sees the branch.
The base keeps its own state-dict names under `base.` (a release or nanoCEP checkpoint loads into it unchanged), the
branch lives under `control.`.

No CLI: train_dit.py / train_ldm.py --init-from BASE --control canny train it, evaluate.py --control samples it.
"""
import copy
import math

import torch
import torch.nn as nn

from config import LATENT_GEOMETRY
from diffusion import timestep_embedding
from models.dit import DiT
from models.unet import LDM, zero_init


class HintEncoder(nn.Module):
    """Control image (B, 3, H, W) -> features (B, out, H / down, W / down): 3x3 convs with SiLU, one stride-2 stage
    per halving (widths 16, 32, 96, 256 as ControlNet's), ending in a zero-initialised conv."""

    def __init__(self, out_channels: int, down: int, in_channels: int = 3, widths=(16, 32, 96, 256)):
        super().__init__()
        stages = round(math.log2(down))
        if 2 ** stages != down:
            raise ValueError(f"the hint encoder halves the control image: its downsampling {down} must be a power of 2")
        layers, ch = [nn.Conv2d(in_channels, widths[0], 3, padding=1), nn.SiLU()], widths[0]
        for i in range(stages):
            nxt = widths[min(i + 1, len(widths) - 1)]
            layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, nxt, 3, padding=1, stride=2), nn.SiLU()]
            ch = nxt
        layers.append(zero_init(nn.Conv2d(ch, out_channels, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, control):
        return self.net(control)


def _copy_into(dst: nn.Module, src: nn.Module) -> None:
    """dst's parameters and buffers <- src's (same layout), keeping dst's requires_grad."""
    dst.load_state_dict(src.state_dict())


# ----------------------------------------------------------------------------------------------------------------------
# DiT: trainable copies of the first N blocks, zero linear layers into the base blocks (after PixArt-δ; see above)

class DiTControl(nn.Module):
    """The control branch of a DiT: a pixel hint encoder to the token grid (PixArt-δ: the VAE latent through the frozen
    patch embedder), N block copies from block 0's input (PixArt-δ: from its output), N zero-initialised linears."""

    def __init__(self, base: DiT, blocks: int, hint_down: int):
        super().__init__()
        if not 1 <= blocks <= len(base.blocks):
            raise ValueError(f"--control-blocks {blocks}: the DiT has {len(base.blocks)} blocks")
        width = base.pos_embed.shape[-1]
        self.hint = HintEncoder(width, hint_down * base.patch_size)
        self.blocks = copy.deepcopy(base.blocks[:blocks])            # (their numerics too: norm eps, cross-attn)
        self.zero_linears = nn.ModuleList([zero_init(nn.Linear(width, width)) for _ in range(blocks)])
        self.requires_grad_(True)

    def forward(self, tokens, c, context, mask, control):
        """tokens (B, T, D) the base's embedded input, c (B, D), control (B, 3, H, W) -> N residuals (B, T, D)."""
        h = tokens + self.hint(control).flatten(2).transpose(1, 2)    # (B, T, D): row-major, as the patch embedding
        out = []
        for blk, zero in zip(self.blocks, self.zero_linears):
            h = blk(h, c, context, mask)
            out.append(zero(h))
        return out


class ControlledDiT(nn.Module):
    """A frozen DiT (`base`) steered by a DiTControl (`control`); model(x, t, y, control=maps)."""

    def __init__(self, base: DiT, blocks: int, hint_down: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.control = DiTControl(base, blocks, hint_down)
        self.init_control_from_base()

    @property
    def cond(self):
        return self.base.cond

    def init_control_from_base(self) -> None:
        """ControlNet's initialisation: each copied block <- the base's block (call again after loading the base)."""
        for mine, theirs in zip(self.control.blocks, self.base.blocks):
            _copy_into(mine, theirs)

    def forward(self, x, t, y, cep_mask=None, cep_unit=None, control=None):
        """The base's forward with the branch's residuals added; control (B or a divisor of B, 3, H_img, W_img) in
        [0, 1], None = the base alone."""
        tokens, c, context, mask, pixels = self.base.embed(x, t, y, cep_mask, cep_unit)
        if control is None:
            return self.base.denoise(tokens, c, context, mask, pixels)
        residuals = self.control(tokens, c, context, mask, tile(control, x.shape[0]).to(tokens.dtype))
        return self.base.denoise(tokens, c, context, mask, pixels, residuals)


# ----------------------------------------------------------------------------------------------------------------------
# U-Net: a trainable copy of the encoder half, zero 1x1 convolutions into the skips (CompVis / lllyasviel ControlNet)

def _out_width(block: nn.Module) -> int:
    """Output channels of a U-Net block: its last registered conv's (stem, ResBlock skip, proj_out, downsampler)."""
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


class UNetControl(nn.Module):
    """The control branch of a U-Net: copies of time_embed, input_blocks and middle_block, the hint encoder, and one
    zero 1x1 conv per input block (zero_convs) and for the middle block (middle_block_out), as ControlNet names them."""

    def __init__(self, unet, hint_down: int):
        super().__init__()
        self.model_channels = unet.model_channels
        self.time_embed = copy.deepcopy(unet.time_embed)
        self.input_blocks = copy.deepcopy(unet.input_blocks)
        self.middle_block = copy.deepcopy(unet.middle_block)
        self.input_hint_block = HintEncoder(unet.model_channels, hint_down)
        self.zero_convs = nn.ModuleList([zero_init(nn.Conv2d(_out_width(b), _out_width(b), 1))
                                         for b in self.input_blocks])
        mid = _out_width(self.middle_block)
        self.middle_block_out = zero_init(nn.Conv2d(mid, mid, 1))
        self.requires_grad_(True)

    def forward(self, x, t, context, mask, control):
        """x (B, C, S, S), t (B,), context (B, L, D), control (B, 3, H, W) -> (per-input-block residuals, middle's)."""
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        hint = self.input_hint_block(control.to(x.dtype))              # (B, model_channels, S, S)
        h, outs = x, []
        for i, (blk, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = blk(h, emb, context, mask)
            if i == 0:
                h = h + hint                                           # the control enters after the stem conv
            outs.append(zero(h))
        return outs, self.middle_block_out(self.middle_block(h, emb, context, mask))


class ControlledLDM(nn.Module):
    """A frozen LDM (`base`: U-Net + condition encoder) steered by a UNetControl (`control`)."""

    def __init__(self, base: LDM, hint_down: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.control = UNetControl(base.diffusion_model, hint_down)

    @property
    def cond(self):
        return self.base.cond

    def init_control_from_base(self) -> None:
        """ControlNet's initialisation: the copied encoder half <- the base's (call again after loading the base)."""
        unet = self.base.diffusion_model
        for name in ("time_embed", "input_blocks", "middle_block"):
            _copy_into(getattr(self.control, name), getattr(unet, name))

    def forward(self, x, t, y, cep_mask=None, cep_unit=None, control=None):
        """The base's forward with the branch's residuals in its skips; control=None is the base alone."""
        context, mask = self.base.context(y, cep_mask, cep_unit)
        unet = self.base.diffusion_model
        residuals = None if control is None else self.control(x, t, context, mask, tile(control, x.shape[0]))
        return unet(x, t, context, mask, residuals)


# ----------------------------------------------------------------------------------------------------------------------
# From a train config

def tile(control: torch.Tensor, batch: int) -> torch.Tensor:
    """Control maps (B', 3, H, W) repeated to `batch` rows: CFG's doubled batch [cond; uncond] sees the same maps in
    both halves, as ControlNet samples."""
    if batch % control.shape[0]:
        raise ValueError(f"{control.shape[0]} control maps for a batch of {batch}")
    return control.repeat(batch // control.shape[0], 1, 1, 1)


def from_config(cfg, base: nn.Module) -> nn.Module:
    """`base` wrapped in the ControlNet cfg.control asks for (its hint encoder down to the latent grid), or `base`
    itself when cfg.control is "none"."""
    if cfg.control == "none":
        return base
    down = LATENT_GEOMETRY[cfg.vae][1]                                # control images are pixels, the model's input latents
    if isinstance(base, DiT):
        return ControlledDiT(base, cfg.control_blocks or len(base.blocks) // 2, down)
    return ControlledLDM(base, down)

