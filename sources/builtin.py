"""
The built-in dataset: coloured discs and crosses drawn procedurally, no files, no download (`--data builtin`).

10 classes (2 shapes x 5 colours) with captions; item i is a pure function of (i, seed), so any subset, order or number
of processes sees the same pixels. It follows the item protocol of data.py's docstring like every reader here.

    python -m tools.preview --out builtin.png           # look at it: a grid, one row per class
"""
import numpy as np
import torch

from sources.folders import flip_key, to_tensor


BUILTIN_COLOURS = {  # name -> RGB; far apart in hue so colour alone already separates five classes
    "red": (225, 45, 40), "green": (40, 200, 70), "blue": (50, 100, 235), "yellow": (235, 215, 45),
    "magenta": (215, 60, 205),
}
BUILTIN_SHAPES = ("disc", "cross")  # different topology: a disc is a blob, a cross has four thin arms


class BuiltinShapes(torch.utils.data.Dataset):
    """Coloured discs and crosses on dark backgrounds: 10 classes = 2 shapes x 5 colours, with captions.

    Item i is a pure function of (i, seed): class i % 10 (so classes are balanced), and random size, position,
    rotation, brightness and background drawn from numpy's PCG64 seeded with (seed, i). Rendering is 4x supersampled
    for anti-aliased edges. A 16x16 image costs ~0.1 ms, so items are drawn on the fly, a batch at a time (render_batch:
    the DataLoader fetches through __getitems__).
    """

    def __init__(self, size: int = 16, length: int = 100_000, seed: int = 0):
        if size < 8:
            raise ValueError(f"built-in image size must be >= 8, got {size}")
        self.image_size, self.channels, self.seed, self.length = size, 3, seed, length
        self.class_names = [f"{c} {s}" for s in BUILTIN_SHAPES for c in BUILTIN_COLOURS]
        self.num_classes = len(self.class_names)
        self.labels = np.arange(length, dtype=np.int64) % self.num_classes
        self.captions = _LazyCaptions(self)  # a caption is drawn only when asked for (100K captions take ~5 s)
        ss = 4 * size  # supersampled grid: 4x4 samples per pixel
        self._grid = (np.arange(ss) + 0.5) / ss * 2 - 1  # (ss,) sample centres in [-1, 1], along x and along y

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
        return self.render_batch([index])[0]

    def render_batch(self, indices) -> np.ndarray:
        """Items `indices` as uint8 (B, H, W, 3); bit-identical to rendering them one at a time, but numpy's work is
        done per chunk of items (as many as keep a chunk's float64 supersample arrays in the CPU cache, ~0.5 MB)."""
        indices, n = [int(i) for i in indices], self.image_size
        chunk = max(1, 2 ** 16 // (4 * n) ** 2)                          # items per chunk: 16 at 16 px, 4 at 32 px
        parts = [self._render_chunk(indices[i:i + chunk]) for i in range(0, len(indices), chunk)]
        return np.concatenate(parts) if parts else np.zeros((0, n, n, 3), np.uint8)

    def _render_chunk(self, indices: list[int]) -> np.ndarray:
        """Items `indices` as uint8 (B, H, W, 3): the shape's anti-aliased coverage, then its colour over a gradient."""
        a = [self._attributes(i)[0] for i in indices]                  # drawn per item: PCG64 seeded by (seed, i)
        B, n = len(a), self.image_size
        inside = np.zeros((B, 4 * n, 4 * n), dtype=bool)               # (B, ss, ss) supersamples inside the shape
        for shape, is_inside in (("disc", _in_disc), ("cross", _in_cross)):
            mine = [j for j, x in enumerate(a) if x["shape"] == shape]
            if mine:
                inside[mine] = is_inside(*self._rotated([a[j] for j in mine]), [a[j]["radius"] for j in mine])
        cover = inside.reshape(B, n, 4, n, 4).mean(axis=(2, 4))[..., None]     # (B, H, W, 1) anti-aliased coverage
        ramp = np.linspace(-1, 1, n)[:, None, None]                               # (H, 1, 1) top to bottom
        bg = np.stack([x["bg"] + x["bg_slope"] * ramp for x in a])                # (B, H, 1, 3) vertical gradient
        fg = np.stack([np.array(BUILTIN_COLOURS[x["colour"]], dtype=np.float64) * x["gain"] for x in a])  # (B, 3)
        img = cover * fg[:, None, None] + (1 - cover) * bg                       # (B, H, W, 3)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def _rotated(self, a: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(u, v), each (b, ss, ss): the supersample grid in the rotated frame of each item of `a`, around its centre.
        The grid is separable, so x - cx is computed once per column and y - cy once per row (the same numbers)."""
        per_item = lambda f: np.array([f(x) for x in a], dtype=np.float64)[:, None, None]      # (b, 1, 1)
        c, s = per_item(lambda x: np.cos(x["angle"])), per_item(lambda x: np.sin(x["angle"]))  # scalar cos/sin
        dx = self._grid[None, None, :] - per_item(lambda x: x["cx"])         # (b, 1, ss) columns
        dy = self._grid[None, :, None] - per_item(lambda x: x["cy"])         # (b, ss, 1) rows
        return dx * c + dy * s, -dx * s + dy * c

    def __getitem__(self, key: int):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys) -> list:
        """[ds[key] for key in keys], rendered as one batch: a list of (image (C, H, W), label).

        torch's DataLoader calls this, when a dataset has it, with each batch of keys of its batch_sampler (in the main
        process or in a worker) and hands the list to its collate_fn, which stacks it as it would stack single items.
        """
        pairs = [flip_key(int(k)) for k in keys]
        index, flip = [i for i, _ in pairs], np.array([f for _, f in pairs], dtype=bool)    # (B,), (B,)
        img = self.render_batch(index)                                    # (B, H, W, 3) uint8
        img[flip] = img[flip, :, ::-1]                                    # mirror the flipped items left to right
        x = to_tensor(img)                                                # (B, C, H, W) float32 in [-1, 1]
        return [(x[j], int(self.labels[i])) for j, i in enumerate(index)]


def _in_disc(u: np.ndarray, v: np.ndarray, radius: list[float]) -> np.ndarray:
    """(b, ss, ss) bool: inside the disc of each item's radius (u, v: its rotated coordinates)."""
    r2 = np.array([r ** 2 for r in radius])[:, None, None]            # squared as Python floats, like one item's r ** 2
    return u ** 2 + v ** 2 <= r2


def _in_cross(u: np.ndarray, v: np.ndarray, radius: list[float]) -> np.ndarray:
    """(b, ss, ss) bool: inside a plus sign whose arms reach `radius` and are 0.36 radius thick."""
    r = np.array(radius)[:, None, None]                                  # (b, 1, 1)
    arm = 0.36 * r
    au, av = np.abs(u), np.abs(v)
    return ((au <= r) & (av <= arm)) | ((av <= r) & (au <= arm))


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
