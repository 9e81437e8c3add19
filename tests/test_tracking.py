"""--log wandb|tensorboard (trackers/tracking.py through runio.RunIO's sinks): a training run's event files parsed by
TensorBoard's own reader hold the logged losses, the grid and the judge's verdict; W&B through a fake of its API
surface (init / log / Image / summary / finish) and once for real in offline mode; a resumed run continues its W&B
run and its TensorBoard steps; a tracker that cannot start stops both ranks of a real 2-process run in one line, one
that fails mid-run is dropped with a warning; evaluate.py's rows; sweep.py's grouping; a missing package or an unknown
tracker in one line."""
import os
import re
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import evaluate as ev
import sweep
import train_dit
from conftest import ROOT, TINY, expect_one_line_error, logged_losses, read_log, subprocess_env
from scoring import judge
from trackers import tracking

FLAGS = TINY + ["--steps", "4", "--sample-every", "4", "--sample-steps", "2", "--sample-per-class", "1"]


def fake_judge(cfg, images, labels, log, print_fn):
    """The judge's hook without its one-minute extractor build: logs a verdict record as the real one does."""
    log({"event": "judge", "step": cfg.steps, "class_acc": 0.25, "num": len(labels), "cfg_scale": cfg.sample_cfg})


def test_tensorboard_event_files_hold_every_record(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setattr(judge, "judge_final_grid", fake_judge)
    assert train_dit.main(FLAGS + ["--log", "tensorboard", "--out", str(tmp_path)]) == 0
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    losses = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in losses], logged_losses(tmp_path), rtol=1e-6)   # float32 in the file
    assert [e.value for e in acc.Scalars("img_per_s")] and acc.Scalars("lr")[0].value == pytest.approx(1e-3)
    assert [(e.step, e.value) for e in acc.Scalars("judge/class_acc")] == [(4, 0.25)]
    grid = acc.Images("samples")
    assert len(grid) == 1 and grid[0].step == 4 and grid[0].width > 8       # 10 classes x 1, 8px each, padded
    assert {"start", "samples", "judge", "done"} <= {t.split("/")[1] for t in acc.Tags()["tensors"]}
    assert {r.get("event") for r in read_log(tmp_path)} >= {"start", "samples", "judge", "done"}   # JSONL unchanged


class FakeWandb(types.ModuleType):
    """The part of wandb's API the sink uses, recording every call."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        self.summary, self.id = {}, "fake0001"

    def init(self, **kw):
        self.inits.append(kw)
        return self

    def log(self, payload, step):
        self.logged.append((step, payload))

    def Image(self, array, caption=""):
        return ("image", array.shape, caption)

    def finish(self):
        self.finished += 1


def test_wandb_sink_sees_every_record_grouped_and_offline(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(judge, "judge_final_grid", fake_judge)
    out = tmp_path / "runs" / "cep" / "seed0"
    assert train_dit.main(FLAGS + ["--log", "wandb", "--log-group", "mysweep", "--log-name", "cep/seed0",
                                   "--out", str(out)]) == 0
    (init,) = fake.inits
    assert init["mode"] == "offline" and init["group"] == "mysweep" and init["name"] == "cep/seed0"
    assert init["dir"] == str(out) and init["config"]["num_classes"] == 10 and init["config"]["log"] == "wandb"
    losses = [(s, p["loss"]) for s, p in fake.logged if "loss" in p]
    assert losses == list(zip([1, 2, 3, 4], logged_losses(out)))
    norms = [r["grad_norm"] for r in read_log(out) if "loss" in r and "event" not in r]
    assert [p["grad_norm"] for _, p in fake.logged if "loss" in p] == norms and all(n > 0 for n in norms)
    images = [p["samples"] for s, p in fake.logged if "samples" in p]
    assert len(images) == 1 and images[0][0] == "image" and images[0][1][2] == 3
    assert (4, {"judge/class_acc": 0.25, "judge/num": 10, "judge/cfg_scale": 4.0}) in fake.logged
    assert fake.summary["start/device"] == "cpu" and fake.finished == 1


def test_wandb_offline_for_real_writes_its_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = tracking.WandbSink(str(tmp_path), {"lr": 1e-3}, group="g", name="cell/seed0")
    sink({"step": 1, "loss": 0.5, "lr": 1e-3})
    sink({"event": "samples", "step": 2, "path": "x.png"}, images=torch.zeros(2, 3, 8, 8))
    sink.close()
    (run,) = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    files = [f for _, _, fs in os.walk(tmp_path / "wandb" / run) for f in fs]
    assert any(f.endswith(".wandb") for f in files) and any(f.startswith("samples_") and f.endswith(".png")
                                                           for f in files)


def test_a_resumed_run_continues_its_wandb_run_and_tensorboard_steps(tmp_path, monkeypatch):
    """Stopped after step 4 with a checkpoint at step 2 (a crash after it), resumed from step 2: W&B (offline, for
    real) continues the same run id, and TensorBoard's reader sees each step once, step 2 from before the checkpoint
    and steps 3-4 from the resumed run (purge_step hides the stopped run's later events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, flags = tmp_path / "run", FLAGS + ["--sample-every", "0", "--keep-every", "2", "--log", "tensorboard,wandb"]
    assert train_dit.main(flags + ["--out", str(out)]) == 0
    first = (out / "wandb-run-id").read_text().strip()
    assert train_dit.main(flags + ["--out", str(out), "--resume", str(out / "step_0000002.pt")]) == 0
    runs = sorted(d for d in os.listdir(out / "wandb") if d.startswith("offline-run-"))
    # `wandb sync` appends both to one run; two starts in one second name the second folder ...-ID-1
    assert len(runs) == 2 and all(re.search(rf"-{re.escape(first)}(-\d+)?$", r) for r in runs)
    assert (out / "wandb-run-id").read_text().strip() == first
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    losses = {r["step"]: r["loss"] for r in read_log(out) if "loss" in r and "event" not in r}   # the last per step
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    np.testing.assert_allclose([e.value for e in acc.Scalars("loss")], [losses[s] for s in (1, 2, 3, 4)], rtol=1e-6)


# Rank 0's W&B cannot start (an API key set on a node without the network): a fake wandb whose init raises.
LAUNCH_WITH_FAILING_WANDB = """
import sys, types
sys.path.insert(0, {root!r})
wandb = types.ModuleType("wandb")
def init(**kw):
    raise RuntimeError("wandb.init(): network error (ConnectTimeout), entering retry loop\\nmore detail")
wandb.init = init
sys.modules["wandb"] = wandb
import train_dit
sys.exit(train_dit.main(sys.argv[1:]))
"""


def test_a_tracker_that_cannot_start_stops_both_ranks_in_one_line(tmp_path):
    """Two gloo processes (torchrun's environment, no agent to kill the survivor, as on a multi-node run): W&B fails
    on rank 0, and both ranks exit 2 within the test's timeout, rank 0 with one line naming the tracker, before any
    record is written."""
    with socket.socket() as s_:
        s_.bind(("127.0.0.1", 0))
        port = s_.getsockname()[1]
    code = LAUNCH_WITH_FAILING_WANDB.format(root=ROOT)
    args = FLAGS + ["--sample-every", "0", "--log", "wandb", "--out", str(tmp_path / "run")]
    procs = [subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(subprocess_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                       RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2"))
             for r in range(2)]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:                                        # a rank left waiting at a collective
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], errs
    lines = [ln for ln in errs[0].splitlines() if ln.strip()]
    assert lines[-1] == "train_dit.py: error: --log wandb could not start: wandb.init(): network error " \
                        "(ConnectTimeout), entering retry loop", errs[0]
    assert "Traceback" not in errs[0] + errs[1] and "error" not in errs[1]
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_a_tracker_failing_mid_run_is_dropped_with_a_warning(tmp_path, monkeypatch, capsys):
    fake = FakeWandb()

    def log(payload, step):
        if step >= 3:
            raise OSError("wandb: disk full")
        fake.logged.append((step, payload))
    fake.log = log
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert train_dit.main(FLAGS + ["--sample-every", "0", "--log", "wandb", "--out", str(tmp_path)]) == 0
    assert "warning: --log wandb failed at step 3 (wandb: disk full)" in capsys.readouterr().out
    assert [s for s, p in fake.logged if "loss" in p] == [1, 2] and len(logged_losses(tmp_path)) == 4
    assert read_log(tmp_path)[-1]["event"] == "done"


def test_evaluate_rows_and_sweep_grouping(tmp_path, monkeypatch):
    seen = []

    class Sink:
        def __call__(self, record, images=None):
            seen.append(record)

        def close(self):
            seen.append("closed")
    args = types.SimpleNamespace(log="tensorboard", ckpt=None, out=str(tmp_path), log_group="", log_name="")
    ev.log_rows(args, [{"cfg_scale": 1.5, "fid": 12.0}, {"cfg_scale": 4, "fid": 9.0}], [Sink()])
    assert seen == [{"event": "eval/cfg1.5", "step": 0, "cfg_scale": 1.5, "fid": 12.0},
                    {"event": "eval/cfg4", "step": 0, "cfg_scale": 4, "fid": 9.0}]
    cfg = sweep.parse_args(["--preset", "smoke", "--out", str(tmp_path / "smk"), "--log", "tensorboard"])
    for run in sweep.plan(cfg):
        name = f"{sweep.cell_name(run.cell)}/seed{run.seed}"
        for cmd in (run.train_cmd, run.eval_cmd):
            i = cmd.index("--log")
            assert cmd[i:i + 6] == ["--log", "tensorboard", "--log-group", "smk", "--log-name", name]
    assert "--log" not in sweep.plan(sweep.parse_args(["--preset", "smoke", "--out", str(tmp_path)]))[0].train_cmd


def test_evaluate_starts_its_tracker_before_sampling_and_a_failure_is_one_line(tmp_path, monkeypatch, capsys):
    """evaluate.py --log wandb: a W&B that cannot start stops it before a sample is drawn (one line, exit 2, nothing
    written); one that starts receives a row per guidance scale at the checkpoint's step."""
    from test_evaluate import TinyExtractor, jit_save
    assert train_dit.main(FLAGS + ["--sample-every", "0", "--out", str(tmp_path / "run")]) == 0
    extractor = jit_save(TinyExtractor(), tmp_path / "tiny.pt")
    flags = [str(tmp_path / "run" / "last.pt"), "--num-samples", "10", "--cfg-scales", "1,2", "--steps", "2",
             "--features", str(extractor), "--resize", "none", "--log", "wandb"]
    fake = FakeWandb()

    def offline_init(**kw):
        raise ConnectionError("wandb.init(): network error (ConnectTimeout), entering retry loop")
    fake.init = offline_init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    capsys.readouterr()
    expect_one_line_error(capsys, ev.main, "evaluate.py", flags + ["--out", str(tmp_path / "failed")],
                          "--log wandb could not start: wandb.init(): network error")
    assert not (tmp_path / "failed" / "results.json").exists() and not list((tmp_path / "failed").rglob("*.npz"))
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with monkeypatch.context() as m:                                     # a fault after it started: still finished
        m.setattr(ev, "sample_and_evaluate", lambda *a, **kw: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            ev.main(flags + ["--out", str(tmp_path / "fault")])
    assert len(fake.inits) == 1 and fake.finished == 1
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert ev.main(flags + ["--out", str(tmp_path / "eval")]) == 0
    rows = [(step, payload) for step, payload in fake.logged if any(k.startswith("eval/cfg") for k in payload)]
    assert [step for step, _ in rows] == [4, 4] and fake.inits[0]["job_type"] == "eval" and fake.finished == 1


def test_missing_package_and_unknown_tracker_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)                     # import wandb -> ImportError
    expect_one_line_error(capsys, train_dit.main, "train_dit.py", FLAGS + ["--log", "wandb", "--out",
                                                                          str(tmp_path / "a")], "pip install wandb")
    assert not (tmp_path / "a").exists()
    expect_one_line_error(capsys, train_dit.main, "train_dit.py", FLAGS + ["--log", "mlflow", "--out",
                                                                          str(tmp_path / "b")], "'mlflow'")
    assert sweep.main(["--preset", "smoke", "--out", str(tmp_path / "s"), "--log", "wandb", "--dry-run"]) == 2
    assert "pip install wandb" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match="pip install tensorboard"):
        tracking.parse_trackers("tensorboard")
