"""--optimizer muon (plumbing/muon.py): the Newton-Schulz orthogonalisation against an SVD, our float32 Muon against
torch.optim.Muon's bfloat16 one, which parameters each optimizer gets, and a run whose update is Muon's (the test that
fails if the flag trained with AdamW)."""
import functools
import math

import pytest
import torch

import train_dit
import train_ldm
from conftest import load_ckpt as ckpt, one_error_line, run_tiny
from models import dit
from models.encoders import encoder_from_config
from plumbing.muon import Muon, MuonAdamW, muon_matrices, newton_schulz, ns_costs, ns_direct, ns_gram


def ill_conditioned(rows: int, cols: int, seed: int = 0) -> tuple:
    """(g, U V^T): a random (rows, cols) matrix with singular values from 1e-2 to 1e2, and its polar factor (SVD)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    k = min(rows, cols)
    s = torch.logspace(-2, 2, k, dtype=torch.float64)
    g = u[:, :k] @ torch.diag(s) @ v[:, :k].T
    return g.float(), (u[:, :k] @ v[:, :k].T).float()


@pytest.mark.parametrize("shape", [(64, 160), (160, 64)])
def test_newton_schulz_keeps_the_singular_vectors_and_flattens_the_singular_values(shape):
    """Five quintic steps bring every direction of a gradient above 1/300 of its largest singular value (those span
    2.5 decades here) to a singular value in [0.6, 1.25] (Jordan's coefficients do not converge to 1 exactly), keeping
    its singular vectors: the result points along U V^T (SVD), far closer than the gradient itself."""
    g, polar = ill_conditioned(*shape)
    o = newton_schulz(g)
    assert o.shape == g.shape and o.dtype == torch.float32
    sv = torch.linalg.svdvals(o.double())
    lifted = torch.linalg.svdvals(g.double()) > 100 / 300        # the largest is 1e2, the smallest 1e-2
    assert sv[lifted].min() > 0.6 and sv.max() < 1.25, sv         # tinier directions are not lifted in 5 steps
    cos = lambda a: ((a * polar).sum() / (a.norm() * polar.norm())).item()
    assert cos(o) > 0.8 and cos(g) < 0.5, (cos(o), cos(g))        # measured 0.86 and 0.46


@pytest.mark.parametrize("shape", [(128, 768), (48, 300), (128, 224), (96, 96)])
def test_the_gram_form_is_the_direct_iteration_to_float32_rounding(shape):
    """newton_schulz runs the elongated matrices in the Gram form (ns_gram: fewer multiply-adds, the DiT's qkv, MLP and
    adaLN) and square ones directly; either way its float32 result lies as close to the float64 iteration as the
    direct float32 one does (5e-6 measured; without the Gram matrix's restart 1.5e-4 to 2.6e-4), on a gradient whose
    singular values span 4 decades (the Gram matrix's span 8, past float32's 7 digits)."""
    g, _ = ill_conditioned(*shape)
    x = g / g.norm()
    x = x[None]                                                   # (1, m, n): the forms take a batch of matrices
    exact = ns_direct(x.double(), 5)                              # float64: the reference
    err = lambda o: ((o.double() - exact).norm() / exact.norm()).item()
    direct, gram = ns_costs(*shape, 5)
    assert (gram < direct) == (2 * shape[1] > 3 * shape[0])       # over 1.5x elongated: the Gram form, cheaper, taken
    assert torch.equal(newton_schulz(g), (ns_gram if gram < direct else ns_direct)(x, 5)[0])
    assert err(newton_schulz(g)[None]) < max(2 * err(ns_direct(x, 5)), 1e-6)
    assert err(ns_gram(x, 5)) < 1e-5
    assert (newton_schulz(g.T) - newton_schulz(g).T).abs().max() < 1e-5          # a tall matrix: as its transpose


def test_one_muon_step_on_many_matrices_is_each_matrix_on_its_own():
    """Muon orthogonalises the matrices of one shape as one batch (plumbing/muon.orthogonalise) with one scale per
    shape: three steps on five matrices of three shapes (tall, wide, square; weight decay on) equal five Muons with one
    matrix each, to float32 rounding; and a batch of matrices is each one orthogonalised alone."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(96, 48), (48, 96), (96, 48), (32, 32), (48, 96)]
    w0 = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]

    def three_steps(params, opts):
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            for opt in opts:
                opt.step()
        return [p.detach() for p in params]
    together = [torch.nn.Parameter(w.clone()) for w in w0]
    alone = [torch.nn.Parameter(w.clone()) for w in w0]
    three_steps(together, [Muon(together, lr=1e-2, weight_decay=0.1)])
    three_steps(alone, [Muon([p], lr=1e-2, weight_decay=0.1) for p in alone])
    for a, b, w in zip(together, alone, w0):
        assert (a - b).norm() < 1e-5 * (b - w).norm()
    idle = torch.nn.Parameter(w0[0].clone())                      # no gradient: the step leaves it alone
    Muon([idle], lr=1e-2).step()
    assert torch.equal(idle.detach(), w0[0])
    batch = torch.stack([g for g, s in zip(grads[0], shapes) if s == (96, 48)])           # (2, 96, 48)
    for o, g in zip(newton_schulz(batch), batch):
        assert (o - newton_schulz(g)).abs().max() < 1e-5


def test_our_muon_equals_torch_muon_up_to_its_bfloat16(monkeypatch):
    """Three steps of our Muon and of torch.optim.Muon (adjust_lr_fn="match_rms_adamw", the same momentum, Nesterov,
    coefficients and decoupled weight decay) on independent gradients, from the same weights: equal to float32
    precision once torch's iteration is made float32 too, to bfloat16's as torch ships it; the momentum matters."""
    import torch.optim._muon as torch_muon
    gen = torch.Generator().manual_seed(0)
    w0, grads = torch.randn(96, 48, generator=gen), [torch.randn(96, 48, generator=gen) for _ in range(3)]

    def three_steps(make):
        p = torch.nn.Parameter(w0.clone())
        opt = make(p)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach()
    ours = three_steps(lambda p: Muon([p], lr=1e-2, weight_decay=0.1))
    no_momentum = three_steps(lambda p: Muon([p], lr=1e-2, weight_decay=0.1, momentum=0.0))
    theirs = lambda: three_steps(lambda p: torch.optim.Muon([p], lr=1e-2, weight_decay=0.1,
                                                            adjust_lr_fn="match_rms_adamw"))
    assert (ours - theirs()).norm() < 2e-2 * (theirs() - w0).norm()              # bfloat16
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", lambda g, coefficients, steps, eps:
                        newton_schulz(g, steps))                              # torch's steps, our float32 iteration
    assert (ours - theirs()).norm() < 1e-5 * (theirs() - w0).norm()
    assert (ours - no_momentum).norm() > 0.1 * (ours - w0).norm()              # (the momentum is in the comparison)
    rms_per_step = (ours - w0 * (1 - 1e-3) ** 3).pow(2).mean().sqrt() / 3 / 1e-2
    assert 0.1 < rms_per_step < 0.25, rms_per_step


def test_muon_gets_the_block_matrices_and_adamw_the_rest():
    """The tiny DiT's Muon parameters are exactly the 5 matrices of each of its 4 blocks; AdamW gets every other
    trainable parameter (embeddings, convolutions, final layer, biases); none is in both."""
    cfg = train_dit.resolve(train_dit.DiTConfig(num_classes=10))
    model = dit.from_config(cfg, encoder_from_config)
    expected = {f"blocks.{i}.{m}.weight" for i in range(4)
                for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")}
    assert set(muon_matrices(model)) == expected
    opt = MuonAdamW(model, 1e-3, adamw=functools.partial(torch.optim.AdamW, lr=1e-3))
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert not muon & adamw
    assert muon | adamw == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(opt.param_groups) == 2


def test_the_cpu_default_trains_with_muon_and_adamw_when_asked(tmp_path):
    """Two steps from the zero-initialised adaLN matrix of block 0 (768 x 128): the first step's gradient is 0 (the
    output conv starts at 0), the second's has rank <= the batch, 8. With Muon (the CPU default) the weight is then
    one orthogonalised step, its top singular values 0.2 lr sqrt(768) x [0.6, 1.25]; with --optimizer adamw it is
    Adam's step, about ±0.74 lr per weight, whose top singular value is far larger. The checkpoint holds both
    optimizers' states."""
    key, lr = "blocks.0.adaLN_modulation.1.weight", 1e-3
    assert run_tiny(train_dit.main, tmp_path / "muon", "--steps", 2) == 0
    assert run_tiny(train_dit.main, tmp_path / "adamw", "--steps", 2, "--optimizer", "adamw") == 0
    m, a = ckpt(tmp_path / "muon"), ckpt(tmp_path / "adamw")
    assert m["config"]["optimizer"] == "muon" and set(m["opt"]) == {"muon", "adamw"}
    assert a["config"]["optimizer"] == "adamw" and "state" in a["opt"]
    scale = 0.2 * lr * math.sqrt(768)
    top = torch.linalg.svdvals(m["model"][key].double())[:8] / scale
    assert top.min() > 0.6 and top.max() < 1.25, top
    assert torch.linalg.svdvals(a["model"][key].double())[0] / scale > 5


def test_muon_is_refused_where_it_has_nothing_to_train(tmp_path, capsys):
    """The U-Net has no transformer blocks: --optimizer muon is one line, exit 2, no run folder."""
    assert train_ldm.main(["--optimizer", "muon", "--steps", "1", "--out", str(tmp_path / "u")]) == 2
    assert "--optimizer muon" in one_error_line(capsys, "train_ldm.py") and not (tmp_path / "u").exists()
    with pytest.raises(SystemExit) as e:                          # argparse's own line: usage, then the error
        train_dit.main(["--optimizer", "sgd", "--out", str(tmp_path / "d")])
    assert e.value.code == 2 and "--optimizer: invalid choice: 'sgd'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_checkpoint_from_before_the_flag_is_adamw_and_its_optimizer_cannot_change_on_resume(tmp_path, capsys):
    """A checkpoint whose config has no optimizer field was trained with AdamW: --init-from takes AdamW, the command
    that started it resumes it with AdamW (not the CPU default's muon), an explicit --optimizer muon is refused naming
    the stored adamw, --resume-override cannot switch the optimizer (its state does not carry over: one line pointing
    to --init-from, not a traceback), and with --optimizer adamw it resumes."""
    run = tmp_path / "old"
    assert run_tiny(train_dit.main, run, "--steps", 2, "--optimizer", "adamw") == 0
    state = ckpt(run)
    del state["config"]["optimizer"]
    torch.save(state, run / "last.pt")
    assert run_tiny(train_dit.main, tmp_path / "ft", "--steps", 1, "--init-from", run / "last.pt") == 0
    assert ckpt(tmp_path / "ft")["config"]["optimizer"] == "adamw"
    capsys.readouterr()
    assert run_tiny(train_dit.main, run, "--steps", 3, "--resume", "auto") == 0
    assert ckpt(run)["config"]["optimizer"] == "adamw" and ckpt(run)["step"] == 3
    capsys.readouterr()
    assert run_tiny(train_dit.main, run, "--steps", 4, "--resume", "auto", "--optimizer", "muon") == 2
    assert "'adamw'" in one_error_line(capsys)
    assert run_tiny(train_dit.main, run, "--steps", 4, "--resume", "auto", "--optimizer", "muon",
                    "--resume-override", "optimizer") == 2
    assert f"--init-from {run / 'last.pt'} --optimizer muon" in one_error_line(capsys)
    assert run_tiny(train_dit.main, run, "--steps", 4, "--resume", "auto", "--optimizer", "adamw") == 0
    assert ckpt(run)["step"] == 4
