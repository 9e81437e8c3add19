"""
The DiT (Peebles & Xie, 2023): exactly the official architecture, initialisation and state-dict names, so
DiT-XL-2-256x256.pt loads with strict=True; and the two additions nanoCEP makes: a text-conditional variant, and
convolutions for tiny pixel-space models (off by default in the class; the CPU default of train_dit.py turns them on).

    from conditions import ClassEmbedder
    model = DiT_models["DiT-XL/2"](input_size=32, y_embedder=ClassEmbedder(1000, 1152))   # 256^2 KL-f8 latents
    eps_and_sigma = model(x, t, y)                     # x (B, 4, 32, 32), t (B,), y (B,) -> (B, 8, 32, 32)

The DiT receives its condition encoder c_θ (conditions.py, models/encoders.py) as the LDM does;
from_config(cfg, encoder_from_config) builds both from a train config (train_dit.DiTConfig).
A class table (the official DiT) is added to the timestep embedding. A text encoder (PixArt-α style) turns the caption
tokens into a context (B, L, D_text); every block gets a cross-attention layer after its self-attention, and adaLN-Zero
keeps the timestep (plus, with text_pooled, the masked mean of the context). The class path and its state-dict keys
are untouched: the text modules exist only with a text encoder.

Convolutions (pixel_channels > 0, token_conv): a 16 px DiT-T/2 on the built-in data draws discs but not plus signs
(docs/cpu-default.md). With a time-conditioned ResBlock at pixel resolution on each side of the
transformer (a one-level U-Net around it: the stem's features reach the head through a skip) and a depthwise 3x3
conv over the token grid in every MLP (SegFormer's Mix-FFN), its crosses get four crisp arms; either alone does not
help. Both add modules only when on, so the official model's keys, initialisation and random draws are unchanged.
The tiny DiT-T's MLPs are also 2x its width rather than DiT's 4x (default_arch): its crosses are as good and a step
costs 1.2x less on 2 CPU cores.

No CLI: train it with train_dit.py, load released weights with pretrained.py.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from conditions import ClassEmbedder
from diffusion import timestep_embedding


# ----------------------------------------------------------------------------------------------------------------------
# DiT building blocks

def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, with (B, D) shift/scale broadcast over the tokens of x (B, T, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features (256) -> MLP -> (B, D)."""

    def __init__(self, dim: int, freq_dim: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.freq_dim, self.freq_shift = freq_dim, freq_shift   # freq_shift=1 reproduces diffusers' DiT (pretrained.py)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim, freq_shift=self.freq_shift))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, T, D) with a p x p stride-p convolution; T = (H/p) * (W/p), row-major."""

    def __init__(self, patch: int, in_ch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's key names) and SDPA (flash on GPU)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # each (B, h, T, hd)
        out = F.scaled_dot_product_attention(q, k, v)                                             # (B, h, T, hd)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, `hidden` wide (DiT: 4x dim); with token_conv, fc1's output also gets a depthwise 3x3
    conv over the square token grid added (Mix-FFN, Xie et al. 2021), so each token mixes in its 8 neighbours."""

    def __init__(self, dim: int, hidden: int, token_conv: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.token_conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden) if token_conv else None

    def forward(self, x):                                           # x (B, T, D)
        h = self.fc1(x)                                             # (B, T, hidden)
        if self.token_conv is not None:
            B, T, C = h.shape
            g = math.isqrt(T)
            grid = h.transpose(1, 2).reshape(B, C, g, g)            # (B, hidden, g, g): tokens are row-major
            # grid is a channels-last view, and so is the gradient the conv gives its (hidden, 1, 3, 3) weight:
            # strides (9, 1, 3, 1) against the parameter's (9, 9, 3, 1), the same bytes (the middle dim has size 1),
            # yet DDP, whose gradient buckets follow the parameter's strides, warns on every rank that they differ.
            # Through squeeze/unsqueeze of that dim, autograd hands back the gradient with the parameter's strides,
            # whichever layout the conv kernel chose; the forward is unchanged (views, no copy).
            weight = self.token_conv.weight.squeeze(1).unsqueeze(1)
            h = h + F.conv2d(grid, weight, self.token_conv.bias, padding=1, groups=C).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(h, approximate="tanh"))


class PixelResBlock(nn.Module):
    """A residual block at pixel resolution, conditioned like a U-Net's: GroupNorm-SiLU-conv, GroupNorm scaled and
    shifted by c (FiLM), SiLU-conv. Starts as the identity (film and conv2 zeroed by DiT.initialize_weights)."""

    def __init__(self, ch: int, cond_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * ch)
        self.norm2, self.conv2 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, c):                                        # x (B, ch, H, W), c (B, D)
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(c))[:, :, None, None].chunk(2, dim=1)     # each (B, ch, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        return x + self.conv2(F.silu(h))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to the text context (keys/values); padding keys are masked out."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, mask):                     # x (B, T, D), context (B, L, Dc), mask (B, L) bool
        B, T, D = x.shape
        L, hd = context.shape[1], D // self.heads
        q = self.q(x).view(B, T, self.heads, hd).transpose(1, 2)                             # (B, h, T, hd)
        k, v = self.kv(context).view(B, L, 2, self.heads, hd).permute(2, 0, 3, 1, 4)        # each (B, h, L, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])   # (B, h, T, hd)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the condition c sets shift/scale/gate of both branches; gates start at 0.

    With context_dim (text), a cross-attention branch sits between self-attention and the MLP, as in PixArt-α: a plain
    residual on a LayerNorm'd input, not modulated by adaLN (the caption, not the timestep, decides what to read), with
    its output projection zero-initialised so the block still starts as the identity.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, context_dim: int = 0, token_conv: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        if context_dim:  # registered here, so the class model's keys (and their order) stay the official ones
            self.norm_cross = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.cross_attn = CrossAttention(dim, heads, context_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), token_conv)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, context=None, mask=None):             # x (B, T, D), c (B, D), context (B, L, Dc)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, mask)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from each token to its p x p x C_out patch."""

    def __init__(self, dim: int, patch: int, out_ch: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_ch)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table (T, dim), MAE/DiT layout: first dim/2 channels encode the column, the rest the row."""
    def one_axis(pos, d):                                           # pos (T,) -> (T, d): [sin | cos]
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        ang = pos[:, None] * omega[None]
        return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    return torch.cat([one_axis(cols.flatten(), dim // 2), one_axis(rows.flatten(), dim // 2)], dim=1).float()


# ----------------------------------------------------------------------------------------------------------------------
# The DiT

class DiT(nn.Module):
    """Diffusion transformer: patchify -> + pos -> N adaLN-Zero blocks conditioned on t and c(y) -> unpatchify.

    y_embedder is the condition encoder c_θ (conditions.py, models/encoders.py), built outside as for the LDM:
    a class table (kind "class"): y (B,) class ids, c(y) added to the timestep embedding (the official DiT); None
                  builds the official one, num_classes rows + a CFG null row (when class_dropout_prob > 0);
    a text encoder (kind "text"): y (B, L) caption token ids; c(y) = (context, mask), read by cross-attention in
                  every block, and (text_pooled) its masked mean through an MLP added to the timestep embedding.
    pixel_channels > 0 wraps the transformer in pixel-resolution ResBlocks of that width (in: conv, ResBlock, then the
    patch embedding; out: the final layer's pixels beside the stem's, a 1x1 conv, ResBlock, GroupNorm-SiLU-conv);
    token_conv puts Mix-FFN in every block. Both off = the official DiT.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, learn_sigma=True, y_embedder: nn.Module | None = None, num_classes=1000,
                 class_dropout_prob=0.1, text_pooled=True, pixel_channels=0, token_conv=False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by the patch size {patch_size}")
        self.in_channels, self.patch_size, self.num_heads = in_channels, patch_size, num_heads
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma, self.pixel_channels = learn_sigma, pixel_channels
        if pixel_channels:                                       # the stem: what the patch embedding reads
            self.pixel_in = nn.Conv2d(in_channels, pixel_channels, 3, padding=1)
            self.pixel_stem = PixelResBlock(pixel_channels, hidden_size)
        self.x_embedder = PatchEmbed(patch_size, pixel_channels or in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # the encoder lives under the model (key prefix y_embedder.): trained jointly, saved in the checkpoint
        self.y_embedder = y_embedder if y_embedder is not None else ClassEmbedder(num_classes, hidden_size,
                                                                                 class_dropout_prob)
        self.cond_kind = self.y_embedder.kind
        context_dim = 0
        if self.cond_kind == "text":
            context_dim = self.y_embedder.width
            self.pooled_embedder = (nn.Sequential(nn.Linear(context_dim, hidden_size), nn.SiLU(),
                                                  nn.Linear(hidden_size, hidden_size)) if text_pooled else None)
        elif self.cond_kind != "class":
            raise ValueError(f"unknown condition encoder kind {self.cond_kind!r} (expected 'class' or 'text')")
        self.grid = input_size // patch_size
        # A frozen Parameter (not a buffer) only so that the key exists as in the official checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim, token_conv)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, pixel_channels or self.out_channels)
        if pixel_channels:                                       # the head: tokens back to pixels, beside the stem's
            self.pixel_merge = nn.Conv2d(2 * pixel_channels, pixel_channels, 1)
            self.pixel_head = PixelResBlock(pixel_channels, hidden_size)
            self.pixel_out = nn.Sequential(nn.GroupNorm(8, pixel_channels), nn.SiLU(),
                                           nn.Conv2d(pixel_channels, self.out_channels, 3, padding=1))
        self.initialize_weights()

    @property
    def cond(self):
        """The condition encoder c_θ (the trainer uses it for CFG dropout, the samplers for the null condition)."""
        return self.y_embedder

    def initialize_weights(self):
        """The official DiT initialisation: xavier everywhere, N(0, 0.02) embeddings, and every adaLN output zeroed."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid)[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))          # the patch conv is a linear map of flattened patches
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.cond_kind == "class":
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        else:
            self.y_embedder.init_weights()                       # the text encoder's own init (the loop above xavier'd it)
            if self.pooled_embedder is not None:
                nn.init.normal_(self.pooled_embedder[0].weight, std=0.02)
                nn.init.normal_(self.pooled_embedder[2].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:                                  # adaLN-Zero: every residual branch starts closed
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
            if hasattr(blk, "cross_attn"):                       # and so does cross-attention
                nn.init.zeros_(blk.cross_attn.proj.weight)
                nn.init.zeros_(blk.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        if not self.pixel_channels:
            nn.init.zeros_(self.final_layer.linear.weight)       # so the initial output is exactly zero
            nn.init.zeros_(self.final_layer.linear.bias)
            return
        # With pixel blocks the convolutions keep PyTorch's default init, each ResBlock starts as the identity and the
        # last conv is zeroed instead (the output is exactly zero; the final layer keeps its xavier init so the head
        # reads the transformer from the first step on).
        for blk in (self.pixel_stem, self.pixel_head):
            for m in (blk.film, blk.conv2):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.pixel_out[-1].weight)
        nn.init.zeros_(self.pixel_out[-1].bias)

    def unpatchify(self, x):
        """(B, T, p*p*C) -> (B, C, H, W)."""
        p, c, g = self.patch_size, x.shape[-1] // self.patch_size ** 2, self.grid
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def embed(self, x, t, y, cep_mask=None, cep_unit=None):
        """x (B, C, H, W), t (B,), y -> what the first block reads: tokens (B, T, D), adaLN condition c (B, D), for
        text the context (B, L, D_text) and its mask (B, L) (None for classes), and the pixel stem's features
        (B, pixel_channels, H, W) that the head reads beside the tokens (None without pixel blocks)."""
        if x.shape[-1] != self.grid * self.patch_size or x.shape[-2] != x.shape[-1]:
            raise ValueError(f"DiT expects square {self.grid * self.patch_size}px inputs, got {tuple(x.shape[-2:])}")
        pixels = self.pixel_in(x) if self.pixel_channels else None    # (B, ch, H, W)
        context = mask = None
        if self.cond_kind == "class":
            c = self.t_embedder(t) + self.y_embedder(y, cep_mask, cep_unit)  # (B, D): CEP applied to the embedding
        else:
            context, mask = self.y_embedder(y, cep_mask, cep_unit)  # (B, L, D_text), (B, L): CEP already applied
            c = self.t_embedder(t)                               # (B, D)
            if self.pooled_embedder is not None:
                c = c + self.pooled_embedder(self.y_embedder.pooled(context, mask))
        if pixels is not None:
            pixels = self.pixel_stem(pixels, c)                     # (B, ch, H, W)
        x = self.x_embedder(x if pixels is None else pixels) + self.pos_embed    # (B, T, D)
        return x, c, context, mask, pixels

    def denoise(self, x, c, context=None, mask=None, pixels=None, residuals=()):
        """The blocks and the final layer on embed()'s output -> (B, C_out, H, W). residuals[i] (B, T, D) is added to
        block i's output (a ControlNet's, models/controlnet.py); none by default."""
        for i, blk in enumerate(self.blocks):
            x = blk(x, c, context, mask)
            if i < len(residuals):
                x = x + residuals[i]
        out = self.unpatchify(self.final_layer(x, c))           # (B, C_out, H, W), or (B, ch, H, W) for the head
        if not self.pixel_channels:
            return out
        h = self.pixel_head(self.pixel_merge(torch.cat([out, pixels], dim=1)), c)   # (B, ch, H, W)
        return self.pixel_out(h)                                 # (B, C_out, H, W)

    def forward(self, x, t, y, cep_mask=None, cep_unit=None):
        """x (B, C, H, W) noisy input, t (B,) timesteps, y (B,) class ids (null id = num_classes) or (B, L) caption
        token ids (null = the empty caption) -> (B, C_out, H, W). cep_mask / cep_unit go to the condition encoder
        (training only: CEP on a subset, pre-drawn CEP noise)."""
        return self.denoise(*self.embed(x, t, y, cep_mask, cep_unit))

SIZES = {"T": dict(depth=4, hidden_size=128, num_heads=4),       # tiny: the CPU default (not an official size)
         "S": dict(depth=12, hidden_size=384, num_heads=6),
         "B": dict(depth=12, hidden_size=768, num_heads=12),
         "L": dict(depth=24, hidden_size=1024, num_heads=16),
         "XL": dict(depth=28, hidden_size=1152, num_heads=16)}


def _factory(size, patch):
    def make(**kw):
        return DiT(patch_size=patch, **SIZES[size], **kw)
    make.__name__ = f"DiT_{size}_{patch}"
    return make


DiT_models = {f"DiT-{s}/{p}": _factory(s, p) for s in SIZES for p in (2, 4, 8)}


def size_of(name: str) -> dict:
    """The SIZES entry (depth, hidden_size, num_heads) of a DiT_models name, "DiT-{size}/{patch}"."""
    return SIZES[name[4:].split("/")[0]]


def default_arch(name: str, pixel_channels: int = -1, token_conv: bool | None = None, mlp_ratio: float = 0.0) -> dict:
    """The CPU additions of DiT `name` with the unset ones (-1, None, 0) decided: the tiny DiT-T gets the convolutions
    (it draws plus signs only with both) and 2x-wide MLPs (as good crosses, a cheaper step); the official sizes S to XL
    get neither (so they stay the official DiT)."""
    tiny = name.startswith("DiT-T/")
    return dict(pixel_channels=(32 if tiny else 0) if pixel_channels < 0 else pixel_channels,
                token_conv=tiny if token_conv is None else token_conv,
                mlp_ratio=(2.0 if tiny else 4.0) if not mlp_ratio else float(mlp_ratio))


def set_numerics(model: DiT, freq_shift: float = 0.0, mlp_norm_eps: float = 1e-6) -> DiT:
    """DiT's numerics (0, 1e-6) or diffusers' DiT port's (1, 1e-5): timestep frequency shift and MLP pre-norm eps.

    Neither changes a parameter, so both checkpoints load into the same module; they change its outputs slightly."""
    model.t_embedder.freq_shift = freq_shift
    for blk in model.blocks:
        blk.norm2.eps = mlp_norm_eps
    return model


def from_config(cfg, make_encoder) -> DiT:
    """The DiT a train config (train_dit.DiTConfig) describes, with the condition encoder make_encoder(cfg, width)
    builds (models.encoders.encoder_from_config); num_classes must be resolved (> 0 for class conditioning)."""
    channels, side, _ = cfg.latent_shape
    width = cfg.text_width if cfg.cond == "text" else size_of(cfg.model)["hidden_size"]
    model = DiT_models[cfg.model](input_size=side, in_channels=channels, learn_sigma=cfg.learn_sigma,
                                  y_embedder=make_encoder(cfg, width), text_pooled=cfg.text_pooled,
                                  **default_arch(cfg.model, cfg.pixel_channels, cfg.token_conv, cfg.mlp_ratio))
    return set_numerics(model, cfg.t_freq_shift, cfg.mlp_norm_eps)
