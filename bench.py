"""
Benchmark one training step: img/s, step time, peak memory, FLOPs per image and MFU, for any model/batch/precision/
compile setting. Every flag the train script takes works here too (they build the same model).

    python bench.py                                                     # the tiny CPU default of train_dit.py
    python bench.py --model DiT-S/2 --image-size 32 --batch-size 32
    python bench.py --device cuda --model DiT-XL/2 --vae kl-f8 --image-size 256 --batch-size 32 --precision bf16 --compile
    python bench.py --script train_ldm --model ldm4-cin256 ...          # the U-Net (once train_ldm.py exists)

A step here is the trainer's own `trainer.train_step` (draws, CFG drop, loss, backward, AdamW, EMA), on latents of the
model's input shape (the VAE encode is not included: with a latent cache it is not in the loop); the model is rebuilt
through registry.FAMILIES, as evaluate.py does.
FLOPs are counted by torch's FlopCounterMode on one forward+backward (so they include attention), and MFU divides
the achieved FLOP/s by the accelerator's dense bf16 peak (--peak-tflops to override).
"""
import argparse
import dataclasses
import statistics
import sys
import time

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU; the fp32 peak is used with --precision fp32 (TF32 on).
PEAKS = {"H100": (989.0, 494.0), "H200": (989.0, 494.0), "A100": (312.0, 156.0), "L40S": (362.0, 183.0),
         "4090": (165.0, 82.6), "3090": (71.0, 35.6)}


def peak_tflops(device: torch.device, precision: str):
    """The card's dense peak for `precision`, or None when unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in PEAKS.items():
        if key in name:
            return bf16 if precision == "bf16" else tf32
    return None


def count_flops(fn) -> int:
    """FLOPs (2 per multiply-add) of running fn() once, as torch's dispatcher sees them."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


SCRIPTS = {"train_dit": "dit", "train_ldm": "ldm"}   # --script -> registry kind


def synthetic_batch(cfg, device) -> tuple:
    """(x, y): a global batch of random latents of the model's input shape and random classes (or caption ids)."""
    from conditions import encode_prompts
    x = torch.randn(cfg.batch_size, *cfg.latent_shape, device=device)
    if cfg.cond == "text":                                            # caption token ids, as the text loader gives
        return x, encode_prompts(cfg, ["a large red disc at the middle of a dark background"] * cfg.batch_size).to(device)
    return x, torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)


def time_steps(s, x, y, warmup: int, iters: int) -> list:
    """Seconds of each of `iters` timed trainer.train_step calls, after `warmup` untimed ones (compile happens there)."""
    from trainer import train_step
    cuda = s.d.device.type == "cuda"
    for i in range(warmup):
        train_step(s, x, y, i)                                       # exactly what train() runs each step
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(s.d.device)
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        train_step(s, x, y, warmup + i)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), add_help=False)
    p.add_argument("--script", default="train_dit", choices=list(SCRIPTS), help="which model family")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compile happens here)")
    p.add_argument("--iters", type=int, default=10, help="timed steps")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the accelerator peak for MFU")
    p.add_argument("-h", "--help", action="store_true")
    args, rest = p.parse_known_args(argv)
    if args.help:
        p.print_help()
        print("\nAll flags of the train script are accepted; see python", args.script + ".py --help")
        return 0
    from common import Dist, RunError
    from config import parse_config
    from registry import FAMILIES
    from trainer import make_state
    family = FAMILIES[SCRIPTS[args.script]]
    try:
        cfg = family.resolve(parse_config(family.config, rest, family.presets))
    except RunError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    if not cfg.num_classes:
        cfg = dataclasses.replace(cfg, num_classes=1000 if cfg.data != "builtin" else 10)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda" if use_cuda else "cpu")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if use_cuda else "fp32")
    torch.manual_seed(0)
    model, diffusion = family.build(cfg)
    s = make_state(cfg, model, diffusion, Dist(device=dev))          # the trainer's own state: AdamW, EMA, compile
    x, y = synthetic_batch(cfg, dev)

    def fwd_bwd_eager():
        with s.autocast:
            out = model(x[:1], torch.zeros(1, dtype=torch.long, device=dev), y[:1])
        out.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    flops_per_img = count_flops(fwd_bwd_eager)  # one image, forward + backward (= 3x forward)
    times = time_steps(s, x, y, args.warmup, args.iters)
    dt, B = statistics.median(times), cfg.batch_size
    n_params = sum(q.numel() for q in model.parameters())
    peak = args.peak_tflops or peak_tflops(dev, precision)
    achieved = flops_per_img * B / dt / 1e12
    print(f"{cfg.model} | {n_params / 1e6:.1f}M params | input {cfg.latent_shape} | batch {B} | {dev}"
          f"{' ' + torch.cuda.get_device_name(dev) if use_cuda else ''} | {precision}"
          f"{' compiled' if s.train_model is not model else ''}")
    print(f"step {dt * 1000:.1f} ms (median of {args.iters}, min {min(times) * 1000:.1f}) | {B / dt:.1f} img/s | "
          f"{flops_per_img / 3 / 1e9:.2f} GFLOP fwd/img | {achieved:.2f} TFLOP/s | "
          f"MFU {f'{100 * achieved / peak:.1f}%' if peak else 'n/a (unknown peak; --peak-tflops)'}"
          + (f" | peak mem {torch.cuda.max_memory_allocated(dev) / 2 ** 30:.2f} GiB" if use_cuda else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
