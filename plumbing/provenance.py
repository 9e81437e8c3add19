"""
Provenance: what made a run's numbers. collect() returns the code's git commit (of the repository this file lives
in, whatever the working directory), whether tracked files were modified and which, the torch and python versions,
the machine (CPU model, CUDA devices when used), the command line and the UTC start time; write() puts it in a run
folder as provenance.json. A missing git or a copy outside a repository gives commit "unknown", never an error.

Nothing to run here; runio.py (training) and evaluate.py call it.
"""
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from plumbing.common import atomic_open

REPO = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args) -> str | None:
    """A git command's stdout in `repo`, or None when git is missing, slow or fails (not a repository)."""
    try:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20,
                           env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})     # a status must not lock a live repo
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def code_state(repo: Path = REPO) -> dict:
    """{"commit": HEAD's hash or "unknown", "dirty": tracked code files modified (None if unknown),
    "modified": [paths]}."""
    head = _git(repo, "rev-parse", "HEAD")
    # results/ is data the code writes (a sweep resumed from committed rows appends to it), not the code
    status = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results") \
        if head else None
    modified = [line[3:] for line in status.splitlines() if line.strip()] if status is not None else []
    return {"commit": head.strip() if head else "unknown", "dirty": None if status is None else bool(modified),
            "modified": modified}


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def collect(device=None, repo: Path = REPO) -> dict:
    """The provenance of a run starting now on `device` (a torch.device or name; CUDA adds the GPUs' names)."""
    info = {**code_state(repo), "python": platform.python_version(), "torch": None, "cpu": cpu_name(),
            "cuda": None, "argv": list(sys.argv), "started_utc":
            datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import torch
    except ImportError:
        return info
    info["torch"] = torch.__version__
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        info["cuda"] = {"device": torch.cuda.get_device_name(torch.device(device)), "count": count,
                        "names": [torch.cuda.get_device_name(i) for i in range(count)], "version": torch.version.cuda}
    return info


def write(folder, info: dict) -> Path:
    """folder/provenance.json, atomically."""
    path = Path(folder) / "provenance.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        f.write(json.dumps(info, indent=1) + "\n")
    return path
