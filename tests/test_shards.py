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


def write_shard(path, n=5):
    """One shard of n items (key.png + key.cls), as tarfile writes it (padded to a 10240-byte record); returns the
    byte offsets of its member headers."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            _add(tar, f"{i:05d}.png", _png())
            _add(tar, f"{i:05d}.cls", str(i % 3).encode())
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


@pytest.mark.parametrize("damage, found", [("truncated at a member header", "without tar's end-of-archive blocks"),
                                           ("garbled header", "but data follows at byte"),
                                           ("zeroed header", "but data follows at byte")])
def test_damaged_shards_are_refused_in_one_line(tmp_path, capsys, damage, found):
    """tarfile reads these as a shorter archive (3, 2 and 2 of the 5 items, silently); indexing refuses them."""
    (tmp_path / "wds").mkdir()
    path = tmp_path / "wds" / "00000.tar"
    headers = write_shard(path)
    raw = bytearray(path.read_bytes())
    h = headers[6]                                           # the header of the 4th item's image
    if damage == "truncated at a member header":
        raw = raw[:h]
    elif damage == "garbled header":
        raw[h:h + 100] = b"x" * 100                          # its name field: the checksum no longer matches
    else:
        raw[h:h + 512] = bytes(512)                          # a zero block, as tar's end marker looks
    path.write_bytes(bytes(raw))
    with tarfile.open(path) as tar:                          # what tarfile alone makes of it
        assert len([m for m in tar if m.name.endswith(".png")]) == 3
    with pytest.raises(ValueError, match=found) as e:
        data.build_dataset(str(tmp_path / "wds"), 8)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and str(path) in message and "00002.cls" in message
    assert not [f for f in os.listdir(tmp_path / "wds") if f.startswith("nanocep_shards_")]     # no index stored
    expect_one_line_error(capsys, train_dit.main, "train_dit.py", ["--data", str(tmp_path / "wds")], "00000.tar")


def test_good_shards_index_every_item_with_or_without_record_padding(tmp_path):
    """tarfile pads an archive to a 10240-byte record; a writer that stops after the two zero blocks is fine too."""
    (tmp_path / "a").mkdir()
    write_shard(tmp_path / "a" / "0.tar")
    raw = (tmp_path / "a" / "0.tar").read_bytes()
    assert len(raw) % 10240 == 0 and len(raw) - len(raw.rstrip(b"\0")) > 1024        # padded past the two blocks
    assert len(shards.index_shard(str(tmp_path / "a" / "0.tar"), 0)) == 5
    (tmp_path / "b").mkdir()
    with tarfile.open(tmp_path / "a" / "0.tar") as tar:
        end = tar.getmembers()[-1].offset_data + 512                                 # each member's data is < 512 B
    (tmp_path / "b" / "0.tar").write_bytes(raw[:end + 1024])                          # exactly two zero blocks
    ds = data.build_dataset(str(tmp_path / "b"), 8)
    assert len(ds) == 5 and ds.labels.tolist() == [0, 1, 2, 0, 1]


def test_an_undecodable_image_names_its_shard_and_member(tmp_path):
    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "0.tar", "w") as tar:
        _add(tar, "00000.jpg", b"these bytes are no image")
        _add(tar, "00000.cls", b"0")
    ds = data.build_dataset(str(tmp_path / "wds"), 8)
    with pytest.raises(ValueError) as e:
        ds[0]
    assert str(e.value) == f"cannot read image {tmp_path / 'wds' / '0.tar'}:00000.jpg: not an image format PIL can read"
