"""The judge of an MNIST-family set (scoring/judge.py --data fashion-mnist): its two parts are the halves of the test
split, disjoint from training and from each other; it is keyed by the content it trained on, not by where it was read;
its reference, check and the chance level of trainset.py come from the fresh half. Files are written here offline in
the published format (the four IDX .gz files), with images that depend on the class so a tiny judge can learn them."""
import gzip
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

import sweep
from conftest import expect_one_line_error
from scoring import judge, memorization, trainset

N_TRAIN, N_TEST = 60, 30          # halves of 15: the labels (cycling 0..9) differ between them


def write_fashion(folder, n_train=N_TRAIN, n_test=N_TEST, shift=0):
    """folder/: the four published .gz IDX files, class c a bright bar at row 2c + noise (28 x 28), labels cycling."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(shift)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c + 3:2 * c + 7] = 250                                  # the class: where the bar is
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(
            np.array([2051, n, 28, 28], ">i4").tobytes() + images.tobytes()))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(
            np.array([2049, n], ">i4").tobytes() + labels.tobytes()))


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """(a published-format folder, a tiny judge trained on its judge half); the decompressed cache in tmp."""
    root = tmp_path_factory.mktemp("fm")
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOCEP_CACHE", str(root / "cache"))
    write_fashion(root / "published")
    cfg = judge.judge_config(8, "fashion-mnist", str(root / "published"))
    cfg.steps, cfg.width = 80, 8
    path = judge.build(cfg, root / "judge.pt", progress=False)
    yield root / "published", path
    mp.undo()


def test_the_parts_are_the_halves_of_the_test_split(fashion):
    folder, _ = fashion
    ds, judge_part = judge.real_part("fashion-mnist", 8, "judge", str(folder))
    _, fresh_part = judge.real_part("fashion-mnist", 8, "fresh", str(folder))
    assert len(ds) == N_TEST and ds.class_names[0] == "T-shirt/top" == judge.class_names("fashion-mnist")[0]
    assert np.array_equal(judge_part, np.arange(15)) and np.array_equal(fresh_part, np.arange(15, 30))
    imgs, labels = judge.real_images("fashion-mnist", 8, "fresh", num=8, mirror="none", root=str(folder))
    picks = 15 + np.linspace(0, 14, 8).round().astype(int)                            # spread over the second half
    assert imgs.shape == (8, 8, 8, 3) and imgs.dtype == np.uint8 and np.array_equal(labels, ds.labels[picks])
    assert np.array_equal(imgs, np.stack([ds.render(int(i)) for i in picks]))
    both, labels = judge.real_images("fashion-mnist", 8, "judge", mirror="both", root=str(folder))
    assert len(both) == 30 and np.array_equal(both[15:], both[:15, :, ::-1])
    assert np.array_equal(both[:15], np.stack([ds.render(i) for i in range(15)])) and labels[0] == 0
    with pytest.raises(ValueError, match="no judge for --data cifar10"):
        judge.real_part("cifar10", 8, "judge", str(folder))


def test_the_judge_learns_its_half_and_checks_on_the_other(fashion):
    folder, path = fashion
    check = judge.self_check(judge.load(path), 8, None, "fashion-mnist", str(folder))
    assert check["num_check"] == 15 and check["accuracy"] >= 0.8 and check["accuracy_mirrored"] >= 0.5
    ref = judge.reference(8, None, path=path, data_name="fashion-mnist", data_root=str(folder))
    assert ref["feats"].shape == (15, 128) and np.array_equal(ref["labels"], np.arange(15, 30) % 10)


def test_the_cache_key_is_the_content_not_the_place(fashion, tmp_path):
    folder, _ = fashion
    key = judge.judge_config(8, "fashion-mnist", str(folder)).key()
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    assert judge.judge_config(8, "fashion-mnist", str(moved)).key() == key               # the same files elsewhere
    write_fashion(tmp_path / "other", shift=1)
    assert judge.judge_config(8, "fashion-mnist", str(tmp_path / "other")).key() != key  # other images
    assert judge.default_path(8, "fashion-mnist", str(folder)).name.startswith("judge-fashion-mnist-8px-")
    assert judge.default_path(16).name == "judge-16px-e1e769ea6116.pt"            # the others keep their keys
    assert judge.default_path(8, "digits").name == "judge-digits-8px-7bdb1bf06674.pt"
    unhashed = judge.JudgeConfig(image_size=8, data="fashion-mnist", data_root=str(folder), steps=1, width=4)
    extra = {"judge.json": ""}
    with warnings.catch_warnings():                             # torch 2.14 deprecates TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(judge.build(unhashed, tmp_path / "j.pt", progress=False)), _extra_files=extra)
    assert json.loads(extra["judge.json"])["config"]["data_hash"] == judge.judge_config(8, "fashion-mnist",
                                                                                         str(folder)).data_hash


def test_the_chance_level_is_the_whole_fresh_half(fashion):
    """A Fashion-MNIST run's --train-ref: its k items per class from the training split, and every image of the test
    split's second half (none of them a training item) as the chance level."""
    folder, _ = fashion
    cfg = {"data": "fashion-mnist", "data_root": str(folder), "image_size": 8, "items_per_class": 2, "seed": 3}
    tr = trainset.build(cfg)
    assert int(tr["num_items"]) == 20 and int(tr["num_fresh"]) == 15 and tr["pixels"].shape == (40, 8, 8, 3)
    fresh, _ = judge.real_images("fashion-mnist", 8, "fresh", mirror="half", root=str(folder))
    assert np.array_equal(trainset.fresh_images(cfg), fresh)                 # the judge's fresh half, as the reference
    assert tr["real_px_d1"].min() > 0 and memorization.ratio_memorized(tr["real_px_d1"], tr["real_px_d2"]) <= 0.1
    assert int(trainset.build(cfg, num_fresh=6)["num_fresh"]) == 6


def test_cli_writes_the_fresh_reference_and_bad_input_is_one_line(fashion, tmp_path, capsys, monkeypatch):
    folder, path = fashion
    flags = ["--data", "fashion-mnist", "--data-root", str(folder), "--judge", str(path)]
    assert judge.main(["ref", *flags, "--num", "10", "--out", str(tmp_path / "ref.npz")]) == 0
    ref = np.load(tmp_path / "ref.npz")
    assert ref["feats"].shape == (10, 128) and str(ref["data"]) == "fashion-mnist"
    not_a_folder = tmp_path / "a-file"                        # no download can land there either: offline or not
    not_a_folder.write_text("")
    monkeypatch.setattr(judge, "CACHE_DIR", tmp_path / "cache")
    expect_one_line_error(capsys, judge.main, "python -m scoring.judge",
                          ["check", "--data", "fashion-mnist", "--data-root", str(not_a_folder)], "fashion-mnist")


def test_the_sweep_passes_the_runs_data_and_root_to_the_judge(tmp_path):
    assert sweep.JUDGED_DATA == judge.JUDGED_DATA                          # sweep.py keeps a torch-free copy
    train = "--data fashion-mnist --data-root /usr/share/datasets/fashion-mnist --image-size 8"
    cfg = sweep.SweepConfig(out=str(tmp_path), train=train, judge=2000)
    path_cmd, ref_cmd = sweep.judge_commands(cfg)
    which = ["--data", "fashion-mnist", "--data-root", "/usr/share/datasets/fashion-mnist"]
    assert path_cmd[3:] == ["path", *which, "--image-size", "8"]
    assert ref_cmd[3:11] == ["ref", *which, "--image-size", "8", "--num"] and ref_cmd[11] == "2000"
    sweep.check(cfg)                                                       # a judge exists for it: accepted
