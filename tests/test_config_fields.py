"""Checkpoints written before a config field existed are read as they were trained: config.ABSENT_MEANS covers every
field added since the first release, and a resume or fine-tune of such a checkpoint keeps its recipe.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_config_fields.py
"""
import dataclasses

import torch

import train_dit
import train_ldm
from config import ABSENT_MEANS, FIRST_RELEASE_FIELDS, parse_config
from conftest import TINY, expect_one_line_error, load_ckpt, run_tiny
from weights import pretrained


def test_every_field_added_since_the_first_release_says_what_its_absence_means():
    """A field added to either config without an ABSENT_MEANS entry would read an older checkpoint with the current
    default (train_dit's Min-SNR 5 for a plain ε-MSE run): add its value from before the field existed."""
    fields = {f.name for c in (train_dit.DiTConfig, train_ldm.LDMConfig) for f in dataclasses.fields(c)}
    assert fields - FIRST_RELEASE_FIELDS - set(ABSENT_MEANS) == set(), "fields without an ABSENT_MEANS entry"
    assert set(ABSENT_MEANS) - fields == set() and set(ABSENT_MEANS) & FIRST_RELEASE_FIELDS == set()
    assert FIRST_RELEASE_FIELDS <= fields                 # no first-release field was dropped or renamed


def test_a_first_release_config_is_the_plain_official_recipe():
    """A stored config holding only first-release fields rebuilds as what that code trained: the official DiT layout,
    ε-MSE with uniform timesteps, AdamW at a constant lr, every item, no ablation, and it resolves."""
    full = dataclasses.asdict(train_dit.DiTConfig())
    cfg = train_dit.FAMILY.config_from({k: v for k, v in full.items() if k in FIRST_RELEASE_FIELDS})
    assert (cfg.min_snr, cfg.lr_warmdown, cfg.t_focus, cfg.optimizer) == (0.0, 0, 0.0, "adamw")
    assert (cfg.pixel_channels, cfg.token_conv, cfg.mlp_ratio) == (0, False, 4.0)
    assert (cfg.cep_subset, cfg.cond_dropout, cfg.label_smoothing, cfg.items_per_class) == (1.0, 0.0, 0.0, 0)
    train_dit.resolve(cfg)


# The flags of a run from before --min-snr, --lr-warmdown, --t-focus, --optimizer and the DiT's convolutions: the
# tiny run's flags without the ones it could not name, and the layout that code built (still checked on resume).
OLD = [a for i, a in enumerate(TINY) if a not in ("--lr-warmdown", "--min-snr") and TINY[i - 1] not in
       ("--lr-warmdown", "--min-snr")]
LAYOUT = ["--pixel-channels", "0", "--no-token-conv", "--mlp-ratio", "4"]
AS_TRAINED = ["--min-snr", "0", "--lr-warmdown", "0", "--t-focus", "0", "--optimizer", "adamw"]


def _old_checkpoint(out):
    """A 2-step run of that recipe with every field added since the first release removed from its stored config."""
    assert run_tiny(train_dit.main, out, "--steps", 2, *LAYOUT, *AS_TRAINED) == 0
    state = load_ckpt(out)
    state["config"] = {k: v for k, v in state["config"].items() if k in FIRST_RELEASE_FIELDS}
    torch.save(state, out / "last.pt")


def _equal(a, b) -> bool:
    return all(torch.equal(a[p][k], b[p][k]) for p in ("model", "ema") for k in a[p])


def test_old_checkpoint_resumes_as_plain_eps_mse_without_warmdown(tmp_path, capsys):
    """Resumed with the command that started it (which could not name --min-snr or --lr-warmdown), a checkpoint without
    min_snr / lr_warmdown continues as trained: bit-identical to a straight ε-MSE, constant-lr, AdamW run; its true
    --min-snr 0 is accepted, and the current default Min-SNR 5 given on purpose is refused, naming the stored 0."""
    assert run_tiny(train_dit.main, tmp_path / "straight", "--steps", 4, *LAYOUT, *AS_TRAINED) == 0
    _old_checkpoint(tmp_path / "old")
    argv = OLD + ["--out", str(tmp_path / "old"), "--steps", "4", "--resume", "auto", *LAYOUT]
    capsys.readouterr()
    expect_one_line_error(capsys, train_dit.main, "train_dit.py", argv + ["--min-snr", "5"],
                          "it has --min-snr 0.0 but this run has 5.0")
    assert train_dit.main(argv) == 0
    resumed = load_ckpt(tmp_path / "old")
    assert {k: resumed["config"][k] for k in ("min_snr", "lr_warmdown", "t_focus", "optimizer")} == dict(
        min_snr=0.0, lr_warmdown=0, t_focus=0.0, optimizer="adamw")
    assert _equal(load_ckpt(tmp_path / "straight"), resumed)
    _old_checkpoint(tmp_path / "given")                                       # its true value, given explicitly
    assert train_dit.main(OLD + ["--out", str(tmp_path / "given"), "--steps", "3", "--resume", "auto", *LAYOUT,
                                 "--min-snr", "0"]) == 0


def test_old_checkpoint_fine_tunes_with_its_own_recipe(tmp_path):
    """--init-from a checkpoint without min_snr / lr_warmdown takes its recipe as trained (ε-MSE, constant lr, AdamW),
    not train_dit's CPU default (Min-SNR 5, a 1000-step warmdown, Muon)."""
    _old_checkpoint(tmp_path)
    argv = ["--init-from", str(tmp_path / "last.pt")]
    cfg, _ = pretrained.init_from(parse_config(train_dit.DiTConfig, argv), "dit", argv)
    assert (cfg.min_snr, cfg.lr_warmdown, cfg.t_focus, cfg.optimizer) == (0.0, 0, 0.0, "adamw")
