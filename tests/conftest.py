"""Helpers the test files share: tiny training flags, reading a run folder back, the one-line-error check, the built-in
dataset's one-item-at-a-time oracle, an offline Hugging Face Hub cache, a full disk."""
import errno
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data

# README's test command runs the suite on pytest-xdist workers (-n auto): each worker gets its share of the cores it
# may use, so that two workers' OpenMP thread pools do not spin against each other (on 2 cores, 2 x 2 threads run far
# slower than 2 x 1).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _threads = max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)            # subprocesses started with os.environ inherit it
    torch.set_num_threads(_threads)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = Path(__file__).resolve().parent / "data"          # key listings of the released layouts

# A train script's flags for runs of seconds: 8px images, batch 8, a log line and a checkpoint every step or two.
TINY = ["--image-size", "8", "--batch-size", "8", "--log-every", "1", "--ckpt-every", "2", "--sample-every", "0",
        "--builtin-length", "64", "--num-workers", "0", "--lr", "1e-3",
        "--lr-warmdown", "0", "--min-snr", "0"]   # constant lr: a resume may extend --steps and stay exact


def run_tiny(main, out, *extra) -> int:
    """A train script's main on TINY's flags into the run folder `out` (extra flags after them)."""
    return main(TINY + ["--out", str(out), *map(str, extra)])


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


def check_resume_is_bit_identical(main, root, *extra) -> dict:
    """A train script's main on TINY for 4 steps straight, and for 2 + resume + 2: the weights and EMA are
    bit-identical. Returns the resumed run's checkpoint."""
    assert run_tiny(main, root / "straight", "--steps", 4, *extra) == 0
    assert run_tiny(main, root / "split", "--steps", 2, *extra) == 0
    assert run_tiny(main, root / "split", "--steps", 4, "--resume", "auto", *extra) == 0
    a, b = load_ckpt(root / "straight"), load_ckpt(root / "split")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    return b


def subprocess_env() -> dict:
    """The environment for a train script run as a subprocess: one thread, unbuffered output."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def one_error_line(capsys, script="train_dit.py") -> str:
    """The one `script: error: ...` line the last call printed (asserted: exactly one, last, no traceback)."""
    err = capsys.readouterr().err.strip()   # a progress bar may precede the error; the error is one last line
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and err.splitlines()[-1].startswith(f"{script}: error:") and "Traceback" not in err, err
    return errors[0]


def expect_one_line_error(capsys, main, script, argv, needle) -> None:
    """main(argv) exits 2 with exactly one `script: error: ...` line naming `needle`, last, and no traceback."""
    assert main(argv) == 2
    assert needle in one_error_line(capsys, script)


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(module, std=0.3, seed=0):
    """Overwrite every parameter (zero-initialised ones included) with N(0, std^2) from `seed`, so every path of a
    random-weight model carries signal (adaLN-Zero and zero convolutions start at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def builtin_item_one_by_one(ds, key: int):
    """The oracle of the built-in dataset's batch renderer: ds[key] = (image (C, H, W), label) drawn one item at a time
    (4x4 supersampled coverage of the rotated disc or cross, colour over a vertical gradient), from the same drawn
    attributes (ds._attributes)."""
    index, flip = int(key) >> 1, int(key) & 1
    a, _ = ds._attributes(index)
    ss, n = 4 * ds.image_size, ds.image_size
    g = (np.arange(ss) + 0.5) / ss * 2 - 1
    gy, gx = np.meshgrid(g, g, indexing="ij")                                     # (ss, ss)
    c, s = np.cos(a["angle"]), np.sin(a["angle"])
    u = (gx - a["cx"]) * c + (gy - a["cy"]) * s
    v = -(gx - a["cx"]) * s + (gy - a["cy"]) * c
    r = a["radius"]
    if a["shape"] == "disc":
        inside = u ** 2 + v ** 2 <= r ** 2
    else:
        arm = 0.36 * r
        inside = ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))
    cover = inside.reshape(n, 4, n, 4).mean(axis=(1, 3))[..., None]               # (H, W, 1)
    bg = a["bg"] + a["bg_slope"] * np.linspace(-1, 1, n)[:, None, None]            # (H, 1, 3)
    fg = np.array(data.BUILTIN_COLOURS[a["colour"]], dtype=np.float64) * a["gain"]
    img = np.clip(np.rint(cover * fg + (1 - cover) * bg), 0, 255).astype(np.uint8)
    if flip:
        img = img[:, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(img).astype(np.float32)).permute(2, 0, 1).div_(127.5).sub_(1.0)
    return x, int(ds.labels[index])


def read_key_listing(path):
    """`name (d0, d1, ...)` lines -> {name: meta tensor of that shape}."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            name, shape = line.split(" (")
            out[name] = torch.empty(tuple(int(s) for s in shape.rstrip(")").split(",") if s.strip()), device="meta")
    return out


def hub_cache_with(cache, repo_id, files: dict, commit: str, ref: str = "main"):
    """files {name: bytes} laid out as huggingface_hub caches a repo's revision: models--ORG--NAME/refs/REF holds the
    commit, snapshots/COMMIT/ the files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    for name, data in files.items():
        (repo / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / name).write_bytes(data)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with huggingface_hub's default cache in tmp_path/hub, and every socket refused and recorded
    (the test asserts none was tried)."""
    import socket
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)          # read at import: what the env var sets
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in tests")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tmp_path / "hub", attempts


class FullFile(io.FileIO):
    """A file on a full disk: the first `room` bytes are written, then every write raises ENOSPC as the kernel does."""

    def __init__(self, file, mode: str = "wb", room: int = 0):
        super().__init__(file, mode)
        self.room = room

    def write(self, b) -> int:
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return super().write(b)


def fill_disk(monkeypatch, name: str, after: int = 0) -> None:
    """Make every atomic write (plumbing.common.atomic_open) of a file called `name` fail as on a full disk, once
    `after` of them have succeeded: its temporary file (mkstemp's) is opened on a FullFile."""
    real_mkstemp, real_fdopen, doomed, seen = tempfile.mkstemp, os.fdopen, set(), [0]

    def mkstemp(*args, **kwargs):
        fd, tmp = real_mkstemp(*args, **kwargs)
        if os.path.basename(tmp).startswith(f".{name}."):
            seen[0] += 1
            if seen[0] > after:
                doomed.add(fd)
        return fd, tmp

    def fdopen(fd, mode="r", *args, **kwargs):
        if fd not in doomed:
            return real_fdopen(fd, mode, *args, **kwargs)
        doomed.discard(fd)
        raw = FullFile(fd, "wb")
        return raw if "b" in mode else io.TextIOWrapper(io.BufferedWriter(raw), **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "fdopen", fdopen)
