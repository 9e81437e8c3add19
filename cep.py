"""
CEP: condition embedding perturbation, one file you can copy (torch and the standard library only).

From "Slight Corruption in Pre-training Data Makes Better Diffusion Models" (Chen et al., NeurIPS 2024,
arXiv 2405.20494, Sec. 5, Eq. 8). Instead of corrupting the dataset, add fresh noise to the output of the
condition encoder c(y) at every training step, for every sample and every timestep:

    loss = E || eps - eps_theta(x_t, t, c(y) + delta) ||^2

    uniform  (CEP-U): delta ~ U(-gamma/sqrt(d), +gamma/sqrt(d)), i.i.d. per element   (std = gamma/sqrt(3d))
    gaussian (CEP-G): delta ~ N(0, (gamma/sqrt(d))^2), i.e. std gamma/sqrt(d)

gamma = 1 is the paper's default; with d = 512 the uniform noise stays within 1/sqrt(512) ~ 0.0442.
d is the width of the embedding, emb.shape[-1]; for a sequence of token embeddings (B, L, D) it is the per-token
width D, not L*D: every token vector gets noise of the same size a single class embedding would get.
The paper prints CEP-G as N(0, (gamma/sqrt(d)) I), which could mean variance gamma/sqrt(d); we read gamma/sqrt(d)
as the standard deviation. Reason: the works the paper says it follows (NEFTune and kin) multiply a unit noise
sample by the scale factor (NEFTune: U(-1, 1) times alpha/sqrt(L*d)); doing that with a standard normal sample
makes gamma/sqrt(d) the std, and keeps CEP-U and CEP-G on the same scale at equal gamma, as the paper compares
them. The noise is for training only: at inference the clean embedding is used.

Insert it right after your condition encoder:

    class LabelEncoder(nn.Module):
        def __init__(self, num_classes, dim, gamma=1.0):
            super().__init__()
            self.embed, self.cep = nn.Embedding(num_classes, dim), CEP("uniform", gamma)
        def forward(self, y):
            return self.cep(self.embed(y))  # (B, dim): perturbed in .train(), clean in .eval()

`mask` (a (B,) bool tensor) perturbs only the selected samples, e.g. a fixed subset for the paper's "fixed CEP"
ablation, or `y != null_label` to keep the classifier-free-guidance null embedding clean.
Its sampling-time counterpart, CADS (condition-annealed sampling), is cads.py beside this file.
Run the self-check:  python cep.py
"""

import math
import numbers

import torch
import torch.nn as nn

MODES = ("uniform", "gaussian", "none")


# ---- functional form ----

def _check(mode, gamma):
    if mode not in MODES:
        raise ValueError(f"CEP mode must be one of {MODES}, got {mode!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"CEP gamma must be a finite number >= 0, got {gamma!r}")


def noise_std(mode, gamma, d):
    """The per-element standard deviation of delta for an embedding of width d (0 for mode 'none')."""
    _check(mode, gamma)
    scale = gamma / math.sqrt(d)
    return {"uniform": scale / math.sqrt(3), "gaussian": scale, "none": 0.0}[mode]


def unit_noise(shape, mode="uniform", generator=None, device=None):
    """The unit draw delta is made from: U[0, 1) for uniform, N(0, 1) for gaussian, fp32, of `shape`.

    Draw it yourself (e.g. for a whole global batch from a per-step generator, then slice) and pass it to
    perturb(unit=...) when every process must see the same delta; perturb draws it itself otherwise."""
    if mode == "uniform":
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def perturb(emb, mode="uniform", gamma=1.0, mask=None, generator=None, unit=None):
    """Return emb + delta with fresh delta of scale gamma/sqrt(emb.shape[-1]); mask (leading dims) picks samples.

    unit (emb's shape): a pre-drawn unit_noise(emb.shape, mode) to use instead of drawing from `generator`."""
    _check(mode, gamma)
    if not emb.is_floating_point():
        raise ValueError(f"CEP needs a floating-point embedding, got dtype {emb.dtype}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"CEP mask must be a bool tensor, got dtype {mask.dtype}")
        if mask.dim() > emb.dim() - 1 or mask.shape != emb.shape[: mask.dim()]:
            raise ValueError(f"CEP mask of shape {tuple(mask.shape)} must match the leading dims of the "
                             f"embedding {tuple(emb.shape)}, e.g. (B,)")
    if mode == "none" or gamma == 0:
        return emb
    scale = gamma / math.sqrt(emb.shape[-1])
    # draw in fp32 (or fp64) so bf16/fp16 embeddings get the same distribution; the noise is a constant for
    # autograd, so gradients flow to emb unchanged
    noise_dtype = torch.float64 if emb.dtype == torch.float64 else torch.float32
    if unit is not None:
        if unit.shape != emb.shape:
            raise ValueError(f"CEP unit noise of shape {tuple(unit.shape)} must match the embedding {tuple(emb.shape)}")
        delta = unit.to(emb.device, noise_dtype)
    elif mode == "uniform":
        delta = torch.rand(emb.shape, generator=generator, device=emb.device, dtype=noise_dtype)
    else:
        delta = torch.randn(emb.shape, generator=generator, device=emb.device, dtype=noise_dtype)
    if mode == "uniform":
        delta = (2 * delta - 1) * scale  # (..., D) in [-scale, scale)
    else:
        delta = delta * scale
    delta = delta.to(emb.dtype)
    if mask is None:
        return emb + delta
    keep = mask.to(emb.device).reshape(mask.shape + (1,) * (emb.dim() - mask.dim()))  # (B, 1, ..., 1)
    return torch.where(keep, emb + delta, emb)


# ---- module ----

class CEP(nn.Module):
    """Adds fresh uniform/Gaussian noise of scale gamma/sqrt(d) to a condition embedding in training mode only."""

    def __init__(self, mode="uniform", gamma=1.0):
        super().__init__()
        _check(mode, gamma)
        self.mode, self.gamma = mode, float(gamma)

    def forward(self, emb, mask=None, unit=None):
        """emb (..., D) -> same shape; identity in eval mode or with mode='none'. unit: see perturb()."""
        if not self.training or self.mode == "none":
            return emb
        return perturb(emb, self.mode, self.gamma, mask, unit=unit)

    def extra_repr(self):
        return f"mode={self.mode!r}, gamma={self.gamma:g}"


# ---- self-check ----

if __name__ == "__main__":
    torch.manual_seed(0)
    d = 512
    for mode, want_std in (("uniform", 1 / math.sqrt(3 * d)), ("gaussian", 1 / math.sqrt(d))):
        delta = CEP(mode, 1.0).train()(torch.zeros(4096, d))  # (4096, 512)
        print(f"{mode:8s} gamma=1 d={d}: max|delta| {delta.abs().max():.4f} (uniform bound 1/sqrt(d) = "
              f"{1 / math.sqrt(d):.4f}), std {delta.std():.5f} (expected {want_std:.5f})")
