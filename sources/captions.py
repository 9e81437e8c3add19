"""
Captioned images, for --cond text: img2dataset folders (<shard>/<key>.jpg + <key>.txt) and path<TAB>caption tables,
and TokenizedCaptions, the view whose items carry a caption's token ids instead of the label; the fixed prompts of a
text model's sample grids.

Nothing to run here; data.build_dataset picks the reader. `python -m tools.preview --data DIR --captions` shows one.
"""
import os
import re

import numpy as np

import torch

from sources.folders import IMAGE_EXTENSIONS, DatasetView, ImageFolderDataset, clean_caption, flip_key
from sources.tokenizer import get_tokenizer

TABLE_EXTENSIONS = (".tsv", ".csv")


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
                    caption = clean_caption(fh.read())
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
                caption = clean_caption(row[1])
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


# ---- the token view ----

_MIRROR = re.compile(r"\b(left|right)\b")


def mirror_caption(caption: str) -> str:
    """Swap the words 'left' and 'right', so a caption still describes its horizontally flipped image."""
    return _MIRROR.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)


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

    def caption(self, key: int) -> str:
        """The caption item `key` is trained on: its index's, mirrored when the key flips it (and mirror is on)."""
        index, flip = flip_key(int(key))
        caption = self.dataset.captions[index]
        return mirror_caption(caption) if flip and self.mirror else caption

    def __getitem__(self, key: int):
        x, _ = self.dataset[key]
        return x, self.tokenize([self.caption(key)], self.context_length)[0]     # (C, H, W), (L,)

    def __getitems__(self, keys) -> list:
        """[ds[key] for key in keys] at once (the DataLoader's batched fetch), through the wrapped dataset's batch path."""
        images = self.wrapped_items(keys)
        tokens = self.tokenize([self.caption(k) for k in keys], self.context_length)     # (B, L)
        return [(x, t) for (x, _), t in zip(images, tokens)]


# ----------------------------------------------------------------------------------------------------------------------
# The fixed prompts of a text model's sample grids (train_dit/train_ldm) and of evaluate.py --prompts

BUILTIN_PROMPT = "a large {} at the middle of a dark background"   # one grid row per built-in class, e.g. "red disc"


def read_prompts(path: str, what: str = "prompts file") -> list[str]:
    """A prompts file (one caption per line, blank lines skipped) -> its captions; errors name `what` and the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        prompts = [ln.strip() for ln in f if ln.strip()]
    if not prompts:
        raise ValueError(f"{what} {path} holds no prompts")
    return prompts


def grid_prompts(path: str, dataset, builtin: bool, rows: int = 16) -> list[str]:
    """The fixed prompts of a text model's grids: the file `path` (one per line), else one per built-in class, else
    up to 8 distinct captions evenly spread over the dataset."""
    if path:
        return read_prompts(path, "--sample-prompts file")[:rows]
    if builtin:
        return [BUILTIN_PROMPT.format(name) for name in dataset.class_names]
    picks = np.linspace(0, len(dataset) - 1, min(len(dataset), 8)).round().astype(int)
    return list(dict.fromkeys(dataset.captions[int(i)] for i in picks))       # distinct, in order


def encode_prompts(cfg, prompts: list[str]) -> torch.Tensor:
    """Prompts -> the caption token ids (B, L) a text model of this config takes (what its y is)."""
    return get_tokenizer(cfg.tokenizer)(list(prompts), cfg.context_length)
