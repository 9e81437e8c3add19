"""
Datasets for nanoCEP: the built-in procedural dataset, ImageNet-style image folders, captioned images, static
condition corruption (labels and captions, through corrupt.py), the step-indexed sampler that makes training
resumable and identical on 1 or N processes, and the per-step views of a global batch's items that keep random
corruption and --cep-subset identical on 1 or N processes too.

    python data.py preview --out builtin.png          # a grid of the built-in dataset, one row per class
    python data.py preview --data /path/to/imagenet/train --out folder.png
    python data.py preview --data /path/to/cc3m --captions --out cc3m.png      # img2dataset folder (or a .tsv table)

Every dataset here speaks one protocol, which is all the trainer relies on:
    len(ds)                  number of items
    ds[key]                  (image (C, H, W) float32 in [-1, 1], label int); key = 2 * index + flip, flip in {0, 1}
    ds.labels                (N,) int64 numpy array, the labels *as trained on* (after any static corruption)
    ds.captions              list of N strings or None
    ds.num_classes, ds.class_names, ds.image_size, ds.channels     (captioned-only data: 0 classes, labels all 0)
For text conditioning, TokenizedCaptions(ds, tokenizer, L) is a view whose items are (image, token ids (L,) int64).
The horizontal flip is part of the key (chosen by StepSampler from the run's seed and the sample position), so the
flip a sample gets is a function of (seed, step), never of a worker's random state: resume and DDP stay exact.
"""
import math
import os
import re
import sys

import numpy as np
import torch
from PIL import Image

from common import ArgParser

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def flip_key(key: int) -> tuple[int, bool]:
    """Split a dataset key into (index, horizontal flip)."""
    return key >> 1, bool(key & 1)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> float32 (C, H, W) in [-1, 1] (a PIL-backed array may be read-only, so the first op copies)."""
    return torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1).div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------------------------------------------------
# The built-in dataset: coloured shapes drawn procedurally, no files, no download

BUILTIN_COLOURS = {  # name -> RGB; far apart in hue so colour alone already separates five classes
    "red": (225, 45, 40), "green": (40, 200, 70), "blue": (50, 100, 235), "yellow": (235, 215, 45),
    "magenta": (215, 60, 205),
}
BUILTIN_SHAPES = ("disc", "cross")  # different topology: a disc is a blob, a cross has four thin arms


class BuiltinShapes(torch.utils.data.Dataset):
    """Coloured discs and crosses on dark backgrounds: 10 classes = 2 shapes x 5 colours, with captions.

    Item i is a pure function of (i, seed): class i % 10 (so classes are balanced), and random size, position,
    rotation, brightness and background drawn from numpy's PCG64 seeded with (seed, i). Rendering is 4x supersampled
    for anti-aliased edges. A 16x16 image costs ~0.1 ms, so items are drawn on the fly.
    """

    def __init__(self, size: int = 16, length: int = 100_000, seed: int = 0):
        if size < 8:
            raise ValueError(f"built-in image size must be >= 8, got {size}")
        self.image_size, self.channels, self.seed, self.length = size, 3, seed, length
        self.class_names = [f"{c} {s}" for s in BUILTIN_SHAPES for c in BUILTIN_COLOURS]
        self.num_classes = len(self.class_names)
        self.labels = np.arange(length, dtype=np.int64) % self.num_classes
        self.captions = _LazyCaptions(self)  # a caption is drawn only when asked for (100K captions take ~5 s)
        ss = 4 * size  # supersampled grid, pixel centres in [-1, 1]
        g = (np.arange(ss) + 0.5) / ss * 2 - 1
        self._gy, self._gx = np.meshgrid(g, g, indexing="ij")  # (ss, ss)

    def __len__(self):
        return self.length

    def _attributes(self, index: int):
        """Draw the attributes of item `index` and the caption that describes them."""
        rng = np.random.default_rng([self.seed, index])
        label = index % self.num_classes
        shape = BUILTIN_SHAPES[label // len(BUILTIN_COLOURS)]
        colour = list(BUILTIN_COLOURS)[label % len(BUILTIN_COLOURS)]
        radius = rng.uniform(0.35, 0.7)                      # half-extent, in units of the half image
        cx, cy = rng.uniform(-1 + radius, 1 - radius, size=2) * 0.9
        attrs = dict(label=label, shape=shape, colour=colour, radius=radius, cx=cx, cy=cy,
                     angle=rng.uniform(0, np.pi / 2), gain=rng.uniform(0.75, 1.0),
                     bg=rng.uniform(0, 70, size=3), bg_slope=rng.uniform(-25, 25))
        size_word = "small" if radius < 0.47 else ("large" if radius > 0.58 else "medium")
        where = ("top" if cy < -0.2 else "bottom" if cy > 0.2 else "middle") + \
                (" left" if cx < -0.2 else " right" if cx > 0.2 else "")
        caption = f"a {size_word} {colour} {shape} at the {where.strip()} of a dark background"
        return attrs, caption

    def render(self, index: int) -> np.ndarray:
        """Item `index` as uint8 (H, W, 3)."""
        a, _ = self._attributes(index)
        c, s = np.cos(a["angle"]), np.sin(a["angle"])
        u = (self._gx - a["cx"]) * c + (self._gy - a["cy"]) * s    # rotated coordinates around the centre
        v = -(self._gx - a["cx"]) * s + (self._gy - a["cy"]) * c
        r = a["radius"]
        if a["shape"] == "disc":
            inside = u ** 2 + v ** 2 <= r ** 2
        else:  # a plus sign whose arms are 0.36 r thick
            arm = 0.36 * r
            inside = ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))
        n = self.image_size
        cover = inside.reshape(n, 4, n, 4).mean(axis=(1, 3))[..., None]       # (H, W, 1) anti-aliased coverage
        bg = a["bg"] + a["bg_slope"] * np.linspace(-1, 1, n)[:, None, None]    # (H, 1, 3) vertical gradient
        fg = np.array(BUILTIN_COLOURS[a["colour"]], dtype=np.float64) * a["gain"]
        img = cover * fg + (1 - cover) * bg
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def __getitem__(self, key: int):
        index, flip = flip_key(int(key))
        img = self.render(index)
        if flip:
            img = img[:, ::-1]
        return to_tensor(np.ascontiguousarray(img)), int(self.labels[index])


class _LazyCaptions:
    """A read-only sequence of the built-in captions, computed on access."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.ds._attributes(i % len(self))[1]


# ----------------------------------------------------------------------------------------------------------------------
# ImageNet-layout folders: root/<class folder>/<image>, class index = sorted folder order

def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop: halve with BOX while the short side >= 2*size, BICUBIC to short side = size, crop the centre."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images in class sub-folders (ImageNet layout), ADM center crop to `size`, flip chosen by the key."""

    def __init__(self, root: str, size: int = 256):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder not found: {root}")
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        files, labels = [], []
        for label, name in enumerate(classes):
            for dirpath, _, names in sorted(os.walk(os.path.join(root, name))):
                for f in sorted(names):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        files.append(os.path.join(dirpath, f))
                        labels.append(label)
        if not files:
            raise ValueError(f"no images found in {root} (expected {root}/<class>/<image>.jpg|png|...)")
        self.root, self.files, self.image_size, self.channels = root, files, size, 3
        self.class_names, self.num_classes = classes, len(classes)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.captions = None

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key: int):
        index, flip = flip_key(int(key))
        path = self.files[index]
        try:
            with Image.open(path) as im:
                arr = center_crop_arr(im.convert("RGB"), self.image_size)
        except Exception as e:  # PIL raises many types; the user needs the file name, not the type
            raise ValueError(f"cannot read image {path}: {e}") from None
        if flip:
            arr = arr[:, ::-1]
        return to_tensor(np.ascontiguousarray(arr)), int(self.labels[index])


# ----------------------------------------------------------------------------------------------------------------------
# Captioned images: img2dataset folders (<shard>/<key>.jpg + <key>.txt) and path<TAB>caption tables

TABLE_EXTENSIONS = (".tsv", ".csv")


def _clean_caption(text: str) -> str:
    """One line of text: line breaks and runs of whitespace become single spaces."""
    return " ".join(text.split())


def read_caption_folder(root: str) -> tuple[list[str], list[str]]:
    """Every image under root (any depth, sorted) and the caption in the .txt file of the same stem beside it."""
    files, captions = [], []
    for dirpath, dirnames, names in os.walk(root):
        dirnames.sort()
        for f in sorted(names):
            if not f.lower().endswith(IMAGE_EXTENSIONS):
                continue
            image = os.path.join(dirpath, f)
            txt = os.path.splitext(image)[0] + ".txt"
            if not os.path.isfile(txt):
                raise ValueError(f"no caption for {image} (expected {os.path.basename(txt)} beside it)")
            try:
                with open(txt, encoding="utf-8") as fh:
                    caption = _clean_caption(fh.read())
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"cannot read caption {txt}: {e}") from None
            if not caption:
                raise ValueError(f"empty caption in {txt}")
            files.append(image)
            captions.append(caption)
    return files, captions


def read_caption_table(path: str) -> tuple[list[str], list[str]]:
    """A .tsv (tab) or .csv (comma) table of `path, caption` rows; relative paths are relative to the table's folder.

    A first row whose path does not end in an image extension is taken as a header and skipped; extra columns are
    ignored. Every image must exist and every caption be non-empty.
    """
    import csv
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    base = os.path.dirname(os.path.abspath(path))
    files, captions = [], []
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            for lineno, row in enumerate(csv.reader(fh, delimiter=delimiter), 1):
                if not row or not any(c.strip() for c in row):
                    continue
                if lineno == 1 and not row[0].strip().lower().endswith(IMAGE_EXTENSIONS):
                    continue                                            # header
                if len(row) < 2:
                    raise ValueError(f"{path} line {lineno}: expected 'path{'<TAB>' if delimiter == chr(9) else ','}"
                                     f"caption', got {delimiter.join(row)[:80]!r}")
                image = os.path.join(base, row[0].strip())
                caption = _clean_caption(row[1])
                if not os.path.isfile(image):
                    raise ValueError(f"{path} line {lineno}: image not found: {image}")
                if not caption:
                    raise ValueError(f"{path} line {lineno}: empty caption for {row[0].strip()}")
                files.append(image)
                captions.append(caption)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read caption table {path}: {e}") from None
    return files, captions


class CaptionedImages(ImageFolderDataset):
    """Images with one caption each, from a caption folder or a table; ADM center crop, flip chosen by the key.

    There are no classes: labels are all 0 and num_classes is 0, so only --cond text can train on it. All captions are
    read when the dataset is built (caption corruption and the error checks need them; ~1 min for 3M files).
    """

    def __init__(self, source: str, size: int = 256):
        if not os.path.exists(source):
            raise FileNotFoundError(f"data not found: {source}")
        if os.path.isdir(source):
            files, captions = read_caption_folder(source)
        elif source.lower().endswith(TABLE_EXTENSIONS):
            files, captions = read_caption_table(source)
        else:
            raise ValueError(f"captioned data must be a folder or a .tsv/.csv table, got {source}")
        if not files:
            raise ValueError(f"no captioned images found in {source} (expected <image>.jpg|png + <image>.txt, "
                             f"or 'path<TAB>caption' rows)")
        self.root, self.files, self.captions = source, files, captions
        self.image_size, self.channels = size, 3
        self.class_names, self.num_classes = [], 0
        self.labels = np.zeros(len(files), dtype=np.int64)


def build_dataset(data: str, image_size: int, seed: int = 0, builtin_length: int = 100_000, captions: bool = False):
    """'builtin', a folder or a caption table -> a dataset following the protocol in this file's docstring.

    captions=False reads a folder as ImageNet class folders; captions=True as images with same-stem .txt captions.
    """
    if data == "builtin":
        return BuiltinShapes(size=image_size, length=builtin_length, seed=seed)
    if captions or data.lower().endswith(TABLE_EXTENSIONS):
        return CaptionedImages(data, size=image_size)
    return ImageFolderDataset(data, size=image_size)


# ----------------------------------------------------------------------------------------------------------------------
# Static condition corruption (applied once, when the dataset is built; paper §2.1)

def apply_corruption(dataset, ratio: float, kind: str = "symmetric", seed: int = 0, classes=None,
                     manifest_path: str | None = None) -> np.ndarray:
    """Flip round(ratio * N) labels of `dataset` in place (corrupt.py), write the manifest, return the flipped indices."""
    import corrupt  # standalone file; imported lazily so data.py stays importable on its own
    new_labels, idx = corrupt.corrupt_labels(dataset.labels, ratio, num_classes=dataset.num_classes, kind=kind,
                                             classes=classes, seed=seed)
    if manifest_path is not None:
        manifest = corrupt.make_manifest(kind, ratio, seed, dataset.labels, new_labels, idx,
                                         num_classes=dataset.num_classes, classes=classes)
        corrupt.save_manifest(manifest_path, manifest)
    dataset.labels = np.asarray(new_labels, dtype=np.int64)
    return idx


def apply_caption_corruption(dataset, ratio: float, kind: str = "swap", seed: int = 0, rewrites: str | None = None,
                             manifest_path: str | None = None) -> np.ndarray:
    """Corrupt round(ratio * N) captions of `dataset` in place (corrupt.py), write the manifest, return the indices.

    swap:    swap captions between random pairs (the paper's CC3M default, corrupt.swap_captions).
    rewrite: replace captions by the user's rewrites, a JSON file {index: caption} (e.g. made with an LLM, as the
             paper's GPT-4 rewrites); round(ratio * N) of its entries are drawn with `seed` (corrupt.sample_rewrites),
             or all of them when ratio is 0.
    Lazy captions (the built-in dataset's) are materialised once, here.
    """
    import corrupt
    captions = list(dataset.captions)                          # (N,) strings; 100K built-in captions take ~5 s
    if kind == "swap":
        new, idx = corrupt.swap_captions(captions, ratio, seed=seed)
        recorded_ratio, recorded_seed = ratio, seed
    elif kind == "rewrite":
        if not rewrites:
            raise ValueError("--corrupt-type rewrite needs --corrupt-rewrites FILE.json ({index: caption})")
        table = corrupt.sample_rewrites(corrupt.load_rewrites(rewrites), ratio, len(captions), seed)
        new, idx = corrupt.rewrite_captions(captions, table)
        if any(not _clean_caption(c) for c in new):
            raise ValueError(f"rewrites file {rewrites} holds an empty caption")
        recorded_ratio, recorded_seed = len(idx) / len(captions), (seed if ratio > 0 else None)
    else:
        raise ValueError(f"unknown caption corruption {kind!r} (expected 'swap' or 'rewrite')")
    if manifest_path is not None:
        corrupt.save_manifest(manifest_path, corrupt.make_manifest(kind, recorded_ratio, recorded_seed, captions, new,
                                                                   idx, **({"rewrites": rewrites} if rewrites else {})))
    dataset.captions = new
    return idx


def corrupt_dataset(dataset, ratio: float, kind: str, seed: int = 0, classes: str = "", rewrites: str = "",
                    manifest_path: str | None = None) -> np.ndarray:
    """The static corruption a run asks for (flags --corrupt, --corrupt-type, --corrupt-classes, --corrupt-rewrites):
    label kinds flip labels, caption kinds corrupt captions; returns the corrupted indices."""
    if kind in ("swap", "rewrite"):
        return apply_caption_corruption(dataset, ratio, kind, seed=seed, rewrites=rewrites or None,
                                        manifest_path=manifest_path)
    class_ids = [int(c) for c in classes.split(",")] if classes else None
    return apply_corruption(dataset, ratio, kind, seed=seed, classes=class_ids, manifest_path=manifest_path)


# ----------------------------------------------------------------------------------------------------------------------
# Text conditions: a view of a captioned dataset whose items carry token ids instead of the label

_MIRROR = re.compile(r"\b(left|right)\b")


def mirror_caption(caption: str) -> str:
    """Swap the words 'left' and 'right', so a caption still describes its horizontally flipped image."""
    return _MIRROR.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)


class DatasetView(torch.utils.data.Dataset):
    """A view of a dataset that changes its items: every other attribute (len, labels, files, ...) is the wrapped one's."""

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # only called for attributes this view does not have
        if name == "dataset":     # not set yet (e.g. while unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class TokenizedCaptions(DatasetView):
    """ds[key] -> (image, token ids (L,) int64) of the caption of item key >> 1, tokenised on the fly (in the loader
    workers; microseconds). Every other attribute (len, captions, image_size, channels, ...) is the wrapped dataset's.

    With mirror=True a flipped item gets the mirrored caption (mirror_caption): the built-in captions say where the
    shape is, and a flip would otherwise move it to the other side of its caption.
    """

    def __init__(self, dataset, tokenize, context_length: int, mirror: bool = False):
        if getattr(dataset, "captions", None) is None:
            raise ValueError("this dataset has no captions; text conditioning needs captioned data")
        self.dataset, self.tokenize, self.context_length, self.mirror = dataset, tokenize, context_length, mirror

    def __getitem__(self, key: int):
        index, flip = flip_key(int(key))
        x, _ = self.dataset[key]
        caption = self.dataset.captions[index]
        if flip and self.mirror:
            caption = mirror_caption(caption)
        return x, self.tokenize([caption], self.context_length)[0]     # (C, H, W), (L,)


# ----------------------------------------------------------------------------------------------------------------------
# Control maps for ControlNet (models/controlnet.py): Canny edges of the item's image, or same-stem files made elsewhere

def canny(image: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    """uint8 (H, W, 3) -> Canny edges uint8 (H, W) in {0, 255}: OpenCV's cv2.Canny with hysteresis thresholds
    low / high on the 3x3 Sobel gradient, as the paper annotates IN-100 (100 / 200) and ControlNet's annotator does."""
    try:
        import cv2
    except ImportError:
        raise RuntimeError("Canny control maps need OpenCV: pip install opencv-python-headless") from None
    return cv2.Canny(np.ascontiguousarray(image), low, high)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (C, H, W) in [-1, 1] -> uint8 (H, W, C): the inverse of to_tensor (exact on its outputs)."""
    return ((x.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)


def control_tensor(arr: np.ndarray) -> torch.Tensor:
    """A control map uint8 (H, W) or (H, W, 3) -> float32 (3, H, W) in [0, 1] (edges: white on black, 3 channels)."""
    arr = np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()


class ControlMaps(DatasetView):
    """ds[key] -> (image, condition, control map (3, H, W) in [0, 1]) for item key >> 1, flipped with it.

    kind "canny": the Canny edges of the item's own image (computed in the loader workers; the image as trained on,
    so a flipped item gets flipped edges). kind "maps": the image of the same stem in maps_dir (any sub-folder; e.g.
    SAM segmentation colour maps), with the training images' ADM centre crop and the item's flip."""

    def __init__(self, dataset, kind: str, low: float = 100, high: float = 200, maps_dir: str = ""):
        if kind not in ("canny", "maps"):
            raise ValueError(f"unknown control {kind!r} (expected canny or maps)")
        self.dataset, self.kind, self.low, self.high = dataset, kind, low, high
        self.maps = None
        if kind == "maps":
            self.maps = self._same_stem_maps(dataset, maps_dir)

    @staticmethod
    def _same_stem_maps(dataset, maps_dir: str) -> list:
        """The map file of every item of `dataset` (by file stem), or a ValueError naming the first one missing."""
        if not os.path.isdir(maps_dir or ""):
            raise FileNotFoundError(f"control maps folder not found: {maps_dir!r}")
        files = getattr(dataset, "files", None)
        if files is None:
            raise ValueError("same-stem control maps need an image folder dataset (--data DIR), not the built-in one")
        by_stem = {os.path.splitext(f)[0]: os.path.join(d, f) for d, _, names in os.walk(maps_dir) for f in names
                   if f.lower().endswith(IMAGE_EXTENSIONS)}
        stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
        missing = [f for f, s in zip(files, stems) if s not in by_stem]
        if missing:
            raise ValueError(f"{len(missing)} images have no control map of the same stem in {maps_dir}, "
                             f"e.g. {missing[0]}")
        return [by_stem[s] for s in stems]

    def control(self, key: int, image: torch.Tensor) -> torch.Tensor:
        """The control map (3, H, W) of item key >> 1 whose (flipped) training image is `image` (C, H, W)."""
        if self.kind == "canny":
            return control_tensor(canny(to_uint8(image), self.low, self.high))
        index, flip = flip_key(int(key))
        try:
            with Image.open(self.maps[index]) as im:
                arr = center_crop_arr(im.convert("RGB"), self.image_size)
        except Exception as e:  # PIL raises many types; the user needs the file name
            raise ValueError(f"cannot read control map {self.maps[index]}: {e}") from None
        return control_tensor(np.ascontiguousarray(arr[:, ::-1] if flip else arr))

    def __getitem__(self, key: int):
        x, y = self.dataset[key]
        return x, y, self.control(key, x)


def grid_controls(dataset, count: int, labels=None) -> torch.Tensor:
    """Control maps (count, 3, H, W) for a sample grid, unflipped: for the j-th occurrence of class c in labels
    (count,), the control of the j-th item labelled c; without labels (text grids), those of the first items."""
    if labels is None:
        keys = [2 * (i % len(dataset)) for i in range(count)]
    else:
        seen, keys = {}, []
        for c in (int(v) for v in labels):
            items = np.flatnonzero(dataset.labels == c)
            keys.append(2 * int(items[seen.get(c, 0) % len(items)]))
            seen[c] = seen.get(c, 0) + 1
    return torch.stack([dataset[k][2] for k in keys])


# ----------------------------------------------------------------------------------------------------------------------
# The sampler: position p of the run's sample stream -> (epoch permutation, flip), independent of rank count

class StepSampler(torch.utils.data.Sampler):
    """Yields this rank's batch of dataset keys for each step in [start_step, total_steps).

    The run sees one infinite stream of samples: position p is item perm_e[p mod N] of epoch e = p // N, where perm_e
    is a permutation seeded by (seed, e), and its flip bit is drawn from the same seed. Step s owns positions
    [s*B, (s+1)*B) of the global batch B, and rank r of W owns the r-th contiguous B/W slice of it. So 1 process and
    W processes train on exactly the same samples, and resuming at step s needs nothing but s.
    """

    def __init__(self, length: int, global_batch: int, rank: int, world: int, seed: int, start_step: int,
                 total_steps: int, flip: bool = True):
        assert global_batch % world == 0, "global batch must be divisible by the number of processes"
        self.n, self.B, self.rank, self.world, self.seed = length, global_batch, rank, world, seed
        self.start, self.total, self.flip = start_step, total_steps, flip
        self._epoch, self._perm, self._flips = -1, None, None

    def _epoch_tables(self, epoch: int):
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g)
            self._flips = torch.randint(0, 2, (self.n,), generator=g) if self.flip else torch.zeros(self.n, dtype=torch.long)
            self._epoch = epoch
        return self._perm, self._flips

    def keys(self, step: int) -> list[int]:
        """Dataset keys of this rank's share of the global batch at `step`."""
        local = self.B // self.world
        first = step * self.B + self.rank * local
        out = []
        for p in range(first, first + local):
            perm, flips = self._epoch_tables(p // self.n)
            i = int(perm[p % self.n])
            out.append(2 * i + int(flips[p % self.n]))
        return out

    def __iter__(self):
        for step in range(self.start, self.total):
            yield self.keys(step)

    def __len__(self):
        return max(0, self.total - self.start)


# ----------------------------------------------------------------------------------------------------------------------
# Per-step views of the global batch's items (for draws that must not depend on the number of processes)

def batch_items(length: int, global_batch: int, seed: int, start_step: int, total_steps: int):
    """items(step) -> the dataset indices (B,) of the whole global batch at `step` (StepSampler's order, any rank)."""
    order = StepSampler(length, global_batch, 0, 1, seed, start_step, total_steps, flip=False)
    return lambda step: np.array([flip_key(k)[0] for k in order.keys(step)], dtype=np.int64)


def random_corruption(dataset, ratio: float, kind: str, classes: str, items):
    """labels(step, seed) -> the global batch's labels (B,) under --corrupt-mode random: its clean labels corrupted by
    corrupt.corrupt_batch with the static rule (dataset prior / asymmetric `classes` "1,5,9"), from a step's seed."""
    import corrupt
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)             # (K,) the dataset's prior
    class_ids = [int(c) for c in classes.split(",")] if classes else None

    def labels(step: int, seed: int) -> torch.Tensor:
        new, _ = corrupt.corrupt_batch(dataset.labels[items(step)], ratio, counts, kind, class_ids, rng=seed)
        return torch.as_tensor(new)
    return labels


def cep_subset_mask(num_items: int, fraction: float, seed: int) -> torch.Tensor:
    """(N,) bool: the fixed round(fraction * N) items that get CEP (--cep-subset), chosen once from the seed."""
    chosen = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + 0xCE9))
    mask = torch.zeros(num_items, dtype=torch.bool)
    mask[chosen[: int(round(fraction * num_items))]] = True
    return mask


# ----------------------------------------------------------------------------------------------------------------------
# CLI: look at a dataset

def save_grid(images: torch.Tensor, path: str, nrow: int) -> None:
    """Images (N, C, H, W) in [-1, 1] -> one PNG grid (pixels upscaled to at least 64 px per image for viewing)."""
    import torchvision.utils as vutils
    scale = max(1, math.ceil(64 / images.shape[-1]))
    images = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    vutils.save_image(images.clamp(-1, 1) * 0.5 + 0.5, path, nrow=nrow, padding=2)


def _preview(args) -> None:
    ds = build_dataset(args.data, args.image_size, seed=args.seed, captions=args.captions)
    per_class = args.per_class
    rows = []
    if ds.num_classes == 0:  # captioned images without classes: the first items, in rows of per_class
        rows = [ds[2 * i][0] for i in range(min(len(ds), per_class * args.max_classes))]
    for c in range(min(ds.num_classes, args.max_classes)):
        idx = np.flatnonzero(ds.labels == c)[:per_class]
        rows += [ds[2 * int(i)][0] for i in idx] + [torch.zeros(ds.channels, ds.image_size, ds.image_size)] * (per_class - len(idx))
    save_grid(torch.stack(rows), args.out, nrow=per_class)
    print(f"wrote {args.out}: {len(ds)} items, {ds.num_classes} classes ({', '.join(ds.class_names[:10])}"
          f"{', ...' if ds.num_classes > 10 else ''})")
    if ds.captions:
        print("captions, e.g.:", *ds.captions[:3], sep="\n  ")


def main(argv=None) -> int:
    p = ArgParser(prog="data.py", description="Look at a nanoCEP dataset.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pv = sub.add_parser("preview", help="save a grid of samples, one row per class")
    pv.add_argument("--data", default="builtin", help="'builtin', an ImageNet-layout folder, or captioned data")
    pv.add_argument("--captions", action="store_true", help="read a folder as images with same-stem .txt captions")
    pv.add_argument("--image-size", type=int, default=16)
    pv.add_argument("--per-class", type=int, default=8)
    pv.add_argument("--max-classes", type=int, default=16)
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("--out", default="preview.png")
    args = p.parse_args(argv)
    try:
        _preview(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
