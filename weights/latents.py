"""
latents.py: encode a dataset once into a memory-mapped latent cache, so that training never runs the encoder again.

    python -m weights.latents --data builtin --image-size 32 --vae kl-f8 --vae-path vae.safetensors --out cache/builtin32
    torchrun --nproc_per_node 8 -m weights.latents --data /data/imagenet/train --image-size 256 --vae kl-f8 --out cache/in1k
    python -m weights.latents bench cache/in1k --batch-size 256        # loader img/s through data.StepSampler

A cache folder holds, index aligned with the source dataset (item i = dataset key 2*i):
    meta.json     what was encoded and how (autoencoder kind and parameter sha256, image size, latent shape (C, h, w),
                  scale factor, dtype; the dataset's size, classes, label sha256 and a sha256 of three decoded images)
                  and "complete", set only when every item is encoded
    latents.npy   (N, 2, K, C, h, w): axis 1 = horizontal orientation (0 original, 1 the mirrored image encoded on its
                  own, so flip augmentation survives caching); axis 2 = (mean, std) of the KL posterior (K=2) or the
                  VQ pre-quantisation latent (K=1); all in scaled units, i.e. what the diffusion model sees
    labels.npy    (N,) int64 clean labels: corruption is applied when the cache is loaded, never baked into it
    captions.txt  one caption per line (line breaks inside a caption become spaces), when the dataset has captions
    done.npy      (N,) uint8, 1 = item encoded: the resume record
Training reads it with LatentDataset (data.py's dataset protocol) and draws a fresh posterior sample every step with
posterior_sample, so caching freezes neither the flip nor the KL noise (fast-DiT's extract_features froze both).

Why float16 by default: the cache is read once per sample and is the largest file of a run (ImageNet-1K KL-f8 at 256²:
32 KiB per image with both flips and mean+std, 42 GB; float32 doubles that). Scaled latents are O(1), so float16's
relative rounding error of 2^-11 is below 1e-3 in absolute terms, ten times under the smallest noise level a DDPM
linear schedule trains at (sqrt(beta_1) = 0.01); values that would overflow raise an error (use --dtype float32).

Building is resumable: the arrays are preallocated with np.lib.format.open_memmap, each rank encodes every world-th
batch, and done.npy is updated only after the latents it vouches for are flushed, so rerunning the same command after a
crash or Ctrl-C skips the finished batches. A rerun with different arguments (other autoencoder weights, data, image
size, dtype) is refused rather than mixed into the old cache. Under torchrun all ranks write the same memory maps, so
the output folder must be on one machine's disk (or a file system with coherent shared mmap).
"""
import functools
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch

from plumbing.common import (ArgParser, atomic_open, first_error, leave_process_group, local_rank0_first, one_line,
                             setup_distributed)
from sources.download import file_hash

FORMAT = "nanocep-latents"
VERSION = 1
DTYPES = ("float16", "float32")
OWN_FILES = ("meta.json", "latents.npy", "labels.npy", "captions.txt", "done.npy")
NOT_IDENTITY = ("complete", "vae_path")   # meta keys a rerun may change: provenance, not content (the sha covers it)


# ---- identity: what a cache was built from ----


def params_sha256(module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in the state dict: the weights' identity, any file format."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_meta(dataset, ae, dtype="float16", meta_extra=None) -> dict:
    """The meta.json a cache of `dataset` encoded by `ae` gets (with complete=False)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown cache dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    n, size = len(dataset), int(dataset.image_size)
    if n == 0:
        raise ValueError("the dataset is empty: nothing to encode")
    if size % ae.downsample:
        raise ValueError(f"image size {size} is not a multiple of the {ae.kind} autoencoder's downsampling {ae.downsample}")
    labels = np.ascontiguousarray(dataset.labels, dtype=np.int64)
    if labels.shape != (n,):
        raise ValueError(f"dataset.labels has shape {labels.shape}, expected ({n},)")
    side = size // ae.downsample
    meta = {
        "format": FORMAT, "version": VERSION,
        "vae": ae.kind, "vae_params_sha256": params_sha256(ae), "scale_factor": float(ae.scale_factor),
        "moments": ["latent"] if ae.is_vq else ["mean", "std"],
        "latent_shape": [int(ae.latent_channels), side, side],
        "image_size": size, "num_items": n,
        "num_classes": int(dataset.num_classes), "class_names": [str(c) for c in dataset.class_names],
        "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
        "has_captions": dataset.captions is not None,
        "dtype": dtype, "layout": "latents.npy (N, flip, K, C, h, w); K indexes moments",
    }
    # A few decoded images pin the content (a built-in dataset of another seed has the same labels, not the same pixels).
    probe = hashlib.sha256()
    for i in sorted({0, n // 2, n - 1}):
        probe.update(np.ascontiguousarray(dataset[2 * i][0].numpy(), dtype=np.float32).tobytes())
    meta["probe_sha256"] = probe.hexdigest()
    files = getattr(dataset, "files", None)  # image folders: the sorted file list pins which image is item i
    if files is not None:
        root = getattr(dataset, "root", "")
        listing = "\n".join(os.path.relpath(f, root) if root else f for f in files)
        meta["files_sha256"] = hashlib.sha256(listing.encode()).hexdigest()
    meta.update(meta_extra or {})
    meta["complete"] = False
    return json.loads(json.dumps(meta))  # tuples -> lists: compares equal to what meta.json reads back


def _identity_diff(want: dict, have: dict) -> list[str]:
    """Human-readable differences between two metas, ignoring NOT_IDENTITY keys."""
    def short(v):
        s = json.dumps(v)
        return s if len(s) <= 40 else s[:37] + "..."
    keys = sorted((set(want) | set(have)) - set(NOT_IDENTITY))
    return [f"{k}: {short(want.get(k))} now vs {short(have.get(k))} in the cache" for k in keys if want.get(k) != have.get(k)]


# ---- files ----


def _write_json(path, obj) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1)


def read_meta(out_dir) -> dict:
    """meta.json of a cache folder, or FileNotFoundError / ValueError saying what is wrong."""
    path = os.path.join(out_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no latent cache at {out_dir} (meta.json missing); build one with "
                                f"`python -m weights.latents --data ... --vae ... --out {out_dir}`")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a nanoCEP latent cache")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: cache format version {meta.get('version')}, this latents.py reads {VERSION}")
    return meta


def _latents_shape(meta) -> tuple:
    return (meta["num_items"], 2, len(meta["moments"]), *meta["latent_shape"])


def _open_array(path, shape, dtype, mode):
    """An existing .npy as a memory map, checked against the shape and dtype the meta promises."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing (a damaged cache: delete the folder and rebuild)")
    try:
        arr = np.lib.format.open_memmap(path, mode=mode)
    except ValueError as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise ValueError(f"{path}: holds {arr.dtype} {arr.shape}, meta.json says {np.dtype(dtype)} {tuple(shape)}")
    return arr


def prepare_cache(out_dir, meta: dict, dataset) -> dict:
    """Create an empty cache for `meta` (arrays, labels, captions, meta.json last), or check that the one in `out_dir`
    was started with the same identity. Returns the meta on disk. Raises ValueError on any mismatch."""
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.isfile(meta_path):
        have = read_meta(out_dir)
        diff = _identity_diff(meta, have)
        if diff:
            state = "finished" if have.get("complete") else "unfinished"
            raise ValueError(f"{out_dir} holds a {state} latent cache built with different arguments "
                             f"({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}); use another --out")
        return have
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ValueError(f"--out {out_dir} exists and is not a folder")
        foreign = sorted(set(os.listdir(out_dir)) - set(OWN_FILES))
        if foreign:  # never write into somebody else's folder; our own names are left-overs of a crash before meta
            raise ValueError(f"--out {out_dir} is not empty and holds no latent cache ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})")
    os.makedirs(out_dir, exist_ok=True)
    n = meta["num_items"]
    # open_memmap(w+) makes sparse, zero-filled files: a 42 GB ImageNet cache costs no time to allocate.
    lat = np.lib.format.open_memmap(os.path.join(out_dir, "latents.npy"), mode="w+", dtype=meta["dtype"],
                                    shape=_latents_shape(meta))
    del lat
    done = np.lib.format.open_memmap(os.path.join(out_dir, "done.npy"), mode="w+", dtype=np.uint8, shape=(n,))
    del done
    np.save(os.path.join(out_dir, "labels.npy"), np.ascontiguousarray(dataset.labels, dtype=np.int64))
    cap_path = os.path.join(out_dir, "captions.txt")
    if dataset.captions is not None:
        with open(cap_path, "w", encoding="utf-8", newline="\n") as f:
            for i in range(n):
                f.write(str(dataset.captions[i]).replace("\r", " ").replace("\n", " ") + "\n")
    elif os.path.exists(cap_path):
        os.remove(cap_path)
    _write_json(meta_path, meta)
    return meta


# ---- building ----


def build_cache(dataset, ae, out_dir, *, batch_size=32, rank=0, world=1, device="cpu", max_batches=None,
                meta_extra=None, dtype="float16", num_workers=0, flush_every=16, sync=None, progress=None) -> dict:
    """Encode this rank's share of `dataset` with `ae` into the cache at `out_dir`, skipping items already done.

    Batch b (items [b*batch_size, (b+1)*batch_size)) belongs to rank b % world; each batch is encoded together with its
    mirror image (2*batch_size images through the encoder). Rank 0 creates or checks the folder first. `max_batches`
    stops this rank after that many batches (an interruption, for tests). `sync(err)` is the DDP hook: it must return
    the first error of any rank (or None) and doubles as a barrier; without it, whichever call finds every item done
    marks the cache complete. `ae` is moved to `device`. Returns {"encoded", "remaining", "complete"}.
    """
    if batch_size < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad batch_size/rank/world: {batch_size}/{rank}/{world}")
    meta = cache_meta(dataset, ae, dtype, meta_extra)
    err = None
    if rank == 0:
        try:
            prepare_cache(out_dir, meta, dataset)
        except (ValueError, OSError) as e:
            err = e
    if sync is not None:
        err = sync(err)
    if err is not None:
        raise err
    have = read_meta(out_dir)
    diff = _identity_diff(meta, have)
    if diff:
        raise ValueError(f"{out_dir}: latent cache built with different arguments ({'; '.join(diff[:3])})")
    n = meta["num_items"]
    if have.get("complete"):
        return {"encoded": 0, "remaining": 0, "complete": True}
    lat = _open_array(os.path.join(out_dir, "latents.npy"), _latents_shape(meta), meta["dtype"], "r+")
    done = _open_array(os.path.join(out_dir, "done.npy"), (n,), np.uint8, "r+")

    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)][rank::world]
    pending = [(a, b) for a, b in batches if not done[a:b].all()]
    if max_batches is not None:
        pending = pending[:max_batches]
    ae = ae.to(device)
    dev = torch.device(device)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[[2 * i for i in range(a, b)] for a, b in pending],
                                         num_workers=num_workers, pin_memory=dev.type == "cuda")
    np_dtype = np.dtype(meta["dtype"])
    K, (C, h, w) = len(meta["moments"]), meta["latent_shape"]
    unflushed = []

    def commit():
        # Latents reach the file before the done marks that vouch for them: a crash can lose work, never fake it.
        if unflushed:
            lat.flush()
            for a, b in unflushed:
                done[a:b] = 1
            done.flush()
            unflushed.clear()

    encoded = 0
    bar = None
    if progress is None:
        progress = rank == 0
    if progress and pending:
        from tqdm import tqdm
        bar = tqdm(total=sum(b - a for a, b in pending), unit="img", desc=f"encode {ae.kind}", dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for (a, b), (x, _) in zip(pending, loader):
                x = x.to(dev, non_blocking=True)                  # (B, 3, H, W), the unflipped images (keys 2*i)
                both = torch.cat([x, x.flip(-1)])                 # (2B, 3, H, W): the mirror is data.py's flip
                mean, std = ae.encode_moments(both)               # (2B, C, h, w) each, float32, scaled
                z = mean[:, None] if ae.is_vq else torch.stack([mean, std], 1)   # (2B, K, C, h, w)
                z = z.view(2, b - a, K, C, h, w).transpose(0, 1)  # (B, 2, K, C, h, w): orientation second
                with np.errstate(over="ignore"):                  # overflow is checked right below
                    out = z.cpu().numpy().astype(np_dtype)
                if not np.isfinite(out).all():
                    bad = "overflow float16 (rebuild with --dtype float32)" if np.isfinite(z.cpu().numpy()).all() \
                        else "are not finite (NaN/inf from the encoder)"
                    raise ValueError(f"latents of items {a}..{b - 1} {bad}")
                lat[a:b] = out
                unflushed.append((a, b))
                encoded += b - a
                if len(unflushed) >= flush_every:
                    commit()
                if bar is not None:
                    bar.update(b - a)
    finally:
        commit()
        if bar is not None:
            bar.close()
    if sync is not None:
        sync(None)                                                # every rank has flushed
    complete = False
    if sync is None or rank == 0:
        if done.all():
            have["complete"] = True
            _write_json(os.path.join(out_dir, "meta.json"), have)
            complete = True
    remaining = int(n - np.count_nonzero(done))
    return {"encoded": encoded, "remaining": remaining, "complete": complete or remaining == 0}


# ---- reading ----


class LatentDataset(torch.utils.data.Dataset):
    """A finished latent cache as a dataset: ds[2*i + flip] -> (float32 (K*C, h, w), label); data.py's protocol.

    For KL items are cat[mean, std] (2C channels; draw a sample with posterior_sample), for VQ the (C, h, w) latent.
    `labels` is a writable copy (data.apply_corruption corrupts it in place of the clean labels on disk).
    """

    def encode(self, x, noise=None):
        """A loaded batch of items -> the latents the model trains on (a KL posterior sample; VQ latents as they are)."""
        return posterior_sample(x, noise=noise)

    def __init__(self, path):
        meta = read_meta(path)
        if not meta.get("complete"):
            done = os.path.join(path, "done.npy")
            count = int(np.count_nonzero(np.load(done, mmap_mode="r"))) if os.path.isfile(done) else 0
            raise ValueError(f"latent cache {path} is incomplete ({count} of {meta['num_items']} items encoded); "
                             "rerun latents.py with the same arguments to finish it")
        self.path, self.meta = path, meta
        self.vae = meta["vae"]
        self.num_items = meta["num_items"]
        self.channels, self.latent_size = meta["latent_shape"][0], meta["latent_shape"][1]
        self.image_size = meta["image_size"]
        self.num_classes, self.class_names = meta["num_classes"], list(meta["class_names"])
        self.scale_factor = meta["scale_factor"]
        self._shape = _latents_shape(meta)
        _open_array(os.path.join(path, "latents.npy"), self._shape, meta["dtype"], "r")  # check now, open lazily
        labels = np.load(os.path.join(path, "labels.npy"))
        if labels.shape != (self.num_items,):
            raise ValueError(f"{path}/labels.npy has shape {labels.shape}, expected ({self.num_items},)")
        self.labels = np.array(labels, dtype=np.int64)       # a writable copy
        self.captions = None
        if meta.get("has_captions"):
            with open(os.path.join(path, "captions.txt"), encoding="utf-8", newline="") as f:
                self.captions = f.read().split("\n")[:-1]
            if len(self.captions) != self.num_items:
                raise ValueError(f"{path}/captions.txt has {len(self.captions)} lines, expected {self.num_items}")
        self._latents = None

    def _array(self):
        # Opened on first use in each process: a memmap must not be pickled into DataLoader workers (spawn copies it).
        if self._latents is None:
            self._latents = np.load(os.path.join(self.path, "latents.npy"), mmap_mode="r")
        return self._latents

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_latents"] = None
        return state

    def __len__(self):
        return self.num_items

    def __getitem__(self, key):
        index, flip = int(key) >> 1, int(key) & 1
        if not 0 <= index < self.num_items:
            raise IndexError(f"key {key}: item {index} out of range for {self.num_items} items")
        z = np.array(self._array()[index, flip], dtype=np.float32)     # (K, C, h, w), a writable copy
        return torch.from_numpy(z).reshape(-1, *z.shape[2:]), int(self.labels[index])


def posterior_sample(x, generator=None, *, channels=None, noise=None):
    """(B, 2C, h, w) = cat[mean, std] -> mean + std * N(0, 1), (B, C, h, w); VQ latents (B, C, h, w) pass through.

    Without `channels`, an even channel count is read as KL (mean, std) and an odd one as VQ: right for both released
    autoencoders (8 and 3 cached channels); pass channels=ds.channels for other configs. `noise` (B, C, h, w) replaces
    the draw (a trainer that draws its noise for the whole global batch); otherwise it comes from `generator`.
    """
    c = x.shape[1]
    if channels is not None and c not in (channels, 2 * channels):
        raise ValueError(f"expected {channels} (VQ) or {2 * channels} (KL mean+std) channels, got {c}")
    if c == channels or (channels is None and c % 2):
        return x
    mean, std = x.chunk(2, dim=1)                                    # (B, C, h, w) each
    if noise is None:
        gen_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=mean.dtype).to(mean.device)
    return mean + std * noise


# ---- loader throughput ----


def bench_loader(path, batch_size=256, steps=50, num_workers=0, seed=0, warmup=3) -> float:
    """Images per second read from the cache the way training reads it: StepSampler -> DataLoader -> posterior_sample."""
    from data import StepSampler
    ds = LatentDataset(path)
    sampler = StepSampler(len(ds), batch_size, 0, 1, seed, 0, steps + warmup)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=num_workers,
                                         persistent_workers=False, prefetch_factor=4 if num_workers else None)
    gen = torch.Generator().manual_seed(seed)
    t0, count = None, 0
    for i, (x, _) in enumerate(loader):
        posterior_sample(x, gen, channels=ds.channels)
        if i + 1 == warmup:
            t0 = time.perf_counter()                                 # after worker start-up and the first pages
        elif i >= warmup:
            count += len(x)
    return count / (time.perf_counter() - t0)


# ---- autoencoder from a weights file ----


# ---- CLI ----


def _build_main(args) -> int:
    import data
    from weights import vae
    for name in ("image_size", "batch_size", "builtin_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.num_workers is not None and args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    d = setup_distributed(args.device)
    build = functools.partial(data.build_dataset, args.data, args.image_size, seed=args.seed,
                              builtin_length=args.builtin_length, captions=args.captions)
    dataset = local_rank0_first(build, d)              # shards: one index build per node, read by the other ranks
    if args.vae_path:                                  # a diffusers vae/ folder names its weights file
        args.vae_path = str(vae.weights_file(args.vae_path))
    overrides = vae.infer_architecture(args.vae, args.vae_path) if args.vae_path else {}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    ae = vae.load_vae(args.vae, args.vae_path, device=d.device, dtype=dtype, **overrides)
    if overrides and d.main:
        print(f"{args.vae} config read off {args.vae_path}: {overrides}")
    extra = {"data": "builtin" if args.data == "builtin" else os.path.abspath(args.data), "precision": args.precision}
    if args.data == "builtin":
        extra.update(seed=args.seed, builtin_length=args.builtin_length)
    if args.vae_path:
        extra.update(vae_path=os.path.abspath(args.vae_path), vae_file_sha256=file_hash(args.vae_path),
                     vae_config=dict(overrides, block_out_channels=list(ae.cfg.block_out_channels)))
    sync = None
    if d.world > 1:
        def sync(err):  # all ranks meet here; the first rank's error (as text) wins
            first = first_error(err, d.world)
            return None if first is None else ValueError(first)

    workers = args.num_workers if args.num_workers is not None else (min(8, os.cpu_count() or 1) if d.device.type == "cuda" else 0)
    t0 = time.perf_counter()
    try:
        res = build_cache(dataset, ae, args.out, batch_size=args.batch_size, rank=d.rank, world=d.world,
                          device=d.device, meta_extra=extra, dtype=args.dtype, num_workers=workers, sync=sync)
    except BaseException:
        leave_process_group(finished=False)           # no barrier: another rank may be waiting elsewhere
        raise
    leave_process_group()
    if d.main:
        secs = time.perf_counter() - t0
        meta = read_meta(args.out)
        shape = _latents_shape(meta)
        per_image = 2 * int(np.prod(shape[2:])) * np.dtype(meta["dtype"]).itemsize
        if res["complete"] and res["encoded"] == 0:
            print(f"{args.out}: already complete ({meta['num_items']} items), nothing to do")
        else:
            rate = res["encoded"] * d.world / max(secs, 1e-9)
            print(f"{args.out}: {'complete' if res['complete'] else 'incomplete, rerun to finish'}; "
                  f"latents {shape} {meta['dtype']} ({per_image} B/image, {shape[0] * per_image / 1e9:.3f} GB); "
                  f"encoded {res['encoded'] * d.world} images in {secs:.1f} s (~{rate:.1f} img/s)")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        p = ArgParser(prog="latents.py bench", description="Loader img/s of a latent cache through data.StepSampler.")
        p.add_argument("path", help="a finished cache folder")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--steps", type=int, default=50)
        p.add_argument("--num-workers", type=int, default=0)
        p.add_argument("--seed", type=int, default=0)
        args = p.parse_args(argv[1:])
        try:
            if args.batch_size < 1 or args.steps < 1 or args.num_workers < 0:
                raise ValueError("--batch-size and --steps must be positive, --num-workers >= 0")
            rate = bench_loader(args.path, args.batch_size, args.steps, args.num_workers, args.seed)
        except (ValueError, OSError) as e:
            print(f"python -m weights.latents: error: {one_line(e)}", file=sys.stderr)
            return 2
        print(f"{args.path}: {rate:,.0f} img/s (batch {args.batch_size}, {args.num_workers} workers)")
        return 0
    p = ArgParser(prog="python -m weights.latents", description=__doc__.strip().split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--data", required=True, help="'builtin', an ImageNet-layout folder, or (--captions) captioned data")
    p.add_argument("--captions", action="store_true",
                   help="read --data as images with same-stem .txt captions (img2dataset layout); tables always are")
    p.add_argument("--image-size", type=int, required=True, help="image side in pixels")
    p.add_argument("--vae", required=True, choices=["kl-f8", "vq-f4"])
    p.add_argument("--vae-path", default=None, help="weights file (default: download the released weights)")
    p.add_argument("--out", required=True, help="cache folder (created; a rerun with the same arguments resumes)")
    p.add_argument("--batch-size", type=int, default=32, help="source images per batch per rank (x2 with the flips)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in dataset")
    p.add_argument("--builtin-length", type=int, default=100_000, help="items of the built-in dataset")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES), help="storage dtype of the cache")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="encoder compute precision")
    p.add_argument("--num-workers", type=int, default=None, help="image decoding workers (default 8 on GPU, 0 on CPU)")
    args = p.parse_args(argv)
    try:
        return _build_main(args)
    except (ValueError, OSError, ConnectionError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"python -m weights.latents: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
