"""
scikit-learn's bundled UCI optical digits as a nanoCEP dataset (`--data digits`): 1797 real handwritten digits, 8x8,
17 grey levels (0..16), 10 classes, shipped inside the scikit-learn wheel, so no download.

    python train_dit.py --data digits --image-size 8 --items-per-class 2 ...
    python -m tools.preview --data digits --image-size 8 --out digits.png

Items follow the protocol of data.py's docstring: uint8 RGB (grey replicated), grey level v scaled to round(v * 255 / 16)
exactly (8 -> 128), at 8 px as stored; other sizes through the same ADM centre-crop resize as the torchvision sets.

The 1797 images are split once, by index and not by any seed, into three disjoint parts, stratified per class: the
items of each class, in index order, go to the parts in turn (its 1st, 4th, 7th, ... item to the pool, 2nd, 5th, ...
to the judge, 3rd, 6th, ... to fresh), so every part holds a third of every class:
    pool   602 images (58..61 per class)  what training sees: --data digits is this part; --items-per-class k draws
                                          k per class from it by the seed
    judge  599 images (58..61 per class)  the judge's training images (python -m scoring.judge build --data digits)
    fresh  596 images (58..61 per class)  fresh real images: the judge's reference and held-out check, and the
                                          chance level of the nearest-item distance (evaluate.py --train-ref auto)
Nothing to run here; data.build_dataset picks the reader.
"""
import functools

import numpy as np
import torch
from PIL import Image

from sources.folders import as_item, center_crop_arr, flip_key

PARTS = ("pool", "judge", "fresh")      # a class's items go to these in turn, in index order
NATIVE_SIZE = 8
LEVELS = np.array([round(v * 255 / 16) for v in range(17)], dtype=np.uint8)     # grey level 0..16 -> 0..255


@functools.lru_cache(maxsize=1)
def load() -> tuple[np.ndarray, np.ndarray]:
    """(grey levels uint8 (1797, 8, 8) in 0..16, labels int64 (1797,)) of sklearn.datasets.load_digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("--data digits needs scikit-learn (pip install scikit-learn)") from None
    digits = load_digits()
    return digits.images.astype(np.uint8), digits.target.astype(np.int64)


def split(labels: np.ndarray) -> np.ndarray:
    """(N,) part number (index into PARTS) of every image: a class's items in index order go to the parts in turn."""
    labels = np.asarray(labels)
    part = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)                  # ascending: index order
        part[members] = np.arange(len(members)) % len(PARTS)
    return part


def part_indices(part: str) -> np.ndarray:
    """Sorted load_digits indices of one part (pool, judge or fresh)."""
    if part not in PARTS:
        raise ValueError(f"digits part must be one of {', '.join(PARTS)}, got {part!r}")
    return np.flatnonzero(split(load()[1]) == PARTS.index(part))


class DigitsDataset(torch.utils.data.Dataset):
    """One part of the digits (PARTS) at `size` px, RGB, flip chosen by the key; source_ids: its load_digits indices."""

    def __init__(self, size: int = NATIVE_SIZE, part: str = "pool"):
        if size < NATIVE_SIZE:
            raise ValueError(f"--data digits: image size must be >= {NATIVE_SIZE}, got {size}")
        grey, labels = load()
        self.part, self.source_ids = part, part_indices(part)
        self.images = np.repeat(LEVELS[grey[self.source_ids]][..., None], 3, axis=-1)     # (N, 8, 8, 3) uint8
        self.labels = labels[self.source_ids].copy()
        self.name, self.image_size, self.channels, self.captions = "digits", size, 3, None
        self.class_names = [str(c) for c in range(10)]
        self.num_classes = len(self.class_names)

    def __len__(self):
        return len(self.labels)

    def render(self, index: int) -> np.ndarray:
        """Item `index` as uint8 (size, size, 3): as stored at 8 px, else the torchvision sets' ADM centre crop."""
        img = self.images[index]
        return img if self.image_size == NATIVE_SIZE else center_crop_arr(Image.fromarray(img), self.image_size)

    def render_all(self) -> np.ndarray:
        """Every item, unflipped, as uint8 (N, size, size, 3)."""
        return self.images if self.image_size == NATIVE_SIZE else np.stack([self.render(i) for i in range(len(self))])

    def __getitem__(self, key: int):
        index, flip = flip_key(int(key))
        return as_item(self.render(index), flip, self.labels[index])
