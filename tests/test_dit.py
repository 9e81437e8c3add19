"""The DiT model of train_dit.py: official key layout and parameter counts, adaLN-Zero, position table, init."""
import math
import os

import numpy as np
import pytest
import torch

from conditions import ClassEmbedder
from diffusion import timestep_embedding
from models.dit import DiT, DiT_models, Mlp, default_arch, sincos_pos_embed_2d

KEYS = os.path.join(os.path.dirname(__file__), "data", "dit-xl-2_official_state_dict.txt")


def tiny(cep="none", **kw):
    """A tiny class DiT (5 classes), its class table handed in as dit.from_config does."""
    args = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4)
    args.update(kw)
    return DiT(y_embedder=ClassEmbedder(5, args["hidden_size"], cep=cep), **args)


def test_xl2_matches_official_layout_and_count():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    with open(KEYS) as f:
        theirs = [(ln.split(" (")[0], tuple(int(s) for s in ln.split(" (")[1].rstrip(")\n").split(",") if s.strip()))
                  for ln in f if ln.strip()]
    assert ours == theirs  # same names, same shapes, same order as the official state_dict
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


@pytest.mark.parametrize("name,count", [("DiT-S/2", 32_963_360), ("DiT-B/4", 130_475_648), ("DiT-L/8", 458_594_816),
                                        ("DiT-XL/4", 675_074_432)])
def test_official_parameter_counts(name, count):
    with torch.device("meta"):
        model = DiT_models[name]()
    assert sum(p.numel() for p in model.parameters()) == count


def test_adaln_zero_output_is_zero_at_init_and_shapes():
    torch.manual_seed(0)
    model = tiny().eval()
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 4, 5])
    out = model(x, t, y)
    assert out.shape == (3, 6, 8, 8)          # learn_sigma doubles the channels
    assert torch.count_nonzero(out) == 0
    # every block is the identity at init (its gates are zero), so the blocks pass the embedded tokens through
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    assert torch.equal(model.blocks[0](h, c), h)


def test_forward_depends_on_label_after_training_step():
    torch.manual_seed(0)
    model = tiny(learn_sigma=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,))
    for _ in range(3):
        loss = (model(x, t, torch.tensor([0, 1, 2, 3])) - x).pow(2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    model.eval()
    a = model(x, t, torch.tensor([0, 0, 0, 0]))
    b = model(x, t, torch.tensor([1, 1, 1, 1]))
    assert not torch.allclose(a, b)


def test_convolutions_add_their_modules_only_when_on_and_start_at_zero():
    """pixel_channels / token_conv add modules (the official keys stay when off) and keep the output 0 at init."""
    plain, conv = tiny(), tiny(pixel_channels=8, token_conv=True)
    extra = set(conv.state_dict()) - set(plain.state_dict())
    assert {k for k in extra if k.startswith("blocks.")} == {f"blocks.{i}.mlp.token_conv.{w}" for i in range(2)
                                                             for w in ("weight", "bias")}
    assert {k.split(".")[0] for k in extra} == {"blocks", "pixel_in", "pixel_stem", "pixel_merge", "pixel_head",
                                                "pixel_out"}
    assert set(plain.state_dict()) <= set(conv.state_dict())
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 4, 5])
    out = conv(x, t, y)
    assert out.shape == (3, 6, 8, 8) and torch.count_nonzero(out) == 0


def test_cpu_additions_default_on_for_the_tiny_dit_only():
    """The convolutions and 2x-wide MLPs are the tiny DiT-T's defaults; DiT-S to XL stay the official DiT (4x)."""
    assert default_arch("DiT-T/2") == {"pixel_channels": 32, "token_conv": True, "mlp_ratio": 2.0}
    official = {"pixel_channels": 0, "token_conv": False, "mlp_ratio": 4.0}
    assert default_arch("DiT-XL/2") == default_arch("DiT-S/4") == official
    assert default_arch("DiT-T/2", 0, False, 4) == official                                      # given values win
    assert default_arch("DiT-B/2", 16, None, 3) == {"pixel_channels": 16, "token_conv": False, "mlp_ratio": 3.0}
    mlps = [b.mlp.fc1.out_features for b in DiT_models["DiT-T/2"](input_size=8, **default_arch("DiT-T/2")).blocks]
    assert mlps == [256] * 4                                                                     # 2 x width 128


@pytest.mark.parametrize("token_conv", [False, True])
def test_token_conv_mixes_exactly_the_8_neighbours(token_conv):
    """Mix-FFN: an MLP's output at token (1, 1) of a 4x4 grid depends on its 3x3 neighbourhood (row-major tokens);
    without token_conv, on the token alone."""
    torch.manual_seed(0)
    mlp = Mlp(8, 16, token_conv)
    x = torch.randn(1, 16, 8, requires_grad=True)                  # (B, T, D): a 4x4 token grid
    mlp(x)[0, 5].sum().backward()                                   # token 5 = row 1, column 1
    reached = set((x.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist())
    assert reached == ({r * 4 + c for r in range(3) for c in range(3)} if token_conv else {5})


def test_pixel_blocks_carry_the_input_past_the_transformer():
    """With the transformer's output cut (final layer zeroed) the pixel stem's features still reach the head through
    the skip, aligned: an output pixel follows the input most where the convs reach it (6 3x3 convs: within 6 pixels;
    GroupNorm's statistics make every pixel count a little)."""
    torch.manual_seed(0)
    model = tiny(input_size=16, pixel_channels=8, learn_sigma=False)
    with torch.no_grad():
        for p in model.parameters():                                # open every zero-initialised branch
            if p.requires_grad and not p.any():
                p.normal_(0, 0.1)
        model.final_layer.linear.weight.zero_()
        model.final_layer.linear.bias.zero_()
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    model(x, torch.tensor([300]), torch.tensor([1]))[0, :, 4, 11].sum().backward()
    pull = x.grad[0].abs().sum(0)                                    # (16, 16): how much each input pixel moves it
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    near = ((rows - 4).abs() <= 6) & ((cols - 11).abs() <= 6)
    assert pull.sum() > 0 and pull[near].sum() > 0.8 * pull.sum()
    assert (pull == pull.max()).nonzero().tolist() == [[4, 11]]    # the pixel itself moves it most


def test_pos_embed_matches_numpy_reference():
    """The MAE/DiT table, written independently in numpy: grid = meshgrid(w, h), first half encodes grid[0]."""
    dim, g = 16, 4
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), axis=0)
    ref = np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=1)
    assert np.allclose(sincos_pos_embed_2d(dim, g).numpy(), ref, atol=1e-6)


def test_timestep_embedding_cos_first():
    t = torch.tensor([0.0, 10.0])
    e = timestep_embedding(t, 8)
    freqs = np.exp(-math.log(10000) * np.arange(4) / 4)
    ref = np.concatenate([np.cos(10.0 * freqs), np.sin(10.0 * freqs)])
    assert np.allclose(e[1].numpy(), ref, atol=1e-5)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_init_statistics():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=256, depth=1, num_heads=4, num_classes=1000)
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.002
    assert model.y_embedder.embedding_table.weight.shape[0] == 1001      # null class row for CFG
    w = model.blocks[0].mlp.fc1.weight                                     # xavier uniform bound sqrt(6/(fan_in+fan_out))
    assert w.abs().max() <= math.sqrt(6 / (256 + 1024)) + 1e-6
    assert not model.pos_embed.requires_grad


def test_non_square_and_wrong_size_rejected():
    model = tiny()
    with pytest.raises(ValueError, match="square"):
        model(torch.randn(1, 3, 8, 6), torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="divisible"):
        DiT(input_size=9, patch_size=2)


def test_cep_only_while_training():
    torch.manual_seed(0)
    model = tiny(cep="uniform")
    y = torch.tensor([1, 2, 5])                       # 5 = null label: left clean by default
    model.train()
    e1, e2 = model.y_embedder(y), model.y_embedder(y)
    clean = model.y_embedder.embedding_table(y)
    assert not torch.equal(e1[:2], e2[:2]) and torch.equal(e1[2], clean[2])
    assert (e1 - clean).abs().max() <= 1 / math.sqrt(32) + 1e-6
    model.eval()
    assert torch.equal(model.y_embedder(y), clean)
