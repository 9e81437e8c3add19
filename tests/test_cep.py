"""Tests for cep.py: noise bounds and standard deviations, eval identity, gradients, mask, dtypes, compile, errors."""

import math
import os

import pytest
import torch
import torch.nn as nn
from scipy import stats

import cep
from cep import CEP, perturb

# aot_eager runs dynamo (fullgraph=True fails on any graph break) and AOTAutograd (forward + backward tracing of
# the random ops) in ~5 s; inductor adds only its C++ code generation, ~20 s cold on a CPU. Set
# NANOCEP_TEST_COMPILE_BACKEND=inductor to run the full stack.
BACKEND = os.environ.get("NANOCEP_TEST_COMPILE_BACKEND", "aot_eager")


def _delta(mode, gamma, shape, seed=0):
    """The noise alone: perturb a zero embedding with a seeded generator, in float64 for exact checks."""
    g = torch.Generator().manual_seed(seed)
    return perturb(torch.zeros(shape, dtype=torch.float64), mode, gamma, generator=g)


# ---- distribution ----

def test_uniform_bound_and_std_match_paper_d512():
    delta = _delta("uniform", 1.0, (256, 512))  # 131072 draws
    bound = 1 / math.sqrt(512)  # ~0.0442, the paper's "~0.04 eps"
    assert delta.abs().max() <= bound
    assert delta.abs().max() > 0.999 * bound  # the whole interval is used, not a narrower one
    assert delta.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)  # ~8 standard errors
    assert abs(delta.mean().item()) < 5 * bound / math.sqrt(3) / math.sqrt(delta.numel())
    # the shape of the law: Kolmogorov-Smirnov against U(-bound, bound)
    p = stats.kstest(delta.flatten()[:20000].numpy(), stats.uniform(loc=-bound, scale=2 * bound).cdf).pvalue
    assert p > 1e-3


def test_gaussian_std_is_gamma_over_sqrt_d():
    delta = _delta("gaussian", 1.0, (256, 512))
    std = 1 / math.sqrt(512)
    assert delta.std().item() == pytest.approx(std, rel=0.01)
    p = stats.kstest(delta.flatten()[:20000].numpy(), stats.norm(scale=std).cdf).pvalue
    assert p > 1e-3
    # and not the variance reading of N(0, (gamma/sqrt d) I), whose std would be sqrt(1/sqrt(512)) ~ 0.21
    assert delta.std().item() < 0.1


@pytest.mark.parametrize("mode, std_factor", [("uniform", 1 / math.sqrt(3)), ("gaussian", 1.0)])
def test_scale_follows_gamma_and_per_token_width(mode, std_factor):
    # sequences (B, L, D): d is the per-token width D=64, not L*D
    delta = _delta(mode, 3.0, (64, 16, 64))
    assert delta.std().item() == pytest.approx(3.0 / math.sqrt(64) * std_factor, rel=0.02)
    if mode == "uniform":
        assert delta.abs().max() <= 3.0 / math.sqrt(64)


def test_noise_is_fresh_per_element_and_per_call():
    emb = torch.zeros(8, 32)
    m = CEP("uniform").train()
    a, b = m(emb), m(emb)
    assert not torch.equal(a, b)  # new delta on every call
    assert len(torch.unique(a)) == a.numel()  # no sharing across samples or dimensions
    # rows are independent: correlation of two samples' noise over many draws is ~0
    pairs = torch.stack([m(torch.zeros(2, 32)) for _ in range(200)])  # (200, 2, 32)
    r = torch.corrcoef(torch.stack([pairs[:, 0].flatten(), pairs[:, 1].flatten()]))[0, 1]
    assert abs(r) < 5 / math.sqrt(pairs[:, 0].numel())


def test_generator_makes_it_reproducible():
    emb = torch.randn(4, 16)
    a = perturb(emb, "gaussian", generator=torch.Generator().manual_seed(7))
    b = perturb(emb, "gaussian", generator=torch.Generator().manual_seed(7))
    c = perturb(emb, "gaussian", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- module behaviour ----

def test_eval_mode_and_none_mode_are_identity():
    emb = torch.randn(4, 16)
    m = CEP("gaussian", 2.0).eval()
    assert m(emb) is emb
    assert CEP("none").train()(emb) is emb
    assert perturb(emb, "uniform", 0.0) is emb
    m.train()
    assert not torch.equal(m(emb), emb)


def test_gradient_reaches_embedding_and_noise_has_none():
    torch.manual_seed(0)
    enc = nn.Embedding(10, 16)
    m = CEP("uniform").train()
    y = torch.tensor([1, 2, 2, 5])
    w = torch.randn(4, 16)
    out = m(enc(y))  # (4, 16)
    (out * w).sum().backward()
    # d(out)/d(emb) is the identity, so the gradient equals the clean path's
    expected = torch.zeros(10, 16).index_add_(0, y, w)
    assert torch.allclose(enc.weight.grad, expected, rtol=0, atol=1e-6)
    # the noise itself is a constant: out - emb carries no dependence on the parameters
    emb = enc(y)
    delta = perturb(emb, "uniform", generator=torch.Generator().manual_seed(0)) - emb
    (grad,) = torch.autograd.grad(delta.sum(), enc.weight, allow_unused=True)
    assert grad is None or torch.count_nonzero(grad) == 0


def test_mask_perturbs_only_selected_samples():
    emb = torch.randn(6, 5, 8)  # (B, L, D)
    mask = torch.tensor([True, False, True, False, False, True])
    out = CEP("gaussian").train()(emb, mask=mask)
    assert torch.equal(out[~mask], emb[~mask])  # bit-identical where not selected
    assert (out[mask] != emb[mask]).all()
    assert torch.equal(CEP("gaussian").train()(emb, mask=torch.zeros(6, dtype=torch.bool)), emb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtype_is_kept(dtype):
    emb = torch.zeros(64, 128, dtype=dtype)
    out = perturb(emb, "uniform", 1.0, generator=torch.Generator().manual_seed(0))
    assert out.dtype == dtype and out.shape == emb.shape
    # low precision rounds the bound by at most one unit in the last place
    assert out.float().abs().max() <= (1 / math.sqrt(128)) * (1 + torch.finfo(dtype).eps)


def test_works_under_autocast():
    lin = nn.Linear(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = lin(torch.randn(4, 8))
        out = CEP("uniform").train()(emb)
    assert out.dtype == emb.dtype == torch.bfloat16
    assert not torch.equal(out, emb)


def test_compiles_fullgraph_in_training_mode():
    """One tiny compile: CEP must not graph-break a compiled encoder in training mode."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.cep, self.head = nn.Embedding(5, 16), CEP("uniform", 1.0), nn.Linear(16, 2)

        def forward(self, y, mask):
            return self.head(self.cep(self.embed(y), mask=mask))

    torch.manual_seed(0)
    model = Tiny().train()
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    y, mask = torch.tensor([0, 1, 2, 3]), torch.tensor([True, True, True, False])
    out1, out2 = compiled(y, mask), compiled(y, mask)
    clean = model.head(model.embed(y))
    assert not torch.equal(out1[:3], out2[:3])  # fresh noise on each compiled call
    assert torch.allclose(out1[3], clean[3], atol=1e-6)  # masked-out sample is clean
    # |W delta| <= sum_j |W_ij| * gamma/sqrt(d): the compiled noise respects the uniform bound
    assert (out1 - clean).abs().max() <= model.head.weight.abs().sum(1).max() / math.sqrt(16) + 1e-5
    out1.sum().backward()
    assert model.embed.weight.grad is not None and torch.count_nonzero(model.embed.weight.grad[:4]) > 0


# ---- errors ----

def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="'gausian'"):
        CEP("gausian")
    with pytest.raises(ValueError, match="-0.5"):
        CEP("uniform", -0.5)
    with pytest.raises(ValueError, match="nan"):
        perturb(torch.zeros(2, 4), "uniform", float("nan"))
    with pytest.raises(ValueError, match="floating-point"):
        perturb(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        perturb(torch.zeros(2, 4), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        perturb(torch.zeros(2, 4), mask=torch.ones(2))
    assert "mode='gaussian'" in repr(CEP("gaussian", 0.5)) and "gamma=0.5" in repr(CEP("gaussian", 0.5))


def test_module_file_imports_only_torch_and_stdlib():
    import ast
    import sys

    tree = ast.parse(open(cep.__file__).read())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert roots - {"torch"} <= sys.stdlib_module_names, roots
