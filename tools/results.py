"""
tools/results.py: every published sweep number, regenerated from the raw rows committed under results/.

    python -m tools.results            # rewrite the quoted tables in docs/ and the plots in assets/results/
                                       # (a sweep's plots once all its runs are in)
    python -m tools.results --check    # exit 1 naming every table or file that differs from the raw rows

results/<name>/ is a sweep folder (python sweep.py ... --out results/<name>) less its heavy files (.gitignore):
sweep.json (the protocol), results.csv (one row per run x guidance scale), summary.json (sweep.py's summary: its
metric and fixed scale say how the rows are read), timings.jsonl, and runs/<cell>/seed<S>/ with config.json,
log.jsonl, provenance.json and eval/results.json (the raw rows; a rerun of the sweep finds them done and resumes).
A docs page (docs/**/*.md) quotes a table between two markers, the first naming the folder and the table:

    <!-- results:<name>:table -->      (sweep.py's table.md: Table-1 style, every metric at the fixed scale)
    <!-- results:<name>:summary -->    (summary.md's tables: best and fixed scale, paired differences to clean)
    <!-- results:<name>:curve -->      (a sweep with --eval-steps: the memorized share along training, per cell)
    <!-- results:<name>:endpoints -->  (the memorization protocol's per-cell endpoints, tools/memorize_v2.py)
    <!-- results:<name>:decisions -->  (its paired comparisons, Holm-adjusted, and the readings they give)
    <!-- results:<name>:progress -->   (how many of the protocol's runs are in, per cell: a sweep that runs in parts)
    <!-- results:<name>:rows -->       (each run's final row at every guidance scale, no averaging: one or two seeds)
    <!-- /results -->

The tables come from sweep.py's own summarize / table_text / summary_text, on results.csv, or on the runs' eval
results where the folder has them (results.csv and summary.json are then checked against them too).
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import sweep
from plumbing.common import ArgParser
from tools import memorize_v2

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- results:([A-Za-z0-9._-]+):([a-z]+) -->\n)(.*?)(<!-- /results -->)", re.DOTALL)
PLOTS = ("metric_vs_eta.png", "metric_vs_eta_fixed.png", "curves.png")


def _read(path: Path) -> str:
    """A file's text with its line ends as written (results.csv's are \\r\\n)."""
    with open(path, newline="") as f:
        return f.read()


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None


class Sweep:
    """One results folder read back: its runs (sweep.json), raw rows, and the summary they give."""

    def __init__(self, folder: Path):
        self.folder, self.name = folder, folder.name
        protocol, reading = _json(folder / "sweep.json"), _json(folder / "summary.json")
        try:
            cfg = sweep.SweepConfig(out=str(folder), script=protocol["script"], cells=protocol["cells"],
                                    seeds=",".join(map(str, protocol["seeds"])), train=protocol["train"],
                                    eval=protocol["eval"], reference=protocol["reference"], judge=protocol["judge"],
                                    eval_steps=protocol.get("eval_steps", ""),
                                    curve_eval=protocol.get("curve_eval", ""))
            metric, fixed_scale = reading["metric"], reading["fixed_scale"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{folder}: sweep.json or summary.json lacks {e} (not written by sweep.py?)") from None
        self.runs = sweep.plan(cfg)
        evaluated = [r for r in self.runs if (r.folder / "eval" / "results.json").is_file()]
        # the raw rows: the runs' own results when the folder has them, else results.csv as committed
        self.source = "runs/*/eval/results.json" if evaluated else "results.csv"
        self.csv = sweep.csv_text(sweep.collect(self.runs)) if evaluated else _read(folder / "results.csv")
        self.rows = sweep.parse_csv(self.csv, str(folder / "results.csv"))
        final = sweep.final_rows(self.rows, self.runs)       # the summary reads each run's final evaluation
        self.measured = {(r["cell"], str(r["seed"])) for r in final}   # the runs measured at their end
        # a sweep that runs in parts: its plots wait for its last run (a progress block says where it stands)
        self.complete = len(self.measured) == len(self.runs)
        self.summary = sweep.summarize(final, self.runs, metric, fixed_scale)
        self.fixed_scale, self.curves = fixed_scale, bool(sweep.parse_steps(cfg.eval_steps))
        final = sweep.requested_steps(self.runs[0].train_cmd) if self.runs else None
        self.steps = sorted({*self.runs[0].curve, final}) if self.runs and final else None   # the protocol's grid
        self.files = {folder / "summary.json": sweep.summary_json(self.summary)}
        if evaluated:
            self.files[folder / "results.csv"] = self.csv

    def table(self, kind: str) -> str | None:
        """A quoted table's text (None: no such table)."""
        if kind in ("table", "summary"):
            return {"table": sweep.table_text, "summary": sweep.summary_text}[kind](self.summary)
        if kind == "progress":
            return progress_text(self.runs, self.measured)
        if kind == "rows":
            return rows_text(sweep.final_rows(self.rows, self.runs))
        if not self.curves:                          # the kinds below read the metrics along training
            return None
        steps = self.steps                           # a run's endpoints need every one of them measured
        make = {"curve": lambda rows: curve_text(rows, self.fixed_scale),
                "endpoints": lambda rows: memorize_v2.endpoints_table(rows, steps),
                "decisions": lambda rows: memorize_v2.decisions_table(memorize_v2.analyse(rows, steps))}.get(kind)
        return None if make is None else make(self.rows) + "\n"      # the closing marker on a line of its own

    def plot(self, folder: Path):
        """sweep.py's plots of this sweep into folder/."""
        folder.mkdir(parents=True, exist_ok=True)
        sweep.plot_vs_eta(self.summary, self.runs, folder / PLOTS[0], "best")
        sweep.plot_vs_eta(self.summary, self.runs, folder / PLOTS[1], "fixed")
        sweep.plot_curves(self.rows, folder / PLOTS[2])
        if self.curves:                              # memorization along training, its distributions and pictures
            sweep.plot_training_curves(self.rows, "mem_ratio_px", self.fixed_scale, folder / "curve_mem_ratio_px.png")
            memorize_v2.figures(self.folder, folder, self.fixed_scale)


def progress_text(runs: list, measured: set) -> str:
    """How many of a sweep's planned runs are in (their (cell, seed) among `measured`), in all and per cell."""
    per_cell = {}
    for r in runs:
        cell = sweep.cell_name(r.cell)
        done, planned = per_cell.get(cell, (0, 0))
        per_cell[cell] = (done + ((cell, str(r.seed)) in measured), planned + 1)
    total = sum(done for done, _ in per_cell.values())
    cells = "; ".join(f"{cell} {done} of {planned}" for cell, (done, planned) in per_cell.items())
    return f"{total} of {len(runs)} runs in ({cells}).\n"


ROW_METRICS = ("class_acc", "shape_iou_disc", "shape_iou_cross", "edge_f1", "edge_f1_exact", "fid", "precision",
               "recall", "mem_ratio_px")          # a rows block's columns, those the sweep measured


def number(v) -> str:
    """A measured value as a rows block shows it: 3 significant digits, whole numbers from 1000 on, – for none."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def rows_text(rows: list) -> str:
    """Every final row as measured (cell, seed, guidance scale and the ROW_METRICS present), 3 significant digits."""
    metrics = [m for m in ROW_METRICS if any(r.get(m) is not None for r in rows)]
    lines = ["| cell | seed | s | " + " | ".join(sweep.METRIC_NAMES.get(m, m) for m in metrics) + " |",
             "|---" * (3 + len(metrics)) + "|"]
    for r in sorted(rows, key=lambda r: (r["cell"], r["seed"], r["cfg_scale"])):
        values = [number(r.get(m)) for m in metrics]
        lines.append(f"| {r['cell']} | {r['seed']} | {r['cfg_scale']:g} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def curve_text(rows: list, scale: float, metric: str = "mem_ratio_px") -> str:
    """The memorized share (%) along training per cell: mean ± 95 % t-interval over seeds at each evaluated step."""
    curves = sweep.training_curves(rows, metric, scale)
    steps = sorted({step for per_seed in curves.values() for pts in per_seed.values() for step, _ in pts})
    lines = [f"| cell (s = {scale:g}) | " + " | ".join(str(s) for s in steps) + " |", "|---" * (1 + len(steps)) + "|"]
    for cell, per_seed in curves.items():
        cols, per_step = [], sweep.step_intervals(per_seed)
        for step in steps:
            mean, half = (100 * x for x in per_step.get(step, (math.nan, math.nan)))
            cols.append("–" if math.isnan(mean) else f"{mean:.1f}" + ("" if math.isnan(half) else f" ± {half:.1f}"))
        lines.append(f"| {cell} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def load(results: Path) -> dict:
    """{name: Sweep} for every results/<name>/ holding a results.csv."""
    return {p.parent.name: Sweep(p.parent) for p in sorted(results.glob("*/results.csv"))}


def render(page: Path, sweeps: dict, results: Path) -> tuple[str, list, list]:
    """(the page with every block regenerated, [blocks that differ], [blocks that cannot be made]), one line each."""
    stale, bad = [], []

    def block(m):
        name, kind, old = m.group(2), m.group(3), m.group(4)
        where = f"{page}: block results:{name}:{kind}"
        new = sweeps[name].table(kind) if name in sweeps else None
        if new is None:
            bad.append(f"{where}: " + (f"no table {kind!r} (table, summary, progress, rows; curve, endpoints, "
                                           "decisions: with --eval-steps)" if name in sweeps
                                       else f"no {results / name / 'results.csv'}"))
            return m.group(0)
        if new != old:
            stale.append(f"{where} differs from what {results / name}/{sweeps[name].source} gives")
        return m.group(1) + new + m.group(5)

    return BLOCK.sub(block, _read(page)), stale, bad


def run(results: Path, docs: Path, assets: Path, check: bool) -> tuple[list, list]:
    """Compare every derived file and quoted block with the raw rows; unless check, rewrite those that differ and
    the plots (nothing is written when a block cannot be made). Returns ([what differs], [what cannot be made])."""
    sweeps = load(results)
    stale, bad, writes = [], [], {}
    for s in sweeps.values():
        for path, text in s.files.items():
            if not path.is_file() or _read(path) != text:
                stale.append(f"{path} differs from what {s.folder}/{s.source} gives")
                writes[path] = text
    for page in sorted(docs.rglob("*.md")) if docs.is_dir() else []:
        text, differ, cannot = render(page, sweeps, results)
        stale, bad = stale + differ, bad + cannot
        if differ:
            writes[page] = text
    if check or bad:
        return stale, bad
    for path, text in writes.items():
        with open(path, "w", newline="") as f:
            f.write(text)
    for s in sweeps.values():
        if s.complete:
            s.plot(assets / s.name)
    return stale, bad


def main(argv=None) -> int:
    p = ArgParser(prog="python -m tools.results", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare only: exit 1 listing what differs, 0 if nothing")
    p.add_argument("--results", type=Path, default=REPO / "results", help="the folder of committed sweep folders")
    p.add_argument("--docs", type=Path, default=REPO / "docs", help="the pages that quote their tables (*.md)")
    p.add_argument("--assets", type=Path, default=REPO / "assets" / "results", help="where the plots go, per sweep")
    args = p.parse_args(argv)
    try:
        stale, bad = run(args.results, args.docs, args.assets, args.check)
    except (ValueError, OSError) as e:
        print(f"tools.results: error: {e}", file=sys.stderr)
        return 2
    for line in bad:
        print(f"tools.results: error: {line}", file=sys.stderr)
    if bad:
        return 2                                    # a page quotes what is not there: nothing was written
    for line in stale:
        print(line if args.check else f"rewrote: {line}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
