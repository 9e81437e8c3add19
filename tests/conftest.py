"""Helpers the test files share: tiny training flags, reading a run folder back, the one-line-error check."""
import json
import os
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = Path(__file__).resolve().parent / "data"          # key listings of the released layouts

# A train script's flags for runs of seconds: 8px images, batch 8, a log line and a checkpoint every step or two.
TINY = ["--image-size", "8", "--batch-size", "8", "--log-every", "1", "--ckpt-every", "2", "--sample-every", "0",
        "--builtin-length", "64", "--num-workers", "0", "--lr", "1e-3"]


def load_ckpt(out, name="last.pt") -> dict:
    """A run folder's checkpoint, loaded as evaluate.py loads it (tensors only)."""
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)


def read_log(out) -> list:
    """The records of a run folder's log.jsonl."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(ln) for ln in f]


def logged_losses(out) -> list:
    """The losses of a run's periodic log records, in order."""
    return [r["loss"] for r in read_log(out) if "loss" in r and "event" not in r]


def train_and_check_learning(main, out, steps: int, *flags) -> dict:
    """main() on 256 built-in items with 5 % corrupted labels, a log every 10 steps and a grid and checkpoint at the
    end: it exits 0, its loss falls below 0.6 x the first logged one and the grid exists. Returns the manifest."""
    rc = main(["--image-size", "8", "--steps", str(steps), "--log-every", "10", "--ckpt-every", str(steps),
               "--sample-every", str(steps), "--builtin-length", "256", "--corrupt", "0.05", *flags, "--out", str(out)])
    assert rc == 0
    losses = logged_losses(out)
    assert losses[-1] < 0.6 * losses[0], losses
    assert os.path.isfile(os.path.join(out, "samples", f"step_{steps:07d}.png"))
    with open(os.path.join(out, "corruption.json")) as f:
        return json.load(f)


def check_resume_is_bit_identical(run, root, *extra) -> dict:
    """run(out, *flags) for 4 steps straight, and for 2 + resume + 2: the weights and EMA are bit-identical. Returns
    the resumed run's checkpoint."""
    assert run(root / "straight", "--steps", 4, *extra) == 0
    assert run(root / "split", "--steps", 2, *extra) == 0
    assert run(root / "split", "--steps", 4, "--resume", "auto", *extra) == 0
    a, b = load_ckpt(root / "straight"), load_ckpt(root / "split")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    return b


def subprocess_env() -> dict:
    """The environment for a train script run as a subprocess: one thread, unbuffered output."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def expect_one_line_error(capsys, main, script, argv, needle) -> None:
    """main(argv) exits 2 with exactly one `script: error: ...` line naming `needle`, last, and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()   # a progress bar may precede the error; the error is one last line
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and err.splitlines()[-1].startswith(f"{script}: error:") and needle in errors[0], err
    assert "Traceback" not in err


def randomize(module, std=0.3, seed=0):
    """Overwrite every parameter with N(0, std^2) so no weight is trivially zero (adaLN-Zero starts at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def read_key_listing(path):
    """`name (d0, d1, ...)` lines -> {name: meta tensor of that shape}."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            name, shape = line.split(" (")
            out[name] = torch.empty(tuple(int(s) for s in shape.rstrip(")").split(",") if s.strip()), device="meta")
    return out
