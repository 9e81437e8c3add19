"""
trainset.py: a run's training set as evaluate.py --train-ref reads it, for the memorization metrics (memorization.py).

    python -m scoring.trainset --run runs/dit --out train.npz                 # pixels only (no extractor needed)
    python -m scoring.trainset --run runs/dit --features $(python -m scoring.judge path) --resize none --out train.npz
    python evaluate.py runs/dit/last.pt --train-ref auto --features FILE ...   # made on the fly, the run's features

The items are rebuilt from the run's config exactly as the trainer built them (data.training_set: the source, the
seed, --builtin-length, --items-per-class), both flips when it trained with flips (a flip is a view of the same
item: item_ids), and stored as pixels (small images only) and as features of the extractor. Fresh real images of the
same source are matched to the same items once, here: their nearest-item distances are the chance level a model that
draws fresh images would score. Fresh images: built-in data, 2000 of seed 1 000 037 (no training run's); a torchvision
set, the whole second half of its test split (the first half trains its judge); the digits, their whole fresh part
(sources/digits.py: never in the training pool); a folder trained with --items-per-class, 2000 of the items not
chosen; any other folder has none.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

import data
from scoring import memorization, metrics
from sources.torchvision_sets import test_part

FRESH_SEED = 1_000_037          # built-in fresh images (never a training seed)
NUM_FRESH = 2000                # fresh images of a source without a fixed fresh part (built-in data, a folder)
FRESH_VERSION = 2               # which fresh images: 2 = a torchvision set's second test half (1: its whole test split)
MAX_PIXEL_BYTES = 2 ** 30       # pixels are kept for the pixel-space ratio test up to this size (small images)


def run_config(run_dir_or_config) -> dict:
    """A run's config dict: from its folder's config.json, a config.json file, or a dict (a checkpoint's "config")."""
    cfg = run_dir_or_config
    if not isinstance(cfg, dict):
        path = Path(cfg) / "config.json" if Path(cfg).is_dir() else Path(cfg)
        if not path.is_file():
            raise FileNotFoundError(f"run config not found: {path}")
        cfg = json.loads(path.read_text())
        cfg = cfg.get("config", cfg)
    if cfg.get("latents"):
        raise ValueError("a run trained from a latent cache: its training images are not rebuilt here")
    return cfg


def to_uint8(x) -> np.ndarray:
    """A dataset item's image (C, H, W) in [-1, 1] -> uint8 (H, W, C), exactly (to_tensor's inverse)."""
    return np.rint((x.permute(1, 2, 0).numpy().astype(np.float64) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def images_of(dataset, indices, flip: bool = False) -> np.ndarray:
    """uint8 (n, S, S, 3) of dataset items (flipped if asked), through the dataset's own reader."""
    return np.stack([to_uint8(dataset[2 * int(i) + int(flip)][0]) for i in indices])


def fresh_images(cfg: dict, num: int | None = None) -> np.ndarray | None:
    """`num` real images of the run's source that it did not train on, spread over them (half of them flipped), or
    None. num None: the whole fresh part of a torchvision set or the digits, else NUM_FRESH."""
    size = int(cfg.get("image_size", 16))
    source = cfg.get("data", "builtin")
    whole = True                                                                  # a fixed fresh part: all of it
    if source == "builtin":
        ds = data.BuiltinShapes(size, num or NUM_FRESH, FRESH_SEED)
    elif source == "digits":
        ds = data.build_dataset(source, size, train=False)                         # their fresh part
    elif source in data.TORCHVISION_SETS:
        test = data.build_dataset(source, size, root=cfg.get("data_root", "data"), train=False)
        ds = data.ItemSubset(test, test_part(len(test), "fresh"))                  # its second half
    elif cfg.get("items_per_class", 0) > 0:
        full = data.build_dataset(source, size, captions=cfg.get("cond", "class") == "text",
                                  class_index=cfg.get("class_index", ""))   # the labels training drew items by
        chosen = data.items_per_class(full.labels, cfg["items_per_class"], cfg.get("seed", 0))
        ds, whole = data.ItemSubset(full, np.setdiff1d(np.arange(len(full)), chosen)), False
    else:
        return None
    if len(ds) == 0:
        return None
    num = min(num or (len(ds) if whole else NUM_FRESH), len(ds))
    picks = np.unique(np.linspace(0, len(ds) - 1, num).round().astype(int))                 # spread over the source
    return np.stack([to_uint8(ds[2 * int(i) + (j % 2)][0]) for j, i in enumerate(picks)])


def build(cfg: dict, featurize=None, pipeline=None, num_fresh: int | None = None) -> dict:
    """The --train-ref arrays of a run's config: pixels and/or feats of every view, item_ids, items (the source
    indices trained on), labels, the fresh images' real_{px,feat}_{d1,d2}, pipeline, image_size.

    featurize: uint8 images (n, S, S, 3) -> features (n, D), or None for pixels only."""
    cfg = run_config(cfg)
    ds = data.training_set(cfg)
    items = getattr(ds, "indices", np.arange(len(ds)))
    views = [images_of(ds, range(len(ds)))] + ([images_of(ds, range(len(ds)), flip=True)]
                                               if cfg.get("flip", True) else [])
    pixels = np.concatenate(views)                                                 # (V, S, S, 3)
    item_ids = np.tile(np.arange(len(ds)), len(views))                             # (V,) a flip shows the same item
    out = {"item_ids": item_ids, "items": np.asarray(items), "labels": np.tile(np.asarray(ds.labels), len(views)),
           "image_size": np.array(int(cfg.get("image_size", 16))), "num_items": np.array(len(ds))}
    fresh = fresh_images(cfg, num_fresh)
    if pixels.nbytes <= MAX_PIXEL_BYTES:
        out["pixels"] = pixels
        if fresh is not None:
            d = memorization.reference_distances(memorization.pixels(pixels), item_ids, memorization.pixels(fresh),
                                                 normalize=False)
            out["real_px_d1"], out["real_px_d2"] = d["d1"], d["d2"]
    if featurize is not None:
        out["feats"] = featurize(pixels)
        out["pipeline"] = np.array(pipeline) if pipeline else None
        if fresh is not None:
            d = memorization.reference_distances(out["feats"], item_ids, featurize(fresh), normalize=True)
            out["real_feat_d1"], out["real_feat_d2"] = d["d1"], d["d2"]
    if fresh is not None:
        out["num_fresh"] = np.array(len(fresh))
    return out


def main(argv=None) -> int:
    """`python -m scoring.trainset`: write a run's --train-ref .npz; bad input is one line, exit 2."""
    from plumbing.common import ArgParser, new_file
    p = ArgParser(prog="python -m scoring.trainset", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder (its config.json) or a config.json file")
    p.add_argument("--out", default="train.npz", help="the .npz for evaluate.py --train-ref")
    p.add_argument("--features", help="a TorchScript extractor for the feature-space columns (the built-in judge: "
                   "$(python -m scoring.judge path)); default: pixels only")
    p.add_argument("--resize", choices=("clean", "none"), default="none", help="resize before the extractor")
    p.add_argument("--num-fresh", type=int, help="fresh real images for the chance level (default: all of a "
                   f"torchvision set's or the digits' fresh part, {NUM_FRESH} of any other source)")
    args = p.parse_args(argv)
    try:
        if args.num_fresh is not None and args.num_fresh < 2:
            raise ValueError(f"--num-fresh must be >= 2, got {args.num_fresh}")
        new_file(args.out)
        featurizer = metrics.Featurizer(args.features, resize=args.resize) if args.features else None
        tr = build(args.run, featurize=featurizer and (lambda images: featurizer(images)["feats"]),
                   pipeline=featurizer and featurizer.pipeline, num_fresh=args.num_fresh)
        metrics.save_npz(args.out, **tr)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"python -m scoring.trainset: error: {e}", file=sys.stderr)
        return 2
    chance = tr.get("real_px_d1")
    print(f"wrote {args.out}: {int(tr['num_items'])} training items ({len(tr['item_ids'])} views)"
          + ("" if chance is None else f"; fresh real images' median nearest-item distance {np.median(chance):.3f} "
                                       "in pixels (the chance level)"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
