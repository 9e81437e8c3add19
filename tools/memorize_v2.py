"""
memorize_v2.py: the analysis of the memorization protocol v2 (docs/results/memorization-v2.md), fixed before its runs.

    python -m tools.memorize_v2 pilot results/memorize-v2-pilot     # the control's eta_r from the pilot's rows
    python -m tools.memorize_v2 analyse results/memorize-v2         # endpoints, Holm families, decisions (markdown)
    python -m tools.memorize_v2 map results/<the map's folder>       # the real-data part's items per class

The protocol's analysis (per run, at s = 1, from the sweep's results.csv with its `step` column):
    P1  the memorized share (mem_ratio_px) at the last step, the plateau
    P2  the mean share over the checkpoints (trapezoid over steps, divided by their span), the curve
Each as the paired difference (same seed) to the comparison arm: mean, 95 % t-interval, two-sided paired t-test.
Family A: every treatment against clean on P1 and P2; family B: CEP-U gamma 4 against the control, CEP-G at CEP-U
gamma 1's noise std against CEP-U gamma 1. Holm within each family at alpha 0.05; decide() applies the page's rules.

The pilot rule: the control (random label corruption, --corrupt-mode random) is set to the strength eta_r at which its
class accuracy matches CEP-U gamma = 4's. Class accuracy is read at s = 1 from the sweep's results.csv, averaged over
seeds per cell, and interpolated linearly in eta_r through (0, clean) and the pilot's arms; eta_r is the smallest
crossing of the target, rounded to the nearest 0.05 (halves up) and kept inside the arms' range. A target no segment
crosses is "unmatched" and takes the nearest end of the grid's non-zero values. Only class accuracy enters the rule.

The map rule (the real-data part): the key arms use the largest k (items per class) whose clean run's memorized share
at s = 1 reaches 30 % at some checkpoint up to step 6000; if none does, the smallest k.
"""
import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np

ALPHA = 0.05                               # family-wise, Holm within each family
MARGIN = 0.10                              # the named effect size: 10 points of share ("no effect" lies inside it)
MATCH = 0.05                               # class accuracies within 5 points count as matched
PROTOCOL_STEPS = tuple(range(2000, 6001, 500))   # where the protocol measures every run (the last: the plateau)
ONSET = 0.25                               # the onset step: where a run's share first reaches 25 % (secondary)
TARGET_CELL = "cepuniform_cep_gamma4"       # CEP-U gamma = 4, the arm whose class accuracy the control matches
CLEAN_CELL = "clean"
CONTROL_PREFIX = "corrupt"                 # the random arms' cells: corrupt<eta>_corrupt_moderandom
STEP = 0.05                                # eta_r's resolution
MAP_SHARE = 0.30                           # the map: a k "copies" when its clean run reaches this share ...
MAP_LAST_STEP = 6000                       # ... at some checkpoint up to this step


def cell_means(rows: list, metric: str = "class_acc", scale: float = 1.0) -> dict:
    """{cell: mean over seeds of `metric` at guidance `scale`} from results.csv rows (strings, as csv reads them)."""
    per_cell = {}
    for r in rows:
        if r.get(metric, "") in ("", None) or abs(float(r["cfg_scale"]) - scale) > 1e-6:
            continue
        per_cell.setdefault(r["cell"], []).append(float(r[metric]))
    return {c: float(np.mean(v)) for c, v in per_cell.items()}


def random_arms(means: dict) -> dict:
    """{eta_r: mean class accuracy} of the random-corruption cells."""
    arms = {}
    for cell, value in means.items():
        if cell.startswith(CONTROL_PREFIX) and cell.endswith("_corrupt_moderandom"):
            arms[float(cell[len(CONTROL_PREFIX):].split("_")[0])] = value
    return arms


def pilot_eta(clean: float, target: float, arms: dict) -> tuple[float, bool]:
    """(eta_r, matched): the smallest eta_r where the piecewise-linear accuracy curve through (0, clean) and the arms
    reaches `target`, rounded to STEP; unmatched targets take the grid's nearest non-zero end."""
    etas = sorted(arms)
    xs, ys = [0.0] + etas, [clean] + [arms[e] for e in etas]
    if target >= clean:                    # CEP costs no class accuracy: nothing to match
        return etas[0], False
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if min(y0, y1) <= target <= max(y0, y1) and y0 != y1:
            eta = x0 + (target - y0) * (x1 - x0) / (y1 - y0)
            snapped = round(math.floor(eta / STEP + 0.5 + 1e-9) * STEP, 10)       # nearest STEP, halves up
            return min(max(snapped, etas[0]), etas[-1]), True
    return etas[-1], False                 # below every arm: the strongest arm, unmatched


def pilot(folder: Path) -> dict:
    """The pilot's reading: the cells' mean class accuracies and the control's eta_r."""
    with open(folder / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    means = cell_means(rows)
    missing = [c for c in (CLEAN_CELL, TARGET_CELL) if c not in means]
    arms = random_arms(means)
    if missing or not arms:
        raise ValueError(f"{folder}/results.csv lacks the pilot's cells: {missing or 'the random arms'}")
    eta, matched = pilot_eta(means[CLEAN_CELL], means[TARGET_CELL], arms)
    return {"class_acc": means, "eta_r": eta, "matched": matched}


def map_k(rows: list) -> tuple[int, dict]:
    """The map rule: (the k the key arms use, {k: the highest share at s = 1 up to MAP_LAST_STEP})."""
    k_of = {r["cell"]: int(float(r["train.items_per_class"])) for r in rows}
    best = {}
    for cell, seeds in curves(rows).items():
        shares = [v for pts in seeds.values() for step, v in pts if step <= MAP_LAST_STEP and not math.isnan(v)]
        if shares:
            best[k_of[cell]] = max(best.get(k_of[cell], 0.0), max(shares))
    if not best:
        raise ValueError("no memorization curve at s = 1 in the map's rows")
    copying = [k for k, share in best.items() if share >= MAP_SHARE]
    return (max(copying) if copying else min(best)), best


# ---- the protocol's analysis ----


def read_rows(folder: Path) -> list:
    with open(folder / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def curves(rows: list, metric: str = "mem_ratio_px", scale: float = 1.0, steps=None) -> dict:
    """{cell: {seed: [(step, value), ...] sorted by step}} at one guidance scale (sweep.training_curves, NaN points
    left out); with `steps`, only the runs measured at exactly those steps (a run the sweep has not finished, or one
    with a missing or NaN point, is left out: its plateau and area would be read elsewhere on the curve)."""
    from sweep import training_curves
    want = None if steps is None else sorted(int(s) for s in steps)
    out = {}
    for cell, seeds in training_curves(rows, metric, scale).items():
        kept = {int(seed): pts for seed, pts in seeds.items() if want is None or [x for x, _ in pts] == want}
        if kept:
            out[cell] = kept
    return out


def plateau(curve: list) -> float:
    """P1: the value at the last checkpoint."""
    return curve[-1][1]


def area(curve: list) -> float:
    """P2: the trapezoid mean of the curve over its steps (the mean share over training)."""
    steps, values = np.array([s for s, _ in curve], float), np.array([v for _, v in curve], float)
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(steps)) / (steps[-1] - steps[0]))


def onset(curve: list, level: float = ONSET):
    """The step where the curve first reaches `level`, linear between checkpoints; None when it never does."""
    for (s0, v0), (s1, v1) in zip([(curve[0][0], curve[0][1])] + curve[:-1], curve):
        if v1 >= level:
            return float(s1) if v1 == v0 or s1 == s0 else s0 + (level - v0) * (s1 - s0) / (v1 - v0)
    return None


def endpoint(curves_of: dict, cell: str, which) -> dict:
    """{seed: P(curve)} of one cell."""
    return {seed: which(c) for seed, c in curves_of.get(cell, {}).items()}


def compare(curves_of: dict, arm: str, base: str) -> dict:
    """P1 and P2 of arm - base, paired by seed: {endpoint: stats.paired's dict}."""
    from scoring.stats import paired
    out = {}
    for name, which in (("P1", plateau), ("P2", area)):
        a, b = endpoint(curves_of, arm, which), endpoint(curves_of, base, which)
        seeds = sorted(set(a) & set(b))
        out[name] = paired([a[s] for s in seeds], [b[s] for s in seeds])
    return out


def decide(p1: dict, p2: dict) -> str:
    """The page's decision rules on one comparison, from Holm-adjusted p-values (key 'p_holm')."""
    sig1, sig2 = p1["p_holm"] < ALPHA, p2["p_holm"] < ALPHA
    if sig1:
        return "lowers the plateau" if p1["diff"] < 0 else "raises the plateau"
    if sig2:
        return "delays copying" if p2["diff"] < 0 else "hastens copying"
    inside = all(abs(d["diff"]) + d["half"] <= MARGIN for d in (p1, p2))
    return "no effect" if inside else "unresolved"


def families(cells: list) -> dict:
    """The protocol's two families of comparisons (arm, comparison) over the cells present."""
    control = next((c for c in cells if c.startswith(CONTROL_PREFIX) and c.endswith("_corrupt_moderandom")), None)
    gauss = next((c for c in cells if c.startswith("cepgaussian")), None)
    a = [(c, CLEAN_CELL) for c in cells if c != CLEAN_CELL]
    b = [(TARGET_CELL, control), (gauss, "cepuniform_cep_gamma1")]
    return {"A": a, "B": [(x, y) for x, y in b if x in cells and y in cells]}


def analyse(rows: list, steps=None) -> dict:
    """Every comparison of both families with its Holm-adjusted p-values and decision, over the runs measured at every
    one of `steps` (the protocol's grid; None: whatever each run has)."""
    from scoring.stats import holm
    curves_of = curves(rows, steps=steps)
    acc = cell_means(last_step_rows(rows, steps[-1] if steps else None))
    out = {}
    for family, pairs in families(sorted(curves_of)).items():
        results = [compare(curves_of, arm, base) for arm, base in pairs]
        flat = [r[e] for r in results for e in ("P1", "P2")]
        for r, p in zip(flat, holm([r["p"] for r in flat])):
            r["p_holm"] = p
        out[family] = []
        for (arm, base), r in zip(pairs, results):
            entry = {"arm": arm, "base": base, **r, "decision": decide(r["P1"], r["P2"])}
            if family == "B" and base.startswith(CONTROL_PREFIX):
                matched = abs(acc.get(arm, np.nan) - acc.get(base, np.nan)) <= MATCH
                entry["matched"] = bool(matched)
                if not matched:
                    entry["decision"] += " (unmatched class accuracy)"
            out[family].append(entry)
    return out


def last_step_rows(rows: list, step=None) -> list:
    """The rows of each run's last evaluated step (with `step`: only the runs measured there, at that step)."""
    if step is not None:
        return [r for r in rows if r.get("step") not in ("", None) and int(float(r["step"])) == int(step)]
    last = {}
    for r in rows:
        if r.get("step") not in ("", None):
            key = (r["cell"], r["seed"])
            last[key] = max(last.get(key, 0), int(float(r["step"])))
    return [r for r in rows
            if r.get("step") not in ("", None) and int(float(r["step"])) == last[(r["cell"], r["seed"])]]


def decisions_table(result: dict) -> str:
    """The generated markdown table of both families."""
    lines = ["| family | arm − comparison | seeds | Δ P1 (plateau), points | p (Holm) | Δ P2 (curve), points | "
             "p (Holm) | reading |", "|---|---|---|---|---|---|---|---|"]
    for family, entries in result.items():
        for e in entries:
            p1, p2 = e["P1"], e["P2"]
            lines.append(f"| {family} | {e['arm']} − {e['base']} | {p1['n']} | "
                         f"{100 * p1['diff']:+.1f} ± {100 * p1['half']:.1f} | "
                         f"{p1['p_holm']:.3g} | {100 * p2['diff']:+.1f} ± {100 * p2['half']:.1f} | "
                         f"{p2['p_holm']:.3g} | "
                         f"{e['decision']} |")
    return "\n".join(lines)


def endpoints_table(rows: list, steps=None) -> str:
    """Per cell, mean ± 95 % t-interval over seeds: P1, P2, the onset step, and at the last step the class accuracy,
    the class-embedding norm and CEP's noise-to-embedding ratio (s = 1); with `steps`, complete runs only."""
    from scoring.stats import t_interval
    curves_of, last = curves(rows, steps=steps), last_step_rows(rows, steps[-1] if steps else None)

    def pm(values, scale=1.0, digits=1):
        if not values:
            return "–"
        mean, half = t_interval([v * scale for v in values])
        return f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")

    def at_end(cell, metric):
        return [float(r[metric]) for r in last if r["cell"] == cell and r.get(metric) not in ("", None)
                and abs(float(r["cfg_scale"]) - 1.0) < 1e-6]

    lines = ["| cell | seeds | P1: memorized at the end, % | P2: mean over training, % | onset (25 %), step | "
             "class acc., % | ‖E[y]‖ | ‖δ‖ / ‖E[y]‖ |", "|---|---|---|---|---|---|---|---|"]
    for cell, per_seed in curves_of.items():
        onsets = [onset(c) for c in per_seed.values()]
        reached = [o for o in onsets if o is not None]
        onset_text = pm(reached, digits=0) + ("" if len(reached) == len(onsets)
                                              else f" ({len(onsets) - len(reached)} not reached)")
        lines.append(f"| {cell} | {len(per_seed)} | {pm([plateau(c) for c in per_seed.values()], 100)} | "
                     f"{pm([area(c) for c in per_seed.values()], 100)} | {onset_text} | "
                     f"{pm(at_end(cell, 'class_acc'), 100)} | {pm(at_end(cell, 'class_embed_norm'), digits=2)} | "
                     f"{pm(at_end(cell, 'cep_noise_to_embed'), digits=2)} |")
    return "\n".join(lines)


def figures(folder: Path, out: Path, scale: float = 1.0) -> list:
    """d1/d2 histograms per cell (every seed's final evaluation pooled) and each cell's first samples beside their
    nearest training item (seed 0), from the runs' eval/*.npz; returns the files written."""
    from sweep import _plt
    tag = f"s{scale:g}"
    cells = sorted(p.name for p in (folder / "runs").iterdir() if p.is_dir()) if (folder / "runs").is_dir() else []
    ratios = {}
    for cell in cells:
        found = [np.load(f) for f in sorted((folder / "runs" / cell).glob(f"seed*/eval/memorization_{tag}.npz"))]
        if found:
            ratios[cell] = np.concatenate([f["d1"] / np.maximum(f["d2"], 1e-12) for f in found])
    if not ratios:
        return []
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    fig, axes = plt.subplots(len(ratios), 1, figsize=(7, 1.3 * len(ratios)), sharex=True, squeeze=False)
    for ax, (cell, r) in zip(axes[:, 0], ratios.items()):
        ax.hist(np.clip(r, 0, 1.2), bins=60, range=(0, 1.2), color="tab:blue")
        ax.axvline(1 / 3, color="tab:red", lw=1)                    # the ratio test's threshold (Gu et al.)
        ax.set_ylabel(cell, rotation=0, ha="right", fontsize=7)
        ax.text(0.98, 0.8, f"{np.mean(r < 1 / 3):.0%} < 1/3 (n = {len(r)})", transform=ax.transAxes, ha="right",
                fontsize=7)
    axes[-1, 0].set_xlabel(f"d1 / d2: nearest over second-nearest training item (pixels, s = {scale:g})")
    fig.tight_layout()
    fig.subplots_adjust(left=0.3)                                   # room for the cell names beside the rows
    fig.savefig(out / "d1_over_d2.png", dpi=120)
    plt.close(fig)
    written = [out / "d1_over_d2.png"]
    pairs = [(c, np.load(f)) for c in cells
             for f in sorted((folder / "runs" / c).glob(f"seed0/eval/nearest_{tag}.npz"))]
    if pairs:
        n = 8
        label_width = 1.6                                            # inches for the cell names
        fig, axes = plt.subplots(2 * len(pairs), n, figsize=(n * 0.6 + label_width, 1.3 * len(pairs)), squeeze=False)
        for i, (cell, f) in enumerate(pairs):
            for j in range(n):
                for row, key in ((2 * i, "samples"), (2 * i + 1, "nearest")):
                    ax = axes[row, j]
                    ax.imshow(f[key][j], interpolation="nearest") if j < len(f[key]) else None
                    ax.set_xticks([]), ax.set_yticks([])
            axes[2 * i, 0].set_ylabel(cell, rotation=0, ha="right", fontsize=6)
            axes[2 * i + 1, 0].set_ylabel("nearest", rotation=0, ha="right", fontsize=6)
        fig.subplots_adjust(left=label_width / (n * 0.6 + label_width), right=0.99, top=0.99, bottom=0.01,
                            wspace=0.05, hspace=0.1)                 # square pictures, the names beside them
        fig.savefig(out / "nearest.png", dpi=120)
        plt.close(fig)
        written.append(out / "nearest.png")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["pilot", "analyse", "map"],
                    help="pilot: the control's eta_r from the pilot's results.csv; analyse: the protocol's reading; "
                         "map: the real-data part's items per class from the map's rows")
    ap.add_argument("folder", help="the sweep folder (results/memorize-v2-pilot, results/memorize-v2, ...)")
    args = ap.parse_args(argv)
    try:
        if args.what == "analyse":
            print(decisions_table(analyse(read_rows(Path(args.folder)), PROTOCOL_STEPS)))
            return 0
        if args.what == "map":
            k, best = map_k(read_rows(Path(args.folder)))
            for kk, share in sorted(best.items()):
                print(f"k = {kk:3d}: highest memorized share at s = 1 up to step {MAP_LAST_STEP}: {share:.3f}")
            print(f"k = {k}")
            return 0
        out = pilot(Path(args.folder))
    except (OSError, ValueError, KeyError) as e:
        print(f"tools.memorize_v2: error: {e}", file=sys.stderr)
        return 2
    for cell, acc in sorted(out["class_acc"].items()):
        print(f"{cell:40s} class accuracy {acc:.3f}")
    print(f"eta_r = {out['eta_r']:.2f} ({'matched' if out['matched'] else 'unmatched'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
