"""Tests for tools/results.py: a results folder's quoted tables regenerate from its raw rows, and --check names
every block or file that no longer matches them (an edited number in a page, an edited raw row); the repository's
own results/ and docs/ pass the check."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import sweep
from scoring.stats import paired, t_interval
from tools import results

REPO = Path(__file__).resolve().parents[1]
PAGE = "# Results\n\nAt s = 2:\n\n<!-- results:tiny:table -->\nstale\n<!-- /results -->\n\nPaired:\n\n" \
       "<!-- results:tiny:summary -->\n<!-- /results -->\n"


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """results/tiny: 2 cells x 3 seeds, each run's eval/results.json at s = 1 and 2 with a known FID, reported by
    sweep.report as a sweep would; docs/page.md quoting its table and summary. Plots are stubs (seconds each) until
    monkeypatch.undo()."""
    for name in ("plot_vs_eta", "plot_curves"):
        monkeypatch.setattr(sweep, name, lambda *args: Path(args[2 if len(args) > 2 else 1]).write_bytes(b"stub"))
    cfg = sweep.SweepConfig(out=str(tmp_path / "results" / "tiny"), grid=["corrupt=0,0.1"], seeds="0,1,2",
                            train="--steps 3", eval="--cfg-scales 1,2", fixed_scale=2.0)
    runs = sweep.plan(cfg)
    sweep.pin_protocol(cfg, runs)
    fid = {(r.name, s): 10 + 3 * float(r.cell["corrupt"] != "0") + r.seed + s for r in runs for s in (1.0, 2.0)}
    for r in runs:
        (r.folder / "eval").mkdir(parents=True)
        (r.folder / "log.jsonl").write_text(json.dumps({"event": "done", "step": 3}) + "\n")
        rows = [{"cfg_scale": s, "fid": fid[r.name, s] + 0.1 * r.seed ** 2} for s in (1.0, 2.0)]
        (r.folder / "eval" / "results.json").write_text(json.dumps({"rows": rows, "provenance": {
            "commit": "c0ffee", "dirty": False}}))
    sweep.report(runs, cfg)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(PAGE)
    return tmp_path


def check(root: Path, capsys, *extra) -> tuple[int, list]:
    args = ["--results", str(root / "results"), "--docs", str(root / "docs"), "--assets", str(root / "assets")]
    code = results.main([*args, *extra])
    return code, capsys.readouterr().out.splitlines()


def test_tables_regenerate_from_the_raw_rows_and_check_passes(folder, capsys, monkeypatch):
    code, out = check(folder, capsys, "--check")
    assert code == 1 and len(out) == 2 and all("docs/page.md: block results:tiny:" in line for line in out)
    monkeypatch.undo()                                                    # sweep.py's real plots
    assert check(folder, capsys)[0] == 0                                   # write the blocks and plots
    assert check(folder, capsys, "--check") == (0, [])
    page = (folder / "docs" / "page.md").read_text()
    table = (folder / "results" / "tiny" / "table.md").read_text()
    assert f"<!-- results:tiny:table -->\n{table}<!-- /results -->" in page and "stale" not in page
    assert (folder / "results" / "tiny" / "summary.md").read_text().endswith(page.split(
        "<!-- results:tiny:summary -->\n")[1].split("<!-- /results -->")[0])
    # the quoted numbers are the estimates: the clean cell's mean ± t-interval and the paired difference at s = 2
    clean = [10 + k + 2 + 0.1 * k ** 2 for k in range(3)]
    treated = [13 + k + 2 + 0.1 * k ** 2 for k in range(3)]
    assert "| clean | **{} ± {}** |".format(*(f"{v:.3g}" if i == 0 else f"{v:.2g}" for i, v in
                                              enumerate(t_interval(clean)))) in page
    diff = paired(treated, clean)
    assert diff["half"] < 1e-9 and f"| corrupt0.1 | 3 | 2 | {np.mean(treated):.3g} ± " in page
    assert "| (clean) |" in page and f"| {diff['diff']:.3g} ± " in page
    assert all((folder / "assets" / "tiny" / name).read_bytes()[:4] == b"\x89PNG" for name in results.PLOTS)


def test_check_names_the_block_with_an_edited_number(folder, capsys):
    check(folder, capsys)
    page = folder / "docs" / "page.md"
    text = page.read_text()
    edited = text.replace("| clean | **13.2 ±", "| clean | **13.3 ±", 1)       # its mean is 13.17
    assert edited != text
    page.write_text(edited)
    code, out = check(folder, capsys, "--check")
    assert code == 1 and out == [f"{page}: block results:tiny:table differs from what "
                                 f"{folder / 'results' / 'tiny'}/runs/*/eval/results.json gives"]


def test_check_names_the_files_and_blocks_an_edited_raw_row_changes(folder, capsys):
    check(folder, capsys)
    raw = folder / "results" / "tiny" / "runs" / "clean" / "seed1" / "eval" / "results.json"
    data = json.loads(raw.read_text())
    data["rows"][1]["fid"] += 1.0                                         # s = 2 of one clean run
    raw.write_text(json.dumps(data))
    code, out = check(folder, capsys, "--check")
    assert code == 1 and {line.split(" differs")[0] for line in out} == {
        str(folder / "results" / "tiny" / "results.csv"), str(folder / "results" / "tiny" / "summary.json"),
        f"{folder / 'docs' / 'page.md'}: block results:tiny:table",
        f"{folder / 'docs' / 'page.md'}: block results:tiny:summary"}
    assert check(folder, capsys)[0] == 0 and check(folder, capsys, "--check") == (0, [])   # regenerated


def test_a_results_csv_without_runs_is_the_raw_rows(folder, capsys):
    """A folder holding results.csv but not the runs' eval results: the tables come from results.csv itself."""
    check(folder, capsys)
    import shutil
    shutil.rmtree(folder / "results" / "tiny" / "runs")
    assert check(folder, capsys, "--check") == (0, [])
    path = folder / "results" / "tiny" / "results.csv"
    rows = path.read_bytes().decode().split("\r\n")
    assert rows[1].startswith("clean,0,3,1.0,11.0,")          # cell, seed, step, scale, fid
    rows[1] = rows[1].replace("clean,0,3,1.0,11.0,", "clean,0,3,1.0,11.5,")
    path.write_bytes("\r\n".join(rows).encode())
    code, out = check(folder, capsys, "--check")
    assert code == 1 and any(line.startswith(f"{folder / 'docs' / 'page.md'}: block results:tiny:summary")
                             for line in out)


def test_results_csv_records_the_code_that_evaluated(folder):
    rows = sweep.parse_csv((folder / "results" / "tiny" / "results.csv").read_bytes().decode())
    assert {r["commit"] for r in rows} == {"c0ffee"} and {r["dirty"] for r in rows} == {"False"}


def test_a_block_quoting_a_missing_folder_is_an_error_and_nothing_is_written(folder, capsys):
    page = folder / "docs" / "page.md"
    page.write_text(PAGE + "\n<!-- results:nowhere:table -->\n<!-- /results -->\n")
    args = ["--results", str(folder / "results"), "--docs", str(folder / "docs"), "--assets", str(folder / "assets")]
    assert results.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tools.results: error: {page}: block results:nowhere:table: no {folder / 'results' / 'nowhere'}" \
                  "/results.csv"
    assert page.read_text().count("stale") == 1 and not (folder / "assets").exists()


def test_the_repository_results_match_their_raw_rows(capsys):
    """The guard of every published table: docs/ quotes what results/ gives (trivially true while neither exists)."""
    assert results.main(["--check"]) == 0, capsys.readouterr().out


def test_memorization_curves_and_decisions_regenerate_from_the_raw_rows(tmp_path, capsys):
    """A sweep with --eval-steps: its curve, endpoints and decisions blocks come from the checkpoints' rows (here a
    CEP cell that copies half as much at every step), and an edited checkpoint row makes --check fail."""
    cfg = sweep.SweepConfig(out=str(tmp_path / "results" / "mem"), grid=["cep=none,uniform"], seeds="0,1,2",
                            train="--steps 6", eval="--cfg-scales 1", eval_steps="2,4", fixed_scale=1.0,
                            metric="mem_ratio_px")
    runs = sweep.plan(cfg)
    sweep.pin_protocol(cfg, runs)
    share = {2: 0.1, 4: 0.5, 6: 0.9}
    for r in runs:
        cut = 0.5 if r.cell["cep"] == "uniform" else 1.0
        (r.folder / "log.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (r.folder / "log.jsonl").write_text(json.dumps({"event": "done", "step": 6}) + "\n")
        for step, folder in [(2, r.curve_dir(2)), (4, r.curve_dir(4)), (6, r.folder / "eval")]:
            folder.mkdir(parents=True, exist_ok=True)
            row = {"cfg_scale": 1.0, "mem_ratio_px": share[step] * cut + 0.01 * r.seed, "class_acc": 0.8,
                   "train_step": step}
            (folder / "results.json").write_text(json.dumps({"rows": [row]}))
    sweep.report(runs, cfg)
    (tmp_path / "docs").mkdir()
    page = "".join(f"<!-- results:mem:{k} -->\n<!-- /results -->\n" for k in ("curve", "endpoints", "decisions"))
    (tmp_path / "docs" / "page.md").write_text(page)
    assert check(tmp_path, capsys)[0] == 0
    assert check(tmp_path, capsys, "--check") == (0, [])
    text = (tmp_path / "docs" / "page.md").read_text()
    assert "| clean | 11.0 ± 2.5 | 51.0 ± 2.5 | 91.0 ± 2.5 |" in text             # mean ± t-interval per step, %
    assert "| cepuniform | 6.0 ± 2.5 | 26.0 ± 2.5 | 46.0 ± 2.5 |" in text
    assert "| A | cepuniform − clean | 3 | -45.0 ± 0.0 |" in text and "lowers the plateau" in text
    bad = runs[0].curve_dir(4) / "results.json"
    bad.write_text(bad.read_text().replace('"mem_ratio_px": 0.5', '"mem_ratio_px": 0.7'))
    code, out = check(tmp_path, capsys, "--check")
    assert code == 1 and any("block results:mem:curve" in line for line in out)
    (tmp_path / "docs" / "page.md").write_text("<!-- results:mem:progress -->\n<!-- /results -->\n")
    unfinished = next(r for r in runs if r.cell["cep"] == "uniform")
    (unfinished.folder / "eval" / "results.json").unlink()                  # a run not yet measured at its end
    assert (tmp_path / "assets" / "mem" / "curve_mem_ratio_px.png").is_file()  # drawn while the sweep was complete
    shutil.rmtree(tmp_path / "assets" / "mem")
    assert check(tmp_path, capsys)[0] == 0
    assert "5 of 6 runs in (clean 3 of 3; cepuniform 2 of 3)." in (tmp_path / "docs" / "page.md").read_text()
    assert not (tmp_path / "assets" / "mem").exists()                       # no plots of a sweep still running


def test_a_rows_block_quotes_every_final_row_as_measured(folder, capsys):
    """The rows kind (one or two seeds: no averaging) lists each run's final row at each scale, its value as written."""
    (folder / "docs" / "page.md").write_text("<!-- results:tiny:rows -->\n<!-- /results -->\n")
    assert check(folder, capsys)[0] == 0
    block = (folder / "docs" / "page.md").read_text().splitlines()[1:-1]
    assert block[0] == "| cell | seed | s | FID |" and len(block) == 2 + 2 * 3 * 2
    fid = 10 + 3 + 2 + 2 + 0.1 * 4                                      # corrupt0.1, seed 2, s = 2
    assert f"| corrupt0.1 | 2 | 2 | {fid:.3g} |" in block
    assert check(folder, capsys, "--check") == (0, [])
    assert [results.number(v) for v in (None, float("nan"), 1234.6, 0.12345, 271.44)] == ["–", "–", "1235", "0.123",
                                                                                          "271"]
