"""CUDA checks of nanoCEP's GPU path (marker `gpu`). Every test skips without CUDA, so CPU CI lists them as skipped.

Run on a GPU machine: python -m pytest -q -m gpu tests/test_gpu.py      (python -m tools.gpu_suite runs and summarises it)

Precision regimes and tolerances (rel = ||a - b|| / ||b||; fp32 references run with TF32 off):
  compiled bf16-autocast training step vs fp32 eager: output rel < 3e-2, loss rel < 1e-2, gradient cosine > 0.99
  fused AdamW vs the single-tensor loop: rtol 1e-5, atol 1e-6 (fp32 states, same arithmetic in another order)
  bf16-autocast DPM-Solver++ sampling vs fp32: final latents rel < 5e-2 (20 steps, CFG 4)
  KL / VQ decode and KL encode, bf16 autocast or bf16 weights, vs fp32: rel < 5e-2 (tiny random autoencoders)
  VQ nearest codes under bf16 autocast: every index is the float64 nearest code up to a 1e-5 distance tie
bf16 has an 8-bit mantissa (4e-3 per rounding); the tolerances leave room for a few layers of it, not for a wrong op.
"""
import socket
from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DIT_T = ("train_dit", ["--model", "DiT-T/2", "--num-classes", "10", "--image-size", "16"])
UNET_T = ("train_ldm", ["--model", "unet-tiny", "--num-classes", "10", "--image-size", "16"])
BF16 = dict(device_type="cuda", dtype=torch.bfloat16)



@contextmanager
def fp32_exact():
    """Plain fp32 matmuls and convolutions (no TF32) for a reference."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def perturb(model, std=0.05, seed=0):
    """Add noise to every parameter: adaLN-Zero and zero-init convs make a fresh model's output exactly 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g).to(p.device))
    return model


def build(script_name, argv):
    """(family, cfg, perturbed model on CUDA in eval mode (no dropout / CEP draws), diffusion) of a train script."""
    from config import parse_config
    from tools.measure import family
    family = family(script_name)
    cfg = family.resolve(parse_config(family.config, argv))
    torch.manual_seed(0)
    model, diffusion = family.build(cfg)
    return family, cfg, perturb(model).cuda().eval(), diffusion


def batch(family, cfg, B=16, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = cfg.latent_shape
    x0 = torch.randn(B, *shape, device="cuda", generator=g)
    t = torch.randint(0, 1000, (B,), device="cuda", generator=g)
    noise = torch.randn(B, *shape, device="cuda", generator=g)
    return x0, t, noise, torch.randint(0, 10, (B,), device="cuda", generator=g)


# ---- training step: bf16 + compile vs fp32 eager, fused AdamW ----


@pytest.mark.parametrize("script_name,argv", [DIT_T, UNET_T], ids=["dit", "unet"])
def test_compiled_bf16_step_matches_fp32_eager(script_name, argv):
    script, cfg, model, diffusion = build(script_name, argv)
    x0, t, noise, y = batch(script, cfg)
    x_t = diffusion.q_sample(x0, t, noise)

    def loss_out_grad(fn, autocast):
        model.zero_grad(set_to_none=True)
        with autocast:
            out = fn(x_t, t, y).float()
            loss = diffusion.training_losses(lambda xt, tt: fn(xt, tt, y), x0, t, noise)["loss"].mean()
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return loss.detach(), out.detach(), grad

    with fp32_exact():
        ref_loss, ref_out, ref_grad = loss_out_grad(model, nullcontext())
    loss, out, grad = loss_out_grad(torch.compile(model), torch.autocast(**BF16))
    assert rel_err(out, ref_out) < 3e-2
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-2
    assert F.cosine_similarity(grad, ref_grad, dim=0).item() > 0.99
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True).step()   # the trainer's optimiser on these grads
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.grad is not None]
    assert all(moved) and all(torch.isfinite(p).all() for p in model.parameters())


def test_fused_adamw_matches_single_tensor_loop():
    torch.manual_seed(0)
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in [(64, 32), (32,), (7, 5, 3)]]
    ref = [p.detach().clone().requires_grad_(True) for p in params]
    start = [p.detach().clone() for p in params]
    fused = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, fused=True)
    loop = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.01, foreach=False, fused=False)
    for _ in range(5):
        for p, q in zip(params, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for p, q, s in zip(params, ref, start):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert (p - s).abs().max() > 1e-3                     # five steps of lr 1e-2 moved every tensor


# ---- attention: SDPA's flash kernel ----


def sdpa_ops(fn) -> set:
    """The aten SDPA implementations (flash / cudnn / efficient / math) that fn() dispatches to."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key.replace("aten::_scaled_dot_product_", "") for e in prof.key_averages()
            if e.key.startswith("aten::_scaled_dot_product_") and "for_cpu" not in e.key}


def test_dit_xl2_attention_runs_on_flash_and_default_is_fused(record_property):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from train_dit import Attention
    attn = Attention(1152, 16).cuda()                         # DiT-XL/2: head dim 72, 256 tokens at 256^2
    x = torch.randn(8, 256, 1152, device="cuda", requires_grad=True)
    with torch.autocast(**BF16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):   # raises if flash cannot take it
        attn(x).float().square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.autocast(**BF16):
        ops = sdpa_ops(lambda: attn(x))
    record_property("sdpa_dit_xl2", "+".join(sorted(ops)))
    assert ops & {"flash_attention", "cudnn_attention"}, f"default SDPA dispatch chose {ops}, not a fused kernel"


@pytest.mark.parametrize("script_name,argv", [DIT_T, UNET_T], ids=["dit", "unet"])
def test_whole_tiny_model_trains_with_flash_only(script_name, argv):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    script, cfg, model, diffusion = build(script_name, argv)
    x0, t, noise, y = batch(script, cfg)
    with torch.autocast(**BF16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        loss = diffusion.training_losses(lambda xt, tt: model(xt, tt, y), x0, t, noise)["loss"].mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_ldm4_attention_is_too_wide_for_flash(record_property):
    """cin256-v2 attends with ONE head of width 384 / 576 / 960: flash takes head dims <= 256 only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from train_ldm import CrossAttention
    attn = CrossAttention(384, heads=1, dim_head=384).cuda()  # level 2 (32 x 32 latent pixels = 1024 tokens)
    x = torch.randn(4, 1024, 384, device="cuda")
    with torch.autocast(**BF16), sdpa_kernel(SDPBackend.FLASH_ATTENTION), pytest.raises(RuntimeError):
        attn(x)
    with torch.autocast(**BF16):
        ops = sdpa_ops(lambda: attn(x))
    record_property("sdpa_ldm4_level2", "+".join(sorted(ops)))
    assert ops                                                # it still runs, on whichever kernel takes it


# ---- NCCL: a 1-process group through trainer.setup_distributed ----


def test_nccl_one_process_group(monkeypatch):
    import torch.distributed as dist

    import trainer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                 "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    d = trainer.setup_distributed("cuda", timeout=120)
    try:
        assert dist.get_backend() == "nccl" and d.world == 1 and d.device.type == "cuda"
        x = torch.arange(1.0, 5.0, device=d.device)
        dist.all_reduce(x)                                    # SUM over one rank
        assert torch.equal(x.cpu(), torch.arange(1.0, 5.0))
        objs = [None]
        dist.all_gather_object(objs, {"rank": d.rank})        # latents.py's error sync uses this
        assert objs == [{"rank": 0}]
        model = torch.nn.Linear(8, 4).cuda()
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank])
        ddp(torch.ones(2, 8, device="cuda")).sum().backward()
        torch.testing.assert_close(model.weight.grad, torch.full((4, 8), 2.0, device="cuda"))
    finally:
        dist.destroy_process_group()


# ---- sampling and autoencoders in bf16 ----


def test_bf16_sampling_matches_fp32():
    from diffusion import cfg_model_fn
    script, cfg, model, diffusion = build(*DIT_T)
    y = torch.arange(8, device="cuda") % 10
    noise = torch.randn(8, *cfg.latent_shape, generator=torch.Generator().manual_seed(3)).cuda()
    fn = cfg_model_fn(model, y, model.cond.null_like(y), 4.0, learn_sigma=True)
    with fp32_exact():
        ref = diffusion.sample(fn, noise, sampler="dpm++", steps=20)
    with torch.autocast(**BF16):
        got = diffusion.sample(fn, noise, sampler="dpm++", steps=20)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert rel_err(got, ref) < 5e-2


def tiny_autoencoder(kind):
    from weights import vae
    torch.manual_seed(0)
    extra = {"num_codes": 64} if kind == "vq-f4" else {}
    return perturb(vae.build_vae(kind, block_out_channels=(32, 64), **extra), std=0.1).cuda().eval()


@pytest.mark.parametrize("kind", ["kl-f8", "vq-f4"])
def test_bf16_decode_and_encode_match_fp32(kind):
    ae = tiny_autoencoder(kind)
    z = torch.randn(4, ae.latent_channels, 16, 16, device="cuda")
    x = torch.rand(4, 3, 32, 32, device="cuda") * 2 - 1
    with torch.no_grad():
        with fp32_exact():
            ref_x, ref_z = ae.decode(z), ae.encode_moments(x)[0]
        with torch.autocast(**BF16):                          # evaluate.py: fp32 weights under autocast
            auto_x = ae.decode(z)
        ae16 = ae.to(torch.bfloat16)                          # latents.py --precision bf16: bf16 weights
        w16_x, w16_z = ae16.decode(z), ae16.encode_moments(x)[0]
    assert auto_x.dtype == w16_x.dtype == torch.float32
    assert rel_err(auto_x, ref_x) < 5e-2                      # VQ: fails while autocast picks codes in bf16
    assert rel_err(w16_z, ref_z) < 5e-2
    if kind == "kl-f8":   # a VQ model cast to bf16 rounds its codebook and so picks other codes: no nanoCEP path
        assert rel_err(w16_x, ref_x) < 5e-2                   # decodes that way (evaluate.py keeps fp32 weights)


def test_vq_codes_under_bf16_autocast_are_the_nearest():
    """On CUDA: autocast must not turn the nearest-code distances into bf16 (8192 codes of width 3
    lie so densely that bf16's 3 significant digits pick a wrong code for many vectors)."""
    from weights import vae
    torch.manual_seed(0)
    q = vae.build_vae("vq-f4", block_out_channels=(32, 64)).quantize.cuda()   # the released codebook shape
    z = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.autocast(**BF16):
        got = q.indices(z).flatten()                          # (N,)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3).double()      # (N, 3)
    d = torch.cdist(flat, q.embedding.weight.double()) ** 2   # (N, K) exact squared distances
    gap = d.gather(1, got[:, None])[:, 0] - d.min(1).values
    assert (gap <= 1e-5).all(), f"{(gap > 1e-5).float().mean():.2%} of the codes are not the nearest"
