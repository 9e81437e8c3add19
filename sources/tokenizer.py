"""
The caption tokenizer: tiktoken ids of the text, then <|endoftext|>, truncated and padded to a fixed context length.
`get_tokenizer("bytes")` works offline (byte-level); "gpt2" is GPT-2's BPE (tiktoken downloads it once), or a local
.tiktoken ranks file. models/encoders.py's text encoder and sources/captions.py's TokenizedCaptions use it.

Nothing to run here.
"""
import base64
import functools
import hashlib
import os

import torch

# The classic GPT-2 pre-tokenisation regex (tiktoken's r50k_base pattern without the possessive quantifiers that only
# newer tiktoken versions accept).
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# sha256 of r50k_base.tiktoken, the GPT-2 ranks (also shipped as whisper/assets/gpt2.tiktoken in openai-whisper).
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT, PAD = "<|endoftext|>", "<|pad|>"


class Tokenizer:
    """Captions -> token ids (B, L): tiktoken ids of the text, then <|endoftext|>, truncated and padded to L.

    Every caption keeps its end token (a long caption loses its tail, not its end), so even the empty caption, the
    CFG null condition, is one real token followed by padding: no row of the attention mask is ever empty.
    The pad id is the encoding's <|pad|> token if it has one, else one id past its vocabulary.
    """

    def __init__(self, spec: str, encoding):
        self.spec, self.encoding = spec, encoding
        self.eot_id = encoding.eot_token
        self.pad_id = encoding._special_tokens.get(PAD, encoding.n_vocab)
        self.vocab_size = max(encoding.n_vocab, self.pad_id + 1)   # rows of the token embedding table

    def __reduce__(self):  # DataLoader workers / deepcopy rebuild it from its spec (cheap, cached)
        return get_tokenizer, (self.spec,)

    def encode(self, text: str, context_length: int) -> list[int]:
        """One caption -> its L ids (special-token text in captions is read as plain text, never as a control)."""
        ids = self.encoding.encode_ordinary(text)[: context_length - 1] + [self.eot_id]
        return ids + [self.pad_id] * (context_length - len(ids))

    def __call__(self, captions, context_length: int) -> torch.Tensor:
        """A list of B captions -> LongTensor (B, L)."""
        if isinstance(captions, str):
            raise ValueError("expected a list of captions, got a single string")
        if context_length < 2:
            raise ValueError(f"context length must be >= 2 (text + end token), got {context_length}")
        return torch.tensor([self.encode(c, context_length) for c in captions], dtype=torch.long).view(-1, context_length)

    def decode(self, ids) -> str:
        """Ids (L,) -> the caption: everything before the first end token, padding dropped."""
        ids = [int(i) for i in ids]
        ids = ids[: ids.index(self.eot_id)] if self.eot_id in ids else ids
        return self.encoding.decode([i for i in ids if i != self.pad_id])

    def __repr__(self):
        return f"Tokenizer({self.spec!r}, vocab {self.vocab_size}, eot {self.eot_id}, pad {self.pad_id})"


def _byte_encoding():
    """The offline default: 256 single-byte tokens + <|endoftext|> (256) + <|pad|> (257). No download, any text."""
    import tiktoken
    return tiktoken.Encoding(name="bytes", pat_str=GPT2_PAT, mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={EOT: 256, PAD: 257})


def _file_encoding(path: str):
    """A local `.tiktoken` ranks file (base64 token, space, rank per line); GPT-2's is recognised by its sha256."""
    import tiktoken
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    # parsed here rather than with tiktoken.load.load_tiktoken_bpe, which would also copy the file into its cache dir
    try:
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (ln.split() for ln in raw.splitlines() if ln)}
    except ValueError:
        raise ValueError(f"{path} is not a .tiktoken ranks file (expected 'base64-token rank' lines)") from None
    if not ranks:
        raise ValueError(f"tokenizer file is empty: {path}")
    if hashlib.sha256(raw).hexdigest() == R50K_SHA256:   # GPT-2 / r50k_base: reuse its exact special id and size
        return tiktoken.Encoding(name="r50k_base", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                                 special_tokens={EOT: 50256}, explicit_n_vocab=50257)
    return tiktoken.Encoding(name=os.path.basename(path), pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={EOT: max(ranks.values()) + 1})


@functools.lru_cache(maxsize=8)
def get_tokenizer(name: str = "bytes") -> Tokenizer:
    """'bytes' (offline byte-level), 'gpt2' / 'r50k_base' (GPT-2 BPE, which tiktoken downloads once and caches), or a
    path to a local `.tiktoken` file (e.g. gpt2.tiktoken from the openai-whisper package, for offline GPT-2 BPE)."""
    if name == "bytes":
        return Tokenizer(name, _byte_encoding())
    if name in ("gpt2", "r50k_base"):
        import tiktoken
        try:
            return Tokenizer(name, tiktoken.get_encoding(name))
        except Exception as e:  # requests/urllib errors of many kinds: the user needs the way out, not the type
            raise ValueError(f"cannot load the {name} tokenizer ({type(e).__name__}): tiktoken downloads it once, which "
                             f"needs internet; offline, pass --tokenizer PATH/TO/gpt2.tiktoken or use 'bytes'") from None
    if name.endswith(".tiktoken") or os.sep in name or os.path.exists(name):
        return Tokenizer(name, _file_encoding(name))
    raise ValueError(f"unknown tokenizer {name!r} (expected 'bytes', 'gpt2', 'r50k_base' or a .tiktoken file)")
