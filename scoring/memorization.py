"""
memorization.py: does a model copy its training items? Metrics that mean the same at every training-set size.

    from scoring import memorization as mem
    d1, d2 = mem.item_distances(samples_px, train_px, train_item_ids)     # nearest and second-nearest training ITEM
    share = mem.ratio_memorized(d1, d2)                                   # Gu et al. 2023: d1 < d2 / 3
    share = mem.tau_memorized(d1_unit_feats, tau=0.12)                    # paper App. D: CLIP ViT-B/16, unit features
    found = mem.nearest(samples_px, train_px, train_item_ids)             # d1, d2, and which item / view is nearest

Three readings of one search (each generated sample -> its nearest training items), none with a threshold that moves
with the training-set size N:
    ratio test   a sample is memorized if its distance to the nearest training item is below 1/3 of its distance to
                 the second-nearest (Gu et al. 2023, "On Memorization in Diffusion Models", in pixel space). Both flips
                 of an item are views of *one* item (its distance is the nearer view's), so a copy of an item is never
                 "close to two items" because the training loader flips it. A fresh real image sits about as far from
                 its nearest item as from the next (ratio ~ 0.6-0.9), so it passes at every N; a copy has d1 ~ 0.
    absolute     a sample is memorized if its nearest training item lies closer than tau in a named feature space,
                 unit-normalised features (the paper's App. D: tau = 0.12 for CLIP ViT-B/16 image features); tau only
                 means something for the extractor it was chosen for.
    distances    the distribution (mean, median) of the nearest-item distance d1 of samples beside that of fresh real
                 images of the same source (the chance level): copying pulls the samples' d1 below the real images'.
Pixel space: images as floats in [-1, 1] (what the model sees), flattened, L2. Feature space: unit-normalised
features, L2 (metrics.nearest_distances' convention). The measured sensitivity to degraded copies (noise, 1-px shifts,
blur, brightness) is stated in tests/test_memorization.py and docs/evaluation.md "Memorization columns".
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RATIO = 1 / 3          # Gu et al. 2023: memorized if d(nearest) < RATIO * d(second-nearest)


def pixels(images) -> np.ndarray:
    """uint8 images (N, H, W, C) -> float32 (N, H*W*C) in [-1, 1], the model's pixel space."""
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"pixel memorization needs uint8 (N, H, W, C) images, got {x.dtype} {x.shape}")
    return (x.reshape(len(x), -1).astype(np.float32) / 127.5 - 1.0)


def item_distances(queries, views, item_ids=None, normalize: bool = False, max_elems: int = 2 ** 24):
    """(d1 (Q,), d2 (Q,)): each query's distance to its nearest and second-nearest training *item* (see nearest)."""
    found = nearest(queries, views, item_ids, normalize, max_elems)
    return found["d1"], found["d2"]


def nearest(queries, views, item_ids=None, normalize: bool = False, max_elems: int = 2 ** 24) -> dict:
    """Each query's nearest training items: {d1, d2 (Q,) float64: distances to the nearest and second-nearest *item*;
    item (Q,): the nearest item's id (an item_ids value); view (Q,): the row of `views` that is its nearest view}.

    views: (V, D) vectors of the training set, several views (flips) per item allowed; item_ids: (V,) the item each
    view shows (default: every view its own item); an item's distance is its nearest view's. normalize: unit-normalise
    rows first (feature spaces). float64 throughout, so an exact copy gives d1 = 0 to rounding."""
    q = torch.as_tensor(np.asarray(queries), dtype=torch.float64)
    v = torch.as_tensor(np.asarray(views), dtype=torch.float64)
    if q.ndim != 2 or v.ndim != 2 or q.shape[1] != v.shape[1]:
        raise ValueError(f"memorization needs (N, D) vectors of one D, got {tuple(q.shape)} and {tuple(v.shape)}")
    ids = torch.arange(len(v)) if item_ids is None else torch.as_tensor(np.asarray(item_ids), dtype=torch.long)
    names, ids = torch.unique(ids, return_inverse=True)           # (N_items,) ids; (V,) item index 0..N_items-1
    n_items = len(names)
    if n_items < 2:
        raise ValueError(f"the ratio test needs at least 2 training items, got {n_items}")
    if normalize:
        q, v = F.normalize(q, dim=1), F.normalize(v, dim=1)
    vv = (v * v).sum(1)                                           # (V,)
    rows = max(1, max_elems // max(len(v), 1))
    d1, d2, item, view = [], [], [], []
    for i in range(0, len(q), rows):
        qi = q[i:i + rows]                                        # (R, D)
        sq = ((qi * qi).sum(1)[:, None] + vv[None, :] - 2 * qi @ v.T).clamp_min_(0)   # (R, V) squared distances
        per_item = torch.full((len(qi), n_items), float("inf"), dtype=torch.float64)
        per_item.scatter_reduce_(1, ids.expand(len(qi), -1), sq, reduce="amin")       # (R, N_items) nearer view
        two, at = per_item.topk(2, dim=1, largest=False)          # (R, 2) ascending, and their item indices
        d1.append(two[:, 0])
        d2.append(two[:, 1])
        item.append(at[:, 0])
        view.append(sq.masked_fill(ids[None, :] != at[:, :1], float("inf")).argmin(1))  # (R,) the item's nearer view
    return {"d1": torch.cat(d1).sqrt().numpy(), "d2": torch.cat(d2).sqrt().numpy(),
            "item": names[torch.cat(item)].numpy(), "view": torch.cat(view).numpy()}


def ratio_memorized(d1, d2, ratio: float = RATIO) -> float:
    """Share of samples whose nearest training item is closer than ratio x the second-nearest (Gu et al. 2023)."""
    d1, d2 = np.asarray(d1), np.asarray(d2)
    return float((d1 < ratio * d2).mean())


def tau_memorized(d1, tau: float) -> float:
    """Share of samples whose nearest training item lies closer than tau (unit-normalised features; paper App. D)."""
    return float((np.asarray(d1) < tau).mean())


def distance_summary(d1, prefix: str) -> dict:
    """{prefix_mean, prefix_median} of nearest-item distances."""
    d1 = np.asarray(d1, dtype=np.float64)
    return {f"{prefix}_mean": float(d1.mean()), f"{prefix}_median": float(np.median(d1))}


# The results columns this file adds (evaluate.py --train-ref, sweep.py); *_real: fresh real images, the chance level.
COLUMNS = ["mem_ratio_px", "mem_ratio_feat", "mem_tau", "nn_px_mean", "nn_px_median", "nn_feat_mean",
           "nn_feat_median", "mem_ratio_px_real", "mem_ratio_feat_real", "nn_px_real_mean", "nn_px_real_median",
           "nn_feat_real_mean", "nn_feat_real_median", "nn_feat_below_real_q01"]


def search(train_ref: dict, feats=None, images=None) -> dict:
    """{"px": nearest() of the samples' pixels, "feat": nearest() of their features} against a training set (a space
    without samples or training vectors is None): the one search every memorization column and array reads."""
    ids, train_px = train_ref.get("item_ids"), train_ref.get("pixels")              # uint8 (V, S, S, C) images
    found = {"px": None, "feat": None}
    if images is not None and train_px is not None:
        found["px"] = nearest(pixels(images), pixels(train_px), ids)
    if feats is not None and train_ref.get("feats") is not None:
        found["feat"] = nearest(feats, train_ref["feats"], ids, normalize=True)
    return found


def memorization_metrics(train_ref: dict, feats=None, images=None, tau: float | None = None,
                         found: dict | None = None) -> dict:
    """The memorization columns of samples (feats (N, D) and/or uint8 images (N, H, W, C)) against a training set.

    train_ref (load_train_reference): "feats" and/or "pixels" (V views each), "item_ids" (V,), and the fresh real
    images' nearest-item distances "real_px_d1/d2", "real_feat_d1/d2" (any may be missing: its columns stay None).
    found: search(train_ref, feats, images) when the caller already ran it (to keep its per-sample arrays).
    nn_feat_below_real_q01 is the old single-size test (share closer than the 1 % quantile of the real images' d1): its
    threshold shrinks as N grows, so it is comparable at one N only."""
    row = dict.fromkeys(COLUMNS)
    found = search(train_ref, feats, images) if found is None else found
    for space in ("px", "feat"):
        real_d1, real_d2 = train_ref.get(f"real_{space}_d1"), train_ref.get(f"real_{space}_d2")
        if real_d1 is not None:
            row[f"mem_ratio_{space}_real"] = ratio_memorized(real_d1, real_d2)
            row.update(distance_summary(real_d1, f"nn_{space}_real"))
        if found[space] is None:
            continue
        d1, d2 = found[space]["d1"], found[space]["d2"]
        row[f"mem_ratio_{space}"] = ratio_memorized(d1, d2)
        row.update(distance_summary(d1, f"nn_{space}"))
        if space == "feat":
            if tau is not None:
                row["mem_tau"] = tau_memorized(d1, tau)
            if real_d1 is not None:
                row["nn_feat_below_real_q01"] = float((d1 < np.quantile(real_d1, 0.01)).mean())
    return row


NEAREST_SHOWN = 32      # samples stored beside their nearest training item (nearest_s<scale>.npz)


def save_arrays(out_dir, scale: float, found: dict, labels, seeds, images=None, train_pixels=None) -> list:
    """Write OUT/memorization_s<scale>.npz (per sample: pixel d1, d2 (float32), nearest_item, nearest_view, labels,
    seeds, and d1_feat, d2_feat, nearest_item_feat where features were searched) and, with pixels on both sides,
    OUT/nearest_s<scale>.npz (the first NEAREST_SHOWN samples and the view of each one's nearest training item, uint8
    HWC, for a picture of samples beside what they copy); returns the paths written."""
    from plumbing.common import save_npz
    px, feat = found.get("px"), found.get("feat")
    if px is None and feat is None:
        return []
    arrays = {"labels": np.asarray(labels), "seeds": np.asarray(seeds)}
    for space, suffix in ((px, ""), (feat, "_feat")):
        if space is not None:
            arrays.update({f"d1{suffix}": space["d1"].astype(np.float32), f"d2{suffix}": space["d2"].astype(np.float32),
                           f"nearest_item{suffix}": space["item"]})
    if px is not None:
        arrays["nearest_view"] = px["view"]
    paths = [Path(out_dir) / f"memorization_s{scale:g}.npz"]
    save_npz(paths[0], **arrays)
    if px is not None and images is not None and train_pixels is not None:
        n = min(NEAREST_SHOWN, len(images))
        paths.append(Path(out_dir) / f"nearest_s{scale:g}.npz")
        save_npz(paths[1], samples=np.asarray(images[:n]), nearest=np.asarray(train_pixels)[px["view"][:n]],
                 nearest_item=px["item"][:n], nearest_view=px["view"][:n], labels=np.asarray(labels)[:n],
                 d1=arrays["d1"][:n], d2=arrays["d2"][:n])
    return paths


def reference_distances(train_views, item_ids, real, normalize: bool) -> dict:
    """{d1, d2} of fresh real vectors (pixels or features) to the training items: the chance level, stored once."""
    d1, d2 = item_distances(real, train_views, item_ids, normalize=normalize)
    return {"d1": d1, "d2": d2}
