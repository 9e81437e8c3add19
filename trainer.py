"""
The training loop train_dit.py and train_ldm.py call: `train(cfg, model, diffusion, data, kind=..., d=...)`, and the
step it repeats, `train_step` (tools/bench.py times that same function): DDP, bf16 autocast, torch.compile, EMA, exact resume
and a clean stop on SIGTERM/SIGINT. What the run writes (logs, grids, checkpoints) is runio.py's; the data it trains
on comes from `load_data` (data.py, corrupt.py through data.py, latents.py, vae.py).

Read it top to bottom: load_data -> TrainState / make_state -> train_step -> train (the loop) -> its small helpers.

You do not run this file; the train scripts do:
    python train_dit.py                                   # CPU, 1 process
    torchrun --nproc_per_node 8 train_dit.py ...          # 8 GPUs; add --nnodes/--node_rank/--rdzv_* for several nodes

What makes a run reproducible and exactly resumable, in one place:
- The data order is a function of (seed, step) (data.StepSampler), and so is every per-sample random draw of the
  training step (timestep t, noise ε, CFG dropout mask): they are drawn for the whole *global* batch from a generator
  seeded by (seed, step) and each rank takes its slice. So 1 process and N processes see the same samples with the same
  noise, and a run resumed at step s continues exactly as if it had never stopped.
  The same generator draws the per-step extras: CEP's δ (for the whole global batch, handed to the condition encoder
  as cep_unit) and the KL latents' posterior sample (through the autoencoder or from a latent cache). The seed of
  --corrupt-mode random's corruption of the global batch is a host-side function of (seed, step), so it needs no
  device sync; --cep-subset's fixed items are chosen once from the seed and looked up by the batch's dataset indices.
- Randomness still drawn inside modules (--cond-dropout's mask) comes from the per-rank torch RNG, seeded by
  (seed, rank), whose state is saved for every rank in each checkpoint: resume is exact, 1 = N processes is not.
- A checkpoint holds plain data only (tensors, numbers, strings, dicts), the *uncompiled* module's state_dict, the EMA,
  the optimizer, the step, every rank's RNG state and the config, written atomically, and loads with
  torch.load(weights_only=True).
- Inside a step nothing waits for the GPU: the loss stays a device tensor, and the host reads it (one all-reduce and
  .item()) only at log and checkpoint steps.
"""
import copy
import dataclasses
import functools
import os
import sys
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

import conditions
import data as datalib
import diffusion as D
from cep import unit_noise
from plumbing.common import (Dist, RunError, WriteFailed, atomic_open, derive_seed, keep_freed_memory,
                             leave_process_group, local_rank0_first, one_line)
from plumbing.muon import MuonAdamW
from config import grid_cads, learning_rate
from runio import Diverged, Resume, RunIO, StopFlag, TrackerFailed, check_run_folder
from sources.captions import TokenizedCaptions, encode_prompts, grid_prompts
from sources.control import ControlMaps, grid_controls
from sources.tokenizer import get_tokenizer


def exit_codes(script: str):
    """Decorator for a train script's main(): bad input -> one line `script: error: ...`, exit 2; divergence or a
    failed write (full disk: plumbing.common.WriteFailed) -> one line, exit 1.
    A run that ends well (or diverges, or fails a write: every rank sees it at the same collective) leaves torchrun's
    process group first (plumbing.common.leave_process_group: a barrier, then destroy): without that, gloo's worker
    threads can still hold tensors when the interpreter shuts down and abort the process (SIGABRT after the last step;
    a known PyTorch behaviour). Not after a bad input or another error: another rank may still be inside a collective. A
    --log tracker that cannot start (runio.TrackerFailed) stops every rank at once: rank 0 prints the line, exit 2."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                code = main(argv)
            except TrackerFailed as e:                  # every rank raised it at the same broadcast: leave together
                if e.main:
                    print(f"{script}: error: {e}", file=sys.stderr)
                code = 2
            except (RunError, ValueError, FileNotFoundError, ConnectionError) as e:
                print(f"{script}: error: {one_line(e)}", file=sys.stderr)
                return 2
            except Diverged as e:
                print(f"{script}: {e}", file=sys.stderr)
                code = 1
            except WriteFailed as e:
                print(f"{script}: error: {e}", file=sys.stderr)
                if not e.shared:                         # raised on this rank alone: a peer may be inside a collective
                    return 1
                code = 1
            leave_process_group()
            return code
        return run
    return wrap


# ----------------------------------------------------------------------------------------------------------------------
# Data: the dataset (or latent cache), corrupted as the config says, with the autoencoder around it

@dataclasses.dataclass
class TrainData:
    dataset: torch.utils.data.Dataset    # items (x, y): images or cached latents, class ids or caption token ids (L,)
    num_classes: int                     # of the class table: --num-classes, or the dataset's
    encode: Callable | None = None       # (loaded batch, posterior noise) -> the latents the model trains on
    decode: Callable | None = None       # latents -> images, for the sample grids
    prompts: list | None = None          # the text grids' fixed prompts
    resume: Resume | None = None         # the checked checkpoint this run continues (runio.check_run_folder)


def load_data(cfg, d: Dist, open_cache: Callable | None = None, load_vae: Callable | None = None) -> TrainData:
    """The training data of cfg: static corruption applied (its manifest written to out/corruption.json), captions
    tokenised for text models, and the autoencoder's encode/decode when the model works on latents.

    The autoencoder side is handed in by the train script (weights/ is an instrument the core never imports):
    open_cache(path) -> a latent cache dataset (with .vae, .image_size and .encode, its posterior sampler) for --latents;
    load_vae(kind, path, device=) -> the autoencoder (.encode, .decode) for --vae.
    The run folder and --resume are checked once the class count is known, before anything is written. Each node's
    local rank 0 reads the data first (a shard index is built once, then read by the node's other ranks)."""
    if cfg.latents:
        cache = open_cache(cfg.latents)
        encode = cache.encode
        if cache.vae != cfg.vae or cache.image_size != cfg.image_size:
            raise RunError(f"latent cache {cfg.latents} holds {cache.vae} latents of {cache.image_size}px images; "
                           f"pass --vae {cache.vae} --image-size {cache.image_size}")
        dataset = datalib.subset_per_class(cache, cfg.items_per_class, cfg.seed)    # k items per class, if asked
    else:
        dataset = local_rank0_first(lambda: datalib.training_set(cfg), d)   # --items-per-class: k items per class
        encode = None
    source, text = cfg.latents or cfg.data, cfg.cond == "text"
    if not text and dataset.num_classes == 0:
        raise RunError(f"{source} has captions but no class labels: train it with --cond text")
    if text and getattr(dataset, "captions", None) is None:
        raise RunError(f"{source} has no captions: --cond text needs captioned data")
    if 0 < cfg.num_classes < dataset.num_classes:
        raise RunError(f"--num-classes {cfg.num_classes} < the {dataset.num_classes} classes in {cfg.data}")
    resume = check_run_folder(cfg, cfg.num_classes or dataset.num_classes)
    prompts = grid_prompts(cfg.sample_prompts, dataset, builtin=cfg.data == "builtin" and not cfg.latents) \
        if text else None                                           # from the clean captions
    if (cfg.corrupt > 0 and cfg.corrupt_mode == "static") or cfg.corrupt_type == "rewrite":
        os.makedirs(cfg.out, exist_ok=True)
        datalib.corrupt_dataset(dataset, cfg.corrupt, cfg.corrupt_type, seed=cfg.seed, classes=cfg.corrupt_classes,
                                rewrites=cfg.corrupt_rewrites, manifest_path=os.path.join(cfg.out, "corruption.json"))
    if text:  # items become (x, token ids (L,)); a flipped item gets its caption's left/right mirrored
        dataset = TokenizedCaptions(dataset, get_tokenizer(cfg.tokenizer), cfg.context_length, mirror=True)
    if cfg.control != "none":  # items become (x, y, control map): ControlNet training (models/controlnet.py)
        dataset = ControlMaps(dataset, cfg.control, cfg.canny_low, cfg.canny_high, cfg.control_maps)
    ae = load_vae(cfg.vae, cfg.vae_path or None, device=d.device) if cfg.vae != "none" else None
    return TrainData(dataset, cfg.num_classes or dataset.num_classes, encode or (ae and posterior_sampler(ae)),
                     ae and ae.decode, prompts, resume)


def posterior_sampler(ae) -> Callable:
    """The autoencoder's encoder as training calls it: images -> mean + std * noise, the step's posterior noise (drawn
    from the (seed, step) generator, as a latent cache's is: the global RNG would differ by rank); VQ (no noise drawn):
    its latents."""
    def encode(x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        mean, std = ae.encode_moments(x)                            # (b, L, h, w) each, float32
        return mean if noise is None else mean + std * noise.to(mean.dtype)
    return encode


# ----------------------------------------------------------------------------------------------------------------------
# The step

@dataclasses.dataclass
class TrainState:
    """Everything train_step touches: the module and its training wrapper, EMA, optimizer, precision, batch split."""
    cfg: object
    d: Dist
    model: nn.Module                     # the plain module: its state_dict is what checkpoints hold
    train_model: nn.Module               # what the step calls: the model, DDP-wrapped and/or compiled
    ema: nn.Module
    opt: torch.optim.Optimizer           # AdamW, or plumbing/muon.py's MuonAdamW (--optimizer muon)
    diffusion: object
    autocast: object
    local_batch: int
    micro: int
    encode: Callable | None = None       # (loaded batch, posterior noise) -> latents (VAE, or a latent cache)
    posterior: bool = False              # draw the step's posterior noise for encode (latents: 1 = N processes)
    items: Callable | None = None        # step -> the global batch's dataset indices (B,)
    random_labels: Callable | None = None    # --corrupt-mode random: (step, seed) -> the global batch's labels (B,)
    cep_subset: torch.Tensor | None = None   # --cep-subset: (N,) bool, the items CEP perturbs
    cep_shape: tuple | None = None       # one sample's condition embedding shape, when the step pre-draws CEP noise
    focus: tuple = (0.0, 0, 0)           # --t-focus: (fraction of the batch, band start, band stop) for step_draws
    grad_norm: torch.Tensor | None = None    # 0-d: the last step's total gradient norm before clipping (update)

    @property
    def rows(self) -> slice:
        """This rank's rows of the global batch."""
        return slice(self.d.rank * self.local_batch, (self.d.rank + 1) * self.local_batch)

    @functools.cached_property
    def ema_pairs(self) -> tuple[list, list]:
        """(EMA, model) parameter lists: trainable ones only (frozen ones such as pos_embed stay put); built once."""
        pairs = [(pe, pm) for pe, pm in zip(self.ema.parameters(), self.model.parameters()) if pm.requires_grad]
        return [pe for pe, _ in pairs], [pm for _, pm in pairs]


def make_state(cfg, model: nn.Module, diffusion, d: Dist, data: TrainData | None = None,
               start_step: int = 0) -> TrainState:
    """Move the model to its device, copy the EMA, build the optimizer (fused AdamW on GPU), pick the precision, wrap for DDP and compile, and
    set up the per-step extras of the data (random corruption, CEP subset, cached posterior)."""
    if cfg.batch_size % d.world:
        raise RunError(f"--batch-size {cfg.batch_size} is not divisible by the {d.world} processes")
    local_batch = cfg.batch_size // d.world
    micro = cfg.micro_batch_size or local_batch
    if local_batch % micro:
        raise RunError(f"--micro-batch-size {micro} does not divide the per-process batch {local_batch}")
    cuda = d.device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True   # TF32 matmuls/convs: ~free speed on Ampere+ for fp32 parts
        torch.backends.cudnn.allow_tf32 = True
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    model.to(d.device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = make_optimizer(cfg, model, fused=cuda)
    s = TrainState(cfg, d, model, wrap_model(model, cfg, d), ema, opt, diffusion,
                   torch.autocast(d.device.type, dtype=torch.bfloat16) if bf16 else nullcontext(), local_batch, micro)
    s.cep_shape = getattr(model.cond, "cep_shape", None) if cfg.cep != "none" and cfg.cep_gamma > 0 else None
    s.focus = (cfg.t_focus, *D.focus_band(D.log_snr(diffusion.alphas_cumprod), cfg.t_focus_min_log_snr,  # --t-focus
                                          cfg.t_focus_max_log_snr))
    if data is not None:
        s.encode = data.encode                            # the step draws posterior noise where a posterior has one:
        s.posterior = data.encode is not None and (bool(cfg.latents) or cfg.vae == "kl-f8")   # a cache, or KL
        random = cfg.corrupt_mode == "random" and cfg.corrupt > 0
        n = len(data.dataset)
        if random or cfg.cep_subset < 1 or cfg.cep_fixed_delta:
            s.items = datalib.batch_items(n, cfg.batch_size, cfg.seed, start_step, cfg.steps)
        if random:
            s.random_labels = datalib.random_corruption(data.dataset, cfg.corrupt, cfg.corrupt_type,
                                                        cfg.corrupt_classes, s.items)
        s.cep_subset = datalib.cep_subset_mask(n, cfg.cep_subset, cfg.seed) if cfg.cep_subset < 1 else None
    return s


def make_optimizer(cfg, model: nn.Module, fused: bool = False):
    """AdamW on every trainable parameter, or with --optimizer muon, Muon on the transformer blocks' matrices and
    AdamW on the rest (plumbing/muon.py)."""
    # on a CPU, foreach (one call per operation for all tensors) instead of torch's default there, a loop over them:
    # the same numbers, 1.2-1.6 instead of 1.8-2.2 ms per step for the CPU default's 67 AdamW tensors; fused on a GPU
    adamw = functools.partial(torch.optim.AdamW, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                              fused=fused or None, foreach=None if fused else True)
    if cfg.optimizer == "muon":
        try:
            return MuonAdamW(model, cfg.lr, cfg.weight_decay, adamw=adamw)
        except ValueError as e:
            raise RunError(f"--optimizer muon: {e}") from None
    return adamw([p for p in model.parameters() if p.requires_grad])


def wrap_model(model: nn.Module, cfg, d: Dist) -> nn.Module:
    """DDP first, then torch.compile of the DDP module: the order PyTorch documents for compiled DDP. Dynamo's
    DDPOptimizer then splits the graph at DDP's bucket boundaries, so each bucket's all-reduce overlaps the rest of the
    backward (compiling first and wrapping after leaves one opaque graph, and the communication waits for all of it).
    Neither wrapper touches `model` itself, so model.state_dict() keeps its plain keys."""
    wrapped = model
    if d.world > 1:
        ids = [d.local_rank] if d.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile if cfg.compile is not None else d.device.type == "cuda":
        wrapped = torch.compile(wrapped)
    return wrapped


@dataclasses.dataclass
class StepDraws:
    """Every per-sample random draw of one training step, for the whole global batch (share() takes a rank's rows)."""
    t: torch.Tensor                      # (B,) timesteps (uniform, or --t-focus's mixture)
    noise: torch.Tensor                  # (B, C, H, W) diffusion noise ε
    drop: torch.Tensor                   # (B,) CFG dropout mask
    ip_noise: torch.Tensor | None        # (B, C, H, W) input perturbation noise (--ip)
    posterior: torch.Tensor | None       # (B, C, H, W) the posterior sample's noise (latents: --vae or --latents)
    corrupt_seed: int | None             # seeds corrupt.corrupt_batch (--corrupt-mode random), host-side
    cep_unit: torch.Tensor | None        # (B, *cep_shape) CEP's unit noise (cep.unit_noise)

    def share(self, rows: slice) -> "StepDraws":
        """The draws of the samples in `rows` (a rank's slice of the global batch); host-side seeds unchanged."""
        return StepDraws(**{f.name: v[rows] if torch.is_tensor(v := getattr(self, f.name)) else v
                            for f in dataclasses.fields(self)})


def step_draws(seed: int, step: int, global_batch: int, latent_shape, num_timesteps: int, drop_prob: float,
               device: torch.device, ip: bool = False, posterior: bool = False, corrupt: bool = False,
               cep: str = "none", cep_shape=None, focus: tuple[float, int, int] = (0.0, 0, 0)) -> StepDraws:
    """The StepDraws of `step` from one generator seeded by (seed, step); the optional draws come after t, ε and the
    CFG mask (in field order), so turning one on never changes the others. focus = (fraction, start, stop):
    --t-focus redraws each timestep with probability `fraction` uniformly from start <= t < stop, from a generator of
    its own, so the other draws never move it."""
    g = torch.Generator(device=device).manual_seed(derive_seed(seed, "step", step))
    B = global_batch
    t = torch.randint(0, num_timesteps, (B,), generator=g, device=device)
    noise = torch.randn((B, *latent_shape), generator=g, device=device)
    drop = torch.rand((B,), generator=g, device=device) < drop_prob
    ip_noise = torch.randn((B, *latent_shape), generator=g, device=device) if ip else None
    post = torch.randn((B, *latent_shape), generator=g, device=device) if posterior else None
    # --corrupt-mode random corrupts labels on the host: its seed is a host-side function of (seed, step), so the step
    # never waits for the device (reading a device generator's draw with .item() would)
    corrupt_seed = derive_seed(seed, "corrupt", step) if corrupt else None
    unit = unit_noise((B, *cep_shape), cep, generator=g, device=device) if cep != "none" and cep_shape else None
    fraction, start, stop = focus
    if fraction > 0:                     # each sample independently: in the band with probability `fraction`
        gf = torch.Generator(device=device).manual_seed(derive_seed(seed, "focus", step))
        in_band = torch.randint(start, stop, (B,), generator=gf, device=device)
        t = torch.where(torch.rand((B,), generator=gf, device=device) < fraction, in_band, t)
    return StepDraws(t, noise, drop, ip_noise, post, corrupt_seed, unit)


def item_cep_noise(items, seed: int, mode: str, shape: tuple, device) -> torch.Tensor:
    """--cep-fixed-delta: CEP's unit noise (B, *shape) of each item, drawn once from (seed, item index) and so the same
    at every step that item is seen, on any number of processes and after a resume."""
    gens = [torch.Generator().manual_seed(derive_seed(seed, "cep_item", int(i))) for i in items]
    return torch.stack([unit_noise(shape, mode, generator=g) for g in gens]).to(device)


def train_step(s: TrainState, x: torch.Tensor, y: torch.Tensor, step: int,
               control: torch.Tensor | None = None) -> torch.Tensor:
    """One optimisation step on this rank's share (x, y) of the global batch of `step`, as the paper trains:
    draws -> the condition (label corruption, CFG dropout, CEP) -> diffusion loss -> backward -> AdamW (or Muon) -> EMA.
    Returns the mean loss as a 0-d device tensor (no host synchronisation). control: this rank's control maps
    (b, 3, H, W) for a ControlNet (--control)."""
    cfg = s.cfg
    draws = step_draws(cfg.seed, step, cfg.batch_size, cfg.latent_shape, s.diffusion.num_timesteps, cfg.class_dropout,
                       s.d.device, ip=s.diffusion.ip_gamma > 0, posterior=s.posterior,
                       corrupt=s.random_labels is not None, cep=cfg.cep, cep_shape=s.cep_shape,
                       focus=s.focus).share(s.rows)
    x = model_input(s, x, draws)                        # (b, C, H, W) pixels or latents, on the device
    y, cond = condition(s, y, step, draws)              # (b,) labels as trained on; CEP's noise and subset for them
    if control is not None:                             # a ControlNet's spatial condition
        cond["control"] = control.to(s.d.device, non_blocking=True)
    loss = backward(s, x, y, cond, draws)               # the diffusion loss, accumulated over micro-batches
    update(s, step)                                     # gradient clip -> optimizer -> EMA
    return loss


def model_input(s: TrainState, x: torch.Tensor, draws: StepDraws) -> torch.Tensor:
    """The batch the denoiser learns to reconstruct: the loaded images, or their latents (the autoencoder's posterior,
    or a cached one, sampled with the step's noise)."""
    x = x.to(s.d.device, non_blocking=True)
    if s.encode is None:
        return x
    with torch.no_grad(), s.autocast:
        return s.encode(x, noise=draws.posterior).float()


def condition(s: TrainState, y: torch.Tensor, step: int, draws: StepDraws) -> tuple[torch.Tensor, dict]:
    """What this rank's samples (draws: their share of the step's draws) are conditioned on: their labels
    (re-corrupted for the step under --corrupt-mode random, from the whole global batch), the null label where CFG
    dropped them, and CEP's inputs for the condition encoder: the unit noise of its δ (cep_unit) and the samples it
    perturbs (cep_mask, --cep-subset)."""
    if s.random_labels is not None:
        y = s.random_labels(step, draws.corrupt_seed)[s.rows]
    y = s.model.cond.drop(y.to(s.d.device, non_blocking=True), draws.drop)  # CFG: the null condition where dropped
    items = s.items(step)[s.rows] if s.items is not None else None           # (b,) dataset indices
    cep = {}
    if draws.cep_unit is not None:
        cep["cep_unit"] = (item_cep_noise(items, s.cfg.seed, s.cfg.cep, s.cep_shape, s.d.device)
                           if s.cfg.cep_fixed_delta else draws.cep_unit)
    if s.cep_subset is not None:
        cep["cep_mask"] = s.cep_subset[torch.as_tensor(items)].to(s.d.device)
    return y, cep


def backward(s: TrainState, x: torch.Tensor, y: torch.Tensor, extra: dict, draws: StepDraws) -> torch.Tensor:
    """Backpropagate the diffusion loss of this rank's share micro-batch by micro-batch (DDP all-reduces the gradients
    on the last one only); returns the share's mean loss, a 0-d device tensor. extra: the model's other inputs
    (CEP's cep_unit and cep_mask, a ControlNet's control), each (b, ...)."""
    total, d = torch.zeros((), device=s.d.device), s.d
    for i in range(0, s.local_batch, s.micro):
        mb = slice(i, i + s.micro)
        cond = {k: v[mb] for k, v in extra.items()}
        last_micro = i + s.micro >= s.local_batch
        with s.train_model.no_sync() if d.world > 1 and not last_micro else nullcontext(), s.autocast:
            terms = s.diffusion.training_losses(lambda xt, tt: s.train_model(xt, tt, y[mb], **cond), x[mb],
                                                draws.t[mb], draws.noise[mb],
                                                ip_noise=None if draws.ip_noise is None else draws.ip_noise[mb])
            loss = terms["loss"].mean()
        (loss * (s.micro / s.local_batch)).backward()
        total += loss.detach() * (s.micro / s.local_batch)
    return total


def update(s: TrainState, step: int) -> None:
    """Clip the gradient norm (--grad-clip), take the optimizer's step at the step's learning rate, and move the EMA
    towards the new weights. s.grad_norm: the total norm before clipping, a device tensor (no host sync), the same on
    every rank (DDP's gradients are already averaged); clipping computes it anyway, without clipping it is one fused
    norm over the gradients."""
    params = s.ema_pairs[1]
    if s.cfg.grad_clip > 0:
        s.grad_norm = torch.nn.utils.clip_grad_norm_(params, s.cfg.grad_clip)
    else:
        s.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    for group in s.opt.param_groups:
        group["lr"] = learning_rate(s.cfg, step)
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch._foreach_lerp_(*s.ema_pairs, 1.0 - s.cfg.ema_decay)    # ema <- decay * ema + (1 - decay) * model


# ----------------------------------------------------------------------------------------------------------------------
# The loop

def train(cfg, model: nn.Module, diffusion, data: TrainData, *, kind: str, d: Dist, init: Callable | None = None,
          judge_grid: Callable | None = None, sinks=()) -> dict:
    """Train `model` (model(x, t, y), with `model.cond` its condition encoder) on `data` with `diffusion`, as cfg says.

    init(model) -> note: --init-from's weights loaded into the fresh model, on a fresh run only (weights/pretrained.py).
    judge_grid(cfg, images, labels, log, write): scores the final sample grid of a class-conditional run
    (scoring/judge.py's judge_final_grid, handed in by the train script).
    sinks: callables sink(record, images=None) that get every log record too (trackers/tracking.py's --log trackers).

    Returns {"status": "done" | "stopped", "step", "loss", "ema", "model"}."""
    if d.device.type == "cpu":      # a CPU step frees its 1-4 MB activations and the next faults them back in;
        keep_freed_memory()         # a GPU step's live on the GPU: the process-wide allocator stays as it was there
    # --init-from's weights on a fresh run (a resumed one has its own), before the run folder is made (SOURCE may not
    # fit: a one-line error leaves no folder behind)
    note = init(model) if init is not None and data.resume is None else None
    io = RunIO(cfg, kind, d, data.resume, judge_grid, sinks)       # the run folder: resume, logs, checkpoints, grids
    ckpt = io.checkpoint_to_resume()
    torch.manual_seed(derive_seed(cfg.seed, "module", d.rank))     # per-rank module randomness (--cond-dropout)
    start = int(ckpt["step"]) if ckpt is not None else 0
    s = make_state(cfg, model, diffusion, d, data, start)
    if ckpt is not None:
        restore(s, ckpt)
    del ckpt
    batches = iter(make_loader(cfg, data.dataset, d, start))
    grid_fn = grid_sampler(cfg, diffusion, data) if cfg.sample_every else None
    io.start(model, len(data.dataset), start, note)
    loss_sum, n, status, step = torch.zeros((), device=d.device), 0, "done", start
    norm_sum = torch.zeros((), device=d.device)                   # gradient norms since the last record
    model.train()
    with StopFlag() as stop, io:
        for step in range(start, cfg.steps):
            x, y, *control = next(batches)                          # (x, y) or, for a ControlNet, (x, y, control)
            loss_sum += train_step(s, x, y, step, *control)
            norm_sum += s.grad_norm
            n, done = n + 1, step + 1
            io.bar.update(1)
            log_now = done % cfg.log_every == 0 or done == cfg.steps
            ckpt_now = done % cfg.ckpt_every == 0 or done == cfg.steps
            if log_now or ckpt_now or (d.world == 1 and stop.raised):
                mean = io.mean_loss(loss_sum, n, done)             # all-reduced; Diverged if not finite
                if log_now:
                    io.log_step(done, mean, n, (norm_sum / n).item())
                    loss_sum.zero_()
                    norm_sum.zero_()
                    n = 0
            if grid_fn is not None and (done % cfg.sample_every == 0 or done == cfg.steps):
                io.grid(done, grid_fn, s.ema)
            if ckpt_now:
                io.save(s, done)
            if io.agree_to_stop(stop.raised, log_now or ckpt_now) and done < cfg.steps:
                if not ckpt_now:
                    io.save(s, done, keep=False)
                status = "stopped"
                io.stopped(done)
                break
        if status == "done":
            io.log({"event": "done", "step": cfg.steps, "loss": io.last_loss})
        io.agree()                                                   # the last records were written
    return {"status": status, "step": step + 1 if cfg.steps > start else start, "loss": io.last_loss,
            "ema": s.ema, "model": model}


def restore(s: TrainState, ckpt: dict) -> int:
    """Load model, EMA, optimizer and this rank's RNG state from a checkpoint; returns its step."""
    s.model.load_state_dict(ckpt["model"])
    s.ema.load_state_dict(ckpt["ema"])
    s.opt.load_state_dict(ckpt["opt"])
    step, states, d = int(ckpt["step"]), ckpt.get("rng") or [], s.d
    if len(states) == d.world:
        torch.set_rng_state(states[d.rank]["cpu"])
        if d.device.type == "cuda" and "cuda" in states[d.rank]:
            torch.cuda.set_rng_state(states[d.rank]["cuda"], d.device)
    else:
        if d.main:
            tqdm.write(f"note: checkpoint was written by {len(states)} processes, this run has {d.world}; "
                       f"--cond-dropout streams are re-seeded (the data order and all per-step draws are unaffected)")
        torch.manual_seed(derive_seed(s.cfg.seed, "module", d.rank + 7 * step))
    return step


def make_loader(cfg, dataset, d: Dist, start_step: int) -> torch.utils.data.DataLoader:
    """This rank's batches for steps [start_step, cfg.steps), in the order data.StepSampler fixes."""
    cuda = d.device.type == "cuda"
    sampler = datalib.StepSampler(len(dataset), cfg.batch_size, d.rank, d.world, cfg.seed, start_step, cfg.steps,
                                  flip=cfg.flip)
    workers = cfg.num_workers if cfg.num_workers >= 0 else (min(8, os.cpu_count() or 1) if cuda else 0)
    # The loader gets its own generator: creating its iterator must not draw from the global RNG that CEP uses,
    # or a resumed run would drift from the straight one.
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=cuda,
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                                       generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "loader",
                                                                                           start_step)))


def grid_sampler(cfg, diffusion, data: TrainData):
    """ema_model -> an EMA sample grid (N, C, H, W) in [-1, 1] with fixed noise and conditions, CFG at grid_cfg_scale:
    one row per class (<= 16 classes), or for text one row per grid prompt (their captions go to samples/captions.txt);
    --sample-cads samples it with CADS."""
    from diffusion import cfg_model_fn
    rows = (conditions.grid_labels(data.num_classes) if data.prompts is None
            else encode_prompts(cfg, data.prompts))        # (R,) class ids or (R, L) caption tokens
    conds = rows.repeat_interleave(cfg.sample_per_class, dim=0)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "grid"))
    noise = torch.randn((len(conds), *cfg.latent_shape), generator=g)
    controls = (None if cfg.control == "none" else          # a ControlNet's grid: real items' maps, class by class
                grid_controls(data.dataset, len(conds), conds if data.prompts is None else None))
    scale, cads = grid_cfg_scale(cfg), grid_cads(cfg)

    @torch.no_grad()
    def sample(model):
        dev = next(model.parameters()).device
        y = conds.to(dev)
        net = model if controls is None else functools.partial(model, control=controls.to(dev))
        fn = cfg_model_fn(net, y, model.cond.null_like(y), scale, learn_sigma=cfg.learn_sigma)
        seeds = range(cfg.seed, cfg.seed + len(y))                     # CADS noise: one stream per image
        # DDPM's (and DDIM eta > 0's) fresh noise at every step: fixed too, one CPU stream per image, new each grid
        steps_noise = [torch.Generator().manual_seed(derive_seed(cfg.seed, "grid_step", i)) for i in range(len(y))]
        with nullcontext() if cads is None else cads.sampling(model, model.cond, seeds, diffusion.num_timesteps):
            x = diffusion.sample(fn, noise.to(dev), sampler=cfg.sample_sampler, steps=cfg.sample_steps,
                                 clip_x0=data.decode is None,       # pixel space: keep x0 estimates in [-1, 1]
                                 generator=steps_noise)
        if data.prompts is not None:                               # the grid's rows, beside its PNGs
            with atomic_open(os.path.join(cfg.out, "samples", "captions.txt"), "w") as f:
                f.write("".join(p + "\n" for p in data.prompts))
        return data.decode(x) if data.decode is not None else x
    sample.labels = conds if data.prompts is None else None             # (N,) the grid's classes, for the judge
    return sample


def grid_cfg_scale(cfg) -> float:
    """The grids' guidance scale: --sample-cfg, or 1 (unguided, with a note) when --class-dropout 0 left no null row."""
    if cfg.cond == "class" and cfg.class_dropout == 0 and cfg.sample_cfg != 1:
        if int(os.environ.get("RANK", 0)) == 0:
            tqdm.write(f"note: --class-dropout 0 trains no null class, so the sample grids are unguided "
                       f"(--sample-cfg {cfg.sample_cfg:g} ignored)")
        return 1.0
    return cfg.sample_cfg
