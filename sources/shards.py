"""
WebDataset shards (.tar, the img2dataset output format) as a random-access dataset: every item is an image member
with same-key .txt / .json captions and/or a .cls label, e.g. 00000.tar holding 000000012.jpg, 000000012.txt,
000000012.json. --data takes a folder of shards, one shard, or a brace pattern:

    python train_dit.py --cond text --data /data/cc3m                             # every *.tar in the folder
    python train_dit.py --cond text --data '/data/cc3m/{00000..00099}.tar'        # the webdataset brace pattern
    python -m weights.latents --data /data/cc3m --captions --image-size 256 --vae kl-f8 --out cache/cc3m

Nothing to run here; data.build_dataset picks this reader for .tar data.

Why tarfile and not the `webdataset` library: webdataset streams shards front to back (its items come in shard order,
shuffled in a buffer), but nanoCEP's StepSampler asks for item i of a fixed permutation at every step, and static
corruption rewrites caption i before training: both need item i addressable. An uncompressed tar stores every member
contiguously, so the standard library's tarfile reads each header once, and after that an item is one seek + read at
its member's data offset. No extra dependency, no streaming state to checkpoint, exact resume for free.

The index: the first time a set of shards is read, every member header is scanned (seconds per GB: the data is
skipped, only captions and labels are read) and the result is written beside the shards as
nanocep_shards_<hash>.json (shard names, byte sizes and modification times, each item's shard / offset / size / key,
the captions and labels). Later runs load it and check every shard's size and time against it: a changed (or copied)
shard re-indexes. If the shards'
folder is read-only, the index goes to $NANOCEP_CACHE/shards/ (default ~/.cache/nanocep/shards/) instead; if that
fails too, the index is kept in memory only (rebuilt on every run, with a note).
Key convention (webdataset's): a member's key is its path up to the first dot of its file name, the rest is its
extension, so 000000012.jpg and 000000012.txt form one item. Compressed shards (.tar.gz) cannot be read at an offset
and are refused, and so is a damaged shard: tarfile takes a bad member header (or a file cut at a member boundary) for
the end of the archive, so indexing checks that only tar's end-of-archive zero blocks follow the last member.
With several processes (torchrun), each node's local rank 0 builds the index while the others wait, then they read it
(trainer.load_data, weights/latents.py: plumbing.common.local_rank0_first).
"""
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import tempfile

import numpy as np

from plumbing.common import cache_root
from sources.folders import IMAGE_EXTENSIONS, ImageFolderDataset, clean_caption

INDEX_FORMAT, INDEX_VERSION = "nanocep-shards", 2     # 2: damaged shards refused, each image member's extension
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE      # bytes: tar ends an archive with two zero blocks (then pads to a record)
IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def is_shard_source(data: str) -> bool:
    """Whether --data names WebDataset shards: a .tar file, a brace pattern, or a folder with .tar files at its top."""
    if data.lower().endswith(".tar") or ("{" in data and "}" in data):
        return True
    return os.path.isdir(data) and any(n.lower().endswith(".tar") for n in os.listdir(data))


def expand_braces(pattern: str) -> list[str]:
    """webdataset's brace notation: {00000..00099} is a zero-padded numeric range, {a,b,c} a list; several allowed."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[:m.start()], pattern[m.end():], m[1]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi, width = int(r[1]), int(r[2]), len(r[1])
        if hi < lo:
            raise ValueError(f"empty shard range {{{body}}} in {pattern}")
        parts = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        parts = body.split(",")
    return [p for part in parts for p in expand_braces(head + part + tail)]


def list_shards(data: str) -> list[str]:
    """The shard paths of --data (folder: its *.tar, sorted), each checked to exist and to be an uncompressed tar."""
    if os.path.isdir(data):
        shards = sorted(os.path.join(data, n) for n in os.listdir(data) if n.lower().endswith(".tar"))
    else:
        shards = expand_braces(data)
    if not shards:
        raise ValueError(f"no .tar shards in {data}")
    for path in shards:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard not found: {path}")
        if not path.lower().endswith(".tar"):
            raise ValueError(f"{path}: only uncompressed .tar shards can be read at random (not .tar.gz or others)")
    return shards


# ---- indexing: one pass over the member headers ----

def _split_key(name: str) -> tuple[str, str]:
    """'dir/000012.seg.jpg' -> ('dir/000012', 'seg.jpg'): the key ends at the first dot of the file name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem) if folder else stem, ext.lower()


def _member_caption(ext: str, raw: bytes, where: str) -> str | None:
    """The caption a .txt member holds, or the "caption" field of a .json member (img2dataset writes both)."""
    try:
        text = raw.decode("utf-8")
        if ext == "txt":
            return clean_caption(text)
        value = json.loads(text).get("caption")
        return clean_caption(value) if isinstance(value, str) else None
    except (UnicodeDecodeError, ValueError, AttributeError) as e:
        raise ValueError(f"cannot read {where}: {e}") from None


def index_shard(path: str, shard_id: int) -> list[dict]:
    """The items of one shard in member order: {shard, offset, size, key, ext, caption, label} (the last two may be
    None; ext: the image member's extension)."""
    items, texts, last = {}, {}, None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                last = m.name
                if not m.isfile():
                    continue
                key, ext = _split_key(m.name)
                if ext in IMAGE_EXTS:
                    items.setdefault(key, dict(shard=shard_id, offset=m.offset_data, size=m.size, key=key, ext=ext))
                elif ext in ("txt", "json", "cls"):
                    texts[(key, ext)] = tar.extractfile(m).read()
            check_end_of_archive(path, tar.offset, last)      # where tarfile stopped reading headers
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"cannot read shard {path}: {e}") from None
    for key, item in items.items():
        where = f"{path}:{key}"
        caption = None
        for ext in ("txt", "json"):
            if caption is None and (key, ext) in texts:
                caption = _member_caption(ext, texts[(key, ext)], f"{where}.{ext}")
        item["caption"] = caption
        cls = texts.get((key, "cls"))
        try:
            item["label"] = None if cls is None else int(cls.decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{where}.cls is not an integer class id: {cls[:40]!r}") from None
    return list(items.values())


def check_end_of_archive(path: str, end: int, last: str | None) -> None:
    """Refuse (ValueError, one line) a shard whose bytes from `end` (where tarfile stopped, after member `last`) are not
    tar's end of archive: zero bytes to the end of the file, at least two blocks of them. tarfile reads a damaged or
    zeroed member header, or a file cut exactly at a member header, as the end, and drops every item after it."""
    after = f"after member {last}" if last else "before its first member"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(end)
        pos = end
        while chunk := f.read(1 << 16):
            if rest := chunk.lstrip(b"\0"):
                found = pos + len(chunk) - len(rest)
                raise ValueError(f"cannot read shard {path}: its members stop at byte {end} {after} (a damaged or "
                                 f"zeroed member header), but data follows at byte {found} of {size}: those items "
                                 f"would be lost")
            pos += len(chunk)
    if size - end < END_OF_ARCHIVE:
        raise ValueError(f"cannot read shard {path}: it ends at byte {size} {after}, without tar's end-of-archive "
                         f"blocks (a truncated file)")


def build_index(shards: list[str]) -> dict:
    """Index every shard (the JSON-ready dict stored in the index file)."""
    items = [it for i, path in enumerate(shards) for it in index_shard(path, i)]
    if not items:
        raise ValueError(f"no images in the shards {shards[0]}{' ...' if len(shards) > 1 else ''} "
                         f"(expected members like 000012.jpg with 000012.txt / .json / .cls)")
    captions, labels = [it["caption"] for it in items], [it["label"] for it in items]
    for values, what in ((captions, "caption (.txt or .json)"), (labels, "label (.cls)")):
        have = [v is not None for v in values]
        if any(have) and not all(have):
            bad = items[have.index(False)]
            raise ValueError(f"{shards[bad['shard']]}:{bad['key']} has no {what}, but other items do")
    if any(c == "" for c in captions):
        bad = items[captions.index("")]
        raise ValueError(f"empty caption for {shards[bad['shard']]}:{bad['key']}")
    if labels[0] is not None and min(labels) < 0:
        raise ValueError(f"negative class id in the shards' .cls members ({min(labels)})")
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION,
            "shards": [_stamp(p) for p in shards],
            "shard": [it["shard"] for it in items], "offset": [it["offset"] for it in items],
            "size": [it["size"] for it in items], "key": [it["key"] for it in items],
            "ext": [it["ext"] for it in items],
            "captions": captions if captions[0] is not None else None,
            "labels": labels if labels[0] is not None else None}


# ---- the index file: beside the shards, else in the cache ----

def index_paths(shards: list[str]) -> list[str]:
    """Where the index of these shards may live, in the order tried: beside them, then the user cache."""
    absolute = [os.path.abspath(p) for p in shards]
    tag = hashlib.sha1("\n".join(absolute).encode()).hexdigest()[:12]
    cache = str(cache_root())
    return [os.path.join(os.path.commonpath([os.path.dirname(p) for p in absolute]), f"nanocep_shards_{tag}.json"),
            os.path.join(cache, "shards", f"nanocep_shards_{tag}.json")]


def _stamp(path: str) -> dict:
    """What identifies a shard's content cheaply: its name, byte size and modification time (a tar is padded to
    10 KiB records, so an appended member can leave the size unchanged; the time catches that)."""
    st = os.stat(path)
    return {"name": os.path.basename(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _valid(index, shards: list[str]) -> bool:
    """The index describes exactly these shards, with their current sizes and modification times."""
    return (isinstance(index, dict) and index.get("format") == INDEX_FORMAT and index.get("version") == INDEX_VERSION
            and index.get("shards") == [_stamp(p) for p in shards])


def _write_json(obj: dict, path: str) -> None:
    """Atomically: a temporary file in the same folder, then a rename (concurrent ranks write the same content)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_index_")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_index(shards: list[str]) -> tuple[dict, str | None]:
    """(index, the file it is stored in or None): a valid stored index, else a fresh one written where possible."""
    places = index_paths(shards)
    for path in places:
        try:
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, ValueError):
            continue
        if _valid(index, shards):
            return index, path
        why = ("sizes or times changed" if isinstance(index, dict) and index.get("version") == INDEX_VERSION
               else "an older format")
        print(f"note: shard index {path} does not match the shards ({why}): re-indexing", file=sys.stderr)
    index = build_index(shards)
    for path in places:
        try:
            _write_json(index, path)
            return index, path
        except OSError:
            continue
    print(f"note: cannot write a shard index beside the shards nor in {os.path.dirname(places[1])}: it is kept in "
          f"memory and rebuilt on every run", file=sys.stderr)
    return index, None


# ---- the dataset ----

class ShardDataset(ImageFolderDataset):
    """WebDataset shards through their index: item i is one seek + read in its shard, decoded as ImageFolderDataset
    decodes a file (ADM center crop, flip from the key). Labels from .cls (classes 0..max), captions from .txt/.json;
    shards without .cls have 0 classes (labels all 0: --cond text only), shards without captions have none."""

    def __init__(self, source: str, size: int = 256):
        self.shards = list_shards(source)
        index, self.index_file = load_index(self.shards)
        self.root, self.image_size, self.channels = source, size, 3
        self.item_shard = np.asarray(index["shard"], dtype=np.int32)       # (N,)
        self.item_offset = np.asarray(index["offset"], dtype=np.int64)     # (N,) byte offset of the image data
        self.item_size = np.asarray(index["size"], dtype=np.int64)         # (N,)
        self.keys, self.exts = index["key"], index["ext"]
        self.captions = index["captions"]
        labels = index["labels"]
        self.num_classes = 0 if labels is None else max(labels) + 1
        self.class_names = [str(c) for c in range(self.num_classes)]
        self.labels = np.asarray(labels if labels is not None else np.zeros(len(self.keys)), dtype=np.int64)

    def __len__(self):
        return len(self.keys)

    def image_file(self, index: int):
        """The image member's bytes (opened per read: no file offset shared between loader workers) and its name."""
        name = f"{self.shards[self.item_shard[index]]}:{self.keys[index]}.{self.exts[index]}"
        with open(self.shards[self.item_shard[index]], "rb") as f:
            f.seek(int(self.item_offset[index]))
            raw = f.read(int(self.item_size[index]))
        if len(raw) != self.item_size[index]:
            raise ValueError(f"cannot read image {name}: shard truncated (re-index by deleting {self.index_file})")
        return io.BytesIO(raw), name
