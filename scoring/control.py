"""
Control fidelity of a ControlNet's samples: does the sample keep the edges it was given? The edge F1 between the
sample's Canny map and the control's, two ways (evaluate.py --control canny reports the mean of each):

    f1 = edge_f1(canny(sample), given_edges)          # edge_f1: 1-px tolerance, no one-to-one matching
    f1 = edge_f1_exact(canny(sample), given_edges)    # edge_f1_exact: pixelwise, no tolerance

Both take (H, W) maps, nonzero = edge. edge_f1_exact is the F1 of the two binary maps as pixel classifications:
precision = |pred & true| / |pred|, recall = |pred & true| / |true|, F1 = 2 TP / (2 TP + FP + FN).
edge_f1 (1-px tolerance, no one-to-one matching): precision is the share of the sample's edge pixels within `tolerance`
pixels (Chebyshev distance) of a given edge pixel, recall the share of given edge pixels within `tolerance` of a sample
edge pixel. The tolerance forgives the one-pixel shifts Canny's non-maximum suppression makes on re-drawn edges; without
BSDS's one-to-one assignment one drawn pixel can match several given ones, so it reads at least the exact F1 and is not
comparable with published pixelwise edge F1 numbers (compare those with edge_f1_exact).
Two empty maps agree (F1 = 1); one empty map scores 0.
"""
import numpy as np

COLUMNS = ["edge_f1", "edge_f1_exact"]          # the result columns, in the order edge_scores returns them


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
    """F1 of edge map `pred` against `true` (both (H, W), nonzero = edge) with a pixel tolerance and no one-to-one
    matching (tolerance 0: the exact pixelwise F1)."""
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


def edge_scores(pred: np.ndarray, true: np.ndarray) -> tuple:
    """(edge_f1, edge_f1_exact) of `pred` against `true`, as COLUMNS names them."""
    return edge_f1(pred, true), edge_f1_exact(pred, true)


def edge_f1_exact(pred: np.ndarray, true: np.ndarray) -> float:
    """The exact F1 of binary edge maps `pred` against `true` (both (H, W), nonzero = edge): pixelwise, no tolerance."""
    return edge_f1(pred, true, tolerance=0)
