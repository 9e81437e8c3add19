"""
Condition encoders c_θ(y): what turns a class label or a caption into what the denoiser consumes, and the tokenizer.

This is where the paper's CEP acts: the perturbation δ is added to the *output* of the condition encoder, while
training only, for every sample on every step (cep.py). The classifier-free-guidance (CFG) null condition lives here
too, as an extra "null" row of the class table.

Every encoder here shares one small interface, so the models never care which one they hold:
    enc(y)               -> embedding of the condition tensor y (CEP applied while enc.training)
    enc.null_like(y)     -> a condition tensor of the same shape holding the null condition (for CFG)
    enc.drop(y, mask)    -> y with the null condition where mask (B,) is True (CFG label dropout, done by the trainer)
Conditions are always tensors batched along dim 0 (class ids (B,) int64, or caption token ids (B, L) int64 padded
to a fixed context length), so the trainer can drop them and the samplers can concatenate them unchanged.

Text (the paper's CC3M models): captions are tokenised with tiktoken (`get_tokenizer`: GPT-2 BPE, or an offline
byte-level encoding) and encoded by a small transformer trained from scratch with the denoiser (as the original LDM
text-to-image model trained its BERT-style encoder). The text encoder returns (context (B, L, D), mask (B, L)), the
keys/values for cross-attention; the CFG null condition is the empty caption.

Design choices the paper leaves open (paper.md §3.2), made explicit here:
- CFG dropout is decided by the training loop (trainer.py), not drawn inside the module, so that the same global batch
  gets the same dropout mask on 1 GPU and on 8 (DDP equality) and after a resume.
- CEP's δ is drawn by the training loop too when it hands the encoder `cep_unit` (the global batch's unit noise from
  the (seed, step) generator, sliced per rank: 1 GPU = N GPUs); without it the encoder draws δ itself. `cep_mask`
  restricts CEP to a subset of the batch (the fixed-CEP ablation, --cep-subset).
- CEP perturbs only samples that carry a real condition; the null (dropped) embedding stays clean by default, because
  it stands for "no condition" and has nothing to corrupt. `cep_null=True` perturbs it as well.
- For text, CEP's d is the per-token width D (every real token vector gets noise of scale gamma/sqrt(D)), not L*D as
  NEFTune would use; padding is never perturbed.

The sample grids' conditions live here too: `grid_labels` (one row per class) and `grid_prompts` / `encode_prompts`
(fixed captions for text models).

Run `python -c "import conditions; help(conditions)"` to read this; there is no CLI.
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cep import CEP
from sources.tokenizer import get_tokenizer


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
        self.raw_at_sampling = False                                 # eval with label smoothing: E[y], not smoothed
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
            mean = self.embedding_table.weight[: self.num_classes].mean(0)          # (D,) over the K class rows
            smoothed = (1 - self.label_smoothing) * emb + self.label_smoothing * mean
            emb = torch.where(real[:, None], smoothed, emb)
        if self.training and self.cond_dropout > 0:
            emb = torch.where(real[:, None], F.dropout(emb, self.cond_dropout, training=True), emb)
        rows = cep_rows(None if self.cep_null else real, cep_mask)
        return self.cep(emb, mask=rows, unit=cep_unit)              # identity in eval mode


def cep_rows(real, cep_mask):
    """The samples CEP perturbs: those carrying a condition (real, or None = all) and, if given, in cep_mask (B,)."""
    if cep_mask is None:
        return real
    cep_mask = cep_mask.reshape(cep_mask.shape + (1,) * (0 if real is None else real.dim() - 1))
    return cep_mask if real is None else real & cep_mask


# ----------------------------------------------------------------------------------------------------------------------
# Text encoder: a small pre-norm transformer over the caption tokens, trained jointly with the denoiser

class TextBlock(nn.Module):
    """Pre-norm transformer encoder block (bidirectional attention, padding keys masked out, 4x GELU MLP)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x, keep):                                   # x (B, L, D), keep (B, 1, 1, L) bool
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)                   # (B, h, L, hd)
        x = x + self.proj(att.transpose(1, 2).reshape(B, L, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln_2(x)), approximate="tanh"))


class TextEncoder(nn.Module):
    """c_θ(caption): token ids (B, L) -> (context (B, L, D), mask (B, L) bool), then CEP on the context.

    Token + learned position embeddings and a LayerNorm over their sum (as BERT), `depth` pre-norm blocks whose
    attention ignores padding keys, a final LayerNorm; padding positions of the context are zeroed, so a model that
    ignores the mask still sees no padding. Why the embedding LayerNorm: with GPT-style N(0, 0.02) embeddings the
    residual stream starts tiny, and trained jointly at the DiT's constant lr (1e-3, no warmup) the first blocks' outputs
    drowned the token identities within ~25 steps, leaving a caption-independent context (measured on the built-in
    data); normalising the embeddings keeps the stream O(1) while the small init still lets them learn fast.
    The mask is derived from the ids (id != pad), always keeping position 0 (the tokenizer puts a real token there).
    The null condition (CFG) is the empty caption's tokens: [<|endoftext|>, pad, pad, ...].

    CEP acts on the encoder output, per token: every real token vector of a real caption gets fresh noise of scale
    gamma/sqrt(D) (d = D, the per-token width, as for a class embedding; not L*D). Padding is never perturbed, and the
    null caption stays clean unless cep_null. pooled(context, mask) gives the masked mean (B, D) of the (perturbed)
    context, for models that also condition globally (e.g. adaLN); it does not depend on the amount of padding.
    """
    kind = "text"

    def __init__(self, vocab_size: int, context_length: int, width: int, depth: int, heads: int, *, pad_id: int,
                 eot_id: int, tokenizer: str = "bytes", dropout_prob: float = 0.1, cep: str = "none",
                 cep_gamma: float = 1.0, cep_null: bool = False, cond_dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by {heads} heads")
        self.context_length, self.width, self.pad_id = context_length, width, pad_id
        self.tokenizer, self.dropout_prob, self.cep_null = tokenizer, dropout_prob, cep_null
        self.cond_dropout = cond_dropout             # dropout on the context of real captions while training (Table 6)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(1, context_length, width))
        self.ln_embed = nn.LayerNorm(width)
        self.blocks = nn.ModuleList([TextBlock(width, heads) for _ in range(depth)])
        self.ln_final = nn.LayerNorm(width)
        self.cep = CEP(cep, cep_gamma)
        null = torch.full((context_length,), pad_id, dtype=torch.long)
        null[0] = eot_id
        self.register_buffer("null_tokens", null, persistent=False)   # derived from the tokenizer: not saved
        self.init_weights()

    def init_weights(self):
        """GPT-2 style: N(0, 0.02) embeddings and weights, zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.position_embedding, std=0.01)

    def tokenize(self, captions) -> torch.Tensor:
        """Captions -> ids (B, L) with this encoder's tokenizer and context length (on the CPU)."""
        return get_tokenizer(self.tokenizer)(captions, self.context_length)

    def null_like(self, y: torch.Tensor) -> torch.Tensor:
        """The empty caption's tokens, shaped like y (B, L)."""
        return self.null_tokens[: y.shape[-1]].to(y.device).expand_as(y)

    def drop(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace the captions where mask (B,) is True by the empty caption (CFG training dropout)."""
        return torch.where(mask[:, None], self.null_like(y), y)

    @staticmethod
    def pooled(context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked mean over the real tokens: (B, L, D), (B, L) -> (B, D)."""
        m = mask.unsqueeze(-1).to(context.dtype)
        return (context * m).sum(1) / m.sum(1)

    @property
    def cep_shape(self) -> tuple:
        """The shape of one sample's context, (L, D): what a trainer pre-draws CEP noise for (cep.unit_noise)."""
        return (self.context_length, self.width)

    def forward(self, y: torch.Tensor, cep_mask=None, cep_unit=None):
        """y (B, L) ids -> (context, mask). cep_mask (B,) bool: CEP only there; cep_unit (B, >= L, D): CEP noise."""
        if y.dim() != 2 or y.shape[1] > self.context_length:
            raise ValueError(f"text condition must be token ids (B, L <= {self.context_length}), got {tuple(y.shape)}")
        L = y.shape[1]
        mask = y != self.pad_id                                                # (B, L)
        mask[:, 0] = True                                                      # never an all-masked row (NaN)
        x = self.ln_embed(self.token_embedding(y) + self.position_embedding[:, :L])  # (B, L, D)
        keep = mask[:, None, None, :]                                          # (B, 1, 1, L): keys to attend to
        for blk in self.blocks:
            x = blk(x, keep)
        context = self.ln_final(x) * mask.unsqueeze(-1)                        # (B, L, D), padding zeroed
        null = (y == self.null_like(y)).all(1, keepdim=True)                   # (B, 1) the empty caption
        if self.training and self.cond_dropout > 0:                            # padding stays 0, null stays clean
            context = torch.where(null[..., None], context, F.dropout(context, self.cond_dropout, training=True))
        rows = cep_rows(mask if self.cep_null else mask & ~null, cep_mask)     # (B, L)
        unit = None if cep_unit is None else cep_unit[:, :L]
        return self.cep(context, mask=rows, unit=unit), mask                   # CEP: identity in eval mode


# ----------------------------------------------------------------------------------------------------------------------
# Factory, and the conditions of the sample grids

def build_condition_encoder(kind: str, dim: int, *, num_classes: int = 0, dropout_prob: float = 0.1,
                            cep: str = "none", cep_gamma: float = 1.0, cep_null: bool = False,
                            tokenizer: str = "bytes", context_length: int = 77, depth: int = 2,
                            heads: int = 4, cond_dropout: float = 0.0, label_smoothing: float = 0.0) -> nn.Module:
    """The condition encoder for `kind`, as used by train_dit.py / train_ldm.py.

    "class": ClassEmbedder(num_classes, dim) -> (B, dim).
    "text":  TextEncoder of width dim (tokenizer, context_length, depth, heads) -> ((B, L, dim) context, (B, L) mask).
    """
    if kind == "class":
        if num_classes < 1:
            raise ValueError(f"class conditioning needs num_classes >= 1, got {num_classes}")
        return ClassEmbedder(num_classes, dim, dropout_prob, cep, cep_gamma, cep_null, cond_dropout, label_smoothing)
    if kind == "text":
        if label_smoothing:
            raise ValueError("label smoothing smooths class labels: it needs class conditioning, not text")
        if context_length < 2 or depth < 0 or heads < 1 or dim < 1:
            raise ValueError(f"bad text encoder shape: context_length={context_length} (>= 2), depth={depth} (>= 0), "
                             f"heads={heads} (>= 1), width={dim}")
        tok = get_tokenizer(tokenizer)
        return TextEncoder(tok.vocab_size, context_length, dim, depth, heads, pad_id=tok.pad_id, eot_id=tok.eot_id,
                           tokenizer=tokenizer, dropout_prob=dropout_prob, cep=cep, cep_gamma=cep_gamma,
                           cep_null=cep_null, cond_dropout=cond_dropout)
    raise ValueError(f"unknown condition kind {kind!r} (expected 'class' or 'text')")


def encoder_from_config(cfg, dim: int) -> nn.Module:
    """The condition encoder a train config (config.TrainConfig) describes, of width dim: its condition kind, CFG
    dropout, CEP, the Table 6 ablations and the text-encoder fields."""
    return build_condition_encoder(cfg.cond, dim, num_classes=cfg.num_classes, dropout_prob=cfg.class_dropout,
                                   cep=cfg.cep, cep_gamma=cfg.cep_gamma, cep_null=cfg.cep_null,
                                   tokenizer=cfg.tokenizer, context_length=cfg.context_length, depth=cfg.text_depth,
                                   heads=cfg.text_heads, cond_dropout=cfg.cond_dropout,
                                   label_smoothing=cfg.label_smoothing)


def grid_labels(num_classes: int, rows: int = 16) -> torch.Tensor:
    """The class ids of a sample grid's rows: every class, or `rows` of them evenly spread (R,)."""
    return torch.as_tensor(np.unique(np.linspace(0, num_classes - 1, min(num_classes, rows)).round().astype(int)))


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
