"""
The plumbing every nanoCEP script shares, written once: one-line CLI errors, atomic file writes (a write the disk
refuses is one line too, WriteFailed, on every rank of a job), the seed of every random stream of a run (derive_seed),
joining torchrun's process group, and keep_freed_memory (a CPU training run keeps the memory a step frees: with
glibc's defaults it page-faults it back in every step). Downloads checked by sha256
live with the instruments that fetch released files, in sources/download.py. (corrupt.py keeps tiny copies of the
first two on purpose, and cads.py its own seed mix: they are standalone files meant to be copied into other projects.)

Nothing to run here; the scripts import it. torch is imported only by the functions that need it, so numpy-only
scripts (tools/gmm_theory.py) use this file too.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import functools
import os
import platform
import re
import tempfile
from pathlib import Path


class RunError(Exception):
    """A problem the user must fix (bad flag, bad file): the scripts print its message on one line and exit 2."""


class WriteFailed(OSError):
    """An output file could not be written (full disk, read-only or vanished folder): the scripts print its message
    (`cannot write PATH: CAUSE`) on one line and exit 1; the file it would have replaced is left as it was.

    shared: every rank of the job raised it at the same meeting (agree_on_writes), so they can leave together."""

    def __init__(self, message: str, shared: bool = False):
        super().__init__(message)
        self.shared = shared

    @classmethod
    def of(cls, path, error: OSError) -> "WriteFailed":
        return cls(f"cannot write {path}: {error.strerror or one_line(error)}")


# ----------------------------------------------------------------------------------------------------------------------
# Command lines: a bad flag is one line and exit 2

class ArgParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2, instead of printing the usage block too.

    Abbreviated flags are off: `--ema 0.999` must not silently become `--ema-decay` behind a preset's back."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def one_line(e: BaseException) -> str:
    """An exception as one line; errors re-raised from DataLoader workers keep only the original message."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    return lines[-1] if lines[0].startswith("Caught ") else lines[0]


# ----------------------------------------------------------------------------------------------------------------------
# Files: written atomically

# The errors that say the storage failed, not the code writing to it: raised from inside an atomic_open block they
# name the file being written (an error of another errno there, e.g. a lost network connection, is the block's own).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})
TEMP_SUFFIX = ".part"                   # atomic_open's temporary files: .NAME.XXXXXXXX.part beside NAME


def storage_error(e: BaseException | None, any_errno: bool = False) -> OSError | None:
    """The OSError behind `e` (itself, or one it was raised from or while handling: torch's zip writer turns a failed
    write into `RuntimeError: ... unexpected pos`, raised while handling the OSError) that says the storage failed."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and (any_errno or e.errno in STORAGE_ERRNOS):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def new_file_mode() -> int:
    """The mode a new file gets from open(): 0o666 less the umask, read from /proc without changing the umask (setting
    it to read it back races with other threads); without /proc, read once by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o666 & ~_umask_once()


@functools.cache
def _umask_once() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", **text_options):
    """Open a temporary file beside `path`; on success it is renamed over `path`, on failure removed.

    A crash or an exception never leaves a half-written file where a reader (or a resumed run) would find it. The file
    gets the mode open() would give it (umask), not mkstemp's 0600, so a shared folder's readers can read it. A write
    the storage refuses (full disk, ...) raises WriteFailed naming `path` and the cause. text_options: open()'s
    newline= for a text mode (its encoding is UTF-8)."""
    path, tmp, written = Path(path), None, False
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", **text_options})) as f:
            yield f
            written = True                          # from here on every error is this file's: flush, close, rename
        os.replace(tmp, path)
    except Exception as e:
        # before the block ran (mkstemp) or after it (close, rename) any OSError is this file's; inside it, only
        # a storage errno (the block may raise OSErrors of its own)
        cause = storage_error(e, any_errno=written or tmp is None)
        if cause is None or isinstance(e, WriteFailed):
            raise
        raise WriteFailed.of(path, cause) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def save_npz(path, **arrays) -> None:
    """np.savez written atomically (temp file, then rename), skipping None values."""
    import numpy as np
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        np.savez(f, **{k: v for k, v in arrays.items() if v is not None})


def remove_leftovers(folder, names: str) -> list[str]:
    """Remove the temporary files atomic_open left in `folder` (a process killed while writing) for the files whose
    names fully match the regular expression `names`; returns the removed paths. Other files are never touched."""
    pattern = re.compile(rf"\.(?:{names})\.[A-Za-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")
    if not os.path.isdir(folder):
        return []
    with os.scandir(folder) as entries:
        leftovers = [e.path for e in entries if e.is_file(follow_symlinks=False) and pattern.fullmatch(e.name)]
    for path in leftovers:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return leftovers


def cache_root(cache_dir=None) -> Path:
    """Where nanoCEP caches what it builds or downloads: cache_dir, else $NANOCEP_CACHE, else ~/.cache/nanocep."""
    return Path(cache_dir or os.environ.get("NANOCEP_CACHE") or Path.home() / ".cache" / "nanocep")


def atomic_save(obj, path) -> None:
    """torch.save, atomically."""
    import torch
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


# ----------------------------------------------------------------------------------------------------------------------
# Seeds: every random stream of a run is derived here from (--seed, purpose, index)

# purpose -> (seed multiplier, offset, index multiplier): derive_seed = seed * M + O + index * K (mod 2**63).
# The constants are those the project's published runs were drawn with, so checkpoints resume and results reproduce
# bit for bit; a new purpose takes a large offset of its own so it never meets another stream's generator.
SEED_STREAMS = {
    "step": (7_919_993, 0, 1),          # trainer.step_draws: t, ε, CFG mask, CEP's unit noise, ... of step `index`
    "epoch": (1_000_003, 0, 1),         # data.StepSampler: the permutation and flips of epoch `index`
    "cep_subset": (1_000_003, 0xCE9, 0),    # data.cep_subset_mask: which items --cep-subset perturbs (index unused)
    "module": (1000, 0, 1),             # the per-rank torch RNG that modules draw from (--cond-dropout): index = rank
    "loader": (1, 0, 1_000_003),        # the DataLoader's own generator (worker seeds): index = the start step
    "grid": (1, 0, 0),                  # the sample grids' fixed noise
    "grid_step": (1, 0x6D1 << 44, 1_000_003),   # a stochastic grid sampler's (DDPM's) per-step noise of image `index`
    "corrupt": (1, 0xC0 << 56, 7_919_993),      # --corrupt-mode random: the host-side seed of step `index`
    "cep_item": (1, 0xCE9 << 52, 1_000_003),    # --cep-fixed-delta: the fixed CEP noise of item `index`
    "focus": (1, 0xF0C << 48, 7_919_993),       # --t-focus: which timesteps of step `index` move into the band
}


def derive_seed(seed: int, purpose: str, index: int = 0) -> int:
    """The generator seed of one random stream of a run: a function of (seed, purpose, index) only, never of the
    process count or of where a run was resumed, so 1 process = N processes and a resumed run = a straight one."""
    m, o, k = SEED_STREAMS[purpose]
    return (int(seed) * m + o + int(index) * k) % (2 ** 63)


# ----------------------------------------------------------------------------------------------------------------------
# Processes: torchrun's environment variables; plain `python` = 1 process

@dataclasses.dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: "torch.device" = None                  # None = the CPU

    def __post_init__(self):
        import torch
        self.device = torch.device("cpu") if self.device is None else torch.device(self.device)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", timeout: float | None = None) -> Dist:
    """Join the process group torchrun created (gloo on CPU, nccl on GPU); the device comes from LOCAL_RANK. Every
    script that computes (training, evaluation, latent caching) starts here.

    timeout (seconds) bounds how long a rank waits at a collective (torch's default: 10 minutes)."""
    import torch
    import torch.distributed as dist
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if use_cuda:
        # LOCAL_RANK, not RANK: on node 2 of 2, global rank 9 is local GPU 1 (the multi-node bug of the official DiT).
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None,
                                timeout=None if timeout is None else datetime.timedelta(seconds=timeout))
    return Dist(rank, local_rank, world, dev)


def file_in_the_way(out) -> Path | None:
    """The file that stops folder `out` from being made (`out` itself, or a folder above it), or None."""
    existing = next(p for p in (Path(out), *Path(out).absolute().parents) if p.exists())
    return None if existing.is_dir() else existing


def new_file(path) -> None:
    """Refuse (ValueError, one line) to write an output file over an existing one: a reference or training-set file
    is a measurement's ground truth, replaced only on purpose (remove it first)."""
    if Path(path).exists():
        raise ValueError(f"--out {path} exists; remove it or choose another name")


def leave_process_group(finished: bool = True) -> None:
    """Leave torchrun's process group, if joined: after a barrier when every rank `finished` its work, so no rank tears
    its gloo threads down while a peer's last message is still in flight (a rare SIGABRT at interpreter exit, rank 1,
    "terminate called without an active exception", seen after a clean run). Not after an error (finished=False):
    another rank may never reach the barrier."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD = 32 << 20, 512 << 20     # bytes: glibc's defaults are dynamic


def keep_freed_memory() -> bool:
    """Keep the memory a CPU step frees for the next step, instead of returning it to the OS (glibc only; True if
    set). A process-wide allocator setting, so only CPU training asks for it (trainer.train). With glibc's defaults
    the trimmed top of the heap and the mmapped blocks a CPU training step frees (its 1-4 MB activations) are
    page-faulted back in by the next step: 8000-11500 faults a step for the CPU default, 2.4-4.5 M in 400 steps, and
    9 % of its wall time (median of 8 alternating pairs of 400-step runs, 4-13 %). Blocks under 32 MB now come from
    the heap, which keeps up to 512 MB free at its top (+30-50 MB peak memory for the CPU default). The environment
    variables MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set the same; when set, they win."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    if platform.libc_ver()[0] != "glibc":                     # macOS, Windows, musl: other allocators, nothing to tune
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt                  # the C library this process runs on
    except (OSError, TypeError, AttributeError):             # CDLL(None) is a TypeError on Windows' CPython <= 3.13
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3             # glibc's malloc.h parameter numbers
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold,
                                                                                   MALLOC_TRIM_THRESHOLD))


def all_mean(x: "torch.Tensor", d: Dist) -> "torch.Tensor":
    """Average a tensor over all ranks (identity with one process)."""
    if d.world > 1:
        import torch.distributed as dist
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= d.world
    return x


def first_error(err: BaseException | None, world: int) -> str | None:
    """A collective every one of the `world` ranks calls where it would meet the others at a barrier: the first rank's
    error (one line), or None when no rank has one. So a rank that failed (a write that only rank 0 makes, a shard
    index that only local rank 0 builds) stops its peers at that meeting instead of leaving them waiting for it."""
    if world > 1:
        import torch.distributed as dist
        if dist.is_initialized():                       # (if not, one process plays the ranks in turn)
            errors = [None] * world
            dist.all_gather_object(errors, None if err is None else one_line(err))
            return next((e for e in errors if e is not None), None)
    return None if err is None else one_line(err)


def local_rank0_first(fn, d: Dist):
    """fn() on each node's local rank 0 while the node's other ranks wait, then on them: what fn caches on disk (the
    shard index of sources/shards.py) is built once per node and read by the rest. An error local rank 0 raises is
    raised on every rank (a ValueError with its message on the others). Every rank must call it."""
    result, err = None, None
    if d.local_rank == 0:
        try:
            result = fn()
        except Exception as e:                  # shared below, then raised here as it was
            err = e
    message = first_error(err, d.world)
    if err is not None:
        raise err
    if message is not None:
        raise ValueError(message)
    return result if d.local_rank == 0 else fn()


def agree_on_writes(err: WriteFailed | None, world: int) -> None:
    """Where the ranks meet: every rank raises the first rank's WriteFailed (shared, so they leave together), if any."""
    message = first_error(err, world)
    if message is not None:
        raise WriteFailed(message, shared=True)


@contextlib.contextmanager
def writes_shared(world: int):
    """A block of writes, then a meeting of all ranks in a barrier's place: if any rank's block failed to write, every
    rank raises that WriteFailed there (agree_on_writes)."""
    err = None
    try:
        yield
    except WriteFailed as e:
        err = e
    agree_on_writes(err, world)
