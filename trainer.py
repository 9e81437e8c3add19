"""
The training loop that train_dit.py and train_ldm.py share: DDP, mixed precision, compile, EMA, logging, sample grids,
checkpoints, resume, and a clean stop on SIGTERM/SIGINT.

You do not run this file; the train scripts call `train(...)`:
    python train_dit.py                                   # CPU, 1 process
    torchrun --nproc_per_node 8 train_dit.py ...          # 8 GPUs; add --nnodes/--node_rank/--rdzv_* for several nodes

What makes a run reproducible and exactly resumable, in one place:
- The data order is a function of (seed, step) (data.StepSampler), and so is every per-sample random draw of the
  training step (timestep t, noise ε, CFG dropout mask): they are drawn for the whole *global* batch from a generator
  seeded by (seed, step) and each rank takes its slice. So 1 process and N processes see the same samples with the same
  noise, and a run resumed at step s continues exactly as if it had never stopped.
  The same generator draws the per-step extras: CEP's δ (for the whole global batch, handed to the condition encoder
  as cep_unit), the latent cache's posterior sample, and the seed of --corrupt-mode random's corruption of the global
  batch; --cep-subset's fixed items are chosen once from the seed and looked up by the batch's dataset indices.
- Randomness still drawn inside modules (--cond-dropout's mask) comes from the per-rank torch RNG, seeded by
  (seed, rank), whose state is saved for every rank in each checkpoint: resume is exact, 1 = N processes is not.
- A checkpoint holds plain data only (tensors, numbers, strings, dicts), the *uncompiled* module's state_dict, the EMA,
  the optimizer, the step, every rank's RNG state and the config, written atomically (temporary file, then rename), and
  loads with torch.load(weights_only=True).
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

CHECKPOINT_VERSION = 1


class RunError(Exception):
    """A problem the user must fix (bad flag, bad file): the scripts print its message on one line and exit 2."""


class Diverged(Exception):
    """The loss became non-finite: the run stops (exit 1) and leaves the last good checkpoint untouched."""


# ----------------------------------------------------------------------------------------------------------------------
# Config -> command line

class ArgParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2, instead of printing the usage block too.

    Abbreviated flags are off: `--ema 0.999` must not silently become `--ema-decay` behind a preset's back."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_config(cls, argv=None, presets: dict | None = None, description: str = ""):
    """Build an argparse CLI from a config dataclass (every field a --kebab-case flag) and return the config.

    A field's help text is its `metadata["help"]`. `--preset NAME` first applies presets[NAME]; flags given explicitly
    win over the preset.
    """
    presets = presets or {}
    p = ArgParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if presets:
        p.add_argument("--preset", choices=sorted(presets), default=None, help="a named recipe (see README)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if f.type in (bool, "bool") or (hasattr(f.type, "__args__") and bool in f.type.__args__):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            typ = typ if typ in (int, float, str) else str
            p.add_argument(flag, type=typ, default=f.default, choices=choices, help=help_)
    args = p.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    if presets and args.preset:
        explicit = explicit_fields(argv)
        values.update({k: v for k, v in presets[args.preset].items() if k not in explicit})
    return cls(**values)


def explicit_fields(argv=None) -> set:
    """The config fields given as flags on the command line (--no-x counts for x)."""
    explicit = {a.split("=")[0][2:].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
                if a.startswith("--")}
    return explicit | {n[3:] for n in explicit if n.startswith("no_")}


# ----------------------------------------------------------------------------------------------------------------------
# Distributed setup (torchrun's environment variables; plain `python` = 1 process)

@dataclasses.dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", timeout: float | None = None) -> Dist:
    """Join the process group torchrun created (gloo on CPU, nccl on GPU); the device comes from LOCAL_RANK.

    timeout (seconds) bounds how long a rank waits at a collective (torch's default: 10 minutes)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if use_cuda:
        # LOCAL_RANK, not RANK: on node 2 of 2, global rank 9 is local GPU 1 (the multi-node bug of the official DiT).
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        import datetime
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None,
                                timeout=None if timeout is None else datetime.timedelta(seconds=timeout))
    return Dist(rank, local_rank, world, dev)


def all_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Average a tensor over all ranks (identity with one process)."""
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= d.world
    return x


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints

def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, mmap: bool = False) -> dict:
    """Load a nanoCEP checkpoint (weights only: no arbitrary unpickling) or raise RunError with a one-line reason.

    mmap=True maps the tensors instead of reading them (cheap when only the config is needed)."""
    if not os.path.isfile(path):
        raise RunError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise RunError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise RunError(f"{path} is not a nanoCEP checkpoint (no 'model'/'config' entries)")
    return ckpt


# The config fields that define the experiment (what the model is trained on, and how): resuming with a different
# value is refused unless --resume-override names the field (architecture fields are the scripts' ARCH_FIELDS).
EXPERIMENT_FIELDS = ("corrupt", "corrupt_type", "corrupt_classes", "corrupt_mode", "corrupt_rewrites", "cep",
                     "cep_gamma", "cep_null", "ip", "class_dropout", "seed", "batch_size", "cond_dropout",
                     "label_smoothing", "cep_subset")


def resume_overrides(cfg) -> set:
    """--resume-override as a set of field names (kebab or snake case); a name that is no experiment field is an error."""
    names = {n.strip().replace("-", "_") for n in getattr(cfg, "resume_override", "").split(",") if n.strip()}
    unknown = sorted(names - set(EXPERIMENT_FIELDS))
    if unknown:
        raise RunError(f"--resume-override: {', '.join(unknown)} is not an experiment field "
                       f"(one of {', '.join(EXPERIMENT_FIELDS)})")
    return names


def check_experiment(cfg, saved: dict, path: str) -> list:
    """Refuse to resume `path` (whose config is `saved`) with a changed experiment field not named by --resume-override;
    return the overridden changes [{"field", "checkpoint", "now"}] so the run can log them."""
    allowed, defaults = resume_overrides(cfg), {f.name: f.default for f in dataclasses.fields(cfg)}
    changes = []
    for name in EXPERIMENT_FIELDS:
        if name not in defaults:
            continue
        theirs, ours = saved.get(name, defaults[name]), getattr(cfg, name)   # older checkpoints: the default
        if theirs == ours:
            continue
        if name not in allowed:
            flag = "--" + name.replace("_", "-")
            raise RunError(f"cannot resume from {path}: it has {flag} {theirs!r} but this run has {ours!r} (resume "
                           f"with the same value, or pass --resume-override {name} to change it on purpose)")
        changes.append({"field": name, "checkpoint": theirs, "now": ours})
    return changes


def find_resume(resume: str, out: str) -> str | None:
    """--resume auto -> out/last.pt if it exists; a path -> that path; '' -> None."""
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(out, "last.pt")
        return path if os.path.isfile(path) else None
    return resume


def rng_state(d: Dist) -> dict:
    """This rank's torch RNG states (CPU and, when used, CUDA)."""
    s = {"cpu": torch.get_rng_state()}
    if d.device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(d.device)
    return s


def gather_rng_states(d: Dist) -> list:
    """Every rank's RNG state, on rank 0 (None elsewhere)."""
    mine = rng_state(d)
    if d.world == 1:
        return [mine]
    objs = [None] * d.world
    dist.all_gather_object(objs, {k: v.cpu() for k, v in mine.items()})
    return objs if d.main else None


# ----------------------------------------------------------------------------------------------------------------------
# EMA

def ema_pairs(ema: nn.Module, model: nn.Module) -> tuple[list, list]:
    """The (EMA, model) parameter lists the EMA averages: trainable ones only (frozen ones such as pos_embed stay put).
    Built once per run, so the per-step update is one fused call."""
    pairs = [(pe, pm) for pe, pm in zip(ema.parameters(), model.parameters()) if pm.requires_grad]
    return [pe for pe, _ in pairs], [pm for _, pm in pairs]


@torch.no_grad()
def ema_update(ema_params: list, model_params: list, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for the lists of ema_pairs()."""
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)


# ----------------------------------------------------------------------------------------------------------------------
# The loop

class _closing:
    """Close the progress bar (so an error message starts on a fresh line) and the log file, however the loop ends."""

    def __init__(self, *things):
        self.things = things

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for t in self.things:
            if t is not None:
                t.close()


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps and saves before leaving."""

    def __init__(self):
        self.raised = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


class StepDraws(NamedTuple):
    """Every per-sample random draw of one training step, for the whole global batch (ranks take their slice)."""
    t: torch.Tensor                      # (B,) timesteps
    noise: torch.Tensor                  # (B, C, H, W) diffusion noise ε
    drop: torch.Tensor                   # (B,) CFG dropout mask
    ip_noise: torch.Tensor | None        # (B, C, H, W) input perturbation noise (--ip)
    posterior: torch.Tensor | None       # (B, C, H, W) the latent cache's posterior sample noise (--latents, KL)
    corrupt_seed: int | None             # seeds corrupt.corrupt_batch (--corrupt-mode random)
    cep_unit: torch.Tensor | None        # (B, *cep_shape) CEP's unit noise (cep.unit_noise)


def step_draws(seed: int, step: int, global_batch: int, latent_shape, num_timesteps: int, drop_prob: float,
               device: torch.device, ip: bool = False, posterior: bool = False, corrupt: bool = False,
               cep: str = "none", cep_shape=None) -> StepDraws:
    """The StepDraws of `step` from one generator seeded by (seed, step); the optional draws come after t, ε and the
    CFG mask (in field order), so turning one on never changes the others."""
    g = torch.Generator(device=device).manual_seed((seed * 7_919_993 + step) % (2 ** 63))
    B = global_batch
    t = torch.randint(0, num_timesteps, (B,), generator=g, device=device)
    noise = torch.randn((B, *latent_shape), generator=g, device=device)
    drop = torch.rand((B,), generator=g, device=device) < drop_prob
    ip_noise = torch.randn((B, *latent_shape), generator=g, device=device) if ip else None
    post = torch.randn((B, *latent_shape), generator=g, device=device) if posterior else None
    corrupt_seed = int(torch.randint(0, 2 ** 62, (1,), generator=g, device=device).item()) if corrupt else None
    unit = None
    if cep != "none" and cep_shape is not None:
        from cep import unit_noise
        unit = unit_noise((B, *cep_shape), cep, generator=g, device=device)
    return StepDraws(t, noise, drop, ip_noise, post, corrupt_seed, unit)


def batch_items(dataset_len: int, cfg, start_step: int):
    """items(step) -> the dataset indices (B,) of the whole global batch at `step` (StepSampler's order, any rank)."""
    from data import StepSampler, flip_key
    order = StepSampler(dataset_len, cfg.batch_size, 0, 1, cfg.seed, start_step, cfg.steps, flip=False)
    return lambda step: np.array([flip_key(k)[0] for k in order.keys(step)], dtype=np.int64)


def random_corruption(cfg, dataset, items):
    """labels(step, seed) -> the global batch's labels (B,) under --corrupt-mode random: its clean labels corrupted by
    corrupt.corrupt_batch with the static rule (dataset prior / asymmetric set), from a seed of the step's draws."""
    import corrupt
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)             # (K,) the dataset's prior
    classes = [int(c) for c in cfg.corrupt_classes.split(",")] if cfg.corrupt_classes else None
    kind = cfg.corrupt_type

    def labels(step: int, seed: int) -> torch.Tensor:
        clean = dataset.labels[items(step)]
        new, _ = corrupt.corrupt_batch(clean, cfg.corrupt, counts, kind, classes, rng=seed)
        return torch.as_tensor(new)
    return labels


def cep_subset_mask(num_items: int, fraction: float, seed: int) -> torch.Tensor:
    """(N,) bool: the fixed round(fraction * N) items that get CEP (--cep-subset), chosen once from the seed."""
    chosen = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + 0xCE9))
    mask = torch.zeros(num_items, dtype=torch.bool)
    mask[chosen[: int(round(fraction * num_items))]] = True
    return mask


def micro_cond_kwargs(cep_mask, cep_unit, mb: slice) -> dict:
    """The condition encoder's extra inputs for micro-batch mb (only those in use, so plain models still fit)."""
    kw = {}
    if cep_mask is not None:
        kw["cep_mask"] = cep_mask[mb]
    if cep_unit is not None:
        kw["cep_unit"] = cep_unit[mb]
    return kw


def train(cfg, model: nn.Module, diffusion, dataset, *, kind: str, arch_fields: tuple, sample_fn=None,
          encode_fn=None, latent_shape=None, d: Dist | None = None) -> dict:
    """Train `model` on `dataset` with `diffusion` as cfg says; returns a summary dict (final step, last loss, ...).

    model(x, t, y) is the denoiser and `model.cond` its condition encoder (conditions.py interface: drop, null_like).
    sample_fn(ema_model) -> images (N, C, H, W) in [-1, 1] for the grid; encode_fn(x) maps images to latents (VAE) when
    the data are pixels but the model works on latents; latent_shape is the model's input shape (C, H, W).
    arch_fields are the config fields that must match to resume from a checkpoint.
    """
    d = d or setup_distributed(cfg.device)
    use_cuda = d.device.type == "cuda"
    if cfg.batch_size % d.world:
        raise RunError(f"--batch-size {cfg.batch_size} is not divisible by the {d.world} processes")
    local_batch = cfg.batch_size // d.world
    micro = cfg.micro_batch_size or local_batch
    if local_batch % micro:
        raise RunError(f"--micro-batch-size {micro} does not divide the per-process batch {local_batch}")
    latent_shape = tuple(latent_shape or (dataset.channels, dataset.image_size, dataset.image_size))

    # -- precision & speed switches
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True   # TF32 matmuls/convs: ~free speed on Ampere+ for fp32 parts
        torch.backends.cudnn.allow_tf32 = True
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if use_cuda else "fp32")
    autocast = (torch.autocast(d.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())
    do_compile = cfg.compile if cfg.compile is not None else use_cuda

    # -- resume?
    os.makedirs(cfg.out, exist_ok=True)
    resume_path = find_resume(cfg.resume, cfg.out)
    if resume_path is None and os.path.isfile(os.path.join(cfg.out, "last.pt")):
        raise RunError(f"{cfg.out} already holds a run (last.pt); continue it with --resume auto or pick another --out")
    ckpt, overridden = None, []
    if resume_path:
        ckpt = load_checkpoint(resume_path)
        if ckpt.get("kind") != kind:
            raise RunError(f"{resume_path} is a {ckpt.get('kind')!r} checkpoint, not {kind!r}")
        for f in arch_fields:
            theirs, ours = ckpt["config"].get(f), getattr(cfg, f)
            if theirs != ours:
                raise RunError(f"cannot resume from {resume_path}: it has {f}={theirs!r} but this run has {f}={ours!r}")
        overridden = check_experiment(cfg, ckpt["config"], resume_path)

    torch.manual_seed(cfg.seed * 1000 + d.rank)      # per-rank module randomness (--cond-dropout)
    model.to(d.device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    averaged = ema_pairs(ema, model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                            fused=use_cuda or None)
    start_step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        start_step = int(ckpt["step"])
        states = ckpt.get("rng") or []
        if len(states) == d.world:
            torch.set_rng_state(states[d.rank]["cpu"])
            if use_cuda and "cuda" in states[d.rank]:
                torch.cuda.set_rng_state(states[d.rank]["cuda"], d.device)
        elif d.main:
            tqdm.write(f"note: checkpoint was written by {len(states)} processes, this run has {d.world}; "
                       f"--cond-dropout streams are re-seeded (the data order and all per-step draws are unaffected)")
            torch.manual_seed(cfg.seed * 1000 + d.rank + 7 * start_step)
    del ckpt

    train_model = model
    if do_compile:
        train_model = torch.compile(model)
    if d.world > 1:
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=[d.local_rank] if use_cuda else None)

    # -- data
    from data import StepSampler
    sampler = StepSampler(len(dataset), cfg.batch_size, d.rank, d.world, cfg.seed, start_step, cfg.steps,
                          flip=getattr(cfg, "flip", True))
    workers = cfg.num_workers if cfg.num_workers >= 0 else (min(8, os.cpu_count() or 1) if use_cuda else 0)
    # The loader gets its own generator: creating its iterator must not draw from the global RNG that CEP uses,
    # or a resumed run would drift from the straight one.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=use_cuda,
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                                         generator=torch.Generator().manual_seed(cfg.seed + 1_000_003 * start_step))
    # per-item and per-step extras, all functions of (seed, step) over the global batch
    random_labels = subset = items = None
    cep_subset = getattr(cfg, "cep_subset", 1.0)
    if (cfg.corrupt_mode == "random" and cfg.corrupt > 0) or cep_subset < 1:
        items = batch_items(len(dataset), cfg, start_step)
    if cfg.corrupt_mode == "random" and cfg.corrupt > 0:
        random_labels = random_corruption(cfg, dataset, items)
    if cep_subset < 1:
        subset = cep_subset_mask(len(dataset), cep_subset, cfg.seed)
    cached_posterior = bool(getattr(cfg, "latents", "")) and encode_fn is not None
    cep_shape = getattr(model.cond, "cep_shape", None) if cfg.cep != "none" and cfg.cep_gamma > 0 else None

    # -- logging
    log_path = os.path.join(cfg.out, "log.jsonl")
    log_file = open(log_path, "a") if d.main else None

    def log(record: dict) -> None:
        if d.main:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    if d.main:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        n_params = sum(p.numel() for p in model.parameters())
        tqdm.write(f"{kind}: {n_params:,} parameters | {len(dataset):,} items | global batch {cfg.batch_size} = "
                   f"{d.world} x {local_batch // micro} x {micro} | {d.device} {precision}"
                   f"{' compiled' if do_compile else ''} | steps {start_step} -> {cfg.steps} | out {cfg.out}")
        log({"event": "start", "step": start_step, "world": d.world, "device": str(d.device), "params": n_params,
             "precision": precision, "compile": do_compile, "resumed_from": resume_path})
        if resume_path and overridden:
            log({"event": "resume_override", "step": start_step, "changes": overridden})
            tqdm.write("note: resumed with --resume-override: " + ", ".join(
                f"{c['field']} {c['checkpoint']!r} -> {c['now']!r}" for c in overridden))

    def save(step: int, extra_copy: bool) -> None:
        rng = gather_rng_states(d)
        if d.main:
            state = {"version": CHECKPOINT_VERSION, "kind": kind, "step": step, "config": dataclasses.asdict(cfg),
                     "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "rng": rng,
                     "data": {"samples_seen": step * cfg.batch_size, "world": d.world}}
            atomic_save(state, os.path.join(cfg.out, "last.pt"))
            if extra_copy:
                atomic_save(state, os.path.join(cfg.out, f"step_{step:07d}.pt"))
        if d.world > 1:
            dist.barrier()

    def grid(step: int) -> None:
        if d.main and sample_fn is not None:
            from data import save_grid
            images = sample_fn(ema)
            path = os.path.join(cfg.out, "samples", f"step_{step:07d}.png")
            save_grid(images.float().cpu(), path, nrow=getattr(sample_fn, "nrow", 8))
            log({"event": "samples", "step": step, "path": path})
            if step == cfg.steps and getattr(sample_fn, "labels", None) is not None:
                import judge  # built-in data: does the final grid show its classes? (judge.py)
                judge.judge_final_grid(cfg, images, sample_fn.labels, log, tqdm.write)
        if d.world > 1:
            dist.barrier()

    # -- the loop
    loss_sum = torch.zeros((), device=d.device)
    loss_n, last_loss, t_log, step = 0, float("nan"), time.time(), start_step
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not d.main, dynamic_ncols=True, desc=kind)
    status = "done"
    model.train()
    with _StopFlag() as stop, _closing(bar, log_file):
        it = iter(loader)
        for step in range(start_step, cfg.steps):
            x, y = next(it)
            x = x.to(d.device, non_blocking=True)
            draws = step_draws(cfg.seed, step, cfg.batch_size, latent_shape, diffusion.num_timesteps,
                               cfg.class_dropout, d.device, ip=diffusion.ip_gamma > 0, posterior=cached_posterior,
                               corrupt=random_labels is not None, cep=cfg.cep, cep_shape=cep_shape)
            mine = slice(d.rank * local_batch, (d.rank + 1) * local_batch)
            t, noise, drop = draws.t[mine], draws.noise[mine], draws.drop[mine]
            ip_noise = draws.ip_noise[mine] if draws.ip_noise is not None else None
            cep_unit = draws.cep_unit[mine] if draws.cep_unit is not None else None
            cep_mask = subset[torch.as_tensor(items(step)[mine])].to(d.device) if subset is not None else None
            if random_labels is not None:
                y = random_labels(step, draws.corrupt_seed)[mine]
            y = y.to(d.device, non_blocking=True)
            if encode_fn is not None:
                with torch.no_grad(), autocast:
                    x = (encode_fn(x, noise=draws.posterior[mine]) if cached_posterior else encode_fn(x)).float()
            y = model.cond.drop(y, drop)                                   # CFG: null condition where dropped
            for i in range(0, local_batch, micro):
                mb = slice(i, i + micro)
                last_micro = i + micro >= local_batch
                sync = nullcontext() if (d.world == 1 or last_micro) else train_model.no_sync()
                with sync, autocast:
                    yc, cond_kw = y[mb], micro_cond_kwargs(cep_mask, cep_unit, mb)
                    terms = diffusion.training_losses(lambda xt, tt: train_model(xt, tt, yc, **cond_kw), x[mb], t[mb],
                                                      noise[mb],
                                                      ip_noise=None if ip_noise is None else ip_noise[mb])
                    loss = terms["loss"].mean()
                (loss * (micro / local_batch)).backward()
                loss_sum += loss.detach() * (micro / local_batch)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema_update(*averaged, cfg.ema_decay)
            loss_n += 1
            done = step + 1
            bar.update(1)

            log_now = done % cfg.log_every == 0 or done == cfg.steps
            ckpt_now = done % cfg.ckpt_every == 0 or done == cfg.steps
            if log_now or ckpt_now or (d.world == 1 and stop.raised):
                mean_loss = all_mean(loss_sum / max(loss_n, 1), d).item()
                if not math.isfinite(mean_loss):
                    raise Diverged(f"loss became non-finite ({mean_loss}) before step {done}; stopping. The last good "
                                   f"checkpoint ({os.path.join(cfg.out, 'last.pt')}) is left untouched")
                if log_now:
                    if use_cuda:
                        torch.cuda.synchronize()
                    dt = time.time() - t_log
                    rec = {"step": done, "loss": mean_loss, "lr": cfg.lr, "step_time": dt / loss_n,
                           "img_per_s": loss_n * cfg.batch_size / dt}
                    if use_cuda:
                        rec["max_mem_gb"] = torch.cuda.max_memory_allocated(d.device) / 2 ** 30
                    log(rec)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rec['img_per_s']:.0f}")
                    last_loss, loss_sum, loss_n, t_log = mean_loss, loss_sum.zero_(), 0, time.time()
            if cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps):
                grid(done)
            if ckpt_now:
                save(done, extra_copy=cfg.keep_every > 0 and done % cfg.keep_every == 0)
            # all ranks must agree to stop at the same step: with DDP the flag is reduced at log/ckpt steps only
            stop_now = stop.raised
            if d.world > 1 and (log_now or ckpt_now):
                flag = torch.tensor(float(stop.raised), device=d.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop_now = bool(flag.item())
            elif d.world > 1:
                stop_now = False
            if stop_now and done < cfg.steps:
                if not ckpt_now:
                    save(done, extra_copy=False)
                status = "stopped"
                if d.main:
                    tqdm.write(f"stopped by signal at step {done}; checkpoint saved to {cfg.out}/last.pt "
                               f"(continue with --resume auto)")
                log({"event": "stopped", "step": done})
                break
        if status == "done":
            log({"event": "done", "step": cfg.steps, "loss": last_loss})
    return {"status": status, "step": step + 1 if cfg.steps > start_step else start_step, "loss": last_loss,
            "ema": ema, "model": model}


def one_line(e: BaseException) -> str:
    """An exception as one line; errors re-raised from DataLoader workers keep only the original message."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    return lines[-1] if lines[0].startswith("Caught ") else lines[0]


# ----------------------------------------------------------------------------------------------------------------------
# The main() of the train scripts: config -> data -> model -> train(), with errors as one line and an exit code

def check_run_config(cfg, downsample: int = 1) -> None:
    """The checks every train script shares (ranges, corruption and latent flags); scripts add their model's own."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise RunError(f"--out {cfg.out} is a file, not a run folder")
    if not 0.0 <= cfg.corrupt < 1.0:
        raise RunError(f"--corrupt must be in [0, 1), got {cfg.corrupt}")
    if cfg.cep_gamma < 0:
        raise RunError(f"--cep-gamma must be >= 0, got {cfg.cep_gamma}")
    if not 0.0 <= cfg.class_dropout < 1.0:
        raise RunError(f"--class-dropout must be in [0, 1), got {cfg.class_dropout}")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise RunError("--steps, --batch-size and --lr must be positive")
    if cfg.image_size < 1 or cfg.image_size % downsample:
        raise RunError(f"--image-size {cfg.image_size} must be a positive multiple of {downsample} with --vae {cfg.vae}")
    if cfg.corrupt_type == "asymmetric" and cfg.corrupt > 0 and not cfg.corrupt_classes:
        raise RunError("--corrupt-type asymmetric needs --corrupt-classes (e.g. 1,5,9)")
    if cfg.latents and cfg.vae == "none":
        raise RunError("--latents needs the --vae the cache was made with (e.g. --vae kl-f8)")
    if cfg.log_every < 1 or cfg.ckpt_every < 1:
        raise RunError("--log-every and --ckpt-every must be >= 1")
    check_ablation_config(cfg)
    grid_cads(cfg)                                       # a bad --sample-cads fails before any work


def check_ablation_config(cfg) -> None:
    """The ranges of the paper's ablation flags (--cond-dropout, --label-smoothing, --cep-subset)."""
    if not 0.0 <= cfg.cond_dropout < 1.0:
        raise RunError(f"--cond-dropout must be in [0, 1), got {cfg.cond_dropout}")
    if not 0.0 <= cfg.label_smoothing <= 1.0:
        raise RunError(f"--label-smoothing must be in [0, 1], got {cfg.label_smoothing}")
    if not 0.0 < cfg.cep_subset <= 1.0:
        raise RunError(f"--cep-subset must be in (0, 1], got {cfg.cep_subset}")
    if cfg.cep_subset < 1 and cfg.cep == "none":
        raise RunError("--cep-subset picks the items CEP perturbs: it needs --cep uniform | gaussian")
    if cfg.label_smoothing > 0 and getattr(cfg, "cond", "class") == "text":
        raise RunError("--label-smoothing smooths class labels; it needs --cond class (captions have no one-hot)")


def grid_cads(cfg):
    """The cep.CADS of --sample-cads 'noise,tau1,tau2,psi' (evaluate.py's --cads-* in one flag), or None if off."""
    from cep import CADS
    spec = getattr(cfg, "sample_cads", "")
    if not spec:
        return None
    try:
        noise, tau1, tau2, psi = (float(v) for v in spec.split(","))
        return CADS(tau1, tau2, noise, psi) if noise > 0 else None
    except ValueError as e:
        raise RunError(f"--sample-cads {spec!r}: expected 'noise,tau1,tau2,psi' such as 0.1,0.6,0.9,1 ({e})") from None


def build_data(cfg, device):
    """(dataset, encode_fn, decode): pixels from --data, or latents from a --latents cache, with the VAE around them.

    encode_fn maps a loaded batch to what the model trains on (VAE posterior sample of pixels, or a fresh sample from the
    cached mean/std); decode maps latents back to pixels for the sample grids. Both are None in pixel space.
    """
    import data
    if cfg.latents:
        from latents import LatentDataset, posterior_sample
        dataset = LatentDataset(cfg.latents)
        if dataset.vae != cfg.vae or dataset.image_size != cfg.image_size:
            raise RunError(f"latent cache {cfg.latents} holds {dataset.vae} latents of {dataset.image_size}px images; "
                           f"pass --vae {dataset.vae} --image-size {dataset.image_size}")
        encode_fn = posterior_sample
    else:
        dataset = data.build_dataset(cfg.data, cfg.image_size, seed=cfg.seed, builtin_length=cfg.builtin_length,
                                     captions=cfg.cond == "text")
        encode_fn = None
    if cfg.vae == "none":
        return dataset, None, None
    import vae
    ae = vae.load_vae(cfg.vae, cfg.vae_path or None, device=device)
    return dataset, encode_fn or ae.encode, ae.decode


# ---- conditions and sample grids (class or text) ----

CAPTION_CORRUPTIONS = ("swap", "rewrite")


def check_condition_config(cfg) -> None:
    """The condition flags: resolve --corrupt-type auto, refuse label corruption of captions (and vice versa)."""
    text = cfg.cond == "text"
    if cfg.corrupt_type == "auto":
        cfg.corrupt_type = "swap" if text else "symmetric"
    if not text and cfg.corrupt_type in CAPTION_CORRUPTIONS:
        raise RunError(f"--corrupt-type {cfg.corrupt_type} corrupts captions: it needs --cond text "
                       f"(class labels use symmetric | asymmetric)")
    if text and cfg.corrupt_type not in CAPTION_CORRUPTIONS:
        raise RunError(f"--corrupt-type {cfg.corrupt_type} flips class labels; with --cond text use swap | rewrite")
    if text and cfg.corrupt_mode == "random" and cfg.corrupt > 0:
        raise RunError("--corrupt-mode random re-flips class labels every step; captions are corrupted statically only")
    if cfg.corrupt_type == "rewrite" and not cfg.corrupt_rewrites:
        raise RunError("--corrupt-type rewrite needs --corrupt-rewrites FILE.json ({index: rewritten caption})")
    if cfg.corrupt_rewrites and cfg.corrupt_type != "rewrite":
        raise RunError("--corrupt-rewrites is only used with --corrupt-type rewrite")
    if cfg.sample_prompts and not text:
        raise RunError("--sample-prompts is for --cond text (class grids show one row per class)")
    if text:
        if cfg.context_length < 2:
            raise RunError(f"--context-length must be >= 2 (text + end token), got {cfg.context_length}")
        if cfg.text_width < 1 or cfg.text_heads < 1 or cfg.text_depth < 0 or cfg.text_width % cfg.text_heads:
            raise RunError(f"--text-width {cfg.text_width} must be a positive multiple of --text-heads {cfg.text_heads}"
                           f" and --text-depth ({cfg.text_depth}) >= 0")
        from conditions import get_tokenizer
        get_tokenizer(cfg.tokenizer)                     # a missing / bad tokenizer fails now, not after data loading


def encode_prompts(cfg, prompts: list[str]) -> torch.Tensor:
    """Prompts -> the caption token ids (B, L) a text model of this config takes (what its y is)."""
    from conditions import get_tokenizer
    return get_tokenizer(cfg.tokenizer)(list(prompts), cfg.context_length)


BUILTIN_PROMPT = "a large {} at the middle of a dark background"   # one grid row per built-in class, e.g. "red disc"


def grid_prompts(cfg, dataset) -> list[str]:
    """The fixed prompts of the text grids: --sample-prompts, else one per built-in class, else dataset captions."""
    if cfg.sample_prompts:
        if not os.path.isfile(cfg.sample_prompts):
            raise FileNotFoundError(f"--sample-prompts file not found: {cfg.sample_prompts}")
        with open(cfg.sample_prompts, encoding="utf-8") as f:
            prompts = [ln.strip() for ln in f if ln.strip()]
        if not prompts:
            raise ValueError(f"--sample-prompts file {cfg.sample_prompts} holds no prompts")
        return prompts[:16]
    if cfg.data == "builtin" and not cfg.latents:
        return [BUILTIN_PROMPT.format(name) for name in dataset.class_names]
    picks = np.linspace(0, len(dataset) - 1, min(len(dataset), 8)).round().astype(int)
    return list(dict.fromkeys(dataset.captions[int(i)] for i in picks))       # distinct, in order


def grid_cfg_scale(cfg) -> float:
    """The grids' guidance scale: --sample-cfg, or 1 (unguided, with a note) when --class-dropout 0 left no null class."""
    if getattr(cfg, "cond", "class") == "class" and cfg.class_dropout == 0 and cfg.sample_cfg != 1:
        if int(os.environ.get("RANK", 0)) == 0:
            tqdm.write(f"note: --class-dropout 0 trains no null class, so the sample grids are unguided "
                       f"(--sample-cfg {cfg.sample_cfg:g} ignored)")
        return 1.0
    return cfg.sample_cfg


def make_sample_fn(cfg, diffusion, num_classes: int, shape, decode=None, prompts=None):
    """EMA sample grid with fixed noise and conditions, CFG at grid_cfg_scale(cfg): one row per class (<= 16 classes), or
    with prompts (text) one row per prompt, whose captions go to samples/captions.txt (one line per row)."""
    from diffusion import cfg_model_fn
    if prompts is None:
        classes = np.unique(np.linspace(0, num_classes - 1, min(num_classes, 16)).round().astype(int))
        rows = torch.as_tensor(classes)                                        # (R,)
    else:
        rows = encode_prompts(cfg, prompts)                                    # (R, L)
    conds = rows.repeat_interleave(cfg.sample_per_class, dim=0)
    noise = torch.randn((len(conds), *shape), generator=torch.Generator().manual_seed(cfg.seed))  # shape (C, H, W)
    scale = grid_cfg_scale(cfg)
    cads = grid_cads(cfg)

    @torch.no_grad()
    def sample(model):
        dev = next(model.parameters()).device
        y = conds.to(dev)
        fn = cfg_model_fn(model, y, model.cond.null_like(y), scale, learn_sigma=cfg.learn_sigma)
        seeds = range(cfg.seed, cfg.seed + len(y))                             # CADS noise: one stream per image
        with nullcontext() if cads is None else cads.sampling(model, model.cond, seeds, diffusion.num_timesteps):
            x = diffusion.sample(fn, noise.to(dev), sampler=cfg.sample_sampler, steps=cfg.sample_steps,
                                 clip_x0=decode is None)      # pixel space: keep x0 estimates in [-1, 1]
        if prompts is not None:  # the grid's rows, beside its PNGs (the same prompts for every step)
            os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)
            with open(os.path.join(cfg.out, "samples", "captions.txt"), "w", encoding="utf-8") as f:
                f.write("".join(p + "\n" for p in prompts))
        return decode(x) if decode is not None else x

    sample.nrow = cfg.sample_per_class
    sample.captions = prompts
    sample.labels = conds if prompts is None else None                     # (N,) the grid's classes, for the judge
    return sample


def prepare_data(script, cfg, device):
    """(dataset, encode_fn, decode, prompts): the data, corrupted as cfg says, with the autoencoder around it.

    Resolves cfg.num_classes from the data, applies static label or caption corruption (writing the manifest into the
    run folder), and for text models turns items into (x, caption token ids). prompts: the text grids' fixed prompts.
    """
    import data
    cond = getattr(cfg, "cond", "class")
    dataset, encode_fn, decode = build_data(cfg, device)
    if cond == "class" and dataset.num_classes == 0:
        raise RunError(f"{cfg.latents or cfg.data} has captions but no class labels: train it with --cond text")
    if cond == "text" and getattr(dataset, "captions", None) is None:
        raise RunError(f"{cfg.latents or cfg.data} has no captions: --cond text needs captioned data")
    if cfg.num_classes == 0:
        cfg.num_classes = dataset.num_classes
    elif cfg.num_classes < dataset.num_classes:
        raise RunError(f"--num-classes {cfg.num_classes} < the {dataset.num_classes} classes in {cfg.data}")
    prompts = grid_prompts(cfg, dataset) if cond == "text" else None    # from the clean captions
    manifest = os.path.join(cfg.out, "corruption.json")
    if cond == "class" and cfg.corrupt > 0 and cfg.corrupt_mode == "static":
        classes = [int(c) for c in cfg.corrupt_classes.split(",")] if cfg.corrupt_classes else None
        os.makedirs(cfg.out, exist_ok=True)
        data.apply_corruption(dataset, cfg.corrupt, cfg.corrupt_type, seed=cfg.seed, classes=classes,
                              manifest_path=manifest)
    if cond == "text":
        from conditions import get_tokenizer
        if cfg.corrupt > 0 or cfg.corrupt_type == "rewrite":
            os.makedirs(cfg.out, exist_ok=True)
            data.apply_caption_corruption(dataset, cfg.corrupt, cfg.corrupt_type, seed=cfg.seed,
                                          rewrites=cfg.corrupt_rewrites or None, manifest_path=manifest)
        # items become (x, token ids (L,)); a flipped item gets its caption's left/right mirrored
        dataset = data.TokenizedCaptions(dataset, get_tokenizer(cfg.tokenizer), cfg.context_length, mirror=True)
    return dataset, encode_fn, decode, prompts


def run(script, argv, kind: str) -> int:
    """A train script's main(): parse its config, check it, build data, model and diffusion, train.

    `script` is the train script's module (CONFIG_CLASS, PRESETS, check_config, build_model, build_diffusion,
    latent_shape, ARCH_FIELDS). Bad input -> one line on stderr and exit 2; divergence -> exit 1.
    """
    name = os.path.basename(script.__file__)
    try:
        cfg = parse_config(script.CONFIG_CLASS, argv, script.PRESETS,
                           description=script.__doc__.split("\n\n")[0].strip())
        init_sd = None
        if cfg.init_from:                                # fine-tuning: SOURCE's architecture, numerics and weights
            import pretrained
            cfg, init_sd, init_note = pretrained.init_weights(cfg.init_from, cfg, kind, explicit_fields(argv))
        script.check_config(cfg)
        d = setup_distributed(cfg.device)
        resume_path = find_resume(cfg.resume, cfg.out)
        if resume_path is None and os.path.isfile(os.path.join(cfg.out, "last.pt")):
            # checked before the corruption manifest is written into the run folder, not only in train()
            raise RunError(f"{cfg.out} already holds a run (last.pt); continue it with --resume auto or pick another --out")
        if resume_path is not None:                      # refused before prepare_data rewrites corruption.json
            check_experiment(cfg, load_checkpoint(resume_path, mmap=True)["config"], resume_path)
        dataset, encode_fn, decode, prompts = prepare_data(script, cfg, d.device)
        torch.manual_seed(cfg.seed)                      # the same initial weights on every rank and every rerun
        model = script.build_model(cfg)
        if init_sd is not None and find_resume(cfg.resume, cfg.out) is None:   # a resumed run has its own weights
            init_note += "; " + pretrained.load_init(model, init_sd)
            if d.main:
                print(f"{name}: {init_note}", flush=True)
                os.makedirs(cfg.out, exist_ok=True)
                with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
                    f.write(json.dumps({"event": "init_from", "source": cfg.init_from, "note": init_note}) + "\n")
        diffusion = script.build_diffusion(cfg)
        sample_fn = (make_sample_fn(cfg, diffusion, cfg.num_classes, script.latent_shape(cfg), decode, prompts)
                     if cfg.sample_every else None)
        result = train(cfg, model, diffusion, dataset, kind=kind, arch_fields=script.ARCH_FIELDS, d=d,
                       sample_fn=sample_fn, encode_fn=encode_fn, latent_shape=script.latent_shape(cfg))
    except (RunError, ValueError, FileNotFoundError, ConnectionError) as e:
        print(f"{name}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    return 0 if result["status"] in ("done", "stopped") else 1
