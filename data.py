"""
Datasets for nanoCEP: the readers of sources/ (the built-in procedural shapes, ImageNet-style image folders,
captioned images, WebDataset .tar shards, torchvision's MNIST / CIFAR family, scikit-learn's bundled 8x8 digits)
behind one build_dataset, the
training subset of k items per class (--items-per-class, chosen from the seed), static
condition corruption (labels and captions, through corrupt.py), the step-indexed sampler that makes training
resumable and identical on 1 or N processes, and the per-step views of a global batch's items that keep random
corruption and --cep-subset identical on 1 or N processes too.

    python -m tools.preview --out builtin.png           # look at it: a grid, one row per class

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
import numpy as np
import torch

from plumbing.common import derive_seed
from sources.builtin import BUILTIN_COLOURS, BUILTIN_SHAPES, BuiltinShapes  # noqa: F401 (data.BuiltinShapes is public)
from sources.captions import TABLE_EXTENSIONS, CaptionedImages
from sources.digits import DigitsDataset
from sources.folders import ImageFolderDataset, flip_key, read_class_index
from sources.shards import ShardDataset, is_shard_source
from sources.torchvision_sets import TORCHVISION_SETS, TorchvisionDataset


def build_dataset(data: str, image_size: int, seed: int = 0, builtin_length: int = 100_000, captions: bool = False,
                  root: str = "data", train: bool = True, class_index: str = ""):
    """'builtin', a torchvision name (mnist, cifar10, ...; read from root), 'digits' (sources/digits.py), a folder,
    a caption table or WebDataset shards (a .tar, a folder of them, a brace pattern dir/{00000..00099}.tar) -> a
    dataset following the protocol in this file's docstring.

    captions=False reads a folder as ImageNet class folders; captions=True as images with same-stem .txt captions.
    train=False: a torchvision set's test split; the digits' fresh part (train=True: their training pool); other
    sources have none.
    class_index: class folders only, a file of every class name in label order (sources/folders.read_class_index).
    """
    if class_index and (data in ("builtin", "digits", *TORCHVISION_SETS) or is_shard_source(data) or captions
                        or data.lower().endswith(TABLE_EXTENSIONS)):
        raise ValueError(f"--class-index {class_index} orders class folders; --data {data} has none")
    if data == "builtin":
        return BuiltinShapes(size=image_size, length=builtin_length, seed=seed)
    if data in TORCHVISION_SETS:
        return TorchvisionDataset(data, root, size=image_size, train=train)
    if data == "digits":
        return DigitsDataset(image_size, part="pool" if train else "fresh")
    if is_shard_source(data):       # WebDataset .tar shards: classes (.cls) and/or captions (.txt / .json) inside
        return ShardDataset(data, size=image_size)
    if captions or data.lower().endswith(TABLE_EXTENSIONS):
        return CaptionedImages(data, size=image_size)
    return ImageFolderDataset(data, size=image_size, class_index=read_class_index(class_index) if class_index else None)


# ----------------------------------------------------------------------------------------------------------------------
# The training subset: k items per class, chosen from the seed (--items-per-class; the memorization benchmark)

def items_per_class(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(K * k,) sorted indices: k items of every class, drawn without replacement from the seed alone."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 0x5EB5E7])            # its own stream: no other draw shifts the choice
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            raise ValueError(f"--items-per-class {k}: class {c} has only {len(members)} items")
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


class ItemSubset(torch.utils.data.Dataset):
    """The items `indices` of a dataset as a dataset of their own (same protocol; key 2 * i + flip is item i here)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(dataset.labels)[self.indices].copy()      # corruption replaces these, not the source's
        captions = getattr(dataset, "captions", None)
        self.captions = None if captions is None else [captions[int(i)] for i in self.indices]
        self.num_classes, self.class_names = dataset.num_classes, dataset.class_names
        self.image_size, self.channels = dataset.image_size, dataset.channels

    def __len__(self):
        return len(self.indices)

    def source_key(self, key: int) -> int:
        """The wrapped dataset's key of this subset's key (same flip)."""
        index, flip = flip_key(int(key))
        return 2 * int(self.indices[index]) + flip

    def __getitem__(self, key: int):
        x, _ = self.dataset[self.source_key(key)]
        return x, int(self.labels[int(key) >> 1])

    def __getitems__(self, keys) -> list:
        """[ds[key] for key in keys] at once (the DataLoader's batched fetch), through the wrapped dataset's batch path."""
        batched = getattr(self.dataset, "__getitems__", None)
        inner = [self.source_key(k) for k in keys]
        items = batched(inner) if batched else [self.dataset[k] for k in inner]
        return [(x, int(self.labels[int(k) >> 1])) for k, (x, _) in zip(keys, items)]


def training_set(cfg):
    """The dataset a run trains on (before corruption): build_dataset from its config (a config object or the dict a
    checkpoint stores), cut to --items-per-class items per class when set. evaluate.py --train-ref rebuilds it alike."""
    get = cfg.get if isinstance(cfg, dict) else (lambda key, default: getattr(cfg, key, default))
    dataset = build_dataset(get("data", "builtin"), get("image_size", 16), seed=get("seed", 0),
                            builtin_length=get("builtin_length", 100_000), captions=get("cond", "class") == "text",
                            root=get("data_root", "data"), class_index=get("class_index", ""))
    return subset_per_class(dataset, get("items_per_class", 0), get("seed", 0))


def subset_per_class(dataset, k: int, seed: int):
    """dataset cut to k items per class chosen from the seed (an ItemSubset); k = 0: the dataset itself."""
    return ItemSubset(dataset, items_per_class(dataset.labels, k, seed)) if k > 0 else dataset


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
    """Corrupt captions of `dataset` in place (corrupt.corrupt_captions: swap round(ratio * N) of them, or apply
    round(ratio * N) rewrites of the JSON file `rewrites`, all when ratio is 0), write the manifest, return the indices.
    Lazy captions (the built-in dataset's) are materialised once, here (100K built-in captions take ~5 s)."""
    import corrupt
    new, idx, manifest = corrupt.corrupt_captions(list(dataset.captions), kind, ratio, seed, rewrites)
    if manifest_path is not None:
        corrupt.save_manifest(manifest_path, manifest)
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
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
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
    chosen = torch.randperm(num_items, generator=torch.Generator().manual_seed(derive_seed(seed, "cep_subset")))
    mask = torch.zeros(num_items, dtype=torch.bool)
    mask[chosen[: int(round(fraction * num_items))]] = True
    return mask


