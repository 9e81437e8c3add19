"""
CADS: condition-annealed sampling, one file you can copy (torch and the standard library only): the sampling-time
counterpart of CEP (cep.py). From Sadat et al., "CADS: Unleashing the Diversity of Diffusion Models through
Condition-Annealed Sampling" (ICLR 2024, arXiv 2310.17347, Sec. 3.1). At sampling time, with diffusion time
t in [0, 1] (1 = pure noise, sampling runs from 1 to 0), the clean embedding y becomes

    y_hat = sqrt(g(t)) * y + s * sqrt(1 - g(t)) * n,  n ~ N(0, I) fresh at every step
    g(t)  = 1 for t <= tau1,  (tau2 - t) / (tau2 - tau1) for tau1 < t < tau2,  0 for t >= tau2
    y_res = (y_hat - mean(y_hat)) / std(y_hat) * std(y) + mean(y)      (rescale back to y's statistics)
    y_out = psi * y_res + (1 - psi) * y_hat                             (psi = 0: no rescale)

so early (noisy) steps see a mostly random condition and late steps the clean one. We follow the paper's
definitions above; the defaults tau1 = 0.6, tau2 = 0.9, s = 0.1, psi = 1 are where its ablation (Sec. 4, Fig. 7)
puts the best FID for tau1, s and psi, with tau2 = 0.9 as the public ports carry it (they use s = 0.25 for
text-to-image; tune per model). The CFG null condition stays clean: the paper anneals the condition, and the
unconditional branch has none. Choices the paper leaves open, made explicit:
- mean and std are taken per sample, over that sample's annealed elements (for a token sequence: its real tokens
  times D), with the unbiased std (torch.std's default), so an image does not depend on the batch it is drawn in;
- where g(t) = 1 the embedding is returned untouched (bit for bit), so tau1 >= 1 is exactly the plain sampler;
- a model trained on T discrete steps maps its timestep k to t = k / (T - 1): the noisiest step is t = 1, the last
  step t = 0, whatever the sampler's spacing (diffusion time, not the fraction of steps done).

    cads = CADS(tau1=0.6, tau2=0.9, noise_scale=0.1, psi=1.0)
    with cads.sampling(model, encoder=model.cond, seeds=seeds, num_timesteps=1000):   # hooks, removed on exit
        x = sampler(lambda x, t: model(x, t, y), noise)

`sampling` hooks the condition encoder's output and reads t from the model's second argument; noise for row i of
a batch comes from a generator seeded by (seeds[i], timestep), so any image can be redrawn alone.
Run the self-check:  python cads.py
"""

import contextlib
import math
import numbers

import torch


def _check_cads(tau1, tau2, noise_scale, psi):
    for name, v in (("tau1", tau1), ("tau2", tau2), ("noise_scale", noise_scale), ("psi", psi)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"CADS {name} must be a finite number >= 0, got {v!r}")
    if tau1 > tau2:
        raise ValueError(f"CADS needs tau1 <= tau2, got tau1={tau1} and tau2={tau2}")
    if psi > 1:
        raise ValueError(f"CADS psi must be in [0, 1], got {psi}")


def cads_gamma(t, tau1=0.6, tau2=0.9):
    """The annealing schedule g(t): 1 up to tau1, linear down to 0 at tau2, 0 beyond (t: float or tensor)."""
    ramp = (tau2 - t) / (tau2 - tau1) if tau2 > tau1 else 0.0 * t
    if isinstance(t, torch.Tensor):
        return torch.where(t <= tau1, 1.0, torch.where(t >= tau2, 0.0, ramp))
    return 1.0 if t <= tau1 else 0.0 if t >= tau2 else ramp


def _stats(x, w):
    """Per-sample weighted mean and unbiased std of x (B, N) over the elements where w (B, N) is 1."""
    n = w.sum(1, keepdim=True)
    mean = (x * w).sum(1, keepdim=True) / n
    var = (((x - mean) * w) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    return mean, var.sqrt()


def anneal(emb, gamma, noise_scale=0.1, psi=1.0, mask=None, noise=None, generator=None):
    """CADS on emb (B, ..., D): y_hat from g = gamma (float or (B,)), rescaled per sample and mixed with psi.

    mask (leading dims, bool) picks what is annealed: (B,) samples, or (B, L) tokens; the rest stays exactly as it
    was. noise (emb's shape, standard normal) is drawn from generator when not given."""
    _check_cads(0.0, 0.0, noise_scale, psi)
    work = torch.float64 if emb.dtype == torch.float64 else torch.float32      # fp32 math under bf16 too
    g = torch.as_tensor(gamma, dtype=work, device=emb.device).reshape(-1, *([1] * (emb.dim() - 1)))
    if mask is None:
        mask = torch.ones(emb.shape[:1], dtype=torch.bool, device=emb.device)
    keep = mask.to(emb.device).reshape(mask.shape + (1,) * (emb.dim() - mask.dim())).expand(emb.shape)
    keep = keep & (g < 1)                                                       # g = 1: untouched, bit for bit
    if not bool(keep.any()):
        return emb
    if noise is None:
        noise = torch.randn(emb.shape, generator=generator, device=emb.device, dtype=work)
    y = emb.to(work)
    y_hat = g.sqrt() * y + noise_scale * (1 - g).sqrt() * noise.to(device=emb.device, dtype=work)
    if psi > 0:
        w = keep.reshape(len(y), -1).to(work)                                   # (B, N) the annealed elements
        mean_in, std_in = _stats(y.reshape(len(y), -1), w)
        mean_hat, std_hat = _stats(y_hat.reshape(len(y), -1), w)
        scale = std_in / std_hat.clamp(min=torch.finfo(work).tiny)
        y_res = (y_hat.reshape(len(y), -1) - mean_hat) * scale + mean_in
        y_hat = psi * y_res.reshape(y.shape) + (1 - psi) * y_hat
    return torch.where(keep, y_hat.to(emb.dtype), emb)


def _stream_seed(seed, step):
    """A generator seed for (image seed, timestep): a bijective mix, so streams differ from the image's own seed."""
    return ((int(seed) * 1_000_003 + int(step) + 1) * 0x9E3779B97F4A7C15) % 2 ** 63


class CADS:
    """Condition-annealed sampling with fixed (tau1, tau2, noise_scale, psi); see the module docstring."""

    def __init__(self, tau1=0.6, tau2=0.9, noise_scale=0.1, psi=1.0):
        _check_cads(tau1, tau2, noise_scale, psi)
        self.tau1, self.tau2, self.noise_scale, self.psi = float(tau1), float(tau2), float(noise_scale), float(psi)

    def gamma(self, t):
        return cads_gamma(t, self.tau1, self.tau2)

    def __call__(self, emb, t, mask=None, noise=None, generator=None):
        """Anneal emb at diffusion time t in [0, 1] (float or (B,) tensor)."""
        return anneal(emb, self.gamma(t), self.noise_scale, self.psi, mask, noise, generator)

    @staticmethod
    def noise_for(shape, seeds, steps, rows=None):
        """Standard normal noise (B, ...) on the CPU whose row i comes from the generator of (seeds[i % len(seeds)],
        steps[i]); rows (B,) bool, if given, skips the draws of the rows it marks False (left zero)."""
        noise = torch.zeros(shape)
        for i, k in enumerate(steps):
            if rows is None or rows[i]:
                g = torch.Generator().manual_seed(_stream_seed(seeds[i % len(seeds)], k))
                noise[i] = torch.randn(shape[1:], generator=g)
        return noise

    @contextlib.contextmanager
    def sampling(self, model, encoder, seeds, num_timesteps):
        """While inside, encoder's output is annealed at the t of model's current call (model(x, t, y, ...)).

        Rows whose condition is the encoder's null (encoder.null_like(y), when it has one) stay clean. The encoder
        may return a tensor (B, ..., D) or a tuple (tokens (B, L, D), key mask (B, L), ...); only the real tokens
        (mask True) are annealed. A batch of k * len(seeds) rows (e.g. CFG's doubled batch) maps row i to
        seeds[i % len(seeds)]."""
        seeds, now = [int(s) for s in seeds], {}

        def read_t(module, args, kwargs):
            now["t"] = args[1] if len(args) > 1 else kwargs["t"]

        def transform(module, args, out):
            y = args[0]
            if "t" not in now:
                raise ValueError("CADS: the condition encoder ran outside a call of the model, so t is unknown")
            if len(y) % len(seeds):
                raise ValueError(f"CADS: a batch of {len(y)} conditions does not fit {len(seeds)} seeds")
            steps = now["t"].reshape(-1).expand(len(y)).tolist() if now["t"].numel() == 1 else now["t"].tolist()
            gamma = self.gamma(torch.tensor(steps, dtype=torch.float64) / (num_timesteps - 1))   # (B,)
            real = torch.ones(len(y), dtype=torch.bool)
            if hasattr(module, "null_like"):                         # the CFG null condition stays clean
                real = (y != module.null_like(y)).reshape(len(y), -1).any(1).cpu()
            if not bool((real & (gamma < 1)).any()):
                return out                                           # nothing to anneal: no noise drawn
            emb, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
            mask = real.to(emb.device) if rest is None else rest[0] & real.to(emb.device)[:, None]
            noise = self.noise_for(emb.shape, seeds, steps, rows=real & (gamma < 1)).to(emb.device)
            emb = anneal(emb, gamma.to(emb.device), self.noise_scale, self.psi, mask, noise)
            return emb if rest is None else (emb, *rest)

        hooks = [model.register_forward_pre_hook(read_t, with_kwargs=True), encoder.register_forward_hook(transform)]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()

    def __repr__(self):
        return f"CADS(tau1={self.tau1:g}, tau2={self.tau2:g}, noise_scale={self.noise_scale:g}, psi={self.psi:g})"


# ---- self-check ----

if __name__ == "__main__":
    torch.manual_seed(0)
    d = 512
    cads, y = CADS(), torch.randn(4, d) * 0.3 + 0.1
    ts = (0, 0.6, 0.75, 0.9, 1)
    print(f"CADS {cads}: gamma at t = {ts}: {[round(cads.gamma(t), 3) for t in ts]}")
    out = cads(y, 0.8)
    print(f"CADS at t = 0.8: per-sample std {out.std(1).tolist()} (input {y.std(1).tolist()}), "
          f"corr with the input {torch.corrcoef(torch.stack([out.flatten(), y.flatten()]))[0, 1]:.3f}")
