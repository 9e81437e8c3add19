"""tools/denoise_probe.py: the x̂0 error it reports is the error of x̂0, at the noise level asked for."""
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


def test_cli_on_a_checkpoint_and_its_bad_input(tmp_path, capsys):
    import train_dit
    run = tmp_path / "run"
    assert train_dit.main(["--image-size", "8", "--batch-size", "8", "--steps", "3", "--sample-every", "0",
                           "--builtin-length", "32", "--out", str(run)]) == 0
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
