"""Gaussian diffusion: noise schedules, the training loss and three samplers, in one readable file.

    betas = make_beta_schedule("linear")                          # DiT's 1000-step schedule
    diffusion = GaussianDiffusion(betas, learn_sigma=True, loss="hybrid")
    losses = diffusion.training_losses(lambda x, t: model(x, t, y), x0)   # {"loss", "mse", "vb"}, each (B,)
    x0 = diffusion.sample(cfg_model_fn(model, y, y_null, scale=4.0, learn_sigma=True), noise, sampler="dpm++", steps=50)

The model predicts the noise eps (and, with learn_sigma, a second block of channels v in [-1, 1] that sets the
reverse-step variance, as in improved DDPM / DiT). Every sampler calls the model with the ORIGINAL integer
timesteps 0..T-1, so a model trained on 1000 steps can be sampled in 50 without knowing it.

Samplers (each one short function, k-diffusion style; `GaussianDiffusion.sample` picks the spacing):
  ddpm  - ancestral sampling, respaced like DiT's `space_timesteps(T, str(steps))` (evenly strided, keeps 0 and T-1)
  ddim  - DDIM with eta, spaced like diffusers' DDIMScheduler default ("leading": t = i * (T // steps))
  dpm++ - DPM-Solver++(2M), equal to diffusers' DPMSolverMultistepScheduler defaults (the paper's 50-step sampler)
ddpm and ddim (eta > 0) draw fresh noise every step from `generator`: one torch.Generator for the batch (diffusers'
convention, so the oracle tests match), or a list of one generator per image (step_noise), which makes an image a
function of its own seed, so sharded sampling reproduces a single process.
"""
import math

import torch

# ---- noise schedules ----


def make_beta_schedule(name: str, num_steps: int = 1000) -> torch.Tensor:
    """Return the (T,) float64 betas of a named schedule."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if name == "linear":  # DiT / ADM: linear in beta, endpoints rescaled so any T has the same overall noise
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    if name == "scaled_linear":  # LDM's "linear": linear in sqrt(beta); diffusers calls it "scaled_linear"
        return torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, num_steps, dtype=torch.float64) ** 2
    raise ValueError(f"unknown beta schedule {name!r} (expected 'linear' or 'scaled_linear')")


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The (T,) log-SNR log(abar_t / (1 - abar_t)) of a schedule's abar table; it falls as t grows."""
    return (alphas_cumprod / (1 - alphas_cumprod)).log()


def schedule_log_snr(name: str, num_steps: int = 1000) -> torch.Tensor:
    """The (T,) float64 log-SNR of a named schedule (log_snr of its abar), without building a GaussianDiffusion."""
    return log_snr(torch.cumprod(1 - make_beta_schedule(name, num_steps), 0))


def focus_band(log_snr: torch.Tensor, lo: float, hi: float) -> tuple[int, int]:
    """(start, stop): the steps start <= t < stop of a schedule (its (T,) log-SNR) whose log-SNR lies in [lo, hi], the
    band --t-focus trains more often. The log-SNR falls with t, so they are one run of steps (start = stop: none)."""
    inside = ((log_snr >= lo) & (log_snr <= hi)).nonzero().flatten()
    return (int(inside[0]), int(inside[-1]) + 1) if len(inside) else (0, 0)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) -> (B, dim); cos half first, as GLIDE/DiT/LDM.

    The denoisers' first timestep layer. Frequencies are max_period^(-k / (half - freq_shift)): DiT and LDM use
    shift 0, diffusers' DiT port uses 1."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]                         # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


# ---- sampling timesteps (descending lists of original timesteps) ----


def ddpm_timesteps(num_timesteps: int, steps: int) -> list:
    """DiT's respacing `space_timesteps(T, str(steps))`: evenly strided from 0 to T-1, rounded as DiT rounds."""
    _check_steps(steps, num_timesteps)
    if steps == 1:  # DiT would keep only t=0 here, which cannot denoise anything; start from pure noise instead
        return [num_timesteps - 1]
    stride, pos, kept = (num_timesteps - 1) / (steps - 1), 0.0, []
    for _ in range(steps):  # accumulate like DiT (not i * stride) so that rounding ties land on the same side
        kept.append(round(pos))
        pos += stride
    return kept[::-1]


def ddim_timesteps(num_timesteps: int, steps: int) -> list:
    """diffusers' DDIMScheduler default ("leading", offset 0), which is also DiT's "ddimN" respacing."""
    _check_steps(steps, num_timesteps)
    return [i * (num_timesteps // steps) for i in range(steps)][::-1]


def dpm_solver_timesteps(num_timesteps: int, steps: int) -> list:
    """diffusers' DPMSolverMultistepScheduler "linspace" spacing: linspace(0, T-1, steps+1) rounded, minus the 0."""
    _check_steps(steps, num_timesteps - 1)  # more would round two points onto the same timestep
    points = torch.linspace(0, num_timesteps - 1, steps + 1, dtype=torch.float64).round().long()
    return points.flip(0)[:-1].tolist()


def _check_steps(steps, most):
    if not 1 <= steps <= most:
        raise ValueError(f"steps must be between 1 and {most}, got {steps}")


# ---- samplers ----
# Each takes the model function, the starting noise x (B, C, ...), the float64 alphas_cumprod table of the
# training schedule and the descending timesteps to visit. After the last timestep comes the clean image
# (alphas_cumprod = 1), so every sampler ends on its x0 prediction. Per-step coefficients are python floats
# computed in float64; x keeps the dtype of the noise.


def _predict(model_fn, x, t, learn_sigma):
    """Call the model at integer timestep t; return (eps, v) in x's dtype (v is None without learned sigma)."""
    out = model_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
    channels = x.shape[1] * (2 if learn_sigma else 1)
    if out.shape[1] != channels:
        raise ValueError(f"model output has {out.shape[1]} channels, expected {channels} (learn_sigma={learn_sigma})")
    out = out.to(x.dtype)  # the model may run under bf16 autocast
    return (out[:, : x.shape[1]], out[:, x.shape[1]:]) if learn_sigma else (out, None)


def _x0_eps(x, eps, abar, clip_x0):
    """The model's clean-image estimate x0 from eps. With clip_x0 (pixel-space models, whose data lie in [-1, 1]) x0
    is clipped and eps recomputed from it, as ADM's clip_denoised; latents are never clipped."""
    x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
    return x0, eps


def _chain(alphas_cumprod, timesteps, progress):
    """Yield (i, t, abar_t, abar_next) along the chain; abar_next belongs to the next (earlier, less noisy)
    timestep, i.e. DDPM's abar_{t-1}, and is 1 (clean) after the last step."""
    steps = range(len(timesteps))
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps)
    for i in steps:
        abar_next = float(alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        yield i, timesteps[i], float(alphas_cumprod[timesteps[i]]), abar_next


def step_noise(x, generator=None):
    """Standard normal noise shaped like x for one sampling step. `generator`: None (the global RNG), one
    torch.Generator for the batch (diffusers' convention), or a list of one CPU generator per image, so that an
    image's noise depends on its own generator only and a sharded run reproduces a single-process one bit for bit."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} per-image generators for a batch of {x.shape[0]}")
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator])  # (B, ...) on the CPU, fp32
        return noise.to(device=x.device, dtype=x.dtype)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_ddpm(model_fn, x, alphas_cumprod, timesteps, *, learn_sigma=False, generator=None, progress=False,
                clip_x0=False):
    """Ancestral sampling on the respaced chain; variance learned (v) or the fixed small posterior variance."""
    for i, t, abar, abar_prev in _chain(alphas_cumprod, timesteps, progress):
        eps, v = _predict(model_fn, x, t, learn_sigma)
        beta = 1 - abar / abar_prev  # the beta of this respaced step
        x0, eps = _x0_eps(x, eps, abar, clip_x0)
        # mean of q(x_prev | x_t, x0), with x0 from the model
        x = (math.sqrt(abar_prev) * beta / (1 - abar)) * x0 + (math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)) * x
        if i + 1 == len(timesteps):  # the last step lands on x0 exactly: no noise (and none drawn)
            break
        log_var = math.log(beta * (1 - abar_prev) / (1 - abar))  # posterior variance beta~ ("fixed small")
        if learn_sigma:  # v = -1 -> beta~, v = +1 -> beta, interpolated in log space
            std = torch.exp(0.5 * ((v + 1) / 2 * math.log(beta) + (1 - v) / 2 * log_var))
        else:
            std = math.exp(0.5 * log_var)
        x = x + std * step_noise(x, generator)
    return x


@torch.no_grad()
def sample_ddim(model_fn, x, alphas_cumprod, timesteps, *, eta=0.0, learn_sigma=False, generator=None, progress=False,
                clip_x0=False):
    """DDIM (Song et al. 2021): eta = 0 is the deterministic ODE-like sampler, eta = 1 is ancestral-like."""
    for i, t, abar, abar_prev in _chain(alphas_cumprod, timesteps, progress):
        eps, _ = _predict(model_fn, x, t, learn_sigma)
        x0, eps = _x0_eps(x, eps, abar, clip_x0)
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - sigma ** 2) * eps
        if eta > 0:  # drawn on every step (even when sigma = 0) so a shared generator stays in step with diffusers
            x = x + sigma * step_noise(x, generator)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model_fn, x, alphas_cumprod, timesteps, *, learn_sigma=False, progress=False, clip_x0=False):
    """DPM-Solver++(2M) (Lu et al. 2022) in the data-prediction form, as diffusers' multistep scheduler runs it."""
    def lam(abar):  # half log-SNR: log(alpha / sigma)
        return 0.5 * math.log(abar / (1 - abar))

    x0_prev = h_prev = None
    for i, t, abar, abar_next in _chain(alphas_cumprod, timesteps, progress):
        eps, _ = _predict(model_fn, x, t, learn_sigma)
        x0, _ = _x0_eps(x, eps, abar, clip_x0)
        if abar_next == 1.0:  # the final step goes to sigma = 0, where the first-order update is exactly x0
            return x0
        h = lam(abar_next) - lam(abar)
        # first step: first order (DDIM); then a linear extrapolation of x0 in lambda from the previous step
        d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
        x = math.sqrt((1 - abar_next) / (1 - abar)) * x - math.sqrt(abar_next) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


SAMPLERS = {"ddpm": (sample_ddpm, ddpm_timesteps), "ddim": (sample_ddim, ddim_timesteps),
            "dpm++": (sample_dpmpp_2m, dpm_solver_timesteps)}


# ---- likelihood terms of the variational bound (in bits per dimension) ----


def _normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def _discretized_gaussian_log_likelihood(x, mean, log_std):
    """log P(x) for data quantised to 256 levels in [-1, 1] under N(mean, std^2), elementwise, in nats."""
    inv_std = torch.exp(-log_std)
    upper, lower = (x - mean + 1 / 255) * inv_std, (x - mean - 1 / 255) * inv_std  # the bin is x +- 1/255
    log_cdf_upper = torch.special.log_ndtr(upper)  # the lowest bin takes all mass below it ...
    log_sf_lower = torch.special.log_ndtr(-lower)  # ... and the highest all mass above
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))


def _mean_flat(x):
    return x.flatten(1).mean(1)


# ---- the diffusion process ----


class GaussianDiffusion:
    """Forward process tables, eps-prediction training losses, and sampling (see the module docstring)."""

    def __init__(self, betas, *, learn_sigma: bool = False, loss: str = "mse", ip_gamma: float = 0.0,
                 min_snr_gamma: float = 0.0):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            # beta = 1 would be zero terminal SNR: x0 = (x - sigma * eps) / alpha then divides by zero
            raise ValueError("betas must be a 1-D schedule of >= 2 values strictly inside (0, 1) "
                             "(zero-terminal-SNR schedules are not supported with eps-prediction)")
        if loss not in ("mse", "hybrid"):
            raise ValueError(f"unknown loss {loss!r} (expected 'mse' or 'hybrid')")
        if loss == "hybrid" and not learn_sigma:
            raise ValueError("loss 'hybrid' trains the learned variance: it needs learn_sigma=True")
        if not ip_gamma >= 0:
            raise ValueError(f"ip_gamma must be >= 0, got {ip_gamma}")
        if not min_snr_gamma >= 0:
            raise ValueError(f"min_snr_gamma must be >= 0, got {min_snr_gamma}")
        self.learn_sigma, self.loss, self.ip_gamma = learn_sigma, loss, float(ip_gamma)
        self.min_snr_gamma = float(min_snr_gamma)
        self.num_timesteps = len(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)  # (T,) abar_t
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        posterior_var = betas * (1 - abar_prev) / (1 - self.alphas_cumprod)  # beta~_t, 0 at t = 0
        snr = self.alphas_cumprod / (1 - self.alphas_cumprod)  # (T,) signal-to-noise ratio of x_t
        self._tables = {  # float64 on the CPU; copies per device are made on first use
            "sqrt_abar": self.alphas_cumprod.sqrt(),
            "sqrt_one_minus_abar": (1 - self.alphas_cumprod).sqrt(),
            "posterior_coef_x0": betas * abar_prev.sqrt() / (1 - self.alphas_cumprod),
            "posterior_coef_xt": (1 - betas).sqrt() * (1 - abar_prev) / (1 - self.alphas_cumprod),
            # log beta~ with the t = 0 entry (log 0) replaced by t = 1's, as improved DDPM does
            "posterior_log_var": torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]])),
            "log_beta": torch.log(betas),
            # Min-SNR-gamma weight of the eps-MSE (Hang et al. 2023): min(SNR_t, gamma) / SNR_t, SNR = abar / (1 - abar)
            "min_snr_weight": snr.clamp(max=min_snr_gamma) / snr if min_snr_gamma > 0 else torch.ones_like(betas),
        }
        self._device_tables = {}

    def _at(self, name, t, like):
        """Gather table[t] for a batch of timesteps, shaped (B, 1, ...) to broadcast against `like`."""
        if t.device not in self._device_tables:  # MPS has no float64
            dtype = torch.float32 if t.device.type == "mps" else torch.float64
            self._device_tables[t.device] = {k: v.to(t.device, dtype) for k, v in self._tables.items()}
        values = self._device_tables[t.device][name][t]  # (B,)
        return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0, t, noise):
        """Sample x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) with the given noise."""
        return self._at("sqrt_abar", t, x0) * x0 + self._at("sqrt_one_minus_abar", t, x0) * noise

    def training_losses(self, model_fn, x0, t=None, noise=None, ip_noise=None) -> dict:
        """Per-example losses {"loss", "mse"[, "vb"]}, each (B,) float32, for model_fn(x_t, t) -> eps[, v].
        t, noise and (with ip_gamma > 0) ip_noise are drawn from the global RNG when not given."""
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        # input perturbation (Ning et al. 2023): the model sees x_t built from perturbed noise but must predict
        # the unperturbed one, which mimics the error of its own earlier steps at sampling time
        if self.ip_gamma > 0:
            model_noise = noise + self.ip_gamma * (torch.randn_like(noise) if ip_noise is None else ip_noise)
        else:
            model_noise = noise
        x_t = self.q_sample(x0, t, model_noise)  # (B, C, ...)
        out = model_fn(x_t, t)
        channels = x0.shape[1] * (2 if self.learn_sigma else 1)
        if out.shape[1] != channels:
            raise ValueError(f"model output has {out.shape[1]} channels, expected {channels} "
                             f"(learn_sigma={self.learn_sigma})")
        out = out.float()  # losses in fp32 even under bf16 autocast
        eps = out[:, : x0.shape[1]]
        mse = _mean_flat((noise.float() - eps) ** 2)
        # Min-SNR-gamma: the easy low-noise steps (SNR > gamma) weigh gamma / SNR, so they no longer pull against the
        # rest; "mse" stays the unweighted error (what the logs compare across runs)
        weighted = mse * self._at("min_snr_weight", t, mse).float() if self.min_snr_gamma > 0 else mse
        if self.loss == "mse":
            return {"loss": weighted, "mse": mse}
        vb = self._vb_bits(x0.float(), x_t.float(), t, eps.detach(), out[:, x0.shape[1]:])
        return {"loss": weighted + vb, "mse": mse, "vb": vb}

    def _vb_bits(self, x0, x_t, t, eps, v):
        """Improved-DDPM variational bound term L_t in bits/dim; eps is detached so only v learns from it."""
        log_var = (v + 1) / 2 * self._at("log_beta", t, x0) + (1 - v) / 2 * self._at("posterior_log_var", t, x0)
        x0_pred = (x_t - self._at("sqrt_one_minus_abar", t, x0) * eps) / self._at("sqrt_abar", t, x0)
        def posterior_mean(start):
            return self._at("posterior_coef_x0", t, x0) * start + self._at("posterior_coef_xt", t, x0) * x_t
        kl = _normal_kl(posterior_mean(x0), self._at("posterior_log_var", t, x0), posterior_mean(x0_pred), log_var)
        decoder_nll = -_discretized_gaussian_log_likelihood(x0, posterior_mean(x0_pred), 0.5 * log_var)
        return torch.where(t == 0, _mean_flat(decoder_nll), _mean_flat(kl)) / math.log(2.0)  # (B,)

    @torch.no_grad()
    def sample(self, model_fn, noise, *, sampler="dpm++", steps=50, eta=0.0, generator=None, progress=False,
               clip_x0=False):
        """Denoise `noise` (B, C, ...) into samples with `steps` model calls of the chosen sampler; clip_x0 clips every
        clean-image estimate to [-1, 1] (for pixel-space models; without it a few pixels can overshoot far).
        generator (ddpm, ddim with eta > 0): the per-step noise's source, see step_noise (a list = one per image)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} (expected one of {', '.join(SAMPLERS)})")
        if eta != 0 and sampler != "ddim":
            raise ValueError(f"eta only applies to the 'ddim' sampler, not {sampler!r}")
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        sample_fn, spacing = SAMPLERS[sampler]
        timesteps = spacing(self.num_timesteps, steps)
        kwargs = {"learn_sigma": self.learn_sigma, "progress": progress, "clip_x0": clip_x0}
        if sampler != "dpm++":
            kwargs["generator"] = generator
        if sampler == "ddim":
            kwargs["eta"] = eta
        return sample_fn(model_fn, noise, self.alphas_cumprod, timesteps, **kwargs)


# ---- from a train config ----

def from_config(cfg) -> GaussianDiffusion:
    """The 1000-step diffusion of a train config (DiT and LDM alike): its beta schedule (cfg.schedule), the hybrid
    (MSE + VB) loss when the variance is learned (cfg.learn_sigma) else the eps-MSE, input perturbation cfg.ip,
    the Min-SNR-gamma weighting cfg.min_snr."""
    return GaussianDiffusion(make_beta_schedule(cfg.schedule, 1000), learn_sigma=cfg.learn_sigma,
                             loss="hybrid" if cfg.learn_sigma else "mse", ip_gamma=cfg.ip, min_snr_gamma=cfg.min_snr)


# ---- classifier-free guidance ----

def cfg_model_fn(model, y, y_null, scale: float, *, learn_sigma: bool = False, guide_channels=None):
    """Wrap model(x, t, y) into fn(x, t) for the samplers, guided as eps_u + scale * (eps_c - eps_u)."""
    if scale == 1:  # guidance off: the plain conditional model, one forward pass
        return lambda x, t: model(x, t, y)
    if y_null.shape[0] == 1 and y.shape[0] != 1:
        y_null = y_null.expand(y.shape[0], *y_null.shape[1:])  # one null condition for the whole batch
    y_both = torch.cat([y, y_null])  # conditional half first, like DiT

    def fn(x, t):
        out = model(torch.cat([x, x]), torch.cat([t, t]), y_both)  # one forward on the doubled batch
        cond, uncond = out.chunk(2)
        channels = x.shape[1]
        if out.shape[1] != channels * (2 if learn_sigma else 1):
            raise ValueError(f"model output has {out.shape[1]} channels, expected "
                             f"{channels * (2 if learn_sigma else 1)} (learn_sigma={learn_sigma})")
        g = channels if guide_channels is None else guide_channels  # official DiT guides only 3 of 4 channels
        guided = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([guided, cond[:, g:]], dim=1)  # the rest (and the learned variance) from the cond half

    return fn
