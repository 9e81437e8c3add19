"""Text conditioning: tokenizer, text encoder (+ CEP, CFG null), captioned data and corruption, text DiT, CLI. Offline."""
import base64
import hashlib
import json
import math
import os
import pickle
import socket

import numpy as np
import pytest
import torch

import conditions
from models.encoders import encoder_from_config
from models import encoders
import data
import diffusion as diff
from models import dit
import train_dit
from models.encoders import build_condition_encoder
from sources.captions import TokenizedCaptions, encode_prompts, mirror_caption
from sources import tokenizer
from sources.tokenizer import get_tokenizer
from conftest import expect_one_line_error, load_ckpt as ckpt
from models.dit import DiT

CAPS = ["a large red disc at the middle of a dark background", "", "héllo wörld, 123 <|endoftext|> !", "x" * 100]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test here runs with the network unreachable: any connection attempt fails loudly."""
    def refuse(*a, **k):
        raise OSError("network access attempted in an offline test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")          # and tiktoken may cache nothing anywhere


def encoder(**kw):
    args = dict(context_length=32, depth=2, heads=2)
    args.update(kw)
    torch.manual_seed(0)
    return encoders.build_condition_encoder("text", 16, **args)


# ---- tokenizer ----

def test_bytes_tokenizer_round_trip_padding_truncation():
    tok = get_tokenizer("bytes")
    assert (tok.eot_id, tok.pad_id, tok.vocab_size) == (256, 257, 258)
    y = tok(CAPS, 24)
    assert y.shape == (4, 24) and y.dtype == torch.long
    for caption, row in zip(CAPS, y.tolist()):
        raw = list(caption.encode("utf-8"))[:23]           # independent reference: the UTF-8 bytes themselves
        assert row == raw + [256] + [257] * (23 - len(raw))
    assert tok.decode(y[3]) == "x" * 23 and tok.decode(y[0]) == CAPS[0][:23]   # truncated; the end token is kept
    assert [tok.decode(r) for r in tok(CAPS[:3], 77)] == CAPS[:3]      # special-token text in a caption is plain text
    assert get_tokenizer("bytes") is tok and pickle.loads(pickle.dumps(tok)) is tok


def test_encoder_mask_is_real_tokens_and_null_is_empty_caption():
    enc = encoder()
    tok = get_tokenizer("bytes")
    y = tok(CAPS, 32)
    _, mask = enc.eval()(y)
    assert torch.equal(mask, y != tok.pad_id)
    assert mask.sum(1).tolist() == [min(len(c.encode()), 31) + 1 for c in CAPS]
    assert torch.equal(enc.null_like(y)[0], tok([""], 32)[0])
    drop = torch.tensor([True, False, True, False])
    dropped = enc.drop(y, drop)
    assert torch.equal(dropped[0], enc.null_like(y)[0]) and torch.equal(dropped[1], y[1]) and torch.equal(dropped[3], y[3])


def test_local_tiktoken_file_and_errors(tmp_path, monkeypatch):
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b"re": 256, b"red": 257})                # "red" = "re" + "d": two merges
    path = tmp_path / "tiny.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    assert hashlib.sha256(path.read_bytes()).hexdigest() != tokenizer.R50K_SHA256
    tok = get_tokenizer(str(path))
    assert (tok.eot_id, tok.pad_id, tok.vocab_size) == (258, 259, 260)
    y = tok(["red disc"], 10)[0].tolist()
    assert y == [257, 32, 100, 105, 115, 99, 258, 259, 259, 259] and tok.decode(y) == "red disc"
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        get_tokenizer(str(tmp_path / "missing.tiktoken"))
    (tmp_path / "bad.tiktoken").write_text("not base64 at all\n")
    with pytest.raises(ValueError, match="bad.tiktoken"):
        get_tokenizer(str(tmp_path / "bad.tiktoken"))
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("nope")
    import tiktoken
    def offline(name):
        raise ConnectionError("no route to host")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    get_tokenizer.cache_clear()
    try:
        with pytest.raises(ValueError, match="needs internet"):
            get_tokenizer("gpt2")
    finally:
        get_tokenizer.cache_clear()


# ---- text encoder ----

def test_padding_does_not_change_the_encoder_output():
    enc = encoder().eval()
    tok = get_tokenizer("bytes")
    caps = ["a red disc", "", "héllo wörld!"]                            # all fit in 16 tokens
    short, long = tok(caps, 16), tok(caps, 32)
    with torch.no_grad():
        c_s, m_s = enc(short)
        c_l, m_l = enc(long)
        assert torch.allclose(c_s, c_l[:, :16], atol=1e-5)               # same real tokens, more padding
        assert torch.count_nonzero(c_l[~m_l]) == 0                       # padding positions are zero
        assert torch.allclose(enc.pooled(c_s, m_s), enc.pooled(c_l, m_l), atol=1e-5)
        torch.nn.init.normal_(enc.token_embedding.weight[tok.pad_id:tok.pad_id + 1], std=5.0)
        c_l2, _ = enc(long)                                              # the pad embedding is never attended to
        assert torch.allclose(c_l, c_l2, atol=1e-5)
        pooled_ref = torch.stack([c_l[i, m_l[i]].mean(0) for i in range(3)])
        assert torch.allclose(enc.pooled(c_l, m_l), pooled_ref, atol=1e-6)


def test_cep_perturbs_real_tokens_of_real_captions_only():
    tok = get_tokenizer("bytes")
    y = tok(CAPS, 32)                                                    # row 1 is the empty (null) caption
    enc = encoder(cep="uniform", cep_gamma=1.0)
    with torch.no_grad():
        clean, mask = enc.eval()(y)
        noisy, _ = enc.train()(y)
    delta = noisy - clean
    bound = 1 / math.sqrt(16)                                            # d = D per token (16), not L * D
    assert delta.abs().max() <= bound + 1e-6 and delta[0, mask[0]].abs().max() > 0.5 * bound
    assert torch.count_nonzero(delta[1]) == 0                            # the null caption stays clean
    assert torch.count_nonzero(delta[~mask]) == 0                        # padding stays zero
    enc_all = encoder(cep="uniform", cep_null=True)
    with torch.no_grad():
        assert torch.count_nonzero(enc_all.train()(y)[0][1] - enc_all.eval()(y)[0][1]) > 0


# ---- text-conditional DiT ----

def tiny_text_dit(**kw):
    """A tiny DiT with a text encoder (context 64, width 32, 1 block, 2 heads); kw: the encoder's cep*, the DiT's rest."""
    enc = {k: kw.pop(k) for k in ("cep", "cep_gamma", "cep_null") if k in kw}
    args = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4, learn_sigma=False)
    args.update(kw)
    torch.manual_seed(0)
    return DiT(y_embedder=build_condition_encoder("text", 32, context_length=64, depth=1, heads=2, **enc), **args)


def test_text_dit_starts_as_identity_and_keeps_class_keys_separate():
    model = tiny_text_dit(learn_sigma=True).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    y = get_tokenizer("bytes")(CAPS[:2], 64)
    assert torch.count_nonzero(model(x, t, y)) == 0                      # adaLN-Zero + zero cross-attn output
    h = model.x_embedder(x) + model.pos_embed
    ctx, mask = model.y_embedder(y)
    c = model.t_embedder(t) + model.pooled_embedder(model.y_embedder.pooled(ctx, mask))
    assert torch.equal(model.blocks[0](h, c, ctx, mask), h)
    keys = model.state_dict().keys()
    assert "blocks.0.cross_attn.kv.weight" in keys and "y_embedder.token_embedding.weight" in keys
    class_keys = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4).state_dict()
    assert not any("cross" in k or "pooled" in k for k in class_keys)


def test_text_dit_learns_to_use_its_captions():
    """After a short training, the loss with the true captions is clearly lower than with other items' captions."""
    torch.manual_seed(0)
    tok = get_tokenizer("bytes")
    ds = TokenizedCaptions(data.BuiltinShapes(size=8, length=2000, seed=0), tok, 64, mirror=True)
    model = tiny_text_dit()
    dif = diff.GaussianDiffusion(diff.make_beta_schedule("linear", 1000), learn_sigma=False, loss="mse")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps, batch = 250, 32
    for step, keys in enumerate(data.StepSampler(len(ds), batch, 0, 1, seed=0, start_step=0, total_steps=steps)):
        x, y = torch.utils.data.default_collate([ds[k] for k in keys])
        y = model.cond.drop(y, torch.rand(batch) < 0.1)                 # CFG dropout, as the trainer does
        loss = dif.training_losses(lambda a, b: model(a, b, y), x)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    g = torch.Generator().manual_seed(1)                                 # a fixed eval batch, t and noise
    x, y = torch.utils.data.default_collate([ds[2 * i] for i in range(200)])
    t, noise = torch.randint(400, 800, (200,), generator=g), torch.randn(x.shape, generator=g)

    def loss_with(cond):
        with torch.no_grad():
            return dif.training_losses(lambda a, b: model(a, b, cond), x, t, noise)["loss"].mean().item()

    true, shuffled = loss_with(y), loss_with(y.roll(1, 0))              # neighbours always differ in colour
    assert shuffled > 1.05 * true, (true, shuffled)


# ---- captioned data and caption corruption ----

def test_caption_swap_counts_manifest_and_tokenised_items(tmp_path):
    import corrupt
    ds = data.BuiltinShapes(size=8, length=200, seed=0)
    clean = list(ds.captions)
    idx = data.apply_caption_corruption(ds, 0.05, "swap", seed=3, manifest_path=str(tmp_path / "m.json"))
    changed = [i for i in range(200) if ds.captions[i] != clean[i]]
    assert len(idx) == 10 and changed == idx.tolist() and sorted(ds.captions) == sorted(clean)
    m = corrupt.load_manifest(str(tmp_path / "m.json"))
    assert m["kind"] == "swap" and m["num_corrupted"] == 10 and m["indices"] == changed
    assert corrupt.apply_manifest(clean, m) == ds.captions
    tok = get_tokenizer("bytes")
    view = TokenizedCaptions(ds, tok, 77)
    x, ids = view[2 * changed[0]]
    assert x.shape == (3, 8, 8) and tok.decode(ids) == ds.captions[changed[0]] != clean[changed[0]]
    assert len(view) == 200 and view.image_size == 8                     # the rest of the protocol passes through
    assert pickle.loads(pickle.dumps(view))[4][1].tolist() == view[4][1].tolist()   # loader workers can get it


def test_caption_rewrite_from_file(tmp_path):
    ds = data.BuiltinShapes(size=8, length=200, seed=0)
    clean = list(ds.captions)
    rewrites = {str(i): f"a rewritten caption number {i}" for i in range(0, 200, 5)}      # 40 entries
    path = tmp_path / "rw.json"
    path.write_text(json.dumps(rewrites))
    idx = data.apply_caption_corruption(ds, 0.05, "rewrite", seed=0, rewrites=str(path),
                                        manifest_path=str(tmp_path / "m.json"))
    assert len(idx) == 10 and set(idx.tolist()) <= set(range(0, 200, 5))
    assert all(ds.captions[i] == rewrites[str(i)] for i in idx) and sum(a != b for a, b in zip(clean, ds.captions)) == 10
    ds2 = data.BuiltinShapes(size=8, length=200, seed=0)
    assert len(data.apply_caption_corruption(ds2, 0.0, "rewrite", rewrites=str(path))) == 40      # 0 = all entries
    with pytest.raises(ValueError, match="has 40"):
        data.apply_caption_corruption(data.BuiltinShapes(size=8, length=200), 0.5, "rewrite", rewrites=str(path))
    with pytest.raises(FileNotFoundError):
        data.apply_caption_corruption(ds2, 0.05, "rewrite", rewrites=str(tmp_path / "nope.json"))


def test_flipped_item_gets_the_mirrored_caption():
    ds = data.BuiltinShapes(size=8, length=200, seed=0)
    i = next(i for i in range(200) if "left" in ds.captions[i])
    tok = get_tokenizer("bytes")
    view = TokenizedCaptions(ds, tok, 77, mirror=True)
    assert tok.decode(view[2 * i][1]) == ds.captions[i]
    assert tok.decode(view[2 * i + 1][1]) == ds.captions[i].replace("left", "right")
    assert mirror_caption("left of the right copyright") == "right of the left copyright"


def test_loader_batches_of_the_token_view_carry_tokens():
    """The DataLoader's batched fetch of the token view gives (images, token ids (B, L)) equal to its items one by one,
    mirrored captions included; the view must not hand on the wrapped dataset's batch path, whose items carry labels."""
    tok = get_tokenizer("bytes")
    view = TokenizedCaptions(data.BuiltinShapes(size=8, length=200, seed=0), tok, 77, mirror=True)
    keys = [2 * i + (i % 3 == 0) for i in range(40)]
    loader = torch.utils.data.DataLoader(view, batch_sampler=[keys])
    x, ids = next(iter(loader))
    x1, ids1 = torch.utils.data.default_collate([view[k] for k in keys])
    assert ids.shape == (40, 77) and torch.equal(ids, ids1) and torch.equal(x, x1)
    assert any("right" in view.caption(k) and "left" in view.dataset.captions[k >> 1] for k in keys if k & 1)


def _image(path, colour):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), colour, np.uint8)).save(path)


def test_caption_folder_and_table(tmp_path):
    root = tmp_path / "cc"
    _image(root / "00000" / "000000001.jpg", (255, 0, 0))               # img2dataset: shards of key.jpg + key.txt
    (root / "00000" / "000000001.txt").write_text("a red\nsquare ")
    (root / "00000" / "000000001.json").write_text("{}")
    _image(root / "00001" / "000000002.png", (0, 0, 255))
    (root / "00001" / "000000002.txt").write_text("a blue square")
    ds = data.build_dataset(str(root), 8, captions=True)
    assert ds.captions == ["a red square", "a blue square"] and len(ds) == 2 and ds.num_classes == 0
    x, _ = ds[0]
    assert x.shape == (3, 8, 8) and x[0].min() > 0.9 and x[2].max() < -0.9
    table = tmp_path / "list.tsv"
    table.write_text("path\tcaption\ncc/00001/000000002.png\tblue, again\ncc/00000/000000001.jpg\tred\n")
    ds = data.build_dataset(str(table), 8)
    assert ds.captions == ["blue, again", "red"] and ds[0][0][2].min() > 0.9
    csv = tmp_path / "list.csv"
    csv.write_text('cc/00000/000000001.jpg,"red, with a comma"\n')
    assert data.build_dataset(str(csv), 8).captions == ["red, with a comma"]
    # errors name the bad thing
    (root / "00001" / "000000002.txt").unlink()
    with pytest.raises(ValueError, match="000000002.txt"):
        data.build_dataset(str(root), 8, captions=True)
    (root / "00001" / "000000002.txt").write_text("   ")
    with pytest.raises(ValueError, match="empty caption"):
        data.build_dataset(str(root), 8, captions=True)
    (root / "00001" / "000000002.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="cannot read caption"):
        data.build_dataset(str(root), 8, captions=True)
    (tmp_path / "bad.tsv").write_text("cc/00000/nope.jpg\tmissing image\n")
    with pytest.raises(ValueError, match="line 1: image not found"):
        data.build_dataset(str(tmp_path / "bad.tsv"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no captioned images"):
        data.build_dataset(str(tmp_path / "empty"), 8, captions=True)


# ---- train_dit.py --cond text ----

TINY = ["--cond", "text", "--image-size", "8", "--batch-size", "8", "--builtin-length", "64", "--num-workers", "0",
        "--log-every", "1", "--ckpt-every", "2", "--text-width", "32", "--text-depth", "1", "--text-heads", "2",
        "--context-length", "64", "--lr-warmdown", "0", "--min-snr", "0"]


def test_cli_text_run_writes_grid_with_captions_and_resumes_bit_identically(tmp_path):
    extra = ["--corrupt", "0.05", "--cep", "uniform", "--sample-every", "4", "--sample-steps", "2",
             "--sample-per-class", "1"]
    assert train_dit.main(TINY + ["--steps", "4", "--out", str(tmp_path / "straight"), *extra]) == 0
    assert train_dit.main(TINY + ["--steps", "2", "--out", str(tmp_path / "split"), *extra]) == 0
    assert train_dit.main(TINY + ["--steps", "4", "--resume", "auto", "--out", str(tmp_path / "split"), *extra]) == 0
    a, b = ckpt(tmp_path / "straight"), ckpt(tmp_path / "split")
    assert b["step"] == 4 and b["config"]["cond"] == "text" and b["config"]["corrupt_type"] == "swap"
    assert "y_embedder.token_embedding.weight" in a["model"] and "blocks.0.cross_attn.q.weight" in a["model"]
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    samples = tmp_path / "straight" / "samples"
    assert (samples / "step_0000004.png").is_file()
    prompts = (samples / "captions.txt").read_text().splitlines()
    assert prompts[0] == "a large red disc at the middle of a dark background" and len(prompts) == 10
    man = json.loads((tmp_path / "straight" / "corruption.json").read_text())
    assert man["kind"] == "swap" and man["num_corrupted"] == round(0.05 * 64)
    cfg = train_dit.DiTConfig(**{k: v for k, v in a["config"].items()})
    y = encode_prompts(cfg, prompts[:2])
    assert y.shape == (2, 64) and get_tokenizer("bytes").decode(y[1]) == prompts[1]
    model = dit.from_config(cfg, encoder_from_config)
    model.load_state_dict(a["ema"])                                      # the checkpoint rebuilds from its config
    out_channels = 6 if cfg.learn_sigma else 3                         # eps (+ the variance, with --learn-sigma)
    assert model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), y).shape == (2, out_channels, 8, 8)


def _expect_error(capsys, argv, needle):
    expect_one_line_error(capsys, train_dit.main, "train_dit.py", argv, needle)


def test_cli_bad_inputs_one_line_exit_2(tmp_path, capsys):
    base = TINY + ["--steps", "1", "--sample-every", "0"]
    cls = [a for a in base if a != "text"]
    cls[cls.index("--cond")] = "--cond=class"
    _expect_error(capsys, cls + ["--corrupt", "0.1", "--corrupt-type", "swap", "--out", str(tmp_path / "a")],
                  "needs --cond text")
    _expect_error(capsys, base + ["--corrupt", "0.1", "--corrupt-type", "symmetric", "--out", str(tmp_path / "b")],
                  "swap | rewrite")
    _expect_error(capsys, base + ["--corrupt", "0.1", "--corrupt-mode", "random", "--out", str(tmp_path / "c")],
                  "statically")
    _expect_error(capsys, base + ["--corrupt-type", "rewrite", "--out", str(tmp_path / "d")], "--corrupt-rewrites")
    _expect_error(capsys, base + ["--tokenizer", str(tmp_path / "gpt2.tiktoken"), "--out", str(tmp_path / "e")],
                  "gpt2.tiktoken")
    _expect_error(capsys, base + ["--text-width", "30", "--text-heads", "4", "--out", str(tmp_path / "f")],
                  "--text-width")
    folder = tmp_path / "imgs" / "cat"
    _image(folder / "a.png", (1, 2, 3))                                  # an image without its caption file
    _expect_error(capsys, base + ["--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "g")], "a.txt")
    (tmp_path / "t.tsv").write_text(f"{folder / 'a.png'}\tsomething\n")
    _expect_error(capsys, cls + ["--data", str(tmp_path / "t.tsv"), "--out", str(tmp_path / "h")], "--cond text")
    _expect_error(capsys, base + ["--corrupt-type", "rewrite", "--corrupt-rewrites", str(tmp_path / "no.json"),
                                  "--out", str(tmp_path / "i")], "no.json")
    assert not (tmp_path / "i" / "corruption.json").exists()
