"""train_dit.py + trainer.py end to end on tiny configs: learning, exact resume, DDP equality, signals, bad input."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import diffusion
from models.encoders import encoder_from_config
import train_dit
from models import dit
from conftest import ROOT, TINY, builtin_item_one_by_one, run_tiny, check_resume_is_bit_identical, \
    expect_one_line_error, train_and_check_learning
from conftest import load_ckpt as ckpt, read_log as records, subprocess_env as env
from sources.captions import TokenizedCaptions



def test_default_trains_loss_falls_and_writes_grid(tmp_path):
    man = train_and_check_learning(train_dit.main, tmp_path, 40, "--batch-size", "16", "--sample-steps", "4",
                                   "--sample-per-class", "2", "--cep", "uniform")
    assert man["num_corrupted"] == round(0.05 * 256) and man["kind"] == "symmetric"
    c = ckpt(tmp_path)
    assert c["step"] == 40 and c["kind"] == "dit" and c["config"]["cep"] == "uniform"


def test_resume_is_bit_identical(tmp_path):
    b = check_resume_is_bit_identical(train_dit.main, tmp_path, "--cep", "uniform", "--corrupt", "0.1")
    assert b["step"] == 4


def test_lr_warmdown_decays_linearly_to_zero_and_resumes_bit_identically(tmp_path, monkeypatch):
    """--lr-warmdown N: lr at step s (0-based) is lr * min(1, (steps - s) / N), a function of the step alone: a run
    stopped (SIGTERM) in the middle of its warmdown and resumed lands where the straight one does."""
    import signal

    import trainer
    from config import learning_rate
    cfg = train_dit.DiTConfig(lr=1e-3, steps=10, lr_warmdown=4)
    assert [round(learning_rate(cfg, s) / 1e-3, 6) for s in range(10)] == [1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert learning_rate(train_dit.DiTConfig(lr=1e-3, steps=10, lr_warmdown=0), 9) == 1e-3   # 0 = constant
    flags = ("--steps", 4, "--lr-warmdown", 3)
    assert run_tiny(train_dit.main, tmp_path / "straight", *flags) == 0
    real = trainer.train_step

    def stop_after_two(s, x, y, step, *control):
        loss = real(s, x, y, step, *control)
        if step == 1:                                          # the loop saves and stops after 2 of its 4 steps
            os.kill(os.getpid(), signal.SIGTERM)
        return loss
    monkeypatch.setattr(trainer, "train_step", stop_after_two)
    assert run_tiny(train_dit.main, tmp_path / "split", *flags) == 0 and ckpt(tmp_path / "split")["step"] == 2
    monkeypatch.undo()
    assert run_tiny(train_dit.main, tmp_path / "split", *flags, "--resume", "auto") == 0
    a, b = ckpt(tmp_path / "straight"), ckpt(tmp_path / "split")
    assert all(torch.equal(a[p][k], b[p][k]) for p in ("model", "ema") for k in a[p])
    for part in ("muon", "adamw"):                     # the CPU default's optimizer: Muon + AdamW, both scheduled
        assert b["opt"][part]["param_groups"][0]["lr"] == pytest.approx(1e-3 / 3)     # step 3 of 4: 1/3 of lr left
    logged = [r["lr"] for r in records(tmp_path / "straight") if "lr" in r]           # log.jsonl: each step's rate
    assert logged == pytest.approx([1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3])


@pytest.mark.parametrize("clip", ["0.1", "0"])       # clipping every step (norms ~0.8), and off
def test_grad_norm_is_the_mean_pre_clip_norm_of_the_steps_gradients(tmp_path, monkeypatch, clip):
    """log.jsonl's grad_norm at a --log-every 2 record is the mean over its 2 steps of the total gradient norm before
    clipping, recomputed here (float64) from the parameters' gradients just before the trainer's update."""
    import trainer
    real, norms = trainer.update, []

    def spy(s, step):
        norms.append(sum(p.grad.double().pow(2).sum() for p in s.model.parameters() if p.grad is not None).sqrt())
        real(s, step)
    monkeypatch.setattr(trainer, "update", spy)
    assert run_tiny(train_dit.main, tmp_path, "--steps", 4, "--log-every", 2, "--grad-clip", clip) == 0
    logged = [r["grad_norm"] for r in records(tmp_path) if "loss" in r and "event" not in r]
    expected = [((norms[0] + norms[1]) / 2).item(), ((norms[2] + norms[3]) / 2).item()]
    assert logged == pytest.approx(expected, rel=1e-5) and min(logged) > 0.1   # before clipping to 0.1


@pytest.mark.parametrize("cond", ["class", "text"])
def test_batched_data_path_trains_bit_identically_to_items_one_by_one(tmp_path, monkeypatch, cond):
    """The built-in dataset's batch renderer (and the token view's batch path) feed training exactly the bytes the
    one-item-at-a-time path fed it: the checkpoints (weights, EMA, optimizer) are bit-identical."""
    args = ("--steps", 3, "--cond", cond)                   # flips are on by default
    assert run_tiny(train_dit.main, tmp_path / "batched", *args) == 0
    with monkeypatch.context() as m:              # the old path: the loader fetches item by item, each drawn alone
        m.setattr(data.BuiltinShapes, "__getitems__", None)
        m.setattr(TokenizedCaptions, "__getitems__", None)
        m.setattr(data.BuiltinShapes, "__getitem__", builtin_item_one_by_one)
        assert run_tiny(train_dit.main, tmp_path / "one_by_one", *args) == 0
    a, b = ckpt(tmp_path / "batched"), ckpt(tmp_path / "one_by_one")
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for part in ("muon", "adamw"):
        sa, sb = a["opt"][part]["state"], b["opt"][part]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_ddp_two_processes_equal_one_process(tmp_path):
    """The command users start with (--corrupt 0.05 --cep uniform, the default DiT-T with its Mix-FFN depthwise conv)
    on 2 gloo processes trains what 1 process and micro-batches do, and writes nothing to stderr but rank 0's
    progress bar: no "Grad strides do not match bucket view strides" from DDP on every rank (the conv's weight
    gradient came channels-last), nor any other warning."""
    args = TINY + ["--steps", "3", "--seed", "3", "--corrupt", "0.05", "--cep", "uniform"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_dit.py"), *args, "--out", str(tmp_path / "ddp")]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    bar = re.compile(r"dit: +\d+%\|")                      # tqdm's bar (stderr, rank 0), redrawn after each \r
    lines = [ln for ln in re.split(r"[\r\n]", p.stderr) if ln.strip() and not bar.match(ln)]
    assert lines == [], "\n".join(lines)
    assert train_dit.main(args + ["--out", str(tmp_path / "one")]) == 0
    assert train_dit.main(args + ["--out", str(tmp_path / "accum"), "--micro-batch-size", "2"]) == 0
    one = ckpt(tmp_path / "one")
    # The first step's loss comes before any update: the same draws give the same loss up to float summation order.
    first = lambda run: next(r["loss"] for r in records(tmp_path / run) if r.get("step") == 1)
    assert all(abs(first(other) - first("one")) <= 1e-6 * first("one") for other in ("ddp", "accum"))
    # After 3 steps the weights differ by summation order only, amplified where a gradient is near 0 (Adam's first
    # steps move every weight by about lr = 1e-3 whatever its gradient's size; Muon orthogonalises nearly rank-
    # deficient gradients): measured with AdamW 6e-7 (uniform timesteps) and 1.1e-5 (--t-focus), with the default
    # Muon (float32 Newton-Schulz) 2.8e-6 / 5.3e-6 (bfloat16, as torch.optim.Muon: 3.7e-4); a rank that drew other
    # t or ε would move weights by ~1e-3
    for other in ("ddp", "accum"):
        o = ckpt(tmp_path / other)
        for k, v in one["model"].items():
            assert torch.allclose(v, o["model"][k], atol=1e-4, rtol=1e-5), (other, k)
    assert len(ckpt(tmp_path / "ddp")["rng"]) == 2           # every rank's RNG state is saved


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])         # a scheduler's stop, and Ctrl-C
def test_sigterm_saves_and_resume_continues(tmp_path, sig):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train_dit.py"), *TINY, "--steps", "100000", "--ckpt-every", "1000",
           "--out", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and sum(1 for _ in open(log)) >= 3):
        time.sleep(0.2)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    stopped = [r for r in records(out) if r.get("event") == "stopped"]
    assert stopped and ckpt(out)["step"] == stopped[0]["step"] > 0
    step = stopped[0]["step"]
    assert run_tiny(train_dit.main, out, "--steps", step + 2, "--resume", "auto") == 0
    assert ckpt(out)["step"] == step + 2


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    real = diffusion.GaussianDiffusion.training_losses
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        out = real(self, *a, **k)
        if calls["n"] >= 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_losses", poisoned)
    assert run_tiny(train_dit.main, tmp_path, "--steps", 6) == 1
    assert "non-finite" in capsys.readouterr().err
    assert ckpt(tmp_path)["step"] == 2


def _expect_error(capsys, argv, needle):
    expect_one_line_error(capsys, train_dit.main, "train_dit.py", argv, needle)


def test_bad_inputs_one_line_exit_2(tmp_path, capsys):
    base = TINY + ["--steps", "1"]
    _expect_error(capsys, base + ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")], "not found")
    (tmp_path / "empty").mkdir()
    _expect_error(capsys, base + ["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")], "no images")
    bad = tmp_path / "bad" / "cat"
    bad.mkdir(parents=True)
    (bad / "broken.png").write_bytes(b"this is not a png")
    _expect_error(capsys, base + ["--data", str(tmp_path / "bad"), "--out", str(tmp_path / "o3")], "broken.png")
    _expect_error(capsys, base + ["--corrupt", "1.5", "--out", str(tmp_path / "o4")], "--corrupt")
    _expect_error(capsys, base + ["--model", "DiT-Q/3", "--out", str(tmp_path / "o5")], "unknown --model")
    _expect_error(capsys, base + ["--min-snr", "-5", "--out", str(tmp_path / "o8")], "--min-snr")
    _expect_error(capsys, base + ["--pixel-channels", "12", "--out", str(tmp_path / "o9")], "--pixel-channels")
    _expect_error(capsys, base + ["--mlp-ratio", "-1", "--out", str(tmp_path / "o10")], "--mlp-ratio")
    _expect_error(capsys, base + ["--mlp-ratio", "0.001", "--out", str(tmp_path / "o11")], "at least 1 wide")
    _expect_error(capsys, base + ["--pixel-channels", "-8", "--out", str(tmp_path / "o9")], "--pixel-channels")
    assert run_tiny(train_dit.main, tmp_path / "t2", "--steps", 1) == 0
    _expect_error(capsys, base + ["--model", "DiT-T/4", "--resume", str(tmp_path / "t2" / "last.pt"),
                                  "--out", str(tmp_path / "o6")], "model")
    before = hashlib.sha256(open(tmp_path / "t2" / "last.pt", "rb").read()).hexdigest()
    _expect_error(capsys, base + ["--out", str(tmp_path / "t2")], "already holds a run")   # never overwrite a run
    assert hashlib.sha256(open(tmp_path / "t2" / "last.pt", "rb").read()).hexdigest() == before
    (tmp_path / "junk.pt").write_bytes(b"junk")
    _expect_error(capsys, base + ["--resume", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "o7")], "junk.pt")


def test_cli_exit_code_is_2_for_real(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_dit.py"), "--corrupt", "-0.1", "--out",
                        str(tmp_path)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().startswith("train_dit.py: error:") and "Traceback" not in p.stderr


@pytest.mark.parametrize("preset", [p for p in train_dit.PRESETS if "model" in train_dit.PRESETS[p]])
def test_presets_parse(preset):                       # the pre-training recipes (ControlNet's: test_controlnet.py)
    from config import parse_config
    cfg = parse_config(train_dit.DiTConfig, ["--preset", preset, "--steps", "7"], train_dit.PRESETS)
    assert cfg.steps == 7 and cfg.model == train_dit.PRESETS[preset]["model"] and cfg.vae == "kl-f8"
    arch = dit.default_arch(cfg.model, cfg.pixel_channels, cfg.token_conv, cfg.mlp_ratio)
    assert arch == {"pixel_channels": 0, "token_conv": False, "mlp_ratio": 4.0}   # the paper's: the official DiT
    assert cfg.t_focus == 0 and cfg.min_snr == 0                    # with uniform timesteps and the plain ε-MSE


def test_docs_state_the_cpu_default_recipe():
    """docs/cpu-default.md's recipe (its measured time, class accuracy and grid) describes what a bare
    `python train_dit.py` trains: the same steps, batch, optimizer, learning-rate schedule, weighting, timestep focus,
    convolutions, MLP width, grid interval and grid sampler; docs/weights.md's --init-from recipe names the same."""
    import re
    from config import parse_config
    cfg = train_dit.resolve(parse_config(train_dit.DiTConfig, [], train_dit.PRESETS))

    def page(name):
        return " ".join(open(os.path.join(ROOT, "docs", name), encoding="utf-8").read().split())
    text, weights = page("cpu-default.md"), page("weights.md")
    first_run = text[text.index("## The recipe"):text.index("## What it scores")]
    steps, batch = map(int, re.search(r"trained for (\d+) steps of batch (\d+)", first_run).groups())
    assert (steps, batch) == (cfg.steps, cfg.batch_size)
    assert f"CPU default: {cfg.steps} steps of batch {cfg.batch_size}, lr" in text               # the flags table
    assert float(re.search(r"AdamW at lr ([0-9.e-]+)", first_run).group(1)) == cfg.lr
    assert f"(`--lr-warmdown {cfg.lr_warmdown}`)" in first_run
    assert f"(`--min-snr {cfg.min_snr:g}`)" in first_run and f"gradient clipping at {cfg.grad_clip:g}," in first_run
    assert (cfg.pixel_channels, cfg.token_conv) == (32, True) and "`--pixel-channels 32 --token-conv`" in first_run
    assert f"`--mlp-ratio {cfg.mlp_ratio:g}`" in first_run and cfg.mlp_ratio == 2
    assert (f"`--t-focus {cfg.t_focus:g}`" in first_run and cfg.t_focus > 0
            and f"log-SNR {cfg.t_focus_min_log_snr:g} to {cfg.t_focus_max_log_snr:g}" in first_run)
    row = text[text.index("| `--t-focus F`"):]                                                  # the flags table
    row = row[:row.index(" |", row.index("timestep focus"))]
    assert "`--t-focus-min-log-snr LO`, `--t-focus-max-log-snr HI`" in row and f"CPU default uses {cfg.t_focus:g}," in row
    assert f"Min-SNR {cfg.min_snr:g}, `--t-focus {cfg.t_focus:g}`)" in weights                    # the --init-from recipe
    assert f"every {cfg.sample_every} steps" in first_run
    assert cfg.optimizer == "muon" and "`--optimizer muon`" in first_run and "CPU default uses Muon" in text
    assert f"`--sample-sampler {cfg.sample_sampler} --sample-steps {cfg.sample_steps}`" in first_run


def test_checkpoint_from_before_the_convolutions_is_the_official_dit(tmp_path, capsys):
    """A stored config without pixel_channels / token_conv / mlp_ratio (written before they existed) was trained
    without them: evaluate.py rebuilds it as the official DiT (4x MLPs), and --resume continues it with those flags and
    refuses the defaults."""
    import evaluate
    official = ["--pixel-channels", "0", "--no-token-conv", "--mlp-ratio", "4"]
    assert run_tiny(train_dit.main, tmp_path, "--steps", "2", *official) == 0
    state = ckpt(tmp_path)
    for name in ("pixel_channels", "token_conv", "mlp_ratio"):
        del state["config"][name]
    torch.save(state, tmp_path / "last.pt")
    model, _, cfg, _ = evaluate.load_model(tmp_path / "last.pt")
    assert cfg.pixel_channels == 0 and not cfg.token_conv and not hasattr(model, "pixel_stem")
    assert cfg.mlp_ratio == 4 and model.blocks[0].mlp.fc1.out_features == 4 * model.blocks[0].mlp.fc1.in_features
    capsys.readouterr()
    assert run_tiny(train_dit.main, tmp_path, "--steps", "4", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "pixel_channels=0" in err and "(resume with --pixel-channels 0 --no-token-conv --mlp-ratio 4.0)" in err
    assert run_tiny(train_dit.main, tmp_path / "tuned", "--steps", "2", "--init-from", tmp_path / "last.pt") == 0
    tuned = ckpt(tmp_path / "tuned")["config"]                                      # --init-from takes it as trained
    assert tuned["pixel_channels"] == 0 and tuned["mlp_ratio"] == 4
    assert run_tiny(train_dit.main, tmp_path, "--steps", "4", "--resume", "auto", *official) == 0
    assert ckpt(tmp_path)["step"] == 4


def tiny_vae_folder(path):
    """A small random KL-f8 autoencoder saved as a diffusers component folder (config.json + safetensors)."""
    from weights import vae
    from safetensors.torch import save_file
    torch.manual_seed(0)
    ae = vae.build_vae("kl-f8", block_out_channels=(32, 32, 32, 32), layers_per_block=1)
    os.makedirs(path, exist_ok=True)
    save_file(ae.state_dict(), os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"block_out_channels": [32] * 4, "layers_per_block": 1, "latent_channels": 4}, f)
    return str(path)


def test_on_the_fly_vae_latents_train_and_grid_decodes(tmp_path):
    folder = tiny_vae_folder(tmp_path / "vae")
    rc = train_dit.main(TINY + ["--image-size", "32", "--vae", "kl-f8", "--vae-path", folder, "--steps", "2",
                                "--sample-every", "2", "--sample-steps", "2", "--sample-per-class", "1",
                                "--out", str(tmp_path / "run")])
    assert rc == 0
    c = ckpt(tmp_path / "run")
    assert c["model"]["pixel_in.weight"].shape[1] == 4                  # the DiT saw 4-channel latents
    from PIL import Image
    grid = Image.open(tmp_path / "run" / "samples" / "step_0000002.png")
    assert grid.size[0] >= 64                                          # decoded back to 32px images (upscaled)


def test_ddpm_grids_have_fixed_noise_and_leave_the_global_rng_alone():
    """The CPU default samples its grids with DDPM, which draws fresh noise at every step: that noise comes from the
    run's seed (one stream per grid image), so every grid of a run, and its judge line, is a function of the weights
    and the seed only, not of what else drew from the global RNG (e.g. --cond-dropout)."""
    import types
    import trainer
    cfg = train_dit.resolve(train_dit.DiTConfig(image_size=8, num_classes=10, sample_per_class=1, sample_steps=3))
    assert cfg.sample_sampler == "ddpm"
    model = dit.from_config(cfg, encoder_from_config).eval()
    torch.nn.init.normal_(model.pixel_out[-1].weight, std=0.1)      # a non-zero output, so the noise matters
    data_ = types.SimpleNamespace(num_classes=10, prompts=None, dataset=None, decode=None)
    sample = trainer.grid_sampler(cfg, diffusion.from_config(cfg), data_)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    a = sample(model)
    assert torch.equal(torch.get_rng_state(), before)                # nothing drawn from the global RNG
    torch.manual_seed(2)
    assert torch.equal(sample(model), a)                             # and the same grid whatever its state


FAULTS_PER_STEP = """
import dataclasses, resource, sys, torch
from config import parse_config
from plumbing.common import keep_freed_memory
from tools.measure import family, build_step
fam = family("train_dit")                      # the CPU default at batch 8: trainer.train_step, as tools/bench.py runs it
cfg = fam.resolve(parse_config(fam.config, ["--batch-size", "8"], fam.presets))
step = build_step(fam, dataclasses.replace(cfg, num_classes=10), torch.device("cpu"))[0]
def median_faults(first):
    faults = []
    for i in range(first, first + 8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(i)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(faults[3:])[2]                # the median step once warm
default = median_faults(0)                      # glibc's default first: the setting below cannot be undone
print(default, keep_freed_memory(), median_faults(8))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_step_memory_is_kept_not_page_faulted_back_every_step():
    """CPU training keeps the memory a training step frees (plumbing.common.keep_freed_memory): with glibc's
    default the CPU default's step (batch 8 here) page-faults its freed activations back in, 2200-3500 times a step
    once warm (measured; 8000-11500 at batch 32), and kept almost never (0-2, a few steps 256-450); the MALLOC_*_
    environment variables, when set, win."""
    default, kept, faults = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP], cwd=ROOT, env=env(),
                                           capture_output=True, text=True, check=True).stdout.split()
    assert int(default) > 1000 and kept == "True" and int(faults) < 100, (default, kept, faults)
    told = subprocess.run([sys.executable, "-c", "from plumbing.common import keep_freed_memory as k; print(k())"],
                          cwd=ROOT, env={**env(), "MALLOC_TRIM_THRESHOLD_": "131072"}, capture_output=True, text=True)
    assert told.stdout.split() == ["False"], told.stderr


def test_only_cpu_training_changes_the_allocator(tmp_path, monkeypatch):
    """keep_freed_memory is process-wide: setup_distributed (every script, GPU runs too) leaves the allocator alone,
    and a CPU training run asks for it once, in trainer.train, where freed activations would fault back every step."""
    import trainer
    from plumbing import common
    calls = []
    monkeypatch.setattr(common, "keep_freed_memory", lambda: calls.append("setup_distributed") or True)
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append("train") or True, raising=False)
    assert common.setup_distributed("cpu").world == 1 and calls == []
    assert run_tiny(train_dit.main, tmp_path, "--steps", 1) == 0
    assert calls == ["train"]


def test_no_glibc_keeps_the_allocator_and_starts(monkeypatch):
    """Where ctypes.CDLL(None) raises TypeError (Windows, CPython <= 3.13), keep_freed_memory returns False and set-up
    goes on; without glibc (Windows, macOS, musl) the C library is not even opened."""
    import ctypes
    from plumbing import common
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(k, raising=False)

    def cdll(name, *args, **kwargs):
        raise TypeError("LoadLibrary() argument 1 must be str, not None")
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    assert common.keep_freed_memory() is False
    assert common.setup_distributed("cpu").world == 1
    monkeypatch.setattr(common.platform, "libc_ver", lambda *a, **k: ("", ""))
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: pytest.fail("opened the C library without glibc"))
    assert common.keep_freed_memory() is False
