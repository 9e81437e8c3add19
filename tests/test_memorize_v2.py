"""Protocol v2's pilot rule (tools/memorize_v2.py): the control's eta_r from the pilot's class accuracies."""
import csv

import numpy as np
import pytest

from tools import memorize_v2 as m


def test_pilot_eta_interpolates_and_rounds():
    arms = {0.05: 0.80, 0.15: 0.70, 0.3: 0.55}
    # target 0.72 lies between 0.05 (0.80) and 0.15 (0.70): 0.05 + 0.08 / 0.10 * 0.10 = 0.13 -> 0.15
    assert m.pilot_eta(0.85, 0.72, arms) == (0.15, True)
    assert m.pilot_eta(0.85, 0.625, arms) == (pytest.approx(0.25), True)     # 0.225 -> 0.25 (nearest 0.05 above)
    assert m.pilot_eta(0.85, 0.84, arms) == (0.05, True)                   # 0.01 rounds to 0, clipped to the grid
    assert m.pilot_eta(0.85, 0.90, arms) == (0.05, False)                  # CEP costs nothing: unmatched
    assert m.pilot_eta(0.85, 0.40, arms) == (0.3, False)                   # below every arm: unmatched


def test_pilot_reads_the_sweep_rows(tmp_path, capsys):
    cells = {"clean": [0.9, 0.8], "cepuniform_cep_gamma4": [0.7, 0.72], "corrupt0.05_corrupt_moderandom": [0.8, 0.84],
             "corrupt0.15_corrupt_moderandom": [0.7, 0.68], "corrupt0.3_corrupt_moderandom": [0.5, 0.6]}
    with open(tmp_path / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["cell", "seed", "cfg_scale", "class_acc"])
        w.writeheader()
        for cell, accs in cells.items():
            for seed, acc in enumerate(accs):
                w.writerow({"cell": cell, "seed": 100 + seed, "cfg_scale": 1.0, "class_acc": acc})
                w.writerow({"cell": cell, "seed": 100 + seed, "cfg_scale": 2.0, "class_acc": 0.0})   # not read
    # target 0.71; arms 0.82 @ 0.05, 0.69 @ 0.15: 0.05 + 0.11 / 0.13 * 0.1 = 0.1346 -> 0.15
    assert m.main(["pilot", str(tmp_path)]) == 0
    assert "eta_r = 0.15 (matched)" in capsys.readouterr().out
    (tmp_path / "results.csv").write_text("cell,seed,cfg_scale,class_acc\nclean,0,1,0.5\n")
    assert m.main(["pilot", str(tmp_path)]) == 2


def _curve_rows(cell, seed, shares, steps=(2000, 3000, 4000, 5000, 6000), acc=0.8):
    return [{"cell": cell, "seed": str(seed), "cfg_scale": "1.0", "step": str(s), "mem_ratio_px": str(v),
             "class_acc": str(acc)} for s, v in zip(steps, shares)]


def test_curve_endpoints():
    curve = [(2000, 0.0), (3000, 0.1), (4000, 0.5), (5000, 0.9), (6000, 0.9)]
    assert m.plateau(curve) == 0.9
    assert m.area(curve) == pytest.approx((0.05 + 0.3 + 0.7 + 0.9) * 1000 / 4000)
    assert m.onset(curve) == pytest.approx(3000 + 0.15 / 0.4 * 1000)
    assert m.onset([(2000, 0.3), (3000, 0.5)]) == 2000 and m.onset([(2000, 0.1), (3000, 0.2)]) is None


def test_analyse_tells_delay_from_plateau_and_matches_scipy():
    from scipy.stats import ttest_rel
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(6):
        noise = lambda: rng.normal(0, 0.01, 5)                              # noqa: E731
        base = np.array([0.0, 0.1, 0.5, 0.9, 0.9])
        rows += _curve_rows("clean", seed, base + noise())
        rows += _curve_rows("cepuniform_cep_gamma1", seed, np.array([0.0, 0.0, 0.1, 0.5, 0.9]) + noise())  # later
        rows += _curve_rows("cepuniform_cep_gamma4", seed, base * 0.5 + noise(), acc=0.7)                    # lower
        rows += _curve_rows("cepgaussian_cep_gamma0.57735", seed, base + noise())                            # none
        rows += _curve_rows("corrupt0.1_corrupt_moderandom", seed, base + noise(), acc=0.72)
    result = m.analyse(rows)
    read = {(e["arm"], e["base"]): e for f in result.values() for e in f}
    assert read[("cepuniform_cep_gamma1", "clean")]["decision"] == "delays copying"
    assert read[("cepuniform_cep_gamma4", "clean")]["decision"] == "lowers the plateau"
    assert read[("cepgaussian_cep_gamma0.57735", "clean")]["decision"] == "no effect"
    assert read[("cepuniform_cep_gamma4", "corrupt0.1_corrupt_moderandom")]["decision"] == "lowers the plateau"
    assert read[("cepuniform_cep_gamma4", "corrupt0.1_corrupt_moderandom")]["matched"]
    curves = m.curves(rows)
    a = [m.plateau(curves["cepuniform_cep_gamma4"][s]) for s in range(6)]
    b = [m.plateau(curves["clean"][s]) for s in range(6)]
    e = read[("cepuniform_cep_gamma4", "clean")]["P1"]
    assert e["p"] == pytest.approx(ttest_rel(a, b).pvalue) and e["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert len(result["A"]) == 4 and len(result["B"]) == 2
    assert "delays copying" in m.decisions_table(result)


def test_only_complete_runs_enter_the_endpoints():
    """A run the sweep has not finished (or with a NaN point) would read its plateau early: with the protocol's steps
    it is left out of P1, P2, the paired tests and the class-accuracy match."""
    rows = []
    for seed in range(3):
        rows += _curve_rows("clean", seed, [0.1, 0.3, 0.6, 0.9, 0.9])
        rows += _curve_rows("cepuniform_cep_gamma1", seed, [0.0, 0.1, 0.3, 0.5, 0.6])
    rows += _curve_rows("clean", 3, [0.1, 0.3, 0.6], steps=(2000, 3000, 4000))            # stopped at 4000
    rows += _curve_rows("cepuniform_cep_gamma1", 3, [0.0, 0.1, 0.3, 0.5, 0.6])
    rows += _curve_rows("cepuniform_cep_gamma1", 4, [0.0, float("nan"), 0.3, 0.5, 0.6])  # a NaN point
    steps = (2000, 3000, 4000, 5000, 6000)
    assert sorted(m.curves(rows, steps=steps)["cepuniform_cep_gamma1"]) == [0, 1, 2, 3]
    assert sorted(m.curves(rows, steps=steps)["clean"]) == [0, 1, 2]
    (entry,) = m.analyse(rows, steps)["A"]
    assert entry["P1"]["n"] == 3 and entry["P1"]["diff"] == pytest.approx(-0.3)
    assert m.analyse(rows)["A"][0]["P1"]["n"] == 4                      # without the grid, the stopped run enters
    assert "| A | cepuniform_cep_gamma1 − clean | 3 |" in m.decisions_table(m.analyse(rows, steps))


def test_map_rule_takes_the_largest_copying_k(tmp_path, capsys):
    def rows(shares_of_k):
        out = []
        for k, shares in shares_of_k.items():
            for r in _curve_rows(f"items_per_class{k}", 0, shares, steps=(1000, 3500, 6000, 6500)):
                out.append({**r, "train.items_per_class": str(k)})
        return out
    # k = 5 reaches 30 % mid-curve (and falls back): it copies; k = 10 reaches it only after step 6000: it does not
    assert m.map_k(rows({2: [0, .6, .9, .9], 5: [0, .31, .2, .2], 10: [0, .1, .29, .5]}))[0] == 5
    k, best = m.map_k(rows({2: [0, .1, .2, .2], 5: [0, 0, .1, .1], 10: [0, 0, 0, 0]}))
    assert k == 2 and best == {2: 0.2, 5: 0.1, 10: 0.0}                   # none copies: the smallest k
    with open(tmp_path / "results.csv", "w", newline="") as f:
        data = rows({2: [0, .6, .9, .9], 5: [0, .5, .8, .8], 10: [0, .1, .35, .4]})
        w = csv.DictWriter(f, fieldnames=list(data[0]))
        w.writeheader()
        w.writerows(data)
    assert m.main(["map", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith("k = 10")
