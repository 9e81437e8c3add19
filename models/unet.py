"""
The LDM-4 denoiser (Rombach et al. 2022): the CompVis `openaimodel.UNetModel` with spatial transformers (same modules,
initialisation and state-dict names, so the `cin256-v2` U-Net weights load with strict=True), and the LDM wrapper that
holds the U-Net and its condition encoder.

    unet = build_unet("ldm4-cin256", in_channels=3)                    # 400,920,579 parameters, context width 512
    model = LDM(unet, ClassEmbedder(1000, unet.context_dim))           # model(x, t, y) -> (B, 3, 64, 64)

Conditioning goes through cross-attention only: the condition encoder (`model.cond`, conditions.py) maps y to a
context (B, L, D) that every SpatialTransformer attends to. A class label is one token (L = 1); a caption encoder
returns (tokens (B, L, D), padding mask (B, L)) and drops in unchanged.

No CLI: train it with train_ldm.py, load released weights with pretrained.py.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import timestep_embedding


# ----------------------------------------------------------------------------------------------------------------------
# U-Net building blocks (CompVis openaimodel.py / attention.py; module names are the state-dict names)

class GroupNorm32(nn.GroupNorm):
    """GroupNorm that computes in float32 whatever the input dtype (bf16 statistics are too coarse)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def norm(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The U-Net's normalisation: 32 groups."""
    return GroupNorm32(32, channels, eps=eps)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module`: a residual branch that ends in it starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, + time embedding (per channel), GN-SiLU-dropout-zero conv, + skip (1x1 conv on width change)."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):                                          # x (B, C, H, W), emb (B, E)
        h = self.in_layers(x)                                           # (B, C', H, W)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (padding 1): H, W -> H/2, W/2."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention of x over a context (itself when context is None); q/k/v without bias, as CompVis."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))     # a Sequential only for the key name to_out.0

    def forward(self, x, context=None, mask=None):                      # x (B, T, D), context (B, L, Dc), mask (B, L)
        context = x if context is None else context
        B, T, _ = x.shape
        def split(z):                                                   # (B, N, h*dh) -> (B, h, N, dh)
            return z.view(B, z.shape[1], self.heads, -1).transpose(1, 2)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        attn_mask = None if mask is None else mask[:, None, None, :]    # True = attend; padding keys are skipped
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)   # (B, h, T, dh); scale 1/sqrt(dh)
        return self.to_out(out.transpose(1, 2).reshape(B, T, -1))


class GEGLU(nn.Module):
    """Linear to 2x width, then value * GELU(gate) (Shazeer 2020); the value half comes first."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU (4x) -> dropout -> linear: `net.0.proj`, `net.2` in the state dict."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN: self-attention, cross-attention on the context, GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        # registration order = the CompVis state-dict order: attn1, ff, attn2, norm1..3
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context, mask=None):                           # x (B, T, D), context (B, L, Dc)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GN -> 1x1 conv in -> pixels as tokens -> transformer blocks -> zero-init 1x1 conv out -> + input."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = norm(channels, eps=1e-6)                           # CompVis uses eps 1e-6 here, 1e-5 elsewhere
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)])
        self.proj_out = zero_init(nn.Conv2d(inner, channels, 1))

    def forward(self, x, context, mask=None):                           # x (B, C, H, W)
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)                                # (B, H*W, inner), row-major pixels
        for blk in self.transformer_blocks:
            h = blk(h, context, mask)
        h = h.transpose(1, 2).reshape(B, -1, H, W)
        return x + self.proj_out(h)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the time embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x, emb, context, mask=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------------------------------
# The U-Net

class UNetModel(nn.Module):
    """CompVis UNetModel with spatial transformers: input_blocks -> middle_block -> output_blocks (+ skips) -> out.

    attention_resolutions are *downsample factors* (1 = full resolution), as in the CompVis configs. Heads: num_heads
    fixed (num_head_channels = -1), or heads = width / num_head_channels; each head is width / heads wide (legacy).
    """

    def __init__(self, in_channels=3, model_channels=192, out_channels=3, num_res_blocks=2,
                 attention_resolutions=(8, 4, 2), channel_mult=(1, 2, 3, 5), num_heads=1, num_head_channels=-1,
                 transformer_depth=1, context_dim=512, dropout=0.0):
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        if any(w % 32 for w in widths):
            raise ValueError(f"every level width model_channels x channel_mult = {widths} must be a multiple of 32 "
                             f"(GroupNorm with 32 groups)")
        self.in_channels, self.out_channels, self.model_channels = in_channels, out_channels, model_channels
        self.context_dim = context_dim
        self.levels = len(channel_mult)
        emb_dim = 4 * model_channels

        def attention(ch):
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            if heads < 1 or ch % heads:
                raise ValueError(f"attention width {ch} is not divisible into {heads} heads")
            return SpatialTransformer(ch, heads, ch // heads, transformer_depth, context_dim)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        # -- down: a stem conv, then per level num_res_blocks x [ResBlock (+ attention)] and a Downsample (not last)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_widths, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * model_channels, dropout)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_widths.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_widths.append(ch)
                ds *= 2

        # -- middle: ResBlock, attention (always), ResBlock
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_dim, ch, dropout), attention(ch),
                                                    ResBlock(ch, emb_dim, ch, dropout))

        # -- up: per level (deepest first) num_res_blocks + 1 x [ResBlock on concat(h, skip) (+ attention)],
        #    with an Upsample after the level's last block (not on the full-resolution level)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_widths.pop(), emb_dim, mult * model_channels, dropout)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def check_input(self, x: torch.Tensor) -> None:
        """Square (B, in_channels, S, S) inputs with S divisible by 2^(levels - 1), or a clear ValueError."""
        f = 2 ** (self.levels - 1)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"U-Net expects (B, {self.in_channels}, S, S) inputs, got {tuple(x.shape)}")
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"U-Net expects square inputs, got {x.shape[-2]}x{x.shape[-1]}")
        if x.shape[-1] % f:
            raise ValueError(f"U-Net input side {x.shape[-1]} is not divisible by 2^(levels-1) = {f} "
                             f"({self.levels} levels halve it {self.levels - 1} times)")

    def forward(self, x, timesteps, context, context_mask=None, residuals=None):
        """x (B, C, S, S) noisy input, timesteps (B,), context (B, L, context_dim), context_mask (B, L) bool or None
        (False = a padding token no query may attend to) -> (B, C_out, S, S). residuals: a ControlNet's (one tensor
        per input block, added to its skip connection; one added to the middle block's output), controlnet.py."""
        self.check_input(x)
        if context.ndim != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(f"context must be (B, L, {self.context_dim}), got {tuple(context.shape)}")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))   # (B, 4*mc)
        h, skips = x, []
        for i, blk in enumerate(self.input_blocks):
            h = blk(h, emb, context, context_mask)
            skips.append(h if residuals is None else h + residuals[0][i])   # the control reaches the skips only
        h = self.middle_block(h, emb, context, context_mask)
        if residuals is not None:
            h = h + residuals[1]
        for blk in self.output_blocks:
            h = blk(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)


# U-Net sizes (the UNetModel arguments that differ from its defaults, which are the cin256-v2 ones).
UNET_CONFIGS = {
    "unet-tiny": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                      num_heads=4, context_dim=64),                         # 1.0M, the CPU default (not CompVis)
    "unet-small": dict(model_channels=64, channel_mult=(1, 2, 3), num_res_blocks=2, attention_resolutions=(4, 2),
                       num_heads=4, context_dim=256),                       # 16.5M, for ablations (not CompVis)
    "ldm4-cin256": dict(model_channels=192, channel_mult=(1, 2, 3, 5), num_res_blocks=2,
                        attention_resolutions=(8, 4, 2), num_heads=1, context_dim=512),   # CompVis cin256-v2, 400.9M
}


# ----------------------------------------------------------------------------------------------------------------------
# The LDM: condition encoder + U-Net

class LDM(nn.Module):
    """model(x, t, y): the condition encoder maps y to a context (B, L, D) and the U-Net denoises x attending to it.

    State-dict names: `diffusion_model.*` are the CompVis U-Net's own keys (CompVis stores them under
    `model.diffusion_model.*`); the class table is `cond_stage_model.embedding_table.weight` (CompVis:
    `cond_stage_model.embedding.weight`, 1001 x 512 for cin256-v2, whose row 1000 is our null class).
    CompVis initialises that table N(0, 1) (nn.Embedding's default), and so do we.
    """

    def __init__(self, unet: UNetModel, cond_encoder: nn.Module):
        super().__init__()
        self.diffusion_model = unet
        self.cond_stage_model = cond_encoder

    @property
    def cond(self):
        """The condition encoder c_θ (the trainer uses it for CFG dropout, the samplers for the null condition)."""
        return self.cond_stage_model

    def context(self, y, cep_mask=None, cep_unit=None):
        """y -> (context (B, L, D), key mask (B, L) or None); CEP is applied inside the encoder while training."""
        c = self.cond_stage_model(y, cep_mask, cep_unit)
        if isinstance(c, tuple):                                        # a text encoder: (tokens, padding mask)
            return c
        return c[:, None], None                                         # a class embedding (B, D) is one token

    def forward(self, x, t, y, cep_mask=None, cep_unit=None):
        """x (B, C, S, S) noisy input, t (B,) timesteps, y (B, ...) conditions -> (B, C_out, S, S).
        cep_mask / cep_unit go to the condition encoder (training only: CEP on a subset, pre-drawn CEP noise)."""
        context, mask = self.context(y, cep_mask, cep_unit)
        return self.diffusion_model(x, t, context, mask)


def build_unet(name: str, in_channels: int = 3, learn_sigma: bool = False, **overrides) -> UNetModel:
    """The named U-Net of UNET_CONFIGS; learn_sigma doubles the output channels."""
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown U-Net {name!r}; choose one of {', '.join(UNET_CONFIGS)}")
    args = {**UNET_CONFIGS[name], **overrides}
    return UNetModel(in_channels=in_channels, out_channels=in_channels * (2 if learn_sigma else 1), **args)


def from_config(cfg, make_encoder) -> LDM:
    """The LDM a train config (train_ldm.LDMConfig) describes: its U-Net and the condition encoder
    make_encoder(cfg, width) builds (models.encoders.encoder_from_config); num_classes must be resolved."""
    width = {"context_dim": cfg.text_width} if cfg.cond == "text" and cfg.text_width else {}
    unet = build_unet(cfg.model, in_channels=cfg.latent_shape[0], learn_sigma=cfg.learn_sigma, **width)
    return LDM(unet, make_encoder(cfg, unet.context_dim))
