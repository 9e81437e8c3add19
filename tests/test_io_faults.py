"""Faults of the storage a run writes to: a full disk while writing a checkpoint or log.jsonl ends the run in one line
naming the file and the cause (exit 1), with the previous checkpoint intact and loadable and no temporary file left;
2 processes stop together; files get the umask's mode; a temporary file a killed write left is removed at the next
start. Disks fill by making the files' writes raise ENOSPC, as the kernel does (conftest.fill_disk)."""
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import runio
import train_dit
from conftest import ROOT, FullFile, fill_disk, load_ckpt, one_error_line, read_log, run_tiny
from plumbing.common import atomic_open, atomic_save, new_file_mode


def temp_files(folder) -> list:
    return sorted(n for n in os.listdir(folder) if n.endswith(".part"))


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_previous_one_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    fill_disk(monkeypatch, "last.pt", after=1)                   # the checkpoint of step 2 fits, step 4's does not
    assert run_tiny(train_dit.main, out, "--steps", 6) == 1
    line = one_error_line(capsys)
    assert line == f"train_dit.py: error: cannot write {out / 'last.pt'}: No space left on device"
    assert load_ckpt(out)["step"] == 2 and temp_files(out) == []
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4]     # logged up to the failed save
    assert os.stat(out / "last.pt").st_mode & 0o777 == new_file_mode()
    monkeypatch.undo()                                            # room again: the run continues from step 2
    assert run_tiny(train_dit.main, out, "--steps", 4, "--resume", "auto") == 0
    assert [r["resumed_from"] for r in read_log(out) if r.get("event") == "start"] == [None, str(out / "last.pt")]
    assert load_ckpt(out)["step"] == 4


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_open = open

    def open_log(path, mode="r", *args, **kwargs):                # log.jsonl: room for about three records
        if os.path.basename(path) != "log.jsonl":
            return real_open(path, mode, *args, **kwargs)
        return io.TextIOWrapper(io.BufferedWriter(FullFile(path, "ab", room=900)), encoding="utf-8")
    monkeypatch.setattr(runio, "open", open_log, raising=False)
    assert run_tiny(train_dit.main, out, "--steps", 8) == 1
    assert one_error_line(capsys) == f"train_dit.py: error: cannot write {out / 'log.jsonl'}: No space left on device"
    records = read_log(out)                                       # what was written is whole, one record a line
    assert 3 <= len(records) < 8 and records[0]["event"] == "start"
    logged = [r["step"] for r in records if "loss" in r]
    assert load_ckpt(out)["step"] == max(s for s in logged if s % 2 == 0) and temp_files(out) == []   # --ckpt-every 2


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_atomic_writes_get_the_mode_the_umask_gives(tmp_path, umask):
    """mkstemp makes 0600 files: a checkpoint a colleague in the run folder's group could not read."""
    old = os.umask(umask)
    try:
        atomic_save({"x": torch.zeros(2)}, tmp_path / "last.pt")
        with atomic_open(tmp_path / "config.json", "w") as f:
            f.write("{}")
        (tmp_path / "plain.txt").write_text("made by open()")
    finally:
        os.umask(old)
    for name in ("last.pt", "config.json", "plain.txt"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_a_killed_writes_temporary_files_are_removed_at_the_next_start_and_no_others(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_tiny(train_dit.main, out, "--steps", 2) == 0
    (out / "samples").mkdir()
    ours = [out / ".last.pt.k3_9xq0a.part", out / ".step_0000002.pt.abcdefgh.part",
            out / "samples" / ".step_0000002.png.0a1b2c3d.part"]
    foreign = [out / ".notes.txt.abcdefgh.part", out / "last.pt.part", out / ".last.pt.abc.part",
               out / "samples" / ".last.pt.abcdefgh.part", out / ".last.pt.abcdefgh.partial"]
    for f in ours + foreign:
        f.write_bytes(b"half a file")
    capsys.readouterr()
    assert run_tiny(train_dit.main, out, "--steps", 3, "--resume", "auto") == 0
    assert not any(f.exists() for f in ours) and all(f.exists() for f in foreign)
    assert "removed 3 temporary file(s)" in capsys.readouterr().out


CHILD = textwrap.dedent("""
    import errno, json, os, sys, types
    sys.path.insert(0, {root!r})
    import torch.distributed as dist
    import runio
    from plumbing.common import Dist, WriteFailed, local_rank0_first
    from sources import shards
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2)
    d, report = Dist(rank, rank, 2), {{}}
    real, built = shards.index_shard, []
    shards.index_shard = lambda path, i: built.append(path) or real(path, i)
    report["items"] = len(local_rank0_first(lambda: shards.ShardDataset({good!r}, 8), d))
    report["built"] = len(built)
    try:
        local_rank0_first(lambda: shards.ShardDataset({bad!r}, 8), d)
    except ValueError as e:
        report["bad"] = str(e)
    io = runio.RunIO(types.SimpleNamespace(out={out!r}), "dit", d)

    def full(path):
        raise WriteFailed.of(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    if rank == 0:
        io.write(full, "last.pt")                    # kept until the ranks meet
    try:
        io.agree()
    except WriteFailed as e:
        report["write"], report["shared"] = str(e), e.shared
    print(json.dumps(report))
    dist.destroy_process_group()
""")


def test_two_processes_index_once_and_stop_together_on_a_damaged_shard_or_a_failed_write(tmp_path):
    """Real gloo ranks: local rank 0 builds the shard index and the other reads it; a damaged shard, and a write that
    failed on rank 0, end both ranks with the same one line (the peer is not left waiting at a barrier)."""
    from test_shards import write_shards, write_shard
    write_shards(tmp_path / "good")
    (tmp_path / "bad").mkdir()
    headers = write_shard(tmp_path / "bad" / "0.tar")
    raw = (tmp_path / "bad" / "0.tar").read_bytes()
    (tmp_path / "bad" / "0.tar").write_bytes(raw[:headers[4]])
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=ROOT, store=str(tmp_path / "store"), good=str(tmp_path / "good"),
                                   bad=str(tmp_path / "bad"), out=str(tmp_path / "run")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in range(2)]
    reports = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-2000:]
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [r["items"] for r in reports] == [24, 24] and [r["built"] for r in reports] == [2, 0]
    assert reports[0]["bad"] == reports[1]["bad"] and "without tar's end-of-archive blocks" in reports[1]["bad"]
    assert reports[0]["write"] == reports[1]["write"] == "cannot write last.pt: No space left on device"
    assert reports[0]["shared"] and reports[1]["shared"]
