"""
The held-out items a ControlNet checkpoint is evaluated on (`evaluate.py CKPT --control canny --control-data DATA`):
their classes and control maps, which the samples follow one each in a class-balanced order, the FID reference they
make, and each Canny sample's edge F1s against the map it was given (scoring/control.py), averaged per guidance scale
over every rank.

    held_out = HeldOutControls(ckpt, stored_config, "canny", "builtin", num_samples=200, sample_seed=0)
    sample_fn = held_out.scored(sample_fn)              # labels index the balanced order; records each sample's F1s
    rows = held_out.add_edge_f1(rows, out_dir)          # after sampling: edge_f1 and edge_f1_exact of every row

Sample i follows item order[i % len(order)]: every class's items shuffled by the sampling seed, dealt one per class in
turn (classes in ascending id), so --num-samples below the folder's size still samples every class equally (remainder:
one more for the lowest class ids). The FID reference stays the whole held-out set, as ControlNet papers measure it.
"""
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import data as datalib
from scoring.control import COLUMNS, edge_scores
from scoring.metrics import write_results
from sources.control import ControlMaps, canny


def class_balanced_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """(N,) item indices, a permutation: each class's items shuffled from `seed`, then dealt round-robin over the
    classes in ascending id, so any prefix holds every class equally (+1 for the first classes) while they last."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 0xC0B7A1])                  # its own stream: no other draw shifts the order
    queues = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rounds = max((len(q) for q in queues), default=0)
    return np.array([q[r] for r in range(rounds) for q in queues if r < len(q)], dtype=np.int64)


class HeldOutControls:
    """--control: the held-out images whose control maps (and classes) a ControlNet's samples follow, and each
    sample's edge F1s against its map (scoring/control.py). Sample label i is item order[i % len(order)], the
    class-balanced order of the sampling seed (class_balanced_order)."""

    def __init__(self, ckpt: str, cfg: dict, control: str, data: str, maps: str = "", seed: int = 1,
                 num_samples: int = 1000, sample_seed: int = 0):
        """ckpt and its stored config cfg; control / data / maps / seed: evaluate.py's --control, --control-data,
        --control-maps, --control-seed; num_samples: how many built-in items to draw (other data: all its items);
        sample_seed: evaluate.py's --seed, which picks each class's items when fewer samples than items are drawn."""
        self.kind = cfg.get("control", "none")
        if self.kind == "none" or control != self.kind:
            raise ValueError(f"{ckpt} is trained with --control {self.kind}: pass --control {self.kind} "
                             "--control-data DIR" if self.kind != "none" else f"{ckpt} is no ControlNet checkpoint")
        if cfg.get("cond") == "text":
            raise ValueError("--control evaluates class-conditional ControlNets (captions are not implemented)")
        held_out = datalib.build_dataset(data, cfg["image_size"], seed=seed, builtin_length=num_samples,
                                         class_index=cfg.get("class_index", "") if data != "builtin" else "")
        self.ds = ControlMaps(held_out, self.kind, cfg["canny_low"], cfg["canny_high"], maps or "")
        self.order = class_balanced_order(held_out.labels, sample_seed)
        self.data, self.low, self.high, self.f1 = data, cfg["canny_low"], cfg["canny_high"], {}

    def __len__(self):
        return len(self.ds)

    def item(self, i: int):
        """Sample label i -> its held-out item (image, class, control map), unflipped."""
        return self.ds[2 * int(self.order[int(i) % len(self.order)])]

    def items(self, labels):
        """Sample labels (B,) -> (their items' classes (B,), control maps (B, 3, H, W)), unflipped."""
        items = [self.item(i) for i in labels]
        return torch.tensor([it[1] for it in items]), torch.stack([it[2] for it in items])

    def describe(self, num_samples: int) -> str:
        """One line: how many items and classes num_samples samples follow, and the FID reference."""
        used = self.ds.labels[self.order[np.arange(num_samples) % len(self.order)]]
        counts = np.bincount(used)[np.unique(used)]
        return (f"--control: {num_samples} samples follow {min(num_samples, len(self))} of {len(self)} held-out items, "
                f"{counts.min()}-{counts.max()} samples per class over {len(counts)} of "
                f"{len(np.unique(self.ds.labels))} classes; FID reference: all {len(self)} held-out images")

    def scored(self, sample_fn):
        """sample_fn that also records each Canny sample's edge F1s (1-px tolerant, exact) against its item's map, by
        guidance scale."""
        def fn(labels, seeds, cfg_scale):
            images = sample_fn(labels, seeds, cfg_scale)
            if self.kind == "canny":
                for i, image in zip(labels, images):
                    given, drawn = self.item(i)[2][0].numpy(), canny(image, self.low, self.high)
                    self.f1.setdefault(cfg_scale, []).append(edge_scores(drawn, given))
            return images
        return fn

    def reference(self, out: Path, rank: int) -> str:
        """The FID reference: the --control-data folder itself, or the built-in held-out images written as PNGs."""
        if self.data != "builtin":
            return self.data
        folder = out / "held_out"
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(len(self.ds)):
                Image.fromarray(self.ds.render(i)).save(folder / f"{i:06d}.png")
        if dist.is_available() and dist.is_initialized():
            dist.barrier()              # the other ranks read the folder rank 0 writes
        return str(folder)

    def add_edge_f1(self, rows, out):
        """Rank 0's rows with the mean edge F1s over every rank's samples of each scale: edge_f1 (1-px tolerance, no
        one-to-one matching) and edge_f1_exact (pixelwise) (rewritten to OUT/results.*)."""
        scores = [self.f1]
        if dist.is_available() and dist.is_initialized():
            scores = [None] * dist.get_world_size()
            dist.all_gather_object(scores, self.f1)
        if rows is None or self.kind != "canny":
            return rows
        for row in rows:
            values = np.array([v for part in scores for v in part.get(row["cfg_scale"], [])]).reshape(-1, len(COLUMNS))
            row.update(zip(COLUMNS, values.mean(0).tolist() if len(values) else [None] * len(COLUMNS)))
        write_results(rows, out)
        return rows
