"""
evaluate.py: FID, Inception Score and precision/recall of nanoCEP samples, the paper's 50K-sample protocol.

Sample a checkpoint over a grid of guidance scales, then measure every scale (one row per scale):
    python evaluate.py CKPT --num-samples 50000 --cfg-scales 1.5,1.75,2.0 --sampler dpm++ --steps 50 --ref REF --npz
    torchrun --nproc_per_node=8 evaluate.py CKPT ...        # each rank samples (and featurizes) its own slice
CADS (condition-annealed sampling, cads.py) on any sampler, class or text, checkpoint or release (off by default):
    python evaluate.py CKPT --cads-noise 0.1 --cads-tau1 0.6 --cads-tau2 0.9 --cads-psi 1 ...
Released weights (pretrained.py) instead of a checkpoint, and a quick preview grid (no metrics):
    python evaluate.py --pretrained DiffusionNoise/dit-xl-2_imagenet_clean --cfg-scales 1.75 --ref REF ...
    python evaluate.py --pretrained DiT-XL-2-256 --classes 88,207,360 --grid preview.png --cfg-scales 4
Prepare an FID reference once (training's ADM centre crop to N, then the feature pipeline; labelled with it):
    python evaluate.py ref --data /data/imagenet/val --image-size 256 --out in1k_val_256.npz [--pipeline ...]
    python evaluate.py ref --data builtin --image-size 16 --seed 1 --builtin-length 10000 --out builtin_ref.npz
Measure samples that already exist: a folder of images, an ADM .npz (uint8 NHWC arr_0) or a features .npz:
    python evaluate.py metrics --samples DIR_OR_NPZ [MORE ...] [--cfg-scales 1.5,...] --ref REF [--out DIR]
Overlay runs, FID against IS (and precision against recall) across guidance scales, like the paper's Fig. 3:
    python evaluate.py plot clean/results.json cep/results.json -o fid_is.png

REF: a folder of images (e.g. ImageNet val), a statistics .npz with mu/sigma (clean-fid custom stats, or an ADM
reference batch whose arr_0 images then serve precision/recall), or a features .npz written here (key feats).
Features come from one pass of clean-fid's Inception (mode "clean": clean-fid's bicubic resize to 299), giving the
2048-d pool features (FID, precision/recall) and the 1008-way logits (IS) at once. clean-fid downloads that network
to /tmp/inception-2015-12-05.pt on first use; offline, copy the file there or pass --inception PATH.
--features FILE swaps in any TorchScript extractor f(x (B,3,H,W) floats in [0,255]) -> feats or (feats, logits).
Built-in data: --features $(python -m scoring.judge path) --resize none --ref ref.npz --train-ref auto adds the
class_acc and diversity columns, and a built-in checkpoint's rows always carry shape_iou_disc / shape_iou_cross
(each sample's best IoU against real items of its shape, scoring/shapes.py); --train-ref (any data) adds the
memorization columns (scoring/memorization.py: the ratio test in pixels and features, nearest-item distances beside
fresh real images'; --mem-tau the absolute form).
--pipeline legacy_tensorflow feeds the raw image to the same Inception file, which resizes inside as TF did (the ADM
evaluator's pipeline, for numbers beside DiT's and the paper's). Reference images (a folder, an arr_0) are
centre-cropped to the samples' resolution; features from different pipelines are never compared (metrics.py).
Writes OUT/results.json and OUT/results.csv (and OUT/provenance.json: the code's commit, the machine, the command
line, also inside results.json); features are cached as .npz in OUT/features for reuse. Every file is written
atomically; a write that fails (full disk) ends the run on every rank with one line naming the file, exit 1.
The metrics and the feature pass live in metrics.py; this file samples, shards over ranks, and runs the CLI.
"""

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from plumbing import provenance
from plumbing.common import (ArgParser, RunError, WriteFailed, atomic_open, leave_process_group, new_file,
                             setup_distributed, writes_shared)
from runio import TrackerFailed, load_checkpoint, start_agreed
from sources.captions import read_prompts
from config import LATENT_GEOMETRY
from scoring.metrics import (INCEPTION_PATH, METRIC_COLUMNS, PIPELINES, Featurizer, check_pipelines, check_reference_size,
                             check_train_reference_size, compute_metrics, count_items, image_size_of, load_reference,
                             load_train_reference, min_samples, pipeline_label, plot_fid_is, read_results,
                             reference_kind, reference_pipeline, npz_keys, save_npz, source_pipeline, write_reference,
                             write_results)
from scoring import memorization, shapes
from scoring.control import COLUMNS as EDGE_COLUMNS
from scoring.held_out import HeldOutControls
from sources.builtin import BUILTIN_COLOURS, BUILTIN_SHAPES
from trackers import tracking

SAMPLERS = ("dpm++", "ddim", "ddpm")
PIXEL_TEST_MAX_SIDE = 64        # samples up to this side go to rank 0 as pixels for the pixel-space memorization test

# ---- sampling ----


def balanced_labels(num_samples, num_classes):
    """Class labels cycling over all classes: 50 per class for 50K samples of 1000 classes."""
    return np.arange(num_samples) % num_classes


def sample_seeds(num_samples, seed=0):
    """One seed per image (seed + index), so any single image can be redrawn on its own."""
    return seed + np.arange(num_samples)


def shard_indices(num_samples, rank, world_size):
    """This rank's contiguous slice of the sample indices (shards differ in size by at most one)."""
    return np.array_split(np.arange(num_samples), world_size)[rank]


def families() -> dict:
    """Checkpoint kind -> config.Family (its config class, presets, resolve and build): how any checkpoint is rebuilt."""
    import train_dit
    import train_ldm
    return {"dit": train_dit.FAMILY, "ldm": train_ldm.FAMILY}


def load_model(ckpt, device="cpu", ema=True):
    """(model, diffusion, cfg, state) of the nanoCEP checkpoint CKPT, rebuilt through families() from its stored config;
    the model in eval mode without gradients, holding the EMA weights (ema=True) or the raw ones."""
    try:
        state = load_checkpoint(str(ckpt))
    except RunError as e:
        raise ValueError(str(e)) from None
    kind, FAMILIES = state.get("kind"), families()
    if kind not in FAMILIES:
        raise ValueError(f"{ckpt}: unknown checkpoint kind {kind!r} (expected one of {', '.join(FAMILIES)})")
    cfg = FAMILIES[kind].config_from(state["config"])
    model, diffusion = FAMILIES[kind].build(cfg)
    try:
        model.load_state_dict(state["ema" if ema else "model"])
    except RuntimeError as e:
        raise ValueError(f"{ckpt}: weights do not fit the stored config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval().requires_grad_(False), diffusion, cfg, state


def load_sampler(ckpt, device="cpu", ema=True, sampler="dpm++", steps=50, precision="auto", vae_path=None,
                 prompts=None, cads=None, raw_class_embedding=False, control_items=None):
    """Rebuild the model stored in CKPT: (sample_fn(labels (B,), seeds list, cfg_scale) -> uint8 (B, H, W, 3), info).

    The model is rebuilt through families() (checkpoint kind -> its config class and build) from the config
    stored in the checkpoint, so any nanoCEP checkpoint samples without flags. Image i starts from the noise of
    torch.Generator().manual_seed(seeds[i]) (on the CPU), so a sharded run reproduces a single-process one.
    info holds num_classes and the settings that belong in results rows. A text-conditional checkpoint needs `prompts`
    (a list of captions): "labels" then index the prompts, so balanced labels cycle through them.
    raw_class_embedding: a --label-smoothing model samples with its raw class rows E[y] instead of the smoothed
    embedding it was trained on (conditions.ClassEmbedder).
    """
    model, diffusion, cfg, state = load_model(ckpt, device, ema)
    kind = state["kind"]
    if raw_class_embedding:
        if not getattr(cfg, "label_smoothing", 0.0):
            raise ValueError(f"--raw-class-embedding: {ckpt} was trained without --label-smoothing, so its class rows "
                             f"are already what it samples with; drop the flag")
        model.cond.raw_at_sampling = True
    decode = None
    if getattr(cfg, "vae", "none") != "none":
        from weights import vae
        decode = vae.load_vae(cfg.vae, vae_path or cfg.vae_path or None, device=device).decode
    use_bf16 = precision == "bf16" or (precision == "auto" and str(device).startswith("cuda"))
    sample_fn = make_sample_fn(model, diffusion, cfg.latent_shape, decode, device, sampler, steps, use_bf16,
                               learn_sigma=getattr(cfg, "learn_sigma", False), cads=cads, control_items=control_items)
    info = {"num_classes": cfg.num_classes, "kind": kind, "model": getattr(cfg, "model", kind),
            "train_step": int(state["step"]), "vae": getattr(cfg, "vae", "none"),
            "dtype": "bf16" if use_bf16 else "fp32", "cond": getattr(cfg, "cond", "class"),
            "class_dropout": cfg.class_dropout, "image_size": cfg.image_size,
            "class_embedding": "raw" if raw_class_embedding else "as trained", **condition_scale(model, cfg)}
    if info["cond"] == "text":
        if not prompts:
            raise ValueError(f"{ckpt} is text-conditional: pass --prompts FILE (one caption per line)")
        from sources.captions import encode_prompts
        class_fn = sample_fn

        def sample_fn(labels, seeds, cfg_scale):        # noqa: F811  (labels index the prompts)
            return class_fn(encode_prompts(cfg, [prompts[int(i)] for i in labels]), seeds, cfg_scale)

        info["num_classes"] = len(prompts)
    return sample_fn, info


@torch.no_grad()
def condition_scale(model, cfg) -> dict:
    """A class-conditional checkpoint's class_embed_norm (mean L2 norm over the real classes of the embedding the model
    is fed at sampling: the smoothed row under --label-smoothing, unless raw_at_sampling), cep_noise_norm (the RMS L2
    norm of CEP's training noise, sqrt(d) x its per-element std: gamma/sqrt(3) uniform, gamma gaussian) and their ratio
    cep_noise_to_embed (0 without CEP): how large the perturbation is beside what it perturbs. {} for other models."""
    import cep
    enc = model.cond
    if getattr(enc, "kind", None) != "class" or not hasattr(enc, "embedding_table"):
        return {}
    was_training = enc.training
    emb = enc.eval()(torch.arange(enc.num_classes, device=enc.embedding_table.weight.device))   # (K, D), no CEP
    enc.train(was_training)
    embed_norm = float(emb.double().norm(dim=1).mean())
    d = emb.shape[-1]
    noise_norm = math.sqrt(d) * cep.noise_std(getattr(cfg, "cep", "none"), getattr(cfg, "cep_gamma", 0.0), d)
    return {"class_embed_norm": embed_norm, "cep_noise_norm": noise_norm,
            "cep_noise_to_embed": noise_norm / embed_norm if noise_norm > 0 else 0.0}


def make_sample_fn(model, diffusion, shape, decode, device, sampler, steps, use_bf16, *, learn_sigma=False,
                   null_class=None, guide_channels=None, timesteps=None, eta=0.0, cads=None, control_items=None):
    """sample_fn(labels (B,), seeds, cfg_scale) -> uint8 (B, H, W, 3): CFG sampling from per-image seeded noise.

    Image i's generator torch.Generator().manual_seed(seeds[i]) draws its initial noise and then, for ddpm and ddim
    with eta > 0, its per-step noise: an image depends on its seed only, so shards reproduce one process bit for bit.
    null_class: the CFG null label (default: the model's condition encoder's); guide_channels: guide only the first
    N latent channels (official DiT: 3); timesteps: explicit dpm++ timesteps (a release's scheduler spacing);
    cads: a cads.CADS that anneals the condition embedding along the chain (its noise seeded per image too).
    control_items (a ControlNet): labels index held-out items; control_items(labels) -> (their classes, control maps)."""
    from contextlib import nullcontext
    from diffusion import cfg_model_fn, sample_dpmpp_2m
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else torch.autocast("cpu", enabled=False)

    @torch.no_grad()
    def sample_fn(labels, seeds, cfg_scale):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]     # one CPU generator per image
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
        net = model
        if control_items is not None:                  # every sample follows its held-out item's control map
            labels, maps = control_items(labels)
            net = functools.partial(model, control=maps.to(device))
        y = torch.as_tensor(labels).to(device)
        y_null = model.cond.null_like(y) if null_class is None else torch.full_like(y, null_class)
        fn = cfg_model_fn(net, y, y_null, cfg_scale, learn_sigma=learn_sigma, guide_channels=guide_channels)
        annealing = (nullcontext() if cads is None else      # CADS: the null branch stays clean
                     cads.sampling(model, model.cond, seeds, diffusion.num_timesteps))
        with autocast, annealing:
            if timesteps is not None and sampler == "dpm++":
                x = sample_dpmpp_2m(fn, noise.to(device), diffusion.alphas_cumprod, timesteps, learn_sigma=learn_sigma)
            else:
                x = diffusion.sample(fn, noise.to(device), sampler=sampler, steps=steps, clip_x0=decode is None,
                                     eta=eta, generator=None if sampler == "dpm++" else gens)
            if decode is not None:
                x = decode(x)
        # DiT's sample_ddp.py mapping of [-1, 1] to uint8
        return (x.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    return sample_fn


def load_pretrained_sampler(source, device="cpu", sampler="dpm++", steps=50, precision="auto", vae_path=None,
                            guide_channels="auto", cads=None):
    """(sample_fn, info) for a released model (pretrained.py): its schedule, null label, CFG channels and, for dpm++,
    the timesteps diffusers' DPMSolverMultistepScheduler.from_config(release scheduler) would visit."""
    from weights import pretrained
    from diffusion import GaussianDiffusion
    p = pretrained.load_pretrained(source, vae_path=vae_path, guide_channels=guide_channels)
    cfg = p["config"]
    model = p["model"].to(device).requires_grad_(False)
    decode = p["vae"].to(device).decode if p["vae"] is not None else None
    diffusion = GaussianDiffusion(p["betas"], learn_sigma=cfg["learn_sigma"])
    timesteps = pretrained.dpm_timesteps(cfg["scheduler"], steps) if sampler == "dpm++" else None
    shape = (cfg["in_channels"], cfg["latent_size"], cfg["latent_size"])
    use_bf16 = precision == "bf16" or (precision == "auto" and str(device).startswith("cuda"))
    sample_fn = make_sample_fn(model, diffusion, shape, decode, device, sampler, steps, use_bf16,
                               learn_sigma=cfg["learn_sigma"], null_class=p["null_class"],
                               guide_channels=cfg["guide_channels"], timesteps=timesteps, cads=cads)
    info = {"num_classes": cfg["num_classes"], "kind": cfg["kind"], "model": cfg["name"], "format": cfg["format"],
            "vae": cfg["vae"], "dtype": "bf16" if use_bf16 else "fp32", "null_class": p["null_class"],
            "image_size": cfg["latent_size"] * LATENT_GEOMETRY[cfg["vae"]][1],
            "guide_channels": cfg["guide_channels"] or shape[0], "timestep_spacing":
                cfg["scheduler"].get("timestep_spacing", "linspace") if sampler == "dpm++" else "nanoCEP"}
    return sample_fn, info


def save_preview(sample_fn, classes, per_class, cfg_scales, seed, path):
    """A PNG grid: one row per (scale, class), per_class images each (image i of a row uses seed + i)."""
    rows = []
    for scale in cfg_scales:
        for c in classes:
            rows.append(np.concatenate(list(sample_fn(torch.full((per_class,), c), [seed + i for i in range(per_class)],
                                                      scale)), axis=1))           # (H, per_class * W, 3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_png(np.concatenate(rows, axis=0), path)
    return path


def save_png(image: np.ndarray, path) -> None:
    """A uint8 (H, W, 3) image as a PNG, atomically."""
    with atomic_open(path) as f:
        Image.fromarray(image).save(f, format="png")


def sample_shard(sample_fn, labels, seeds, indices, cfg_scale, batch_size, png_dir=None):
    """Generate images `indices` of the run in batches: uint8 (n, H, W, 3); optionally one {index:06d}.png each."""
    chunks = []
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        images = np.asarray(sample_fn(torch.as_tensor(labels[idx]), seeds[idx].tolist(), cfg_scale))
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(idx) or images.shape[-1] != 3:
            raise ValueError(f"sample_fn must return uint8 ({len(idx)}, H, W, 3), got {images.dtype} {images.shape}")
        if png_dir is not None:
            Path(png_dir).mkdir(parents=True, exist_ok=True)
            for i, image in zip(idx, images):
                save_png(image, Path(png_dir) / f"{i:06d}.png")
        chunks.append(images)
    return np.concatenate(chunks)


def merge_shards(scale_dir, world_size, keep_images, pipeline=None):
    """Rank 0: join the ranks' shard files in index order into features.npz (and samples.npz, ADM format);
    features.npz carries the feature pipeline's label and the image size, so it can be measured again safely.
    The joined images (shards that hold arr_0) come back as merged["images"] (the pixel-space memorization test)."""
    scale_dir = Path(scale_dir)
    shards = [np.load(scale_dir / f"shard{r:03d}.npz") for r in range(world_size)]
    join = lambda key: np.concatenate([s[key] for s in shards]) if key in shards[0].files else None
    merged = {key: join(key) for key in ("feats", "probs", "labels", "seeds", "index", "shape_iou")}
    if not np.array_equal(merged["index"], np.arange(len(merged["index"]))):
        raise ValueError(f"shards in {scale_dir} do not cover the samples in order")
    merged["pipeline"], merged["images"] = pipeline, join("arr_0")
    merged["image_size"] = int(shards[0]["image_size"]) if "image_size" in shards[0].files else None
    save_npz(scale_dir / "features.npz", feats=merged["feats"], probs=merged["probs"], labels=merged["labels"],
             seeds=merged["seeds"], pipeline=None if pipeline is None else np.array(pipeline),
             image_size=None if merged["image_size"] is None else np.array(merged["image_size"]))
    if keep_images:  # arr_0 uint8 NHWC is what the ADM evaluator reads; labels and seeds ride along
        save_npz(scale_dir / "samples.npz", arr_0=join("arr_0"), labels=merged["labels"], seeds=merged["seeds"])
    for r, s in enumerate(shards):
        s.close()
        (scale_dir / f"shard{r:03d}.npz").unlink()
    return merged


def shape_columns(merged) -> dict:
    """shape_iou_disc / shape_iou_cross of the merged samples (scoring/shapes.py); {} when they were not scored."""
    if merged.get("shape_iou") is None:
        return {}
    means = shapes.mean_per_shape(merged["shape_iou"], merged["labels"])
    return {f"shape_iou_{shape}": means.get(shape) for shape in BUILTIN_SHAPES}


def sample_and_evaluate(sample_fn, num_classes, cfg_scales, out_dir, featurizer, ref=None, num_samples=50_000,
                        seed=0, batch_size=64, write_png=False, write_npz=False, rank=0, world_size=1, settings=None,
                        k=3, is_splits=10, train_ref=None, mem_tau=None, keep_pixels=False, shape_fidelity=False):
    """Sample every guidance scale (this rank's slice), featurize, and on rank 0 merge, measure and write results.

    Returns the rows on rank 0 (None on other ranks). Each scale goes to OUT/cfg{scale}/: features.npz (feats, probs,
    labels, seeds), samples.npz (--npz) and samples/{index:06d}.png (--png). keep_pixels: every rank hands its
    images to rank 0 (through its shard file) for the pixel-space memorization test (small images only).
    shape_fidelity (built-in data): every rank scores its own images' shapes (scoring/shapes.py), and the rows get
    shape_iou_disc and shape_iou_cross. With train_ref, OUT/memorization_s{scale}.npz and OUT/nearest_s{scale}.npz
    hold the per-sample arrays behind the memorization columns (memorization.save_arrays).
    """
    out = Path(out_dir)
    labels, seeds = balanced_labels(num_samples, num_classes), sample_seeds(num_samples, seed)
    mine = shard_indices(num_samples, rank, world_size)
    reference = None  # loaded on rank 0 once the first images give the resolution its images are cropped to
    rows = []
    for scale in cfg_scales:
        scale_dir = out / f"cfg{scale:g}"
        t0 = time.time()
        with writes_shared(world_size):      # each rank's files, then all meet: a failed write stops every rank
            images = sample_shard(sample_fn, labels, seeds, mine, scale, batch_size,
                                  png_dir=scale_dir / "samples" if write_png else None)
            seconds = time.time() - t0
            feats = featurizer(images)
            iou = shapes.item_iou(images, labels[mine]) if shape_fidelity else None            # (n,) or None
            save_npz(scale_dir / f"shard{rank:03d}.npz", feats=feats["feats"], probs=feats["probs"],
                     labels=labels[mine], seeds=seeds[mine], index=mine,
                     arr_0=images if write_npz or keep_pixels else None, image_size=images.shape[1], shape_iou=iou)
        with writes_shared(world_size):      # rank 0's measurement and results, then all meet again
            if rank == 0:
                merged = merge_shards(scale_dir, world_size, keep_images=write_npz, pipeline=featurizer.pipeline)
                if reference is None and ref is not None:
                    reference = load_reference(ref, featurizer, image_size=images.shape[1])
                found = None if train_ref is None else memorization.search(train_ref, merged["feats"],
                                                                           merged["images"])
                row = {"cfg_scale": scale, **compute_metrics(merged, reference, k, is_splits, featurizer.device,
                                                             train_ref, num_classes, mem_tau, found),
                       **shape_columns(merged),
                       "samples": str(scale_dir), "ref": None if ref is None else str(ref),
                       "extractor": featurizer.name, "resize": featurizer.resize, "pipeline": featurizer.pipeline,
                       "k": k, "is_splits": is_splits, "seed": seed, "world_size": world_size,
                       "rank0_samples_per_s": round(len(mine) / max(seconds, 1e-9), 3), **(settings or {})}
                rows.append(row)
                if found is not None:     # the per-sample distances behind the memorization columns
                    memorization.save_arrays(out, scale, found, merged["labels"], merged["seeds"], merged["images"],
                                             train_ref.get("pixels"))
                write_results(rows, out)  # after every scale, so a long grid leaves partial results behind
    return rows if rank == 0 else None


# ---- command line ----


def _scales(text):
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("no guidance scale given")
    return values


def _add_feature_args(p):
    p.add_argument("--ref", help="reference: image folder, mu/sigma .npz (ADM reference batch too) or features .npz")
    p.add_argument("--features", help="TorchScript feature extractor (default: clean-fid's Inception; built-in data: "
                   "the judge, $(python -m scoring.judge path))")
    p.add_argument("--train-ref", help="training set .npz (python -m scoring.trainset) for the memorization "
                   "columns; auto: the checkpoint's training set (its data, seed, --items-per-class) through this "
                   "run's feature pipeline, cached in OUT/features")
    p.add_argument("--mem-tau", type=float, help="mem_tau: share of samples whose nearest training item is closer "
                   "than this (unit-normalised features; paper App. D: 0.12 for CLIP ViT-B/16 as --features)")
    p.add_argument("--inception", default=INCEPTION_PATH, help="clean-fid's Inception file (downloaded there if absent)")
    p.add_argument("--resize", choices=("clean", "none"), default="clean", help="clean: clean-fid's resize to 299")
    p.add_argument("--pipeline", choices=PIPELINES, default="clean", help="clean-fid Inception mode: clean (default) | "
                   "legacy_tensorflow (TF-style resize inside the network, as the ADM evaluator; ImageNet papers' FID)")
    p.add_argument("--out", default="eval", help="output folder: results.json, results.csv, features/")
    p.add_argument("--k", type=int, default=3, help="neighbourhood size for precision/recall")
    p.add_argument("--is-splits", type=int, default=10, help="Inception Score splits")
    p.add_argument("--feature-batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads decoding/resizing images")
    p.add_argument("--device", default=None, help="default: cuda if available")


def _check_common(args, samples=()):
    """Validate what can be checked before any work starts, so bad input fails fast and overwrites nothing.
    samples: existing samples (evaluate.py metrics); none means this run featurizes new ones."""
    if args.k < 1 or args.is_splits < 1:
        raise ValueError(f"--k and --is-splits must be >= 1, got {args.k} and {args.is_splits}")
    if args.mem_tau is not None and not args.mem_tau > 0:
        raise ValueError(f"--mem-tau must be > 0, got {args.mem_tau}")
    if args.features and not os.path.isfile(args.features):
        raise FileNotFoundError(f"feature extractor not found: {args.features}")
    # the label this run's features will carry; a reference made by another pipeline is refused before any work
    label = pipeline_label(args.features, "none" if args.pipeline == "legacy_tensorflow" else args.resize, args.pipeline)
    if args.train_ref and args.train_ref != "auto":
        train_label = load_train_reference(args.train_ref)["pipeline"]  # raises on a missing or wrong file
        check_pipelines(label, train_label, "this run's features", f"training-set features {args.train_ref}")
        if train_label is None:
            _warn_unlabelled(args.train_ref, "python -m scoring.trainset")
    if args.ref is not None:
        ref_label = reference_pipeline(args.ref)
        if ref_label is None and reference_kind(args.ref) == "features":     # made before references were labelled
            _warn_unlabelled(args.ref, "evaluate.py ref")
        for source in samples or [None]:
            check_pipelines(label if source is None else source_pipeline(source, label),
                            ref_label, f"samples {source or '(this run)'}", f"reference {args.ref}")
            if source is not None:                         # and one made at another image size
                check_reference_size(args.ref, image_size_of(source), f"samples {source}")
        if reference_kind(args.ref) != "stats":
            n = count_items(args.ref)
            if n < max(2, args.k + 1):
                raise ValueError(f"reference {args.ref} holds {n} images; its statistics need at least {max(2, args.k + 1)}")
    if args.train_ref and args.train_ref != "auto":        # a training set of a run at another image size
        for source in samples:
            check_train_reference_size(args.train_ref, image_size_of(source), f"samples {source}")


def _warn_unlabelled(path, remake: str) -> None:
    """A features file without a pipeline label cannot be checked against this run's extractor: say so."""
    print(f"warning: {path} carries no pipeline label: cannot check it was made with this run's extractor "
          f"(re-make it with `{remake}`)", file=sys.stderr)


def _featurizer(args, device):
    return Featurizer(args.features, args.inception, device, args.resize, args.feature_batch_size, args.workers,
                      cache_dir=Path(args.out) / "features", progress=True, pipeline=args.pipeline)


def main_metrics(argv):
    """`evaluate.py metrics`: measure existing samples against a reference."""
    p = ArgParser(prog="evaluate.py metrics", description="FID/IS/precision/recall of existing samples.")
    p.add_argument("--samples", nargs="+", required=True, help="folders of images, ADM .npz (arr_0) or features .npz")
    p.add_argument("--cfg-scales", type=_scales, help="the guidance scale of each --samples entry (for plots)")
    _add_feature_args(p)
    args = p.parse_args(argv)
    _check_common(args, args.samples)
    if args.cfg_scales is not None and len(args.cfg_scales) != len(args.samples):
        raise ValueError(f"--cfg-scales has {len(args.cfg_scales)} values for {len(args.samples)} --samples")
    need = min_samples(args.k, args.is_splits)
    for s in args.samples:
        n = count_items(s)
        if n < need:
            raise ValueError(f"{s} holds {n} samples; the statistics need at least {need} "
                             f"(covariance 2, k-NN k+1={args.k + 1}, IS splits {args.is_splits})")
    if args.ref is None:
        print("note: no --ref, so only the Inception Score is computed", file=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    code = provenance.collect(device)                      # written beside the results, which carry it too
    featurizer = _featurizer(args, device)
    reference = None
    if args.ref is not None:  # reference images are centre-cropped to the samples' resolution
        size = image_size_of(args.samples[0]) if reference_kind(args.ref) in ("folder", "images", "stats+images") else None
        reference = load_reference(args.ref, featurizer, image_size=size)
    if args.train_ref == "auto":
        raise ValueError("--train-ref auto needs a checkpoint; here pass a .npz from `python -m scoring.trainset`")
    train_ref = load_train_reference(args.train_ref) if args.train_ref else None
    rows = []
    for i, s in enumerate(args.samples):
        row = {"cfg_scale": None if args.cfg_scales is None else args.cfg_scales[i],
               **compute_metrics({**featurizer(s), "images": _pixels_for(s, train_ref)}, reference, args.k,
                                 args.is_splits, device, train_ref, mem_tau=args.mem_tau),
               "samples": str(s), "ref": args.ref, "extractor": featurizer.name, "resize": featurizer.resize,
               "pipeline": featurizer.pipeline,
               "k": args.k, "is_splits": args.is_splits}
        rows.append(row)
        print(json.dumps({c: row[c] for c in METRIC_COLUMNS}))
    provenance.write(args.out, code)
    json_path, _ = write_results(rows, args.out)
    print(f"wrote {json_path} and results.csv", file=sys.stderr)
    return 0


def reference_images(data, image_size, seed=0, builtin_length=10_000, max_images=None):
    """(images, crop) for `evaluate.py ref`, preprocessed exactly as training images (without the flip): "builtin"
    gives uint8 (N, S, S, 3) renders of data.BuiltinShapes(S, N, seed) (crop None: already S); a folder gives its
    image files (flat or in class folders, sorted) with crop S, the ADM centre crop data.py applies to training data."""
    import data as datasets
    from scoring.metrics import ImageSource
    if data == "builtin":
        ds = datasets.build_dataset("builtin", image_size, seed=seed, builtin_length=builtin_length)
        n = len(ds) if max_images is None else min(len(ds), max_images)
        return np.stack([ds.render(i) for i in range(n)]), None
    if not Path(data).is_dir():
        raise FileNotFoundError(f"--data folder not found: {data}")
    return ImageSource(ImageSource(data).files[:max_images]), image_size


def main_ref(argv):
    """`evaluate.py ref`: prepare an FID reference once (training preprocessing, then the feature pipeline)."""
    p = ArgParser(prog="evaluate.py ref", description="Features + statistics of reference images, labelled with "
                  "their feature pipeline: python evaluate.py ref --data DIR --image-size 256 --out ref.npz")
    p.add_argument("--data", required=True, help="an image folder (flat or class folders, e.g. ImageNet val) or builtin")
    p.add_argument("--image-size", type=int, required=True, help="the model's resolution: ADM centre crop to this size")
    p.add_argument("--seed", type=int, default=0, help="builtin: the dataset seed (another seed = held-out images)")
    p.add_argument("--builtin-length", type=int, default=10_000, help="builtin: number of images")
    p.add_argument("--max-images", type=int, help="use only the first N images (sorted file order)")
    _add_feature_args(p)
    p.set_defaults(out=None)
    args = p.parse_args(argv)
    if args.out is None or Path(args.out).suffix != ".npz":
        raise ValueError(f"--out must name the reference .npz to write, got {args.out}")
    new_file(args.out)
    if args.image_size < 8 or min(args.builtin_length, args.max_images or 2) < 2:
        raise ValueError("--image-size must be >= 8, --max-images and --builtin-length >= 2")
    if args.ref is not None:
        raise ValueError("evaluate.py ref takes --data (the images to prepare), not --ref")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    featurizer = Featurizer(args.features, args.inception, device, args.resize, args.feature_batch_size, args.workers,
                            progress=True, pipeline=args.pipeline)
    images, crop = reference_images(args.data, args.image_size, args.seed, args.builtin_length, args.max_images)
    out = featurizer(images, crop=crop)
    write_reference(args.out, out["feats"], out["probs"], featurizer.pipeline, image_size=args.image_size,
                    data=str(args.data), seed=args.seed if args.data == "builtin" else None, num_images=len(out["feats"]))
    print(f"wrote {args.out}: {len(out['feats'])} images, {out['feats'].shape[1]}-d features, pipeline "
          f"{featurizer.pipeline}", file=sys.stderr)
    return 0


def main_plot(argv):
    """`evaluate.py plot`: overlay several results.json files."""
    p = ArgParser(prog="evaluate.py plot", description="Plot FID against IS across guidance scales for several runs.")
    p.add_argument("results", nargs="+", help="results.json files, one per run")
    p.add_argument("-o", "--output", default="fid_is.png")
    p.add_argument("--labels", help="comma-separated run names (default: each file's folder name)")
    args = p.parse_args(argv)
    names = args.labels.split(",") if args.labels else [Path(r).resolve().parent.name for r in args.results]
    if len(names) != len(args.results):
        raise ValueError(f"--labels has {len(names)} names for {len(args.results)} results files")
    if len(set(names)) != len(names):  # two runs from folders with the same name: fall back to full paths
        names = [str(r) for r in args.results]
    runs = {name: read_results(r) for name, r in zip(names, args.results)}
    print(f"wrote {plot_fid_is(runs, args.output)}", file=sys.stderr)
    return 0


def _sample_parser() -> ArgParser:
    """The flags of `evaluate.py CKPT` (sampling, CADS, features)."""
    p = ArgParser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", nargs="?", help="nanoCEP checkpoint (or --pretrained SOURCE)")
    p.add_argument("--pretrained", metavar="SOURCE", help="a released model instead (pretrained.py): file, folder, URL, "
                   "Hugging Face repo id or a short name such as DiT-XL-2-256")
    p.add_argument("--guide-channels", type=int, help="guide only the first N latent channels (default: the release's "
                   "convention, 3 for official DiT; 0 = all)")
    p.add_argument("--classes", type=_classes, help="preview: comma-separated class ids, e.g. 88,207,360")
    p.add_argument("--per-class", type=int, default=4, help="preview: images per class")
    p.add_argument("--grid", help="preview: write a PNG grid of --classes (first --cfg-scales) and stop (no metrics)")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--cfg-scales", type=_scales, default=[1.5], help="comma-separated, e.g. 1.5,1.75,2.0")
    p.add_argument("--sampler", choices=SAMPLERS, default="dpm++")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling batch, per GPU")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--no-ema", action="store_true", help="sample the raw weights instead of the EMA")
    p.add_argument("--raw-class-embedding", action="store_true",
                   help="a --label-smoothing model: sample with its raw class rows E[y] instead of the smoothed "
                        "embedding (1-eps) E[y] + eps * mean(E) it was trained on")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on GPU")
    p.add_argument("--prompts", help="text models: a file of captions, one per line (e.g. 5K MS-COCO captions); "
                                     "samples cycle through them")
    p.add_argument("--vae-path", help="autoencoder weights, if not where the training run found them")
    p.add_argument("--control", choices=("canny", "maps"), help="a ControlNet checkpoint: sample with the control maps "
                   "(and classes) of the --control-data images, one sample per image in a class-balanced order of "
                   "--seed (fewer samples than images: an equal number per class); canny also reports edge_f1 (1-px "
                   "tolerance, no one-to-one matching) and edge_f1_exact (pixelwise, no tolerance)")
    p.add_argument("--control-data", help="--control: held-out images (class folders, e.g. IN-100 val; the default "
                   "--ref, all of them whatever --num-samples) or builtin (fresh built-in images of --control-seed)")
    p.add_argument("--control-maps", help="--control maps: their control images (same stems)")
    p.add_argument("--control-seed", type=int, default=1, help="--control-data builtin: the dataset seed (training's "
                   "is the run's --seed, 0 by default: another seed gives held-out images)")
    _add_cads_args(p)
    p.add_argument("--png", action="store_true", help="save OUT/cfg{scale}/samples/{index:06d}.png")
    p.add_argument("--npz", action="store_true", help="save OUT/cfg{scale}/samples.npz (arr_0, ADM evaluator format)")
    _add_feature_args(p)
    p.add_argument("--log", default="", help="also send each result row to wandb | tensorboard (trackers/tracking.py)")
    p.add_argument("--log-group", default="", help="tracker group (sweep.py: the sweep's name)")
    p.add_argument("--log-name", default="", help="tracker run name (sweep.py: cell/seedS)")
    return p


def _check_sample_args(args) -> None:
    """Refuse bad `evaluate.py CKPT` flags before any work (ValueError / FileNotFoundError, one line)."""
    _check_common(args)
    tracking.parse_trackers(args.log)                      # an unknown tracker or a missing package: one line now
    cads_from_args(args)                                   # bad --cads-* values fail before any work
    if args.num_samples < min_samples(args.k, args.is_splits):
        raise ValueError(f"--num-samples {args.num_samples} is below the {min_samples(args.k, args.is_splits)} "
                         "the statistics need")
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be >= 1, got {args.steps} and {args.batch_size}")
    if (args.ckpt is None) == (args.pretrained is None):
        raise ValueError("pass a nanoCEP checkpoint or --pretrained SOURCE (exactly one)")
    if args.ckpt is not None and not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.ckpt}")
    if args.grid and not args.classes:
        raise ValueError("--grid needs --classes (e.g. --classes 88,207,360)")
    if args.per_class < 1 or (args.guide_channels is not None and args.guide_channels < 0):
        raise ValueError("--per-class must be >= 1 and --guide-channels >= 0")
    if args.raw_class_embedding and args.pretrained:
        raise ValueError("--raw-class-embedding is for a nanoCEP --label-smoothing checkpoint; a release has no "
                         "smoothing")
    if args.control and (args.pretrained or args.grid or not args.control_data):
        raise ValueError("--control samples a nanoCEP ControlNet checkpoint over --control-data DIR (no --pretrained, "
                         "no --grid)")


def main_sample(argv):
    """`evaluate.py CKPT`: sample a checkpoint over guidance scales, then measure each scale."""
    args = _sample_parser().parse_args(argv)
    _check_sample_args(args)
    if args.grid:                                          # preview: one process, no metrics
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        sample_fn, info = _sampler_from_args(args, device)
        if max(args.classes) >= info["num_classes"]:
            raise ValueError(f"--classes: the model has {info['num_classes']} classes (0..{info['num_classes'] - 1})")
        print(f"wrote {save_preview(sample_fn, args.classes, args.per_class, args.cfg_scales[:1], args.seed, args.grid)}",
              file=sys.stderr)
        return 0
    # a long timeout: ranks wait at barriers while rank 0 featurizes a 50K reference folder and measures
    d = setup_distributed(args.device or "auto", timeout=4 * 3600)
    rank, world_size, device = d.rank, d.world, (str(d.device) if d.world > 1 else args.device or str(d.device))
    code = provenance.collect(device) if rank == 0 else None
    stored = _ckpt_config(args.ckpt) if args.ckpt else {}
    controlnet = args.control or stored.get("control", "none") != "none"
    held_out = (HeldOutControls(args.ckpt, _ckpt_config(args.ckpt), args.control, args.control_data,
                                args.control_maps, args.control_seed, args.num_samples, args.seed)
                if controlnet else None)
    sample_fn, info = _sampler_from_args(args, device, held_out)
    if held_out is not None:                              # samples follow the held-out items, class-balanced
        sample_fn, info["num_classes"] = held_out.scored(sample_fn), len(held_out)
        args.ref = args.ref or held_out.reference(Path(args.out), rank)
        if rank == 0:
            print(held_out.describe(args.num_samples), file=sys.stderr)
    if args.ref is not None:                               # a reference made at another size, refused before sampling
        check_reference_size(args.ref, info["image_size"], "samples")
    if args.train_ref and args.train_ref != "auto":        # and so is another run's training set
        check_train_reference_size(args.train_ref, info["image_size"], "samples")
    settings = {"checkpoint": str(args.ckpt or args.pretrained), "sampler": args.sampler, "steps": args.steps,
                "ema": not args.no_ema and args.pretrained is None, **cads_settings(args),
                **{k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}}
    featurizer = _featurizer(args, device)
    sinks = start_trackers(args, settings, rank, world_size)   # one that cannot start stops every rank, before sampling
    with contextlib.ExitStack() as trackers:
        for sink in sinks:                                 # closed however the work below ends: the tracked run is
            trackers.callback(sink.close)                  # finished and its events flushed
        train_ref = None
        with writes_shared(world_size):                    # rank 0's files: a failed write stops every rank here
            if rank == 0:
                train_ref = _train_reference(args, featurizer)
                provenance.write(args.out, code)           # the checks passed; results.json carries it too
        rows = sample_and_evaluate(sample_fn, info["num_classes"], args.cfg_scales, args.out, featurizer,
                                   args.ref, args.num_samples, args.seed, args.batch_size, args.png, args.npz, rank,
                                   world_size, settings, args.k, args.is_splits, train_ref, args.mem_tau,
                                   keep_pixels=bool(args.train_ref) and info["image_size"] <= PIXEL_TEST_MAX_SIDE,
                                   shape_fidelity=held_out is None and _trained_on_builtin_classes(stored, info))
        if held_out is not None:
            rows = held_out.add_edge_f1(rows, args.out)
        if rank == 0:
            for row in rows:
                print(json.dumps({c: row.get(c) for c in METRIC_COLUMNS + (EDGE_COLUMNS if held_out else [])}))
            log_rows(args, rows, sinks)
    leave_process_group()
    return 0


def _trained_on_builtin_classes(cfg: dict, info) -> bool:
    """Whether a checkpoint (its stored config, its sampler's info) draws built-in shapes by class, so scoring/shapes.py
    can grade them, small enough for its banks of real masks (20,000 per shape: 330 MB at 64 px)."""
    return (cfg.get("data") == "builtin" and cfg.get("cond", "class") == "class"
            and info["num_classes"] == len(BUILTIN_SHAPES) * len(BUILTIN_COLOURS)
            and info["image_size"] <= PIXEL_TEST_MAX_SIDE)


def start_trackers(args, settings, rank: int, world: int) -> list:
    """--log: rank 0's sinks, started before any sample is drawn and agreed across ranks (runio.start_agreed)."""
    if not args.log:
        return []
    sinks = tracking.open_sinks(args.log, args.out, settings, args.log_group, args.log_name, job_type="eval",
                                main=rank == 0)
    return start_agreed(sinks, settings, None, world, rank == 0)


def log_rows(args, rows, sinks) -> None:
    """--log: each guidance scale's row as an "eval/cfg{scale}" record at the checkpoint's training step."""
    if not sinks:
        return
    step = int(load_checkpoint(args.ckpt, mmap=True)["step"]) if args.ckpt else 0
    for sink in sinks:                                     # the caller closes them
        for row in rows:
            sink({"event": f"eval/cfg{row['cfg_scale']:g}", "step": step, **row})


def _train_reference(args, featurizer):
    """The --train-ref arrays; auto: the checkpoint's training set through this run's features (cached)."""
    if args.train_ref != "auto":
        return load_train_reference(args.train_ref) if args.train_ref else None
    from scoring import trainset
    if args.ckpt is None:
        raise ValueError("--train-ref auto needs a nanoCEP checkpoint (its config names the training set)")
    cfg = trainset.run_config(load_checkpoint(args.ckpt)["config"])
    spec = {k: cfg.get(k) for k in ("data", "data_root", "image_size", "seed", "builtin_length", "items_per_class",
                                    "flip", "cond")}
    key = f"{json.dumps(spec, sort_keys=True)}|{featurizer.id}|fresh v{trainset.FRESH_VERSION}"   # an older rule's: stale
    tag = hashlib.sha1(key.encode()).hexdigest()[:12]
    path = Path(args.out) / "features" / f"train-ref-{tag}.npz"
    if not path.is_file():
        save_npz(path, **trainset.build(cfg, featurize=lambda images: featurizer(images)["feats"],
                                        pipeline=featurizer.pipeline))
    return load_train_reference(path)


def _pixels_for(source, train_ref):
    """uint8 (N, H, W, 3) images of a samples source for the pixel-space memorization test (None when it is not
    needed or the source holds features only)."""
    from scoring.metrics import ImageSource
    if train_ref is None or train_ref.get("pixels") is None:
        return None
    path = Path(source)
    if path.suffix == ".npz" and "feats" in npz_keys(path):
        return None
    src = ImageSource(path)
    if src.files is None:
        return np.concatenate([np.stack(b) for b in src.batches(1000)])
    return np.stack([np.array(Image.open(f).convert("RGB")) for f in src.files])


def _classes(text):
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of class ids: {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"class ids must be >= 0: {text!r}")
    return values


def _ckpt_config(path) -> dict:
    """The config stored in a checkpoint (its tensors are only mapped, not read)."""
    try:
        return load_checkpoint(str(path), mmap=True)["config"]
    except RunError as e:
        raise ValueError(str(e)) from None


def _sampler_from_args(args, device, held_out=None):
    """(sample_fn, info) for the CLI: a nanoCEP checkpoint or a --pretrained release."""
    cads = cads_from_args(args)
    if args.pretrained is not None:
        guide = "auto" if args.guide_channels is None else args.guide_channels
        return load_pretrained_sampler(args.pretrained, device, args.sampler, args.steps, args.precision,
                                       args.vae_path, guide, cads=cads)
    sample_fn, info = load_sampler(args.ckpt, device, ema=not args.no_ema, sampler=args.sampler, steps=args.steps,
                                   precision=args.precision, vae_path=args.vae_path,
                                   prompts=read_prompts(args.prompts) if args.prompts else None, cads=cads,
                                   raw_class_embedding=args.raw_class_embedding,
                                   control_items=None if held_out is None else held_out.items)
    if info["class_dropout"] == 0 and info["cond"] == "class" and any(s != 1 for s in args.cfg_scales):
        raise ValueError(f"{args.ckpt} was trained with --class-dropout 0 (no null class): only --cfg-scales 1 works")
    return sample_fn, info


def _add_cads_args(p):
    p.add_argument("--cads-noise", type=float, default=0.0, help="CADS (cads.py): condition noise scale s at t = 1; "
                   "0 = off (the paper's ablation: 0.1)")
    p.add_argument("--cads-tau1", type=float, default=0.6, help="CADS: clean condition for t <= tau1 (t = 1: noise)")
    p.add_argument("--cads-tau2", type=float, default=0.9, help="CADS: pure-noise condition for t >= tau2")
    p.add_argument("--cads-psi", type=float, default=1.0, help="CADS: weight of the rescaled embedding, "
                   "psi * rescaled + (1 - psi) * noised; 0 = no rescale")


def cads_from_args(args):
    """A cads.CADS from the --cads-* flags, or None when --cads-noise is 0 (off); bad values -> ValueError."""
    from cads import CADS
    if args.cads_noise < 0:
        raise ValueError(f"--cads-noise must be >= 0, got {args.cads_noise}")
    try:
        cads = CADS(args.cads_tau1, args.cads_tau2, args.cads_noise, args.cads_psi)
    except ValueError as e:
        raise ValueError(f"--cads-*: {e}") from None
    return cads if args.cads_noise > 0 else None


def cads_settings(args):
    """The CADS columns of a results row (cads_noise 0 = off)."""
    return {"cads_noise": args.cads_noise, "cads_tau1": args.cads_tau1, "cads_tau2": args.cads_tau2,
            "cads_psi": args.cads_psi}


def main(argv=None):
    """Dispatch the subcommands; bad input becomes one line on stderr and exit code 2, a failed write exit code 1."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"metrics": main_metrics, "plot": main_plot, "ref": main_ref}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return main_sample(argv)
    except TrackerFailed as e:                               # every rank raised it at the same broadcast
        if e.main:
            print(f"evaluate.py: error: {e}", file=sys.stderr)
        leave_process_group()
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, ConnectionError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    except WriteFailed as e:                                 # full disk: a fault, not bad input
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        if e.shared:                                         # every rank raised it at the same meeting
            leave_process_group()
        return 1


if __name__ == "__main__":
    sys.exit(main())
