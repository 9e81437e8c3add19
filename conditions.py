"""
Condition encoders c_θ(y): what turns a class label into what the denoiser consumes, and the CFG null condition.

This is where the paper's CEP acts: the perturbation δ is added to the *output* of the condition encoder, while
training only, for every sample on every step (cep.py). The classifier-free-guidance (CFG) null condition lives here
too, as an extra "null" row of the class table.

Every encoder shares one small interface, so the models never care which one they hold:
    enc(y)               -> embedding of the condition tensor y (CEP applied while enc.training)
    enc.null_like(y)     -> a condition tensor of the same shape holding the null condition (for CFG)
    enc.drop(y, mask)    -> y with the null condition where mask (B,) is True (CFG label dropout, done by the trainer)
Conditions are always tensors batched along dim 0 (class ids (B,) int64, or caption token ids (B, L) int64 padded
to a fixed context length), so the trainer can drop them and the samplers can concatenate them unchanged. The text
encoder (captions, the paper's CC3M models) and the factory that picks an encoder from a config are in
models/encoders.py; the grids' fixed prompts in sources/captions.py.

Design choices the paper leaves open (paper.md §3.2), made explicit here:
- CFG dropout is decided by the training loop (trainer.py), not drawn inside the module, so that the same global batch
  gets the same dropout mask on 1 GPU and on 8 (DDP equality) and after a resume.
- CEP's δ is drawn by the training loop too when it hands the encoder `cep_unit` (the global batch's unit noise from
  the (seed, step) generator, sliced per rank: 1 GPU = N GPUs); without it the encoder draws δ itself. `cep_mask`
  restricts CEP to a subset of the batch (the fixed-CEP ablation, --cep-subset).
- CEP perturbs only samples that carry a real condition; the null (dropped) embedding stays clean by default, because
  it stands for "no condition" and has nothing to corrupt. `cep_null=True` perturbs it as well.

The sample grids' class rows live here too (`grid_labels`).

Run `python -c "import conditions; help(conditions)"` to read this; there is no CLI.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cep import CEP


# ----------------------------------------------------------------------------------------------------------------------
# Class labels

class ClassEmbedder(nn.Module):
    """c_θ(y) for class labels: a learned table with one extra null row (index num_classes) for CFG, then CEP.

    The paper's Table 6 alternatives to CEP, while training only and never on the null row:
    label_smoothing eps: the embedding of the smoothed one-hot (1-eps) onehot(y) + eps/K, i.e.
        (1-eps) E[y] + eps * mean(E[0..K-1]) over the K class rows (the null row is not a class, so it is left out);
        the paper does not say how it smooths, this is our reading. Sampling feeds the same smoothed embedding the
        model was trained on (raw_at_sampling=False, the default); raw_at_sampling=True feeds E[y] itself, which is a
        1/(1-eps) extrapolation of every class away from the mean (evaluate.py --raw-class-embedding).
    cond_dropout p: dropout with probability p on the embedding (inverted dropout: kept entries scaled by 1/(1-p)).
    """
    kind = "class"                                                  # what the denoisers check to wire the condition

    def __init__(self, num_classes: int, dim: int, dropout_prob: float = 0.1, cep: str = "none",
                 cep_gamma: float = 1.0, cep_null: bool = False, cond_dropout: float = 0.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.cep_null = cep_null
        self.cond_dropout, self.label_smoothing = cond_dropout, label_smoothing
        self.raw_at_sampling = False                                 # evaluate.py --raw-class-embedding: E[y], not smoothed
        # The attribute name matches DiT's LabelEmbedder so official checkpoints load: y_embedder.embedding_table.weight.
        # The null row exists only when CFG dropout is on (exactly as in DiT, which keeps the key shapes identical).
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)
        self.cep = CEP(cep, cep_gamma)

    @property
    def null_id(self) -> int:
        return self.num_classes

    def null_like(self, y: torch.Tensor) -> torch.Tensor:
        """The null label, shaped like y."""
        return torch.full_like(y, self.null_id)

    def drop(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace the labels where mask is True by the null label (CFG training dropout)."""
        return torch.where(mask, self.null_like(y), y)

    @property
    def cep_shape(self) -> tuple:
        """The shape of one sample's embedding, (D,): what a trainer pre-draws CEP noise for (cep.unit_noise)."""
        return (self.embedding_table.embedding_dim,)

    def forward(self, y: torch.Tensor, cep_mask=None, cep_unit=None) -> torch.Tensor:
        """y (B,) -> (B, D). cep_mask (B,) bool: CEP only there (a fixed subset); cep_unit (B, D): pre-drawn CEP noise."""
        emb = self.embedding_table(y)                               # (B, D)
        real = y != self.null_id                                    # (B,) which samples carry a condition
        if self.label_smoothing > 0 and (self.training or not self.raw_at_sampling):
            smooth = smoothed(emb, self.embedding_table.weight[: self.num_classes], self.label_smoothing)
            emb = torch.where(real[:, None], smooth, emb)
        if self.training and self.cond_dropout > 0:
            emb = torch.where(real[:, None], F.dropout(emb, self.cond_dropout, training=True), emb)
        rows = cep_rows(None if self.cep_null else real, cep_mask)
        return self.cep(emb, mask=rows, unit=cep_unit)              # identity in eval mode


def smoothed(emb: torch.Tensor, class_rows: torch.Tensor, eps: float) -> torch.Tensor:
    """The embedding of the label-smoothed one-hot: (1-eps) emb + eps * mean of the K class rows; emb (B, D),
    class_rows (K, D). Also what weights/export_diffusers.py bakes into an exported class table."""
    return (1 - eps) * emb + eps * class_rows.mean(0)


def cep_rows(real, cep_mask):
    """The samples CEP perturbs: those carrying a condition (real, or None = all) and, if given, in cep_mask (B,)."""
    if cep_mask is None:
        return real
    cep_mask = cep_mask.reshape(cep_mask.shape + (1,) * (0 if real is None else real.dim() - 1))
    return cep_mask if real is None else real & cep_mask


# ----------------------------------------------------------------------------------------------------------------------
# The conditions of the sample grids

def grid_labels(num_classes: int, rows: int = 16) -> torch.Tensor:
    """The class ids of a sample grid's rows: every class, or `rows` of them evenly spread (R,)."""
    return torch.as_tensor(np.unique(np.linspace(0, num_classes - 1, min(num_classes, rows)).round().astype(int)))
