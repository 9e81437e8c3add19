"""
torchvision's standard small datasets (MNIST, Fashion-MNIST, KMNIST, CIFAR-10/100) as nanoCEP datasets: the item
protocol of data.py's docstring, images ADM-centre-cropped (resized) to any side down to 8 px, greyscale as RGB.

    python train_dit.py --data mnist --data-root ~/data --image-size 16 --items-per-class 5

The files are read through torchvision.datasets from the root; if they are not there, torchvision downloads them
there once (the machines that run our tests are offline: the tests write small files in the same formats). For the
MNIST family the root may also be a folder holding the four IDX files as published (`*-idx3-ubyte.gz`, ...), such as
Debian's and Ubuntu's packaged Fashion-MNIST, which needs no download from the dataset's host:

    apt-get install dataset-fashion-mnist        # /usr/share/datasets/fashion-mnist/
    python train_dit.py --data fashion-mnist --data-root /usr/share/datasets/fashion-mnist --image-size 8

Such a folder is decompressed once into torchvision's layout under $NANOCEP_CACHE/torchvision/ (default
~/.cache/nanocep). A test split is cut by position into two halves (TEST_PARTS): the first trains the set's judge
(`python -m scoring.judge build --data fashion-mnist --data-root DIR`), the second is the fresh real images every
measurement compares with. Nothing to run here; data.build_dataset picks the reader.
"""
import gzip
import hashlib
import os
import shutil
import zlib

import numpy as np
import torch

from plumbing.common import WriteFailed, atomic_open, cache_root
from sources.folders import as_item, center_crop_arr, flip_key

# --data name -> torchvision.datasets class name
TORCHVISION_SETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST", "cifar10": "CIFAR10",
                    "cifar100": "CIFAR100"}


# A test split's two halves, by position (no seed): the first trains a judge (scoring/judge.py), the second holds the
# fresh real images (the judge's reference and held-out check, the chance level of scoring/trainset.py)
TEST_PARTS = ("judge", "fresh")


def test_part(num_test: int, part: str) -> np.ndarray:
    """Indices (n,) of a test split's part: "judge", its first half, or "fresh", its second half."""
    if part not in TEST_PARTS:
        raise ValueError(f"a test split's part must be one of {', '.join(TEST_PARTS)}, got {part!r}")
    half = num_test // 2
    return np.arange(half) if part == "judge" else np.arange(half, num_test)


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_FAMILY = ("mnist", "fashion-mnist", "kmnist")


def idx_root(name: str, root: str) -> str | None:
    """For a folder holding an MNIST-family set's four IDX files as published (.gz): the root under which torchvision
    finds them, decompressed once into the cache (atomically, so an interrupted copy is never read); None for any
    other folder. The cache folder is named by the files' path, size and modification time, so replaced files are
    decompressed again."""
    published = [os.path.join(root, f + ".gz") for f in IDX_FILES]
    if name not in MNIST_FAMILY or not all(os.path.isfile(p) for p in published):
        return None
    stamp = [(os.path.abspath(p), st.st_size, st.st_mtime_ns) for p, st in ((p, os.stat(p)) for p in published)]
    out = cache_root() / "torchvision" / f"{name}-{hashlib.sha1(repr(stamp).encode()).hexdigest()[:10]}"
    raw = out / TORCHVISION_SETS[name] / "raw"                  # torchvision's layout: ROOT/<Class>/raw/<file>
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--data {name}: cannot make {raw} for the decompressed files ({e.strerror}); "
                         f"set NANOCEP_CACHE") from None
    for file, src in zip(IDX_FILES, published):
        if not (raw / file).is_file():
            decompress(name, src, raw / file)
    return str(out)


def decompress(name: str, src: str, dest) -> None:
    """gunzip src into dest, atomically; a damaged or unreadable src is one line naming it (a full disk: WriteFailed)."""
    try:
        with gzip.open(src, "rb") as fin, atomic_open(dest, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    except WriteFailed:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise ValueError(f"--data {name}: cannot read {src} ({e})") from None


def open_torchvision(name: str, root: str, train: bool = True):
    """The torchvision dataset `name` under root (its train or test split), downloading it there if absent."""
    import torchvision.datasets as tvd
    cls = getattr(tvd, TORCHVISION_SETS[name])
    root = idx_root(name, root) or root
    try:
        return cls(root, train=train, download=False)
    except RuntimeError:                                   # not there (or corrupted): let torchvision fetch it once
        try:
            return cls(root, train=train, download=True)
        except Exception as e:                             # offline: URLError, RuntimeError, ... -> one line
            raise FileNotFoundError(f"--data {name}: not found under {root} and the download failed "
                                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); put the "
                                    f"torchvision files under {root} or pass --data-root"
                                    + (" (a folder of the four published .gz IDX files also reads)"
                                       if name in MNIST_FAMILY else "")) from None


class TorchvisionDataset(torch.utils.data.Dataset):
    """A torchvision classification set (train or test split) resized to `size`, RGB, flip chosen by the key."""

    def __init__(self, name: str, root: str, size: int = 16, train: bool = True):
        self.tv = open_torchvision(name, root, train)
        self.name, self.image_size, self.channels, self.captions = name, size, 3, None
        self.labels = np.asarray(self.tv.targets, dtype=np.int64)
        self.class_names = [str(c) for c in self.tv.classes]
        self.num_classes = len(self.class_names)

    def __len__(self):
        return len(self.labels)

    def render(self, index: int) -> np.ndarray:
        """Item `index` as uint8 (size, size, 3): RGB (greyscale replicated), ADM centre crop to the size."""
        img, _ = self.tv[index]                               # a PIL image (mode L or RGB)
        return center_crop_arr(img.convert("RGB"), self.image_size)

    def __getitem__(self, key: int):
        index, flip = flip_key(int(key))
        return as_item(self.render(index), flip, self.labels[index])
