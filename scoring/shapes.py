"""
shapes.py: does a sample of the built-in data show its *shape*, not only its colour and class? Shape fidelity.

The judge (judge.py) tells a cross from a disc, and a splat of cross-coloured pixels passes as a cross: its class
accuracy cannot see whether the arms are there. This file measures the geometry itself, with no network:
  1. foreground mask of each image: its pixels projected on its class colour (a unit RGB vector), above halfway
     between the border's median (the background) and the brightest pixel (the shape);
  2. the best intersection-over-union of that mask against a bank of masks of fresh real items of the same shape
     (seed 1_000_049, disjoint from every training set and from the judge's images), any size, place and rotation.
A real item scores close to 1 (a 20,000-item bank at 16 px: discs 0.98, crosses 0.92 on average; the bank is finite,
so a real cross rarely finds its exact twin). A real *disc* scored as a cross gets ~0.77 (a fat cross is its best
match): a cross sample below that is less of a cross than a disc is. The banks are rendered once and cached in
$NANOCEP_CACHE/shapes (default ~/.cache/nanocep/shapes), named by a hash of the renderer's code.

    from scoring import shapes
    shapes.shape_iou(images, labels)            # {"disc": 0.90, "cross": 0.67}: mean best IoU per shape
    python evaluate.py runs/dit/last.pt ...     # a built-in checkpoint's rows: shape_iou_disc, shape_iou_cross
    python -m scoring.shapes [--image-size 16]  # the real-vs-real calibration
"""
import functools
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from plumbing.common import ArgParser, atomic_open, cache_root
import sources.builtin
from sources.builtin import BUILTIN_COLOURS, BUILTIN_SHAPES, BuiltinShapes

SHAPE_SEED = 1_000_049                # the bank's real items
BANK_SIZE = 20_000                    # items per shape: larger banks raise every score a little (a closer twin)
PLURAL = {"disc": "discs", "cross": "crosses"}   # for the judge's line
COLOURS = np.array(list(BUILTIN_COLOURS.values()), dtype=np.float64)   # (5, 3)


def foreground(images: np.ndarray, labels) -> np.ndarray:
    """(N, H, W) bool: the pixels of uint8 images (N, H, W, 3) that carry their class colour (labels (N,) class ids)."""
    unit = COLOURS[np.asarray(labels) % len(COLOURS)]
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)                     # (N, 3)
    s = np.einsum("nhwc,nc->nhw", images.astype(np.float64), unit)                  # (N, H, W) along the colour
    border = np.concatenate([s[:, 0], s[:, -1], s[:, :, 0], s[:, :, -1]], axis=1)  # (N, 4W) mostly background
    background, brightest = np.median(border, axis=1), s.reshape(len(s), -1).max(axis=1)
    return s > ((background + brightest) / 2)[:, None, None]


def items_of_shape(image_size: int, shape: str, num: int, seed: int):
    """(uint8 images (num, S, S, 3), labels (num,)): built-in items of `shape` drawn with `seed`, every colour in turn."""
    first = BUILTIN_SHAPES.index(shape) * len(BUILTIN_COLOURS)
    index = np.arange(num) // len(BUILTIN_COLOURS) * 10 + first + np.arange(num) % len(BUILTIN_COLOURS)   # (num,)
    ds = BuiltinShapes(size=image_size, length=int(index.max()) + 1, seed=seed)
    return ds.render_batch(index), ds.labels[index]


def build_masks(image_size: int, shape: str, size: int) -> np.ndarray:
    """(size, S, S) bool: the foreground masks of the bank's fresh real items of `shape`, every colour in turn."""
    return foreground(*items_of_shape(image_size, shape, size, SHAPE_SEED))


@functools.lru_cache(maxsize=1)
def recipe_tag() -> str:
    """A short hash of the code that draws the bank (the renderer and this file): an edit to either names new files,
    so a cached bank is never one an older renderer drew."""
    code = Path(sources.builtin.__file__).read_bytes() + Path(__file__).read_bytes()
    return hashlib.sha1(code).hexdigest()[:10]


def bank_path(image_size: int, shape: str, size: int) -> Path:
    """Where a bank's masks are cached: $NANOCEP_CACHE (or ~/.cache/nanocep)/shapes/."""
    return cache_root() / "shapes" / f"bank-{recipe_tag()}-{image_size}px-{shape}-{size}-seed{SHAPE_SEED}.npy"


def cached_masks(image_size: int, shape: str, size: int) -> np.ndarray:
    """build_masks, read from the disk cache when a file of the right shape is there, else built and cached. Rendering
    a 20,000-item bank costs every evaluating process several seconds; the cache is a convenience: an unreadable
    file is rebuilt, and a cache that cannot be written is skipped."""
    path = bank_path(image_size, shape, size)
    try:
        bits = np.load(path, allow_pickle=False)
        masks = np.unpackbits(bits, axis=1, count=image_size * image_size).astype(bool)
        if masks.shape == (size, image_size * image_size):
            return masks.reshape(size, image_size, image_size)
    except (OSError, ValueError, EOFError, TypeError):
        pass                                                   # absent or damaged: build it
    masks = build_masks(image_size, shape, size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:
            np.save(f, np.packbits(masks.reshape(size, -1), axis=1))
    except OSError:
        pass                                                   # a read-only or full cache: the next process builds
    return masks


@functools.lru_cache(maxsize=8)
def shape_bank(image_size: int, shape: str, size: int = BANK_SIZE) -> torch.Tensor:
    """(size, H*W) float masks of fresh real items of `shape` in every colour (built once, then read from the cache)."""
    masks = cached_masks(image_size, shape, size)
    return torch.from_numpy(masks.reshape(size, -1).astype(np.float32))


def best_iou(masks: np.ndarray, bank: torch.Tensor, chunk: int = 1024) -> np.ndarray:
    """(N,) the best IoU of each mask (N, H, W) against the bank's (M, H*W): matrix products, O(N M H W), over chunks
    of masks so that memory stays O(chunk M) (evaluate.py scores up to 50,000 samples in one process)."""
    q = torch.from_numpy(masks.reshape(len(masks), -1).astype(np.float32))
    best = []
    for part in q.split(chunk):
        inter = part @ bank.T                                                     # (chunk, M)
        union = part.sum(1, keepdim=True) + bank.sum(1)[None] - inter
        best.append((inter / union.clamp(min=1)).max(dim=1).values)
    return torch.cat(best).numpy() if best else np.zeros(0, dtype=np.float32)


def item_iou(images: np.ndarray, labels, bank_size: int | None = None) -> np.ndarray:
    """(N,) each uint8 image's (N, S, S, 3) best IoU against real items of its class's shape; bank_size: BANK_SIZE
    if None. Per item, so that evaluate.py's ranks can each score their own slice."""
    labels, bank_size = np.asarray(labels), bank_size or BANK_SIZE
    out = np.zeros(len(labels), dtype=np.float64)
    for k, shape in enumerate(BUILTIN_SHAPES):
        mine = labels // len(BUILTIN_COLOURS) == k
        if mine.any():
            bank = shape_bank(images.shape[1], shape, bank_size)
            out[mine] = best_iou(foreground(images[mine], labels[mine]), bank)
    return out


def mean_per_shape(iou: np.ndarray, labels) -> dict:
    """{shape: mean of item_iou's values} over the shapes present."""
    shape_of = np.asarray(labels) // len(BUILTIN_COLOURS)
    return {shape: float(iou[shape_of == k].mean()) for k, shape in enumerate(BUILTIN_SHAPES) if (shape_of == k).any()}


def shape_iou(images: np.ndarray, labels, bank_size: int | None = None) -> dict:
    """{shape: mean best IoU} of the uint8 images (N, S, S, 3) of each shape present; bank_size: BANK_SIZE if None."""
    return mean_per_shape(item_iou(images, labels, bank_size), labels)


def main(argv=None) -> int:
    """Print the real-vs-real calibration: 500 fresh real items (another seed) against the banks."""
    p = ArgParser(prog="python -m scoring.shapes", description="Shape fidelity of built-in images: real vs real.")
    p.add_argument("--image-size", type=int, default=16, choices=(8, 16, 32, 64), help="built-in image side")
    size = p.parse_args(argv).image_size
    ds = BuiltinShapes(size=size, length=500, seed=SHAPE_SEED + 1)
    idx = np.arange(500)
    print(f"real items at {size} px, mean best IoU against the {BANK_SIZE:,}-item banks:",
          {k: round(v, 3) for k, v in shape_iou(ds.render_batch(idx), ds.labels[idx]).items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
