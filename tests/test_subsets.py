"""--items-per-class (k items per class chosen from the seed, in the core data path) and torchvision's datasets
(--data mnist, cifar10, ...) read from files written here offline in torchvision's formats."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

import data
import train_dit
from conftest import TINY, expect_one_line_error
from scoring import trainset


def write_mnist(root, n_train=60, n_test=30, side=28):
    """root/MNIST/raw/: the four idx files torchvision.datasets.MNIST reads, digits as random blobs, 10 classes."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(np.array([2051, n, side, side], ">i4").tobytes()
                                                          + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(np.array([2049, n], ">i4").tobytes() + labels.tobytes())
    return images


def test_items_per_class_is_k_per_class_fixed_by_the_seed():
    labels = np.arange(200) % 10
    a, b, c = (data.items_per_class(labels, 3, s) for s in (7, 7, 8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)                  # a function of the seed
    assert np.bincount(labels[a], minlength=10).tolist() == [3] * 10 and np.all(np.diff(a) > 0)
    with pytest.raises(ValueError, match="class 0 has only 2 items"):
        data.items_per_class(np.array([0, 0, 1, 1, 1]), 3, 0)


def test_item_subset_speaks_the_protocol_and_keeps_its_own_labels():
    full = data.BuiltinShapes(8, 100, seed=2)
    sub = data.subset_per_class(full, 2, seed=2)
    assert len(sub) == 20 and sub.num_classes == 10 and sub.image_size == 8
    i = int(sub.indices[5])
    assert torch.equal(sub[2 * 5 + 1][0], full[2 * i + 1][0]) and sub[10][1] == full.labels[i]
    data.apply_corruption(sub, 0.5, seed=0)                                   # corruption acts on the subset only
    assert (sub.labels != full.labels[sub.indices]).sum() == 10 and np.array_equal(full.labels, np.arange(100) % 10)
    assert data.subset_per_class(full, 0, seed=2) is full


def test_item_subset_batch_fetch_is_its_items_one_by_one():
    """The DataLoader's batched fetch of a subset maps its keys to the source's (a subset of the built-in shapes has a
    batch renderer underneath): the same items, labels and flips as ds[key]."""
    ds = data.subset_per_class(data.BuiltinShapes(size=8, length=100, seed=3), 2, seed=3)
    keys = [0, 3, 5, 8, 19, 38, 39]
    for (xa, ya), (xb, yb) in zip(ds.__getitems__(keys), [ds[k] for k in keys]):
        assert torch.equal(xa, xb) and ya == yb


def test_training_runs_on_the_subset_and_resume_refuses_another(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TINY, "--steps", "2", "--items-per-class", "1", "--out", str(out)]
    assert train_dit.main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg = cfg.get("config", cfg)
    assert cfg["items_per_class"] == 1
    tr = trainset.build(cfg, num_fresh=20)                                    # what --train-ref rebuilds
    assert np.array_equal(tr["items"], data.items_per_class(np.arange(64) % 10, 1, 0)) and len(tr["pixels"]) == 20
    expect_one_line_error(capsys, train_dit.main, "train_dit.py",
                          [*TINY, "--steps", "4", "--items-per-class", "2", "--out", str(out), "--resume", "auto"],
                          "items_per_class")


def test_mnist_is_read_through_torchvision_resized_and_in_rgb(tmp_path):
    images = write_mnist(tmp_path)
    ds = data.build_dataset("mnist", 8, root=str(tmp_path))
    x, y = ds[2 * 3]
    assert len(ds) == 60 and ds.num_classes == 10 and y == 3 and x.shape == (3, 8, 8)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])               # greyscale replicated to RGB
    from PIL import Image
    from sources.folders import center_crop_arr
    expect = center_crop_arr(Image.fromarray(images[0]).convert("RGB"), 8)    # the test split's first image
    assert np.array_equal(data.build_dataset("mnist", 8, root=str(tmp_path), train=False).render(0), expect)
    cfg = {"data": "mnist", "data_root": str(tmp_path), "image_size": 8, "seed": 1, "items_per_class": 2}
    tr = trainset.build(cfg, num_fresh=10)
    assert tr["pixels"].shape == (40, 8, 8, 3) and len(tr["real_px_d1"]) == 10   # fresh: the test split


def test_a_folder_of_the_published_gz_files_reads_as_the_set(tmp_path, monkeypatch, capsys):
    """--data-root may be the four IDX files as published (.gz), e.g. Debian's dataset-fashion-mnist folder: they are
    decompressed once into the cache in torchvision's layout and read through torchvision.datasets; a damaged file is
    one line naming it."""
    import gzip
    monkeypatch.setenv("NANOCEP_CACHE", str(tmp_path / "cache"))
    write_mnist(tmp_path / "tv", n_train=40)
    published = tmp_path / "usr-share-datasets-fashion-mnist"
    published.mkdir()
    for f in (tmp_path / "tv" / "MNIST" / "raw").iterdir():
        (published / (f.name + ".gz")).write_bytes(gzip.compress(f.read_bytes()))
    ds = data.build_dataset("fashion-mnist", 8, root=str(published))
    assert len(ds) == 40 and ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top"
    assert np.array_equal(ds.labels, np.arange(40) % 10) and ds[2 * 3][0].shape == (3, 8, 8)
    raw = next((tmp_path / "cache" / "torchvision").glob("fashion-mnist-*/FashionMNIST/raw"))
    assert (raw / "train-images-idx3-ubyte").read_bytes() == (tmp_path / "tv" / "MNIST" / "raw" /
                                                             "train-images-idx3-ubyte").read_bytes()
    before = (raw / "train-images-idx3-ubyte").stat().st_mtime_ns
    assert len(data.build_dataset("fashion-mnist", 8, root=str(published), train=False)) == 30
    assert (raw / "train-images-idx3-ubyte").stat().st_mtime_ns == before          # decompressed once
    replaced = published / "train-labels-idx1-ubyte.gz"                    # new files (another mtime): read again
    labels = gzip.decompress(replaced.read_bytes())
    replaced.write_bytes(gzip.compress(labels[:8] + bytes([9] * 40)))
    os.utime(replaced, ns=(1, 1))                                           # even with an older timestamp
    assert np.array_equal(data.build_dataset("fashion-mnist", 8, root=str(published)).labels, [9] * 40)
    damaged = tmp_path / "damaged"
    shutil.copytree(published, damaged)
    good = gzip.compress(labels)
    for bad in (b"\x1f\x8b\x08\x00 not gzip", good[:12] + bytes(len(good) - 12)):   # a bad header; bad deflate data
        (damaged / "train-labels-idx1-ubyte.gz").write_bytes(bad)
        expect_one_line_error(capsys, train_dit.main, "train_dit.py",
                              [*TINY, "--steps", "1", "--data", "fashion-mnist", "--data-root", str(damaged),
                               "--out", str(tmp_path / "run")], "train-labels-idx1-ubyte.gz")


def test_cifar10_is_read_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 10) for i in range(1, 6)] + [("test_batch", 10)]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(10))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)   # our files lack the real checksums
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    ds = data.build_dataset("cifar10", 16, root=str(tmp_path))
    assert len(ds) == 50 and ds.class_names[2] == "c2" and ds[2 * 7][0].shape == (3, 16, 16)


def test_a_missing_torchvision_set_is_one_line(tmp_path, capsys, monkeypatch):
    import torchvision.datasets as tvd

    def offline(self):
        raise OSError("network unreachable")
    monkeypatch.setattr(tvd.MNIST, "download", offline)
    expect_one_line_error(capsys, train_dit.main, "train_dit.py",
                          [*TINY, "--steps", "1", "--data", "mnist", "--data-root", str(tmp_path / "none"),
                           "--out", str(tmp_path / "run")], "--data mnist")
