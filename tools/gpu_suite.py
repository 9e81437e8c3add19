"""
gpu_suite.py: nanoCEP's one prepared GPU check. It runs the CUDA tests, times the training, sampling, encoding and
loading paths at paper scale on one GPU, and prints one table (card, torch version, measured bf16 matmul peak, MFU).

    python -m tools.gpu_suite                                   # everything, < 8 min on one H100/H200
    python -m tools.gpu_suite --json gpu.json --log gpu.log     # also save the table (JSON) and every row's output
    python -m tools.gpu_suite --rows dit-b128,ldm-b64           # some rows only (e.g. those a first run ran out of)
    python -m tools.gpu_suite --help

Rows (run in RUN_ORDER, shown in ROWS order). Each runs in its own subprocess under its own time budget, so a crash,
an out-of-memory or a hang costs that row only: its cell shows the one-line error and the suite goes on; the whole
suite stops starting rows when --budget is spent. Weights are random (throughput does not depend on them), and nothing
is downloaded.
  matmul    bf16 8192^3 matmul through torch, median of 20 on random data: the "measured" peak for MFU
  tests     `pytest -m gpu tests/test_gpu.py`, summarised (passed / failed / skipped and the failing names)
  dit-bN    DiT-XL/2 at 256^2 (32x32x4 KL-f8 latents) training step, bf16 + torch.compile, per-GPU batch N
            (measure.measure: the trainer's step with fused AdamW and the EMA update; FLOPs from FlopCounterMode)
  ldm-b64   LDM-4 cin256-v2 U-Net (64x64x3 VQ-f4 latents) training step, bf16 + compile, batch 64
  sample    DiT-XL/2 DPM-Solver++ 50 steps with CFG (100 network evaluations per sample) and the KL-f8 decode, bf16,
            batch 256, through evaluate.make_sample_fn as `evaluate.py` runs it; and what 50K samples take on 8 GPUs
  encode    KL-f8 encode at 256^2 with bf16 weights, batch 64 (32 images + their mirrors, as latents.py encodes them)
  loader    latents.bench_loader on a synthetic 8192-item KL-f8 cache with the trainer's worker count; it must
            deliver >= 2x the fastest measured DiT-XL/2 training rate (the cache is in the page cache: CPU path only)

MFU = FLOPs per image x img/s over a peak: the card's datasheet dense bf16 peak (measure.PEAKS; unknown cards show only
the measured one) and the matmul row's measured peak. On a machine without CUDA the command exits 2.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch

from tools import measure
from plumbing.common import ArgParser, atomic_open, one_line

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root
DIT_XL = ["--model", "DiT-XL/2", "--learn-sigma", "--grad-clip", "0", "--optimizer", "adamw",
          "--vae", "kl-f8", "--image-size", "256", "--num-classes", "1000",
          "--precision", "bf16", "--compile", "--device", "cuda"]
LDM4 = ["--model", "ldm4-cin256", "--vae", "vq-f4", "--image-size", "256", "--num-classes", "1000",
        "--precision", "bf16", "--compile", "--device", "cuda"]
SAMPLE_BATCH, SAMPLE_STEPS, SAMPLE_CFG = 256, 50, 1.5
ENCODE_BATCH = 64
LOADER_ITEMS, LOADER_BATCH, LOADER_STEPS = 8192, 128, 60
IMAGENET_TRAIN = 1_281_167


# ----------------------------------------------------------------------------------------------------------------------
# Rows: each returns a dict of plain numbers (run in a child process, on the GPU)

def row_matmul(opts) -> dict:
    """bf16 (n, n) @ (n, n) on random data, two input pairs in turn (no cache reuse), CUDA-event timed."""
    n, reps = 8192, 20
    pairs = [(torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
              torch.randn(n, n, device="cuda", dtype=torch.bfloat16)) for _ in range(2)]
    for a, b in pairs * 2:                                   # warm-up: cuBLAS handle, heuristics, clocks
        a @ b
    times = []
    for i in range(reps):
        a, b = pairs[i % 2]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return {"tflops": 2 * n ** 3 / statistics.median(times) / 1e12, "n": n, "reps": reps}


def row_tests(opts) -> dict:
    """pytest -m gpu on tests/test_gpu.py; the counts and properties come from its JUnit XML."""
    import xml.etree.ElementTree as ET
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider",
               f"--junitxml={xml_path}", "-o", "junit_family=xunit1"]        # xunit1 keeps the record_property's
        proc = subprocess.run(cmd, cwd=HERE)
        if not os.path.isfile(xml_path):
            raise RuntimeError(f"pytest exited {proc.returncode} without a report")
        root = ET.parse(xml_path).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failing, props = [], {}
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failing.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
        for prop in case.iter("property"):
            props[prop.get("name")] = prop.get("value")
    return {**counts, "failing": failing, "properties": props, "exit_code": proc.returncode}


def row_train(script: str, argv: list):
    """A training-step row: measure.measure of `script` with `argv` (its own train flags)."""
    def run(opts) -> dict:
        return measure.measure(script, argv, warmup=opts.warmup, iters=opts.iters)
    return run


def row_sample(opts) -> dict:
    """DiT-XL/2 CFG sampling of one batch with a random-weight KL-f8 decoder (fp32 weights, as evaluate.py has them)."""
    from weights import vae
    ae = vae.build_vae("kl-f8").to("cuda").eval().requires_grad_(False)
    return sample_throughput(DIT_XL, ae, torch.device("cuda"), SAMPLE_BATCH, SAMPLE_STEPS)


def sample_throughput(train_argv: list, ae, dev: torch.device, batch: int, steps: int) -> dict:
    """Samples/s of one batch through evaluate.make_sample_fn (DPM-Solver++, CFG, bf16 autocast, decode, uint8)."""
    import numpy as np

    import evaluate
    from config import parse_config
    dit = evaluate.families()["dit"]
    cfg = parse_config(dit.config, train_argv)
    torch.manual_seed(0)
    model, diffusion = dit.build(cfg)
    model.to(dev).eval().requires_grad_(False)
    shape = cfg.latent_shape
    labels, seeds = np.arange(batch) % cfg.num_classes, list(range(batch))
    cuda = dev.type == "cuda"

    def sampler(n_steps):
        return evaluate.make_sample_fn(model, diffusion, shape, ae.decode, dev, "dpm++", n_steps, cuda,  # bf16 on GPU
                                       learn_sigma=cfg.learn_sigma)

    sampler(2)(labels, seeds, SAMPLE_CFG)                    # warm-up: cuBLAS / cuDNN choices at these shapes
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    sampler(steps)(labels, seeds, SAMPLE_CFG)                # returns uint8 on the host: synchronised
    seconds = time.perf_counter() - t0
    rate = batch / seconds
    return {"samples_per_s": rate, "seconds": seconds, "batch": batch, "steps": steps,
            "flops_per_sample": sample_flops(model, ae, shape, dev, steps),
            "minutes_50k_on_8": 50_000 / (8 * rate) / 60,
            "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if cuda else None}


def sample_flops(model, ae, shape, dev: torch.device, steps: int) -> float:
    """FLOPs of one CFG sample: 2 x steps forwards of one image (CFG doubles the batch), plus one decode."""
    x = torch.randn(1, *shape, device=dev)
    t, y = torch.zeros(1, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        forward = measure.count_flops(lambda: model(x, t, y))
        decode = measure.count_flops(lambda: ae.decode(x))
    return 2 * steps * forward + decode


def row_encode(opts) -> dict:
    """KL-f8 encode img/s at 256^2, bf16 weights (latents.py --precision bf16), batch = 32 images + mirrors."""
    from weights import vae
    rate = vae.bench("kl-f8", 256, batch=ENCODE_BATCH, steps=10, device="cuda", dtype=torch.bfloat16, what="encode")
    return {"img_per_s": rate, "batch": ENCODE_BATCH,
            "minutes_imagenet_on_8": 2 * IMAGENET_TRAIN / (8 * rate) / 60}   # both flips of every image


def synthetic_cache(path: str, n: int) -> None:
    """A complete KL-f8 256^2 latent cache of n items with random float16 moments, via latents.py's own metadata."""
    import numpy as np

    import data
    from weights import latents
    from weights import vae
    ds = data.build_dataset("builtin", 256, builtin_length=n)
    meta = latents.cache_meta(ds, vae.build_vae("kl-f8"), "float16")
    latents.prepare_cache(path, meta, ds)
    lat = np.lib.format.open_memmap(os.path.join(path, "latents.npy"), mode="r+")
    rng = np.random.default_rng(0)
    for a in range(0, n, 1024):
        lat[a:a + 1024] = rng.standard_normal(lat[a:a + 1024].shape, dtype=np.float32).astype(np.float16)
    lat.flush()
    done = np.lib.format.open_memmap(os.path.join(path, "done.npy"), mode="r+")
    done[:] = 1
    done.flush()
    latents._write_json(os.path.join(path, "meta.json"), {**meta, "complete": True})


def row_loader(opts) -> dict:
    """Loader img/s from a synthetic cache, with the trainer's GPU worker count (trainer.train's -1 = auto)."""
    return loader_throughput(LOADER_ITEMS, LOADER_BATCH, LOADER_STEPS, workers=min(8, os.cpu_count() or 1))


def loader_throughput(items: int, batch: int, steps: int, workers: int) -> dict:
    """latents.bench_loader (StepSampler -> DataLoader -> posterior_sample) on a fresh synthetic cache of `items`."""
    from weights import latents
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cache")
        synthetic_cache(path, items)
        rate = latents.bench_loader(path, batch, steps, num_workers=workers)
    return {"img_per_s": rate, "workers": workers, "batch": batch, "items": items}


@dataclass
class Row:
    title: str
    budget_s: int          # the most this row may take (compile included) before it is killed
    run: object            # fn(opts) -> dict, called in the child process


TRAIN = {   # training rows: (train script, its flags)
    "dit-b32": ("train_dit", DIT_XL + ["--batch-size", "32"]),
    "dit-b64": ("train_dit", DIT_XL + ["--batch-size", "64"]),
    "dit-b128": ("train_dit", DIT_XL + ["--batch-size", "128"]),
    "ldm-b64": ("train_ldm", LDM4 + ["--batch-size", "64"]),
}
ROWS = {   # display order; budgets are guesses until a GPU run (compile dominates the training rows)
    "matmul": Row("bf16 matmul 8192^3 (measured peak)", 30, row_matmul),
    "tests": Row("pytest -m gpu (tests/test_gpu.py)", 110, row_tests),
    "dit-b32": Row("DiT-XL/2 256^2 train, batch 32", 130, row_train(*TRAIN["dit-b32"])),
    "dit-b64": Row("DiT-XL/2 256^2 train, batch 64", 100, row_train(*TRAIN["dit-b64"])),
    "dit-b128": Row("DiT-XL/2 256^2 train, batch 128", 100, row_train(*TRAIN["dit-b128"])),
    "ldm-b64": Row("LDM-4 cin256-v2 train, batch 64", 130, row_train(*TRAIN["ldm-b64"])),
    "sample": Row("DiT-XL/2 DPM++ 50 + CFG, batch 256", 75, row_sample),
    "encode": Row("KL-f8 encode 256^2 bf16, batch 64", 40, row_encode),
    "loader": Row("latent-cache loader (>= 2x training)", 45, row_loader),
}
# Cheap rows first, so that a run whose compiles are slow still reports them; then the headline training rows.
RUN_ORDER = ["matmul", "encode", "loader", "sample", "tests", "dit-b32", "dit-b128", "ldm-b64", "dit-b64"]


# ----------------------------------------------------------------------------------------------------------------------
# The parent: one child process per row, under a time budget

def spawn(cmd: list, timeout: float, log=None) -> dict:
    """Run one row's child `cmd` (+ --result FILE) for at most `timeout` s: {"result"} or {"error"}, and "seconds"."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        proc = subprocess.Popen(cmd + ["--result", out_path], cwd=HERE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)          # its own process group: a timeout kills it all
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:                            # it ended just now
                pass
            try:
                output, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:                     # a grandchild's own process session holds the pipe
                output = ""
        result = None
        if os.path.isfile(out_path):
            with open(out_path) as f:
                result = json.load(f)
    seconds = time.perf_counter() - t0
    if log is not None:
        log.write(f"===== {' '.join(cmd)} ({seconds:.0f} s, exit {proc.returncode})\n{output}\n")
        log.flush()
    if timed_out:
        return {"error": f"timeout: over its {timeout:.0f} s budget", "timeout": True, "seconds": seconds}
    if isinstance(result, dict) and "error" not in result and proc.returncode == 0:
        return {"result": result, "seconds": seconds}
    if isinstance(result, dict) and result.get("error"):
        return {"error": result["error"], "seconds": seconds}
    lines = [ln.strip() for ln in (output or "").splitlines() if ln.strip()]
    why = lines[-1] if lines else f"exited {proc.returncode} with no output"
    if proc.returncode is not None and proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}" + (f" ({why})" if lines else "")
    return {"error": why, "seconds": seconds}


def run_child(name: str, result_path: str, opts) -> int:
    """Child mode: run one row and write its dict (or {"error": one line}) to result_path."""
    try:
        result, rc = ROWS[name].run(opts), 0
    except Exception as e:  # noqa: BLE001  (the parent shows the one line; the traceback goes to the log)
        traceback.print_exc()
        result, rc = {"error": f"{type(e).__name__}: {one_line(e)}"}, 1
    write_json(result_path, result)
    return rc


def run_rows(names: list, opts, log=None, on_row=None) -> dict:
    """{name: record} for the selected rows, in RUN_ORDER, each under min(its budget, what is left of opts.budget)."""
    deadline = time.perf_counter() + opts.budget
    records = {}
    todo = [n for n in RUN_ORDER if n in names]
    for i, name in enumerate(todo, 1):
        left = deadline - time.perf_counter()
        slow = [o for o, r in records.items() if r.get("timeout") and r.get("full_budget") and o in TRAIN
                and name in TRAIN and TRAIN[o][0] == TRAIN[name][0]]   # that model's compile outlasted a whole budget
        if left < 10 or slow:
            why = f"{slow[0]} of the same model timed out" if slow else "the suite's --budget is spent"
            records[name] = {"error": f"skipped: {why}", "skipped": True, "seconds": 0.0}
        else:
            cmd = [sys.executable, "-m", "tools.gpu_suite", "--row", name,
                   "--iters", str(opts.iters), "--warmup", str(opts.warmup)]
            records[name] = spawn(cmd, min(ROWS[name].budget_s, left), log)
            records[name]["full_budget"] = ROWS[name].budget_s <= left
        rec = records[name]
        print(f"[{i}/{len(todo)}] {name}: {'ok' if 'result' in rec else rec['error']} ({rec['seconds']:.0f} s)",
              flush=True)
        if on_row is not None:
            on_row(records)
    return records


# ----------------------------------------------------------------------------------------------------------------------
# The table

COLUMNS = ("row", "status", "throughput", "step", "mem GiB", "TFLOP/s", "MFU sheet", "MFU meas", "note")
TARGET_MFU = {"dit": 55.0, "ldm": 45.0}                     # a training row's MFU goal (% of the sheet peak)


def pct(value) -> str:
    return "-" if value is None else f"{value:.1f}%"


def mfu_cells(flops: float, rate: float, sheet, measured) -> dict:
    """TFLOP/s and MFU against the datasheet and the measured matmul peak (either may be None)."""
    achieved, mfu_sheet = measure.mfu_pct(flops, rate, sheet)
    _, mfu_meas = measure.mfu_pct(flops, rate, measured)
    return {"TFLOP/s": f"{achieved:.0f}", "MFU sheet": pct(mfu_sheet), "MFU meas": pct(mfu_meas)}


def best_training_rate(records: dict):
    """(img/s, row name) of the fastest DiT-XL/2 training row that ran, or (None, None)."""
    rates = [(r["result"]["img_per_s"], n) for n, r in records.items() if n.startswith("dit-") and "result" in r]
    return max(rates) if rates else (None, None)


def result_cells(name: str, res: dict, sheet, measured, records: dict) -> dict:
    """The table cells of a row that ran; the status is 'ok' unless the row's own check failed ('FAIL')."""
    c = {"status": "ok"}
    if name == "matmul":
        c.update({"TFLOP/s": f"{res['tflops']:.0f}", "MFU sheet": pct(100 * res["tflops"] / sheet) if sheet else "-",
                  "note": f"{res['n']}^3, median of {res['reps']}, random data"})
    elif name == "tests":
        c.update({"status": "ok" if res["failed"] == 0 and res["passed"] > 0 else "FAIL",
                  "throughput": f"{res['passed']} passed",
                  "note": f"{res['failed']} failed, {res['skipped']} skipped"
                          + (f" ({', '.join(res['failing'][:4])})" if res["failing"] else "")
                          + "".join(f"; {k}={v}" for k, v in sorted(res.get("properties", {}).items()))})
    elif name in TRAIN:
        target = TARGET_MFU[name.split("-")[0]]
        c.update({"throughput": f"{res['img_per_s']:,.0f} img/s", "step": f"{res['step_s'] * 1e3:.1f} ms",
                  "mem GiB": f"{res['peak_mem_gib']:.1f}" if res["peak_mem_gib"] is not None else "-",
                  **mfu_cells(res["flops_per_img"], res["img_per_s"], sheet, measured),
                  "note": f"{res['flops_per_img'] / 1e9:.0f} GFLOP/img fwd+bwd, {res['params'] / 1e6:.0f}M params, "
                          f"target >= {target:.0f}% of sheet"})
    elif name == "sample":
        c.update({"throughput": f"{res['samples_per_s']:.1f} samples/s", "step": f"{res['seconds']:.1f} s/batch",
                  "mem GiB": f"{res['peak_mem_gib']:.1f}" if res["peak_mem_gib"] is not None else "-",
                  **mfu_cells(res["flops_per_sample"], res["samples_per_s"], sheet, measured),
                  "note": f"50K samples on 8 GPUs: {res['minutes_50k_on_8']:.1f} min (target <= 10)"})
    elif name == "encode":
        c.update({"throughput": f"{res['img_per_s']:,.0f} img/s",
                  "note": f"ImageNet-1K cache (both flips) on 8 GPUs: {res['minutes_imagenet_on_8']:.1f} min"})
    elif name == "loader":
        need, row = best_training_rate(records)
        ratio = res["img_per_s"] / need if need else None
        c.update({"status": "FAIL" if ratio is not None and ratio < 2 else "ok",
                  "throughput": f"{res['img_per_s']:,.0f} img/s",
                  "note": (f"{ratio:.1f}x the {need:,.0f} img/s of {row} (need >= 2x)" if ratio is not None
                           else "no DiT training rate measured in this run to compare with")
                          + f"; {res['workers']} workers, batch {res['batch']}"})
    return c


def table_rows(records: dict, sheet, measured) -> list:
    """One list of strings per row in ROWS order: measured cells, or the row's one-line error."""
    rows = []
    for name, row in ROWS.items():
        if name not in records:
            continue
        rec = records[name]
        if "result" in rec:
            cells = result_cells(name, rec["result"], sheet, measured, records)
        else:
            status = "skipped" if rec.get("skipped") else "timeout" if rec.get("timeout") else "error"
            cells = {"status": status, "note": rec["error"][:160]}
        rows.append([f"{name}: {row.title}"] + [cells.get(col, "-") for col in COLUMNS[1:]])
    return rows


def format_table(header: list, rows: list) -> str:
    """Header lines, then an aligned text table of COLUMNS (the last column, the note, is not padded)."""
    widths = [max(len(r[i]) for r in [list(COLUMNS)] + rows) for i in range(len(COLUMNS) - 1)]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1]

    rule = "-" * (sum(widths) + 2 * len(widths) + len(COLUMNS[-1]))
    return "\n".join(header + [rule, line(list(COLUMNS)), rule] + [line(r) for r in rows] + [rule])


def card_info() -> dict:
    """Name, compute capability, memory, torch and CUDA versions of GPU 0."""
    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "capability": f"sm_{p.major}{p.minor}", "memory_gib": p.total_memory / 2 ** 30,
            "torch": torch.__version__, "cuda": torch.version.cuda}


def report(info: dict, records: dict, budget: float, wall: float) -> dict:
    """The whole result as plain data: what --json writes, and what the table is printed from."""
    sheet = measure.datasheet_peak(info["gpu"], "bf16")
    measured = records.get("matmul", {}).get("result", {}).get("tflops")
    header = [f"nanoCEP GPU suite | {info['gpu']} ({info['capability']}, {info['memory_gib']:.0f} GiB) | "
              f"torch {info['torch']}, CUDA {info['cuda']} | {wall:.0f} s of a {budget:.0f} s budget",
              f"bf16 dense peak: measured {f'{measured:.0f}' if measured else 'n/a'} TFLOP/s (matmul row), "
              f"datasheet {f'{sheet:.0f}' if sheet else 'unknown for this card'} TFLOP/s"]
    rows = table_rows(records, sheet, measured)
    return {**info, "datasheet_tflops": sheet, "measured_tflops": measured, "budget_s": budget, "wall_s": wall,
            "columns": list(COLUMNS), "rows": rows, "records": records, "table": format_table(header, rows)}


# ----------------------------------------------------------------------------------------------------------------------
# CLI

class SuiteError(Exception):
    """A bad flag: one line, exit 2."""


def parse_args(argv, prog: str = "python -m tools.gpu_suite"):
    """The suite's flags (validated), or SuiteError naming the bad one."""
    p = ArgParser(prog=prog, description="The GPU check of nanoCEP: CUDA tests, training / sampling / encode / "
                  "loader throughput and MFU, one table. Needs a CUDA GPU.")
    p.add_argument("--json", default="", help="also write the table and every row's raw figures to this JSON file")
    p.add_argument("--log", default="", help="append every row's full output (tracebacks, pytest) to this file")
    p.add_argument("--rows", default="all", help=f"comma-separated rows to run, or 'all': {', '.join(ROWS)}")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole suite: a row gets at most what is left of it")
    p.add_argument("--iters", type=int, default=10, help="timed steps of each training row (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each training row (compile happens here)")
    p.add_argument("--row", default="", help=argparse.SUPPRESS)       # child mode: run this one row
    p.add_argument("--result", default="", help=argparse.SUPPRESS)    # child mode: write its dict here
    args = p.parse_args(argv)
    names = list(ROWS) if args.rows == "all" else [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        raise SuiteError(f"--rows: unknown row {', '.join(unknown) or '(none given)'}; choose from {', '.join(ROWS)}")
    args.names = names
    if args.row and args.row not in ROWS:
        raise SuiteError(f"--row: unknown row {args.row!r}")
    if not args.budget > 0 or args.iters < 1 or args.warmup < 1:
        raise SuiteError(f"--budget must be > 0 and --iters, --warmup >= 1 (got {args.budget:g}, {args.iters}, "
                         f"{args.warmup}); warm-up includes the compile")
    for flag in ("json", "log"):
        path = getattr(args, flag)
        if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
            raise SuiteError(f"--{flag} {path}: not a file path in an existing folder")
    return args


def write_json(path: str, obj) -> None:
    """JSON, written atomically (a crashed child or suite never leaves half a file)."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1)


def main(argv=None, prog: str = "python -m tools.gpu_suite") -> int:
    try:
        args = parse_args(argv, prog)
    except SuiteError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:                                  # argparse: --help (0) or an unknown flag (2, one line)
        return e.code
    if not torch.cuda.is_available():
        print(f"{prog}: error: the GPU suite needs CUDA, and torch {torch.__version__} sees no CUDA GPU here",
              file=sys.stderr)
        return 2
    if args.row:
        return run_child(args.row, args.result, args)
    info, t0 = card_info(), time.perf_counter()
    log = open(args.log, "a") if args.log else None
    save = (lambda records: write_json(args.json, report(info, records, args.budget, time.perf_counter() - t0))) \
        if args.json else None
    try:
        records = run_rows(args.names, args, log, on_row=save)   # the JSON is rewritten after every row
    finally:
        if log is not None:
            log.close()
    out = report(info, records, args.budget, time.perf_counter() - t0)
    if args.json:
        write_json(args.json, out)
    print(out["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
