"""
Experiment trackers for --log wandb|tensorboard: sinks that receive every record runio.py writes to log.jsonl (loss,
grad_norm, lr, img/s, sample grids as images, the judge's verdict, events) and evaluate.py's result rows. Both
packages are optional imports; a missing one is one line (exit 2). The core never imports this file: the train
scripts' mains hand the sinks to trainer.train (runio.RunIO(sinks=...)), on rank 0 only.

    python train_dit.py --log tensorboard            # event files in runs/dit/tensorboard/: tensorboard --logdir runs
    python train_dit.py --log wandb                  # a W&B offline run in runs/dit/wandb/ (then: wandb sync ...)
    WANDB_MODE=online python train_dit.py --log wandb,tensorboard --log-group ablation --log-name cep-u
    python sweep.py --preset smoke --out /tmp/smoke --log tensorboard    # runs grouped by sweep name and cell

A sink is a callable sink(record, images=None) with open(config, start_step) and close(); images is the (N, C, H, W)
grid in [-1, 1] of a "samples" record. A training run opens its sinks once, before its first step (runio.RunIO
open_trackers: a tracker that cannot start stops every rank there, in one line, exit 2; one that fails later is
dropped with a warning); evaluate.py opens its sinks the same way (runio.start_agreed) before it samples. A resumed run continues its tracked run: W&B's run
id is kept in OUT/wandb-run-id and the resumed run re-opens that id (resume="allow"); TensorBoard's writer purges what
the stopped run logged after the checkpoint it resumes from (purge_step).

W&B runs offline unless WANDB_MODE or WANDB_API_KEY says otherwise (nothing leaves the machine by default); project
$WANDB_PROJECT or "nanocep", group --log-group (sweep.py: the sweep's name), name --log-name (sweep.py: cell/seedS;
default: the --out folder's name). TensorBoard writes OUT/tensorboard/, so pointing it at a
sweep folder shows its runs by cell and seed.
"""
import json
import os

from plumbing.common import atomic_open

TRACKERS = ("wandb", "tensorboard")


def parse_trackers(spec: str) -> list[str]:
    """'wandb,tensorboard' -> the list; unknown names and missing packages are one-line ValueErrors."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise ValueError(f"--log {spec!r}: unknown tracker {bad[0]!r} (expected {' | '.join(TRACKERS)}, "
                         f"comma-separated)")
    for name in names:
        module = "torch.utils.tensorboard" if name == "tensorboard" else "wandb"
        try:
            __import__(module)
        except ImportError:
            raise ValueError(f"--log {name} needs the {name} package, which is not installed "
                             f"(pip install {name})") from None
    return names


def grid_image(images) -> "numpy.ndarray":
    """(N, C, H, W) tensor in [-1, 1] -> one uint8 (H', W', 3) grid, 8 images a row (what the trackers show)."""
    import torch
    import torchvision.utils as vutils
    grid = vutils.make_grid(images.detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5, nrow=8, padding=2)
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def split_record(record: dict) -> tuple[int | None, dict, dict]:
    """(step, {tag: number}, {tag: other value}): a periodic record's fields keep their names (loss, lr, img_per_s);
    an event's go under the event's name (judge/class_acc, start/params)."""
    prefix = f"{record['event']}/" if "event" in record else ""
    numbers, other = {}, {}
    for k, v in record.items():
        if k in ("event", "step"):
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            numbers[prefix + k] = v
        else:
            other[prefix + k] = v
    return record.get("step"), numbers, other


class TensorBoardSink:
    """Scalars, grids (add_image) and each event as a JSON text entry, into OUT/tensorboard/ (opened by open(), or
    at the first record: a run refused before it starts leaves nothing behind)."""

    name = "tensorboard"

    def __init__(self, out: str):
        self.out, self.writer, self.step = out, None, 0

    def open(self, config: dict | None = None, start_step: int | None = None) -> None:
        """The event writer; a run resumed at start_step hides the events its stopped run wrote after that step
        (purge_step: the steps from start_step + 1 on are logged again; start_step's own records came before its
        checkpoint and stay)."""
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=os.path.join(self.out, "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)

    def __call__(self, record: dict, images=None):
        if self.writer is None:
            self.open()
        step, numbers, _ = split_record(record)
        self.step = step if step is not None else self.step
        for tag, v in numbers.items():
            self.writer.add_scalar(tag, v, self.step)
        if "event" in record:
            self.writer.add_text(f"events/{record['event']}", json.dumps(record), self.step)
        if images is not None:
            self.writer.add_image("samples", grid_image(images), self.step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


class WandbSink:
    """One W&B run: numbers as metrics at their step, grids as wandb.Image, events' other fields in the summary."""

    name = "wandb"
    ID_FILE = "wandb-run-id"             # in the run folder: the W&B run a resumed run continues

    def __init__(self, out: str, config: dict | None, group: str = "", name: str = "", job_type: str = "train"):
        self.settings = dict(project=os.environ.get("WANDB_PROJECT", "nanocep"), dir=out, config=config,
                             group=group or None, name=name or os.path.basename(os.path.abspath(out)),
                             job_type=job_type)
        self.wandb = self.run = None
        self.step = 0

    def open(self, config: dict | None = None, start_step: int | None = None) -> None:
        """wandb.init. A training run (start_step given) keeps its W&B run id in its run folder, and one resumed at
        start_step > 0 continues the W&B run of that id; evaluate.py's (start_step None) is a run of its own."""
        import wandb
        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        out = self.settings["dir"]
        os.makedirs(out, exist_ok=True)
        id_file = os.path.join(out, self.ID_FILE)
        resume = {}
        if start_step and os.path.isfile(id_file):
            with open(id_file) as f:
                resume = dict(id=f.read().strip(), resume="allow")
        settings = {**self.settings, "config": config if config is not None else self.settings["config"]}
        self.run = wandb.init(mode=mode, **settings, **resume)
        if start_step is not None:
            with atomic_open(id_file, "w") as f:
                f.write(self.run.id + "\n")

    def __call__(self, record: dict, images=None):
        if self.run is None:
            self.open()
        step, numbers, other = split_record(record)
        self.step = max(self.step, step) if step is not None else self.step    # W&B steps never go back
        payload = dict(numbers)
        if images is not None:
            payload["samples"] = self.wandb.Image(grid_image(images), caption=str(record.get("path", "")))
        if payload:
            self.run.log(payload, step=self.step)
        for k, v in other.items():
            self.run.summary[k] = v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v)

    def close(self):
        if self.run is not None:
            self.run.finish()


def open_sinks(spec: str, out: str, config: dict, group: str = "", name: str = "", job_type: str = "train",
               main: bool = True) -> list:
    """The sinks --log asks for (checked on every rank, opened on the main one only)."""
    names = parse_trackers(spec) if spec else []
    if not main:
        return []
    return [TensorBoardSink(out) if n == "tensorboard" else WandbSink(out, config, group, name, job_type)
            for n in names]


def sinks_for_run(cfg, main: bool) -> list:
    """A train script's sinks, from its config (--log, --log-group, --log-name); runio.RunIO.start opens them with
    the run's resolved config (after the data resolved --num-classes)."""
    return open_sinks(cfg.log, cfg.out, None, cfg.log_group, cfg.log_name, "train", main)
