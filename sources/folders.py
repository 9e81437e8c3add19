"""
Image folders, the ImageNet layout (root/<class folder>/<image>, class index = sorted folder order, or a class index
file's order: a subset such as IN-100 then keeps its IN-1K labels), and the item protocol every nanoCEP dataset speaks
(data.py's docstring lists it): ds[key] with key = 2 * index + flip.

Nothing to run here; data.build_dataset picks the reader. `python -m tools.preview --data DIR` shows a folder.
"""
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def flip_key(key: int) -> tuple[int, bool]:
    """Split a dataset key into (index, horizontal flip)."""
    return key >> 1, bool(key & 1)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, C) -> float32 (..., C, H, W) in [-1, 1] (a PIL-backed array may be read-only, so the first op
    copies). The arithmetic is numpy's, which stays on the calling thread: torch would split a batch's worth of pixels
    over its OpenMP threads, whose start and spin-wait cost more than the work in the main process."""
    x = img.astype(np.float32)
    x /= np.float32(127.5)
    x -= np.float32(1.0)
    return torch.from_numpy(x).movedim(-1, -3)


def clean_caption(text: str) -> str:
    """A caption as one line: line breaks and runs of whitespace become single spaces (every captioned source)."""
    return " ".join(text.split())


def as_item(img: np.ndarray, flip: bool, label) -> tuple[torch.Tensor, int]:
    """A uint8 (H, W, C) image (mirrored if flip) and its label as the item protocol's (image in [-1, 1], label)."""
    return to_tensor(np.ascontiguousarray(img[:, ::-1] if flip else img)), int(label)


def read_class_index(path: str) -> list[str]:
    """The class names of a class index file in label order: the first word of each non-empty line (ImageNet's
    LOC_synset_mapping.txt: "n01440764 tench, Tinca tinca" -> n01440764, label 0)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--class-index file not found: {path}")
    with open(path) as f:
        names = [line.split()[0] for line in f if line.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--class-index {path}: expected one distinct class name per line")
    return names


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
    """Images in class sub-folders (ImageNet layout), ADM center crop to `size`, flip chosen by the key.
    class_index: every class name in label order (read_class_index); a folder's label is its name's position there,
    and num_classes the index's length. None: the sorted folders are the classes."""

    def __init__(self, root: str, size: int = 256, class_index: list[str] | None = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder not found: {root}")
        folders = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        classes = class_index or folders
        position = {name: i for i, name in enumerate(classes)}
        if missing := [f for f in folders if f not in position]:
            raise ValueError(f"class folder {missing[0]} of {root} is not in the class index "
                             f"({len(missing)} of {len(folders)} folders missing)")
        files, labels = [], []
        for name in folders:
            label = position[name]
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

    def image_file(self, index: int):
        """(what PIL opens for item `index`, its name for messages): the file's path here (shards: the member's bytes)."""
        return self.files[index], self.files[index]

    def __getitem__(self, key: int):
        index, flip = flip_key(int(key))
        name = index
        try:
            source, name = self.image_file(index)
            with Image.open(source) as im:
                arr = center_crop_arr(im.convert("RGB"), self.image_size)
        except Exception as e:  # PIL raises many types; the user needs the file name, not the type
            # PIL names what it was given: a shard member's in-memory bytes would print as <_io.BytesIO object ...>
            why = "not an image format PIL can read" if isinstance(e, UnidentifiedImageError) else e
            raise ValueError(f"cannot read image {name}: {why}") from None
        if flip:
            arr = arr[:, ::-1]
        return to_tensor(np.ascontiguousarray(arr)), int(self.labels[index])


class DatasetView(torch.utils.data.Dataset):
    """A view of a dataset that changes its items; every other attribute (len, labels, files, ...) is the wrapped one's.

    A view must define its own __getitems__ (the DataLoader's batched fetch): otherwise __getattr__ would hand the
    loader the wrapped dataset's, whose items lack what the view adds."""

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # only called for attributes this view does not have
        if name == "dataset":     # not set yet (e.g. while unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def wrapped_items(self, keys) -> list:
        """The wrapped dataset's items of `keys`, through its batch path when it has one."""
        batched = getattr(self.dataset, "__getitems__", None)            # None: it fetches one item at a time
        return batched(keys) if batched else [self.dataset[k] for k in keys]
