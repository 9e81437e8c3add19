"""
Look at a dataset as the trainer sees it: a PNG grid of its items, one row per class (captioned data: the first items
and their captions).

    python -m tools.preview --out builtin.png          # the built-in dataset, one row per class
    python -m tools.preview --data /path/to/imagenet/train --out folder.png
    python -m tools.preview --data /path/to/cc3m --captions --out cc3m.png    # img2dataset folder (or a .tsv)
"""
import sys

import numpy as np
import torch

from plumbing.common import ArgParser
from data import build_dataset
from runio import save_grid


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
    pv = ArgParser(prog="python -m tools.preview", description="Save a grid of a dataset's items, one row per class.")
    pv.add_argument("--data", default="builtin", help="'builtin', an ImageNet-layout folder, or captioned data")
    pv.add_argument("--captions", action="store_true", help="read a folder as images with same-stem .txt captions")
    pv.add_argument("--image-size", type=int, default=16)
    pv.add_argument("--per-class", type=int, default=8)
    pv.add_argument("--max-classes", type=int, default=16)
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("--out", default="preview.png")
    args = pv.parse_args(argv)
    try:
        _preview(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m tools.preview: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
