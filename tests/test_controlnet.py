"""ControlNet (models/controlnet.py) on DiT and U-Net bases: the zero-initialised branch leaves the base's output bit for
bit, released layouts load under it, training moves only the branch and makes the control matter, resume and DDP are
exact; control maps (data.ControlMaps) follow the item's image and flip."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data as datalib
import train_dit
import train_ldm
from conditions import ClassEmbedder
from conftest import (DATA, ROOT, TINY, check_resume_is_bit_identical, expect_one_line_error, load_ckpt, randomize,
                      read_key_listing, subprocess_env)
from models import controlnet, dit, unet
from sources.control import ControlMaps, canny, to_uint8
from sources.folders import ImageFolderDataset
from weights import pretrained


def inputs(side=8, channels=3, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, side, side, generator=g), torch.tensor([3, 500, 999])[:batch],
            torch.tensor([1, 7, 10])[:batch], torch.rand(batch, 3, side, side, generator=g))


# ---- the models ----

def test_zero_initialised_branch_equals_the_base_bit_for_bit():
    torch.manual_seed(0)
    base = randomize(dit.DiT_models["DiT-T/2"](input_size=8, in_channels=3, num_classes=10), 0.05)
    model = controlnet.ControlledDiT(base, blocks=2, hint_down=1)
    ldm = randomize(unet.LDM(unet.build_unet("unet-tiny"), ClassEmbedder(10, 64)), 0.05)
    controlled = controlnet.ControlledLDM(ldm, hint_down=1)
    x, t, y, c = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y, control=c), base(x, t, y))
        assert torch.equal(controlled(x, t, y, control=c), ldm(x, t, y))
    # the branch is the base's copy; only it trains
    assert torch.equal(model.control.blocks[1].mlp.fc2.weight, base.blocks[1].mlp.fc2.weight)
    assert torch.equal(controlled.control.input_blocks[1][0].in_layers[2].weight,
                       ldm.diffusion_model.input_blocks[1][0].in_layers[2].weight)
    for m in (model, controlled):
        assert all(n.startswith("control.") for n, p in m.named_parameters() if p.requires_grad)
        assert any(p.requires_grad for p in m.parameters())
    # a moved zero layer makes the control matter (the test above is not vacuous)
    with torch.no_grad():
        model.control.zero_linears[0].weight.normal_()
        controlled.control.zero_convs[1].weight.normal_()
        assert not torch.equal(model(x, t, y, control=c), base(x, t, y))
        assert not torch.equal(controlled(x, t, y, control=c), ldm(x, t, y))


def test_the_dit_branch_reads_block_0s_input_not_its_output_as_pixart_delta_does():
    """The data flow models/controlnet.py documents: with a zero hint and an identity zero linear, the copy of block 0
    maps block 0's input to block 0's output, added where block 1 starts (PixArt-δ's copy would read block 0's output)."""
    torch.manual_seed(0)
    base = randomize(dit.DiT_models["DiT-T/2"](input_size=8, in_channels=3, num_classes=10), 0.05)
    model = controlnet.ControlledDiT(base, blocks=1, hint_down=1)
    x, t, y, c = inputs()
    with torch.no_grad():
        model.control.zero_linears[0].weight.copy_(torch.eye(model.control.zero_linears[0].weight.shape[0]))
        tokens, cond, context, mask, pixels = base.embed(x, t, y)
        after_0 = base.blocks[0](tokens, cond, context, mask)                            # (B, T, D)
        ours = base.denoise(tokens, cond, context, mask, pixels, [after_0])
        pixart = base.denoise(tokens, cond, context, mask, pixels, [base.blocks[0](after_0, cond, context, mask)])
        got = model(x, t, y, control=c)
    assert torch.allclose(got, ours, atol=1e-6) and not torch.allclose(got, pixart, atol=1e-3)


def test_cin256_and_dit_xl2_layouts_load_unchanged_under_the_branch():
    """The CompVis cin256-v2 U-Net and the official DiT-XL/2 key listings (meta tensors) are the bases' keys, under
    base.; the branch copies the encoder half / the first N blocks with the same shapes; the hint reaches the latents."""
    listing = read_key_listing(DATA / "ldm4-cin256-v2_unet_compvis_state_dict.txt")
    ldm, _ = pretrained.build_ldm(listing, torch.empty(1001, 512, device="meta"))
    with torch.device("meta"):
        model = controlnet.ControlledLDM(ldm, hint_down=4)
        hint = model.control.input_hint_block(torch.empty(1, 3, 256, 256))
    sd = model.state_dict()
    base = {k[len("base.diffusion_model."):]: v.shape for k, v in sd.items() if k.startswith("base.diffusion_model.")}
    assert base == {k: v.shape for k, v in listing.items()}
    copied = {k[len("control."):]: v.shape for k, v in sd.items()
              if k.startswith(("control.input_blocks.", "control.middle_block.", "control.time_embed."))}
    assert copied == {k: v.shape for k, v in listing.items() if k.startswith(("input_blocks.", "middle_block.",
                                                                               "time_embed."))}
    assert len(model.control.zero_convs) == 12 and tuple(hint.shape) == (1, 192, 64, 64)
    official = read_key_listing(DATA / "dit-xl-2_official_state_dict.txt")
    base_dit, name, _ = pretrained.build_dit(official)
    with torch.device("meta"):
        cfg = dataclasses.replace(train_dit.DiTConfig(), control="canny", vae="kl-f8", control_blocks=13)
        model = controlnet.from_config(cfg, base_dit)
        tokens = model.control.hint(torch.empty(1, 3, 256, 256)).flatten(2)
    sd = model.state_dict()
    assert {k[5:]: v.shape for k, v in sd.items() if k.startswith("base.")} == {k: v.shape for k, v in official.items()}
    assert len(model.control.blocks) == 13 and tuple(tokens.shape) == (1, 1152, 256)


def test_random_official_dit_and_compvis_files_load_and_start_equal(tmp_path):
    torch.manual_seed(0)
    sd = randomize(dit.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=4, num_heads=4,
                           num_classes=1000), 0.05).state_dict()
    torch.save(sd, tmp_path / "dit.pt")
    tiny = randomize(unet.build_unet("unet-tiny"), 0.05)
    lightning = {f"model.diffusion_model.{k}": v for k, v in tiny.state_dict().items()}
    lightning["cond_stage_model.embedding.weight"] = torch.randn(11, 64)
    torch.save({"state_dict": lightning}, tmp_path / "model.ckpt")
    for path, wrap, shape, side in (("dit.pt", lambda m: controlnet.ControlledDiT(m, 2, 8), (2, 4, 8, 8), 64),
                                    ("model.ckpt", lambda m: controlnet.ControlledLDM(m, 4), (2, 3, 8, 8), 32)):
        base = pretrained.load_pretrained(tmp_path / path, with_vae=False)["model"]
        model = wrap(base)
        x, t, y = torch.randn(*shape), torch.tensor([5, 900]), torch.tensor([3, 10])
        with torch.no_grad():
            assert torch.equal(model(x, t, y, control=torch.rand(2, 3, side, side)), base(x, t, y)), path


# ---- control maps ----

def test_canny_maps_follow_the_image_and_its_flip():
    img = np.zeros((16, 16, 3), np.uint8)
    img[4:12, 3:10] = 200                                               # a bright rectangle on black
    edges = canny(img, 100, 200) > 0
    ring = np.zeros((16, 16), bool)
    ring[3:13, 2:11] = True
    ring[5:11, 4:9] = False                                             # within a pixel of the rectangle's border
    assert edges.any() and not (edges & ~ring).any()
    ds = ControlMaps(datalib.BuiltinShapes(size=16, length=20), "canny")
    x, y, c = ds[2 * 3]
    xf, yf, cf = ds[2 * 3 + 1]
    assert (y, c.shape) == (3, (3, 16, 16)) and c.max() == 1 and torch.equal(c, c.flip(0)[[2, 1, 0]])
    assert torch.equal(cf, c.flip(-1)) and torch.equal(xf, x.flip(-1))
    assert torch.equal(c[0] > 0, torch.from_numpy(canny(to_uint8(x)) > 0))


def test_same_stem_maps_folder(tmp_path):
    from PIL import Image
    for cls, stem in (("a", "n01"), ("b", "n02")):
        os.makedirs(tmp_path / "img" / cls)
        os.makedirs(tmp_path / "maps" / cls, exist_ok=True)
        Image.fromarray(np.full((20, 24, 3), 50, np.uint8)).save(tmp_path / "img" / cls / f"{stem}.jpg")
        m = np.zeros((20, 24, 3), np.uint8)
        m[:, :12] = 255                                                 # left half white
        Image.fromarray(m).save(tmp_path / "maps" / cls / f"{stem}.png")
    ds = ControlMaps(ImageFolderDataset(str(tmp_path / "img"), 16), "maps",
                             maps_dir=str(tmp_path / "maps"))
    _, _, c = ds[2]
    _, _, cf = ds[3]
    assert c.shape == (3, 16, 16) and c[:, :, 0].min() == 1 and c[:, :, -1].max() == 0 and torch.equal(cf, c.flip(-1))
    os.remove(tmp_path / "maps" / "b" / "n02.png")
    with pytest.raises(ValueError, match="no control map of the same stem"):
        ControlMaps(ImageFolderDataset(str(tmp_path / "img"), 16), "maps",
                            maps_dir=str(tmp_path / "maps"))


# ---- training: train_dit.py / train_ldm.py --init-from BASE --control canny ----

@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A 2-step DiT and a 2-step LDM nanoCEP checkpoint on 8px built-in images: the bases to control."""
    root = tmp_path_factory.mktemp("bases")
    for name, main in (("dit", train_dit.main), ("ldm", train_ldm.main)):
        assert main(TINY + ["--steps", "2", "--out", str(root / name)]) == 0
    return {name: str(root / name / "last.pt") for name in ("dit", "ldm")}


def control_flags(base):
    return TINY + ["--init-from", base, "--control", "canny", "--canny-low", "50", "--canny-high", "100",
                   "--lr", "1e-2"]


@pytest.mark.parametrize("kind", ["dit", "ldm"])
def test_training_moves_only_the_branch_and_the_control_then_matters(bases, tmp_path, kind):
    main, family = (train_dit.main, train_dit.FAMILY) if kind == "dit" else (train_ldm.main, train_ldm.FAMILY)
    assert main(control_flags(bases[kind]) + ["--steps", "3", "--sample-every", "3", "--sample-per-class", "1",
                                              "--sample-steps", "2", "--out", str(tmp_path)]) == 0
    base, ck = load_ckpt(os.path.dirname(bases[kind]))["ema"], load_ckpt(tmp_path)
    assert ck["config"]["control"] == "canny" and os.path.isfile(tmp_path / "samples" / "step_0000003.png")
    for part in ("model", "ema"):
        assert {k[5:] for k in ck[part] if k.startswith("base.")} == set(base)
        assert all(torch.equal(ck[part]["base." + k], v) for k, v in base.items()), part   # the base never moved
    zero = [k for k in ck["model"] if "zero" in k or "middle_block_out" in k]
    assert zero and all(ck["model"][k].abs().max() > 0 for k in zero if k.endswith("weight"))
    cfg = family.config_from(ck["config"])
    model, _ = family.build(cfg)
    model.load_state_dict(ck["model"])
    ds = ControlMaps(datalib.BuiltinShapes(8, 64), "canny", 50, 100)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([100, 700]), torch.tensor([1, 2])
    c1 = torch.stack([ds[2 * i][2] for i in (0, 1)])
    c2 = torch.stack([ds[2 * i][2] for i in (4, 7)])
    with torch.no_grad():
        a, b, none = model(x, t, y, control=c1), model(x, t, y, control=c2), model(x, t, y)
    assert not torch.allclose(a, b) and not torch.allclose(a, none)


def test_resume_is_bit_identical(bases, tmp_path):
    check_resume_is_bit_identical(train_dit.main, tmp_path, *control_flags(bases["dit"])[len(TINY):])


def test_ddp_two_processes_equal_one_process(bases, tmp_path):
    args = control_flags(bases["dit"]) + ["--steps", "3", "--seed", "3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_dit.py"), *args, "--out", str(tmp_path / "ddp")]
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert train_dit.main(args + ["--out", str(tmp_path / "one")]) == 0
    one, ddp = load_ckpt(tmp_path / "one")["model"], load_ckpt(tmp_path / "ddp")["model"]
    for k, v in one.items():
        assert torch.allclose(v, ddp[k], atol=1e-6, rtol=1e-5), k
    assert not torch.equal(one["control.zero_linears.0.weight"], torch.zeros_like(one["control.zero_linears.0.weight"]))


def test_bad_control_flags_are_one_line_exit_2(bases, tmp_path, capsys):
    def expect(argv, needle):
        expect_one_line_error(capsys, train_dit.main, "train_dit.py", TINY + argv + ["--out", str(tmp_path / "x")],
                              needle)
    expect(["--control", "canny"], "--init-from BASE")
    expect(["--init-from", bases["dit"], "--control", "canny", "--canny-low", "300"], "--canny-low 300")
    expect(["--init-from", bases["dit"], "--control", "maps"], "--control-maps DIR")
    expect(["--init-from", bases["dit"], "--control", "canny", "--control-blocks", "9"], "--control-blocks 9")
    assert train_dit.main(control_flags(bases["dit"]) + ["--steps", "1", "--out", str(tmp_path / "cn")]) == 0
    expect(["--init-from", str(tmp_path / "cn" / "last.pt"), "--control", "canny"], "is a ControlNet checkpoint")


def test_a_subsets_folders_keep_the_bases_labels_and_a_class_mismatch_is_refused(bases, tmp_path, capsys):
    """IN-100 over an IN-1K base, in small: a folder of 2 of the base's 10 classes trains a ControlNet only with the
    base's labels (--class-index: folder c3 -> label 3); without them the frozen base would get a fresh class table
    that never trains, so that is refused in one line."""
    from PIL import Image
    from sources.folders import read_class_index
    names = [f"c{i}" for i in range(10)]
    (tmp_path / "index.txt").write_text("".join(f"{n} class number {i}\n" for i, n in enumerate(names)))
    assert read_class_index(str(tmp_path / "index.txt")) == names
    for name in ("c3", "c7"):
        os.makedirs(tmp_path / "img" / name)
        for j in range(4):
            Image.fromarray(np.random.default_rng(j).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / "img" / name / f"{j}.png")
    ds = ImageFolderDataset(str(tmp_path / "img"), 8, class_index=names)
    assert ds.num_classes == 10 and sorted(set(ds.labels.tolist())) == [3, 7]
    with pytest.raises(ValueError, match="class folder c3 .* is not in the class index"):
        ImageFolderDataset(str(tmp_path / "img"), 8, class_index=["c0", "c7"])
    flags = control_flags(bases["dit"]) + ["--data", str(tmp_path / "img"), "--steps", "1"]
    expect_one_line_error(capsys, train_dit.main, "train_dit.py", flags + ["--out", str(tmp_path / "x")],
                          "the frozen base has 11 class rows, this run 3")
    assert not (tmp_path / "x").exists()                                  # refused before the run folder is made
    for other in (TINY + ["--data", str(tmp_path / "img")], flags[:flags.index("--control")] + flags[-4:]):
        argv = other + ["--class-index", str(tmp_path / "index.txt"), "--out", str(tmp_path / "x")]
        expect_one_line_error(capsys, train_dit.main, "train_dit.py", argv, "--class-index gives a ControlNet")
    assert train_dit.main(flags + ["--class-index", str(tmp_path / "index.txt"), "--out", str(tmp_path / "ok")]) == 0
    ck, base = load_ckpt(tmp_path / "ok"), load_ckpt(os.path.dirname(bases["dit"]))["ema"]
    table = "y_embedder.embedding_table.weight"
    assert ck["config"]["class_index"] == str(tmp_path / "index.txt") and torch.equal(ck["model"]["base." + table],
                                                                                       base[table])


# ---- evaluation: evaluate.py CKPT --control canny --control-data DIR, edge F1 ----

def test_edge_f1_means_matched_edges():
    from scoring.control import edge_f1
    line = np.zeros((12, 12), bool)
    line[6, 2:10] = True
    shifted = np.roll(line, 1, axis=0)
    half = line.copy()
    half[6, 6:] = False                                                 # the sample drew half of the given edge
    assert edge_f1(line, line) == 1.0 and edge_f1(shifted, line, tolerance=1) == 1.0
    assert edge_f1(shifted, line, tolerance=0) == 0.0
    assert edge_f1(half, line, tolerance=0) == pytest.approx(2 * 1.0 * 0.5 / 1.5)   # precision 1, recall 1/2
    assert edge_f1(line * 0, line * 0) == 1.0 and edge_f1(line * 0, line) == 0.0


def test_exact_edge_f1_is_the_pixelwise_f1_of_the_binary_maps():
    from scoring.control import edge_f1, edge_f1_exact
    true = np.zeros((6, 6), np.uint8)
    true[2, 1:6] = 255                                                  # 5 given edge pixels
    pred = np.zeros((6, 6), bool)
    pred[2, 1:4] = pred[3, 4] = True                                    # 3 on the edge, 1 a pixel off it
    # by hand: TP 3, FP 1, FN 2 -> precision 3/4, recall 3/5, F1 = 2 * 3 / (2 * 3 + 1 + 2) = 2/3
    assert edge_f1_exact(pred, true) == pytest.approx(2 / 3)
    assert edge_f1(pred, true) == 1.0    # 1 px, no one-to-one matching: (3, 4) alone matches both (2, 4) and (2, 5)
    rng = np.random.default_rng(0)
    for density in (0.05, 0.2, 0.5):
        a, b = rng.random((2, 32, 32)) < density
        try:
            from sklearn.metrics import f1_score
            want = f1_score(b.ravel(), a.ravel())
        except ImportError:                                             # the same definition from the confusion counts
            tp, fp, fn = (a & b).sum(), (a & ~b).sum(), (~a & b).sum()
            want = 2 * tp / (2 * tp + fp + fn)
        assert edge_f1_exact(a, b) == pytest.approx(want, abs=1e-12) and edge_f1(a, b) >= edge_f1_exact(a, b)


def test_held_out_controls_below_the_folders_size_sample_every_class_equally(tmp_path):
    """4 classes x 5 items, 8 samples: 2 items of each class (not the first 8 items, all of classes 0 and 1), drawn
    from the sampling seed; 10 samples: the 2 extra go to the first classes."""
    from PIL import Image
    from scoring.held_out import HeldOutControls
    for c in range(4):
        os.makedirs(tmp_path / "val" / f"c{c}")
        for i in range(5):
            Image.fromarray(np.full((8, 8, 3), 40 * c + i, np.uint8)).save(tmp_path / "val" / f"c{c}" / f"{i}.png")
    cfg = {"control": "canny", "image_size": 8, "canny_low": 50.0, "canny_high": 100.0}
    held_out = HeldOutControls("cn.pt", cfg, "canny", str(tmp_path / "val"), num_samples=8)
    classes, maps = held_out.items(np.arange(8))
    assert np.bincount(classes.numpy(), minlength=4).tolist() == [2, 2, 2, 2] and maps.shape == (8, 3, 8, 8)
    assert np.bincount(held_out.items(np.arange(10))[0].numpy()).tolist() == [3, 3, 2, 2]
    assert np.bincount(held_out.items(np.arange(20))[0].numpy()).tolist() == [5] * 4   # every item once
    order = [HeldOutControls("cn.pt", cfg, "canny", str(tmp_path / "val"), sample_seed=s).order for s in (0, 0, 1)]
    assert sorted(order[0]) == list(range(20)) and np.array_equal(order[0], order[1])       # the seed alone decides
    assert not np.array_equal(order[0], order[2])
    assert "FID reference: all 20 held-out images" in held_out.describe(8)


def test_evaluate_control_samples_held_out_maps_and_reports_edge_f1(bases, tmp_path, capsys):
    import json
    import evaluate
    from test_evaluate import TinyExtractor, jit_save
    assert train_dit.main(control_flags(bases["dit"]) + ["--steps", "2", "--out", str(tmp_path / "cn")]) == 0
    ckpt, tiny = str(tmp_path / "cn" / "last.pt"), str(jit_save(TinyExtractor(), tmp_path / "tiny.pt"))
    flags = ["--num-samples", "12", "--cfg-scales", "1,2", "--steps", "2", "--batch-size", "12", "--is-splits", "2",
             "--features", tiny, "--resize", "none", "--out", str(tmp_path / "ev")]
    assert evaluate.main([ckpt, "--control", "canny", "--control-data", "builtin", *flags]) == 0
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())["rows"]
    assert [r["cfg_scale"] for r in rows] == [1, 2] and all(0 <= r["edge_f1_exact"] <= r["edge_f1"] <= 1
                                                            and r["fid"] is not None for r in rows)
    assert len(os.listdir(tmp_path / "ev" / "held_out")) == 12          # the reference: the held-out images
    capsys.readouterr()
    assert evaluate.main([ckpt, *flags]) == 2                           # the base alone would be measured: refused
    assert "pass --control canny --control-data DIR" in capsys.readouterr().err


# ---- the experiment: sweep.py's axis over the frozen base ----

def test_sweep_base_axis_trains_each_base_and_pairs_with_clean(tmp_path):
    import sweep
    cfg = sweep.parse_args(["--grid", "base=clean:a/last.pt,cep-u:b/last.pt", "--train", "--control canny",
                            "--seeds", "0", "--out", str(tmp_path)])
    runs = sweep.plan(cfg)
    assert [r.name for r in runs] == ["clean/seed0", "basecep-u/seed0"]
    assert [r.train_cmd[r.train_cmd.index("--init-from") + 1] for r in runs] == ["a/last.pt", "b/last.pt"]
    assert sweep.cell_name(sweep.clean_counterpart(runs[1].cell)) == "clean"
    table2 = sweep.plan(sweep.parse_args(["--preset", "table2", "--out", str(tmp_path / "t2")]))
    assert len(table2) == 10 and all("--control" in r.eval_cmd and "in100-controlnet" in r.train_cmd
                                     for r in table2)
    with pytest.raises(ValueError, match="expected NAME:PATH"):
        sweep.plan(sweep.parse_args(["--grid", "base=a.pt", "--out", str(tmp_path)]))


def test_controlnet_presets_parse_and_take_the_architecture_from_the_base(bases):
    from config import parse_config
    for module, cls, base in ((train_dit, train_dit.DiTConfig, bases["dit"]), (train_ldm, train_ldm.LDMConfig,
                                                                               bases["ldm"])):
        cfg = parse_config(cls, ["--preset", "in100-controlnet", "--init-from", base], module.PRESETS)
        assert (cfg.control, cfg.canny_low, cfg.canny_high, cfg.lr, cfg.batch_size) == ("canny", 100, 200, 5e-6, 16)
        cfg, _ = pretrained.init_from(cfg, "dit" if module is train_dit else "ldm", ["--init-from", base])
        assert cfg.image_size == 8 and cfg.control == "canny"          # the base's size, this run's control
        module.resolve(cfg)


def test_a_preset_on_the_command_line_keeps_its_optimiser_over_the_base_checkpoints(bases):
    """--preset builtin-controlnet --init-from BASE: the preset's recipe (lr 1e-3, batch 32, EMA 0.99, clip 1, constant
    lr) is the run's, not the base checkpoint's own stored optimiser (which --init-from takes when no preset or flag
    says otherwise); an explicit flag still wins over both."""
    from config import parse_config
    argv = ["--preset", "builtin-controlnet", "--init-from", bases["dit"]]
    cfg = parse_config(train_dit.DiTConfig, argv, train_dit.PRESETS)
    cfg, _ = pretrained.init_from(cfg, "dit", argv, None, train_dit.PRESETS)
    preset = train_dit.PRESETS["builtin-controlnet"]
    assert {k: getattr(cfg, k) for k in pretrained.OPTIMISER_FIELDS if k in preset} == {
        k: preset[k] for k in pretrained.OPTIMISER_FIELDS if k in preset}
    assert cfg.batch_size == 32 and cfg.lr == 1e-3 and cfg.lr_warmdown == 0 and cfg.min_snr == 0
    argv = ["--preset=builtin-controlnet", "--lr", "2e-3", "--init-from", bases["dit"]]
    cfg = parse_config(train_dit.DiTConfig, argv, train_dit.PRESETS)
    cfg, _ = pretrained.init_from(cfg, "dit", argv, None, train_dit.PRESETS)
    assert cfg.lr == 2e-3 and cfg.ema_decay == 0.99
    cfg, _ = pretrained.init_from(parse_config(train_dit.DiTConfig, argv[1:], train_dit.PRESETS), "dit", argv[1:],
                                  None, train_dit.PRESETS)
    assert cfg.ema_decay == 0.995 and cfg.batch_size == 8            # no preset: the base's own (TINY's batch 8)
