"""
vae.py: the two frozen autoencoders nanoCEP's diffusion models live in, written from scratch.

  kl-f8  Stable Diffusion's KL autoencoder (sd-vae-ft-ema / -mse): 256² image -> 32×32×4 latent, scale 0.18215.
         DiT trains on these latents.
  vq-f4  the CompVis LDM VQ autoencoder (8192 codes): 256² image -> 64×64×3 latent, scale 1.0. LDM-4 trains on the
         pre-quantisation latents and quantises only when decoding.

One encoder/decoder implementation serves both. Parameter names follow the diffusers layout, so a diffusers
`.safetensors`/`.bin` file loads with strict key matching. The original CompVis `.ckpt` layout and the older diffusers
attention names (query/key/value/proj_attn) are renamed on the way in. Nothing is unpickled beyond tensors and plain
containers (see read_state_dict).

Precision: whatever the caller's autocast, the nearest-code search, the quantiser, the KL posterior (head conv,
log-variance, std) and the whole decode run in fp32 (the decoder in the weights' dtype); only the encoder body
follows the caller's autocast, so on-the-fly encoding under bf16 training stays fast.

    from weights import vae
    ae = vae.load_vae("kl-f8", "sd-vae-ft-ema.safetensors")   # or no path: download into the Hugging Face cache
    z = ae.encode(x)              # x (B,3,256,256) in [-1,1] -> (B,4,32,32) scaled latents (a posterior sample)
    mean, std = ae.encode_moments(x)
    x_hat = ae.decode(z)          # -> (B,3,256,256) in about [-1,1]

Run:
    python -m weights.vae bench --kind kl-f8 --size 256 --batch 4        # encode img/s with random weights
    python -m weights.vae roundtrip photo.jpg --kind kl-f8 --vae-path FILE -o recon.png
"""

import os
import pickle
import re
import sys
import time
import types
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing import common
from sources.download import download as checked_download, hub_file, hub_location

# ---- configs ----


@dataclass(frozen=True)
class VAEConfig:
    kind: str                              # "kl-f8" or "vq-f4"
    block_out_channels: tuple = (128, 256, 512, 512)  # widths of the resolution levels; len-1 halvings
    layers_per_block: int = 2              # ResNet blocks per encoder level (the decoder uses one more)
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32
    num_codes: int = 0                     # VQ codebook size (0 for the KL head)
    scale_factor: float = 0.18215          # latents the diffusion model sees = encoder latents * scale_factor


PRESETS = {
    "kl-f8": VAEConfig("kl-f8", (128, 256, 512, 512), 2, 4, num_codes=0, scale_factor=0.18215),
    # LDM's cin256-v2 config has no scale_factor, so its diffusion model sees the raw latents (1.0).
    "vq-f4": VAEConfig("vq-f4", (128, 256, 512), 2, 3, num_codes=8192, scale_factor=1.0),
}
GN_EPS = 1e-6   # every GroupNorm in both autoencoders
LOGVAR_RANGE = (-30.0, 20.0)

# ---- building blocks ----


def group_norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=GN_EPS)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3, twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):  # (B, cin, H, W) -> (B, cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 in every released config
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all pixels, added back to the input (the mid-block attention)."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list so the key reads `to_out.0`

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)           # (B, HW, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)          # (B, HW, C) each, one head of width C
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one, then a stride-2 3x3 conv with no padding."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour repeat, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResNet -> attention -> ResNet at the lowest resolution."""

    def __init__(self, channels, groups):
        super().__init__()
        # attentions is registered first only so that state_dict() lists keys in the released files' order
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Level(nn.Module):
    """One resolution level: a stack of ResNet blocks, then an optional resampler (downsamplers/upsamplers)."""

    def __init__(self, cin, cout, depth, groups, resample=None, resampler_name=""):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(depth)])
        self.resampler_name = resampler_name if resample is not None else None
        if resample is not None:  # diffusers keeps it in a one-element list named downsamplers / upsamplers
            self.add_module(resampler_name, nn.ModuleList([resample(cout)]))

    def forward(self, x):
        for block in self.resnets:
            x = block(x)
        if self.resampler_name:
            x = getattr(self, self.resampler_name)[0](x)
        return x


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> encoder features (B, out, H/f, W/f), f = 2**(levels-1)."""

    def __init__(self, cfg: VAEConfig, out_channels):
        super().__init__()
        widths, g = cfg.block_out_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, w in enumerate(widths):
            last = i == len(widths) - 1
            cin = widths[max(i - 1, 0)]
            self.down_blocks.append(Level(cin, w, cfg.layers_per_block, g,
                                          None if last else Downsample, "downsamplers"))
        self.mid_block = MidBlock(widths[-1], g)
        self.conv_norm_out = group_norm(widths[-1], g)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)                                  # (B, w0, H, W)
        for level in self.down_blocks:
            h = level(h)                                     # (B, w_last, H/f, W/f) at the end
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, C, h, w) -> image (B, 3, h*f, w*f); levels run widest-first with one extra ResNet each."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, g = cfg.block_out_channels[::-1], cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.up_blocks = nn.ModuleList()
        for i, w in enumerate(widths):
            last = i == len(widths) - 1
            cin = widths[max(i - 1, 0)]
            self.up_blocks.append(Level(cin, w, cfg.layers_per_block + 1, g,
                                        None if last else Upsample, "upsamplers"))
        self.mid_block = MidBlock(widths[0], g)
        self.conv_norm_out = group_norm(widths[-1], g)
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))                  # (B, w_widest, h, w)
        for level in self.up_blocks:
            h = level(h)                                     # (B, w0, h*f, w*f) at the end
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 3, h*f, w*f)


class Codebook(nn.Module):
    """VQ codebook: snaps every latent vector to its nearest entry (Euclidean)."""

    def __init__(self, num_codes, dim):
        super().__init__()
        self.embedding = nn.Embedding(num_codes, dim)

    def indices(self, z):  # (B, C, H, W) -> (B, H, W) int64
        """Nearest-code indices, searched in fp32 whatever the caller's autocast (bf16 flips many of 8192 argmins)."""
        B, C, H, W = z.shape
        with fp32_only(z.device):
            flat = z.permute(0, 2, 3, 1).reshape(-1, C).float()   # (N, C)
            codes = self.embedding.weight.float()                 # (K, C)
            code_sq = (codes * codes).sum(1)                      # (K,)
            out = []
            # |z - e|² = |z|² - 2 z·e + |e|²; |z|² is the same for every code. Chunks keep the (N, K) table small.
            for chunk in flat.split(4096):
                out.append((code_sq - 2.0 * chunk @ codes.t()).argmin(1))
        return torch.cat(out).view(B, H, W)

    def forward(self, z):  # (B, C, H, W) -> nearest codebook vectors (the codebook's own values), same shape
        return self.embedding(self.indices(z)).permute(0, 3, 1, 2).to(z.dtype)


def fp32_only(device):
    """A context that switches autocast off on `device`, so the ops inside run in their inputs' dtype (we pass fp32)."""
    return torch.autocast(torch.device(device).type, enabled=False)


# ---- the autoencoder ----


class Autoencoder(nn.Module):
    """Encoder + head (KL posterior or VQ codebook) + decoder; encode/decode speak scaled latents."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.kind
        self.scale_factor = cfg.scale_factor
        self.latent_channels = cfg.latent_channels
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        L = cfg.latent_channels
        # Modules are registered in the order the released files list them (state_dict() then matches line by line).
        if cfg.num_codes:
            self.encoder = Encoder(cfg, L)
            self.quant_conv = nn.Conv2d(L, L, 1)
            self.quantize = Codebook(cfg.num_codes, L)
            self.post_quant_conv = nn.Conv2d(L, L, 1)
            self.decoder = Decoder(cfg)
        else:
            self.encoder = Encoder(cfg, 2 * L)            # mean and log-variance
            self.decoder = Decoder(cfg)
            self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1)
            self.post_quant_conv = nn.Conv2d(L, L, 1)

    @property
    def is_vq(self):
        return self.cfg.num_codes > 0

    def _check_images(self, x):
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected images (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self.downsample or x.shape[3] % self.downsample:
            raise ValueError(f"image size {tuple(x.shape[2:])} is not a multiple of {self.downsample}")

    def _features(self, x):  # images (B,3,H,W) -> raw head input (B, 2L or L, H/f, W/f), float32
        """The encoder body in the weights' dtype (or the caller's autocast), then the 1x1 head conv in fp32."""
        self._check_images(x)
        w = self.quant_conv.weight
        h = self.encoder(x.to(device=w.device, dtype=w.dtype))
        with fp32_only(w.device):  # the posterior's moments come from here: keep them out of bf16
            return F.conv2d(h.float(), w.float(), self.quant_conv.bias.float())

    def encode_moments(self, x):
        """Images in [-1,1] -> (mean, std) of the posterior in scaled latent units, float32 (VQ: std is 0).

        Precision: the posterior (head conv, exp of the clamped log-variance, scaling) runs in fp32 whatever the
        caller's autocast; only the encoder body follows the weights' dtype / the caller's autocast."""
        h = self._features(x)
        if self.is_vq:
            z = h * self.scale_factor
            return z, torch.zeros_like(z)
        with fp32_only(h.device):
            mean, logvar = h.chunk(2, dim=1)                   # (B, L, h, w) each
            std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
            return mean * self.scale_factor, std * self.scale_factor

    def encode(self, x, generator=None):
        """Images in [-1,1] -> scaled latents, float32: a posterior sample (KL) or the pre-quantisation latents (VQ)."""
        mean, std = self.encode_moments(x)
        if self.is_vq:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    def decode(self, z):
        """Scaled latents (B, L, h, w) -> images (B, 3, h*f, w*f) in about [-1,1], float32. VQ quantises first.

        Precision: decoding ignores the caller's autocast: the nearest-code search and the quantiser run in fp32 and
        the decoder in the weights' dtype (fp32 unless loaded as bf16), so a sampler's bf16 autocast cannot change the
        image (one decode per sample, so this costs little next to the diffusion steps)."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        w = self.post_quant_conv.weight
        with fp32_only(w.device):
            z = z.to(device=w.device, dtype=torch.float32) / self.scale_factor
            if self.is_vq:
                z = self.quantize(z)
            return self.decoder(self.post_quant_conv(z.to(w.dtype))).float()

    def forward(self, x):
        return self.decode(self.encode(x))


def build_vae(kind, **overrides):
    """A freshly initialised autoencoder of a preset kind; overrides change VAEConfig fields (tests use tiny widths)."""
    if kind not in PRESETS:
        raise ValueError(f"unknown VAE kind {kind!r}; choose one of {', '.join(PRESETS)} (or 'none')")
    bad = set(overrides) - set(VAEConfig.__dataclass_fields__) - {"kind"}
    if bad:
        raise ValueError(f"unknown VAE config field(s): {', '.join(sorted(bad))}")
    if "block_out_channels" in overrides:
        overrides["block_out_channels"] = tuple(overrides["block_out_channels"])
    cfg = replace(PRESETS[kind], **overrides)
    if any(w % cfg.norm_groups for w in cfg.block_out_channels):
        raise ValueError(f"block_out_channels {cfg.block_out_channels} must be multiples of norm_groups {cfg.norm_groups}")
    return Autoencoder(cfg)


# ---- reading weight files (no arbitrary unpickling) ----

# Globals a tensor checkpoint legitimately needs; the fallback unpickler builds only these.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
}


class _Opaque:
    """Inert stand-in for any other pickled object (Lightning callbacks, numpy scalars...): it only stores its data."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # dict subclasses are filled item by item
        pass

    def append(self, value):  # list subclasses too
        pass

    def extend(self, values):
        pass


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Resolves only _SAFE_GLOBALS and torch dtypes; every other global becomes an inert _Opaque subclass."""

    _stubs = {}

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = type(str(name), (_Opaque,), {"__module__": f"opaque.{module}"})
        return self._stubs[key]


# torch.load(pickle_module=...) wants a module-like object with Unpickler and load.
_tensors_only_pickle = types.ModuleType("nanocep_tensors_only_pickle")
_tensors_only_pickle.Unpickler = _TensorsOnlyUnpickler
_tensors_only_pickle.load = lambda f, **kw: _TensorsOnlyUnpickler(f, **kw).load()


def load_tensors_only(path):
    """torch.load with weights_only=True; a Lightning .ckpt that also pickles its callbacks goes through the
    tensors-only unpickler instead, which never imports or calls anything outside _SAFE_GLOBALS."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_tensors_only_pickle)


def read_state_dict(path):
    """A weights file -> {name: tensor} on CPU. Reads safetensors, torch zip/pickle files (.bin/.pt/.ckpt) and
    Lightning checkpoints (their `state_dict` entry). The format is sniffed from the bytes, not the suffix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ValueError(f"{path}: empty file")
    try:
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":   # torch's zip format, or its legacy raw pickle
            obj = load_tensors_only(path)
        elif len(head) >= 9 and head[8:9] == b"{":            # safetensors: u64 header length, then JSON
            from safetensors.torch import load_file
            obj = load_file(str(path), device="cpu")
        else:
            raise ValueError("neither a safetensors nor a torch file")
    except ValueError as e:
        raise ValueError(f"{path}: cannot read weights ({e})") from None
    except Exception as e:  # truncated or corrupt: safetensors/zip/pickle each raise their own error types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: cannot read weights, file truncated or corrupt ({type(e).__name__}: {msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]                                # Lightning checkpoint
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return dict(obj)


# ---- key layouts: CompVis .ckpt and legacy diffusers -> our (diffusers) names ----

_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0",   # CompVis
               "query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}            # diffusers < 0.14


def _rename(key, num_levels):
    """One CompVis or legacy-diffusers key -> its diffusers name (keys already in diffusers layout pass through)."""
    m = re.match(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return key                                         # quant_conv, post_quant_conv, quantize.embedding
    part, rest = m.groups()
    subs = [
        (r"^norm_out\.", lambda m: "conv_norm_out."),
        (r"^mid\.block_([12])\.", lambda m: f"mid_block.resnets.{int(m[1]) - 1}."),
        (r"^mid\.attn_1\.(norm|q|k|v|proj_out)\.", lambda m: f"mid_block.attentions.0.{_ATTN_NAMES[m[1]]}."),
        (r"^mid_block\.attentions\.0\.(query|key|value|proj_attn)\.",
         lambda m: f"mid_block.attentions.0.{_ATTN_NAMES[m[1]]}."),
        (r"^down\.(\d+)\.block\.(\d+)\.", lambda m: f"down_blocks.{m[1]}.resnets.{m[2]}."),
        (r"^down\.(\d+)\.downsample\.", lambda m: f"down_blocks.{m[1]}.downsamplers.0."),
        # CompVis numbers decoder levels from the highest resolution, diffusers from the lowest.
        (r"^up\.(\d+)\.block\.(\d+)\.", lambda m: f"up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}."),
        (r"^up\.(\d+)\.upsample\.", lambda m: f"up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0."),
        (r"\.nin_shortcut\.", lambda m: ".conv_shortcut."),
        (r"\.downsamplers\.0\.Conv2d_0\.", lambda m: ".downsamplers.0.conv."),   # an alias some diffusers expose
    ]
    for pattern, repl in subs:
        rest = re.sub(pattern, repl, rest)
    return f"{part}.{rest}"


def to_diffusers_layout(state_dict, num_levels):
    """Rename a CompVis / legacy / current diffusers state dict to our names; drop CompVis `loss.*` keys and keep
    only `first_stage_model.*` from a whole-LDM checkpoint. Attention 1x1-conv weights become Linear weights."""
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    out = {}
    for key, value in state_dict.items():
        if key.startswith("loss."):
            continue                                       # LPIPS + discriminator of the CompVis training loss
        new = _rename(key, num_levels)
        if re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", new) and value.ndim == 4:
            value = value[:, :, 0, 0]                      # (C, C, 1, 1) conv -> (C, C) linear
        if new in out:
            if out[new].shape == value.shape and torch.equal(out[new], value):
                continue                                   # the same tensor under an alias
            raise ValueError(f"two different tensors map to {new!r}")
        out[new] = value
    return out


def _summarise(names, n=4):
    names = sorted(names)
    more = f", ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_weights(model, path):
    """Load a weights file into `model` strictly; a ValueError lists missing / unexpected / misshapen keys."""
    sd = to_diffusers_layout(read_state_dict(path), len(model.cfg.block_out_channels))
    own = model.state_dict()
    missing, unexpected = own.keys() - sd.keys(), sd.keys() - own.keys()
    misshapen = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                 for k in own.keys() & sd.keys() if sd[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_summarise(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_summarise(unexpected)})")
        if misshapen:
            parts.append(f"{len(misshapen)} shape mismatches, file vs model ({_summarise(misshapen, 2)})")
        raise ValueError(f"{path}: not a {model.kind} autoencoder with this config: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
    return model


# ---- downloads ----


@dataclass(frozen=True)
class Weights:
    url: str
    filename: str                 # name inside the cache folder (a Hub file keeps the Hub cache's)
    sha256: str | None = None     # checked when known; no hash is published for these files
    member: str | None = None     # for a .zip: the file to extract from it


WEIGHTS = {
    # DiT trains with ft-EMA by default; ft-MSE has the same encoder (only the decoder was fine-tuned).
    "kl-f8": Weights("https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/"
                     "diffusion_pytorch_model.safetensors", "sd-vae-ft-ema.safetensors"),
    "kl-f8-mse": Weights("https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/"
                         "diffusion_pytorch_model.safetensors", "sd-vae-ft-mse.safetensors"),
    # The CompVis first stage (rFID 0.58); the zip holds model.ckpt, a Lightning checkpoint with loss.* extras.
    "vq-f4": Weights("https://ommer-lab.com/files/latent-diffusion/vq-f4.zip", "vq-f4.ckpt", member="model.ckpt"),
}


def hub_cache(cache_dir=None):
    """Where Hugging Face Hub files go: cache_dir/hub when a cache folder is given, else None, huggingface_hub's own
    cache (HF_HUB_CACHE, shared with diffusers), whatever $NANOCEP_CACHE says."""
    return None if cache_dir is None else Path(cache_dir) / "hub"


def download(url, dest, sha256=None, member=None):
    """Fetch `url` to `dest` atomically (sources/download.py: a sha256 mismatch raises ValueError and leaves nothing
    behind); `member` extracts one file (matched by base name) from a downloaded zip."""
    dest = Path(dest)
    try:
        got = checked_download(url, dest.with_name(dest.name + ".zip") if member else dest, sha256)
    except FileNotFoundError:
        raise ConnectionError(f"could not download {url} (not found); pass a local weights file instead") from None
    if member:
        try:
            with zipfile.ZipFile(got) as zf:
                names = [n for n in zf.namelist() if Path(n).name == member]
                if len(names) != 1:
                    raise ValueError(f"{url}: expected one {member!r} in the zip, found {len(names)}")
                with zf.open(names[0]) as src, common.atomic_open(dest, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
        finally:
            got.unlink(missing_ok=True)
    return dest


def fetch_weights(name, cache_dir=None, url=None):
    """Path to the cached weights `name` (a WEIGHTS key), downloading them first if needed (a huggingface.co URL
    through the Hub's cache, see hub_cache); `url` overrides the table's address (file:// works)."""
    if name not in WEIGHTS:
        raise ValueError(f"no known weights named {name!r}; choose one of {', '.join(WEIGHTS)} or pass a file")
    w = WEIGHTS[name]
    if (hub := hub_location(url or w.url)) is not None:      # the Hub's cache (sources/download.py hub_file)
        repo_id, revision, filename = hub
        return hub_file(repo_id, filename, revision, hub_cache(cache_dir), w.sha256)
    dest = common.cache_root(cache_dir) / "vae" / w.filename
    if not dest.is_file():  # files are renamed into place only after a complete, verified download
        download(url or w.url, dest, w.sha256, w.member)
    return dest


# ---- public loader ----


def architecture_from_config(config_path) -> dict:
    """build_vae overrides from a diffusers config.json beside a weights file ({} when there is none).

    Only the architecture is read (widths, depth, channels, codebook); the latent scale factor stays the preset's,
    because pipelines disagree on applying it (see shared notes on the paper's LDM releases)."""
    if not Path(config_path).is_file():
        return {}
    import json
    try:
        cfg = json.loads(Path(config_path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_path}: not a readable JSON config ({e})") from None
    names = {"block_out_channels": "block_out_channels", "layers_per_block": "layers_per_block",
             "latent_channels": "latent_channels", "in_channels": "in_channels", "out_channels": "out_channels",
             "norm_num_groups": "norm_groups", "num_vq_embeddings": "num_codes"}
    return {ours: (tuple(cfg[theirs]) if isinstance(cfg[theirs], list) else cfg[theirs])
            for theirs, ours in names.items() if theirs in cfg}


def infer_architecture(kind, path) -> dict:
    """VAEConfig overrides that make build_vae(kind) fit the weights in `path` (widths, depth, latent channels, codebook
    size), read off the tensor shapes; {} for the released sizes. The strict loader reports anything else."""
    sd = read_state_dict(path)
    level_ids = {int(m[1]) for k in sd if (m := re.match(r"(?:first_stage_model\.)?encoder\.down(?:_blocks)?\.(\d+)\.", k))}
    if not level_ids:
        return {}
    sd = to_diffusers_layout(sd, max(level_ids) + 1)
    preset = PRESETS[kind]
    has_codebook = "quantize.embedding.weight" in sd
    if has_codebook != bool(preset.num_codes):
        raise ValueError(f"{path}: a {'VQ' if has_codebook else 'KL'} autoencoder, not {kind} "
                         f"(pass --vae {'vq-f4' if has_codebook else 'kl-f8'})")
    try:
        cfg = {
            "block_out_channels": tuple(int(sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0])
                                        for i in range(max(level_ids) + 1)),
            "layers_per_block": len({m[1] for k in sd if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}),
            "latent_channels": int(sd["post_quant_conv.weight"].shape[0]),
            "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
            "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
        }
        if has_codebook:
            cfg["num_codes"] = int(sd["quantize.embedding.weight"].shape[0])
    except KeyError:
        return {}
    return {k: v for k, v in cfg.items() if getattr(preset, k) != v}


def weights_file(path) -> Path:
    """The weights file of `path`: itself, or the one inside a diffusers component folder (vae/, vqvae/)."""
    if not Path(path).is_dir():
        return Path(path)
    files = [f for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
             if (Path(path) / f).is_file()]
    if not files:
        raise FileNotFoundError(f"{path}: no diffusion_pytorch_model.safetensors/.bin in this folder")
    return Path(path) / files[0]


def load_vae(kind, path=None, *, device="cpu", dtype=torch.float32, cache_dir=None, weights=None, url=None,
             **overrides):
    """The frozen `kind` autoencoder ("kl-f8" | "vq-f4") in eval mode, weights from `path` (any supported layout);
    with no path the released weights `weights` (a WEIGHTS key, default = kind) are downloaded into the cache.
    kind "none" returns None (pixel-space training has no autoencoder). `path` may also be a diffusers component
    folder; a diffusers config.json beside the weights sets the architecture (so small custom autoencoders load too).
    `overrides` are passed to build_vae and win over that config."""
    if kind in (None, "none"):
        return None
    path = weights_file(path) if path is not None else None
    if kind not in PRESETS:
        raise ValueError(f"unknown VAE kind {kind!r}; choose one of {', '.join(PRESETS)} (or 'none')")
    if path is not None and not overrides:   # a custom-size autoencoder: its config.json, else its tensor shapes
        overrides = architecture_from_config(Path(path).parent / "config.json") or infer_architecture(kind, path)
    model = build_vae(kind, **overrides)
    if path is None:
        path = fetch_weights(weights or kind, cache_dir, url)
    load_weights(model, path)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ---- benchmark and CLI ----


def bench(kind="kl-f8", size=256, batch=4, steps=3, device="cpu", dtype=torch.float32, what="encode"):
    """Images per second of encode (or decode) for the full-size `kind` architecture with random weights."""
    model = build_vae(kind).to(device=device, dtype=dtype).eval().requires_grad_(False)
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    z = torch.randn(batch, model.latent_channels, size // model.downsample, size // model.downsample, device=device)
    run = (lambda: model.encode_moments(x)) if what == "encode" else (lambda: model.decode(z))

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        run()                                              # warm-up (allocator, cuDNN autotune)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        sync()
        return steps * batch / (time.perf_counter() - t0)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _load_image(path, size):
    """An image file -> (1, 3, size, size) in [-1,1]: centre square crop, then resize."""
    from PIL import Image, UnidentifiedImageError
    import numpy as np
    if not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        img = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return x[None]


def main(argv=None):
    p = common.ArgParser(prog="python -m weights.vae", description="nanoCEP autoencoders: benchmark or round-trip an image.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="encode (or decode) img/s with random weights")
    b.add_argument("--kind", default="kl-f8", choices=list(PRESETS))
    b.add_argument("--size", type=int, default=256)
    b.add_argument("--batch", type=int, default=4)
    b.add_argument("--steps", type=int, default=3)
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--dtype", default="fp32", choices=list(_DTYPES))
    b.add_argument("--what", default="encode", choices=["encode", "decode"])
    r = sub.add_parser("roundtrip", help="encode and decode one image, print PSNR, save the reconstruction")
    r.add_argument("image")
    r.add_argument("--kind", default="kl-f8", choices=list(PRESETS))
    r.add_argument("--vae-path", default=None, help="weights file (default: download the released weights)")
    r.add_argument("--size", type=int, default=256)
    r.add_argument("-o", "--out", required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "bench":
            if args.size <= 0 or args.batch <= 0 or args.steps <= 0:
                raise ValueError("--size, --batch and --steps must be positive")
            rate = bench(args.kind, args.size, args.batch, args.steps, args.device, _DTYPES[args.dtype], args.what)
            print(f"{args.kind} {args.what} {args.size}x{args.size} batch {args.batch} {args.dtype} on {args.device}: "
                  f"{rate:.2f} img/s")
        else:
            f = 2 ** (len(PRESETS[args.kind].block_out_channels) - 1)
            if args.size <= 0 or args.size % f:
                raise ValueError(f"--size must be a positive multiple of {f} for {args.kind}")
            x = _load_image(args.image, args.size)
            ae = load_vae(args.kind, args.vae_path)
            with torch.inference_mode():
                mean, _ = ae.encode_moments(x)
                y = ae.decode(mean).clamp(-1, 1)
            psnr = 10 * torch.log10(4.0 / F.mse_loss(y, x)).item()
            from PIL import Image
            img = ((y[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(img).save(args.out)
            print(f"{args.kind}: PSNR {psnr:.2f} dB, saved {args.out}")
    except (ValueError, OSError) as e:
        print(f"python -m weights.vae: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
