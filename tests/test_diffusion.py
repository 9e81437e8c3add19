"""Tests for diffusion.py: schedules, losses, samplers (closed-form Gaussian case + diffusers as an oracle), CFG.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_diffusion.py
"""
import math

import pytest
import torch

from diffusion import (GaussianDiffusion, cfg_model_fn, ddim_timesteps, ddpm_timesteps, dpm_solver_timesteps,
                       make_beta_schedule)

# ---- helpers ----


def toy_model(x, t):
    """A fixed, smooth, nonlinear stand-in for a trained eps-model (depends on x and t)."""
    tt = t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return torch.sin(x + tt / 300.0) * 0.8 + 0.1 * x.roll(1, dims=-1)


def toy_model_sigma(x, t):
    """Like toy_model, plus a second block of channels v in [-1, 1] (learned variance)."""
    tt = t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return torch.cat([toy_model(x, t), torch.tanh(0.7 * x - tt / 1000.0)], dim=1)


def recording(fn, log):
    """Wrap a model function so that every call's (t, x) is logged: the trajectory a sampler walks."""
    def wrapped(x, t):
        log.append((int(t[0]), x.detach().clone()))
        return fn(x, t)
    return wrapped


def assert_same_trajectory(ours, theirs, tol=2e-4):
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    for (t, a), (_, b) in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"trajectories differ at t={t}")


# ---- schedules and timesteps vs diffusers ----


@pytest.mark.parametrize("name, start, end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.0015, 0.0195)])
def test_schedules_match_diffusers(name, start, end):
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDPMScheduler(beta_schedule=name, beta_start=start, beta_end=end).betas
    ours = make_beta_schedule(name)
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=1e-9)


def test_linear_schedule_rescales_with_num_steps():
    betas = make_beta_schedule("linear", 100)  # DiT: scale = 1000 / T
    assert betas[0].item() == pytest.approx(1e-3) and betas[-1].item() == pytest.approx(0.2)
    sl = make_beta_schedule("scaled_linear", 3)
    assert sl.tolist() == pytest.approx([0.0015, ((0.0015 ** 0.5 + 0.0195 ** 0.5) / 2) ** 2, 0.0195])


@pytest.mark.parametrize("steps", [1, 7, 20, 25, 50, 250, 999])
def test_timesteps_match_diffusers(steps):
    diffusers = pytest.importorskip("diffusers")
    dpm = diffusers.DPMSolverMultistepScheduler()
    assert dpm.config.timestep_spacing == "linspace" and dpm.config.final_sigmas_type == "zero"
    dpm.set_timesteps(steps)
    assert dpm_solver_timesteps(1000, steps) == dpm.timesteps.tolist()
    ddim = diffusers.DDIMScheduler()
    ddim.set_timesteps(steps)
    assert ddim_timesteps(1000, steps) == ddim.timesteps.tolist()


def test_ddpm_timesteps_follow_dit_respacing():
    assert ddpm_timesteps(1000, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]  # stride exactly 111
    assert ddpm_timesteps(1000, 1000) == list(range(999, -1, -1))
    for steps in (21, 50, 250):  # evenly strided from T-1 down to 0, each within rounding of i * stride
        ts = ddpm_timesteps(1000, steps)[::-1]
        stride = 999 / (steps - 1)
        assert len(ts) == steps and ts[0] == 0 and ts[-1] == 999
        assert all(abs(t - i * stride) <= 0.5 + 1e-6 for i, t in enumerate(ts))
    assert ddpm_timesteps(1000, 1) == [999]


# ---- samplers vs diffusers: same timesteps, same trajectory on a fixed model ----


@pytest.mark.parametrize("name, start, end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.0015, 0.0195)])
@pytest.mark.parametrize("steps", [10, 50])
def test_dpm_solver_trajectory_matches_diffusers(name, start, end, steps):
    diffusers = pytest.importorskip("diffusers")
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    ours, theirs = [], []
    out = GaussianDiffusion(make_beta_schedule(name)).sample(recording(toy_model, ours), noise, steps=steps)
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule=name, beta_start=start, beta_end=end)
    sched.set_timesteps(steps)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(recording(toy_model, theirs)(x, t.expand(x.shape[0])), t, x).prev_sample
    assert len(ours) == steps
    assert_same_trajectory(ours, theirs)
    torch.testing.assert_close(out, x, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_trajectory_matches_diffusers(eta):
    diffusers = pytest.importorskip("diffusers")
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    ours, theirs = [], []
    out = GaussianDiffusion(make_beta_schedule("linear")).sample(
        recording(toy_model, ours), noise, sampler="ddim", steps=20, eta=eta, generator=torch.Generator().manual_seed(5))
    sched = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False)  # DiT's converted scheduler config
    sched.set_timesteps(20)
    x, gen = noise.clone(), torch.Generator().manual_seed(5)
    for t in sched.timesteps:
        eps = recording(toy_model, theirs)(x, t.expand(x.shape[0]))
        x = sched.step(eps, t, x, eta=eta, generator=gen).prev_sample
    assert_same_trajectory(ours, theirs)
    torch.testing.assert_close(out, x, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_trajectory_matches_diffusers(learn_sigma):
    diffusers = pytest.importorskip("diffusers")
    model = toy_model_sigma if learn_sigma else toy_model
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    ours, theirs = [], []
    out = GaussianDiffusion(make_beta_schedule("linear"), learn_sigma=learn_sigma).sample(
        recording(model, ours), noise, sampler="ddpm", steps=25, generator=torch.Generator().manual_seed(6))
    # diffusers' DDPM on custom timesteps = the respaced chain; learned_range is improved DDPM's v interpolation
    sched = diffusers.DDPMScheduler(beta_schedule="linear", clip_sample=False,
                                    variance_type="learned_range" if learn_sigma else "fixed_small")
    sched.set_timesteps(timesteps=ddpm_timesteps(1000, 25))
    x, gen = noise.clone(), torch.Generator().manual_seed(6)
    for t in sched.timesteps:
        x = sched.step(recording(model, theirs)(x, t.expand(x.shape[0])), t, x, generator=gen).prev_sample
    assert_same_trajectory(ours, theirs)
    torch.testing.assert_close(out, x, rtol=2e-4, atol=2e-4)


# ---- samplers vs a closed form: Gaussian data N(m, s^2) per channel ----

MEAN, STD = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1), torch.tensor([0.5, 0.8]).view(1, 2, 1, 1)


def exact_eps_fn(alphas_cumprod):
    """The exact eps(x_t, t) = E[eps | x_t] when x0 ~ N(MEAN, STD^2) per channel."""
    def fn(x, t):
        a = alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        return (x - a.sqrt() * MEAN) * (1 - a).sqrt() / (a * STD ** 2 + 1 - a)
    return fn


def channel_stats(x):
    flat = x.transpose(0, 1).flatten(1)  # (C, N)
    return flat.mean(1), flat.std(1)


@pytest.mark.parametrize("sampler, steps, std_tol", [("ddpm", 1000, 0.02), ("ddim", 200, 0.025), ("dpm++", 50, 0.015)])
def test_samplers_recover_gaussian(sampler, steps, std_tol):
    diffusion = GaussianDiffusion(make_beta_schedule("linear"))
    noise = torch.randn(4000, 2, 2, 2, generator=torch.Generator().manual_seed(0))  # 16k values per channel
    x = diffusion.sample(exact_eps_fn(diffusion.alphas_cumprod), noise, sampler=sampler, steps=steps,
                         generator=torch.Generator().manual_seed(1))
    mean, std = channel_stats(x)
    torch.testing.assert_close(mean, MEAN.flatten(), rtol=0, atol=0.015)
    torch.testing.assert_close(std, STD.flatten(), rtol=std_tol, atol=0)


def test_ddpm_with_exact_learned_variance_is_exact_in_few_steps():
    """With the true reverse variance supplied through v, ancestral sampling of Gaussian data is exact at any
    step count; the fixed small variance (v = -1) is visibly too narrow at 10 steps, so the check has teeth."""
    diffusion = GaussianDiffusion(make_beta_schedule("linear"), learn_sigma=True)
    abar = diffusion.alphas_cumprod.float()
    ts = ddpm_timesteps(1000, 10)
    prev_of = {t: (abar[p] if p is not None else torch.tensor(1.0)) for t, p in zip(ts, ts[1:] + [None])}
    eps_fn = exact_eps_fn(abar)

    def model(x, t, exact=True):
        a, a_prev = abar[t[0]], prev_of[int(t[0])]
        beta = 1 - a / a_prev
        post_var = beta * (1 - a_prev) / (1 - a)
        coef_x0 = a_prev.sqrt() * beta / (1 - a)
        true_var = post_var + coef_x0 ** 2 * STD ** 2 * (1 - a) / (a * STD ** 2 + 1 - a)  # + Var(x0 | x_t) term
        frac = (true_var.log() - post_var.log()) / (beta.log() - post_var.log()) if int(t[0]) > 0 else 0 * STD
        v = (2 * frac - 1) if exact else -torch.ones_like(frac)
        return torch.cat([eps_fn(x, t), v.expand_as(x)], dim=1)

    noise = torch.randn(4000, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    x = diffusion.sample(model, noise, sampler="ddpm", steps=10, generator=torch.Generator().manual_seed(1))
    mean, std = channel_stats(x)
    torch.testing.assert_close(mean, MEAN.flatten(), rtol=0, atol=0.015)
    torch.testing.assert_close(std, STD.flatten(), rtol=0.015, atol=0)
    x_small = diffusion.sample(lambda x, t: model(x, t, exact=False), noise, sampler="ddpm", steps=10,
                               generator=torch.Generator().manual_seed(1))
    assert (channel_stats(x_small)[1] / STD.flatten() < 0.9).all()


def test_one_step_samplers_return_the_x0_prediction():
    diffusion = GaussianDiffusion(make_beta_schedule("linear"))
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a = diffusion.alphas_cumprod[999].item()
    expected = (noise - math.sqrt(1 - a) * toy_model(noise, torch.tensor([999]))) / math.sqrt(a)
    for sampler in ("ddpm", "dpm++"):  # both start at t = T-1 with one step
        out = diffusion.sample(toy_model, noise, sampler=sampler, steps=1)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-3)
    calls = []
    diffusion.sample(recording(toy_model, calls), noise, sampler="ddim", steps=1)
    assert [t for t, _ in calls] == [0]  # diffusers' "leading" spacing, kept as is


# ---- training losses ----


def test_q_sample_and_mse_loss_match_direct_computation():
    betas = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    diffusion = GaussianDiffusion(betas)
    x0, noise = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    t = torch.tensor([0, 2, 3])
    abar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    expected_xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), expected_xt)
    seen = {}
    def model(x, tt):
        seen["x"], seen["t"] = x, tt
        return 0.5 * x
    losses = diffusion.training_losses(model, x0, t, noise)
    torch.testing.assert_close(seen["x"], expected_xt)
    assert seen["t"].dtype == torch.int64 and seen["t"].tolist() == [0, 2, 3]
    torch.testing.assert_close(losses["mse"], ((noise - 0.5 * expected_xt) ** 2).mean((1, 2, 3)))
    assert set(losses) == {"loss", "mse"}
    t_drawn = []
    diffusion.training_losses(lambda x, tt: t_drawn.append(tt) or x, torch.zeros(64, 1, 1, 1))
    assert t_drawn[0].min() >= 0 and t_drawn[0].max() < 4 and t_drawn[0].dtype == torch.int64


def _phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _direct_vb_bits(betas, x0, noise, eps_pred, v, t):
    """The improved-DDPM L_t for one scalar element, written out from the paper's formulas (float64 python)."""
    abar = [math.prod(1 - b for b in betas[: i + 1]) for i in range(len(betas))]
    def post_var(s):
        return betas[s] * (1 - abar[s - 1]) / (1 - abar[s]) if s > 0 else 0.0
    def post_mean(s, start, xs):
        a_prev = abar[s - 1] if s > 0 else 1.0
        return (math.sqrt(a_prev) * betas[s] * start + math.sqrt(1 - betas[s]) * (1 - a_prev) * xs) / (1 - abar[s])
    x_t = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * noise
    x0_pred = (x_t - math.sqrt(1 - abar[t]) * eps_pred) / math.sqrt(abar[t])
    min_log = math.log(post_var(t) if t > 0 else post_var(1))
    log_var = (v + 1) / 2 * math.log(betas[t]) + (1 - v) / 2 * min_log
    mean = post_mean(t, x0_pred, x_t)
    if t == 0:  # discretized Gaussian decoder: the probability of x0's bin of width 2/255
        sd = math.exp(0.5 * log_var)
        hi = 1.0 if x0 > 0.999 else _phi((x0 + 1 / 255 - mean) / sd)
        lo = 0.0 if x0 < -0.999 else _phi((x0 - 1 / 255 - mean) / sd)
        return -math.log(hi - lo) / math.log(2)
    var = math.exp(log_var)
    kl = 0.5 * (log_var - min_log + post_var(t) / var + (post_mean(t, x0, x_t) - mean) ** 2 / var - 1)
    return kl / math.log(2)


def test_hybrid_vb_matches_direct_computation_and_is_nonnegative():
    betas = [0.1, 0.2, 0.3, 0.4]
    diffusion = GaussianDiffusion(torch.tensor(betas), learn_sigma=True, loss="hybrid")
    x0 = torch.tensor([-1.0, 0.2, 1.0, -0.3, 0.7, 0.05]).view(6, 1, 1, 1)  # both edge bins and a middle one
    noise = torch.tensor([0.3, -0.8, 0.5, 1.2, -0.4, 0.9]).view(6, 1, 1, 1)
    eps_pred = torch.tensor([0.25, -0.7, 0.45, 1.0, -0.5, 0.6]).view(6, 1, 1, 1)
    v = torch.tensor([0.3, -0.5, 0.9, -0.2, 0.6, -1.0]).view(6, 1, 1, 1)
    t = torch.tensor([0, 0, 0, 1, 2, 3])
    losses = diffusion.training_losses(lambda x, tt: torch.cat([eps_pred, v], 1), x0, t, noise)
    expected = [_direct_vb_bits(betas, *(float(z[i]) for z in (x0, noise, eps_pred, v)), int(t[i])) for i in range(6)]
    torch.testing.assert_close(losses["vb"], torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    assert (losses["vb"] >= 0).all()
    # exact eps and v = -1 (the true posterior variance) make every KL term zero
    exact = diffusion.training_losses(lambda x, tt: torch.cat([noise, -torch.ones_like(v)], 1), x0, t, noise)
    torch.testing.assert_close(exact["vb"][3:], torch.zeros(3), atol=1e-6, rtol=0)
    # random predictions over all timesteps: still non-negative
    x0r = torch.rand(64, 2, 3, 3) * 2 - 1
    rand = diffusion.training_losses(lambda x, tt: torch.randn(64, 4, 3, 3).clamp(-3, 3).tanh(), x0r)
    assert (rand["vb"] >= 0).all()


def test_vb_trains_only_the_variance_and_mse_only_the_mean():
    diffusion = GaussianDiffusion(make_beta_schedule("linear"), learn_sigma=True, loss="hybrid")
    out = torch.randn(4, 4, 3, 3, requires_grad=True)
    losses = diffusion.training_losses(lambda x, t: out, torch.randn(4, 2, 3, 3), torch.tensor([0, 5, 500, 999]))
    grad_vb, = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    grad_mse, = torch.autograd.grad(losses["mse"].sum(), out)
    assert grad_vb[:, :2].abs().max() == 0 and grad_vb[:, 2:].abs().max() > 0
    assert grad_mse[:, 2:].abs().max() == 0 and grad_mse[:, :2].abs().max() > 0


@pytest.mark.parametrize("loss", ["mse", "hybrid"])
def test_min_snr_weights_each_example_by_min_snr_gamma_over_snr(loss):
    """Min-SNR-5 (Hang et al. 2023) against the paper's formula in float64 from the betas: the loss of an example at
    step t is min(SNR_t, 5) / SNR_t times its eps-MSE (1 where SNR_t <= 5), "mse" stays unweighted, the VB term is
    untouched; gamma 0 and a gamma above every SNR give the plain loss bit for bit."""
    betas = make_beta_schedule("linear")
    abar = torch.cumprod(1 - betas.double(), 0)
    t = torch.tensor([0, 10, 100, 300, 700, 999])
    x0, noise = torch.randn(6, 2, 4, 4), torch.randn(6, 2, 4, 4)
    out = torch.randn(6, 4 if loss == "hybrid" else 2, 4, 4)
    make = lambda g: GaussianDiffusion(betas, learn_sigma=loss == "hybrid", loss=loss, min_snr_gamma=g)
    plain, weighted = (make(g).training_losses(lambda x, tt: out, x0, t, noise) for g in (0.0, 5.0))
    snr = [a / (1 - a) for a in abar[t].tolist()]
    expect = torch.tensor([min(r, 5.0) / r for r in snr])
    assert expect[0] < 1e-3 and expect[-1] == 1.0                       # the formula bites at low noise only
    torch.testing.assert_close(weighted["mse"], plain["mse"], rtol=0, atol=0)
    vb = plain.get("vb", torch.zeros(6))
    torch.testing.assert_close(weighted["loss"], plain["mse"] * expect.float() + vb, rtol=1e-6, atol=0)
    huge = make(2 * max(a / (1 - a) for a in abar.tolist())).training_losses(lambda x, tt: out, x0, t, noise)
    torch.testing.assert_close(huge["loss"], plain["loss"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        make(-1.0)


def test_input_perturbation_changes_x_t_but_not_the_target():
    gamma = 0.5
    diffusion = GaussianDiffusion(make_beta_schedule("linear"), ip_gamma=gamma)
    x0, noise = torch.randn(256, 1, 8, 8), torch.randn(256, 1, 8, 8)
    t = torch.full((256,), 600)
    seen = {}
    def model(x, tt):
        seen["x"] = x
        return noise  # predicts the un-perturbed noise exactly
    losses = diffusion.training_losses(model, x0, t, noise)
    assert losses["mse"].abs().max() == 0  # the target is `noise`, not the perturbed noise
    a = diffusion.alphas_cumprod[600].item()
    model_noise = (seen["x"] - math.sqrt(a) * x0) / math.sqrt(1 - a)
    assert not torch.allclose(model_noise, noise)
    assert (model_noise - noise).std().item() == pytest.approx(gamma, rel=0.05)
    xi = torch.randn_like(noise)  # an explicit perturbation (for trainers that draw all noise from a seed)
    diffusion.training_losses(model, x0, t, noise, ip_noise=xi)
    torch.testing.assert_close(seen["x"], diffusion.q_sample(x0, t, noise + gamma * xi))
    plain = GaussianDiffusion(make_beta_schedule("linear"))
    plain.training_losses(model, x0, t, noise)
    torch.testing.assert_close(seen["x"], plain.q_sample(x0, t, noise))


def test_losses_are_fp32_under_bf16_autocast():
    net = torch.nn.Conv2d(2, 4, 3, padding=1)
    diffusion = GaussianDiffusion(make_beta_schedule("linear"), learn_sigma=True, loss="hybrid")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = diffusion.training_losses(lambda x, t: net(x), torch.randn(4, 2, 8, 8))
        assert net(torch.randn(1, 2, 8, 8)).dtype == torch.bfloat16  # autocast is really on
        samples = diffusion.sample(lambda x, t: net(x), torch.randn(2, 2, 8, 8), steps=3)
    assert all(v.dtype == torch.float32 and v.shape == (4,) and torch.isfinite(v).all() for v in losses.values())
    losses["loss"].mean().backward()
    assert net.weight.grad is not None
    assert samples.dtype == torch.float32 and torch.isfinite(samples).all()


# ---- classifier-free guidance ----


class TinyCondModel(torch.nn.Module):
    """eps depends on x, t and the condition y (class ids (B,) or token ids (B, L)); counts its batch sizes."""

    def __init__(self, out_channels):
        super().__init__()
        self.out_channels, self.batches = out_channels, []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        ycode = y.float().view(y.shape[0], -1).sum(1).view(-1, 1, 1, 1)
        out = torch.sin(x * (1 + 0.1 * ycode) + t.view(-1, 1, 1, 1) / 500)
        return out.repeat(1, self.out_channels // x.shape[1], 1, 1) * torch.arange(1, self.out_channels + 1).view(
            1, -1, 1, 1)


def test_cfg_scale_one_is_the_conditional_model():
    model = TinyCondModel(4)
    x, t, y = torch.randn(3, 4, 2, 2), torch.tensor([5, 500, 999]), torch.tensor([1, 2, 3])
    out = cfg_model_fn(model, y, torch.tensor([10]), 1.0)(x, t)
    assert model.batches == [3]  # one forward, batch not doubled
    torch.testing.assert_close(out, model(x, t, y))


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("guide_channels", [None, 3])
def test_cfg_guides_eps_and_keeps_conditional_sigma(learn_sigma, guide_channels):
    model = TinyCondModel(8 if learn_sigma else 4)
    x, t = torch.randn(3, 4, 2, 2), torch.tensor([5, 500, 999])
    y, y_null = torch.tensor([[1, 2], [3, 4], [5, 6]]), torch.tensor([[0, 0]])  # token ids (B, L); one null row
    out = cfg_model_fn(model, y, y_null, 4.0, learn_sigma=learn_sigma, guide_channels=guide_channels)(x, t)
    assert model.batches == [6]  # one forward on the doubled batch
    cond, uncond = model(x, t, y), model(x, t, y_null.expand(3, 2))
    g = 4 if guide_channels is None else 3
    torch.testing.assert_close(out[:, :g], uncond[:, :g] + 4.0 * (cond[:, :g] - uncond[:, :g]))
    torch.testing.assert_close(out[:, g:], cond[:, g:])  # unguided eps channels and the variance: conditional half
    assert out.shape == cond.shape


# ---- bad input ----


def test_bad_names_and_settings_raise_value_error():
    betas = make_beta_schedule("linear", 100)
    with pytest.raises(ValueError, match="cosine"):
        make_beta_schedule("cosine")
    with pytest.raises(ValueError, match="l1"):
        GaussianDiffusion(betas, loss="l1")
    with pytest.raises(ValueError, match="learn_sigma"):
        GaussianDiffusion(betas, loss="hybrid")
    with pytest.raises(ValueError, match="ip_gamma"):
        GaussianDiffusion(betas, ip_gamma=-0.1)
    diffusion = GaussianDiffusion(betas)
    noise = torch.randn(1, 2, 2, 2)
    with pytest.raises(ValueError, match="euler"):
        diffusion.sample(toy_model, noise, sampler="euler")
    for sampler, steps in (("ddpm", 0), ("ddpm", 101), ("ddim", 101), ("dpm++", 100)):
        with pytest.raises(ValueError, match="steps"):
            diffusion.sample(toy_model, noise, sampler=sampler, steps=steps)
    with pytest.raises(ValueError, match="eta"):
        diffusion.sample(toy_model, noise, sampler="dpm++", eta=0.5)
    with pytest.raises(ValueError, match="channels"):  # a learned-sigma model on a fixed-sigma diffusion
        diffusion.training_losses(lambda x, t: torch.cat([x, x], 1), noise)
    with pytest.raises(ValueError, match="channels"):
        GaussianDiffusion(betas, learn_sigma=True).sample(toy_model, noise, sampler="ddpm", steps=3)


def test_zero_terminal_snr_and_invalid_betas_are_rejected():
    """beta_T = 1 (zero terminal SNR) would divide by sqrt(abar_T) = 0 when turning eps into x0."""
    zero_snr = make_beta_schedule("linear", 100).clone()
    zero_snr[-1] = 1.0
    for bad in (zero_snr, make_beta_schedule("linear", 20), torch.zeros(10), torch.tensor([0.1]), torch.rand(2, 5)):
        with pytest.raises(ValueError, match="betas"):
            GaussianDiffusion(bad)
    # the strongest valid schedule still samples finite values from its last step
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 21))  # beta_T = 0.952, abar_T ~ 1e-9
    out = diffusion.sample(toy_model, torch.randn(2, 1, 2, 2), sampler="dpm++", steps=5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_clip_x0_keeps_pixel_samples_in_range(sampler):
    """A model whose x0 estimates overshoot: clip_x0 (pixel-space sampling) lands every sample in [-1, 1]."""
    diffusion = GaussianDiffusion(make_beta_schedule("linear"))
    def wild(x, t):                       # eps that implies an x0 far outside [-1, 1] at every step
        return -3.0 * torch.ones_like(x)
    noise = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    free = diffusion.sample(wild, noise, sampler=sampler, steps=10, generator=torch.Generator().manual_seed(1))
    clipped = diffusion.sample(wild, noise, sampler=sampler, steps=10, clip_x0=True,
                               generator=torch.Generator().manual_seed(1))
    assert free.abs().max() > 2 and clipped.abs().max() <= 1 + 1e-6


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_per_image_generators_make_shards_equal_one_batch(sampler, eta):
    """With one generator per image, two half batches sampled apart equal the whole batch, bit for bit."""
    diffusion = GaussianDiffusion(make_beta_schedule("linear"), learn_sigma=sampler == "ddpm")
    model = toy_model_sigma if sampler == "ddpm" else toy_model
    noise = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    kw = dict(sampler=sampler, steps=8, eta=eta)
    whole = diffusion.sample(model, noise, generator=gens([10, 11, 12, 13]), **kw)
    halves = [diffusion.sample(model, noise[:2], generator=gens([10, 11]), **kw),
              diffusion.sample(model, noise[2:], generator=gens([12, 13]), **kw)]
    assert torch.equal(torch.cat(halves), whole)
    # the step noise is really drawn from each image's generator: another seed for image 3 changes image 3 only
    other = diffusion.sample(model, noise, generator=gens([10, 11, 12, 99]), **kw)
    assert torch.equal(other[:3], whole[:3]) and not torch.allclose(other[3], whole[3], atol=1e-3)
    with pytest.raises(ValueError, match="per-image generators"):
        diffusion.sample(model, noise, generator=gens([1, 2]), **kw)
