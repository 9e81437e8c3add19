"""
The condition encoders c_θ(y) by kind, and the factory the models call: the class table (conditions.ClassEmbedder,
the tutorial's) or, for captions (the paper's CC3M models), a small transformer trained from scratch with the
denoiser (as the original LDM text-to-image model trained its BERT-style encoder).

    from models.encoders import encoder_from_config
    enc = encoder_from_config(cfg, width)     # ClassEmbedder for --cond class, TextEncoder for --cond text

Captions are tokenised with tiktoken (sources/tokenizer.py). The text encoder returns (context (B, L, D), mask (B, L)),
the keys/values for cross-attention; the CFG null condition is the empty caption. It shares conditions.py's interface
(enc(y), enc.null_like(y), enc.drop(y, mask)), so the models never care which encoder they hold. For text, CEP's d is
the per-token width D (every real token vector gets noise of scale gamma/sqrt(D)), not L*D as NEFTune would use;
padding is never perturbed.

No CLI: the train scripts hand this factory to dit.from_config / unet.from_config (build_model).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from cep import CEP
from conditions import ClassEmbedder, cep_rows
from sources.tokenizer import get_tokenizer


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
# Factory

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
