"""Tests for sweep.py: grid and cell logic, the interval math against scipy, dry-run commands, the smoke preset end to
end, resume after a simulated kill, and bad input."""

import json
import math
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

import sweep
from test_evaluate import TinyExtractor, jit_save   # the stand-in judge: 8-d features, 5 logits

REPO = Path(__file__).resolve().parents[1]


def run_sweep(*args):
    return subprocess.run([sys.executable, "sweep.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


# ---- cells ----


def test_grid_product_names_and_where_keys_go():
    cells = sweep.parse_grid(["corrupt=0,0.05", "cep=none,uniform", "cads=off,on", "builtin-length=100"])
    assert len(cells) == 8 and cells[0] == {"corrupt": "0", "cep": "none", "cads": "off", "builtin_length": "100"}
    names = [sweep.cell_name(c) for c in cells]
    assert names[0] == "builtin_length100_clean" and "builtin_length100_corrupt0.05_cepuniform_cadson" in names
    assert len(set(names)) == 8
    train, evaluate = sweep.cell_args({"corrupt": "0.05", "cads": "on", "builtin_length": "100"})
    assert train == ["--corrupt", "0.05", "--builtin-length", "100"] and evaluate == ["--cads-noise", "0.1"]
    assert sweep.cell_args({"cads": "off"}) == ([], [])
    # the clean counterpart keeps the context and resets every treatment, "0.0" == "0"
    assert sweep.clean_counterpart({"corrupt": "0.05", "cep": "uniform", "builtin_length": "100"}) == \
        {"corrupt": "0", "cep": "none", "builtin_length": "100"}
    assert sweep.cell_name({"corrupt": "0.0", "cep": "none"}) == "clean"
    # a switch axis: the "Fixed CEP" readings pair with the per-step CEP of the same cell
    assert sweep.cell_args({"cep_fixed_delta": "on"})[0] == ["--cep-fixed-delta"]
    assert sweep.cell_args({"cep_fixed_delta": "off"})[0] == ["--no-cep-fixed-delta"]
    assert sweep.clean_counterpart({"cep_fixed_delta": "on", "cep_subset": "0.5"}) == \
        {"cep_fixed_delta": "off", "cep_subset": "1"}
    # the Fig. 2 plot's x axis: η if it varies, else a varying numeric axis such as the training-set size
    named = {sweep.cell_name(c): c for c in cells}
    assert sweep.x_axis(named) == "corrupt"
    assert sweep.x_axis({"a": {"builtin_length": "50", "cep": "none"}, "b": {"builtin_length": "500", "cep": "none"}}) \
        == "builtin_length"


# ---- interval math ----


def test_t_interval_matches_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7):
        x = rng.normal(3.0, 2.0, size=n)
        mean, half = sweep.t_interval(x)
        lo, hi = scipy.stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
        assert mean == pytest.approx(np.mean(x)) and (mean - half, mean + half) == pytest.approx((lo, hi), rel=1e-10)
    assert np.isnan(sweep.t_interval([1.0])[1]) and np.isnan(sweep.t_interval([])[0])


def _rows(cell, values_by_seed):
    return [{"cell": cell, "seed": seed, "cfg_scale": s, "fid": v, "precision": -v}
            for seed, per_scale in values_by_seed.items() for s, v in per_scale.items()]


def test_summary_best_scale_and_paired_difference_match_scipy():
    rng = np.random.default_rng(1)
    clean = {seed: {1.0: 10 + rng.normal(), 2.0: 8 + rng.normal()} for seed in range(4)}
    treated = {seed: {1.0: 9 + rng.normal(), 2.0: 12 + rng.normal()} for seed in range(4)}
    rows = _rows("clean", clean) + _rows("corrupt0.1", treated)
    runs = [sweep.Run({"corrupt": c}, 0, Path("."), [], [], [1.0, 2.0]) for c in ("0", "0.1")]
    summary = sweep.summarize(rows, runs, "fid", fixed_scale=2.0)
    assert summary["best_scale"] == {"clean": 2.0, "corrupt0.1": 1.0}          # the lowest mean FID of each cell
    best = summary["cells"]["corrupt0.1"]["metrics"]["fid"]["best"]
    a, b = [treated[s][1.0] for s in range(4)], [clean[s][2.0] for s in range(4)]
    lo, hi = scipy.stats.ttest_rel(a, b).confidence_interval(0.95)            # paired, each at its best scale
    assert (best["diff"] - best["diff_ci"], best["diff"] + best["diff_ci"]) == pytest.approx((lo, hi), rel=1e-10)
    fixed = summary["cells"]["corrupt0.1"]["metrics"]["precision"]["fixed"]    # higher is better, at s = 2
    assert fixed["scale"] == 2.0 and fixed["mean"] == pytest.approx(-np.mean([treated[s][2.0] for s in range(4)]))
    assert "diff" not in summary["cells"]["clean"]["metrics"]["fid"]["best"]


def test_shape_columns_are_summarized_higher_is_better_and_can_pick_the_scale():
    """evaluate.py's built-in shape columns (cross / disc IoU) are sweep metrics: summarized per cell, and the
    scale chooser takes the highest mean when asked to choose by them."""
    rows = [{"cell": "clean", "seed": seed, "cfg_scale": s, "fid": 5.0, "shape_iou_cross": iou,
             "shape_iou_disc": 0.9} for seed in range(2) for s, iou in ((1.0, 0.6), (2.0, 0.7), (4.0, 0.65))]
    runs = [sweep.Run({"corrupt": "0"}, 0, Path("."), [], [], [1.0, 2.0, 4.0])]
    summary = sweep.summarize(rows, runs, "shape_iou_cross", fixed_scale=4.0)
    assert summary["best_scale"] == {"clean": 2.0}
    metrics = summary["cells"]["clean"]["metrics"]
    assert metrics["shape_iou_cross"]["best"]["mean"] == pytest.approx(0.7)
    assert metrics["shape_iou_disc"]["fixed"]["mean"] == pytest.approx(0.9)
    sweep.check(sweep.SweepConfig(grid=["corrupt=0"], metric="shape_iou_cross"))     # accepted, no error


def test_ablations_are_treatments_paired_with_their_clean_value_and_edge_scales_are_flagged(tmp_path):
    """`--grid cond_dropout=0,0.1` pairs 0.1 with 0 (not each cell with itself), likewise the other ablation flags;
    a cell whose best guidance scale is the grid's lowest or highest is named in summary.json and summary.md."""
    for key, clean, treated in (("cond_dropout", "0", "0.1"), ("label_smoothing", "0", "0.1"),
                                ("cep_gamma", "0", "0.5"), ("cep_subset", "1", "0.5")):
        assert sweep.clean_counterpart({key: treated, "builtin_length": "50"}) == {key: clean, "builtin_length": "50"}
        assert sweep.cell_name({key: clean}) == "clean" and sweep.cell_name({key: treated}) == f"{key}{treated}"
    assert sweep.clean_counterpart({"cep": "uniform", "cep_subset": "0.5"}) == {"cep": "none", "cep_subset": "1"}
    rng = np.random.default_rng(2)
    clean = {seed: {1.0: 10 + rng.normal(), 2.0: 8 + rng.normal(), 4.0: 9 + rng.normal()} for seed in range(3)}
    treated = {seed: {1.0: 7 + rng.normal(), 2.0: 9 + rng.normal(), 4.0: 12 + rng.normal()} for seed in range(3)}
    rows = _rows("clean", clean) + _rows("cond_dropout0.1", treated)
    runs = [sweep.Run(c, 0, Path("."), [], [], [1.0, 2.0, 4.0]) for c in sweep.parse_grid(["cond_dropout=0,0.1"])]
    summary = sweep.summarize(rows, runs, "fid", fixed_scale=2.0)
    best = summary["cells"]["cond_dropout0.1"]["metrics"]["fid"]["best"]
    assert summary["cells"]["cond_dropout0.1"]["clean"] == "clean" and best["diff_n"] == 3
    assert best["diff"] == pytest.approx(np.mean([treated[s][1.0] - clean[s][2.0] for s in range(3)]))
    assert summary["best_at_edge"] == {"cond_dropout0.1": "lowest"}        # clean's best, s = 2, is inside the grid
    sweep.write_summary(summary, tmp_path / "summary.md", "")
    text = (tmp_path / "summary.md").read_text()
    assert "| cond_dropout0.1 | 3 | 1 (edge) |" in text and "| clean | 3 | 2 |" in text
    assert "cond_dropout0.1: s = 1 is the lowest scale evaluated" in text


def test_out_naming_an_existing_file_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "x").write_text("not a folder")
    for out in (tmp_path / "x", tmp_path / "x" / "sub"):                  # --out itself, or a folder above it
        assert sweep.main(["--preset", "smoke", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sweep.py: error: --out") and "is a file" in err and len(err.strip().splitlines()) == 1
        assert (tmp_path / "x").read_text() == "not a folder"


# ---- dry run ----


def test_dry_run_prints_the_in1k_protocol_with_torchrun(tmp_path, capsys):
    assert sweep.main(["--preset", "in1k-dit", "--out", str(tmp_path / "dit"), "--nproc", "8",
                       "--train", "--latents /d/lat", "--dry-run"]) == 0
    cmds = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(cmds) == 2 * 10                                   # 7 η + CEP-U + CEP-G + IP, one seed, train + eval
    assert all(c.startswith("torchrun --standalone --nproc_per_node=8 ") for c in cmds)
    train = [c for c in cmds if " train_dit.py " in c]
    assert sum("--corrupt 0.075 --cep none" in c for c in train) == 1 and sum("--ip 0.1" in c for c in train) == 1
    assert all("--preset dit-xl2-in1k" in c and c.endswith("--resume auto") and "--latents /d/lat" in c
               for c in train)
    evals = [c for c in cmds if " evaluate.py " in c]
    assert all("--num-samples 50000" in c and "1.5,1.75,2.0" in c for c in evals)
    assert not (tmp_path / "dit").exists()                        # a dry run writes nothing


def test_raw_class_embedding_is_an_eval_treatment_paired_with_the_smoothed_reading(tmp_path, capsys):
    """raw_class_embedding=on samples the same training run's raw class rows (evaluate.py --raw-class-embedding);
    with --label-smoothing in --train its clean pair is the cell sampled as trained, the other reading."""
    assert sweep.main(["--grid", "raw_class_embedding=off,on", "--train", "--label-smoothing 0.1", "--seeds", "0",
                       "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    cmds = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    train = [c for c in cmds if " train_dit.py " in c]
    evals = [c for c in cmds if " evaluate.py " in c]
    assert all("--label-smoothing 0.1" in c and "--raw" not in c for c in train)
    assert ["--raw-class-embedding" in c for c in evals] == [False, True]
    assert sweep.cell_name(sweep.clean_counterpart({"raw_class_embedding": "on"})) == "clean"
    # gridded with the smoothing itself, both readings pair with the clean (unsmoothed) run
    cell = {"label_smoothing": "0.1", "raw_class_embedding": "on"}
    assert sweep.clean_counterpart(cell) == {"label_smoothing": "0", "raw_class_embedding": "off"}
    assert sweep.cell_args(cell) == (["--label-smoothing", "0.1"], ["--raw-class-embedding"])


class FakeRunner(sweep.Runner):
    """Runs nothing: a train command writes its run's "done" event, an eval command its results.json; both counted."""

    def __init__(self):
        super().__init__(1)
        self.trained, self.evaluated, self.busy = [], [], set()

    def __call__(self, cmd, log_path):
        out = Path(cmd[cmd.index("--out") + 1])
        with self.lock:
            assert out not in self.busy, f"two jobs at once in {out}"
            self.busy.add(out)
        time.sleep(0.01)
        out.mkdir(parents=True, exist_ok=True)
        if "evaluate.py" in cmd[1]:
            scales = [float(x) for x in cmd[cmd.index("--cfg-scales") + 1].split(",")]
            (out / "results.json").write_text(json.dumps({"rows": [{"cfg_scale": x, "fid": 1.0} for x in scales]}))
            self.evaluated.append((Path(cmd[2]).parent, out.parent))
        else:
            (out / "log.jsonl").write_text(json.dumps({"event": "done", "step": 3}) + "\n")
            self.trained.append(out)
        with self.lock:
            self.busy.discard(out)
        self.cpu_seconds[threading.get_ident()] = 0.0
        return 0


def test_cells_that_differ_only_in_eval_keys_share_one_training_run(tmp_path):
    """`--grid cads=off,on` trains each (corrupt, seed) once and evaluates it twice, into each cell's own eval/; with
    two jobs no training folder is ever used by two at once."""
    cfg = sweep.SweepConfig(out=str(tmp_path), grid=["cads=off,on", "corrupt=0,0.1"], seeds="0,1", jobs=2,
                            train="--steps 3", eval="--cfg-scales 1,2")
    runs = sweep.plan(cfg)
    runner = FakeRunner()
    assert sweep.run_all(runs, cfg, runner)
    runs_dir = tmp_path.resolve() / "runs"
    assert sorted(runner.trained) == sorted(runs_dir / c / f"seed{s}" for c in ("clean", "corrupt0.1") for s in (0, 1))
    assert len(runner.evaluated) == 8
    assert (runs_dir / "clean" / "seed1", runs_dir / "cadson" / "seed1") in runner.evaluated      # clean's weights
    assert all(sweep.is_trained(r) and sweep.is_evaluated(r) for r in runs)
    assert not (runs_dir / "cadson" / "seed0" / "log.jsonl").exists()
    again = FakeRunner()                                                  # a rerun finds everything done
    assert sweep.run_all(runs, cfg, again) and again.trained == again.evaluated == []
    (runs_dir / "corrupt0.1" / "seed0" / "log.jsonl").unlink()           # as a folder from before the sharing:
    assert sweep.run_all(runs, cfg, again) and again.trained == []        # its cells' results need no training


def test_the_fashion_key_arms_are_the_protocols(tmp_path):
    """memorize-v2-fashion (fixed before its runs): the built-in part's recipe and measurement on Fashion-MNIST at the
    map's k = 2, the five key arms, seeds 0-4; the analysis reads family A (4 treatments) and B (gamma 4 - control)."""
    from tools import memorize_v2
    cfg = sweep.parse_args(["--preset", "memorize-v2-fashion", "--out", str(tmp_path)])
    runs = sweep.plan(cfg, features="judge.pt")
    cells = sorted({r.name.split("/")[0] for r in runs})
    assert cells == ["cepuniform_cep_gamma1", "cepuniform_cep_gamma4", "clean", "corrupt0.05_corrupt_moderandom",
                     "corrupt0.2"] and sorted({r.seed for r in runs}) == [0, 1, 2, 3, 4]
    v2 = sweep.PRESETS["memorize-v2"]
    assert all(cfg_value == v2[k] for k, cfg_value in sweep.PRESETS["memorize-v2-fashion"].items()
               if k in ("eval", "eval_steps", "curve_eval", "judge", "metric", "fixed_scale", "script"))
    train = runs[0].train_cmd
    assert sweep.flag_value(train, "--data", None) == "fashion-mnist" and sweep.flag_value(train, "--items-per-class",
                                                                                          None) == "2"
    assert sweep.flag_value(train, "--steps", None) == "6000" and sweep.flag_value(train, "--image-size", None) == "8"
    assert tuple(sorted(runs[0].curve)) + (6000,) == memorize_v2.PROTOCOL_STEPS
    families = memorize_v2.families(cells)
    assert len(families["A"]) == 4 and families["B"] == [("cepuniform_cep_gamma4", "corrupt0.05_corrupt_moderandom")]


def test_the_cpu_default_preset_samples_one_training_run_per_seed_with_both_samplers(tmp_path):
    cfg = sweep.parse_args(["--preset", "cpu-default", "--out", str(tmp_path)])
    runs = sweep.plan(cfg, features="judge.pt")
    assert {r.run_dir.parent.name for r in runs} == {"clean"} and len(runs) == 4
    samplers = sorted(sweep.flag_value(r.eval_cmd, "--sampler", None) for r in runs)
    assert samplers == ["ddpm", "ddpm", "dpm++", "dpm++"]
    assert all(sweep.flag_value(r.eval_cmd, "--train-ref", None) == "" for r in runs)   # the preset's word wins



class FakeCurveRunner(FakeRunner):
    """FakeRunner whose training keeps step_XXXXXXX.pt every --keep-every steps up to --steps, and whose evaluation
    of a checkpoint at scale s scores fid = its step + s (last.pt: 100 + s)."""

    def __call__(self, cmd, log_path):
        rc = super().__call__(cmd, log_path)
        out = Path(cmd[cmd.index("--out") + 1])
        if "evaluate.py" in cmd[1]:
            ckpt = Path(cmd[2]).name
            fid = 100.0 if ckpt == "last.pt" else float(ckpt[5:12])
            scales = sweep.eval_scales(cmd)                                     # the last --cfg-scales
            (out / "results.json").write_text(json.dumps({"rows": [{"cfg_scale": x, "fid": fid + x} for x in scales]}))
        else:
            steps, keep = (int(sweep.flag_value(cmd, f, None)) for f in ("--steps", "--keep-every"))
            for step in range(keep, steps + 1, keep):
                (out / f"step_{step:07d}.pt").write_text("weights")
            (out / "log.jsonl").write_text(json.dumps({"event": "done", "step": steps}) + "\n")
        return rc


def test_eval_steps_evaluate_kept_checkpoints_into_their_own_folders_and_resume(tmp_path):
    """--eval-steps 2,4 (below --steps 6): training keeps step_0000002.pt and step_0000004.pt, each is evaluated with
    --curve-eval's flags after --eval's into eval/step_XXXXXXX/; results.csv gains the step, the summary reads the
    final rows only; a rerun skips done evaluations even when their checkpoint is gone, and refuses one whose results
    and checkpoint are both gone."""
    cfg = sweep.SweepConfig(out=str(tmp_path), grid=["corrupt=0,0.1"], seeds="0,1", train="--steps 6",
                            eval="--cfg-scales 1,2 --num-samples 30", eval_steps="4,2,6,9",
                            curve_eval="--cfg-scales 1", fixed_scale=1.0)
    runs = sweep.plan(cfg)
    run = runs[0]
    assert sweep.flag_value(run.train_cmd, "--keep-every", None) == "2"             # the steps' gcd
    assert sweep.flag_value(run.train_cmd, "--ckpt-every", None) == "2"
    assert sorted(run.curve) == [2, 4]                                            # 6 is the final step, 9 beyond it
    cmd = run.curve[4]
    assert cmd[cmd.index("evaluate.py") + 1] == str(run.run_dir / "step_0000004.pt")
    assert cmd[cmd.index("--out") + 1] == str(run.folder / "eval" / "step_0000004")
    assert cmd.index("--cfg-scales") < cmd.index("--num-samples") < len(cmd) - 1 - cmd[::-1].index("--cfg-scales")
    assert run.curve_scales == [1.0] and run.scales == [1.0, 2.0]
    runner = FakeCurveRunner()
    assert sweep.run_all(runs, cfg, runner)
    assert len(runner.trained) == 4 and len(runner.evaluated) == 4 * 3
    summary = sweep.report(runs, cfg)
    import csv
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * (2 + 1 + 1)                       # per run: the final scales 1, 2; one row per checkpoint
    assert {(r["step"], r["cfg_scale"], r["fid"]) for r in rows if r["cell"] == "clean" and r["seed"] == "0"} == \
        {("2", "1.0", "3.0"), ("4", "1.0", "5.0"), ("6", "1.0", "101.0"), ("6", "2.0", "102.0")}
    assert summary["cells"]["clean"]["metrics"]["fid"]["fixed"] == {"scale": 1.0, "mean": 101.0, "ci": 0.0, "n": 2}
    assert sweep.training_curves(rows, "fid", 1.0)["corrupt0.1"] == {"0": [(2, 3.0), (4, 5.0), (6, 101.0)],
                                                                     "1": [(2, 3.0), (4, 5.0), (6, 101.0)]}
    assert (tmp_path / "curve_fid.png").stat().st_size > 0
    for r in runs:                                            # results may be kept without their checkpoints
        r.checkpoint(2).unlink()
    again = FakeCurveRunner()
    assert sweep.run_all(runs, cfg, again) and again.trained == again.evaluated == []
    shutil.rmtree(run.curve_dir(2))                           # results and checkpoint gone: never written again
    with pytest.raises(ValueError, match="step_0000002.pt is gone"):
        sweep.run_all(runs, cfg, again)
    shutil.rmtree(run.curve_dir(4))                           # results gone, checkpoint kept: evaluated again
    shutil.copytree(runs[1].curve_dir(2), run.curve_dir(2))
    assert sweep.run_all(runs, cfg, again) and again.trained == [] and len(again.evaluated) == 1
    (run.folder / "eval" / "results.json").unlink()          # a run evaluated along training but not yet at its end
    summary = sweep.report(runs, cfg)
    fixed = summary["cells"]["clean"]["metrics"]["fid"]["fixed"]
    assert (fixed["mean"], fixed["n"]) == (101.0, 1) and math.isnan(fixed["ci"])             # its curve rows left out

# ---- end to end: smoke, resume after a kill, refusal of other settings ----


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    extractor = jit_save(TinyExtractor(), root / "tiny.pt")
    args = ["--preset", "smoke", "--out", root / "out", "--judge", "0", "--reference", "builtin:60",
            "--eval", f"--features {extractor} --resize none"]              # the judge swapped for a tiny extractor
    r = run_sweep(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"root": root, "out": root / "out", "args": args, "stdout": r.stdout}


def test_smoke_writes_results_summary_and_plots(smoke):
    out = smoke["out"]
    for name in ("results.csv", "summary.md", "table.md", "metric_vs_eta.png", "curves.png", "sweep.json"):
        assert (out / name).stat().st_size > 0, name
    import csv
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2                                 # cells x seeds x guidance scales
    assert {r["cell"] for r in rows} == {"clean", "corrupt0.2"} and {r["seed"] for r in rows} == {"0", "1"}
    assert all(float(r["precision"]) >= 0 and r["train.corrupt"] in ("0.0", "0.2") for r in rows)
    from plumbing.provenance import code_state                  # each row names the code that evaluated it
    assert {r["commit"] for r in rows} == {code_state()["commit"]} and {r["dirty"] for r in rows} <= {"True", "False"}
    text = (out / "summary.md").read_text()
    assert "| corrupt0.2 | 2 |" in text and "±" in text
    for run in ("clean/seed0", "corrupt0.2/seed1"):                # every run folder is a normal nanoCEP run
        assert (out / "runs" / run / "config.json").is_file() and (out / "runs" / run / "last.pt").is_file()


def _train_starts(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()
            if json.loads(line).get("event") == "start"]


def test_rerun_after_a_kill_resumes_only_what_is_missing(smoke):
    out = smoke["out"]
    killed_in_train, killed_in_eval = out / "runs" / "corrupt0.2" / "seed0", out / "runs" / "clean" / "seed1"
    untouched = out / "runs" / "clean" / "seed0"
    # a kill during training: the last checkpoint is the step-2 one and the log has no "done" yet
    shutil.copy(killed_in_train / "step_0000002.pt", killed_in_train / "last.pt")
    lines = (killed_in_train / "log.jsonl").read_text().splitlines()
    (killed_in_train / "log.jsonl").write_text("\n".join(l for l in lines if '"done"' not in l) + "\n")
    shutil.rmtree(killed_in_train / "eval")
    # a kill during evaluation: its results are missing
    (killed_in_eval / "eval" / "results.json").unlink()
    before = (untouched / "eval" / "results.json").stat().st_mtime_ns
    r = run_sweep(*smoke["args"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clean/seed0: already done" in r.stdout and "corrupt0.2/seed1: already done" in r.stdout
    assert "corrupt0.2/seed0: train" in r.stdout and "clean/seed1: eval" in r.stdout
    starts = _train_starts(killed_in_train)
    assert len(starts) == 2 and starts[1]["resumed_from"].endswith("last.pt") and starts[1]["step"] == 2
    assert len(_train_starts(killed_in_eval)) == 1                 # evaluation only, no retraining
    assert (untouched / "eval" / "results.json").stat().st_mtime_ns == before
    assert (killed_in_train / "eval" / "results.json").is_file()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_sweep_resumes_from_its_committable_files_alone(smoke, tmp_path):
    """Under results/<name>/, .gitignore leaves out checkpoints, samples, features and logs; what is left (the raw
    rows and run records) is a complete sweep: a rerun trains and evaluates nothing and writes the same results.csv."""
    repo = tmp_path / "repo"
    shutil.copytree(smoke["out"], repo / "results" / "smoke")
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    for args in (["init", "-q"], ["clean", "-fdXq"]):                   # remove every ignored file
        subprocess.run(["git", "-C", str(repo), *args], check=True)
    kept = [p.relative_to(repo / "results" / "smoke") for p in (repo / "results" / "smoke").rglob("*") if p.is_file()]
    assert not [p for p in kept if p.suffix in (".pt", ".png", ".log")] and Path("sweep.json") in kept
    run = Path("runs/clean/seed0")
    assert {run / "config.json", run / "log.jsonl", run / "provenance.json", run / "eval/results.json"} <= set(kept)
    r = run_sweep(*[repo / "results" / "smoke" if a == smoke["out"] else a for a in smoke["args"]])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(": already done") == 4 and not list((repo / "results" / "smoke").rglob("*.pt"))
    assert (repo / "results" / "smoke" / "results.csv").read_bytes() == (smoke["out"] / "results.csv").read_bytes()


def test_rerun_with_other_settings_is_refused(smoke):
    before = (smoke["out"] / "sweep.json").read_text()
    r = run_sweep(*smoke["args"], "--train", "--steps 6")
    assert r.returncode == 2 and r.stderr.startswith("sweep.py: error: ") and "train" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and (smoke["out"] / "sweep.json").read_text() == before


def test_protocols_pin_the_plain_dit_and_folders_from_before_the_pin_still_resume(tmp_path):
    """The committed CPU protocols train the plain DiT-T they were run with (not the convolutions and 2x-wide MLPs the
    tiny DiT now gets by default) on uniform timesteps (not --t-focus) with AdamW (not --optimizer muon); a sweep
    folder written before any of the pins holds the same runs, so a rerun resumes it."""
    import train_dit
    from config import parse_config
    from models import dit
    for preset in ("builtin", "builtin-eta", "builtin-probe", "memorize-map", "memorize-map16", "memorize", "memorize-quick"):
        flags = shlex.split(sweep.PRESETS[preset]["train"])
        cfg = parse_config(train_dit.DiTConfig, flags)
        assert dit.default_arch(cfg.model, cfg.pixel_channels, cfg.token_conv, cfg.mlp_ratio) == {
            "pixel_channels": 0, "token_conv": False, "mlp_ratio": 4.0}, preset
        assert cfg.t_focus == 0, preset                                 # and the uniform timesteps they ran with
        assert cfg.optimizer == "adamw", preset                         # and AdamW
    cfg = sweep.SweepConfig(out=str(tmp_path), grid=["corrupt=0"], train=sweep.MEM_TRAIN)
    runs = [sweep.Run({"corrupt": "0"}, 0, tmp_path, [], [], [1.0])]
    sweep.pin_protocol(cfg, runs)
    stored = json.loads((tmp_path / "sweep.json").read_text())
    for before in (sweep.MEM_TRAIN.replace(" --pixel-channels 0 --no-token-conv", ""),   # as written before a pin
                   sweep.MEM_TRAIN.replace(" --t-focus 0", ""),
                   sweep.MEM_TRAIN.replace(" --mlp-ratio 4", ""),
                   sweep.MEM_TRAIN.replace(" --optimizer adamw --t-focus 0 --mlp-ratio 4 --pixel-channels 0 "
                                           "--no-token-conv", ""),
                   sweep.MEM_TRAIN.replace(" --optimizer adamw", "")):
        assert before != sweep.MEM_TRAIN
        stored["train"] = before
        (tmp_path / "sweep.json").write_text(json.dumps(stored))
        sweep.pin_protocol(cfg, runs)                                   # accepted, and rewritten with the pins
        assert json.loads((tmp_path / "sweep.json").read_text())["train"] == sweep.MEM_TRAIN
    with pytest.raises(ValueError, match="train differ"):
        sweep.pin_protocol(sweep.SweepConfig(out=str(tmp_path), grid=["corrupt=0"], train="--steps 6"), runs)


@pytest.mark.parametrize("args, message", [
    (["--grid", "corrupt"], "expected KEY=V1,V2"),
    (["--grid", "corrupt=0", "--seeds", "0,0"], "distinct seeds"),
    (["--grid", "corrupt=0", "--script", "nope"], "--script"),
    (["--grid", "corrupt=0", "--metric", "loss"], "--metric"),
    (["--out", "x"], "no cells"),
    (["--grid", "raw_class_embedding=off,on"], "trains without label smoothing"),   # nothing to un-smooth
    (["--grid", "label_smoothing=0.1", "--grid", "raw_class_embedding=yes"], "expected on or off"),
    (["--grid", "corrupt=0", "--eval-steps", "2,x"], "--eval-steps: not a comma-separated list"),
    (["--grid", "corrupt=0", "--train", "--steps 6 --keep-every 3", "--eval-steps", "2,3"],
     "--keep-every 3 in the train flags keeps no checkpoint at step 2"),       # a checkpoint that would never exist
    (["--grid", "corrupt=0", "--judge", "100", "--train", "--data cifar10 --data-root /d"],
     "the judge knows builtin, digits and fashion-mnist only"),     # not the shapes judge on CIFAR
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    assert sweep.main(args if "--out" in args else [*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sweep.py: error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_memorize_presets_pair_every_cell_with_its_clean_run_and_flip_at_least_one_label():
    """Memorization protocol v1 (docs/results/memorization-v1.md): 6 cells x 5 seeds, each treated cell paired with
    the one clean cell, every η cell flipping >= 1 of its training labels (round(η N), N = items per class x 10),
    quick: 3 cells x 3 seeds."""
    import shlex
    import corrupt
    for name, runs_expected, cells_expected in (("memorize", 30, 6), ("memorize-quick", 9, 3)):
        cfg = sweep.parse_args(["--preset", name, "--out", "/tmp/unused"])
        runs = sweep.plan(cfg)
        names = {sweep.cell_name(r.cell) for r in runs}
        assert len(runs) == runs_expected and len(names) == cells_expected
        assert {sweep.cell_name(sweep.clean_counterpart(r.cell)) for r in runs} == {"clean"}
        args = shlex.split(cfg.train)
        n = 10 * int(args[args.index("--items-per-class") + 1])
        for r in runs:
            assert float(r.cell["corrupt"]) == 0 or corrupt._num_to_corrupt(float(r.cell["corrupt"]), n) >= 1, r.cell
