"""Protocol v2's pilot rule (tools/memorize_v2.py): the control's eta_r from the pilot's class accuracies."""
import csv

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
