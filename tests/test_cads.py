"""Tests for CADS (cads.py): the schedule, the noise and rescale definitions, and the hook in every sampler."""

import math

import numpy as np
import pytest
import torch

import evaluate as ev
from cads import CADS, anneal, cads_gamma
from diffusion import cfg_model_fn


# ---- definitions ----

def test_gamma_at_the_breakpoints():
    assert [cads_gamma(t, 0.6, 0.9) for t in (0.0, 0.3, 0.6)] == [1.0, 1.0, 1.0]
    assert cads_gamma(0.75, 0.6, 0.9) == pytest.approx(0.5) and cads_gamma(0.84, 0.6, 0.9) == pytest.approx(0.2)
    assert [cads_gamma(t, 0.6, 0.9) for t in (0.9, 0.95, 1.0)] == [0.0, 0.0, 0.0]
    t = torch.tensor([0.0, 0.6, 0.7, 0.9, 1.0], dtype=torch.float64)
    torch.testing.assert_close(cads_gamma(t, 0.6, 0.9), torch.tensor([1, 1, 2 / 3, 0, 0], dtype=torch.float64))
    assert [cads_gamma(t, 0.5, 0.5) for t in (0.5, 0.51)] == [1.0, 0.0]          # tau1 = tau2: a step
    assert all(cads_gamma(t, 1.0, 1.0) == 1.0 for t in (0.0, 0.5, 1.0))        # tau1 >= 1: never annealed


def test_noised_condition_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    y, n = torch.randn(3, 64, generator=g, dtype=torch.float64), torch.randn(3, 64, generator=g, dtype=torch.float64)
    out = anneal(y, 0.25, noise_scale=0.3, psi=0.0, noise=n)                     # psi = 0: no rescale
    torch.testing.assert_close(out, 0.5 * y + 0.3 * math.sqrt(0.75) * n, rtol=0, atol=1e-15)
    drawn = anneal(torch.zeros(512, 512, dtype=torch.float64), 0.0, noise_scale=0.25, psi=0.0,
                   generator=torch.Generator().manual_seed(1))
    assert drawn.mean().abs() < 3e-3 and drawn.std().item() == pytest.approx(0.25, rel=5e-3)   # g = 0: s * n


def test_rescale_restores_mean_and_std_per_sample_and_psi_mixes():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4, 256, generator=g, dtype=torch.float64) * torch.tensor([[0.02], [0.5], [1.0], [3.0]],
                                                                             dtype=torch.float64) + 0.7
    n = torch.randn(4, 256, generator=g, dtype=torch.float64)
    noised = anneal(y, 0.3, 0.5, psi=0.0, noise=n)
    full = anneal(y, 0.3, 0.5, psi=1.0, noise=n)
    torch.testing.assert_close(full.mean(1), y.mean(1))
    torch.testing.assert_close(full.std(1), y.std(1))                             # unbiased, like torch.std
    direct = (noised - noised.mean(1, keepdim=True)) / noised.std(1, keepdim=True) * y.std(1, keepdim=True) \
        + y.mean(1, keepdim=True)
    torch.testing.assert_close(full, direct)
    torch.testing.assert_close(anneal(y, 0.3, 0.5, psi=0.25, noise=n), 0.25 * direct + 0.75 * noised)
    assert not torch.allclose(full, y)


def test_token_mask_keeps_padding_and_takes_statistics_over_real_tokens():
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    ctx[~mask] = 0                                                                 # padding is zero, as TextEncoder's
    out = anneal(ctx, 0.0, 1.0, psi=1.0, mask=mask, generator=g)
    assert torch.equal(out[~mask], ctx[~mask])
    for b in range(2):
        real_in, real_out = ctx[b][mask[b]], out[b][mask[b]]
        assert real_out.mean().item() == pytest.approx(real_in.mean().item())
        assert real_out.std().item() == pytest.approx(real_in.std().item())
        assert not torch.allclose(real_out, real_in)


def test_gamma_one_and_unmasked_rows_stay_bit_for_bit():
    y = torch.randn(4, 16)
    assert anneal(y, 1.0, 0.5) is y
    out = anneal(y, torch.tensor([1.0, 0.0, 0.5, 0.0]), 0.5, mask=torch.tensor([True, True, True, False]))
    assert torch.equal(out[0], y[0]) and torch.equal(out[3], y[3]) and not torch.equal(out[1], y[1])
    assert out.dtype == y.dtype and anneal(y.bfloat16(), 0.0, 0.5).dtype == torch.bfloat16


def test_bad_settings_raise():
    for kw in (dict(tau1=0.9, tau2=0.6), dict(noise_scale=-1.0), dict(psi=1.5), dict(tau1=float("nan"))):
        with pytest.raises(ValueError, match="CADS"):
            CADS(**kw)


# ---- the hook, in every sampler, for DiT and U-Net, class and text ----

def tiny_model(kind, overrides):
    """A random-weight model (adaLN-Zero / zero convs re-drawn so the condition matters) and its diffusion."""
    from evaluate import families
    family = families()[kind]
    cfg = family.resolve(family.config(num_classes=3, image_size=8, **overrides))
    torch.manual_seed(0)
    model, diffusion = family.build(cfg)
    model.eval().requires_grad_(False)
    for p in model.parameters():
        p.normal_(0, 0.2 / math.sqrt(max(1, p[0].numel())))
    return model, diffusion, cfg.latent_shape, cfg


MODELS = {"dit-class": ("dit", {}), "ldm-class": ("ldm", {}),
          "dit-text": ("dit", dict(cond="text", text_width=32, text_depth=1, context_length=8)),
          "ldm-text": ("ldm", dict(cond="text", text_width=32, text_depth=1, context_length=8))}


def conditions(cfg, n):
    if cfg.cond == "class":
        return torch.arange(n) % 3
    from sources.captions import encode_prompts
    return encode_prompts(cfg, [["red disc", "a blue cross at the top", "x"][i % 3] for i in range(n)])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
@pytest.mark.parametrize("name", list(MODELS))
def test_tau1_one_is_the_plain_sampler_and_sharded_equals_single(name, sampler):
    model, diffusion, shape, cfg = tiny_model(*MODELS[name])

    def run(cads, labels, seeds):
        torch.manual_seed(0)                       # ddpm's step noise still comes from the global RNG (see below)
        fn = ev.make_sample_fn(model, diffusion, shape, None, "cpu", sampler, 4, False, learn_sigma=cfg.learn_sigma,
                               cads=cads)
        return fn(labels, seeds, 3.0)

    y, seeds = conditions(cfg, 5), [7, 8, 9, 10, 11]
    plain = run(None, y, seeds)
    np.testing.assert_array_equal(run(CADS(tau1=1.0, tau2=1.0, noise_scale=0.5), y, seeds), plain)
    cads = CADS(tau1=0.0, tau2=0.5, noise_scale=1.0, psi=0.5)
    annealed = run(cads, y, seeds)
    assert not np.array_equal(annealed, plain)                                     # CADS does something
    if sampler == "ddpm":  # its step noise is drawn for the whole batch (not per image), CADS or not
        return
    sharded = np.concatenate([run(cads, y[:2], seeds[:2]), run(cads, y[2:], seeds[2:])])
    np.testing.assert_array_equal(sharded, annealed)                               # per-image seeded


@pytest.mark.parametrize("name", ["dit-class", "ldm-text"])
def test_null_branch_is_untouched_and_conditional_rows_are_annealed(name):
    model, diffusion, shape, cfg = tiny_model(*MODELS[name])
    y = conditions(cfg, 3)
    seen = []
    with CADS(tau1=0.0, tau2=0.5, noise_scale=1.0).sampling(model, model.cond, [1, 2, 3], diffusion.num_timesteps):
        hook = model.cond.register_forward_hook(lambda m, a, out: seen.append(out))   # runs after the CADS hook
        fn = cfg_model_fn(model, y, model.cond.null_like(y), 3.0, learn_sigma=cfg.learn_sigma)
        fn(torch.zeros(3, *shape), torch.full((3,), 999))
        hook.remove()
    clean = model.cond(torch.cat([y, model.cond.null_like(y)]))                   # hooks removed on exit
    first = lambda out: out[0] if isinstance(out, tuple) else out                  # noqa: E731
    assert torch.equal(first(seen[0])[3:], first(clean)[3:])                        # the null half: clean
    assert not torch.allclose(first(seen[0])[:3], first(clean)[:3])                 # the conditional half: annealed


def test_evaluate_cli_records_cads_and_rejects_bad_values(tmp_path, capsys):
    assert ev.main([str(tmp_path / "none.pt"), "--cads-noise", "0.1", "--cads-tau1", "0.9", "--cads-tau2", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate.py: error: --cads-*") and "tau1 <= tau2" in err and len(err.splitlines()) == 1
    args = ev_args(["--cads-noise", "0.1"])
    assert ev.cads_settings(args) == {"cads_noise": 0.1, "cads_tau1": 0.6, "cads_tau2": 0.9, "cads_psi": 1.0}
    assert repr(ev.cads_from_args(args)) == "CADS(tau1=0.6, tau2=0.9, noise_scale=0.1, psi=1)"
    assert ev.cads_from_args(ev_args([])) is None                                  # off by default


def ev_args(argv):
    import argparse
    p = argparse.ArgumentParser()
    ev._add_cads_args(p)
    return p.parse_args(argv)


def test_training_grids_take_sample_cads(tmp_path, capsys):
    import train_dit
    base = ["--image-size", "8", "--batch-size", "4", "--steps", "2", "--sample-every", "2", "--builtin-length", "16",
            "--sample-per-class", "1", "--sample-steps", "3", "--log-every", "1"]
    assert train_dit.main(base + ["--sample-cads", "0.1,0.6,0.9,1", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "samples" / "step_0000002.png").is_file()
    capsys.readouterr()
    assert train_dit.main(base + ["--sample-cads", "0.1,0.9,0.6,1", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_dit.py: error: --sample-cads") and "tau1 <= tau2" in err[0]
    assert not (tmp_path / "b").exists()
