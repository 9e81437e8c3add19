"""--t-focus: a fraction of each batch trains on the steps where the built-in shapes form (the CPU default's crosses).

What is estimated: the share of timesteps in the band is fraction + (1 - fraction) * band / T in expectation, uniform
inside and outside the band; the band is exactly the steps whose log-SNR lies between its two ends; turning it on moves
no other draw of the step; the trainer trains on those timesteps; checkpoints from before the flag read as uniform."""
import numpy as np
import pytest
import torch

import diffusion as D
import train_dit
import trainer
from conftest import TINY, load_ckpt, one_error_line

CPU = torch.device("cpu")


def test_the_band_is_the_steps_whose_log_snr_lies_between_its_ends():
    """The band is one run of steps start <= t < stop, inside [lo, hi] and with both neighbours outside."""
    for name in ("linear", "scaled_linear"):
        lam = D.schedule_log_snr(name)
        assert bool((lam[1:] < lam[:-1]).all())                             # falls with t: the band is one run
        for lo, hi in ((-2.0, 3.5), (0.0, 1.0), (-20.0, 0.0)):
            start, stop = D.focus_band(lam, lo, hi)
            assert 0 <= start < stop <= 1000 and bool(((lam[start:stop] >= lo) & (lam[start:stop] <= hi)).all())
            assert (start == 0 or lam[start - 1] > hi) and (stop == 1000 or lam[stop] < lo)
    assert D.focus_band(D.schedule_log_snr("linear"), -2.0, 3.5) == (50, 456)     # the CPU default's: t = 50..455
    assert D.focus_band(D.schedule_log_snr("linear"), 4.0, 3.5) == (0, 0)          # empty


def test_focus_draws_the_band_at_its_rate_in_expectation():
    """Over 400 global batches of 32 at fraction 0.5, band 50..455: P(50 <= t < 456) = 0.5 + 0.5 * 406 / 1000, and
    the timesteps are uniform inside the band (mean 252.5) and outside it (mean (50 * 24.5 + 544 * 727.5) / 594), each
    within 5 standard errors."""
    t = torch.cat([trainer.step_draws(0, step, 32, (3, 2, 2), 1000, 0.1, CPU, focus=(0.5, 50, 456)).t
                   for step in range(400)]).double()
    n, p = len(t), 0.5 + 0.5 * 406 / 1000
    inside, outside = (t >= 50) & (t < 456), (t < 50) | (t >= 456)
    assert abs(float(inside.double().mean()) - p) < 5 * np.sqrt(p * (1 - p) / n)
    rest = np.r_[0:50, 456:1000]                                         # the steps outside the band
    for part, values in ((t[inside], np.arange(50, 456)), (t[outside], rest)):
        sd = values.std() / np.sqrt(len(part))                           # uniform over `values`: its sd / sqrt(n)
        assert abs(float(part.mean()) - values.mean()) < 5 * sd, (float(part.mean()), values.mean())
    plain = torch.cat([trainer.step_draws(0, step, 32, (3, 2, 2), 1000, 0.1, CPU).t for step in range(400)])
    share = float(((plain >= 50) & (plain < 456)).double().mean())
    assert abs(share - 0.406) < 5 * np.sqrt(0.406 * 0.594 / n)           # off: uniform


def test_focus_moves_the_timesteps_only_and_nothing_moves_them():
    """With focus on, the noise, CFG mask, input-perturbation, posterior and CEP noise of a step are the ones drawn
    without it, and turning those optional draws on or off leaves the focused timesteps where they are (the focus has
    a generator of its own); fraction 0 is the plain draw exactly."""
    focus = (0.5, 20, 100)
    bare = trainer.step_draws(5, 9, 16, (3, 4, 4), 1000, 0.5, CPU, focus=focus).t
    full = trainer.step_draws(5, 9, 16, (3, 4, 4), 1000, 0.5, CPU, focus=focus, ip=True, posterior=True,
                              cep="uniform", cep_shape=(6,)).t
    assert torch.equal(bare, full)
    kw = dict(cep="gaussian", cep_shape=(6,), posterior=True, ip=True)
    plain = trainer.step_draws(5, 9, 16, (3, 4, 4), 1000, 0.5, CPU, **kw)
    focused = trainer.step_draws(5, 9, 16, (3, 4, 4), 1000, 0.5, CPU, focus=(1.0, 20, 100), **kw)
    for name in ("noise", "drop", "ip_noise", "posterior", "cep_unit"):
        assert torch.equal(getattr(plain, name), getattr(focused, name)), name
    assert bool(((focused.t >= 20) & (focused.t < 100)).all()) and not torch.equal(plain.t, focused.t)
    assert torch.equal(trainer.step_draws(5, 9, 16, (3, 4, 4), 1000, 0.5, CPU, focus=(0.0, 20, 100), **kw).t, plain.t)


def record_timesteps(monkeypatch) -> list:
    """Patch the diffusion loss to record the timesteps of every training batch."""
    seen, losses = [], D.GaussianDiffusion.training_losses

    def spy(self, model_fn, x0, t=None, noise=None, ip_noise=None):
        seen.append(t.clone())
        return losses(self, model_fn, x0, t, noise, ip_noise)
    monkeypatch.setattr(D.GaussianDiffusion, "training_losses", spy)
    return seen


def test_the_trainer_trains_on_the_focused_timesteps(tmp_path, monkeypatch):
    """--t-focus 1 with the band log-SNR 0..1: every trained timestep lies in it; --t-focus 0: 32 uniform timesteps,
    all in that band of 87 steps with probability 0.087^32. Fails if the trainer ignores the flag."""
    start, stop = D.focus_band(D.schedule_log_snr("linear"), 0.0, 1.0)
    seen = record_timesteps(monkeypatch)
    band = ["--t-focus-min-log-snr", "0", "--t-focus-max-log-snr", "1"]
    assert train_dit.main(TINY + ["--steps", "4", "--out", str(tmp_path / "f"), "--t-focus", "1"] + band) == 0
    t = torch.cat(seen)
    assert len(seen) == 4 and bool(((t >= start) & (t < stop)).all())
    seen.clear()
    assert train_dit.main(TINY + ["--steps", "4", "--out", str(tmp_path / "u"), "--t-focus", "0"] + band) == 0
    t = torch.cat(seen)
    assert bool(((t < start) | (t >= stop)).any())


@pytest.mark.parametrize("flags, names", [(["--t-focus", "1.5"], "--t-focus"),
                                          (["--t-focus-min-log-snr", "12", "--t-focus-max-log-snr", "13"],
                                           "--t-focus-min-log-snr 12 .. --t-focus-max-log-snr 13 holds no step"),
                                          (["--t-focus", "0", "--t-focus-min-log-snr", "nan"],
                                           "--t-focus-min-log-snr nan must be <="),
                                          (["--t-focus-min-log-snr", "3", "--t-focus-max-log-snr", "1"],
                                           "--t-focus-min-log-snr 3 must be <= --t-focus-max-log-snr 1")])
def test_bad_focus_flags_are_one_line(tmp_path, capsys, flags, names):
    """Out-of-range flags: one line naming the flag, exit 2, no run folder."""
    out = tmp_path / "bad"
    assert train_dit.main(TINY + ["--steps", "1", "--out", str(out)] + flags) == 2
    assert names in one_error_line(capsys) and not out.exists()


def test_a_checkpoint_from_before_the_flag_resumes_and_fine_tunes_as_uniform(tmp_path, capsys):
    """A checkpoint whose config has none of the focus fields was trained with uniform timesteps: --init-from takes
    that recipe (t_focus 0), the command that started it resumes it with uniform timesteps (not the CPU default's
    0.5), an explicit --t-focus 0.5 is refused naming the stored 0, and with --t-focus 0 it resumes."""
    run = tmp_path / "old"
    assert train_dit.main(TINY + ["--steps", "2", "--out", str(run), "--t-focus", "0"]) == 0
    ckpt = load_ckpt(run)
    for name in ("t_focus", "t_focus_min_log_snr", "t_focus_max_log_snr"):
        del ckpt["config"][name]
    torch.save(ckpt, run / "last.pt")
    assert train_dit.main(TINY + ["--steps", "1", "--out", str(tmp_path / "ft"), "--init-from", str(run / "last.pt")]) == 0
    assert load_ckpt(tmp_path / "ft")["config"]["t_focus"] == 0
    capsys.readouterr()
    assert train_dit.main(TINY + ["--steps", "3", "--out", str(run), "--resume", "auto"]) == 0
    assert load_ckpt(run)["config"]["t_focus"] == 0 and load_ckpt(run)["step"] == 3
    capsys.readouterr()
    assert train_dit.main(TINY + ["--steps", "4", "--out", str(run), "--resume", "auto", "--t-focus", "0.5"]) == 2
    assert "--t-focus 0.0" in one_error_line(capsys)
    assert train_dit.main(TINY + ["--steps", "4", "--out", str(run), "--resume", "auto", "--t-focus", "0"]) == 0
    assert load_ckpt(run)["step"] == 4
