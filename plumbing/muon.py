"""
Muon (Jordan et al. 2024) on the transformer blocks' weight matrices, AdamW on every other parameter: the optimizer
`--optimizer muon` builds (trainer.make_optimizer). The CPU default of train_dit.py uses it; DiT and LDM use AdamW.

Muon keeps a momentum of each matrix's gradient and replaces the update by the nearest semi-orthogonal matrix (all
singular values ≈ 1, the same singular vectors), so every direction of a matrix learns at the same rate whatever its
gradient's scale. The orthogonalisation is five steps of a quintic Newton-Schulz iteration (Jordan's coefficients,
which bring the singular values into ≈ [0.7, 1.2] rather than exactly to 1).

Precision: the iteration runs in float32. torch.optim.Muon runs it in bfloat16; its rounding, amplified by the
orthogonalisation wherever a gradient is nearly rank-deficient, made 2 processes and 1 process differ by 8 % of a
step's update after 3 steps (float32: 0.03 %), so "1 process = N processes" would not hold.

    opt = MuonAdamW(model, 4e-3, adamw=functools.partial(torch.optim.AdamW, lr=4e-3))   # one lr: Muon's step is
                                                                   # scaled to AdamW's update RMS (below)
"""
import math
from typing import Callable

import torch
import torch.nn as nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)   # the quintic's a, b, c (Jordan et al.; also torch.optim.Muon's)
GRAM_RESTART = 3                              # ns_gram forms the Gram matrix anew from x every this many steps


def muon_matrices(model: nn.Module) -> list[str]:
    """Names of the parameters Muon trains: the trainable 2-D weights inside transformer blocks (`blocks.N.`: the
    DiT's attention qkv/proj, MLP fc1/fc2 and adaLN modulation; with --cond text also the text encoder's blocks, and a
    ControlNet's trainable copies). Embeddings, convolutions, the final layer, biases and norms are not hidden
    matrices and stay with AdamW, as in Muon's own recipe."""
    return [n for n, p in model.named_parameters()
            if p.requires_grad and p.ndim == 2 and (n.startswith("blocks.") or ".blocks." in n)]


@torch.no_grad()
def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """(..., A, B) -> the (..., A, B) matrices with g's singular vectors and singular values ≈ 1, in float32 (Muon.step
    switches off the trainer's TF32 matmuls, 10-bit mantissas, around it on a GPU); leading dimensions are a batch of
    matrices, each orthogonalised on its own. The same iteration in either of two forms, whichever costs fewer
    multiply-adds (ns_costs): the direct one for near-square matrices, the Gram one (ns_gram) for those over 1.5 times
    longer than wide (a DiT block's qkv, MLP and adaLN matrices, 2 to 6 times)."""
    x = g.float().reshape(-1, *g.shape[-2:])             # (k, A, B)
    tall = x.shape[1] > x.shape[2]
    if tall:                                             # iterate on the wide side: the Gram matrix is the small one
        x = x.mT
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=1e-7)     # Frobenius norm >= spectral norm: singular values <= 1
    direct_cost, gram_cost = ns_costs(*x.shape[1:], steps)       # (k, m, n), m <= n
    x = ns_gram(x, steps) if gram_cost < direct_cost else ns_direct(x, steps)
    return (x.mT if tall else x).reshape(g.shape)


def ns_direct(x: torch.Tensor, steps: int) -> torch.Tensor:
    """(k, m, n) -> (k, m, n), m <= n: `steps` quintic steps x <- p(x xᵀ) x, p(G) = a + b G + c G² (each 2 products
    of (m, m) by (m, n))."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT                                  # (k, m, m)
        x = a * x + torch.baddbmm(gram, gram, gram, beta=b, alpha=c) @ x
    return x


def ns_gram(x: torch.Tensor, steps: int) -> torch.Tensor:
    """ns_direct's result, computed on the (m, m) Gram matrices: p(G) is a polynomial in G, so it is symmetric and
    commutes with G, and the next step's Gram matrix is p(G) G p(G); the (m, n) matrix is touched only to form G and
    to apply the product of the steps' p(G). G squares x's condition number, and float32 rounding in it, amplified by
    each step, left 1e-4 of the result wrong on an ill-conditioned gradient: so G is formed anew from x every
    GRAM_RESTART steps, which keeps it to ns_direct's float32 error (5e-6 against float64; tests/test_muon.py)."""
    a, b, c = NS_COEFFICIENTS
    for run in gram_runs(steps):
        gram, product = x @ x.mT, None                                 # (k, m, m) each
        for k in range(run):
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)    # b G + c G²
            poly.diagonal(dim1=1, dim2=2).add_(a)                      # + a I
            product = poly if product is None else poly @ product
            if k < run - 1:
                gram = poly @ gram @ poly                              # the Gram matrix of p(G) x
        x = product @ x
    return x


def gram_runs(steps: int) -> list[int]:
    """ns_gram's runs of steps between restarts: 5 -> [3, 2]."""
    return [min(GRAM_RESTART, steps - first) for first in range(0, steps, GRAM_RESTART)]


def ns_costs(m: int, n: int, steps: int) -> tuple[int, int]:
    """Multiply-adds of (ns_direct, ns_gram) on an (m, n) matrix, m <= n."""
    return steps * (2 * m * m * n + m ** 3), sum(2 * m * m * n + (4 * r - 3) * m ** 3 for r in gram_runs(steps))


class Muon(torch.optim.Optimizer):
    """Momentum (Nesterov) on 2-D parameters, each update orthogonalised by newton_schulz and scaled by
    0.2 * sqrt(max(A, B)) (torch's "match_rms_adamw": the update's RMS ≈ 0.2 lr, about AdamW's), decoupled decay."""

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False    # float32 orthogonalisation on a GPU too
        try:
            self._step()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32

    def _step(self):
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:                                              # no gradient yet (or frozen): nothing to do
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            grads, bufs = [p.grad for p in params], [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - mom)                  # buf <- mom * buf + (1 - mom) * g
            looks = torch._foreach_lerp(grads, bufs, mom)               # Nesterov: look one step ahead
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            for same, updates in orthogonalise(looks, group["ns_steps"]):
                shape = params[same[0]].shape                           # one scale for matrices of one shape
                torch._foreach_add_([params[i] for i in same], [u.to(params[i].dtype) for i, u in zip(same, updates)],
                                    alpha=-lr * 0.2 * math.sqrt(max(shape)))


def orthogonalise(matrices: list[torch.Tensor], steps: int):
    """Yield (indices, newton_schulz of those matrices) for each shape among `matrices`: the matrices of one shape
    (a DiT's blocks each have a qkv, proj, fc1, fc2 and adaLN matrix) go through the iteration together as one batch,
    which on a CPU cuts per-call overhead (DiT-T's 20 matrices: 5 batches, 21 -> 19 ms per step)."""
    by_shape = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    for same in by_shape.values():
        yield same, newton_schulz(torch.stack([matrices[i] for i in same]), steps).unbind(0)


class MuonAdamW:
    """Muon on muon_matrices(model), adamw(params) (the caller's AdamW, its settings written once) on every other
    trainable parameter, stepped together with one lr (the trainer's schedule sets every group's). Its state_dict is
    {"muon": ..., "adamw": ...}: plain data."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float = 0.0, *, adamw: Callable):
        names = set(muon_matrices(model))
        if not names:
            raise ValueError(f"{type(model).__name__} has no transformer-block weight matrices for Muon")
        params = dict(model.named_parameters())
        self.muon = Muon([params[n] for n in sorted(names)], lr=lr, weight_decay=weight_decay)
        self.adamw = adamw([p for n, p in params.items() if p.requires_grad and n not in names])

    @property
    def param_groups(self) -> list:
        """Both optimizers' groups, read anew each time: load_state_dict replaces an optimizer's group dicts."""
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
