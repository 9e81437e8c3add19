"""tools/denoise_probe.py: the x̂0 error it reports is the error of x̂0, at the noise level asked for."""
import types

import numpy as np
import pytest
import torch

import diffusion as D
from tools import denoise_probe as probe


def linear_diffusion():
    return D.GaussianDiffusion(D.make_beta_schedule("linear", 1000))


def test_a_model_that_predicts_no_noise_scores_sigma_over_alpha():
    """ε̂ = 0 leaves x̂0 = x_t / α, whose error is σ/α · ε: the probe must report σ/α · rms(ε) ≈ σ/α."""
    diffusion = linear_diffusion()
    abar = diffusion.alphas_cumprod
    x0, labels = probe.probe_items(16, "cross", 64)
    zero = lambda x, t, y: torch.zeros_like(x)
    errors = probe.x0_errors(zero, diffusion, x0, labels, log_snrs=(2.0, 0.0, -2.0))
    abar64 = abar.double()
    for lam, err in zip((2.0, 0.0, -2.0), errors):
        t = int(((abar64 / (1 - abar64)).log() - lam).abs().argmin())
        expected = float(((1 - abar64[t]) / abar64[t]).sqrt())           # rms(ε) = 1 up to 64·768 draws
        assert err == pytest.approx(expected, rel=0.01)
        assert abs(float((abar64[t] / (1 - abar64[t])).log()) - lam) < 0.05  # the level asked for, on this schedule


def test_an_oracle_denoiser_scores_zero_and_a_blurring_one_does_not():
    diffusion = linear_diffusion()
    abar = diffusion.alphas_cumprod
    x0, labels = probe.probe_items(16, "disc", 32)

    def oracle(xt, t, y):                       # knows the clean images: returns the exact noise
        a, s = abar[t[0]].sqrt(), (1 - abar[t[0]]).sqrt()
        return (xt - a * x0) / s

    def blurred(xt, t, y):                      # the oracle's x̂0 blurred by a 3x3 box: loses the edges
        a, s = abar[t[0]].sqrt(), (1 - abar[t[0]]).sqrt()
        x0_blur = torch.nn.functional.avg_pool2d(x0, 3, 1, 1, count_include_pad=False)
        return (xt - a * x0_blur) / s

    assert max(probe.x0_errors(oracle, diffusion, x0, labels)) < 1e-4
    errors = probe.x0_errors(blurred, diffusion, x0, labels)
    assert min(errors) > 0.02 and np.allclose(errors, errors[0], rtol=1e-3)   # the blur's own error, at every level


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny built-in run folder (3 steps at 8 px) the CLI tests read."""
    import train_dit
    run = tmp_path_factory.mktemp("probe") / "run"
    assert train_dit.main(["--image-size", "8", "--batch-size", "8", "--steps", "3", "--sample-every", "0",
                           "--builtin-length", "32", "--out", str(run)]) == 0
    return run


def test_cli_on_a_checkpoint_and_its_bad_input(run, tmp_path, capsys):
    capsys.readouterr()
    assert probe.main([str(run / "last.pt"), "--num", "10", "--log-snr", "2,-2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert [r[1] for r in rows] == ["disc", "cross"] and all(len(r) == 4 for r in rows)
    for argv, needle in ([[str(tmp_path / "nope.pt")], "not found"], [[str(run / "last.pt"), "--log-snr", "x"], "--log-snr"],
                         [[str(run / "last.pt"), "--num", "0"], "--num"],
                         [[str(run / "last.pt"), "--log-snr", "nan"], "outside"], [[str(run / "last.pt"), "--log-snr", "20"], "outside"]):
        with pytest.raises(SystemExit) as e:
            probe.main(argv)
        err = capsys.readouterr()
        assert e.value.code == 2 and len(err.err.strip().splitlines()) == 1 and needle in err.err and not err.out


class Oracle(torch.nn.Module):
    """Knows the clean items: returns the exact noise of x_t (any batch that repeats them, as CFG's does)."""

    def __init__(self, x0, abar, exact=True):
        super().__init__()
        self.x0, self.abar, self.exact = x0, abar, exact
        self.cond = types.SimpleNamespace(null_like=lambda y: torch.full_like(y, 10))

    def forward(self, x, t, y):
        if not self.exact:                       # predicts no noise: x̂0 = x_t / α, the noise kept in the image
            return torch.zeros_like(x)
        a = self.abar[t].sqrt().float().view(-1, 1, 1, 1)
        s = (1 - self.abar[t]).sqrt().float().view(-1, 1, 1, 1)
        return (x - a * self.x0.repeat(len(x) // len(self.x0), 1, 1, 1)) / s


def test_restore_scores_the_real_items_for_an_oracle_and_less_for_a_model_that_keeps_the_noise():
    """An exact denoiser brings noised real crosses back from any t0 to themselves: their own shape IoU; a model that
    predicts no noise leaves it in the image and scores lower the noisier the start."""
    from scoring.shapes import shape_iou
    diffusion = linear_diffusion()
    x0, labels = probe.probe_items(16, "cross", 24)
    real = shape_iou(((x0 + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), labels.numpy())["cross"]
    exact = probe.restored_iou(Oracle(x0, diffusion.alphas_cumprod), diffusion, x0, labels, [999, 300, 20], steps=10)
    assert np.allclose(exact, real, atol=1e-6), (exact, real)
    lazy = probe.restored_iou(Oracle(x0, diffusion.alphas_cumprod, exact=False), diffusion, x0, labels, [999, 300],
                              steps=10)
    assert lazy[0] < lazy[1] < real - 0.05, (lazy, real)


def test_cli_restore_rows_and_bad_start_steps(run, capsys):
    capsys.readouterr()
    assert probe.main([str(run / "last.pt"), "--num", "10", "--restore", "999,100"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("shape IoU restored from t0") and [r.split()[1] for r in out[1:]] == ["disc", "cross"]
    assert all(0 <= float(v) <= 1 for r in out[1:] for v in r.split()[2:]) and all(len(r.split()) == 4 for r in out[1:])
    for bad in ("0,100", "1000", "x"):
        with pytest.raises(SystemExit) as e:
            probe.main([str(run / "last.pt"), "--restore", bad])
        err = capsys.readouterr()
        assert e.value.code == 2 and len(err.err.strip().splitlines()) == 1 and "--restore" in err.err and not err.out
