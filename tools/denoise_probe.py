"""
denoise_probe.py: how well a built-in checkpoint's denoiser recovers real items, shape by shape, noise level by level.

A sample is only as good as the denoiser at every noise level the sampler passes through, and a mean loss hides where
a model falls short. The probe takes fresh real items of each shape (seed SHAPE_SEED + 2, disjoint from the training
sets and from scoring/shapes.py's banks), noises each to log-SNR λ = log(α²/σ²) (the step of the checkpoint's own
schedule closest to λ, so models trained on different schedules are compared at the same noise), asks the model for ε
(EMA weights, conditioned on the item's class, no guidance) and reports the RMS error of the implied clean image
x̂0 = (x_t − σ ε̂) / α in [-1, 1] pixel units. A model that predicts ε̂ = 0 scores exactly σ/α · rms(ε).

    python -m tools.denoise_probe runs/dit/last.pt [more checkpoints] [--num 256] [--log-snr 4,2,0,-2,-4]

--restore 999,400,200,100 asks the whole sampler instead: the same real items noised to each start step t0 are sampled
back to t = 0 (DDIM, 40 steps, guidance 2, x̂0 clipped as the grids are) and scored by scoring/shapes.py's shape IoU.
From t0 = 999 that is sampling from noise; the t0 where the score falls towards it is where a model loses its shapes.
"""
import sys

import torch

import diffusion as D
import evaluate
from plumbing.common import ArgParser
from scoring.shapes import SHAPE_SEED, items_of_shape, shape_iou
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
    schedule_log_snr = D.log_snr(abar)                                           # (T,) decreasing in t
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


@torch.no_grad()
def restored_iou(model, diffusion, x0, labels, start_steps, scale: float = 2.0, steps: int = 40,
                 seed: int = 0) -> list[float]:
    """Mean shape IoU of the items x0 (N, 3, S, S) of one shape after noising them to each start step t0 (one shared
    noise draw) and sampling back to t = 0 with DDIM (about `steps` steps from t0, guidance `scale`)."""
    fn = D.cfg_model_fn(model, labels, model.cond.null_like(labels), scale, learn_sigma=diffusion.learn_sigma)
    noise, scores = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)), []
    for t0 in start_steps:
        chain = sorted({round(t0 * (1 - i / (steps - 1))) for i in range(steps)}, reverse=True)   # t0 .. 0
        xt = diffusion.q_sample(x0, torch.full((len(x0),), t0), noise)
        x = D.sample_ddim(fn, xt, diffusion.alphas_cumprod, chain, learn_sigma=diffusion.learn_sigma,
                          clip_x0=True)                                                         # (N, 3, S, S)
        images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        scores.append(next(iter(shape_iou(images, labels.numpy()).values())))   # the one shape of x0
    return scores


def main(argv=None) -> int:
    """Print one row per checkpoint and shape: x̂0 RMS error at each log-SNR (or, with --restore, shape IoU)."""
    p = ArgParser(prog="python -m tools.denoise_probe", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("ckpt", nargs="+", help="checkpoints trained on the built-in data (class-conditional, in pixels)")
    p.add_argument("--num", type=int, default=256, help="real items per shape")
    p.add_argument("--log-snr", default=",".join(f"{v:g}" for v in LOG_SNRS), help="comma-separated log-SNR levels")
    p.add_argument("--restore", default="", help="instead: comma-separated start steps t0, each sampled back to 0 and "
                   "scored by shape IoU (e.g. 999,400,200,100)")
    args = p.parse_args(argv)
    try:
        log_snrs = [float(v) for v in args.log_snr.split(",")]
        starts = [int(v) for v in args.restore.split(",")] if args.restore else []
    except ValueError:
        p.error(f"--log-snr / --restore: not a list of numbers: {args.log_snr!r} / {args.restore!r}")
    if args.num < 1:
        p.error(f"--num must be positive, got {args.num}")
    header = (f"shape IoU restored from t0 " + "  ".join(f"{v:>6d}" for v in starts) if starts else
              "x0 RMS error by log-SNR  " + "  ".join(f"{v:>6g}" for v in log_snrs))
    for path in args.ckpt:
        try:
            model, diffusion, cfg, _ = evaluate.load_model(path)
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
        if cfg.data != "builtin" or cfg.cond != "class" or cfg.vae != "none":
            p.error(f"{path}: not a class-conditional pixel-space model of the built-in data")
        if starts and not all(0 < t0 < diffusion.num_timesteps for t0 in starts):
            p.error(f"--restore: start steps must be in 1 .. {diffusion.num_timesteps - 1}, got {args.restore}")
        if starts and cfg.class_dropout == 0:
            p.error(f"{path}: --restore samples with guidance 2, and this model has no null class (--class-dropout 0)")
        rows = []
        for shape in BUILTIN_SHAPES:
            x0, labels = probe_items(cfg.image_size, shape, args.num)
            try:
                values = (restored_iou(model, diffusion, x0, labels, starts) if starts else
                          x0_errors(model, diffusion, x0, labels, log_snrs))
            except ValueError as e:
                p.error(f"{path}: {e}")
            rows.append(f"{path} {shape:>5}  " + "  ".join(f"{e:6.3f}" for e in values))
        print("\n".join(([header] if header else []) + rows), flush=True)          # the header once, before row 1
        header = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
