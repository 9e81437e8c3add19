"""Tests for --data digits (sources/digits.py): the fixed pool / judge / fresh split, the items' pixels, --items-per-class
drawing from the pool only, the digits judge (a tiny one, ~3 s), the fresh part as the chance level, the sweep's judge
commands, and the one-line error without scikit-learn."""
import sys

import numpy as np
import pytest
from PIL import Image

import data
import sweep
from scoring import judge, memorization, trainset
from sources import digits
from sources.folders import center_crop_arr
from tests.conftest import one_error_line

pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402  (the oracle: scikit-learn's own arrays)


def test_split_is_disjoint_stratified_and_fixed_by_index():
    target = load_digits().target
    ids = {p: digits.DigitsDataset(8, p).source_ids for p in digits.PARTS}
    assert {p: len(v) for p, v in ids.items()} == {"pool": 602, "judge": 599, "fresh": 596}     # the documented sizes
    assert np.array_equal(np.sort(np.concatenate(list(ids.values()))), np.arange(1797))         # disjoint, complete
    for c in range(10):
        members = np.flatnonzero(target == c)
        counts = [np.isin(members, v).sum() for v in ids.values()]
        assert max(counts) - min(counts) <= 1 and 58 <= min(counts)                             # a third of each class
        assert np.array_equal(members[0::3], ids["pool"][target[ids["pool"]] == c])            # in turn, index order
        assert np.array_equal(members[2::3], ids["fresh"][target[ids["fresh"]] == c])
    assert np.array_equal(digits.DigitsDataset(8, "pool").source_ids, ids["pool"])             # no seed in it


def test_items_are_the_grey_levels_scaled_exactly_and_flips_mirror():
    raw = load_digits()
    for part in digits.PARTS:
        ds = digits.DigitsDataset(8, part)
        for i in (0, 7, len(ds) - 1):
            v = raw.images[ds.source_ids[i]]                                                   # (8, 8) floats 0..16
            want = np.repeat(np.round(v * 255 / 16)[..., None], 3, axis=-1).astype(np.uint8)    # 8 -> 128 (127.5)
            x, label = ds[2 * i]
            assert np.array_equal(trainset.to_uint8(x), want) and label == raw.target[ds.source_ids[i]]
            assert np.array_equal(trainset.to_uint8(ds[2 * i + 1][0]), want[:, ::-1])
    assert list(digits.LEVELS[[0, 8, 16]]) == [0, 128, 255]
    big = digits.DigitsDataset(16, "pool")                          # other sizes: the torchvision sets' resize
    assert np.array_equal(big.render(3), center_crop_arr(Image.fromarray(digits.DigitsDataset(8).images[3]), 16))
    assert data.build_dataset("digits", 8, train=False).part == "fresh"


def test_items_per_class_draws_k_per_class_from_the_pool_only():
    pool = digits.DigitsDataset(8, "pool")
    drawn = []
    for seed in (0, 1, 2):
        ds = data.training_set({"data": "digits", "image_size": 8, "items_per_class": 3, "seed": seed})
        ids = pool.source_ids[ds.indices]
        assert np.isin(ids, pool.source_ids).all() and np.bincount(ds.labels).tolist() == [3] * 10
        assert np.array_equal(ds.labels, load_digits().target[ids])
        drawn.append(tuple(ids))
    assert len(set(drawn)) == 3                                     # the seed draws them
    with pytest.raises(ValueError, match="has only 58 items"):      # class 8's pool: 58 of its 174 images
        data.training_set({"data": "digits", "image_size": 8, "items_per_class": 59})


def test_fresh_part_is_the_chance_level_of_a_digits_run():
    """--train-ref of a digits run: its 2 x 10 items (both flips), and all 596 fresh digits, none of them a training
    item, matched to those items: the nearest-item distance of real images never seen is far from 0."""
    tr = trainset.build({"data": "digits", "image_size": 8, "items_per_class": 2, "seed": 4}, num_fresh=5000)
    assert int(tr["num_items"]) == 20 and tr["pixels"].shape == (40, 8, 8, 3) and int(tr["num_fresh"]) == 596
    assert tr["real_px_d1"].min() > 0 and memorization.ratio_memorized(tr["real_px_d1"], tr["real_px_d2"]) <= 0.02


@pytest.fixture(scope="module")
def tiny_digits_judge(tmp_path_factory):
    cfg = judge.JudgeConfig(image_size=8, data="digits", steps=60, width=8)
    return judge.build(cfg, tmp_path_factory.mktemp("judge") / "digits.pt", progress=False)


def test_digits_judge_has_the_judge_protocol_and_its_own_cache_key(tiny_digits_judge):
    net = judge.load(tiny_digits_judge)
    imgs, labels = judge.real_images("digits", 8, "fresh")
    feats, pred = judge.judge_images(net, imgs)
    assert feats.shape == (596, 128) and (pred == labels).mean() > 0.6          # 60 steps already far above chance
    ref = judge.reference(8, None, path=tiny_digits_judge, data_name="digits")
    assert ref["feats"].shape == (596, 128) and ref["probs"].shape == (596, 10)
    assert np.array_equal(ref["labels"], labels)
    assert judge.reference(8, 100, path=tiny_digits_judge, data_name="digits")["feats"].shape == (100, 128)
    assert judge.default_path(8, "digits") != judge.default_path(8)
    assert judge.default_path(16).name == "judge-16px-e1e769ea6116.pt"         # built-in caches keep their key


def test_digits_judge_build_is_deterministic():
    cfg = judge.JudgeConfig(image_size=8, data="digits", steps=3, width=4)
    a, b = (judge.train_judge(cfg, progress=False).state_dict() for _ in range(2))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_sweep_judge_commands_follow_the_runs_data(tmp_path):
    cfg = sweep.SweepConfig(out=str(tmp_path), train="--data digits --image-size 8", judge=300)
    path_cmd, ref_cmd = sweep.judge_commands(cfg)
    assert path_cmd[3:] == ["path", "--data", "digits", "--image-size", "8"]
    assert ref_cmd[3:9] == ["ref", "--data", "digits", "--image-size", "8", "--num"]
    assert "--data digits" in sweep.judge_path_shell(cfg)
    builtin = sweep.SweepConfig(out=str(tmp_path), train="--image-size 8", judge=300)
    assert "--data" not in sweep.judge_commands(builtin)[0] and "--data" not in sweep.judge_path_shell(builtin)


def test_missing_scikit_learn_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    import train_dit
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)       # `from sklearn.datasets import ...` fails
    digits.load.cache_clear()
    try:
        assert train_dit.main(["--data", "digits", "--image-size", "8", "--steps", "1", "--out", str(tmp_path)]) == 2
        assert one_error_line(capsys) == "train_dit.py: error: --data digits needs scikit-learn (pip install scikit-learn)"
        assert judge.main(["check", "--data", "digits"]) == 2
        assert capsys.readouterr().err.strip() == ("python -m scoring.judge: error: --data digits needs scikit-learn "
                                                   "(pip install scikit-learn)")
    finally:
        digits.load.cache_clear()
