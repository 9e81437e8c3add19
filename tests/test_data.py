"""data.py: the built-in dataset, image folders with the ADM crop, the step sampler, static corruption."""
import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import builtin_item_one_by_one
from sources.folders import ImageFolderDataset, center_crop_arr, to_tensor
from tools import preview


def test_builtin_is_deterministic_balanced_and_diverse():
    a, b = data.BuiltinShapes(size=16, length=200, seed=3), data.BuiltinShapes(size=16, length=200, seed=3)
    x0, y0 = a[2 * 17]
    assert torch.equal(x0, b[2 * 17][0]) and y0 == 17 % 10
    assert x0.shape == (3, 16, 16) and x0.min() >= -1 and x0.max() <= 1
    assert np.bincount(a.labels).tolist() == [20] * 10
    other = data.BuiltinShapes(size=16, length=200, seed=4)
    assert not torch.equal(x0, other[2 * 17][0])                         # the seed matters
    same_class = torch.stack([a[2 * i][0] for i in range(0, 200, 10)])    # class 0, 20 items: all different
    assert torch.cdist(same_class.flatten(1), same_class.flatten(1)).fill_diagonal_(1).min() > 0.5
    flipped, _ = a[2 * 17 + 1]
    assert torch.equal(flipped, x0.flip(-1))
    assert "red disc" in a.captions[0] and a.class_names[5] == "red cross" and "cross" in a.captions[5]


def test_builtin_colour_identifies_class():
    """The dominant colour of the shape pixels is the class colour (a sanity check that the classes are learnable)."""
    ds = data.BuiltinShapes(size=16, length=50, seed=0)
    for i in range(50):
        img = ((ds[2 * i][0] + 1) * 127.5).permute(1, 2, 0).reshape(-1, 3).numpy()
        bright = img[img.max(1) > 120]
        colour = list(data.BUILTIN_COLOURS.values())[ds.labels[i] % 5]
        assert np.abs(np.median(bright, 0) - colour).max() < 70


@pytest.mark.parametrize("size", [8, 16, 32])
def test_builtin_batch_render_is_bit_identical_to_one_item_at_a_time(size):
    """The batch path (render_batch / __getitems__, what the DataLoader calls) changes no pixel of any item: both
    shapes, flipped and not, in chunks of every fill (batch sizes that are not a multiple of the chunk)."""
    ds = data.BuiltinShapes(size=size, length=10_000, seed=7)
    keys = np.random.default_rng(size).integers(0, 2 * len(ds), 37).tolist() + [0, 1, 2 * 9999 + 1]
    ref = [builtin_item_one_by_one(ds, k) for k in keys]
    items = ds.__getitems__(keys)
    assert [y for _, y in items] == [y for _, y in ref] and {k & 1 for k in keys} == {0, 1}
    assert {ds._attributes(k >> 1)[0]["shape"] for k in keys} == {"disc", "cross"}
    x = torch.utils.data.default_collate(items)[0]                                # (B, C, H, W), as the loader stacks
    assert x.shape == (len(keys), 3, size, size) and torch.equal(x, torch.stack([r[0] for r in ref]))
    assert torch.equal(ds[keys[3]][0], ref[3][0]) and ds.__getitems__([]) == []
    img = ds.render_batch([k >> 1 for k in keys])                                  # (B, H, W, 3) uint8, unflipped
    assert img.dtype == np.uint8 and np.array_equal(img[0], ds.render(keys[0] >> 1))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_fetches_builtin_batches_through_getitems(workers, monkeypatch):
    """torch's DataLoader, given StepSampler as batch_sampler, renders each batch with one __getitems__ call (in the
    main process or in its workers) and its default collate stacks it into the per-item batch, bit for bit."""
    ds = data.BuiltinShapes(size=8, length=500, seed=1)
    calls = []
    batch_path = data.BuiltinShapes.__getitems__
    monkeypatch.setattr(data.BuiltinShapes, "__getitems__", lambda self, keys: calls.append(len(keys)) or
                        batch_path(self, keys))
    sampler = data.StepSampler(len(ds), 12, 0, 1, seed=5, start_step=0, total_steps=3)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers)
    for keys, (x, y) in zip(sampler, loader):
        ref = [builtin_item_one_by_one(ds, k) for k in keys]
        assert torch.equal(x, torch.stack([r[0] for r in ref])) and y.tolist() == [r[1] for r in ref]
    if workers == 0:                                        # (a worker's calls happen in its own process)
        assert calls == [12, 12, 12]


def test_to_tensor_is_torchs_arithmetic_for_every_pixel_value():
    """to_tensor's numpy arithmetic gives, for each of the 256 uint8 values (it is elementwise, so that is every input),
    torch's float32 x / 127.5 - 1, one image (H, W, C) or a batch (B, H, W, C) alike."""
    every = np.arange(256, dtype=np.uint8).reshape(2, 8, 16).transpose(1, 2, 0)            # (8, 16, 2): each value once
    batch = np.stack([every, every[::-1], every[:, ::-1]])                                   # (3, 8, 16, 2)
    torch_way = torch.from_numpy(batch.astype(np.float32)).permute(0, 3, 1, 2).div_(127.5).sub_(1.0)
    assert torch.equal(to_tensor(batch), torch_way) and torch.equal(to_tensor(every), torch_way[0])
    assert to_tensor(every).shape == (2, 8, 16) and to_tensor(every).min() == -1 and to_tensor(every).max() == 1


def test_image_folder_classes_crop_and_flip(tmp_path):
    for name, colour in (("b_dog", (0, 0, 255)), ("a_cat", (255, 0, 0))):
        (tmp_path / name).mkdir()
        img = np.zeros((40, 60, 3), np.uint8)
        img[:] = colour
        img[:, :30] = 255                                                  # left half white
        Image.fromarray(img).save(tmp_path / name / "x.png")
    ds = ImageFolderDataset(str(tmp_path), size=20)
    assert ds.class_names == ["a_cat", "b_dog"] and ds.labels.tolist() == [0, 1]
    x, y = ds[0]
    assert x.shape == (3, 20, 20) and y == 0
    assert x[:, :, 0].min() > 0.9 and x[0, :, -1].max() > 0.9 and x[1, :, -1].max() < -0.9  # white left, red right
    xf, _ = ds[1]
    assert torch.equal(xf, x.flip(-1))


def test_center_crop_arr_matches_adm_recipe():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    out = center_crop_arr(img, 64)
    # by hand: 300x500 -> BOX halve to 150x250 (short side 150 >= 128) -> 75x125 stops; BICUBIC to 64 x 107; crop
    ref = img.resize((250, 150), Image.BOX).resize((125, 75), Image.BOX).resize((107, 64), Image.BICUBIC)
    ref = np.asarray(ref)[:, (107 - 64) // 2:(107 - 64) // 2 + 64]
    assert out.shape == (64, 64, 3) and np.array_equal(out, ref)


@pytest.mark.parametrize("world", [2, 4])
def test_step_sampler_splits_the_global_batch(world):
    n, B = 50, 8
    single = data.StepSampler(n, B, 0, 1, seed=1, start_step=0, total_steps=20)
    ranks = [data.StepSampler(n, B, r, world, seed=1, start_step=0, total_steps=20) for r in range(world)]
    for step, keys in enumerate(single):
        assert keys == sum((r.keys(step) for r in ranks), [])
    # every epoch visits every item exactly once
    stream = [k >> 1 for s in range(0, 25) for k in single.keys(s)][: 4 * n]
    for e in range(4):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    resumed = data.StepSampler(n, B, 0, 1, seed=1, start_step=7, total_steps=20)
    assert next(iter(resumed)) == single.keys(7)
    flips = [k & 1 for s in range(20) for k in single.keys(s)]
    assert 0.3 < np.mean(flips) < 0.7


def test_apply_corruption_flips_and_writes_manifest(tmp_path):
    import corrupt
    ds = data.BuiltinShapes(size=8, length=1000)
    clean = ds.labels.copy()
    idx = data.apply_corruption(ds, 0.05, seed=0, manifest_path=str(tmp_path / "m.json"))
    assert len(idx) == 50 and (ds.labels != clean).sum() == 50 and np.all(ds.labels[idx] != clean[idx])
    assert ds[2 * int(idx[0])][1] == ds.labels[idx[0]]                    # items carry the corrupted label
    m = corrupt.load_manifest(str(tmp_path / "m.json"))
    assert m["indices"] == sorted(int(i) for i in idx)


def test_preview_cli(tmp_path, capsys):
    assert preview.main(["--out", str(tmp_path / "p.png"), "--per-class", "2"]) == 0
    assert Image.open(tmp_path / "p.png").size[0] > 64
    assert preview.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "q.png")]) == 2
    assert "not found" in capsys.readouterr().err
