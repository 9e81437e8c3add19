"""
judge.py: an offline judge for the built-in data (the FID-Inception of 16x16 coloured shapes) and for real data.

Inception features mean nothing on 16^2 discs and crosses (and cannot be downloaded offline), so this file trains its
own small CNN on real built-in images (data.BuiltinShapes with seed 1_000_003, disjoint from every training set,
which use seed = --seed), deterministically, and caches it as a TorchScript extractor:

    python -m scoring.judge build [--image-size 16] [--out PATH]        # train it (~1 min on 1 CPU core) and cache it
    python -m scoring.judge path [--image-size 16]                      # print the cached file's path (builds on first use)
    python -m scoring.judge ref --image-size 16 --num 5000 --out ref.npz             # features of fresh real images
    python -m scoring.trainset --run runs/dit --features $(python -m scoring.judge path) --resize none --out train.npz
    python -m scoring.judge check [--image-size 16] [--num 2000]                     # held-out accuracy and FD, real vs real
    python evaluate.py runs/dit/last.pt --features $(python -m scoring.judge path) --resize none \\
        --ref ref.npz --train-ref train.npz --num-samples 2000 --cfg-scales 1,2,4 --steps 25

With --data digits (sources/digits.py) or fashion-mnist (read from --data-root), every command uses that real data
instead: the judge trains on its judge part (class cross-entropy only, every image
also mirrored), `ref` and `check` use its fresh part (all of it unless --num), and --image-size defaults to 8. The
digits' parts are fixed thirds (sources/digits.py); Fashion-MNIST's are the halves of its test split, the first for
the judge and the second fresh (the chance level of trainset.py uses the same fresh half):

    python -m scoring.judge ref --data digits --out ref.npz       # the 596 fresh digits, every other one mirrored
    F="--data fashion-mnist --data-root /usr/share/datasets/fashion-mnist"
    python -m scoring.judge ref $F --num 2000 --out fm-ref.npz    # 2000 of the last 5000 test images, spread
    python evaluate.py runs/fm/last.pt --features $(python -m scoring.judge path $F) --resize none \\
        --ref fm-ref.npz --train-ref auto --num-samples 200 --cfg-scales 1

The extractor follows evaluate.py's protocol: f(x (B, 3, H, W) floats in [0, 255]) -> (feats (B, 128), logits
(B, 10)), class order as data.BuiltinShapes.class_names. It is trained on two tasks at once: the class (cross-entropy)
and the nuisance attributes the renderer drew (size, position, rotation, brightness, background; mean squared error),
so its features encode *where and how* a shape is drawn, not only its class. That is what makes the Fréchet distance
sensitive to the whole distribution and lets a nearest-neighbour search tell a copy of a training item from a fresh
image of the same class. From the features, evaluate.py reports per guidance scale:
    fid         Fréchet distance to the reference (fresh real images, seed 1_000_033, through the same judge)
    class_acc   share of samples whose judge argmax is the class they were conditioned on (conditional fidelity)
    mem_*, nn_* the memorization columns (memorization.py): the ratio test (nearest training item closer than 1/3 of
                the second-nearest) in pixels and in judge features, and nearest-item distances beside those of fresh
                real images (seed 1_000_037, trainset.py), the chance level; no threshold moves with the training-set size
    diversity   mean pairwise feature distance within each class, averaged over classes, over the same for the reference
"""
import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing.common import atomic_open, cache_root
import data
from scoring import metrics, shapes
from sources import digits
from sources.torchvision_sets import TORCHVISION_SETS, test_part

JUDGE_VERSION = 1                     # bump when the recipe changes: the cache key changes with it
JUDGE_SEED = 1_000_003                # the judge's own training images
REF_SEED = 1_000_033                  # held-out reference images (evaluate.py --ref)
CHECK_SEED = 1_000_039                # held-out images of `judge.py check`
# Torchvision sets whose test split's halves (TEST_PARTS) are alike: Fashion-MNIST's (each class 477-526 times in each
# half). MNIST's test split is ordered (its first 5,000 images cleaner and easier than its last), so its halves would
# not be a fair split; KMNIST's order is unchecked.
HALVES_JUDGED = ("fashion-mnist",)
JUDGED_DATA = ("builtin", "digits", *HALVES_JUDGED)   # the data a judge is made for (--data)
ACCURACY_FLOOR = {"builtin": 0.99, "digits": 0.9, "fashion-mnist": 0.8}   # build warns below this held-out accuracy
CACHE_DIR = cache_root()                # $NANOCEP_CACHE or ~/.cache/nanocep


@dataclass
class JudgeConfig:
    image_size: int = 16      # image side (the extractor only accepts this size)
    data: str = "builtin"     # builtin: rendered shapes and their attributes; digits, fashion-mnist: their judge
                              # part (real_part), classes only
    num_images: int = 8_000   # built-in training images, drawn once (seed JUDGE_SEED); real data: the whole judge part
    steps: int = 400          # Adam steps
    batch_size: int = 128
    lr: float = 2e-3          # Adam, cosine-decayed to 0
    width: int = 16           # channels of the first stage (doubled at every stride-2 stage)
    feature_dim: int = 128    # the feature vector (evaluate.py's "feats")
    attr_weight: float = 1.0  # weight of the attribute regression next to the class cross-entropy
    seed: int = JUDGE_SEED
    data_root: str = "data"   # where a torchvision set is read (its --data-root); not in the key: the content is
    data_hash: str = ""       # a torchvision set's judge part, by content (judge_config): a different copy of the
                              # set, or files of the same format with other images, is another judge

    def key(self) -> str:
        """A short hash of everything the weights depend on (the cache file name); `data` enters it only when it is not
        builtin and data_hash when it is set, so a built-in or digits judge's key is that of its recipe alone."""
        skip = {"data": "builtin", "data_hash": ""}
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "data_root" and skip.get(k, None) != v}
        text = json.dumps({"version": JUDGE_VERSION, **fields}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------------------
# The network: a few 3x3 conv stages down to 4x4, one dense layer of features, two heads

def conv_bn(cin: int, cout: int, stride: int = 1) -> list:
    """3x3 conv, batch norm (fixed statistics once trained), SiLU."""
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.SiLU()]


class JudgeNet(nn.Module):
    """f(x (B, 3, S, S) in [0, 255]) -> (feats (B, D), class logits (B, 10)); attr_head is used in training only."""

    def __init__(self, image_size: int, width: int = 16, feature_dim: int = 128, num_classes: int = 10,
                 num_attrs: int = 10):
        super().__init__()
        layers, ch, side = conv_bn(3, width), width, image_size
        while side > 4:  # stride-2 stages: 16 -> 8 -> 4 (32 adds one)
            layers += conv_bn(ch, 2 * ch, stride=2) + conv_bn(2 * ch, 2 * ch)
            ch, side = 2 * ch, side // 2
        self.image_size = image_size
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(ch * side * side, feature_dim)  # keeps the 4x4 layout: position survives into the features
        self.head = nn.Linear(feature_dim, num_classes)
        self.attr_head = nn.Linear(feature_dim, num_attrs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x / 127.5 - 1.0)                       # (B, C, 4, 4)
        return F.silu(self.fc(h.flatten(1)))                 # (B, D)

    def forward(self, x: torch.Tensor):
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"this judge takes {self.image_size}px images")
        feats = self.features(x)
        return feats, self.head(feats)


# ----------------------------------------------------------------------------------------------------------------------
# Real images and the attributes the renderer drew

def render_images(image_size: int, num: int, seed: int, flips=None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, S, S, 3), labels (N,)) of built-in items 0..num-1 with this seed; flips: (N,) bool or None."""
    ds = data.BuiltinShapes(image_size, num, seed)
    imgs = np.stack([ds.render(i) for i in range(num)])
    if flips is not None:
        imgs[flips] = imgs[flips][:, :, ::-1]
    return imgs, ds.labels.copy()


def attribute_targets(image_size: int, num: int, seed: int, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardised renderer attributes (N, 10) of items 0..num-1 and a mask (N, 10) of the ones that are defined.

    Columns: radius, cx, cy, cos 4a, sin 4a (crosses only: a disc has no angle), gain, background RGB, slope.
    A horizontal flip mirrors x, so cx and the angle change sign."""
    ds = data.BuiltinShapes(image_size, num, seed)
    rows, mask = np.zeros((num, 10), np.float32), np.ones((num, 10), np.float32)
    for i in range(num):
        a, _ = ds._attributes(i)
        sign = -1.0 if flips[i] else 1.0
        rows[i] = [(a["radius"] - 0.525) / 0.1, sign * a["cx"] / 0.3, a["cy"] / 0.3,
                   np.cos(4 * a["angle"]), sign * np.sin(4 * a["angle"]), (a["gain"] - 0.875) / 0.07,
                   *((a["bg"] - 35) / 20), a["bg_slope"] / 14]
        if a["shape"] == "disc":
            mask[i, 3:5] = 0
    return rows, mask


def no_judge(data_name: str) -> ValueError:
    """The one-line error for data no judge is made for."""
    return ValueError(f"no judge for --data {data_name}: a judge is made for {', '.join(JUDGED_DATA)}")


def real_part(data_name: str, image_size: int, part: str, root: str = "data"):
    """(a dataset with render(i) and labels, the indices (n,) of one of its parts) of real data: the digits' judge or
    fresh part (sources/digits.py), or the first ("judge") or second ("fresh") half of Fashion-MNIST's test split
    (sources/torchvision_sets.py); both parts are disjoint from every training item."""
    if data_name == "digits":
        ds = digits.DigitsDataset(image_size, part)
        return ds, np.arange(len(ds))
    if data_name not in HALVES_JUDGED:
        raise no_judge(data_name)
    ds = data.build_dataset(data_name, image_size, root=root, train=False)
    return ds, test_part(len(ds), part)


def real_images(data_name: str, image_size: int, part: str, num: int | None = None, mirror: str = "half",
                root: str = "data"):
    """(uint8 (n, S, S, 3), labels (n,)) of a real part (real_part): all of it, or `num` items spread over it;
    mirror: "none", "half" (every other one, as the built-in references) or "both" (each as stored and mirrored)."""
    ds, indices = real_part(data_name, image_size, part, root)
    picks = indices[np.unique(np.linspace(0, len(indices) - 1, min(num or len(indices), len(indices))).round()
                              .astype(int))]
    imgs, labels = np.stack([ds.render(int(i)) for i in picks]), np.asarray(ds.labels)[picks]
    if mirror == "both":
        return np.concatenate([imgs, imgs[:, :, ::-1]]), np.concatenate([labels, labels])
    if mirror == "half":
        imgs = imgs.copy()
        imgs[1::2] = imgs[1::2, :, ::-1]
    return imgs, labels


def training_images(cfg: "JudgeConfig", rng: np.random.Generator):
    """The judge's training set: (images (N, 3, S, S) float in [0, 255], labels (N,), attribute targets (N, 10) and
    their mask, both None for real data, which has no attributes)."""
    if cfg.data != "builtin":                                                   # samples of a flip-trained run mirror
        imgs, labels = real_images(cfg.data, cfg.image_size, "judge", mirror="both", root=cfg.data_root)
        attrs = mask = None
    else:
        flips = rng.random(cfg.num_images) < 0.5
        imgs, labels = render_images(cfg.image_size, cfg.num_images, cfg.seed, flips)
        attrs, mask = (torch.from_numpy(a) for a in attribute_targets(cfg.image_size, cfg.num_images, cfg.seed, flips))
    x = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float()     # (N, 3, S, S) in [0, 255]
    return x, torch.from_numpy(labels), attrs, mask


@contextmanager
def one_thread():
    """One intra-op thread for the duration: CPU kernels then reduce in a fixed order, so a rebuild is bit-identical.

    (torch.use_deterministic_algorithms would add nothing on the CPU here and costs ~6 s of imports.)"""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------------------------------
# Training and the cache

def train_judge(cfg: JudgeConfig, progress: bool = True) -> JudgeNet:
    """Train the judge on its real images (training_images), deterministically (same config -> same weights)."""
    rng = np.random.default_rng([cfg.seed, 1])
    x_all, y_all, a_all, m_all = training_images(cfg, rng)
    num = len(y_all)
    with one_thread():
        torch.manual_seed(cfg.seed)
        net = JudgeNet(cfg.image_size, cfg.width, cfg.feature_dim)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / cfg.steps)))
        order = np.concatenate([rng.permutation(num) for _ in range(-(-cfg.steps * cfg.batch_size // num))])
        from tqdm import tqdm
        for step in tqdm(range(cfg.steps), desc=f"judge {cfg.data} {cfg.image_size}px", disable=not progress,
                         file=sys.stderr):
            idx = torch.from_numpy(order[step * cfg.batch_size:(step + 1) * cfg.batch_size])
            feats = net.features(x_all[idx])
            loss = F.cross_entropy(net.head(feats), y_all[idx])
            if a_all is not None:
                mse = ((net.attr_head(feats) - a_all[idx]) ** 2 * m_all[idx]).sum() / m_all[idx].sum()
                loss = loss + cfg.attr_weight * mse
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


def cache_path(cfg: JudgeConfig) -> Path:
    """Where a judge with these settings is cached: ~/.cache/nanocep/judge-16px-<settings hash>.pt (other data's:
    judge-digits-8px-<hash>.pt, judge-fashion-mnist-8px-<hash>.pt)."""
    prefix = "judge-" if cfg.data == "builtin" else f"judge-{cfg.data}-"
    return CACHE_DIR / f"{prefix}{cfg.image_size}px-{cfg.key()}.pt"


def judge_config(image_size: int = 16, data_name: str = "builtin", data_root: str = "data") -> JudgeConfig:
    """The default judge's settings for this image size and data; a torchvision set's carry the hash of its judge
    part as stored (images and labels), so the cache never serves a judge trained on other files."""
    if data_name not in JUDGED_DATA:
        raise no_judge(data_name)
    cfg = JudgeConfig(image_size=image_size, data=data_name, data_root=data_root)
    if data_name in HALVES_JUDGED:
        ds, indices = real_part(data_name, image_size, "judge", data_root)
        digest = hashlib.sha1(np.ascontiguousarray(np.asarray(ds.tv.data)[indices]).tobytes())
        digest.update(np.ascontiguousarray(ds.labels[indices]).tobytes())
        cfg.data_hash = digest.hexdigest()[:12]
    return cfg


def default_path(image_size: int = 16, data_name: str = "builtin", data_root: str = "data") -> Path:
    """Where the default judge for this image size and data is cached."""
    return cache_path(judge_config(image_size, data_name, data_root))


def build(cfg: JudgeConfig, out=None, progress: bool = True) -> Path:
    """Train the judge, measure it on held-out images, save it as TorchScript (atomically); returns the path."""
    if cfg.data in HALVES_JUDGED and not cfg.data_hash:       # the cache key must name the content it trains on
        cfg = dataclasses.replace(cfg, data_hash=judge_config(cfg.image_size, cfg.data, cfg.data_root).data_hash)
    out = Path(out) if out else cache_path(cfg)
    t0 = time.time()
    net = train_judge(cfg, progress)
    info = {"config": dataclasses.asdict(cfg), "version": JUDGE_VERSION, "key": cfg.key(),
            "build_seconds": round(time.time() - t0, 1),
            "class_names": class_names(cfg.data)}
    with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript, which evaluate.py's --features reads
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(net)
    info.update(self_check(scripted, cfg.image_size, 1000, cfg.data, cfg.data_root))
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), atomic_open(out) as f:
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, f, _extra_files={"judge.json": json.dumps(info)})
    print(f"judge: built {out} in {info['build_seconds']} s; held-out accuracy {info['accuracy']:.4f}", file=sys.stderr)
    if info["accuracy"] < ACCURACY_FLOOR.get(cfg.data, 0.8):
        print(f"warning: the judge classifies only {info['accuracy']:.1%} of held-out real images right", file=sys.stderr)
    return out


def judge_path(image_size: int = 16, progress: bool = True, data_name: str = "builtin", data_root: str = "data") -> Path:
    """The default judge for this image size and data, built and cached on first use."""
    cfg = judge_config(image_size, data_name, data_root)
    path = cache_path(cfg)
    return path if path.is_file() else build(cfg, path, progress)


def load(path=None, image_size: int = 16, data_name: str = "builtin", data_root: str = "data"):
    """The judge as a TorchScript module (the default for image_size and data if no path)."""
    return metrics.load_torchscript_extractor(str(path or judge_path(image_size, data_name=data_name,
                                                                     data_root=data_root)))


def class_names(data_name: str) -> list[str]:
    """The judge's class order: data.BuiltinShapes.class_names, the digits 0..9, or the torchvision set's classes."""
    if data_name in HALVES_JUDGED:
        import torchvision.datasets as tvd
        return [str(c) for c in getattr(tvd, TORCHVISION_SETS[data_name]).classes]
    return [str(c) for c in range(10)] if data_name == "digits" else data.BuiltinShapes(16, 10).class_names


# ----------------------------------------------------------------------------------------------------------------------
# Using the judge: features, class accuracy, references

@torch.no_grad()
def judge_images(net, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, S, S, 3) images -> (feats (N, D) float32, predicted classes (N,))."""
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2).float()
        f, logits = net(x)
        feats.append(f.numpy())
        preds.append(logits.argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def self_check(net, image_size: int, num: int = 2000, data_name: str = "builtin", data_root: str = "data") -> dict:
    """Held-out accuracy of the judge and the Fréchet distance between two fresh real sets (both ~ ideal).
    Real data: `num` images of its fresh part (at most all of it), their accuracy as stored and mirrored, and the
    distance between its even and odd halves."""
    if data_name != "builtin":
        imgs, labels = real_images(data_name, image_size, "fresh", num, mirror="none", root=data_root)
        feats, pred = judge_images(net, imgs)
        fa, fb = feats[0::2], feats[1::2]
        mirrored = judge_images(net, imgs[:, :, ::-1])[1]
        extra = {"accuracy_mirrored": float((mirrored == labels).mean())}
    else:
        a, labels = render_images(image_size, num, CHECK_SEED)
        b, _ = render_images(image_size, num, CHECK_SEED + 1)
        (fa, pred), (fb, _) = judge_images(net, a), judge_images(net, b)
        extra = {}
    return {"accuracy": float((pred == labels).mean()), **extra, "num_check": len(labels),
            "fd_real_real": metrics.frechet_distance(*metrics.feature_statistics(fa), *metrics.feature_statistics(fb))}


def as_uint8(images) -> np.ndarray:
    """Images as uint8 (N, S, S, 3): uint8 arrays unchanged, (N, 3, S, S) float tensors in [-1, 1] converted."""
    if isinstance(images, torch.Tensor):
        images = (images.float().clamp(-1, 1) * 127.5 + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return images


def class_accuracy(images, labels, image_size: int = None, path=None) -> float:
    """Share of images (uint8 (N, S, S, 3), or (N, 3, S, S) floats in [-1, 1]) the judge puts in their label's class."""
    images = as_uint8(images)
    net = load(path, image_size or images.shape[1])
    return float((judge_images(net, images)[1] == np.asarray(labels)).mean())


def grid_verdict(images, labels, cfg_scale: float, step: int, print_fn=print) -> dict:
    """Judge a built-in run's sample grid (N, 3, S, S) in [-1, 1]: print and return its class accuracy and its shape
    fidelity (shapes.py: each sample's best IoU against real items of its shape, mean per shape) as a log record."""
    images = as_uint8(images.cpu())                               # (N, S, S, 3), once for both measures
    acc = class_accuracy(images, np.asarray(labels), images.shape[1])
    iou = shapes.shape_iou(images, np.asarray(labels))
    n = len(labels)
    print_fn(f"judge: {round(acc * n)}/{n} grid samples show their class (colour and shape): class accuracy "
             f"{acc:.3f} at guidance {cfg_scale:g}, step {step}; shape IoU against real items "
             + ", ".join(f"{shapes.PLURAL[k]} {v:.2f}" for k, v in iou.items()) + " (real items: discs 0.98, crosses 0.92)")
    return {"event": "judge", "step": step, "class_acc": acc, "num": n, "cfg_scale": cfg_scale, "shape_iou": iou}


def judge_final_grid(cfg, images, labels, log, print_fn=print) -> None:
    """The trainer's hook after a run's last grid: print and log the judge's class accuracy of a built-in run.

    Skipped for other data, and for short runs (< 500 steps: tests, smoke runs) when no judge is cached yet, so they
    never pay the judge's one-minute build."""
    if cfg.data != "builtin" or getattr(cfg, "cond", "class") != "class":
        return
    if cfg.steps < 500 and not default_path(cfg.image_size).is_file():
        return
    log(grid_verdict(images, labels, cfg.sample_cfg, cfg.steps, print_fn))


def feature_pipeline(image_size: int, path=None, data_name: str = "builtin", data_root: str = "data") -> str:
    """The feature-pipeline label of this judge file, as evaluate.py --features FILE --resize none gives its features:
    it names the file by content, so a rebuilt or another judge is a different pipeline."""
    return metrics.pipeline_label(str(path or judge_path(image_size, data_name=data_name, data_root=data_root)),
                                  resize="none")


def reference(image_size: int, num: int | None, seed: int = REF_SEED, path=None, data_name: str = "builtin",
              data_root: str = "data") -> dict:
    """Features of `num` fresh real images (half of them flipped): {"feats", "probs", "labels"}, evaluate.py's --ref,
    with the judge's "pipeline" label and the "image_size". Real data: `num` (None: all) of its fresh part, spread
    over it, every other one mirrored; no seed."""
    if data_name != "builtin":
        imgs, labels = real_images(data_name, image_size, "fresh", num, mirror="half", root=data_root)
    else:
        flips = np.arange(num) // 10 % 2 == 1           # balanced over classes
        imgs, labels = render_images(image_size, num, seed, flips)
    net = load(path, image_size, data_name, data_root)
    feats, probs = [], []
    with torch.no_grad():
        for i in range(0, len(imgs), 500):
            f, logits = net(torch.from_numpy(np.ascontiguousarray(imgs[i:i + 500])).permute(0, 3, 1, 2).float())
            feats.append(f.numpy())
            probs.append(torch.softmax(logits.double(), 1).float().numpy())
    return {"feats": np.concatenate(feats), "probs": np.concatenate(probs), "labels": labels,
            "pipeline": feature_pipeline(image_size, path, data_name, data_root), "image_size": image_size}


# ----------------------------------------------------------------------------------------------------------------------
# Command line

def main(argv=None) -> int:
    from plumbing.common import ArgParser, new_file
    p = ArgParser(prog="python -m scoring.judge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("build", "path", "ref", "check"):
        s = sub.add_parser(name)
        s.error = p.error
        s.add_argument("--data", choices=JUDGED_DATA, default="builtin",
                       help="the judge's data: the built-in shapes, the digits (sources/digits.py) or Fashion-MNIST "
                       "(its test split: the first half trains the judge, the second is the fresh images)")
        s.add_argument("--data-root", default="data", help="where Fashion-MNIST is read (as train_dit.py "
                       "--data-root: torchvision's layout or the four published .gz files)")
        s.add_argument("--image-size", type=int, help="image side (8, 16 or 32 for the built-in runs; default 16, "
                       "real data 8)")
        s.add_argument("--judge", help="a judge file (default: the cached default for the data and image size)")
        if name == "build":
            s.add_argument("--out", help="where to write it (default: the cache path `judge.py path` prints)")
        if name == "ref":
            s.add_argument("--num", type=int, help="fresh real images (default 5000; real data: all of its fresh "
                           "part)")
            s.add_argument("--seed", type=int, default=REF_SEED, help="their seed, built-in data only (never a "
                           "training run's seed)")
            s.add_argument("--out", default="ref.npz", help="features .npz (feats, probs, labels, labelled with the "
                           "judge's pipeline and the image size) for evaluate.py --ref")
        if name == "check":
            s.add_argument("--num", type=int, help="held-out images (default 2000; real data: all of its fresh "
                           "part)")
    args = p.parse_args(argv)
    real = args.data != "builtin"
    size = args.image_size or (digits.NATIVE_SIZE if real else 16)
    try:
        if size < 8:
            raise ValueError(f"--image-size must be >= 8, got {size}")
        if args.judge and not os.path.isfile(args.judge):
            raise FileNotFoundError(f"judge not found: {args.judge}")
        if args.command == "build":
            build(judge_config(size, args.data, args.data_root), args.out)
        elif args.command == "path":
            print(args.judge or judge_path(size, data_name=args.data, data_root=args.data_root))
        elif args.command == "check":
            num = args.num if args.num is not None else (None if real else 2000)
            net = load(args.judge, size, args.data, args.data_root)
            print(json.dumps(self_check(net, size, num, args.data, args.data_root)))
        else:
            num = args.num if args.num is not None else (None if real else 5000)
            if num is not None and num < 10:
                raise ValueError(f"--num must be >= 10, got {num}")
            new_file(args.out)
            ref = reference(size, num, args.seed, args.judge, args.data, args.data_root)
            meta = {"part": "fresh"} if real else {"seed": args.seed}
            metrics.write_reference(args.out, ref["feats"], ref["probs"], ref["pipeline"], ref["image_size"],
                                    labels=ref["labels"], data=args.data, num_images=len(ref["labels"]), **meta)
            print(f"wrote {args.out}", file=sys.stderr)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"python -m scoring.judge: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
