"""WebDataset shards (sources/shards.py): indexed once, item i read at random equals the image it was made from,
captions from .txt / .json and labels from .cls, the index checked against the shards' sizes, a read-only folder,
bad shards in one line, and train_dit.py --cond text on two shards resuming bit-identically. Shards made offline."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train_dit
from conftest import check_resume_is_bit_identical, expect_one_line_error
from sources import shards


def _add(tar, name, raw: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


def write_shards(folder, n=24, per_shard=12, json_captions_from=1):
    """Built-in 8px items as img2dataset would write them: key.png + key.txt (first shard) or key.json (the rest),
    key.cls, and a stray key.parquet-like member; returns the built-in dataset they came from."""
    ds = data.BuiltinShapes(size=8, length=n, seed=0)
    os.makedirs(folder, exist_ok=True)
    for s in range(0, n // per_shard):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                key = f"{i:09d}"
                png = io.BytesIO()
                Image.fromarray(ds.render(i)).save(png, format="PNG")
                _add(tar, key + ".png", png.getvalue())
                if s < json_captions_from:
                    _add(tar, key + ".txt", ds.captions[i].encode())
                else:
                    _add(tar, key + ".json", json.dumps({"caption": ds.captions[i], "key": key}).encode())
                _add(tar, key + ".cls", str(int(ds.labels[i])).encode())
    return ds


def test_items_equal_their_source_images_captions_and_labels(tmp_path):
    ref = write_shards(tmp_path / "wds")
    ds = data.build_dataset(str(tmp_path / "wds"), 8)
    assert isinstance(ds, shards.ShardDataset) and len(ds) == 24 and ds.num_classes == 10
    assert ds.captions == list(ref.captions) and ds.labels.tolist() == ref.labels.tolist()
    for key in (0, 1, 2 * 13, 2 * 23 + 1):                     # both shards, with and without flip, any order
        assert torch.equal(ds[key][0], ref[key][0]) and ds[key][1] == ref[key][1]
    index_files = [f for f in os.listdir(tmp_path / "wds") if f.startswith("nanocep_shards_")]
    assert index_files and ds.index_file == str(tmp_path / "wds" / index_files[0])
    braces = data.build_dataset(str(tmp_path / "wds" / "{00000..00001}.tar"), 8, captions=True)
    assert braces.captions == ds.captions and torch.equal(braces[7][0], ds[7][0])
    assert shards.expand_braces("a/{0..2}_{x,y}.tar") == [f"a/{i}_{c}.tar" for i in range(3) for c in "xy"]


def test_index_is_reused_and_checked_against_shard_sizes(tmp_path, monkeypatch, capsys):
    write_shards(tmp_path / "wds")
    data.build_dataset(str(tmp_path / "wds"), 8)
    real = shards.index_shard
    monkeypatch.setattr(shards, "index_shard", lambda *a: pytest.fail("re-indexed an unchanged shard"))
    assert len(data.build_dataset(str(tmp_path / "wds"), 8)) == 24                # the stored index, no scan
    with tarfile.open(tmp_path / "wds" / "00001.tar", "a") as tar:                # the shard grows by one item
        _add(tar, "extra.png", _png())
        _add(tar, "extra.txt", b"one more")
        _add(tar, "extra.cls", b"3")
    monkeypatch.setattr(shards, "index_shard", real)
    ds = data.build_dataset(str(tmp_path / "wds"), 8)
    assert len(ds) == 25 and ds.captions[-1] == "one more" and "does not match" in capsys.readouterr().err


def _png():
    out = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_read_only_shard_folder_indexes_into_the_cache(tmp_path, monkeypatch, capsys):
    write_shards(tmp_path / "wds")
    monkeypatch.setenv("NANOCEP_CACHE", str(tmp_path / "cache"))
    write = shards._write_json

    def read_only(obj, path):                                  # root ignores chmod, so refuse as the OS would
        if str(tmp_path / "wds") in path:
            raise PermissionError(13, "Read-only file system", path)
        write(obj, path)
    monkeypatch.setattr(shards, "_write_json", read_only)
    ds = data.build_dataset(str(tmp_path / "wds"), 8)
    assert ds.index_file.startswith(str(tmp_path / "cache" / "shards")) and len(ds) == 24
    assert not [f for f in os.listdir(tmp_path / "wds") if f.startswith("nanocep_shards_")]
    monkeypatch.setenv("NANOCEP_CACHE", "/proc/no-cache-here")                  # and no writable cache either
    ds = data.build_dataset(str(tmp_path / "wds"), 8)
    assert ds.index_file is None and len(ds) == 24
    assert "kept in memory" in capsys.readouterr().err


def test_bad_shards_are_one_line_errors(tmp_path, capsys):
    write_shards(tmp_path / "wds")
    with tarfile.open(tmp_path / "wds" / "00001.tar", "a") as tar:     # an item without a caption among captioned ones
        _add(tar, "nocap.png", _png())
        _add(tar, "nocap.cls", b"1")
    with pytest.raises(ValueError, match="nocap has no caption"):
        data.build_dataset(str(tmp_path / "wds"), 8)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "0.tar.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="uncompressed"):
        data.build_dataset(str(tmp_path / "gz" / "{0,1}.tar.gz"), 8)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(ValueError, match="cannot read shard"):
        data.build_dataset(str(tmp_path / "junk.tar"), 8)
    expect_one_line_error(capsys, train_dit.main, "train_dit.py",
                          ["--cond", "text", "--data", str(tmp_path / "wds" / "{00000..00002}.tar")], "00002.tar")


def test_train_text_on_two_shards_resumes_bit_identically(tmp_path):
    write_shards(tmp_path / "wds", n=32, per_shard=16)
    flags = ["--cond", "text", "--data", str(tmp_path / "wds"), "--text-width", "32", "--text-depth", "1",
             "--text-heads", "2", "--context-length", "64", "--corrupt", "0.25", "--cep", "uniform"]
    b = check_resume_is_bit_identical(train_dit.main, tmp_path, *flags)      # on conftest.TINY's flags
    assert b["config"]["corrupt_type"] == "swap"
    with open(tmp_path / "straight" / "corruption.json") as f:
        assert json.load(f)["num_corrupted"] == 8                         # 25 % of 32 captions swapped
