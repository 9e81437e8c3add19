"""
Control maps for ControlNet (models/controlnet.py): the Canny edges of each training image (OpenCV's cv2.Canny, as
the paper annotates ImageNet-100 and ControlNet's annotator does), or same-stem images made elsewhere (e.g. SAM
segmentations), as a view of a dataset whose items gain their map, flipped with the image.

Nothing to run here; trainer.load_data wraps the dataset when --control asks for it.
"""
import os

import numpy as np
import torch
from PIL import Image

from sources.folders import IMAGE_EXTENSIONS, DatasetView, center_crop_arr, flip_key


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

    def __getitems__(self, keys) -> list:
        """[ds[key] for key in keys] at once (the DataLoader's batched fetch), through the wrapped dataset's batch path."""
        return [(x, y, self.control(k, x)) for k, (x, y) in zip(keys, self.wrapped_items(keys))]


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
