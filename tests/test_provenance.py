"""Tests for plumbing/provenance.py: the commit and dirty state of the code's own repository (from any working
directory), "unknown" without git, and the provenance.json a training run writes beside its log."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import read_log, run_tiny
from plumbing import provenance

REPO = Path(__file__).resolve().parents[1]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(repo, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


@needs_git
def test_collect_names_the_head_of_the_code_not_of_the_working_directory(tmp_path, monkeypatch):
    try:
        head = git(REPO, "rev-parse", "HEAD").strip()
    except subprocess.CalledProcessError:
        pytest.skip("the code is not in a git repository")
    monkeypatch.chdir(tmp_path)                                 # not a repository: the module's path decides
    info = provenance.collect("cpu")
    assert info["commit"] == head and len(head) == 40
    code_changes = git(REPO, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    assert info["dirty"] == bool(code_changes.strip())                # a sweep writing under results/ is not code
    assert info["torch"] == torch.__version__ and info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["argv"] == sys.argv and info["cpu"] and info["cuda"] is None and info["started_utc"].endswith("+00:00")


@needs_git
def test_dirty_flips_when_a_tracked_code_file_changes_and_not_for_untracked_ones_or_results(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    (repo / "results").mkdir()
    (repo / "results" / "rows.csv").write_text("a\n")
    git(repo, "add", "a.py", "results/rows.csv")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = git(repo, "rev-parse", "HEAD").strip()
    assert provenance.code_state(repo) == {"commit": head, "dirty": False, "modified": []}
    (repo / "new.py").write_text("untracked\n")
    (repo / "results" / "rows.csv").write_text("a\nb\n")                # a sweep appending its rows: data, not code
    assert provenance.code_state(repo)["dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.code_state(repo) == {"commit": head, "dirty": True, "modified": ["a.py"]}


def test_no_repository_or_no_git_gives_unknown(tmp_path, monkeypatch):
    assert provenance.code_state(tmp_path) == {"commit": "unknown", "dirty": None, "modified": []}
    monkeypatch.setenv("PATH", str(tmp_path))                   # git not found: still no error
    assert provenance.code_state(REPO)["commit"] == "unknown"
    assert provenance.collect()["commit"] == "unknown"


def test_a_training_run_writes_provenance_json_and_logs_it_at_start(tmp_path):
    import train_dit
    out = tmp_path / "run"
    assert run_tiny(train_dit.main, out, "--steps", 2) == 0
    info = json.loads((out / "provenance.json").read_text())
    (start,) = [r for r in read_log(out) if r.get("event") == "start"]
    assert start["provenance"] == info
    assert info["commit"] == provenance.code_state()["commit"] and info["torch"] == torch.__version__
    assert info["argv"] == sys.argv and info["cuda"] is None
