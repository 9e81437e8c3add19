"""
denoise_probe.py: how well a built-in checkpoint's denoiser recovers real items, shape by shape, noise level by level.

A sample is only as good as the denoiser at every noise level the sampler passes through, and a mean loss hides where
a model falls short. The probe takes fresh real items of each shape (seed SHAPE_SEED + 2, disjoint from the training
sets and from scoring/shapes.py's banks), noises each to log-SNR λ = log(α²/σ²) (the step of the checkpoint's own
schedule closest to λ, so models trained on different schedules are compared at the same noise), asks the model for ε
(EMA weights, conditioned on the item's class, no guidance) and reports the RMS error of the implied clean image
x̂0 = (x_t − σ ε̂) / α in [-1, 1] pixel units. A model that predicts ε̂ = 0 scores exactly σ/α · rms(ε).

    python -m tools.denoise_probe runs/dit/last.pt [more checkpoints] [--num 256] [--log-snr 4,2,0,-2,-4]
"""
import sys

import torch

import diffusion as D
import evaluate
from plumbing.common import ArgParser
from scoring.shapes import SHAPE_SEED, items_of_shape
from sources.builtin import BUILTIN_SHAPES
from sources.folders import to_tensor

LOG_SNRS = (4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0)


def probe_items(image_size: int, shape: str, num: int):
    """(x0 (num, 3, S, S) in [-1, 1], labels (num,)): fresh real items of `shape`, every colour in turn."""
    images, labels = items_of_shape(image_size, shape, num, SHAPE_SEED + 2)
    return to_tensor(images), torch.from_numpy(labels)


@torch.no_grad()
def x0_errors(model, diffusion, x0, labels, log_snrs=LOG_SNRS, seed: int = 0) -> list[float]:
    """RMS error of the model's x̂0 at each log-SNR (one shared noise draw per level, from `seed`)."""
    abar = diffusion.alphas_cumprod
    schedule_log_snr = (abar / (1 - abar)).log()                                 # (T,) decreasing in t
    g, errors = torch.Generator().manual_seed(seed), []
    for lam in log_snrs:
        t = int((schedule_log_snr - lam).abs().argmin())                         # the closest step of this schedule
        if not abs(float(schedule_log_snr[t]) - lam) <= 0.5:                      # also refuses nan
            raise ValueError(f"log-SNR {lam:g} is outside this schedule's {float(schedule_log_snr[-1]):.1f} .. "
                             f"{float(schedule_log_snr[0]):.1f}")
        steps = torch.full((len(x0),), t)
        xt = diffusion.q_sample(x0, steps, torch.randn(x0.shape, generator=g))  # (N, C, H, W)
        eps_hat = model(xt, steps, labels)[:, :x0.shape[1]]                       # learned-σ models: the ε half
        x0_hat, _ = D._x0_eps(xt, eps_hat, float(abar[t]), clip_x0=False)         # unclipped: the model's own estimate
        errors.append(float((x0_hat - x0).pow(2).mean().sqrt()))
    return errors


def main(argv=None) -> int:
    """Print one row per checkpoint and shape: x̂0 RMS error at each log-SNR."""
    p = ArgParser(prog="python -m tools.denoise_probe", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("ckpt", nargs="+", help="checkpoints trained on the built-in data (class-conditional, in pixels)")
    p.add_argument("--num", type=int, default=256, help="real items per shape")
    p.add_argument("--log-snr", default=",".join(f"{v:g}" for v in LOG_SNRS), help="comma-separated log-SNR levels")
    args = p.parse_args(argv)
    try:
        log_snrs = [float(v) for v in args.log_snr.split(",")]
    except ValueError:
        p.error(f"--log-snr: not a list of numbers: {args.log_snr!r}")
    if args.num < 1:
        p.error(f"--num must be positive, got {args.num}")
    header = "x0 RMS error by log-SNR  " + "  ".join(f"{v:>6g}" for v in log_snrs)
    for path in args.ckpt:
        try:
            model, diffusion, cfg, _ = evaluate.load_model(path)
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
        if cfg.data != "builtin" or cfg.cond != "class" or cfg.vae != "none":
            p.error(f"{path}: not a class-conditional pixel-space model of the built-in data")
        rows = []
        for shape in BUILTIN_SHAPES:
            x0, labels = probe_items(cfg.image_size, shape, args.num)
            try:
                errors = x0_errors(model, diffusion, x0, labels, log_snrs)
            except ValueError as e:
                p.error(f"{path}: {e}")
            rows.append(f"{path} {shape:>5}  " + "  ".join(f"{e:6.3f}" for e in errors))
        print("\n".join(([header] if header else []) + rows), flush=True)          # the header once, before row 1
        header = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
