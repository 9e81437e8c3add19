"""
The held-out items a ControlNet checkpoint is evaluated on (`evaluate.py CKPT --control canny --control-data DATA`):
their classes and control maps, which the samples follow one each in turn, the FID reference they make, and each Canny
sample's edge F1 against the map it was given (scoring/control.py), averaged per guidance scale over every rank.

    held_out = HeldOutControls(ckpt, stored_config, "canny", "builtin", num_samples=200)
    sample_fn = held_out.scored(sample_fn)              # labels index the held-out items; records each sample's F1
    rows = held_out.add_edge_f1(rows, out_dir)          # after sampling: the edge_f1 column of every row
"""
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import data as datalib
from scoring.control import edge_f1
from scoring.metrics import write_results
from sources.control import ControlMaps, canny


class HeldOutControls:
    """--control: the held-out images whose control maps (and classes) a ControlNet's samples follow, and each
    sample's edge F1 against its map (scoring/control.py). Sample labels index these items, cycling through them."""

    def __init__(self, ckpt: str, cfg: dict, control: str, data: str, maps: str = "", seed: int = 1,
                 num_samples: int = 1000):
        """ckpt and its stored config cfg; control / data / maps / seed: evaluate.py's --control, --control-data,
        --control-maps, --control-seed; num_samples: how many built-in items to draw (other data: all its items)."""
        self.kind = cfg.get("control", "none")
        if self.kind == "none" or control != self.kind:
            raise ValueError(f"{ckpt} is trained with --control {self.kind}: pass --control {self.kind} "
                             "--control-data DIR" if self.kind != "none" else f"{ckpt} is no ControlNet checkpoint")
        if cfg.get("cond") == "text":
            raise ValueError("--control evaluates class-conditional ControlNets (captions are not implemented)")
        held_out = datalib.build_dataset(data, cfg["image_size"], seed=seed, builtin_length=num_samples,
                                         class_index=cfg.get("class_index", "") if data != "builtin" else "")
        self.ds = ControlMaps(held_out, self.kind, cfg["canny_low"], cfg["canny_high"], maps or "")
        self.data, self.low, self.high, self.f1 = data, cfg["canny_low"], cfg["canny_high"], {}

    def __len__(self):
        return len(self.ds)

    def items(self, labels):
        """Item indices (B,) -> (their classes (B,), control maps (B, 3, H, W)), unflipped."""
        items = [self.ds[2 * int(i)] for i in labels]
        return torch.tensor([it[1] for it in items]), torch.stack([it[2] for it in items])

    def scored(self, sample_fn):
        """sample_fn that also records each Canny sample's edge F1 against its item's map, by guidance scale."""
        def fn(labels, seeds, cfg_scale):
            images = sample_fn(labels, seeds, cfg_scale)
            if self.kind == "canny":
                for i, image in zip(labels, images):
                    given = self.ds[2 * int(i)][2][0].numpy()
                    self.f1.setdefault(cfg_scale, []).append(edge_f1(canny(image, self.low, self.high), given))
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
        """Rank 0's rows with the mean edge F1 over every rank's samples of each scale (rewritten to OUT/results.*)."""
        scores = [self.f1]
        if dist.is_available() and dist.is_initialized():
            scores = [None] * dist.get_world_size()
            dist.all_gather_object(scores, self.f1)
        if rows is None or self.kind != "canny":
            return rows
        for row in rows:
            values = [v for part in scores for v in part.get(row["cfg_scale"], [])]
            row["edge_f1"] = float(np.mean(values)) if values else None
        write_results(rows, out)
        return rows
