"""Tests for gpu_suite.py's plumbing on CPU (CI): flags, the CPU exit path, the MFU arithmetic, the table, the
per-row child processes and their budget, and the row code itself on tiny CPU models.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_gpu_suite.py
"""
import json
import os
import sys
import time

import pytest
import torch

from tools import measure
from tools import gpu_suite
from config import parse_config

INFO = {"gpu": "NVIDIA H200", "capability": "sm_90", "memory_gib": 139.8, "torch": "2.11.0+cu130", "cuda": "13.0"}


# ---- flags and the CPU path ----


def test_needs_cuda_exit_2_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_suite.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m tools.gpu_suite: error:") and "needs CUDA" in err[0]
    assert gpu_suite.main(["--rows", "matmul"]) == 2
    assert capsys.readouterr().err.startswith("python -m tools.gpu_suite: error:")


@pytest.mark.parametrize("argv,names", [
    (["--rows", "foo"], "foo"), (["--rows", ","], "(none given)"), (["--budget", "0"], "--budget"),
    (["--iters", "0"], "--iters"), (["--json", "/no/such/dir/x.json"], "--json"), (["--log", "."], "--log"),
    (["--frobnicate"], "unrecognized arguments")])
def test_bad_flags_exit_2_one_line_before_any_work(argv, names, capsys, tmp_path):
    assert gpu_suite.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0] and err[0].startswith("python -m tools.gpu_suite: error:")


def test_parse_args_defaults_and_row_selection(tmp_path):
    args = gpu_suite.parse_args([])
    assert args.names == list(gpu_suite.ROWS) and args.budget == 420 and (args.iters, args.warmup) == (10, 3)
    args = gpu_suite.parse_args(["--rows", "loader, dit-b32", "--json", str(tmp_path / "g.json"), "--budget", "60"])
    assert args.names == ["loader", "dit-b32"] and args.budget == 60
    assert set(gpu_suite.RUN_ORDER) == set(gpu_suite.ROWS) and len(gpu_suite.RUN_ORDER) == len(gpu_suite.ROWS)
    assert sum(r.budget_s for r in gpu_suite.ROWS.values()) > 420   # the suite budget, not the rows', bounds a run


@pytest.mark.parametrize("name", list(gpu_suite.TRAIN))
def test_training_rows_flags_are_accepted_by_their_scripts(name):
    script_name, argv = gpu_suite.TRAIN[name]
    family = measure.family(script_name)
    cfg = family.resolve(parse_config(family.config, argv))
    side = {"dit": 32, "ldm": 64}[name.split("-")[0]]
    assert cfg.precision == "bf16" and cfg.compile and cfg.device == "cuda" and cfg.num_classes == 1000
    assert cfg.latent_shape[1:] == (side, side) and cfg.batch_size == int(name.split("-b")[1])


# ---- MFU arithmetic and peaks ----


def test_mfu_against_hand_computed_numbers():
    # 711 GFLOP per training image (3 x 237) at 760 img/s = 540.36 TFLOP/s: 54.64 % of 989, 68.57 % of 788
    achieved, mfu = measure.mfu_pct(711e9, 760.0, 989.0)
    assert achieved == pytest.approx(540.36) and mfu == pytest.approx(54.637, abs=1e-3)
    assert measure.mfu_pct(711e9, 760.0, None) == (pytest.approx(540.36), None)
    assert gpu_suite.mfu_cells(711e9, 760.0, 989.0, 788.0) == {"TFLOP/s": "540", "MFU sheet": "54.6%",
                                                                "MFU meas": "68.6%"}
    assert gpu_suite.mfu_cells(711e9, 760.0, None, 788.0)["MFU sheet"] == "-"


@pytest.mark.parametrize("groups", [1, 4, 64])
def test_conv_flops_forward_and_backward_by_hand(groups):
    """A 3x3 conv, 64 -> 64 channels at 8x8, batch 2: 2 x (2 * 64 * 64 * (64 / groups) * 9) FLOPs forward; its backward
    (input and weight gradients) twice that, grouped or not (torch's own backward formula ignores groups)."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    forward = 2 * (2 * 8 * 8 * 64 * (64 // groups) * 9)
    assert measure.count_flops(lambda: conv(x)) == forward
    assert measure.count_flops(lambda: conv(x).sum().backward()) == 3 * forward


def test_default_dit_training_flops_are_three_forwards():
    """The CPU default (Mix-FFN's depthwise convs included): one image's forward + backward counts 3x its forward, up to
    the input image's gradient, not asked for (CPU attention has no FLOP formula in torch: not counted)."""
    import dataclasses
    from config import parse_config
    fam = measure.family("train_dit")
    cfg = dataclasses.replace(fam.resolve(parse_config(fam.config, [], fam.presets)), num_classes=10)
    model, _ = fam.build(cfg)
    x, t, y = torch.randn(1, *cfg.latent_shape), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    forward = measure.count_flops(lambda: model(x, t, y))
    both = measure.count_flops(lambda: model(x, t, y).pow(2).mean().backward())
    assert 2.9 * forward < both < 3.1 * forward


@pytest.mark.parametrize("name,peak", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200 NVL", 835.0), ("Some Future GPU", None)])
def test_datasheet_peak_by_card_name(name, peak):
    assert measure.datasheet_peak(name, "bf16") == peak


# ---- the table ----


def fake_records():
    dit = {"img_per_s": 760.0, "step_s": 64 / 760.0, "peak_mem_gib": 31.25, "flops_per_img": 711e9,
           "params": 675e6}
    return {
        "matmul": {"result": {"tflops": 788.0, "n": 8192, "reps": 20}, "seconds": 9.0},
        "tests": {"result": {"passed": 11, "failed": 1, "skipped": 0, "failing": ["test_vq_codes"],
                             "properties": {"sdpa_dit_xl2": "cudnn_attention"}, "exit_code": 1}, "seconds": 60.0},
        "dit-b64": {"result": dit, "seconds": 70.0},
        "dit-b128": {"error": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "seconds": 50.0},
        "ldm-b64": {"error": "timeout: over its 110 s budget", "timeout": True, "seconds": 110.0},
        "sample": {"result": {"samples_per_s": 25.0, "seconds": 10.24, "batch": 256, "steps": 50,
                              "flops_per_sample": 100 * 237e9, "minutes_50k_on_8": 50_000 / 200 / 60,
                              "peak_mem_gib": 40.0}, "seconds": 40.0},
        "encode": {"error": "skipped: the suite's --budget is spent", "skipped": True, "seconds": 0.0},
        "loader": {"result": {"img_per_s": 1200.0, "workers": 8, "batch": 128, "items": 8192}, "seconds": 20.0},
    }


def test_table_from_fake_rows():
    out = gpu_suite.report(INFO, fake_records(), budget=450, wall=359.6)
    table = out["table"]
    lines = table.splitlines()
    assert "NVIDIA H200" in lines[0] and "torch 2.11.0+cu130" in lines[0] and "360 s of a 450 s budget" in lines[0]
    assert "measured 788 TFLOP/s" in lines[1] and "datasheet 989 TFLOP/s" in lines[1]
    row = {r[0].split(":")[0]: dict(zip(gpu_suite.COLUMNS, r)) for r in out["rows"]}
    assert list(row) == ["matmul", "tests", "dit-b64", "dit-b128", "ldm-b64", "sample", "encode", "loader"]
    assert row["matmul"]["MFU sheet"] == "79.7%"                              # 788 / 989
    assert (row["dit-b64"]["throughput"], row["dit-b64"]["step"]) == ("760 img/s", "84.2 ms")
    assert (row["dit-b64"]["MFU sheet"], row["dit-b64"]["MFU meas"], row["dit-b64"]["mem GiB"]) == ("54.6%", "68.6%",
                                                                                                     "31.2")
    assert row["tests"]["status"] == "FAIL" and "test_vq_codes" in row["tests"]["note"]
    assert "sdpa_dit_xl2=cudnn_attention" in row["tests"]["note"]
    assert row["dit-b128"]["status"] == "error" and row["dit-b128"]["note"].startswith("torch.OutOfMemoryError")
    assert (row["ldm-b64"]["status"], row["encode"]["status"]) == ("timeout", "skipped")
    # 50K samples at 25 samples/s per GPU on 8 GPUs: 250 s = 4.2 min; 100 x 237 GFLOP x 25 /s = 592.5 TFLOP/s
    assert "4.2 min" in row["sample"]["note"] and row["sample"]["TFLOP/s"] == "592"
    # the loader delivers 1200 img/s, 1.6x the 760 img/s DiT-XL/2 trains at: under the 2x it must keep
    assert row["loader"]["status"] == "FAIL" and "1.6x the 760 img/s of dit-b64" in row["loader"]["note"]
    status_col = lines[3].index("status")                                   # aligned columns
    assert all(ln[status_col - 2:status_col] == "  " for ln in lines[5:-1])
    assert json.loads(json.dumps(out))["rows"] == out["rows"]


def test_table_without_a_known_peak_or_matmul_row():
    records = {"dit-b32": fake_records()["dit-b64"]}
    out = gpu_suite.report({**INFO, "gpu": "Some Future GPU"}, records, budget=450, wall=80)
    assert "datasheet unknown for this card" in out["table"] and "measured n/a" in out["table"]
    row = dict(zip(gpu_suite.COLUMNS, out["rows"][0]))
    assert (row["MFU sheet"], row["MFU meas"], row["TFLOP/s"]) == ("-", "-", "540")


# ---- child processes, errors and the budget ----


def test_spawn_reads_results_errors_and_kills_on_timeout(tmp_path):
    write = "import json, sys; json.dump({'x': 1}, open(sys.argv[2], 'w'))"
    assert gpu_suite.spawn([sys.executable, "-c", write], 30)["result"] == {"x": 1}
    rec = gpu_suite.spawn([sys.executable, "-c", "raise ValueError('boom: bad row')"], 30)
    assert rec["error"] == "ValueError: boom: bad row"
    own = "import json, sys; json.dump({'error': 'OutOfMemoryError: no room'}, open(sys.argv[2], 'w')); sys.exit(1)"
    assert gpu_suite.spawn([sys.executable, "-c", own], 30)["error"] == "OutOfMemoryError: no room"
    t0 = time.perf_counter()
    log = open(tmp_path / "log", "w")
    rec = gpu_suite.spawn([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 1.5,
                          log)
    log.close()
    assert rec.get("timeout") and rec["error"] == "timeout: over its 2 s budget" and time.perf_counter() - t0 < 20
    assert "started" in (tmp_path / "log").read_text()


def test_run_rows_skips_every_row_when_the_budget_is_spent():
    args = gpu_suite.parse_args(["--rows", "encode,matmul", "--budget", "5"])
    records = gpu_suite.run_rows(args.names, args)
    assert all(r.get("skipped") for r in records.values()) and list(records) == ["matmul", "encode"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the rows would really run on a GPU")
def test_main_end_to_end_with_failing_rows_prints_the_table_and_writes_json(monkeypatch, tmp_path, capsys):
    """The parent believes in a GPU; the children (no CUDA here) fail: every row shows its one-line error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_suite, "card_info", lambda: INFO)
    out = tmp_path / "gpu.json"
    assert gpu_suite.main(["--rows", "matmul,encode", "--json", str(out), "--log", str(tmp_path / "log")]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["table"] in printed and [r[0].split(":")[0] for r in saved["rows"]] == ["matmul", "encode"]
    for row in saved["rows"]:
        cells = dict(zip(gpu_suite.COLUMNS, row))
        assert cells["status"] == "error" and "needs CUDA" in cells["note"]
    assert (tmp_path / "log").read_text().count("=====") == 2


# ---- the row code on tiny CPU models ----


def test_sampling_and_loader_rows_run_on_tiny_cpu_models():
    from weights import vae
    ae = vae.build_vae("kl-f8", block_out_channels=(32, 64)).eval().requires_grad_(False)
    argv = ["--model", "DiT-T/2", "--vae", "kl-f8", "--image-size", "32", "--num-classes", "10"]
    res = gpu_suite.sample_throughput(argv, ae, torch.device("cpu"), batch=2, steps=2)
    assert res["samples_per_s"] > 0 and res["peak_mem_gib"] is None and res["flops_per_sample"] > 4 * 1e6
    res = gpu_suite.loader_throughput(items=32, batch=8, steps=2, workers=0)
    assert res["img_per_s"] > 0 and res["items"] == 32


def test_synthetic_cache_is_a_complete_latent_cache(tmp_path):
    from weights import latents
    gpu_suite.synthetic_cache(str(tmp_path / "c"), 16)
    ds = latents.LatentDataset(str(tmp_path / "c"))
    x, y = ds[3]
    assert len(ds) == 16 and x.shape == (8, 32, 32) and x.abs().sum() > 0 and 0 <= y < ds.num_classes


def test_a_timed_out_training_row_skips_the_same_models_other_rows(monkeypatch):
    calls = []

    def fake_spawn(cmd, timeout, log=None):
        name = cmd[cmd.index("--row") + 1]
        calls.append(name)
        return {"error": "timeout: over its 1 s budget", "timeout": True, "seconds": 1.0} if name == "dit-b32" \
            else {"result": {}, "seconds": 1.0}
    monkeypatch.setattr(gpu_suite, "spawn", fake_spawn)
    args = gpu_suite.parse_args(["--rows", "dit-b32,dit-b64,dit-b128,ldm-b64"])
    records = gpu_suite.run_rows(args.names, args)
    assert calls == ["dit-b32", "ldm-b64"]                 # the U-Net still gets its try
    assert records["dit-b64"]["error"] == "skipped: dit-b32 of the same model timed out"
