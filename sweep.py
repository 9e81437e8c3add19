"""
sweep.py: the paper's experiment end to end. Train clean, corrupted and CEP models side by side, evaluate each over
a grid of guidance scales, and say with confidence intervals over seeds whether slight corruption or CEP helps.

    python sweep.py --preset builtin --out sweeps/builtin          # the CPU experiment of docs/results/builtin.md
    python sweep.py --preset builtin-eta --out sweeps/builtin-eta  # its label-corruption companion (η = 0, 5, 20 %)
    python sweep.py --preset builtin-probe --out sweeps/probe      # its clean model trained 4x longer, along training
    python sweep.py --preset smoke --out /tmp/smoke                # 2 cells x 2 seeds, a few steps each (~1-2 min; CI)
    python sweep.py --preset memorize-map --out sweeps/memorize-map  # where a clean model starts copying (docs/results)
    python sweep.py --preset memorize-map16 --out sweeps/memorize-map16  # the same at 16 px (side, patch)
    python sweep.py --preset memorize --out sweeps/memorize          # the protocol in that regime (30 runs)
    python sweep.py --preset memorize-quick --out sweeps/memorize-quick   # its quick form (9 runs)
    python sweep.py --preset memorize --eval-steps 2000,2500,3000 --curve-eval "--num-samples 1000 --cfg-scales 1" \
        --out sweeps/memorize-curve                                # the same, measured along training too
    python sweep.py --preset in1k-dit --out sweeps/dit --train "--latents /data/in1k-kl-f8" \
        --eval "--ref in1k_val_256_tf.npz --pipeline legacy_tensorflow" \
        --nproc 8 --dry-run    # the paper's DiT-XL/2 grid as torchrun commands, against the 50K validation images
    python sweep.py --script train_dit --grid "corrupt=0,0.025,0.05,0.1,0.2" --grid "cep=none,uniform" --seeds 0,1,2 \
        --train "--steps 3000 --builtin-length 2000" --eval "--num-samples 2000 --cfg-scales 1,1.5,2,4" --out sweeps/mine

How the experiment is built (read the code in this order):
 1. Cells. Every --grid KEY=V1,V2,... is an axis; the cells are their product (a preset may list cells instead, e.g.
    Table 1's CEP-U / CEP-G / IP rows beside the η axis). A key is a train flag (--KEY V) unless EVAL_KEYS maps it to
    evaluate.py flags; a key in CLEAN is a *treatment* (corrupt, cep, ip, cads, and the ablations cep_gamma,
    cep_subset, label_smoothing, cond_dropout, and the readings cep_fixed_delta=on and raw_class_embedding=on)
    with a clean value, any other key (builtin_length, model, ...) is *context*. A cell's clean counterpart has the
    same context and clean treatments.
 2. Runs. A cell x seed is one run: OUT/runs/<cell>/seed<S>/ is a normal nanoCEP run folder (config.json, log.jsonl,
    last.pt), trained by `train_dit.py ... --seed S --out RUN --resume auto`, then evaluated by
    `evaluate.py RUN/last.pt ... --out RUN/eval` (results.json: one row per guidance scale). Cells that differ only
    in evaluate.py keys (cads=off,on) share the training run of the cell without them, each evaluated into its own
    OUT/runs/<cell>/seed<S>/eval. The sampling seed is the same for every run (common random numbers), so paired
    differences see less sampling noise.
 3. Resume. A killed sweep, rerun with the same flags, skips runs whose log.jsonl holds a "done" event at the
    requested step count, resumes the interrupted one (--resume auto), and re-evaluates only where results.json lacks
    a requested scale. OUT/sweep.json pins the protocol: rerunning with other flags into the same OUT is refused.
 4. Summary. results.csv: one row per run x guidance scale, every metric, every setting, and the commit (and dirty
    flag) of the code that evaluated it (eval/results.json's provenance). summary.md: per cell the
    mean ± 95 % Student-t interval over seeds at the cell's best scale (best mean of --metric) and at --fixed-scale,
    and the paired difference (same seed) to the clean cell with its interval; a best scale at the edge of the
    guidance grid is marked, as the optimum may lie outside it. Plots: metric vs η with error bars
    (paper Fig. 2), FID vs IS and precision vs recall across guidance scales per cell (Fig. 3); table.md is Table 1.
 5. Along training. --eval-steps 2000,2500,3000 keeps each run's step_XXXXXXX.pt at those steps (below its --steps)
    and evaluates each into OUT/runs/<cell>/seed<S>/eval/step_XXXXXXX/ (--curve-eval's flags after --eval's). The
    step column of results.csv tells those rows from the final evaluation's, which alone feed summary.md and the
    plots above; curve_<metric>.png draws --metric (and mem_ratio_px) at --fixed-scale against the step, mean ± CI
    over seeds. A rerun skips a checkpoint evaluation with complete results even when its .pt is gone, and refuses
    one whose results and .pt are both gone.
Table 2 (ControlNet on pre-trained bases) is a grid over the frozen base: `--grid base=clean:A.pt,cep:B.pt` trains
`--init-from A.pt` per cell (with --train "--control canny ...") and pairs every base with the one named clean:
    python sweep.py --preset table2 --dry-run                       # the paper's Table 2 (Canny) as torchrun commands
--dry-run prints every command (torchrun over --nproc local GPUs where the preset says so) for a cluster scheduler.
A published sweep runs with --out results/<name>: .gitignore keeps its raw rows and run records, which a rerun resumes
from, and `python -m tools.results` regenerates the tables docs/ quotes from them (--check: that they still match).
"""

import argparse
import concurrent.futures
import csv
import dataclasses
import functools
import io
import itertools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scoring.stats import paired, t_interval
from trackers import tracking

REPO = Path(__file__).resolve().parent

# ---- where each grid key goes ----

# Grid keys that are evaluate.py settings, not training flags: key -> (value -> evaluate.py arguments).
# Every other key K becomes the training flag --K (underscores as dashes). Adding an eval-side axis is one line here.
EVAL_KEYS = {
    "cads": lambda v: [] if v == "off" else ["--cads-noise", "0.1"],   # CADS at sampling time, the paper's s = 0.1
    "cads_noise": lambda v: ["--cads-noise", str(v)],                     # or its noise scale as the axis
    "raw_class_embedding": lambda v: ["--raw-class-embedding"] if switch(v, "raw_class_embedding") else [],
    # (a --label-smoothing model sampled with its raw class rows E[y])
    "sampler": lambda v: ["--sampler", str(v)],                          # the sampler as an axis (one training run)
}
# Grid keys that are training flags under another form: key -> (value -> training arguments).
# base=NAME:PATH is a ControlNet's frozen base (Table 2's axis): --init-from PATH, shown (and paired) as NAME.
TRAIN_KEYS = {"base": lambda v: ["--init-from", base_path(v)]}
# The clean value of each treatment key: the cell with these values (and the same context) is the paired baseline.
# The paper's ablations are treatments too (Tables 6 and 7), so `--grid cond_dropout=0,0.1` pairs 0.1 with 0: their
# clean value is "the ablation off". cep_subset's is 1 (CEP on every item): beside cep=none in the cell that is the
# clean run, and with --cep fixed in --train it is the paper's CEP, the baseline of the "Fixed CEP" ablation.
CLEAN = {"corrupt": "0", "cep": "none", "ip": "0", "cads": "off", "cads_noise": "0", "corrupt_mode": "static",
         "cep_gamma": "0", "cep_subset": "1", "label_smoothing": "0", "cond_dropout": "0", "cep_fixed_delta": "off",
         "raw_class_embedding": "off", "base": "clean"}
# Metrics the summary reports (those present in the results), and which direction is better.
# The memorization columns (scoring/memorization.py): a larger nearest-item distance is "better" (less copying).
HIGHER_IS_BETTER = {"fid": False, "is_mean": True, "precision": True, "recall": True, "class_acc": True,
                    "diversity": True, "mem_ratio_px": False, "mem_ratio_feat": False, "mem_tau": False,
                    "nn_px_mean": True, "nn_feat_mean": True, "edge_f1": True, "edge_f1_exact": True,
                    "shape_iou_disc": True, "shape_iou_cross": True}
METRIC_NAMES = {"fid": "FID", "is_mean": "IS", "precision": "Precision", "recall": "Recall",
                "class_acc": "class acc.", "diversity": "diversity", "mem_ratio_px": "memorized (px)",
                "mem_ratio_feat": "memorized (feat)", "mem_tau": "memorized (τ)", "nn_px_mean": "NN dist. (px)",
                "nn_feat_mean": "NN dist. (feat)", "edge_f1": "edge F1 (1 px)", "edge_f1_exact": "edge F1 (exact)",
                "shape_iou_disc": "disc IoU", "shape_iou_cross": "cross IoU"}


def same_value(a, b) -> bool:
    """Grid values compare as numbers when both parse as numbers ("0" == "0.0"), else as strings."""
    try:
        return float(a) == float(b)
    except ValueError:
        return str(a) == str(b)


def switch(value, key: str) -> bool:
    """An on/off grid value as a bool."""
    if str(value).lower() not in ("on", "off"):
        raise ValueError(f"--grid {key}={value}: expected on or off")
    return str(value).lower() == "on"


def flag_value(words: list, flag: str, default: str | None) -> str | None:
    """The value the last `flag V` / `flag=V` in the argument list `words` gives, else default."""
    value = default
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
    return value


def check_cell(cell: dict, train_words: list):
    """Refuse a cell whose settings contradict each other: raw class rows need a label-smoothed model."""
    if switch(cell.get("raw_class_embedding", "off"), "raw_class_embedding"):
        smoothing = cell.get("label_smoothing", flag_value(train_words, "--label-smoothing", "0"))
        if same_value(smoothing, 0):
            raise ValueError(f"--grid raw_class_embedding=on: cell {cell_name(cell)} trains without label smoothing, "
                             "whose raw rows it would sample; grid it with label_smoothing > 0 only, or pass "
                             "--train \"--label-smoothing EPS\" (the cell with it off is then its pair)")


def base_path(value: str) -> str:
    """The checkpoint of a base=NAME:PATH grid value."""
    name, sep, path = str(value).partition(":")
    if not sep or not name or not path:
        raise ValueError(f"--grid base={value!r}: expected NAME:PATH (e.g. clean:runs/clean/last.pt)")
    return path


def shown(key: str, value) -> str:
    """A grid value as cell names and the clean pairing see it: base=NAME:PATH is NAME."""
    return str(value).partition(":")[0] if key == "base" else value


def cell_name(cell: dict) -> str:
    """A folder-safe name: context values, then the non-clean treatments ('clean' if none), e.g. builtin_length100_corrupt0.05."""
    context = [f"{k}{v}" for k, v in cell.items() if k not in CLEAN]
    treated = [f"{k}{shown(k, v)}" for k, v in cell.items() if k in CLEAN and not same_value(shown(k, v), CLEAN[k])]
    name = "_".join(context + (treated or ["clean"]))
    return "".join(c if c.isalnum() or c in "._-+" else "-" for c in name)


def clean_counterpart(cell: dict) -> dict:
    """The cell with the same context and every treatment at its clean value."""
    return {k: (CLEAN[k] if k in CLEAN else v) for k, v in cell.items()}


def cell_args(cell: dict) -> tuple[list, list]:
    """(training arguments, evaluate.py arguments) that put this cell's settings where they belong."""
    train, evaluate = [], []
    for key, value in cell.items():
        flag = "--" + key.replace("_", "-")
        if key in EVAL_KEYS:
            evaluate += EVAL_KEYS[key](value)
        elif key in TRAIN_KEYS:
            train += TRAIN_KEYS[key](value)
        elif str(value).lower() in ("on", "off"):                       # a switch, e.g. cep_fixed_delta=off,on
            train += [flag if str(value).lower() == "on" else "--no-" + flag[2:]]
        else:
            train += [flag, str(value)]
    return train, evaluate


def parse_grid(axes: list) -> list:
    """['corrupt=0,0.05', 'cep=none,uniform'] -> the product of the axes as a list of cells (dicts, in axis order)."""
    keys, values = [], []
    for axis in axes:
        key, sep, rest = axis.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        vals = [v.strip() for v in rest.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise ValueError(f"--grid {axis!r}: expected KEY=V1,V2,... (e.g. corrupt=0,0.05)")
        if key in keys:
            raise ValueError(f"--grid: key {key!r} given twice")
        keys.append(key)
        values.append(vals)
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


# ---- presets: the protocols ----

# The paper's guidance grid for DiT-XL/2 (paper App. B.7) and Table 1's rows beside the η axis.
DIT_SCALES = "1.5,1.75,2.0,2.25,2.5,3.0,3.5,4.0,4.5,5.0,5.5"
IN1K_CELLS = ([{"corrupt": e, "cep": "none", "ip": "0"} for e in ("0", "0.025", "0.05", "0.075", "0.1", "0.15", "0.2")]
              + [{"corrupt": "0", "cep": c, "ip": "0"} for c in ("uniform", "gaussian")]   # CEP-U, CEP-G
              + [{"corrupt": "0", "cep": "none", "ip": "0.1"}])                            # IP (Ning et al.)

# Small runs for tests and CI: 2 cells x 2 seeds, a few steps, a few samples; measures nothing.
SMOKE = dict(script="train_dit", cells=[{"corrupt": "0"}, {"corrupt": "0.2"}], seeds="0,1", jobs=2,
             train="--steps 4 --batch-size 8 --builtin-length 40 --sample-every 0 --ckpt-every 2 --keep-every 2 "
                   "--log-every 1",
             eval="--num-samples 20 --cfg-scales 1,2 --steps 2 --batch-size 20 --is-splits 2", judge=200,
             fixed_scale=2.0)

# The protocols below train the plain DiT-T (no convolutions, 4x-wide MLPs) with uniform timesteps and AdamW, the
# settings their recorded results were measured with; train_dit.py's CPU default differs in all four, so their train
# flags pin them.
CONV_PIN = "--pixel-channels 0 --no-token-conv "
MLP_PIN = "--mlp-ratio 4 "
FOCUS_PIN = "--t-focus 0 "
OPTIMIZER_PIN = "--optimizer adamw "
PINS = (CONV_PIN, MLP_PIN, FOCUS_PIN, OPTIMIZER_PIN)

# The CPU experiment (docs/results/builtin.md), fixed before any of its results was looked at:
# does CEP-U (the paper's Table 1 method, the theory's perturbed condition c(y) + γξ) help, and more so with few
# training items per class (5 vs 50; gmm_theory.py: gain ∝ γ²d/n)? 2 sizes x {clean, CEP-U} x 3 seeds = 12 runs of
# DiT-T/4 (16 tokens of 4x4 pixels: the cheapest model that learns the shapes), 1200 steps of batch 32 each.
# Measured by judge.py on 300 samples per scale (balanced classes, DPM-Solver++ 10 steps) against 2000 fresh real
# images. Primary: FID (judge features) at the fixed scale s = 2 as a paired difference to the clean cell;
# the best scale per cell is the one with the lowest mean FID over s ∈ {1, 2, 4}; class accuracy, memorized share,
# precision/recall and diversity are secondary.
BUILTIN = dict(script="train_dit", cells=parse_grid(["builtin_length=50,500", "cep=none,uniform"]),
               seeds="0,1,2", jobs=2, judge=2000, metric="fid", fixed_scale=2.0,
               train="--model DiT-T/4 --image-size 16 --steps 1200 --batch-size 32 --lr 1e-3 --ema-decay 0.995 "
                     "--learn-sigma --grad-clip 0 --lr-warmdown 0 --min-snr 0 "   # the official DiT's recipe
                     + OPTIMIZER_PIN + FOCUS_PIN + MLP_PIN + CONV_PIN +            # (the official DiT)
                     "--class-dropout 0.1 --sample-every 0 --ckpt-every 300 --log-every 50",
               eval="--num-samples 300 --cfg-scales 1,2,4 --sampler dpm++ --steps 10 --batch-size 300")

# Fixed with `builtin`'s result (no CEP effect) known and before its own runs: label corruption at 5 items per
# class with the same budget and measurement, η ∈ {0, 5, 20} % (2 and 10 of the 50 labels flipped). It asks the paper's
# headline question, and it is a positive control: flipped labels should visibly cost class accuracy.
BUILTIN_ETA = dict(BUILTIN, cells=parse_grid(["builtin_length=50", "corrupt=0,0.05,0.2"]))
# Where does a clean model of that recipe start to copy? The clean DiT-T/4 trained 4x the images (2400 steps of batch
# 64) at 5 and 20 items per class, measured along training at s = 2 (250 samples); seed 0, exploratory.
BUILTIN_PROBE = dict(BUILTIN, cells=parse_grid(["builtin_length=50,200"]), seeds="0",
                     train=BUILTIN["train"].replace("--steps 1200 --batch-size 32", "--steps 2400 --batch-size 64"),
                     eval="--num-samples 250 --cfg-scales 2 --sampler dpm++ --steps 10 --batch-size 250",
                     eval_steps="600,900,1200,1800", curve_eval="--cfg-scales 2")

# The paper's DiT-XL/2 protocol (Table 1, Fig. 14): 400K steps, 50K samples over its guidance grid, s = 1.75 in Table 1.
IN1K_DIT = dict(script="train_dit", cells=IN1K_CELLS, seeds="0", launcher="torchrun",
                train="--preset dit-xl2-in1k --vae kl-f8 --image-size 256",
                eval=f"--num-samples 50000 --cfg-scales {DIT_SCALES} --sampler dpm++ --steps 50", fixed_scale=1.75)

# The paper's Table 2 (ControlNet-Canny on IN-100 over the pre-trained LDM-4 bases; figures 6 and 22): one ControlNet
# per base, trained with train_ldm's in100-controlnet preset, evaluated on the 5K IN-100 validation images (their
# Canny maps and classes) over the personalization guidance grid, s = 2.25 in the table. The bases are the η / CEP /
# IP LDM-4 IN-1K checkpoints, expected at bases/<name>.pt (or pass --grid base=NAME:PATH,...).
TABLE2_BASES = ["clean", "eta0.025", "eta0.05", "eta0.075", "eta0.1", "eta0.15", "eta0.2", "cep-uniform",
                "cep-gaussian", "ip0.1"]
TABLE2 = dict(script="train_ldm", cells=[{"base": f"{b}:bases/{b}.pt"} for b in TABLE2_BASES], seeds="0",
              launcher="torchrun", train="--preset in100-controlnet --data /data/in100/train "
                                         "--class-index /data/imagenet/LOC_synset_mapping.txt",
              eval="--control canny --control-data /data/in100/val --num-samples 5000 "
                   "--cfg-scales 1.25,1.5,2.0,2.25,2.5,3.0,4.0,5.0,6.0,7.0 --sampler dpm++ --steps 50",
              fixed_scale=2.25)

# ---- the memorization regime (docs/results/memorization-v1.md) ----
# Every run: clean class-conditional plain DiT-T/2 (CONV_PIN, MLP_PIN) on 8x8 built-in shapes, k items per class
# chosen from the seed, batch 50, EMA 0.999, the CPU defaults otherwise (lr 4e-3, clip 1, class dropout 0.1); measured by the judge
# (8 px) on 300 samples per scale (DPM-Solver++ 25 steps, balanced classes, the same sampling seeds for every run)
# against 2000 fresh real images, with the memorization columns from --train-ref auto (pixel ratio test: Gu et al.).
MEM_TRAIN = ("--model DiT-T/2 --image-size 8 --batch-size 50 --ema-decay 0.999 --sample-every 0 --ckpt-every 500 "
             "--log-every 100 --lr-warmdown 0 --min-snr 0 "     # constant lr, plain eps-MSE: the defaults it was run with
             + OPTIMIZER_PIN + FOCUS_PIN + MLP_PIN + CONV_PIN.strip())  # AdamW, uniform t, the official DiT
MEM_EVAL = "--num-samples 300 --cfg-scales 1,2 --sampler dpm++ --steps 25 --batch-size 300"

# The map: where does a clean model start copying? Items per class x training length at 8 px (+ one wider model,
# DiT-S/2, at 2 items and 4000 steps), 1 seed; memorize-map16 adds the 16 px side (DiT-T/2, and the coarser patch
# DiT-T/4) at 1 and 2 items per class, 4000 steps. (One judge per sweep, so one image size per sweep.)
MEMORIZE_MAP = dict(script="train_dit", seeds="0", jobs=2, judge=2000, metric="mem_ratio_px", fixed_scale=1.0,
                    cells=parse_grid(["items_per_class=1,2,3,5", "steps=1000,2000,3000,4000", "model=DiT-T/2"])
                    + [{"items_per_class": "2", "steps": "4000", "model": "DiT-S/2"}],
                    train=MEM_TRAIN, eval=MEM_EVAL)
MEMORIZE_MAP16 = dict(MEMORIZE_MAP, train=MEM_TRAIN + " --image-size 16",
                      cells=parse_grid(["items_per_class=1,2", "steps=4000", "model=DiT-T/2,DiT-T/4"]))

# The experiment in that regime, protocol v1 (docs/results/memorization-v1.md), fixed before any of its runs: 2 items
# per class (20 images), 4000 steps of batch 50 (10 000 epochs). First fixed at 3000; the map then measured 2.7 %
# memorized there at s = 1 (< 30 %) and 48.3 % at 4000, so the precondition rule raised --steps to 4000. Then, after
# memorize-quick had run and before any protocol run, the 10 cells (2.7 h on 2 cores) were cut to 6 to fit the 2 h
# budget, dropping η = 10 %: clean; label flips η = 5 and
# 20 % (1 and 4 of the 20 labels; η = 2.5 % rounds to 0 flips at 20 items and would be the clean run); CEP-U at
# γ = 1 and 4 (with clean as γ = 0, the γ axis); CEP-G at γ = 1. 5 seeds (a seed draws the 20 items, the flips, the
# init and the noise). Primary endpoints at the fixed scale s = 1: mem_ratio_px and FID (judge features), as paired
# differences to the clean cell.
_MEM_CELL = {"corrupt": "0", "cep": "none", "cep_gamma": "0"}
MEMORIZE_CELLS = ([_MEM_CELL] + [{**_MEM_CELL, "corrupt": e} for e in ("0.05", "0.2")]
                  + [{**_MEM_CELL, "cep": "uniform", "cep_gamma": g} for g in ("1", "4")]
                  + [{**_MEM_CELL, "cep": "gaussian", "cep_gamma": "1"}])
MEMORIZE = dict(script="train_dit", seeds="0,1,2,3,4", jobs=2, judge=2000, metric="fid", fixed_scale=1.0,
                cells=MEMORIZE_CELLS, train=MEM_TRAIN + " --items-per-class 2 --steps 4000", eval=MEM_EVAL)
# Its quick form (24.7 min on 2 cores, measured): 1 item per class, 3000 steps (15 000 epochs; the map:
# 49 % memorized at s = 1, 0 % at 2000), clean vs η = 10 % (1 flip) vs CEP-U, 3 seeds; a smoke test, not the protocol.
MEMORIZE_QUICK = dict(MEMORIZE, seeds="0,1,2", cells=[_MEM_CELL, {**_MEM_CELL, "corrupt": "0.1"},
                                                      {**_MEM_CELL, "cep": "uniform", "cep_gamma": "1"}],
                      train=MEM_TRAIN + " --items-per-class 1 --steps 3000")

# Protocol v2's pilot (docs/results/memorization-v2.md, fixed before its runs): the class accuracy of random label
# corruption at three strengths beside clean and CEP-U gamma = 4, seeds disjoint from the protocol's, 6000 steps,
# 1000 samples at s = 1 at the end; tools/memorize_v2.py pilot turns it into the control's eta_r.
MEM_V2_TRAIN = MEM_TRAIN + " --items-per-class 2 --steps 6000"
MEMORIZE_V2_PILOT = dict(script="train_dit", seeds="100,101", jobs=2, judge=2000, metric="fid", fixed_scale=1.0,
                         cells=[_MEM_CELL, {**_MEM_CELL, "cep": "uniform", "cep_gamma": "4"}]
                         + [{**_MEM_CELL, "corrupt": e, "corrupt_mode": "random"} for e in ("0.05", "0.15", "0.3")],
                         train=MEM_V2_TRAIN,
                         eval="--num-samples 1000 --cfg-scales 1 --sampler dpm++ --steps 25 --batch-size 500")

# Protocol v2 (docs/results/memorization-v2.md, fixed before its runs): 6 cells x 6 seeds, 6000 steps, memorization
# at s = 1 every 500 steps from 2000 (1000 samples each), and at the end at s = 1 and 2. The control's eta_r is the
# pilot's (python -m tools.memorize_v2 pilot results/memorize-v2-pilot); CEP-G's gamma 1/sqrt(3) gives it CEP-U
# gamma = 1's noise std.
MEM_V2_CONTROL_ETA = "0.05"     # the pilot: crossing at 0.024, rounded to the grid (0.05)
MEMORIZE_V2 = dict(script="train_dit", seeds="0,1,2,3,4,5", jobs=2, judge=2000, metric="fid", fixed_scale=1.0,
                   cells=[_MEM_CELL] + [{**_MEM_CELL, "cep": "uniform", "cep_gamma": g} for g in ("1", "4")]
                   + [{**_MEM_CELL, "cep": "gaussian", "cep_gamma": "0.57735"},
                      {**_MEM_CELL, "corrupt": MEM_V2_CONTROL_ETA, "corrupt_mode": "random"},
                      {**_MEM_CELL, "corrupt": "0.2"}],
                   train=MEM_V2_TRAIN,
                   eval="--num-samples 1000 --cfg-scales 1,2 --sampler dpm++ --steps 25 --batch-size 500",
                   eval_steps="2000,2500,3000,3500,4000,4500,5000,5500", curve_eval="--cfg-scales 1")
# Its real-data part (fixed before its runs): Fashion-MNIST at 8 px through its own judge (the test split's halves),
# first the map of its copying regime: clean, k = 2, 5, 10 items per class, seed 0, memorization every 500 steps from
# 1000; python -m tools.memorize_v2 map turns it into the key arms' k.
FASHION = "--data fashion-mnist --data-root /usr/share/datasets/fashion-mnist"     # Debian's dataset-fashion-mnist
MEMORIZE_V2_FASHION_MAP = dict(MEMORIZE_V2, seeds="0", cells=parse_grid(["items_per_class=2,5,10"]),
                               train=f"{MEM_TRAIN} {FASHION} --steps 6000",
                               eval_steps="1000,1500,2000,2500,3000,3500,4000,4500,5000,5500")
# Then its key arms at the map's k (tools.memorize_v2 map: k = 2, the only k whose clean run reached 30 %), fixed
# before their runs: clean, CEP-U gamma 1 and 4, the control at the pilot's eta_r, static flips eta = 20 %; seeds 0-4;
# the built-in part's recipe, measurement and endpoints.
MEM_V2_FASHION_K = "2"
MEMORIZE_V2_FASHION = dict(MEMORIZE_V2, seeds="0,1,2,3,4",
                           cells=[_MEM_CELL] + [{**_MEM_CELL, "cep": "uniform", "cep_gamma": g} for g in ("1", "4")]
                           + [{**_MEM_CELL, "corrupt": MEM_V2_CONTROL_ETA, "corrupt_mode": "random"},
                              {**_MEM_CELL, "corrupt": "0.2"}],
                           train=f"{MEM_TRAIN} {FASHION} --items-per-class {MEM_V2_FASHION_K} --steps 6000")

# The built-in ControlNet (docs/controlnet.md): a clean plain DiT-T base (400 steps of batch 64), then a ControlNet
# over it trained 200 steps, beside one trained 1 step at lr 1e-9 (its zero layers still ~0: the base, sampling the
# same classes and seeds); measured on 200 held-out built-in images' Canny maps. The base runs first.
CONTROLNET_BASE = dict(script="train_dit", cells=[{"corrupt": "0"}], seeds="0", judge=200, fixed_scale=2.0,
                       train="--steps 400 --batch-size 64 --sample-every 0 --lr-warmdown 0 --min-snr 0 "
                             + OPTIMIZER_PIN + FOCUS_PIN + MLP_PIN + CONV_PIN.strip(),
                       eval="--num-samples 200 --cfg-scales 2 --sampler dpm++ --steps 10")
CONTROLNET_BUILTIN = dict(CONTROLNET_BASE, cells=[{"steps": "1", "lr": "1e-9"}, {"steps": "200"}],
                          train="--preset builtin-controlnet --sample-every 0 "
                                "--init-from results/controlnet-base/runs/clean/seed0/last.pt",
                          eval="--control canny --control-data builtin " + CONTROLNET_BASE["eval"]
                          + " --train-ref ''")      # no memorization columns: 100K training items, ~5 min each

# The CPU default (docs/cpu-default.md): `python train_dit.py` as it ships, seeds 0 and 1, scored by the judge on 200
# samples at guidance 2, 4, 6 with DPM-Solver++ and DDPM in 50 steps (one training run per seed serves both).
CPU_DEFAULT = dict(script="train_dit", cells=[{"sampler": "dpm++"}, {"sampler": "ddpm"}], seeds="0,1", jobs=2,
                   judge=200, fixed_scale=4.0, train="",       # no memorization columns: 100K items, none copied
                   eval="--num-samples 200 --cfg-scales 2,4,6 --steps 50 --train-ref ''")

PRESETS = {"smoke": SMOKE, "builtin": BUILTIN, "builtin-eta": BUILTIN_ETA, "builtin-probe": BUILTIN_PROBE,
           "in1k-dit": IN1K_DIT, "table2": TABLE2, "memorize-map": MEMORIZE_MAP, "memorize-map16": MEMORIZE_MAP16,
           "memorize": MEMORIZE, "memorize-quick": MEMORIZE_QUICK, "memorize-v2-pilot": MEMORIZE_V2_PILOT,
           "memorize-v2": MEMORIZE_V2, "memorize-v2-fashion-map": MEMORIZE_V2_FASHION_MAP,
           "memorize-v2-fashion": MEMORIZE_V2_FASHION,
           "controlnet-base": CONTROLNET_BASE, "controlnet-builtin": CONTROLNET_BUILTIN, "cpu-default": CPU_DEFAULT}


@dataclass
class SweepConfig:
    """Everything a sweep depends on; every field is a flag (lists as comma-separated or repeated strings)."""
    out: str = field(default="sweeps/run", metadata={"help": "sweep folder: runs/, results.csv, summary.md, plots"})
    script: str = field(default="train_dit", metadata={"help": "train_dit | train_ldm: the training script of every cell"})
    grid: list = field(default_factory=list, metadata={"help": "an axis KEY=V1,V2,... (repeatable; cells = product)"})
    cells: list = field(default_factory=list, metadata={"help": "(presets only) explicit cells instead of --grid"})
    seeds: str = field(default="0,1,2", metadata={"help": "comma-separated training seeds (each seeds data, init, noise)"})
    train: str = field(default="", metadata={"help": "extra train flags for every run, after the preset's"})
    eval: str = field(default="", metadata={"help": "extra evaluate.py flags for every run, after the preset's"})
    judge: int = field(default=0, metadata={"help": "measure with judge.py (built-in data; the digits' or Fashion-"
                                              "MNIST's judge when --train says --data so): its extractor, N "
                                              "fresh real images as --ref, each run's training set for memorization; "
                                              "0 = off"})
    reference: str = field(default="", metadata={"help": "builtin:N = write N held-out built-in images once as --ref"})
    metric: str = field(default="fid", metadata={"help": "the metric that picks each cell's best guidance scale"})
    fixed_scale: float = field(default=2.0, metadata={"help": "the fixed guidance scale reported beside the best"})
    launcher: str = field(default="python", metadata={"help": "python | torchrun (over --nproc local GPUs)"})
    nproc: int = field(default=0, metadata={"help": "torchrun processes per run; 0 = the local GPU count"})
    jobs: int = field(default=1, metadata={"help": "runs at a time (CPU: threads split between them)"})
    eval_steps: str = field(default="", metadata={"help": "comma-separated training steps (e.g. 2000,2500,3000) whose "
                                                 "checkpoints are kept and evaluated too, into RUN/eval/step_XXXXXXX/: "
                                                 "the metrics along training; empty = off"})
    curve_eval: str = field(default="", metadata={"help": "extra evaluate.py flags for the --eval-steps checkpoints, "
                                                 "after --eval's (e.g. --num-samples 1000 --cfg-scales 1)"})
    dry_run: bool = field(default=False, metadata={"help": "print the commands instead of running them"})
    log: str = field(default="", metadata={"help": "wandb | tensorboard: every run's training and evaluation records "
                                             "go there too, grouped by the sweep's name, named cell/seedS"})


# ---- planning: cells x seeds -> commands ----


@dataclass
class Run:
    cell: dict
    seed: int
    folder: Path                 # OUT/runs/<cell>/seed<S>: its eval/ (and, unless shared, the training run)
    train_cmd: list
    eval_cmd: list
    scales: list
    trained: Path | None = None  # the training run's folder, when another cell's (eval-side keys only differ)
    curve: dict = field(default_factory=dict)    # --eval-steps: step -> evaluate.py command of RUN/step_XXXXXXX.pt
    curve_scales: list = field(default_factory=list)  # the guidance scales those evaluations ask for

    @property
    def run_dir(self) -> Path:
        """The folder of the training run this run evaluates."""
        return self.trained or self.folder

    @property
    def name(self):
        return f"{cell_name(self.cell)}/seed{self.seed}"

    def checkpoint(self, step: int) -> Path:
        """The checkpoint the trainer keeps at `step` (runio: --keep-every)."""
        return self.run_dir / f"step_{step:07d}.pt"

    def curve_dir(self, step: int) -> Path:
        """Where the checkpoint of `step` is evaluated."""
        return self.folder / "eval" / f"step_{step:07d}"


def launcher_prefix(cfg: SweepConfig) -> list:
    """The command that starts a script: the current python, or torchrun over the local GPUs."""
    if cfg.launcher == "python":
        return [sys.executable]
    nproc = cfg.nproc or _gpu_count() or 1
    return ["torchrun", "--standalone", f"--nproc_per_node={nproc}"]


def _gpu_count():
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


def eval_scales(eval_args: list) -> list:
    """The guidance scales an evaluate.py command line asks for (its last --cfg-scales; evaluate's default 1.5)."""
    return [float(s) for s in flag_value(eval_args, "--cfg-scales", "1.5").split(",") if s.strip()]


def plan(cfg: SweepConfig, features: str = "") -> list:
    """Every run of the sweep, with its two commands (features: the judge's file, resolved by prepare_judge)."""
    cells = parse_grid(cfg.grid) if cfg.grid else [dict(c) for c in cfg.cells]
    if not cells:
        raise ValueError("no cells: pass --grid KEY=V1,V2,... or a --preset")
    seeds = parse_seeds(cfg.seeds)
    out = Path(cfg.out).resolve()
    prefix = launcher_prefix(cfg)
    extra_eval = []
    if cfg.reference:
        extra_eval = ["--ref", str(out / "reference")]
    if cfg.judge:   # the judge's extractor (built and cached on first use), its reference, the run's training set
        extra_eval = ["--features", features or judge_path_shell(cfg), "--resize", "none",
                      "--ref", str(out / "judge_ref.npz"), "--train-ref", "auto"]
    runs = []
    for seed, cell in itertools.product(seeds, cells):   # seed-major: a sweep cut short still has complete seeds
        train_args, eval_args = cell_args(cell)
        check_cell(cell, shlex.split(cfg.train))
        folder = out / "runs" / cell_name(cell) / f"seed{seed}"
        # cells that differ only in evaluate.py keys (cads=off,on) share one training run: the cell without them
        trained = out / "runs" / cell_name({k: v for k, v in cell.items() if k not in EVAL_KEYS}) / f"seed{seed}"
        train_words = [*shlex.split(cfg.train), *train_args]
        steps = curve_steps(cfg, train_words)
        train_cmd = prefix + [f"{cfg.script}.py", *train_words, *keep_flags(train_words, steps), "--seed", str(seed),
                              "--out", str(trained), "--resume", "auto"]
        ev = [*extra_eval, *shlex.split(cfg.eval), *eval_args]
        curve_ev = [*extra_eval, *shlex.split(cfg.eval), *shlex.split(cfg.curve_eval), *eval_args]
        eval_cmd = prefix + ["evaluate.py", str(trained / "last.pt"), *ev, "--out", str(folder / "eval")]
        run = Run(cell, seed, folder, train_cmd, eval_cmd, eval_scales(ev), trained=None if trained == folder else trained,
                  curve_scales=eval_scales(curve_ev))
        run.curve = {s: prefix + ["evaluate.py", str(run.checkpoint(s)), *curve_ev, "--out", str(run.curve_dir(s))]
                     for s in steps}
        if cfg.log:   # trackers group a sweep's runs by its name; each run is its cell and seed
            train_tags = ["--log", cfg.log, "--log-group", out.name, "--log-name", f"{trained.parent.name}/seed{seed}"]
            eval_tags = ["--log", cfg.log, "--log-group", out.name, "--log-name", f"{cell_name(cell)}/seed{seed}"]
            run.train_cmd, run.eval_cmd = train_cmd + train_tags, eval_cmd + eval_tags
            run.curve = {s: cmd + eval_tags for s, cmd in run.curve.items()}
        runs.append(run)
    names = [cell_name(c) for c in cells]
    if len(set(names)) != len(names):
        raise ValueError(f"two cells share a name: {names}")
    return runs


def parse_steps(text: str) -> list:
    """--eval-steps "2000,2500" -> [2000, 2500] (sorted, distinct, positive); "" -> []."""
    try:
        steps = sorted({int(s) for s in str(text).split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"--eval-steps: not a comma-separated list of integers: {text!r}") from None
    if steps and steps[0] < 1:
        raise ValueError(f"--eval-steps: steps must be >= 1, got {text!r}")
    return steps


def curve_steps(cfg: SweepConfig, train_words: list) -> list:
    """The --eval-steps a run evaluates: those before its last step (its final evaluation reads last.pt)."""
    final = requested_steps(train_words)
    return [s for s in parse_steps(cfg.eval_steps) if final is None or s < final]


def keep_flags(train_words: list, steps: list) -> list:
    """Train flags that make the trainer keep step_XXXXXXX.pt at every step of `steps`: it keeps one where both
    --ckpt-every and --keep-every divide the step, so a missing flag is set to the steps' gcd and a given one that
    misses a step is refused (ValueError, one line)."""
    extra = []
    for flag in ("--keep-every", "--ckpt-every") if steps else ():
        value = flag_value(train_words, flag, None)
        if value is None:
            extra += [flag, str(math.gcd(*steps))]
        elif not value.isdigit() or int(value) < 1 or any(s % int(value) for s in steps):
            missed = next((s for s in steps if not value.isdigit() or int(value) < 1 or s % int(value)), steps[0])
            raise ValueError(f"--eval-steps: {flag} {value} in the train flags keeps no checkpoint at step {missed}; "
                             f"pick eval steps it divides, or {flag} dividing them all (e.g. {math.gcd(*steps)})")
    return extra


def parse_seeds(text: str) -> list:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: not a comma-separated list of integers: {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: need distinct seeds, got {text!r}")
    return seeds


# ---- running: skip what is done, resume what was interrupted ----


def requested_steps(train_cmd: list):
    """The --steps of a train command line (None: the script's default)."""
    steps = flag_value(train_cmd, "--steps", None)
    return None if steps is None else int(steps)


def is_trained(run: Run) -> bool:
    """The run's log.jsonl holds a "done" event at the requested step count."""
    log = run.run_dir / "log.jsonl"
    if not log.is_file():
        return False
    steps = requested_steps(run.train_cmd)
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue        # a line cut by a kill
        if rec.get("event") == "done" and (steps is None or rec.get("step") == steps):
            return True
    return False


def is_evaluated(run: Run) -> bool:
    """results.json holds a row for every requested guidance scale."""
    return has_scales(run.folder / "eval" / "results.json", run.scales)


def is_curve_evaluated(run: Run, step: int) -> bool:
    """The checkpoint of `step` has results for every guidance scale its evaluation asks for (whether or not the
    checkpoint file is still there: results may be kept without their checkpoints)."""
    return has_scales(run.curve_dir(step) / "results.json", run.curve_scales)


def trained_to(run: Run) -> int:
    """The last step the run's log.jsonl records (0 before any)."""
    log, last = run.run_dir / "log.jsonl", 0
    for line in log.read_text().splitlines() if log.is_file() else ():
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue        # a line cut by a kill
        last = max(last, step) if isinstance(step, int) else last
    return last


def check_curve_checkpoints(runs: list):
    """Refuse (ValueError, one line) an --eval-steps evaluation that can never run: its results are missing and its
    checkpoint is gone although training went past its step, so no rerun of the sweep will write it again."""
    for run in runs:
        for step in run.curve:
            if (not is_curve_evaluated(run, step) and not run.checkpoint(step).is_file()
                    and trained_to(run) >= step):
                raise ValueError(f"{run.name}: {run.checkpoint(step)} is gone and {run.curve_dir(step)} has no "
                                 f"complete results; retrain the run (remove {run.run_dir}) or drop {step} from "
                                 "--eval-steps")


def has_scales(path: Path, scales: list) -> bool:
    """A results.json at `path` holds a row for every guidance scale of `scales`."""
    if not path.is_file():
        return False
    try:
        rows = json.loads(path.read_text())["rows"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
    have = {round(float(r["cfg_scale"]), 6) for r in rows if r.get("cfg_scale") is not None}
    return all(round(s, 6) in have for s in scales)


class Runner:
    """Runs commands as child processes, logs their output to files, and stops them cleanly on SIGTERM/SIGINT."""

    def __init__(self, threads):
        self.children, self.stopping, self.lock, self.threads = set(), False, threading.Lock(), threads
        self.cpu_seconds = {}   # thread id -> CPU seconds of the last command that thread ran

    def stop(self, signum=None, frame=None):
        self.stopping = True
        with self.lock:
            for p in self.children:
                p.send_signal(signal.SIGTERM)   # the trainer saves a checkpoint and exits

    def __call__(self, cmd, log_path):
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            with self.lock:
                if self.stopping:
                    return None
                p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
                self.children.add(p)
            _, status, usage = os.wait4(p.pid, 0)    # this child's own CPU time, even with other jobs running
            p.returncode = rc = os.waitstatus_to_exitcode(status)
            with self.lock:
                self.children.discard(p)
        self.cpu_seconds[threading.get_ident()] = usage.ru_utime + usage.ru_stime
        return rc


def execute(run: Run, runner: Runner, timings: Path):
    """Train (unless done), evaluate the --eval-steps checkpoints, then the final one (each unless done); returns
    (name, what happened)."""
    curve = [s for s in run.curve if not is_curve_evaluated(run, s)]
    if is_evaluated(run) and not curve:         # complete results need no training (a folder from before sharing)
        return run.name, "already done"
    did = []
    jobs = ([("train", is_trained, run.train_cmd, run.run_dir.parent / f"seed{run.seed}.train.log", None)]
            + [("curve", functools.partial(is_curve_evaluated, step=s), run.curve[s],
                run.folder.parent / f"seed{run.seed}.eval.step{s:07d}.log", run.checkpoint(s)) for s in curve]
            + [("eval", is_evaluated, run.eval_cmd, run.folder.parent / f"seed{run.seed}.eval.log", None)])
    for what, done, cmd, log, needs in jobs:
        if done(run):
            continue
        if needs is not None and not needs.is_file():
            raise RuntimeError(f"{run.name}: training kept no checkpoint {needs} to evaluate; see its train log")
        t0 = time.time()
        rc = runner(cmd, log)
        if rc is None or runner.stopping:
            return run.name, "stopped"
        if rc != 0 or not done(run):
            raise RuntimeError(f"{what} of {run.name} failed (exit {rc}); see {log}")
        seconds = time.time() - t0
        with runner.lock, open(timings, "a") as f:
            f.write(json.dumps({"run": run.name, "what": what, "seconds": round(seconds, 1),
                                "cpu_seconds": round(runner.cpu_seconds[threading.get_ident()], 1)}) + "\n")
        did.append(f"{what} {seconds:.0f}s")
    return run.name, ", ".join(did) or "already done"


def execute_all(runs: list, runner: Runner, timings: Path) -> list:
    """execute() runs that share one training run, in turn (the first trains it); [(name, what happened)]."""
    done = []
    for run in runs:
        done.append(execute(run, runner, timings))
        if done[-1][1] == "stopped":
            break
    return done


def run_all(runs: list, cfg: SweepConfig, runner: Runner | None = None) -> bool:
    """Run every run (cfg.jobs training runs at a time, each followed by its cells' evaluations); True if all
    finished."""
    check_curve_checkpoints(runs)
    threads = max(1, (os.cpu_count() or 1) // max(1, cfg.jobs))
    runner = runner or Runner(threads)
    signal.signal(signal.SIGTERM, runner.stop)
    signal.signal(signal.SIGINT, runner.stop)
    timings, stopped, i = Path(cfg.out) / "timings.jsonl", False, 0
    shared = {}                                  # training folder -> its runs: never two jobs on one folder
    for run in runs:
        shared.setdefault(run.run_dir, []).append(run)
    with concurrent.futures.ThreadPoolExecutor(max(1, cfg.jobs)) as pool:
        futures = [pool.submit(execute_all, group, runner, timings) for group in shared.values()]
        for fut in concurrent.futures.as_completed(futures):
            try:
                results = fut.result()
            except RuntimeError as e:
                runner.stop()
                raise RuntimeError(str(e)) from None
            for name, what in results:
                i += 1
                stopped |= what == "stopped"
                print(f"sweep: [{i}/{len(runs)}] {name}: {what}", flush=True)
    return not stopped


# ---- the reference images ----


def image_size(cfg: SweepConfig) -> int:
    """The --image-size the runs train at (train_dit/train_ldm default 16)."""
    return int(flag_value(shlex.split(cfg.train), "--image-size", "16"))


JUDGED_DATA = ("builtin", "digits", "fashion-mnist")   # scoring/judge.py's (a torch-free copy)


def train_data(cfg: SweepConfig) -> str:
    """The --data the runs train on (train_dit/train_ldm default builtin)."""
    return flag_value(shlex.split(cfg.train), "--data", "builtin")


def judge_data(cfg: SweepConfig) -> list:
    """The judge.py flags naming the runs' data: [] for the built-in judge, ["--data", "digits"], or for a torchvision
    set its name and the runs' --data-root."""
    name = train_data(cfg)
    if name == "builtin":
        return []
    if name == "digits":
        return ["--data", name]
    return ["--data", name, "--data-root", flag_value(shlex.split(cfg.train), "--data-root", "data")]


def judge_path_shell(cfg: SweepConfig) -> str:
    """The shell substitution that prints the judge's path (--dry-run shows it in place of the resolved file)."""
    words = ["python", "-m", "scoring.judge", "path", *judge_data(cfg), "--image-size", str(image_size(cfg))]
    return f"$({shlex.join(words)})"


def judge_commands(cfg: SweepConfig) -> list:
    """The two judge.py calls made once per sweep: the extractor's path (built on first use), the reference features
    (real data: --judge N of its fresh part, at most all of it)."""
    size, which = str(image_size(cfg)), judge_data(cfg)
    return [[sys.executable, "-m", "scoring.judge", "path", *which, "--image-size", size],
            [sys.executable, "-m", "scoring.judge", "ref", *which, "--image-size", size, "--num", str(cfg.judge),
             "--out", str(Path(cfg.out).resolve() / "judge_ref.npz")]]


def prepare_judge(cfg: SweepConfig) -> str:
    """Run judge_commands (the reference only once); returns the extractor's path."""
    path_cmd, ref_cmd = judge_commands(cfg)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    for cmd in ([path_cmd] if (Path(cfg.out) / "judge_ref.npz").is_file() else [path_cmd, ref_cmd]):
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd[1:])} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        if cmd is path_cmd:
            features = r.stdout.strip().splitlines()[-1]
    return features


def write_builtin_reference(folder: Path, spec: str, image_size: int = 16):
    """builtin:N -> N held-out built-in images (dataset seed 10**6, disjoint from every training seed) as PNGs."""
    from PIL import Image
    import data
    n = int(spec.split(":", 1)[1])
    if folder.is_dir() and len(list(folder.glob("*.png"))) == n:
        return
    folder.mkdir(parents=True, exist_ok=True)
    ds = data.BuiltinShapes(size=image_size, length=n, seed=10**6)
    for i in range(n):
        Image.fromarray(ds.render(i)).save(folder / f"{i:06d}.png")


# ---- collecting: one row per run x guidance scale ----


def collect(runs: list) -> list:
    """Rows of every evaluated run: its results.json rows plus the cell's settings, the seed, the training config and
    the step of the checkpoint evaluated (--eval-steps' checkpoints, then the final one at the run's last step)."""
    rows = []
    for run in runs:
        config_path = run.run_dir / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        train_cfg = {f"train.{k}": v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
        final = requested_steps(run.train_cmd)
        for step, path in [*((s, run.curve_dir(s) / "results.json") for s in run.curve),
                           (None, run.folder / "eval" / "results.json")]:
            if not path.is_file():
                continue
            results = json.loads(path.read_text())
            code = results.get("provenance") or {}      # the code that evaluated (plumbing/provenance.py)
            for r in results["rows"]:
                r = {("sample_seed" if k == "seed" else k): v for k, v in r.items()}   # "seed" is the training seed
                r = {(f"eval.{k}" if k in run.cell else k): v for k, v in r.items()}   # a cell key keeps its column
                at = step if step is not None else r.get("train_step", final)
                rows.append({"cell": cell_name(run.cell), **run.cell, "seed": run.seed, "step": at, **r,
                             "commit": code.get("commit"), "dirty": code.get("dirty"), **train_cfg})
    return rows


def final_rows(rows: list, runs: list) -> list:
    """The rows of each run's final evaluation: those whose step is not one of its --eval-steps checkpoints (which all
    lie before its last step), so a run whose final evaluation is still missing has none yet."""
    curve = {(cell_name(run.cell), run.seed): set(run.curve) for run in runs}
    return [r for r in rows if r.get("step") not in curve.get((r["cell"], r["seed"]), ())]


def training_curves(rows: list, metric: str, scale: float) -> dict:
    """{cell: {seed: [(step, value of `metric` at guidance scale `scale`)]}} sorted by step: each run's metric along
    training, from its --eval-steps checkpoints and its final evaluation (rows without the value are left out)."""
    out = {}
    for r in rows:
        v = r.get(metric)
        if (v is None or v == "" or r.get("step") in (None, "") or r.get("cfg_scale") is None
                or round(float(r["cfg_scale"]), 6) != round(float(scale), 6) or math.isnan(float(v))):
            continue
        out.setdefault(r["cell"], {}).setdefault(r["seed"], []).append((int(r["step"]), float(v)))
    return {c: {seed: sorted(pts) for seed, pts in per_seed.items()} for c, per_seed in out.items()}


def csv_text(rows: list) -> str:
    """results.csv's text: the cell, seed, step, scale and metric columns first, then every other column by name."""
    first = ["cell", "seed", "step", "cfg_scale", *HIGHER_IS_BETTER]
    columns = [c for c in first if any(c in r for r in rows)]
    columns += sorted({k for r in rows for k in r} - set(columns))
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=columns)
    w.writeheader()
    w.writerows([{c: "" if r.get(c) is None else r.get(c) for c in columns} for r in rows])
    return text.getvalue()


def write_csv(rows: list, path: Path):
    with open(path, "w", newline="") as f:
        f.write(csv_text(rows))


def parse_csv(text: str, where: str = "results.csv") -> list:
    """csv_text's rows as collect() gave them to the summary: the seed an int, the scale and every metric a float,
    an empty field None (floats are written as repr, so they come back bit for bit)."""
    numeric = {"cfg_scale", *HIGHER_IS_BETTER}
    try:
        return [{k: None if v == "" else int(v) if k in ("seed", "step") else float(v) if k in numeric else v
                 for k, v in r.items()} for r in csv.DictReader(io.StringIO(text, newline=""))]
    except (ValueError, TypeError, csv.Error) as e:
        raise ValueError(f"{where}: not a sweep's results.csv ({e})") from None


# ---- statistics: t-intervals over seeds, paired differences to the clean cell (scoring/stats.py) ----


def table_of(rows: list, metric: str) -> dict:
    """{cell: {seed: {scale: value}}} for one metric (rows without it are left out)."""
    out = {}
    for r in rows:
        v = r.get(metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        out.setdefault(r["cell"], {}).setdefault(r["seed"], {})[round(float(r["cfg_scale"]), 6)] = float(v)
    return out


def best_scale(per_seed: dict, metric: str):
    """The scale whose mean over seeds is best for `metric` (only scales every seed has)."""
    scales = set.intersection(*(set(s) for s in per_seed.values()))
    if not scales:
        return None
    means = {s: np.mean([per_seed[seed][s] for seed in per_seed]) for s in scales}
    pick = max if HIGHER_IS_BETTER.get(metric, False) else min
    return pick(sorted(means), key=means.get)


def scale_edge(per_seed: dict, scale):
    """'lowest' / 'highest' when `scale` is at that end of the guidance scales every seed has (of two or more): the
    best scale may then lie outside the grid; None inside it."""
    scales = set.intersection(*(set(s) for s in per_seed.values())) if per_seed else set()
    if scale is None or len(scales) < 2:
        return None
    return "lowest" if scale == min(scales) else "highest" if scale == max(scales) else None


def summarize(rows: list, runs: list, metric: str, fixed_scale: float) -> dict:
    """Per cell and metric: mean ± CI at the best and the fixed scale, and the paired difference to the clean cell;
    best_at_edge names the cells whose best scale is the grid's lowest or highest."""
    cells = {cell_name(r.cell): r.cell for r in runs}
    chooser = table_of(rows, metric)
    best = {c: best_scale(per_seed, metric) for c, per_seed in chooser.items()}
    edge = {c: side for c, s in best.items() if (side := scale_edge(chooser[c], s))}
    fixed = round(float(fixed_scale), 6)
    summary = {"best_scale": best, "best_at_edge": edge, "fixed_scale": fixed, "metric": metric, "cells": {}}
    metrics = [m for m in HIGHER_IS_BETTER if any(r.get(m) is not None for r in rows)]
    for name, cell in cells.items():
        clean = cell_name(clean_counterpart(cell))
        entry = {"clean": clean, "n_seeds": len(chooser.get(name, {})), "metrics": {}}
        for m in metrics:
            tab = table_of(rows, m)
            entry["metrics"][m] = {rule: _cell_stats(tab, name, clean, scale_of)
                                   for rule, scale_of in (("best", best.get), ("fixed", lambda c: fixed))}
        summary["cells"][name] = entry
    return summary


def _cell_stats(tab: dict, name: str, clean: str, scale_of) -> dict:
    """mean ± CI of a cell at scale_of(cell), and of (cell - clean) over the seeds both have, each at its own scale."""
    s, s0 = scale_of(name), scale_of(clean)
    mine = {seed: v[s] for seed, v in tab.get(name, {}).items() if s in v}
    base = {seed: v[s0] for seed, v in tab.get(clean, {}).items() if s0 in v}
    mean, half = t_interval(list(mine.values()))
    stats = {"scale": s, "mean": mean, "ci": half, "n": len(mine)}
    if name != clean:
        both = sorted(set(mine) & set(base))
        diff = paired([mine[k] for k in both], [base[k] for k in both])
        stats["diff"], stats["diff_ci"], stats["diff_n"] = diff["diff"], diff["half"], diff["n"]
    return stats


# ---- writing: summary.md, table.md, plots ----


def _pm(mean, half):
    """'mean ± half' with 3 significant digits; a lone value when there is no interval."""
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.3g}" if half is None or math.isnan(half) else f"{mean:.3g} ± {half:.2g}"


def summary_json(summary: dict) -> str:
    """summary.json's text (tools/results.py reads its metric and fixed scale back)."""
    return json.dumps(summary, indent=1, default=str) + "\n"


def write_summary(summary: dict, path: Path, header: str):
    """summary.md: the header line, then summary_text's tables."""
    path.write_text(f"# Sweep summary\n\n{header}\n\n" + summary_text(summary))


def summary_text(summary: dict) -> str:
    """One table per scale rule, one row per cell, each metric as mean ± CI and the paired difference (Markdown)."""
    lines = [f"Mean ± 95 % Student-t interval over seeds. *best*: each cell's guidance scale with the best mean "
             f"{summary['metric']} (over the scales every seed has); *fixed*: s = {summary['fixed_scale']:g}. "
             "Δ: the paired difference (same seed) to the cell's clean counterpart, each at its own scale.\n"]
    first = next(iter(summary["cells"].values()), None)
    metrics = list(first["metrics"]) if first else []
    for rule in ("best", "fixed"):
        lines += [f"\n## At the {rule} scale\n", "| cell | seeds | s | " + " | ".join(
            f"{METRIC_NAMES.get(m, m)} | Δ {METRIC_NAMES.get(m, m)}" for m in metrics) + " |",
            "|---" * (3 + 2 * len(metrics)) + "|"]
        for name, entry in summary["cells"].items():
            cols = []
            for m in metrics:
                st = entry["metrics"][m][rule]
                cols += [_pm(st["mean"], st["ci"]), "(clean)" if name == entry["clean"] else _pm(st.get("diff"),
                                                                                                 st.get("diff_ci"))]
            scale = entry["metrics"][metrics[0]][rule]["scale"] if metrics else None
            mark = " (edge)" if rule == "best" and name in summary.get("best_at_edge", {}) else ""
            lines.append(f"| {name} | {entry['n_seeds']} | {'–' if scale is None else f'{scale:g}'}{mark} | "
                         + " | ".join(cols) + " |")
    edge = summary.get("best_at_edge", {})
    if edge:
        lines.append("\n**Best scale at the edge of the grid:** " + "; ".join(
            f"{name}: s = {summary['best_scale'][name]:g} is the {side} scale evaluated" for name, side in edge.items())
            + ". The best scale may lie outside the grid: widen `--cfg-scales` before reading these rows as the "
            "cell's best.")
    return "\n".join(lines) + "\n"


def write_table(summary: dict, path: Path):
    """table.md: table_text."""
    path.write_text(table_text(summary))


def table_text(summary: dict) -> str:
    """A table in the style of the paper's Table 1: FID / IS / precision / recall (+ judge metrics) at the fixed
    scale, the best mean of each column in bold (Markdown)."""
    cells = summary["cells"]
    metrics = list(next(iter(cells.values()))["metrics"]) if cells else []
    lines = [f"| cell (s = {summary['fixed_scale']:g}) | " + " | ".join(
        f"{METRIC_NAMES.get(m, m)} ({'↑' if HIGHER_IS_BETTER[m] else '↓'})" for m in metrics) + " |",
        "|---" * (1 + len(metrics)) + "|"]
    best = {}
    for m in metrics:
        means = [e["metrics"][m]["fixed"]["mean"] for e in cells.values()]
        means = [v for v in means if not math.isnan(v)]
        best[m] = (max if HIGHER_IS_BETTER[m] else min)(means) if means else None
    for name, e in cells.items():
        cols = []
        for m in metrics:
            st = e["metrics"][m]["fixed"]
            text = _pm(st["mean"], st["ci"])
            cols.append(f"**{text}**" if best[m] is not None and st["mean"] == best[m] else text)
        lines.append(f"| {name} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def x_axis(cells: dict) -> str:
    """The key plotted along x: the corruption ratio if it varies, else the first numeric axis that varies."""
    keys = list(dict.fromkeys(k for c in cells.values() for k in c))
    varying = [k for k in keys if len({c.get(k) for c in cells.values()}) > 1]
    numeric = [k for k in varying if all(_is_number(c.get(k, "x")) for c in cells.values())]
    return "corrupt" if "corrupt" in numeric else (numeric[0] if numeric else "")


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def plot_vs_eta(summary: dict, runs: list, path: Path, rule="best"):
    """Fig. 2 style: each metric against the corruption ratio η (or the numeric axis that varies, e.g. the
    training-set size), one line per group of cells whose other settings are equal; error bars are the 95 % CIs."""
    plt = _plt()
    cells = {cell_name(r.cell): r.cell for r in runs}
    xkey = x_axis(cells)
    metrics = [m for m in HIGHER_IS_BETTER if any(m in e["metrics"] for e in summary["cells"].values())]
    ncols = min(4, max(1, len(metrics)))
    nrows = math.ceil(max(1, len(metrics)) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    groups = {}
    for i, (name, cell) in enumerate(cells.items()):
        rest = ", ".join(f"{k}={v}" for k, v in cell.items() if k != xkey) or "all"
        groups.setdefault(rest, []).append((float(cell[xkey]) if xkey else i, name))
    scale, logx = (100, False) if xkey == "corrupt" else (1, bool(xkey))
    xs = sorted({scale * x for members in groups.values() for x, _ in members})
    for ax, m in zip(axes.flat, metrics):
        for g, (label, members) in enumerate(groups.items()):
            pts = [(x, summary["cells"][n]["metrics"][m][rule]) for x, n in sorted(members) if n in summary["cells"]]
            err = [0 if math.isnan(st["ci"]) else st["ci"] for _, st in pts]
            shift = 0.04 * (g - (len(groups) - 1) / 2)      # side by side, so the error bars do not hide each other
            x = [scale * x * (1 + shift) if logx else scale * x + shift * (xs[-1] - xs[0] or 1) for x, _ in pts]
            ax.errorbar(x, [st["mean"] for _, st in pts], yerr=err, marker="o", capsize=3, label=label)
        ax.set_xlabel({"corrupt": "corruption η (%)", "": "cell"}.get(xkey, xkey))
        if logx:
            ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_title(METRIC_NAMES.get(m, m) + (" ↑" if HIGHER_IS_BETTER[m] else " ↓"))
    axes[0][0].legend(fontsize=7)
    where = f"s = {summary['fixed_scale']:g}" if rule == "fixed" else f"each cell's best scale (by {summary['metric']})"
    fig.suptitle(f"mean ± 95 % CI over seeds, at {where}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(rows: list, path: Path):
    """Fig. 3 style: FID against IS (or class accuracy) and precision against recall, one point per guidance scale."""
    plt = _plt()
    x_metric = "is_mean" if any(r.get("is_mean") is not None for r in rows) else "class_acc"
    pairs = [(x_metric, "fid"), ("recall", "precision")]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, (xm, ym) in zip(axes, pairs):
        for cell in dict.fromkeys(r["cell"] for r in rows):
            xs, ys = table_of(rows, xm).get(cell, {}), table_of(rows, ym).get(cell, {})
            scales = sorted(set.intersection(*(set(v) for v in list(xs.values()) + list(ys.values()))) if xs else ())
            mean = lambda tab, s: np.mean([v[s] for v in tab.values() if s in v])
            px, py = [mean(xs, s) for s in scales], [mean(ys, s) for s in scales]
            ax.plot(px, py, marker="o", label=cell)
            for s, x, y in zip(scales, px, py):
                ax.annotate(f"{s:g}", (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel(METRIC_NAMES.get(xm, xm))
        ax.set_ylabel(METRIC_NAMES.get(ym, ym))
    axes[0].legend(fontsize=7)
    fig.suptitle("across guidance scales (mean over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def step_intervals(per_seed: dict) -> dict:
    """{step: (mean, half-width of the 95 % t-interval)} over the seeds of one cell's training curves."""
    by_step = {}
    for pts in per_seed.values():
        for step, v in pts:
            by_step.setdefault(step, []).append(v)
    return {step: t_interval(values) for step, values in by_step.items()}


def plot_training_curves(rows: list, metric: str, scale: float, path: Path) -> bool:
    """curve_<metric>.png: the metric at guidance scale `scale` against the training step, mean over seeds ± 95 %
    Student-t interval per step, one line per cell; False (nothing written) when no row has it."""
    curves = training_curves(rows, metric, scale)
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for cell, per_seed in curves.items():
        per_step = step_intervals(per_seed)
        steps = sorted(per_step)
        stats = [per_step[s] for s in steps]
        ax.errorbar(steps, [m for m, _ in stats], yerr=[0 if math.isnan(h) else h for _, h in stats], marker="o",
                    capsize=3, label=f"{cell} ({len(per_seed)} seeds)")
    ax.set_xlabel("training step")
    ax.set_ylabel(METRIC_NAMES.get(metric, metric) + (" ↑" if HIGHER_IS_BETTER.get(metric) else " ↓"))
    ax.legend(fontsize=7)
    ax.set_title(f"along training at s = {scale:g}: mean ± 95 % CI over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(runs: list, cfg: SweepConfig, header: str = ""):
    """Write results.csv, summary.md, table.md and the plots from whatever runs are evaluated; returns the summary."""
    out = Path(cfg.out)
    every = collect(runs)
    if not every:
        return None
    write_csv(every, out / "results.csv")
    rows = final_rows(every, runs)               # the summary and its plots read each run's final evaluation
    summary = summarize(rows, runs, cfg.metric, cfg.fixed_scale)
    (out / "summary.json").write_text(summary_json(summary))
    spent = {}
    if (out / "timings.jsonl").is_file():
        for line in (out / "timings.jsonl").read_text().splitlines():
            rec = json.loads(line)
            for key in ("seconds", "cpu_seconds"):
                spent[rec["what"], key] = spent.get((rec["what"], key), 0.0) + rec.get(key, math.nan)
    header += "; time inside the runs (timings.jsonl): " + (", ".join(
        f"{what} {sec / 60:.1f} min{' (CPU)' if key == 'cpu_seconds' else ''}"
        for (what, key), sec in spent.items() if not math.isnan(sec)) or "none")
    write_summary(summary, out / "summary.md", header)
    write_table(summary, out / "table.md")
    plot_vs_eta(summary, runs, out / "metric_vs_eta.png", "best")
    plot_vs_eta(summary, runs, out / "metric_vs_eta_fixed.png", "fixed")
    plot_curves(rows, out / "curves.png")
    if parse_steps(cfg.eval_steps):              # the metrics along training (the final step included)
        for metric in dict.fromkeys([cfg.metric, "mem_ratio_px"]):
            plot_training_curves(every, metric, cfg.fixed_scale, out / f"curve_{metric}.png")
    return summary


# ---- command line ----


def parse_args(argv=None) -> SweepConfig:
    """Flags over the preset over the defaults; --grid replaces the preset's cells."""
    from plumbing.common import ArgParser
    p = ArgParser(prog="sweep.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a protocol: " + " | ".join(PRESETS) + " (see the docstring)")
    for f in dataclasses.fields(SweepConfig):
        if f.name == "cells":
            continue
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=argparse.SUPPRESS, help=f.metadata["help"])
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "grid":
            p.add_argument(flag, action="append", **kw)
        else:
            p.add_argument(flag, type=f.type if f.type in (int, float) else str, **kw)
    given = vars(p.parse_args(argv))
    preset = dict(PRESETS[given.pop("preset")]) if given.get("preset") else (given.pop("preset", None) or {})
    for key in ("train", "eval", "curve_eval"):  # extra flags come after the preset's (argparse: the last one wins)
        if key in given and preset.get(key):
            given[key] = f"{preset[key]} {given[key]}"
    cfg = SweepConfig(**{**preset, **given})
    if given.get("grid"):
        cfg.cells = []
    return cfg


def check(cfg: SweepConfig):
    """Refuse bad settings before any work starts."""
    from plumbing.common import file_in_the_way
    if not (REPO / f"{cfg.script}.py").is_file() or not cfg.script.startswith("train_"):
        raise ValueError(f"--script {cfg.script!r}: expected train_dit or train_ldm")
    if cfg.launcher not in ("python", "torchrun"):
        raise ValueError(f"--launcher {cfg.launcher!r}: expected python or torchrun")
    if cfg.jobs < 1 or cfg.nproc < 0:
        raise ValueError(f"--jobs must be >= 1 and --nproc >= 0, got {cfg.jobs} and {cfg.nproc}")
    if (blocker := file_in_the_way(cfg.out)) is not None:
        raise ValueError(f"--out {cfg.out}: {blocker} is a file, not a sweep folder; pick another --out")
    if cfg.metric not in HIGHER_IS_BETTER:
        raise ValueError(f"--metric {cfg.metric!r}: expected one of {', '.join(HIGHER_IS_BETTER)}")
    if cfg.reference and not (cfg.reference.startswith("builtin:") and cfg.reference[8:].isdigit()):
        raise ValueError(f"--reference {cfg.reference!r}: expected builtin:N")
    if cfg.judge and cfg.reference:
        raise ValueError("--judge N brings its own reference: drop --reference (or pass --judge 0)")
    if cfg.judge < 0 or 0 < cfg.judge < 10:
        raise ValueError(f"--judge {cfg.judge}: need at least 10 reference images (0 = off)")
    tracking.parse_trackers(cfg.log)                    # an unknown tracker or a missing package: one line, now
    parse_steps(cfg.eval_steps)
    for text, what in ((cfg.train, "--train"), (cfg.eval, "--eval"), (cfg.curve_eval, "--curve-eval")):
        try:
            shlex.split(text)
        except ValueError as e:
            raise ValueError(f"{what} {text!r}: {e}") from None
    data = train_data(cfg)
    if cfg.judge and data not in JUDGED_DATA:
        raise ValueError(f"--judge {cfg.judge}: the judge knows {', '.join(JUDGED_DATA[:-1])} and {JUDGED_DATA[-1]} "
                         f"only, and --train trains on --data {data}; pass --judge 0 and give --eval its own "
                         "--features and --ref")


def _without(words: list, pin: list) -> list:
    """The flags `words` with the flag sequence `pin` taken out (unchanged when it is not there)."""
    at = next((i for i in range(len(words)) if words[i:i + len(pin)] == pin), None)
    return words if at is None else words[:at] + words[at + len(pin):]


def _same_runs_before_pins(old_train: str, train: str) -> bool:
    """Whether a sweep folder's stored train flags are `train` less some of the PINS: written before a pin existed,
    they trained the same runs (a stored config without the convolutions', --mlp-ratio's, --t-focus's or --optimizer's
    fields was trained without them: plain DiT, 4x MLPs, uniform timesteps, AdamW)."""
    words, old = shlex.split(train), shlex.split(old_train)
    variants = [words]
    for pin in PINS:                                     # every subset of the pins taken out
        variants += [_without(v, shlex.split(pin)) for v in variants]
    return old != words and old in variants


def pin_protocol(cfg: SweepConfig, runs: list):
    """OUT/sweep.json holds what the runs depend on; a rerun into the same OUT must match it (else nothing is touched)."""
    protocol = {"script": cfg.script, "cells": list({cell_name(r.cell): r.cell for r in runs}.values()),
                "seeds": parse_seeds(cfg.seeds), "train": cfg.train, "eval": cfg.eval, "reference": cfg.reference,
                "judge": cfg.judge}
    if cfg.eval_steps or cfg.curve_eval:         # only when set, so folders written before these fields still resume
        protocol.update(eval_steps=cfg.eval_steps, curve_eval=cfg.curve_eval)
    path = Path(cfg.out) / "sweep.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if _same_runs_before_pins(old.get("train", ""), protocol["train"]):
            old["train"] = protocol["train"]
        if old != protocol:
            diff = sorted(k for k in protocol if old.get(k) != protocol[k])
            raise ValueError(f"{cfg.out} holds a sweep with other settings ({', '.join(diff)} differ; see {path}): "
                             "rerun with the same flags to resume, or pick another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(protocol, indent=1) + "\n")


def print_commands(cfg: SweepConfig, runs: list):
    """--dry-run: the commands, one per line, in the order they would run (train, then eval, per run; a training run
    that cells share, once)."""
    path_shell = judge_path_shell(cfg)
    show = lambda cmd: shlex.join(["python" if c == sys.executable else c for c in cmd]).replace(
        shlex.quote(path_shell), f'"{path_shell}"')                                     # let the shell expand it
    if cfg.judge:
        for cmd in judge_commands(cfg):
            print(f"# once: {show(cmd)}")
    if cfg.reference:
        print(f"# once: {cfg.reference} held-out images -> {Path(cfg.out).resolve() / 'reference'} "
              f"(python -c 'import sweep; sweep.write_builtin_reference(...)')")
    trained = set()
    for run in runs:
        print(f"# {run.name}" + (f" (evaluates {run.run_dir.parent.name}/seed{run.seed}'s training run)"
                                 if run.trained else ""))
        if run.run_dir not in trained:
            print(show(run.train_cmd))
            trained.add(run.run_dir)
        for cmd in run.curve.values():
            print(show(cmd))
        print(show(run.eval_cmd))


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        check(cfg)
        runs = plan(cfg)
        if cfg.dry_run:
            print_commands(cfg, runs)
            return 0
        pin_protocol(cfg, runs)
        t0 = time.time()
        if cfg.judge:
            runs = plan(cfg, features=prepare_judge(cfg))
        if cfg.reference:
            write_builtin_reference(Path(cfg.out) / "reference", cfg.reference)
        print(f"sweep: {len(runs)} runs ({len(runs) // len(parse_seeds(cfg.seeds))} cells x "
              f"{len(parse_seeds(cfg.seeds))} seeds) -> {cfg.out}", flush=True)
        finished = run_all(runs, cfg)
        wall = time.time() - t0
        header = f"`{shlex.join(['python', 'sweep.py', *(sys.argv[1:] if argv is None else argv)])}`; " \
                 f"this invocation's wall time {wall / 60:.1f} min"
        summary = report(runs, cfg, header)
        print(f"sweep: {'done' if finished else 'stopped (rerun the same command to resume)'} in {wall:.0f} s; "
              + (f"wrote {cfg.out}/results.csv, summary.md, table.md, metric_vs_eta*.png, curves.png"
                 + (", curve_*.png" if cfg.eval_steps else "")
                 if summary else "nothing evaluated yet"), flush=True)
        return 0 if finished else 1
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
