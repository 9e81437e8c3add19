"""
memorize_v2.py: the analysis of the memorization protocol v2 (docs/results/memorization-v2.md), fixed before its runs.

    python -m tools.memorize_v2 pilot results/memorize-v2-pilot     # the control's eta_r from the pilot's rows

The pilot rule: the control (random label corruption, --corrupt-mode random) is set to the strength eta_r at which its
class accuracy matches CEP-U gamma = 4's. Class accuracy is read at s = 1 from the sweep's results.csv, averaged over
seeds per cell, and interpolated linearly in eta_r through (0, clean) and the pilot's arms; eta_r is the smallest
crossing of the target, rounded to the nearest 0.05 (halves up). A target outside the arms' range is "unmatched" and takes the
nearest end of the grid's non-zero values. Only class accuracy enters the rule.
"""
import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np

TARGET_CELL = "cepuniform_cep_gamma4"       # CEP-U gamma = 4, the arm whose class accuracy the control matches
CLEAN_CELL = "clean"
CONTROL_PREFIX = "corrupt"                 # the random arms' cells: corrupt<eta>_corrupt_moderandom
STEP = 0.05                                # eta_r's resolution


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["pilot"], help="pilot: the control's eta_r from the pilot's results.csv")
    ap.add_argument("folder", help="the sweep folder (results/memorize-v2-pilot)")
    args = ap.parse_args(argv)
    try:
        out = pilot(Path(args.folder))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for cell, acc in sorted(out["class_acc"].items()):
        print(f"{cell:40s} class accuracy {acc:.3f}")
    print(f"eta_r = {out['eta_r']:.2f} ({'matched' if out['matched'] else 'unmatched'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
