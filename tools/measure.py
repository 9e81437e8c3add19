"""
One training step, measured: img/s, step time, peak memory, FLOPs per image and MFU. What `python -m tools.bench` prints
and the training rows of the GPU check (gpu_suite.py) tabulate; nothing to run here.

    r = measure("train_dit", ["--model", "DiT-XL/2", "--vae", "kl-f8", "--image-size", "256", "--batch-size", "32"])

A step is the trainer's own `trainer.train_step` (draws, CFG drop, loss, backward, optimizer step, EMA) on random
latents of the model's input shape (the VAE encode is not included: with a latent cache it is not in the loop); the model is rebuilt
through the train script's FAMILY, as evaluate.py does. FLOPs are counted by torch's FlopCounterMode on one
forward+backward (attention included where torch has a formula for its kernel: the CUDA ones, not the CPU flash
kernel), and MFU divides the achieved FLOP/s by the accelerator's dense bf16 peak.
"""
import dataclasses
import statistics
import time

import torch

from plumbing.common import Dist

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


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **_) -> int:
    """A convolution's backward: the gradient of its input and of its weight each cost its forward.

    torch's own formula ignores `groups` in the weight gradient, counting a depthwise conv's (the default DiT-T's
    Mix-FFN, groups = 512) as a dense one's, groups x too many; its forward and input-gradient counts are right.
    """
    from torch.utils.flop_counter import conv_flop_count
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def count_flops(fn) -> int:
    """FLOPs (2 per multiply-add) of running fn() once, as torch's dispatcher sees them (grouped conv backward
    corrected: conv_backward_flops)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})
    with counter:
        fn()
    return counter.get_total_flops()


def mfu_pct(flops_per_img: float, img_per_s: float, peak: float | None):
    """(achieved TFLOP/s, MFU in % of `peak` TFLOP/s or None when the peak is unknown)."""
    achieved = flops_per_img * img_per_s / 1e12
    return achieved, (100.0 * achieved / peak if peak else None)


SCRIPTS = ("train_dit", "train_ldm")                 # --script: the train script whose model and step are measured


def family(script_name: str):
    """The config.Family a train script trains (its FAMILY)."""
    import train_dit
    import train_ldm
    return {"train_dit": train_dit.FAMILY, "train_ldm": train_ldm.FAMILY}[script_name]


def synthetic_batch(cfg, device) -> tuple:
    """(x, y): a global batch of random latents of the model's input shape and random classes (or caption ids)."""
    from sources.captions import encode_prompts
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
    s = make_state(cfg, model, diffusion, Dist(device=dev))          # the trainer's own state: optimizer, EMA, compile
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
    fam = family(script_name)
    cfg = fam.resolve(parse_config(fam.config, train_argv, fam.presets))
    if not cfg.num_classes:
        cfg = dataclasses.replace(cfg, num_classes=1000 if cfg.data != "builtin" else 10)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda" if use_cuda else "cpu")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if use_cuda else "fp32")
    step, fwd_bwd_eager, model, compiled = build_step(fam, cfg, dev)
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
