"""Helpers the test files share: tiny training flags, reading a run folder back, the one-line-error check."""
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
