"""
Benchmark one training step: img/s, step time, peak memory, FLOPs per image and MFU, for any model/batch/precision/
compile setting. Every flag the train script takes works here too (they build the same model).

    python bench.py                                                     # the tiny CPU default of train_dit.py
    python bench.py --model DiT-S/2 --image-size 32 --batch-size 32
    python bench.py --device cuda --model DiT-XL/2 --vae kl-f8 --image-size 256 --batch-size 32 --precision bf16 --compile
    python bench.py --script train_ldm --model ldm4-cin256 --vae vq-f4 --image-size 256 --batch-size 8   # the U-Net
    python bench.py --suite gpu --json gpu.json                         # the whole GPU check (gpu_suite.py)

A step here is the trainer's own `trainer.train_step` (draws, CFG drop, loss, backward, AdamW, EMA), on latents of the
model's input shape (the VAE encode is not included: with a latent cache it is not in the loop); the model is rebuilt
through registry.FAMILIES, as evaluate.py does.
FLOPs are counted by torch's FlopCounterMode on one forward+backward (so they include attention), and MFU divides
the achieved FLOP/s by the accelerator's dense bf16 peak (--peak-tflops to override).
"""
import dataclasses
import statistics
import sys
import time

import torch

from common import ArgParser, Dist, RunError

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU; the fp32 peak is used with --precision fp32 (TF32 on).
# Ordered: the PCIe / NVL parts (lower clocks) must match before the SXM names "H100" / "H200".
PEAKS = {"H100 PCIe": (756.0, 378.0), "H100 NVL": (835.0, 418.0), "H200 NVL": (835.0, 418.0),
         "H100": (989.0, 494.0), "H200": (989.0, 494.0), "A100": (312.0, 156.0), "L40S": (362.0, 183.0),
         "4090": (165.0, 82.6), "3090": (71.0, 35.6)}


def peak_tflops(device: torch.device, precision: str):
    """The card's dense peak for `precision`, or None when unknown (CPU)."""
    if device.type != "cuda":
        return None
    return datasheet_peak(torch.cuda.get_device_name(device), precision)


def datasheet_peak(name: str, precision: str = "bf16"):
    """The dense peak (TFLOP/s) of the card called `name` (first matching PEAKS key), or None when unknown."""
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


def mfu_pct(flops_per_img: float, img_per_s: float, peak: float | None):
    """(achieved TFLOP/s, MFU in % of `peak` TFLOP/s or None when the peak is unknown)."""
    achieved = flops_per_img * img_per_s / 1e12
    return achieved, (100.0 * achieved / peak if peak else None)


SCRIPTS = {"train_dit": "dit", "train_ldm": "ldm"}   # --script -> registry kind


def synthetic_batch(cfg, device) -> tuple:
    """(x, y): a global batch of random latents of the model's input shape and random classes (or caption ids)."""
    from conditions import encode_prompts
    x = torch.randn(cfg.batch_size, *cfg.latent_shape, device=device)
    if cfg.cond == "text":                                            # caption token ids, as the text loader gives
        captions = ["a large red disc at the middle of a dark background"] * cfg.batch_size
        return x, encode_prompts(cfg, captions).to(device)
    return x, torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)


def build_step(family, cfg, dev: torch.device):
    """(step(i), fwd_bwd_eager(), model, compiled): trainer.train_step on random latents; an eager one-image pass."""
    from trainer import make_state, train_step
    torch.manual_seed(0)
    model, diffusion = family.build(cfg)
    s = make_state(cfg, model, diffusion, Dist(device=dev))          # the trainer's own state: AdamW, EMA, compile
    x, y = synthetic_batch(cfg, dev)

    def step(i: int = 0):
        train_step(s, x, y, i)                                       # exactly what train() runs each step

    def fwd_bwd_eager():
        with s.autocast:
            out = model(x[:1], torch.zeros(1, dtype=torch.long, device=dev), y[:1])
        out.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    return step, fwd_bwd_eager, model, s.train_model is not model


def time_steps(step, cuda: bool, warmup: int, iters: int) -> list:
    """Seconds of each of `iters` timed step(i) calls, after `warmup` untimed ones (compile happens there)."""
    for i in range(warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        step(warmup + i)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def measure(script_name: str, train_argv: list, warmup: int = 3, iters: int = 10, peak_override: float = 0.0) -> dict:
    """Time the training step of `script_name` configured by `train_argv` (its flags); raises RunError on bad flags."""
    from config import parse_config
    from registry import FAMILIES
    family = FAMILIES[SCRIPTS[script_name]]
    cfg = family.resolve(parse_config(family.config, train_argv, family.presets))
    if not cfg.num_classes:
        cfg = dataclasses.replace(cfg, num_classes=1000 if cfg.data != "builtin" else 10)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda" if use_cuda else "cpu")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if use_cuda else "fp32")
    step, fwd_bwd_eager, model, compiled = build_step(family, cfg, dev)
    flops_per_img = count_flops(fwd_bwd_eager)  # one image, forward + backward (= 3x forward)
    times = time_steps(step, use_cuda, warmup, iters)
    dt = statistics.median(times)
    peak = peak_override or peak_tflops(dev, precision)
    B = cfg.batch_size
    achieved, mfu = mfu_pct(flops_per_img, B / dt, peak)
    return {"model": cfg.model, "params": sum(q.numel() for q in model.parameters()), "input": list(cfg.latent_shape),
            "batch": B, "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if use_cuda else "",
            "precision": precision, "compiled": compiled, "step_s": dt, "step_min_s": min(times),
            "iters": iters, "img_per_s": B / dt, "flops_per_img": flops_per_img, "tflops": achieved,
            "peak_tflops": peak, "mfu_pct": mfu,
            "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if use_cuda else None}


def main(argv=None) -> int:
    pre = ArgParser(prog="bench.py", add_help=False)
    pre.add_argument("--suite", choices=["gpu"], default=None)
    suite, rest = pre.parse_known_args(argv)
    if suite.suite == "gpu":                                  # the suite has its own flags (--json, --rows, ...)
        import gpu_suite
        return gpu_suite.main(rest, prog="bench.py --suite gpu")
    p = ArgParser(prog="bench.py", description=__doc__.split("\n\n")[0].strip(), add_help=False)
    p.add_argument("--suite", choices=["gpu"], default=None, help="run a whole suite instead (gpu: see gpu_suite.py)")
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
    try:
        r = measure(args.script, rest, args.warmup, args.iters, args.peak_tflops)
    except RunError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{r['model']} | {r['params'] / 1e6:.1f}M params | input {tuple(r['input'])} | batch {r['batch']} | "
          f"{r['device']}{' ' + r['gpu'] if r['gpu'] else ''} | {r['precision']}{' compiled' if r['compiled'] else ''}")
    mfu = f"{r['mfu_pct']:.1f}%" if r["mfu_pct"] is not None else "n/a (unknown peak; --peak-tflops)"
    print(f"step {r['step_s'] * 1000:.1f} ms (median of {r['iters']}, min {r['step_min_s'] * 1000:.1f}) | "
          f"{r['img_per_s']:.1f} img/s | {r['flops_per_img'] / 3 / 1e9:.2f} GFLOP fwd/img | "
          f"{r['tflops']:.2f} TFLOP/s | "
          f"MFU {mfu}" + (f" | peak mem {r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
