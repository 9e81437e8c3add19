"""
The training config both train scripts share, and how a config becomes a command line.

TrainConfig holds every field that is not the model's: data, condition corruption, CEP and the ablations,
optimisation, the run, sample grids. train_dit.py's DiTConfig and train_ldm.py's LDMConfig subclass it, add their model
fields and override a few defaults. Every field is a --kebab-case flag with its help text (`opt(default, help)`);
fields marked arch=True define the network, fields marked experiment=True what it is trained on and how: resuming a
run with another value of either is refused (experiment fields may be changed on purpose with --resume-override).

    cfg = parse_config(DiTConfig, argv, PRESETS)      # flags (+ --preset NAME) -> a config
    cfg = resolve_run_config(cfg)                     # checked, 'auto' decided: a *new* config, never mutated
    print(config_command(cfg, "train_dit.py"))        # the flags that reproduce it, every field (--print-config)

Nothing to run here; `python train_dit.py --help` lists the flags.
"""
import argparse
import dataclasses
import shlex
import sys
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import diffusion
from plumbing.common import ArgParser, RunError, file_in_the_way

LATENT_GEOMETRY = {"none": (3, 1), "kl-f8": (4, 8), "vq-f4": (3, 4)}   # autoencoder -> (channels, downsampling)
CAPTION_CORRUPTIONS = ("swap", "rewrite")


def opt(default, help: str, **kw):
    """A config field with its help text (shown by --help); kw go to its metadata (choices, arch)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # data
    data: str = opt("builtin", "'builtin' (procedural shapes, no download), a torchvision set (mnist, fashion-mnist, "
                    "kmnist, cifar10, cifar100: read from --data-root), 'digits' (scikit-learn's bundled 8x8 "
                    "handwritten digits: their training pool, sources/digits.py), an ImageNet-layout folder "
                    "root/<class>/*.jpg, "
                    "or with --cond text: a folder of images with same-stem .txt captions or a path<TAB>caption .tsv/.csv; "
                    "or WebDataset shards (.tar, a folder of them, dir/{00000..00099}.tar) with .txt/.json/.cls")
    data_root: str = opt("data", "torchvision sets (--data mnist, ...): the root they are read from (torchvision "
                         "downloads them there once if absent)")
    class_index: str = opt("", "class folders: a file naming every class in label order, one per line (its first "
                           "word: ImageNet's LOC_synset_mapping.txt), so a subset's folders keep the full set's labels "
                           "(--control: IN-100 over an IN-1K base); default: the sorted folders", experiment=True)
    items_per_class: int = opt(0, "train on k items of every class only, chosen from --seed (the memorization "
                               "benchmark); 0 = every item", experiment=True)
    cond: str = opt("class", "condition: class labels | text captions (tokenised, encoded by a jointly trained encoder)",
                    choices=["class", "text"], arch=True)
    image_size: int = opt(16, "image side in pixels (latent side = image_size / 8 with --vae kl-f8, / 4 with vq-f4)",
                          arch=True)
    num_classes: int = opt(0, "classes of the class embedder; 0 = the dataset's count (set 1000 to match ImageNet ckpts)",
                           arch=True)
    flip: bool = opt(True, "random horizontal flips (decided by seed and step, so resume is exact)")
    builtin_length: int = opt(100_000, "items in the built-in dataset (each is drawn from (index, seed))")
    vae: str = opt("none", "autoencoder: none (pixels) | kl-f8 (SD-VAE, 32x32x4 latents at 256^2) | vq-f4 (LDM-4, "
                   "64x64x3)", choices=["none", "kl-f8", "vq-f4"], arch=True)
    vae_path: str = opt("", "local autoencoder weights (safetensors/.bin/.ckpt); empty = download")
    latents: str = opt("", "train from a latent cache DIR made by `python -m weights.latents` (no VAE encode in the loop)")
    # what the denoiser predicts and its noise schedule (read by diffusion.from_config; each family sets its defaults)
    learn_sigma: bool = opt(False, "predict the variance too (official DiT: on) and train with the hybrid MSE + VB loss; "
                            "off: ε-MSE with a fixed variance (LDM)", arch=True)
    schedule: str = opt("linear", "beta schedule: linear (DiT, 1e-4..0.02) or scaled_linear (LDM, sqrt-linear "
                        "0.0015..0.0195)", arch=True)
    # text encoder (--cond text)
    text_width: int = opt(128, "text encoder width D_text (the cross-attention context width)", arch=True)
    tokenizer: str = opt("bytes", "bytes (offline, byte-level) | gpt2 / r50k_base (tiktoken downloads it once) | "
                         "PATH.tiktoken (local ranks file, e.g. gpt2.tiktoken from the openai-whisper package)",
                         arch=True)
    context_length: int = opt(77, "caption tokens (with the end token), truncated / padded to this length", arch=True)
    text_depth: int = opt(2, "text encoder transformer blocks (the paper's CC3M BERT: 12)", arch=True)
    text_heads: int = opt(4, "text encoder attention heads", arch=True)
    # condition corruption (paper §2) and CEP (paper §5)
    corrupt: float = opt(0.0, "corruption ratio eta in [0, 1): fraction of training labels flipped / captions corrupted",
                         experiment=True)
    corrupt_type: str = opt("auto", "auto (symmetric for class, swap for text) | symmetric (to another class, by the "
                            "class prior) | asymmetric | swap (captions between random pairs) | rewrite (--corrupt-rewrites)",
                            choices=["auto", "symmetric", "asymmetric", "swap", "rewrite"], experiment=True)
    corrupt_rewrites: str = opt("", "rewrite only: JSON file {index: rewritten caption}; --corrupt picks that fraction "
                                "of N among its entries (0 = all of them)", experiment=True)
    corrupt_classes: str = opt("", "asymmetric only: comma-separated class ids that flip among themselves",
                               experiment=True)
    corrupt_mode: str = opt("static", "static: flip once when the data is built (paper) | random: re-flip every step",
                            choices=["static", "random"], experiment=True)
    cep: str = opt("none", "condition embedding perturbation: none | uniform | gaussian",
                   choices=["none", "uniform", "gaussian"], experiment=True)
    cep_gamma: float = opt(1.0, "CEP magnitude gamma (noise scale gamma/sqrt(d)); the paper uses 1", experiment=True)
    cep_null: bool = opt(False, "also perturb the CFG null embedding (the paper does not say; default: no)",
                         experiment=True)
    ip: float = opt(0.0, "input perturbation gamma (Ning et al. 2023; the paper's IP baseline uses 0.1)",
                    experiment=True)
    min_snr: float = opt(0.0, "Min-SNR-gamma loss weighting (Hang et al. 2023; they use 5): eps-MSE at step t weighted "
                         "min(SNR_t, gamma) / SNR_t; 0 = off (DiT and LDM)", experiment=True)
    t_focus: float = opt(0.0, "timestep focus: each timestep comes with this probability uniformly from the focus "
                         "band (--t-focus-min/max-log-snr), else from all steps; 0 = uniform (DiT and LDM)",
                         experiment=True)
    t_focus_min_log_snr: float = opt(-2.0, "the focus band's noisy end: its steps have log-SNR log(abar/(1-abar)) "
                                     ">= this (-2 and 3.5: t = 50..455 on the linear schedule, where a 16 px "
                                     "sample's shapes form)", experiment=True)
    t_focus_max_log_snr: float = opt(3.5, "the focus band's clean end: its steps have log-SNR <= this",
                                     experiment=True)
    class_dropout: float = opt(0.1, "probability of dropping the label to the null class (classifier-free guidance)",
                               experiment=True)
    # the paper's ablations (Tables 6 and 7)
    cond_dropout: float = opt(0.0, "ablation (Table 6 'Dropout'): dropout with probability P on the condition embedding "
                              "while training; identity in eval; never on the CFG null embedding", experiment=True)
    label_smoothing: float = opt(0.0, "ablation (Table 6 'Label Smoothing'): train on the embedding of a smoothed "
                                 "one-hot, (1-eps) E[y] + eps * mean of the K class rows (no null row); class only",
                                 experiment=True)
    cep_subset: float = opt(1.0, "ablation (Table 7 'Fixed CEP', reading 1: fixed *items*): CEP only on a fixed fraction "
                            "R of the training items, chosen once from --seed by item index, with fresh δ at every "
                            "step; 1 = every item (the paper's CEP)", experiment=True)
    cep_fixed_delta: bool = opt(False, "ablation (Table 7 'Fixed CEP', reading 2: fixed *noise*): each item's δ is drawn "
                                "once from --seed and its index and kept for the whole run, as static corruption is; "
                                "combines with --cep-subset", experiment=True)
    # ControlNet (models/controlnet.py): the --init-from base frozen, a control branch trained to follow a spatial map
    control: str = opt("none", "ControlNet: none | canny (Canny edges of each training image, OpenCV) | maps "
                       "(same-stem images in --control-maps, e.g. SAM colour maps); trains only the control branch of "
                       "the frozen --init-from base", choices=["none", "canny", "maps"], arch=True, control=True)
    control_maps: str = opt("", "--control maps: a folder of control images named like the training images (same "
                            "stem, any sub-folder)", experiment=True)
    canny_low: float = opt(100.0, "--control canny: OpenCV's lower hysteresis threshold (paper, IN-100: 100)",
                           experiment=True)
    canny_high: float = opt(200.0, "--control canny: OpenCV's upper hysteresis threshold (paper, IN-100: 200)",
                            experiment=True)
    # optimisation
    steps: int = opt(1000, "training steps")
    batch_size: int = opt(64, "global batch size (split over processes)", experiment=True)
    micro_batch_size: int = opt(0, "per-process micro-batch for gradient accumulation; 0 = no accumulation")
    optimizer: str = opt("adamw", "adamw (DiT and LDM) | muon: Muon on the DiT's transformer-block weight matrices, "
                         "AdamW on every other parameter (plumbing/muon.py; the U-Net has no such blocks)",
                         choices=["adamw", "muon"], experiment=True)
    lr: float = opt(1e-3, "learning rate (AdamW's; Muon's step is scaled to match; constant, as DiT and LDM, unless "
                    "--lr-warmdown)")
    lr_warmdown: int = opt(0, "decay the learning rate linearly to 0 over the last N steps (all of them when the run "
                           "is shorter); 0 = constant, as DiT and LDM")
    weight_decay: float = opt(0.0, "decoupled weight decay, AdamW's and Muon's (CompVis LDM: torch's default 0.01)")
    grad_clip: float = opt(0.0, "clip the gradient norm to this value; 0 = off (DiT and LDM use none)")
    ema_decay: float = opt(0.995, "EMA decay of the weights used for sampling (DiT and LDM's LitEma: 0.9999)")
    # run
    out: str = opt("runs/run", "run folder: checkpoints, log.jsonl, samples/")
    resume: str = opt("", "'auto' = continue the run in --out if it has a checkpoint; or a checkpoint path")
    resume_override: str = opt("", "comma-separated experiment fields a resume may change (e.g. batch_size,seed); "
                               "without it a resume refuses any change of corruption, CEP, ablation, seed or batch flags")
    init_from: str = opt("", "fine-tune from SOURCE: a release pretrained.py loads or a nanoCEP checkpoint (its EMA "
                         "weights, architecture and numerics; the optimiser flags not given from its recipe: the "
                         "matching preset's or the checkpoint's own; fresh optimizer state and step); see docs/weights.md")
    seed: int = opt(0, "global seed (data order, noise, corruption)", experiment=True)
    device: str = opt("auto", "auto | cpu | cuda")
    precision: str = opt("auto", "auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16",
                         choices=["auto", "fp32", "bf16"])
    compile: bool | None = opt(None, "torch.compile the model (default: on for GPU, off for CPU)")
    num_workers: int = opt(-1, "data loader workers; -1 = auto (0 on CPU)")
    log_every: int = opt(50, "log the all-reduced loss every N steps")
    log: str = opt("", "also send every log record (loss, lr, img/s, grids, judge) to: wandb | tensorboard | "
                   "wandb,tensorboard (rank 0; W&B offline unless WANDB_MODE/WANDB_API_KEY; trackers/tracking.py)")
    log_group: str = opt("", "tracker group of this run (sweep.py: the sweep's name)")
    log_name: str = opt("", "tracker run name (sweep.py: cell/seedS); default: the --out folder's name")
    ckpt_every: int = opt(500, "write out/last.pt every N steps (and at the end)")
    keep_every: int = opt(0, "also keep out/step_XXXXXXX.pt every N steps; 0 = only last.pt")
    sample_every: int = opt(500, "write an EMA sample grid every N steps; 0 = never")
    sample_cfg: float = opt(4.0, "guidance scale of the sample grids")
    sample_sampler: str = opt("dpm++", "sampler of the sample grids: dpm++ | ddim | ddpm",
                              choices=["dpm++", "ddim", "ddpm"])
    sample_steps: int = opt(25, "sampling steps of the sample grids")
    sample_cads: str = opt("", "CADS on the sample grids (cads.py): 'noise,tau1,tau2,psi', e.g. 0.1,0.6,0.9,1; "
                           "empty = off")
    sample_per_class: int = opt(8, "images per class (one row per class, at most 16 classes) in the grids")
    sample_prompts: str = opt("", "text only: a file with one grid prompt per line (default: one prompt per built-in "
                              "class, or the first dataset captions)")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoiser sees: pixels, or the autoencoder's latents."""
        channels, down = LATENT_GEOMETRY[self.vae]
        return channels, self.image_size // down, self.image_size // down


def learning_rate(cfg, step: int) -> float:
    """The learning rate of `step` (0-based): cfg.lr, decayed linearly to 0 over the last --lr-warmdown steps (the
    whole run when it is shorter). A function of the step alone, so a resumed run follows the same schedule."""
    if not cfg.lr_warmdown:
        return cfg.lr
    left, span = cfg.steps - step, min(cfg.lr_warmdown, cfg.steps)     # steps still to take, this one included
    return cfg.lr * min(1.0, left / span)


# The config fields of the first release (train_dit.py's and train_ldm.py's configs together): every checkpoint
# stores them. Frozen: a field added later goes into ABSENT_MEANS instead (tests/test_config_fields.py holds both).
FIRST_RELEASE_FIELDS = frozenset((
    "batch_size", "builtin_length", "cep", "cep_gamma", "cep_null", "ckpt_every", "class_dropout", "compile", "cond",
    "context_length", "corrupt", "corrupt_classes", "corrupt_mode", "corrupt_rewrites", "corrupt_type", "data",
    "device", "ema_decay", "flip", "grad_clip", "image_size", "ip", "keep_every", "latents", "learn_sigma",
    "log_every", "lr", "micro_batch_size", "mlp_norm_eps", "model", "num_classes", "num_workers", "out", "precision",
    "resume", "sample_cfg", "sample_every", "sample_per_class", "sample_prompts", "sample_sampler", "sample_steps",
    "schedule", "seed", "steps", "t_freq_shift", "text_depth", "text_heads", "text_pooled", "text_width", "tokenizer",
    "vae", "vae_path", "weight_decay"))

# Every field added since, with what a checkpoint written before it existed was trained with: the code's behaviour
# before the field, not the field's default now (train_dit.py's CPU default is Min-SNR 5 and a 1000-step warmdown;
# a checkpoint without those fields trained plain ε-MSE at a constant lr). Every stored config is read through
# stored_config, so a resume, a fine-tune (--init-from) or evaluate.py sees such a checkpoint as it was trained.
ABSENT_MEANS = {
    # architecture: the official DiT's layout
    "pixel_channels": 0, "token_conv": False, "mlp_ratio": 4.0,
    # the loss, the timesteps, the optimiser and its schedule
    "min_snr": 0.0, "t_focus": 0.0, "t_focus_min_log_snr": -2.0, "t_focus_max_log_snr": 3.5,
    "optimizer": "adamw", "lr_warmdown": 0,
    # the data and the paper's ablations: every item, the sorted class folders, CEP's fresh δ on every item
    "data_root": "data", "items_per_class": 0, "class_index": "", "cond_dropout": 0.0, "label_smoothing": 0.0,
    "cep_subset": 1.0, "cep_fixed_delta": False,
    # no ControlNet
    "control": "none", "control_blocks": 0, "control_maps": "", "canny_low": 100.0, "canny_high": 200.0,
    # the run only: no fine-tuning source, no override, no tracker, no CADS on the grids
    "init_from": "", "resume_override": "", "log": "", "log_group": "", "log_name": "", "sample_cads": "",
}
ADDED_ARCH_FIELDS = {k: ABSENT_MEANS[k] for k in ("pixel_channels", "token_conv", "mlp_ratio")}   # the DiT's layout

# The fields of the optimisation recipe a fine-tuning run takes from its source (weights/pretrained.py).
OPTIMISER_FIELDS = ("optimizer", "lr", "lr_warmdown", "weight_decay", "grad_clip", "ema_decay", "batch_size",
                    "min_snr", "t_focus", "t_focus_min_log_snr", "t_focus_max_log_snr")


def stored_config(saved: dict) -> dict:
    """A checkpoint's stored config, every field it predates filled in as it was trained (ABSENT_MEANS)."""
    return {**ABSENT_MEANS, **saved}


def predated_recipe(cfg, saved: dict, explicit: set) -> dict:
    """{field: value} a resumed run takes from a checkpoint whose stored config `saved` predates the field: the
    experiment and optimiser fields it lacks and the command line does not give keep the value it was trained with
    (the command that started it could not name them). Architecture fields are checked instead (runio)."""
    names = {f.name for f in dataclasses.fields(cfg) if not f.metadata.get("arch")}
    recipe = (set(experiment_fields(cfg)) | set(OPTIMISER_FIELDS)) & names
    return {k: ABSENT_MEANS[k] for k in sorted(recipe - set(saved) - set(explicit)) if k in ABSENT_MEANS}


def arch_fields(cfg) -> list[str]:
    """The fields that define the network (metadata arch=True): a resumed run must have the same values."""
    return [f.name for f in dataclasses.fields(cfg) if f.metadata.get("arch")]


def experiment_fields(cfg) -> list[str]:
    """The fields that define the experiment (metadata experiment=True): corruption, CEP, the ablations, CFG dropout,
    seed and batch; a resumed run must keep them unless --resume-override names them."""
    return [f.name for f in dataclasses.fields(cfg) if f.metadata.get("experiment")]


def parse_config(cls, argv=None, presets: dict | None = None, description: str = "", printable: bool = False):
    """Build an argparse CLI from a config dataclass (every field a --kebab-case flag) and return the config.

    A field's help text is its `metadata["help"]`. `--preset NAME` first applies presets[NAME]; flags given explicitly
    win over the preset. printable: also accept --print-config (the caller acts on it: print_config()).
    """
    presets = presets or {}
    p = ArgParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if presets:
        p.add_argument("--preset", choices=sorted(presets), default=None, help="a named recipe (docs/flags.md lists them)")
    if printable:
        p.add_argument("--print-config", action="store_true", help="print the resolved config (preset and flags "
                       "applied, 'auto' decided) as the command that reproduces it, every field one flag, and exit "
                       "without starting a run or creating --out")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if f.type in (bool, "bool") or (hasattr(f.type, "__args__") and bool in f.type.__args__):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            typ = typ if typ in (int, float, str) else str
            p.add_argument(flag, type=typ, default=f.default, choices=f.metadata.get("choices"), help=help_)
    args = p.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    if presets and args.preset:
        explicit = explicit_fields(argv)
        values.update({k: v for k, v in presets[args.preset].items() if k not in explicit})
    return cls(**values)


def print_config(cfg, argv, script: str) -> bool:
    """With --print-config on the command line: print cfg as the command that reproduces it and return True (the
    train script then exits 0, nothing run or written); else False."""
    if "print_config" not in explicit_fields(argv):
        return False
    print(config_command(cfg, script))
    return True


def field_flags(name: str, value) -> list[str]:
    """The shell words that set config field `name` to `value` ([] for None: a value the run decides when it starts)."""
    flag = "--" + name.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [flag, shlex.quote(str(value))]              # str(float) is repr: it parses back to the same float


def config_command(cfg, script: str) -> str:
    """`python SCRIPT` with every field of cfg as a flag, one per line; fields left to the run (None) follow as a
    comment, so the output pasted into a shell or fed back as flags gives the same config."""
    fields = dataclasses.fields(cfg)
    lines = [" ".join(field_flags(f.name, getattr(cfg, f.name))) for f in fields if getattr(cfg, f.name) is not None]
    unset = ["--" + f.name.replace("_", "-") for f in fields if getattr(cfg, f.name) is None]
    text = " \\\n  ".join([f"python {script}"] + lines)
    return text + (f"\n# not set, decided when the run starts: {', '.join(unset)}" if unset else "")


def explicit_fields(argv=None) -> set:
    """The config fields given as flags on the command line (--no-x counts for x)."""
    explicit = {a.split("=")[0][2:].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
                if a.startswith("--")}
    return explicit | {n[3:] for n in explicit if n.startswith("no_")}


def preset_fields(argv=None, presets: dict | None = None) -> set:
    """The config fields the --preset named on the command line sets (none without one)."""
    argv = list(argv if argv is not None else sys.argv[1:])
    names = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--preset"]
    names += [a.split("=", 1)[1] for a in argv if a.startswith("--preset=")]
    return set((presets or {}).get(names[-1], {})) if names else set()


def resolve_run_config(cfg, text_width: int | None = None):
    """The checks every train script shares, and the 'auto' values decided: returns a new config (cfg is untouched).

    text_width: the text encoder's width when the model decides it (the LDM's context width); None keeps cfg's."""
    text = cfg.cond == "text"
    corrupt_type = cfg.corrupt_type if cfg.corrupt_type != "auto" else ("swap" if text else "symmetric")
    cfg = dataclasses.replace(cfg, corrupt_type=corrupt_type,
                              **({"text_width": text_width} if text and text_width is not None else {}))
    _check_ranges(cfg)
    _check_condition(cfg)
    return cfg


def _check_ranges(cfg) -> None:
    """Numbers in range, latent flags consistent, the ablations and the grids' CADS well formed (RunError otherwise)."""
    down = LATENT_GEOMETRY[cfg.vae][1]
    if (blocker := file_in_the_way(cfg.out)) is not None:
        raise RunError(f"--out {cfg.out}: {blocker} is a file, not a run folder")
    if not 0.0 <= cfg.corrupt < 1.0:
        raise RunError(f"--corrupt must be in [0, 1), got {cfg.corrupt}")
    if cfg.cep_gamma < 0:
        raise RunError(f"--cep-gamma must be >= 0, got {cfg.cep_gamma}")
    if not 0.0 <= cfg.class_dropout < 1.0:
        raise RunError(f"--class-dropout must be in [0, 1), got {cfg.class_dropout}")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise RunError("--steps, --batch-size and --lr must be positive")
    if cfg.image_size < 1 or cfg.image_size % down:
        raise RunError(f"--image-size {cfg.image_size} must be a positive multiple of {down} with --vae {cfg.vae}")
    if cfg.corrupt_type == "asymmetric" and cfg.corrupt > 0 and not cfg.corrupt_classes:
        raise RunError("--corrupt-type asymmetric needs --corrupt-classes (e.g. 1,5,9)")
    if cfg.latents and cfg.vae == "none":
        raise RunError("--latents needs the --vae the cache was made with (e.g. --vae kl-f8)")
    if cfg.class_index and (cfg.latents or cfg.control == "none"):
        raise RunError("--class-index gives a ControlNet's data its frozen base's labels (e.g. IN-100 folders over an "
                       "IN-1K base); it takes class folders (not --latents) and --control")
    if cfg.items_per_class < 0:
        raise RunError(f"--items-per-class must be >= 0 (0 = every item), got {cfg.items_per_class}")
    if cfg.lr_warmdown < 0 or not cfg.min_snr >= 0:
        raise RunError(f"--lr-warmdown and --min-snr must be >= 0, got {cfg.lr_warmdown} and {cfg.min_snr}")
    if not 0.0 <= cfg.t_focus <= 1.0:
        raise RunError(f"--t-focus must be in [0, 1], got {cfg.t_focus}")
    if not cfg.t_focus_min_log_snr <= cfg.t_focus_max_log_snr:       # also refuses nan
        raise RunError(f"--t-focus-min-log-snr {cfg.t_focus_min_log_snr:g} must be <= --t-focus-max-log-snr "
                       f"{cfg.t_focus_max_log_snr:g}")
    log_snr = diffusion.schedule_log_snr(cfg.schedule)
    start, stop = diffusion.focus_band(log_snr, cfg.t_focus_min_log_snr, cfg.t_focus_max_log_snr)
    if cfg.t_focus > 0 and start == stop:
        raise RunError(f"--t-focus-min-log-snr {cfg.t_focus_min_log_snr:g} .. --t-focus-max-log-snr "
                       f"{cfg.t_focus_max_log_snr:g} holds no step of the {cfg.schedule} schedule (its log-SNR runs "
                       f"from {float(log_snr[0]):.2f} down to {float(log_snr[-1]):.2f})")
    if cfg.log_every < 1 or cfg.ckpt_every < 1:
        raise RunError("--log-every and --ckpt-every must be >= 1")
    _check_ablations(cfg)
    _check_control(cfg)
    grid_cads(cfg)                                       # a bad --sample-cads fails before any work


def _check_ablations(cfg) -> None:
    """The ranges of the paper's ablation flags (--cond-dropout, --label-smoothing, --cep-subset)."""
    if not 0.0 <= cfg.cond_dropout < 1.0:
        raise RunError(f"--cond-dropout must be in [0, 1), got {cfg.cond_dropout}")
    if not 0.0 <= cfg.label_smoothing <= 1.0:
        raise RunError(f"--label-smoothing must be in [0, 1], got {cfg.label_smoothing}")
    if not 0.0 < cfg.cep_subset <= 1.0:
        raise RunError(f"--cep-subset must be in (0, 1], got {cfg.cep_subset}")
    if cfg.cep_subset < 1 and cfg.cep == "none":
        raise RunError("--cep-subset picks the items CEP perturbs: it needs --cep uniform | gaussian")
    if cfg.cep_fixed_delta and cfg.cep == "none":
        raise RunError("--cep-fixed-delta fixes CEP's noise per item: it needs --cep uniform | gaussian")
    if cfg.label_smoothing > 0 and cfg.cond == "text":
        raise RunError("--label-smoothing smooths class labels; it needs --cond class (captions have no one-hot)")


def _check_control(cfg) -> None:
    """The ControlNet flags: a base to control, maps where they are needed, thresholds in order (RunError otherwise)."""
    if cfg.control == "none":
        if cfg.control_maps:
            raise RunError("--control-maps is only used with --control maps")
        return
    if not cfg.init_from and not cfg.resume:
        raise RunError(f"--control {cfg.control} trains a ControlNet on a frozen base: pass --init-from BASE "
                       "(a nanoCEP checkpoint or a release)")
    if cfg.latents:
        raise RunError("--control computes its maps from the training images: it cannot train from --latents")
    if cfg.control == "maps" and not cfg.control_maps:
        raise RunError("--control maps needs --control-maps DIR (control images named like the training images)")
    if cfg.control == "canny" and not 0 <= cfg.canny_low <= cfg.canny_high:
        raise RunError(f"--canny-low {cfg.canny_low:g} and --canny-high {cfg.canny_high:g} must satisfy "
                       "0 <= low <= high")


def control_fields(cfg) -> list[str]:
    """The ControlNet's architecture fields (metadata control=True): a base given to --init-from does not set them."""
    return [f.name for f in dataclasses.fields(cfg) if f.metadata.get("control")]


def grid_cads(cfg):
    """The cads.CADS of --sample-cads 'noise,tau1,tau2,psi' (evaluate.py's --cads-* in one flag), or None if off."""
    from cads import CADS
    if not cfg.sample_cads:
        return None
    try:
        noise, tau1, tau2, psi = (float(v) for v in cfg.sample_cads.split(","))
        return CADS(tau1, tau2, noise, psi) if noise > 0 else None
    except ValueError as e:
        raise RunError(f"--sample-cads {cfg.sample_cads!r}: expected 'noise,tau1,tau2,psi' such as 0.1,0.6,0.9,1 "
                       f"({e})") from None


def _check_condition(cfg) -> None:
    """The condition flags: label corruption of labels, caption corruption of captions, a usable text encoder."""
    text = cfg.cond == "text"
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


# ----------------------------------------------------------------------------------------------------------------------
# A model family: how evaluate.py and tools/ rebuild any checkpoint's model from its "kind" and "config" entries

class Family(NamedTuple):
    """What a train script trains, as data (train_dit.FAMILY, train_ldm.FAMILY; evaluate.FAMILIES maps kinds to them)."""
    config: type           # its config dataclass (TrainConfig + the model's fields)
    presets: dict          # the paper's recipes, by name
    resolve: Callable      # cfg -> the checked config, 'auto' decided
    build_model: Callable  # cfg -> the denoiser nn.Module (model(x, t, y), model.cond its condition encoder)

    def build(self, cfg) -> tuple:
        """(model, diffusion) of a resolved config; the diffusion is built alike for every family."""
        return self.build_model(cfg), diffusion.from_config(cfg)

    def config_from(self, stored: dict):
        """The config stored in a checkpoint as this family's dataclass (keys it does not know are ignored)."""
        names = {f.name for f in dataclasses.fields(self.config)}
        return self.config(**{k: v for k, v in stored_config(stored).items() if k in names})
