"""
The run folder of a training run (--out): what trainer.train writes there and reads back. config.json,
provenance.json (plumbing/provenance.py: the code's commit, the machine, the command line), log.jsonl
(one JSON record per line: start, every --log-every steps, sample grids, stop/done; each record also goes to the
`sinks` the train script hands in, e.g. trackers/tracking.py's W&B / TensorBoard for --log), samples/step_XXXXXXX.png,
last.pt (+ step_XXXXXXX.pt every --keep-every steps) and, for a resumed run, the checkpoint it continues from.

You do not run this file; trainer.py uses it.

Checkpoints are plain data (tensors, numbers, strings, dicts): {"version", "kind" ("dit" | "ldm"), "step", "config"
(the run's flags), "model" (the uncompiled module's state_dict), "ema", "opt", "rng" (every rank's torch RNG states),
"data"}. They are written atomically and load with torch.load(weights_only=True).

A write that fails (full disk, read-only or vanished folder) ends the run with one line naming the file and the cause
(plumbing.common.WriteFailed, exit 1), on every rank: rank 0 writes, and its failure reaches the others at the next
point where all ranks meet (after a grid or checkpoint, at a log step), so none is left waiting. The checkpoint it
would have replaced stays as it was, and the temporary file of a write a kill interrupted is removed on the next start.
"""
import dataclasses
import json
import math
import os
import signal
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from plumbing import provenance
from plumbing.common import (Dist, RunError, WriteFailed, agree_on_writes, all_mean, atomic_open, atomic_save, one_line,
                             remove_leftovers)
from config import (ADDED_ARCH_FIELDS, arch_fields, experiment_fields, explicit_fields, field_flags, learning_rate,
                    predated_recipe, preset_fields, stored_config)

CHECKPOINT_VERSION = 1
# what a run writes with atomic_open, in --out and in --out/samples: the temporary files of these a kill left behind
# are removed when a run starts there
RUN_FILES = r"last\.pt|step_\d{7}\.pt|config\.json|provenance\.json"
SAMPLE_FILES = r"step_\d{7}\.png|captions\.txt"


class Diverged(Exception):
    """The loss became non-finite: the run stops (exit 1) and leaves the last good checkpoint untouched."""


class TrackerFailed(RunError):
    """A --log tracker could not start: raised on every rank at once (start_agreed), so all leave together;
    main says whether this rank prints the one line."""

    def __init__(self, message: str, main: bool):
        super().__init__(message)
        self.main = main


def start_agreed(sinks: list, config: dict | None, start_step: int | None, world: int, main: bool) -> list:
    """Open the --log sinks (rank 0's; empty elsewhere) and agree on the outcome: rank 0 broadcasts the first failure,
    and a tracker that cannot start (W&B with an API key on an offline node, an unwritable folder) raises TrackerFailed
    on every rank, before any work is spent. The job was asked to be tracked, so it is not run untracked; WANDB_MODE=
    offline, or no --log, runs it. Without the agreement rank 0 would die alone and the others wait at their next
    collective. Returns the opened sinks (training's and evaluate.py's)."""
    failure, opened = None, []
    for sink in sinks:
        try:
            sink.open(config, start_step)
            opened.append(sink)
        except Exception as e:                                     # the tracker's own errors: any type
            failure = f"--log {sink.name} could not start: {one_line(e)}"
            break
    if world > 1:
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure is not None:
        for sink in opened:
            sink.close()
        raise TrackerFailed(failure, main)
    return opened


@dataclasses.dataclass
class Resume:
    """A checked resume: the checkpoint a run continues from, and the changes --resume-override allowed."""
    path: str
    overridden: list                     # [{"field", "checkpoint", "now"}], logged by RunIO.start


def check_run_folder(cfg, num_classes: int | None = None) -> Resume | None:
    """The one check of --out and --resume, made before anything is written into --out (the corruption manifest
    first): an --out that holds a run needs --resume, and the run it continues must have this run's architecture and
    experiment (check_experiment). num_classes: the class count the run will train (cfg's 0 means the dataset's).
    Reads only the checkpoint's config; returns None for a fresh run."""
    path = find_resume(cfg.resume, cfg.out)
    if path is None and os.path.isfile(os.path.join(cfg.out, "last.pt")):
        raise RunError(f"{cfg.out} already holds a run (last.pt); continue it with --resume auto or pick another --out")
    if path is None:
        return None
    saved = stored_config(load_checkpoint(path, mmap=True)["config"])
    ours = dataclasses.replace(cfg, num_classes=num_classes or cfg.num_classes)
    for f in arch_fields(ours):
        if saved.get(f) != getattr(ours, f):
            hint = ""
            if f in ADDED_ARCH_FIELDS:                   # the usual cause: a run from before the field existed
                words = [w for k in ADDED_ARCH_FIELDS for w in field_flags(k, saved[k])]
                hint = " (resume with " + " ".join(words) + ")"
            raise RunError(f"cannot resume from {path}: it has {f}={saved.get(f)!r} but this run has "
                           f"{f}={getattr(ours, f)!r}{hint}")
    return Resume(path, check_experiment(cfg, saved, path))


def focus_note(cfg) -> str:
    """The start line's --t-focus part: ' t-focus F (log-SNR LO..HI)', or '' for uniform timesteps."""
    band = f"log-SNR {cfg.t_focus_min_log_snr:g}..{cfg.t_focus_max_log_snr:g}"
    return f" t-focus {cfg.t_focus:g} ({band})" if cfg.t_focus else ""


def check_experiment(cfg, saved: dict, path: str) -> list:
    """Refuse to resume `path` (whose config is `saved`) with a changed experiment field not named by --resume-override;
    return the overridden changes [{"field", "checkpoint", "now"}] so the run can log them."""
    fields = experiment_fields(cfg)
    allowed = {n.strip().replace("-", "_") for n in cfg.resume_override.split(",") if n.strip()}
    unknown = sorted(allowed - set(fields))
    if unknown:
        raise RunError(f"--resume-override: {', '.join(unknown)} is not an experiment field "
                       f"(one of {', '.join(fields)})")
    changes = []
    for name in fields:
        theirs, ours = saved.get(name), getattr(cfg, name)   # saved went through stored_config: every field is there
        if theirs == ours:
            continue
        flag = "--" + name.replace("_", "-")
        if name not in allowed:
            raise RunError(f"cannot resume from {path}: it has {flag} {theirs!r} but this run has {ours!r} (resume "
                           f"with the same value, or pass --resume-override {name} to change it on purpose)")
        if name == "optimizer":                          # AdamW's state and MuonAdamW's do not map onto each other
            raise RunError(f"cannot resume from {path} with another optimizer ({theirs} -> {ours}): its state does not "
                           f"carry over; start a new run from its weights with --init-from {path} {flag} {ours}")
        changes.append({"field": name, "checkpoint": theirs, "now": ours})
    return changes


def resumed_config(cfg, argv=None, presets: dict | None = None):
    """cfg for a resume of a checkpoint written before some recipe fields existed: those the command line (flags and
    --preset) does not give take the value it was trained with (config.predated_recipe), so the command that started
    the run, plus --resume auto, continues it as it was trained. cfg itself when not resuming."""
    path = find_resume(cfg.resume, cfg.out)
    if path is None:
        return cfg
    saved = load_checkpoint(path, mmap=True)["config"]
    given = explicit_fields(argv) | preset_fields(argv, presets)
    return dataclasses.replace(cfg, **predated_recipe(cfg, saved, given))


def find_resume(resume: str, out: str) -> str | None:
    """--resume auto -> out/last.pt if it exists; a path -> that path; '' -> None."""
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(out, "last.pt")
        return path if os.path.isfile(path) else None
    return resume


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


def rng_states(d: Dist) -> list | None:
    """Every rank's torch RNG states (CPU and, when used, CUDA), on rank 0 (None elsewhere)."""
    mine = {"cpu": torch.get_rng_state()}
    if d.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(d.device)
    if d.world == 1:
        return [mine]
    objs = [None] * d.world
    dist.all_gather_object(objs, mine)
    return objs if d.main else None


class RunIO:
    """What a run writes (on rank 0) and reads back: the run folder of cfg.out."""

    def __init__(self, cfg, kind: str, d: Dist, resume: Resume | None = None, judge_grid: Callable | None = None,
                 sinks=()):
        """resume: check_run_folder's verdict on this run folder (trainer.load_data checked it)."""
        self.sinks = list(sinks)                                   # sink(record, images=None): trackers (--log)
        os.makedirs(cfg.out, exist_ok=True)
        self.cfg, self.kind, self.d = cfg, kind, d
        self.resume_path = resume.path if resume is not None else None
        self.overridden = resume.overridden if resume is not None else []   # logged by start()
        self.judge_grid = judge_grid                               # scores the final class grid (trainer.train)
        self.file = self.bar = None                                # opened by start()
        self.failed = None                                         # rank 0's WriteFailed, until the ranks meet
        self.last_loss, self.t_log = float("nan"), time.time()
        if d.main:
            removed = (remove_leftovers(cfg.out, RUN_FILES) +
                       remove_leftovers(os.path.join(cfg.out, "samples"), SAMPLE_FILES))
            if removed:
                tqdm.write(f"note: removed {len(removed)} temporary file(s) of a write that was interrupted: "
                           f"{', '.join(os.path.basename(r) for r in removed)}")

    def checkpoint_to_resume(self) -> dict | None:
        """The checkpoint to continue from (None for a fresh run); one of another model family is refused."""
        if self.resume_path is None:
            return None
        ckpt = load_checkpoint(self.resume_path)
        if ckpt.get("kind") != self.kind:
            raise RunError(f"{self.resume_path} is a {ckpt.get('kind')!r} checkpoint, not {self.kind!r}")
        return ckpt

    def open_trackers(self, start_step: int) -> None:
        """Start the --log trackers once, before training, agreed across ranks (start_agreed): one that cannot start
        stops every rank here with one line (TrackerFailed, exit 2), before a step is spent."""
        sinks, self.sinks = self.sinks, []                          # none left to write to if they cannot start
        self.sinks = start_agreed(sinks, dataclasses.asdict(self.cfg), start_step, self.d.world, self.d.main)

    def write(self, fn: Callable, *args) -> None:
        """fn(*args): one of rank 0's writes. With one process a WriteFailed is raised at once; with several it is kept
        (and rank 0 writes nothing more) until the ranks meet (agree), where every rank raises it."""
        if self.failed is not None:
            return
        try:
            fn(*args)
        except WriteFailed as e:
            if self.d.world == 1:
                raise
            self.failed = e

    def agree(self) -> None:
        """Where all ranks meet (a barrier's place): every rank raises rank 0's write failure, if it had one."""
        agree_on_writes(self.failed, self.d.world)      # with one process, a failure was raised where it happened

    def log(self, record: dict, images: torch.Tensor | None = None) -> None:
        """One log.jsonl line (rank 0), also handed to every sink, with the grid (N, C, H, W) of a samples record.
        A tracker that fails mid-run is dropped with a warning: log.jsonl keeps every record, and stopping would need
        the other ranks, which never wait on rank 0's trackers."""
        if self.d.main:
            self.write(self._append, record)
            for sink in list(self.sinks):
                try:
                    sink(record, images)
                except Exception as e:
                    self.sinks.remove(sink)
                    tqdm.write(f"warning: --log {sink.name} failed at step {record.get('step')} ({one_line(e)}); "
                               f"the run goes on without it (log.jsonl has every record)")

    def _append(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            raise WriteFailed.of(self.file.name, e) from None

    def start(self, model: nn.Module, num_items: int, start_step: int, init_note: str | None = None) -> None:
        """config.json, provenance.json, the start line and event (and the --init-from / --resume-override notes), the
        progress bar."""
        cfg, d = self.cfg, self.d
        cuda = d.device.type == "cuda"
        precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda else "fp32")
        compiled = cfg.compile if cfg.compile is not None else cuda
        self.open_trackers(start_step)                             # a tracker that cannot start stops every rank
        if d.main:
            self.write(self._open_files)
            n_params = sum(p.numel() for p in model.parameters())
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)   # a ControlNet's branch only
            local = cfg.batch_size // d.world
            micro = cfg.micro_batch_size or local
            trained = f" ({n_train:,} trained)" if n_train != n_params else ""
            tqdm.write(f"{self.kind}: {n_params:,} parameters{trained} | {num_items:,} items | global batch "
                       f"{cfg.batch_size} = {d.world} x {local // micro} x {micro} | {d.device} {precision}"
                       f"{' compiled' if compiled else ''} | {cfg.optimizer} lr {cfg.lr:g}"
                       f"{f' (to 0 over the last {cfg.lr_warmdown})' if cfg.lr_warmdown else ''} wd {cfg.weight_decay:g}"
                       f" clip {cfg.grad_clip:g} EMA {cfg.ema_decay:g}{f' min-SNR {cfg.min_snr:g}' if cfg.min_snr else ''}"
                       f"{focus_note(cfg)}"
                       f" | steps {start_step} -> {cfg.steps} | out {cfg.out}")
            if init_note:
                tqdm.write(f"{self.kind}: {init_note}")
                self.log({"event": "init_from", "source": cfg.init_from, "note": init_note})
            code = provenance.collect(d.device)          # this segment's code and machine (a resume writes its own)
            self.write(provenance.write, cfg.out, code)
            self.log({"event": "start", "step": start_step, "world": d.world, "device": str(d.device),
                      "params": n_params, "precision": precision, "compile": compiled,
                      "resumed_from": self.resume_path, "provenance": code})
            if self.overridden:
                self.log({"event": "resume_override", "step": start_step, "changes": self.overridden})
                tqdm.write("note: resumed with --resume-override: " + ", ".join(
                    f"{c['field']} {c['checkpoint']!r} -> {c['now']!r}" for c in self.overridden))
        self.bar = tqdm(total=cfg.steps, initial=start_step, disable=not d.main, dynamic_ncols=True, desc=self.kind)
        self.agree()

    def _open_files(self) -> None:
        """config.json (written) and log.jsonl (opened to append)."""
        path = os.path.join(self.cfg.out, "log.jsonl")
        try:
            self.file = open(path, "a")
        except OSError as e:
            raise WriteFailed.of(path, e) from None
        with atomic_open(os.path.join(self.cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(self.cfg), f, indent=2)

    def mean_loss(self, loss_sum: torch.Tensor, n: int, done: int) -> float:
        """The loss averaged over the steps since the last log and over ranks (a host sync); Diverged if not finite."""
        mean = all_mean(loss_sum / max(n, 1), self.d).item()
        if not math.isfinite(mean):
            raise Diverged(f"loss became non-finite ({mean}) before step {done}; stopping. The last good checkpoint "
                           f"({os.path.join(self.cfg.out, 'last.pt')}) is left untouched")
        return mean

    def log_step(self, done: int, mean: float, n: int, grad_norm: float) -> None:
        """The periodic record of the n steps up to `done`: mean loss, learning rate, speed and grad_norm, the mean
        total gradient norm before clipping (the same on every rank)."""
        cuda = self.d.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        dt = time.time() - self.t_log
        rec = {"step": done, "loss": mean, "grad_norm": grad_norm, "lr": learning_rate(self.cfg, done - 1),
               "step_time": dt / n, "img_per_s": n * self.cfg.batch_size / dt}
        if cuda:
            rec["max_mem_gb"] = torch.cuda.max_memory_allocated(self.d.device) / 2 ** 30
        self.log(rec)
        self.bar.set_postfix(loss=f"{mean:.4f}", grad_norm=f"{grad_norm:.3g}", img_s=f"{rec['img_per_s']:.0f}")
        self.last_loss, self.t_log = mean, time.time()

    def grid(self, step: int, sample: Callable, ema: nn.Module) -> None:
        """samples/step_XXXXXXX.png: the EMA's sample grid (rank 0), logged and, at the last step, judged."""
        if self.d.main:
            self.write(self._grid, step, sample, ema)
        self.agree()

    def _grid(self, step: int, sample: Callable, ema: nn.Module) -> None:
        path = os.path.join(self.cfg.out, "samples", f"step_{step:07d}.png")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)     # before sampling: a text grid writes captions.txt
        except OSError as e:
            raise WriteFailed.of(path, e) from None
        images = sample(ema)
        save_grid(images.float().cpu(), path, nrow=self.cfg.sample_per_class)
        self.log({"event": "samples", "step": step, "path": path}, images=images)
        if step == self.cfg.steps and self.judge_grid is not None and getattr(sample, "labels", None) is not None:
            self.judge_grid(self.cfg, images, sample.labels, self.log, tqdm.write)   # does it show its classes?

    def save(self, s, step: int, keep: bool | None = None) -> None:
        """out/last.pt (and out/step_XXXXXXX.pt every --keep-every steps), atomically; s is the trainer's TrainState."""
        cfg, d = self.cfg, self.d
        keep = cfg.keep_every > 0 and step % cfg.keep_every == 0 if keep is None else keep
        rng = rng_states(d)
        if d.main:
            state = {"version": CHECKPOINT_VERSION, "kind": self.kind, "step": step, "config": dataclasses.asdict(cfg),
                     "model": s.model.state_dict(), "ema": s.ema.state_dict(), "opt": s.opt.state_dict(), "rng": rng,
                     "data": {"samples_seen": step * cfg.batch_size, "world": d.world}}
            self.write(atomic_save, state, os.path.join(cfg.out, "last.pt"))
            if keep:
                self.write(atomic_save, state, os.path.join(cfg.out, f"step_{step:07d}.pt"))
        self.agree()

    def agree_to_stop(self, raised: bool, collective_step: bool) -> bool:
        """All ranks must stop at the same step: with DDP the signal flag is reduced at log/checkpoint steps only."""
        if self.d.world == 1:
            return raised
        if not collective_step:
            return False
        self.agree()                                     # a log step: rank 0 may have failed to write its record
        flag = torch.tensor(float(raised), device=self.d.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stopped(self, step: int) -> None:
        if self.d.main:
            tqdm.write(f"stopped by signal at step {step}; checkpoint saved to {self.cfg.out}/last.pt "
                       f"(continue with --resume auto)")
        self.log({"event": "stopped", "step": step})

    def __enter__(self):
        return self

    def __exit__(self, *exc):  # close the bar (an error message then starts on a fresh line) and the logs, however it ends
        for thing in (self.bar, self.file, *self.sinks):
            if thing is not None:
                try:
                    thing.close()
                except OSError:  # log.jsonl's unflushed tail after a failed write, already reported as WriteFailed
                    pass


def save_grid(images: torch.Tensor, path: str, nrow: int) -> None:
    """Images (N, C, H, W) in [-1, 1] -> one PNG grid (pixels upscaled to at least 64 px per image for viewing)."""
    import torchvision.utils as vutils
    scale = max(1, math.ceil(64 / images.shape[-1]))
    images = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path) as f:
        vutils.save_image(images.clamp(-1, 1) * 0.5 + 0.5, f, nrow=nrow, padding=2, format="png")


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps and saves before leaving."""

    def __init__(self):
        self.raised, self._old = False, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)
