"""A training run's guards and flags: no null class, --out as a file, no flag abbreviations, per-step random corruption,
1 process = 2 processes with a latent cache and CEP, resume guards, and the paper's ablation flags."""
import hashlib
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import conditions
from models import encoders
import config
import data
import train_dit
import train_ldm
import trainer
from conftest import ROOT, load_ckpt as ckpt, one_error_line

TINY = ["--image-size", "8", "--batch-size", "8", "--log-every", "1", "--ckpt-every", "2", "--sample-every", "0",
        "--builtin-length", "64", "--num-workers", "0", "--lr-warmdown", "0", "--min-snr", "0"]


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---- --class-dropout 0 (no null class) ----

def test_class_dropout_0_trains_unguided_grid_and_evaluate_refuses_cfg(tmp_path, capsys):
    out = tmp_path / "run"
    rc = train_dit.main(TINY + ["--steps", "2", "--sample-every", "2", "--sample-steps", "2", "--sample-per-class", "1",
                                "--class-dropout", "0", "--out", str(out)])
    assert rc == 0 and (out / "samples" / "step_0000002.png").is_file()
    assert "unguided" in capsys.readouterr().out
    assert ckpt(out)["model"]["y_embedder.embedding_table.weight"].shape[0] == 10      # no null row
    import evaluate
    grid = tmp_path / "g.png"
    base = [str(out / "last.pt"), "--grid", str(grid), "--classes", "0,1", "--per-class", "1", "--steps", "2"]
    assert evaluate.main(base + ["--cfg-scales", "4"]) == 2
    assert "--class-dropout 0" in one_error_line(capsys, "evaluate.py") and not grid.exists()
    assert evaluate.main(base + ["--cfg-scales", "1"]) == 0 and grid.is_file()


# ---- --out naming a file, abbreviated flags ----

def test_out_naming_a_file_is_one_line_exit_2(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    assert train_dit.main(TINY + ["--steps", "1", "--out", str(f)]) == 2
    assert "is a file" in one_error_line(capsys) and f.read_text() == "keep me"
    assert train_ldm.main(["--steps", "1", "--out", str(f)]) == 2
    assert "is a file" in one_error_line(capsys, "train_ldm.py")


def test_abbreviated_flags_are_refused_and_explicit_flags_beat_the_preset(capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_config(train_dit.DiTConfig, ["--preset", "dit-xl2-in1k", "--ema", "0.999"], train_dit.PRESETS)
    assert e.value.code == 2 and "--ema" in capsys.readouterr().err
    cfg = config.parse_config(train_dit.DiTConfig, ["--preset", "dit-xl2-in1k", "--ema-decay", "0.999"],
                               train_dit.PRESETS)
    assert cfg.ema_decay == 0.999 and cfg.model == "DiT-XL/2"


# ---- --corrupt-mode random ----

def test_random_corruption_is_exact_per_global_batch_and_follows_the_static_rule():
    ds = types.SimpleNamespace(labels=np.arange(200) % 4, num_classes=4)
    ds.labels[:20] = 0                                                  # a skewed prior
    for kind, classes in (("symmetric", ""), ("asymmetric", "1,3")):
        cfg = types.SimpleNamespace(batch_size=40, seed=1, steps=10, corrupt=0.1, corrupt_type=kind,
                                    corrupt_classes=classes)
        items = data.batch_items(len(ds.labels), cfg.batch_size, cfg.seed, 0, cfg.steps)
        labels = data.random_corruption(ds, cfg.corrupt, cfg.corrupt_type, cfg.corrupt_classes, items)
        flipped = 0
        for step in range(10):
            clean, new = ds.labels[items(step)], labels(step, 1000 + step).numpy()
            assert (new != clean).sum() == 4                            # exactly round(0.1 * 40) of the global batch
            if kind == "asymmetric":
                assert set(clean[new != clean]) <= {1, 3} and set(new[new != clean]) <= {1, 3}
            flipped += (new != clean).sum()
            assert torch.equal(labels(step, 1000 + step), labels(step, 1000 + step))
        assert flipped == 40
    a = trainer.step_draws(3, 5, 8, (3, 2, 2), 1000, 0.1, torch.device("cpu"), corrupt=True)
    b = trainer.step_draws(3, 5, 8, (3, 2, 2), 1000, 0.1, torch.device("cpu"))
    assert torch.equal(a.noise, b.noise) and a.corrupt_seed is not None and b.corrupt_seed is None


# ---- 1 process = 2 processes with a latent cache, random corruption and CEP on a subset ----

def small_kl_cache(tmp_path):
    import data
    from weights import latents
    from weights import vae
    from safetensors.torch import save_file
    torch.manual_seed(0)
    f8 = vae.build_vae("kl-f8", block_out_channels=(32, 32, 32, 32), layers_per_block=1)
    weights = tmp_path / "kl-f8-small.safetensors"
    save_file({k: v.contiguous() for k, v in f8.state_dict().items()}, str(weights))
    cache = str(tmp_path / "cache")
    latents.build_cache(data.BuiltinShapes(size=32, length=24), vae.load_vae("kl-f8", str(weights)), cache,
                        batch_size=8, progress=False)
    return cache, str(weights)


@pytest.mark.parametrize("source", ["cache", "autoencoder"])
def test_ddp_two_processes_equal_one_with_latent_cache_random_corruption_and_cep(tmp_path, source):
    """From a latent cache, or through the KL autoencoder on the fly: each rank's posterior noise is its rows of the
    step's draw, so 2 processes train as 1."""
    cache, weights = small_kl_cache(tmp_path)
    data_args = ["--latents", cache] if source == "cache" else ["--builtin-length", "24"]
    args = [*data_args, "--vae", "kl-f8", "--vae-path", weights, "--image-size", "32", "--batch-size", "8",
            "--steps", "2", "--log-every", "1", "--sample-every", "0", "--num-workers", "0", "--seed", "3",
            "--corrupt-mode", "random", "--corrupt", "0.25", "--cep", "uniform", "--cep-gamma", "4",
            "--cep-subset", "0.5"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_dit.py"), *args, "--out", str(tmp_path / "ddp")]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert train_dit.main(args + ["--out", str(tmp_path / "one")]) == 0
    one, ddp = ckpt(tmp_path / "one"), ckpt(tmp_path / "ddp")
    for k, v in one["model"].items():
        # Adam divides by sqrt(v): where a gradient is ~0 (cancelled in the all-reduced sum), a last-bit difference
        # moves a weight by a little (seen: 1.5e-6 on one of 768 biases; 1.7e-5, 0.4 % of a step, on one of the 9216
        # weights of the zero-initialised pixel_head.conv2); a real divergence moves most weights by a step, lr = 4e-3
        diff = (v - ddp["model"][k]).abs()
        assert diff.max() < 1e-2 * 4e-3 and (diff > 1e-5).float().mean() < 1e-3, (k, diff.max())


@pytest.mark.parametrize("source", ["cache", "autoencoder"])
def test_latent_runs_resume_bit_identically_with_fixed_cep_noise(tmp_path, source):
    """N steps = N/2 + stop + N/2 on KL latents, from a latent cache or through the autoencoder on the fly (the
    posterior sample a (seed, step) draw either way), with --cep-fixed-delta's per-item δ and random corruption."""
    cache, weights = small_kl_cache(tmp_path)
    data_args = ["--latents", cache] if source == "cache" else ["--builtin-length", "24"]
    args = [*data_args, "--vae", "kl-f8", "--vae-path", weights, "--image-size", "32", "--batch-size", "8",
            "--log-every", "1", "--sample-every", "0", "--num-workers", "0", "--seed", "3", "--cep", "uniform",
            "--cep-fixed-delta", "--corrupt-mode", "random", "--corrupt", "0.25", "--lr-warmdown", "0"]
    assert train_dit.main(args + ["--steps", "4", "--out", str(tmp_path / "straight")]) == 0
    assert train_dit.main(args + ["--steps", "2", "--out", str(tmp_path / "split")]) == 0
    torch.manual_seed(123)                                              # a resumed process's RNG starts elsewhere
    assert train_dit.main(args + ["--steps", "4", "--out", str(tmp_path / "split"), "--resume", "auto"]) == 0
    a, b = ckpt(tmp_path / "straight"), ckpt(tmp_path / "split")
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_an_on_the_fly_autoencoders_posterior_is_the_steps_draw_so_ranks_agree():
    """--vae kl-f8 without a cache: each rank's latents are mean + std * its rows of the step's posterior noise, not a
    draw of the per-rank global RNG, so two ranks' halves are one process's batch (as with a latent cache)."""
    from weights import vae
    torch.manual_seed(0)
    ae = vae.build_vae("kl-f8", block_out_channels=(32, 32), layers_per_block=1).eval()
    encode = trainer.posterior_sampler(ae)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    draws = trainer.step_draws(0, 5, 4, (4, 8, 8), 1000, 0.1, torch.device("cpu"), posterior=True)
    with torch.no_grad():
        torch.manual_seed(1)                                              # rank 0's global RNG
        first = encode(x[:2], draws.share(slice(0, 2)).posterior)
        torch.manual_seed(2)                                              # rank 1's
        second = encode(x[2:], draws.share(slice(2, 4)).posterior)
        whole = encode(x, draws.posterior)
        mean, std = ae.encode_moments(x)
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole, mean + std * draws.posterior)
    assert (std > 0).all() and not torch.allclose(whole, mean)            # a sample, not the mean
    vq = vae.build_vae("vq-f4", block_out_channels=(32, 32), layers_per_block=1).eval()
    with torch.no_grad():                                                 # VQ: no posterior noise is drawn
        torch.testing.assert_close(trainer.posterior_sampler(vq)(x), vq.encode(x), rtol=0, atol=0)


def test_posterior_and_cep_draws_come_from_the_step_generator():
    dev = torch.device("cpu")
    a = trainer.step_draws(0, 7, 4, (4, 2, 2), 1000, 0.1, dev, posterior=True, cep="gaussian", cep_shape=(6,))
    b = trainer.step_draws(0, 7, 4, (4, 2, 2), 1000, 0.1, dev, posterior=True, cep="gaussian", cep_shape=(6,))
    assert torch.equal(a.posterior, b.posterior) and torch.equal(a.cep_unit, b.cep_unit)
    assert a.posterior.shape == (4, 4, 2, 2) and a.cep_unit.shape == (4, 6)
    assert not torch.equal(a.posterior, a.noise)
    enc = conditions.ClassEmbedder(3, 6, cep="gaussian", cep_gamma=1.0).train()
    y = torch.tensor([0, 1, 2, 0])
    want = enc.embedding_table(y) + a.cep_unit / 6 ** 0.5
    torch.testing.assert_close(enc(y, cep_unit=a.cep_unit), want)      # the handed-in draw, not the global RNG


# ---- resume refuses a changed experiment ----

def test_resume_refuses_changed_experiment_and_override_is_logged(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_dit.main(TINY + ["--steps", "2", "--corrupt", "0.1", "--out", str(out)]) == 0
    manifest = sha(out / "corruption.json")
    assert train_dit.main(TINY + ["--steps", "4", "--corrupt", "0.2", "--resume", "auto", "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "--corrupt 0.1" in line and "0.2" in line and sha(out / "corruption.json") == manifest
    for flag, value in (("--seed", "1"), ("--batch-size", "16"), ("--cep", "uniform"), ("--class-dropout", "0.2"),
                        ("--cond-dropout", "0.1"), ("--label-smoothing", "0.1")):
        assert train_dit.main(TINY + ["--steps", "4", "--corrupt", "0.1", flag, value, "--resume", "auto",
                                      "--out", str(out)]) == 2
        assert flag in one_error_line(capsys)
    assert train_dit.main(TINY + ["--steps", "4", "--corrupt", "0.1", "--resume-override", "nonsense",
                                  "--resume", "auto", "--out", str(out)]) == 2
    assert "nonsense" in one_error_line(capsys)
    assert train_dit.main(TINY + ["--steps", "4", "--corrupt", "0.1", "--seed", "1", "--resume-override", "seed",
                                  "--resume", "auto", "--out", str(out)]) == 0
    events = [json.loads(ln) for ln in open(out / "log.jsonl")]
    override = [r for r in events if r.get("event") == "resume_override"]
    assert override and override[0]["changes"] == [{"field": "seed", "checkpoint": 0, "now": 1}]


# ---- the paper's ablations: --cond-dropout, --label-smoothing, --cep-subset ----

def test_label_smoothing_embeds_the_smoothed_one_hot_in_training_only():
    torch.manual_seed(0)
    enc = conditions.ClassEmbedder(5, 8, label_smoothing=0.1).train()
    y = torch.tensor([0, 3, 4, 5])                                       # 5 is the null class
    W = enc.embedding_table.weight.detach()
    onehot = torch.nn.functional.one_hot(y[:3], 5).float()               # the K class columns only
    want = (0.9 * onehot + 0.1 / 5) @ W[:5]                              # the smoothed one-hot times the class rows
    got = enc(y).detach()
    torch.testing.assert_close(got[:3], want)
    assert torch.equal(got[3], W[5])                                     # the null row is not smoothed
    torch.testing.assert_close(enc.eval()(y).detach()[:3], want)         # sampling: the embedding it trained on
    enc.raw_at_sampling = True                                           # evaluate.py --raw-class-embedding
    assert torch.equal(enc.eval()(y).detach(), W[y])
    with pytest.raises(ValueError, match="class"):
        encoders.build_condition_encoder("text", 16, label_smoothing=0.1)


def test_cond_dropout_drops_real_embeddings_only_while_training():
    torch.manual_seed(0)
    enc = conditions.ClassEmbedder(4, 4096, cond_dropout=0.25).train()
    y = torch.tensor([0, 1, 4])                                          # 4 is the null class
    W = enc.embedding_table.weight.detach()
    got = enc(y).detach()
    zero = got[:2] == 0
    assert abs(zero.float().mean().item() - 0.25) < 0.02               # P(drop) = 0.25
    torch.testing.assert_close(got[:2][~zero], (W[:2] / 0.75)[~zero])  # kept entries scaled by 1 / (1 - p)
    assert torch.equal(got[2], W[4])                                     # never the CFG null embedding
    assert torch.equal(enc.eval()(y).detach(), W[y])
    text = encoders.build_condition_encoder("text", 64, context_length=8, cond_dropout=0.5).train()
    ids = text.tokenize(["a red disc", ""])
    ctx, mask = text(ids)
    ref, _ = text.eval()(ids)
    assert (ctx[0][mask[0]] == 0).float().mean() > 0.3 and torch.equal(ctx[1], ref[1])


def test_cep_subset_is_a_fixed_seeded_fraction_and_masks_cep():
    m = data.cep_subset_mask(1000, 0.3, seed=2)
    assert m.sum() == 300 and torch.equal(m, data.cep_subset_mask(1000, 0.3, seed=2))
    assert not torch.equal(m, data.cep_subset_mask(1000, 0.3, seed=3))
    enc = conditions.ClassEmbedder(3, 16, cep="uniform").train()
    y = torch.tensor([0, 1, 2, 0])
    keep = torch.tensor([True, False, True, False])
    out = enc(y, cep_mask=keep).detach()
    clean = enc.embedding_table(y).detach()
    assert torch.equal(out[~keep], clean[~keep]) and not torch.equal(out[keep], clean[keep])


@pytest.mark.parametrize("script", [train_dit, train_ldm])
def test_ablations_resume_bit_identical_and_are_recorded(tmp_path, script, capsys):
    extra = ["--cond-dropout", "0.1", "--label-smoothing", "0.1", "--cep", "uniform", "--cep-subset", "0.5",
             "--corrupt-mode", "random", "--corrupt", "0.25", "--steps"]
    assert script.main(TINY + ["--out", str(tmp_path / "straight"), *extra, "4"]) == 0
    assert script.main(TINY + ["--out", str(tmp_path / "split"), *extra, "2"]) == 0
    assert script.main(TINY + ["--out", str(tmp_path / "split"), *extra, "4", "--resume", "auto"]) == 0
    a, b = ckpt(tmp_path / "straight"), ckpt(tmp_path / "split")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    config = json.load(open(tmp_path / "straight" / "config.json"))
    for saved in (config, a["config"]):
        assert (saved["cond_dropout"], saved["label_smoothing"], saved["cep_subset"]) == (0.1, 0.1, 0.5)
    # the subset changes training (a no-op flag would give the all-items weights)
    assert script.main(TINY + ["--out", str(tmp_path / "all"), *extra[:6], "--corrupt-mode", "random",
                               "--corrupt", "0.25", "--steps", "4"]) == 0
    full = ckpt(tmp_path / "all")
    assert any(not torch.equal(a["model"][k], full["model"][k]) for k in a["model"])
    assert script.main(TINY + ["--out", str(tmp_path / "bad"), "--cep-subset", "0.5", "--steps", "1"]) == 2
    assert "--cep" in one_error_line(capsys, os.path.basename(script.__file__))


# ---- random corruption at its true rate; the trainer applies it; "Fixed CEP" as fixed noise ----

@pytest.mark.parametrize("eta", [0.01, 0.05, 0.075, 0.2])
def test_random_corruption_flips_eta_in_expectation_at_batch_32(eta):
    """Over many global batches of 32, the share of flipped labels converges to eta itself (not round(eta*32)/32)."""
    from corrupt import corrupt_batch
    counts, labels, n = np.array([30, 25, 25, 20]), np.arange(32) % 4, 20_000
    flips = sum(int((corrupt_batch(labels, eta, counts, rng=seed)[0] != labels).sum()) for seed in range(n))
    k = eta * 32
    sd = np.sqrt((k % 1) * (1 - k % 1) / n)                             # the count is floor(k) + Bernoulli(frac(k))
    assert abs(flips / n - k) <= 5 * sd + 1e-12, (flips / n, k)


def record_condition_inputs(monkeypatch) -> list:
    """Patch the class embedder to record (y, cep_unit) of every training forward."""
    seen, forward = [], conditions.ClassEmbedder.forward

    def spy(self, y, cep_mask=None, cep_unit=None):
        if self.training:
            seen.append((y.clone(), None if cep_unit is None else cep_unit.clone()))
        return forward(self, y, cep_mask, cep_unit)
    monkeypatch.setattr(conditions.ClassEmbedder, "forward", spy)
    return seen


def test_the_trainer_trains_on_the_randomly_corrupted_labels(tmp_path, monkeypatch):
    """With --corrupt-mode random at 0.5, about half of the labels the model sees differ from the items' clean labels
    (and none do without it): fails if the trainer skips the per-step corruption."""
    seen = record_condition_inputs(monkeypatch)
    args = TINY + ["--steps", "6", "--class-dropout", "0", "--seed", "4", "--out", str(tmp_path / "r")]
    assert train_dit.main(args + ["--corrupt-mode", "random", "--corrupt", "0.5"]) == 0
    clean = data.BuiltinShapes(size=8, length=64, seed=4).labels
    items = data.batch_items(64, 8, 4, 0, 6)
    changed = np.mean([(y.numpy() != clean[items(step)]).mean() for step, (y, _) in enumerate(seen)])
    assert len(seen) == 6 and 0.3 < changed < 0.7, changed
    seen.clear()
    assert train_dit.main(TINY + ["--steps", "2", "--class-dropout", "0", "--seed", "4", "--out", str(tmp_path / "c")]) == 0
    assert all(np.array_equal(y.numpy(), clean[items(step)]) for step, (y, _) in enumerate(seen))


@pytest.mark.parametrize("fixed", [False, True])
def test_cep_fixed_delta_keeps_each_items_noise_for_the_whole_run(tmp_path, monkeypatch, fixed):
    """--cep-fixed-delta: an item meets the same CEP unit noise at every step; without it, fresh noise each time."""
    seen = record_condition_inputs(monkeypatch)
    args = TINY + ["--steps", "4", "--class-dropout", "0", "--builtin-length", "8", "--cep", "gaussian",
                   "--out", str(tmp_path / "f")] + (["--cep-fixed-delta"] if fixed else [])
    assert train_dit.main(args) == 0
    items = data.batch_items(8, 8, 0, 0, 4)
    by_item = {}
    for step, (_, unit) in enumerate(seen):
        for i, row in zip(items(step), unit):
            by_item.setdefault(int(i), []).append(row)
    same = [all(torch.equal(r, rows[0]) for r in rows) for rows in by_item.values()]
    assert len(by_item) == 8 and all(len(rows) == 4 for rows in by_item.values())
    assert all(same) if fixed else not any(same)
    if fixed:                                                            # a function of (seed, item) alone
        want = trainer.item_cep_noise([3], 0, "gaussian", tuple(seen[0][1].shape[1:]), torch.device("cpu"))[0]
        assert torch.equal(by_item[3][0], want)
