"""
Benchmark one training step: img/s, step time, peak memory, FLOPs per image and MFU, for any model/batch/precision/
compile setting. Every flag the train script takes works here too (they build the same model).

    python -m tools.bench                                                     # the tiny CPU default of train_dit.py
    python -m tools.bench --model DiT-S/2 --image-size 32 --batch-size 32
    python -m tools.bench --device cuda --model DiT-XL/2 --vae kl-f8 --image-size 256 --batch-size 32 --precision bf16 --compile
    python -m tools.bench --script train_ldm --model ldm4-cin256 --vae vq-f4 --image-size 256 --batch-size 8   # the U-Net

A step here is the trainer's own `trainer.train_step` (draws, CFG drop, loss, backward, optimizer step, EMA), timed
by measure.py on latents of the model's input shape; FLOPs come from torch's FlopCounterMode on one forward+backward, and
MFU divides the achieved FLOP/s by the accelerator's dense bf16 peak (--peak-tflops to override).
"""
import sys

from plumbing.common import ArgParser, RunError
from tools.measure import SCRIPTS, measure


def main(argv=None) -> int:
    p = ArgParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0].strip(), add_help=False)
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
        print(f"python -m tools.bench: error: {e}", file=sys.stderr)
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
