"""
Condition encoders c_θ(y): what turns a label (or, later, a caption) into the vector the denoiser consumes.

This is where the paper's CEP acts: the perturbation δ is added to the *output* of the condition encoder, while
training only, for every sample on every step (cep.py). The classifier-free-guidance (CFG) null condition lives here
too, as an extra "null" row of the class table.

Every encoder here shares one small interface, so the models never care which one they hold:
    enc(y)               -> embedding of the condition tensor y (CEP applied while enc.training)
    enc.null_like(y)     -> a condition tensor of the same shape holding the null condition (for CFG)
    enc.drop(y, mask)    -> y with the null condition where mask (B,) is True (CFG label dropout, done by the trainer)
Conditions are always tensors batched along dim 0 (class ids (B,) int64), so the samplers can concatenate them.

Design choices the paper leaves open (paper.md §3.2), made explicit here:
- CFG dropout is decided by the training loop (trainer.py), not drawn inside the module, so that the same global batch
  gets the same dropout mask on 1 GPU and on 8 (DDP equality) and after a resume.
- CEP perturbs only samples that carry a real condition; the null (dropped) embedding stays clean by default, because
  it stands for "no condition" and has nothing to corrupt. `cep_null=True` perturbs it as well.

Run `python -c "import conditions; help(conditions)"` to read this; there is no CLI.
"""
import torch
import torch.nn as nn

from cep import CEP


# ----------------------------------------------------------------------------------------------------------------------
# Class labels

class ClassEmbedder(nn.Module):
    """c_θ(y) for class labels: a learned table with one extra null row (index num_classes) for CFG, then CEP."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float = 0.1, cep: str = "none",
                 cep_gamma: float = 1.0, cep_null: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.cep_null = cep_null
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

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        emb = self.embedding_table(y)                               # (B, D)
        real = None if self.cep_null else (y != self.null_id)       # (B,) which samples carry a condition
        return self.cep(emb, mask=real)                             # identity in eval mode


def build_condition_encoder(kind: str, dim: int, *, num_classes: int = 0, dropout_prob: float = 0.1,
                            cep: str = "none", cep_gamma: float = 1.0, cep_null: bool = False) -> nn.Module:
    """The condition encoder for `kind` ("class"), as used by train_dit.py / train_ldm.py."""
    if kind == "class":
        if num_classes < 1:
            raise ValueError(f"class conditioning needs num_classes >= 1, got {num_classes}")
        return ClassEmbedder(num_classes, dim, dropout_prob, cep, cep_gamma, cep_null)
    raise ValueError(f"unknown condition kind {kind!r} (expected 'class')")
