"""
Control fidelity of a ControlNet's samples: does the sample keep the edges it was given? The edge F1 between the
sample's Canny map and the control's (evaluate.py --control canny reports its mean as edge_f1).

    f1 = edge_f1(canny(sample), given_edges, tolerance=1)     # both (H, W) bool / {0, 255}; 1 = every edge matched

Precision is the share of the sample's edge pixels that lie within `tolerance` pixels (Chebyshev distance) of a given
edge pixel, recall the share of given edge pixels within `tolerance` of a sample edge pixel, F1 their harmonic mean.
The tolerance forgives the one-pixel shifts that Canny's non-maximum suppression makes on re-drawn edges (BSDS-style
boundary matching, without its one-to-one assignment). Two empty maps agree (F1 = 1); one empty map scores 0.
"""
import numpy as np


def dilate(edges: np.ndarray, r: int) -> np.ndarray:
    """(H, W) bool -> pixels within Chebyshev distance r of a True pixel."""
    if r <= 0:
        return edges
    H, W = edges.shape
    padded = np.pad(edges, r)
    out = np.zeros_like(edges)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy:dy + H, dx:dx + W]
    return out


def edge_f1(pred: np.ndarray, true: np.ndarray, tolerance: int = 1) -> float:
    """F1 of edge map `pred` against `true` (both (H, W), nonzero = edge) with a pixel tolerance."""
    pred, true = np.asarray(pred) > 0, np.asarray(true) > 0
    if pred.shape != true.shape:
        raise ValueError(f"edge maps differ in shape: {pred.shape} vs {true.shape}")
    if not pred.any() and not true.any():
        return 1.0
    if not pred.any() or not true.any():
        return 0.0
    precision = float((pred & dilate(true, tolerance)).sum() / pred.sum())
    recall = float((true & dilate(pred, tolerance)).sum() / true.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
