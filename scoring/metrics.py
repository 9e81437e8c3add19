"""
metrics.py: FID, Inception Score and precision/recall, and the one pass of image features they are computed from.

evaluate.py uses this file to measure samples; you can use it on its own:

    from scoring import metrics
    feats = metrics.Featurizer()(images_uint8_nhwc_or_folder_or_npz)     # {"feats": (N, 2048), "probs": (N, 1008)}
    mu, sigma = metrics.feature_statistics(feats["feats"])
    fid = metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref)
    is_mean, is_std = metrics.inception_score(feats["probs"], splits=10)
    precision, recall = metrics.precision_recall(ref_feats, feats["feats"], k=3)

Features come from clean-fid's Inception (mode "clean": clean-fid's bicubic resize to 299), giving the 2048-d pool
features (FID, precision/recall) and the 1008-way logits (IS) at once; clean-fid downloads the network to
/tmp/inception-2015-12-05.pt on first use (offline: copy the file there). Any TorchScript extractor
f(x (B,3,H,W) floats in [0,255]) -> feats or (feats, logits) can stand in for it.

Feature pipelines and their labels (stored with every features/statistics .npz written here, key "pipeline"):
    clean-fid/clean               clean-fid's PIL bicubic resize to 299 outside, then the Inception (the default)
    clean-fid/legacy_tensorflow   the raw image into the same TorchScript file, which resizes inside the network the way
                                  TF did (clean-fid: matches TTUR); the ADM evaluator's pipeline, so ADM reference
                                  batches (VIRTUAL_imagenet256_labeled.npz) count as this one
    torchscript:<sha256[:12]>/<resize>   a custom extractor file, with the resize applied outside it
Statistics of one pipeline are never compared with features of another (check_pipelines), nor a reference labelled
with another image size than the samples' (check_reference_size; unlabelled: a warning). Reference images (a folder
or an arr_0) get data.py's ADM centre crop to the samples' resolution first, as the training images did.
"""

import csv
import hashlib
import json
import os
import sys
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg, special

from plumbing.common import atomic_open, save_npz
from sources.download import download, file_hash
from scoring import memorization

INCEPTION_PATH = "/tmp/inception-2015-12-05.pt"  # clean-fid's hard-coded download location ("./" on Windows)
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
PIPELINES = ("clean", "legacy_tensorflow")  # the clean-fid Inception modes offered (--pipeline)
ADM_PIPELINE = "clean-fid/legacy_tensorflow"  # what an ADM reference batch was made with (TF Inception, resize inside)
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

# ---- metrics ----


def feature_statistics(feats):
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features in float64, as clean-fid and the ADM evaluator."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {feats.shape[0]}")
    return feats.mean(0), np.atleast_2d(np.cov(feats, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Fréchet distance |mu1-mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) between two Gaussians: FID on Inception statistics."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # a singular product (e.g. fewer samples than dimensions): regularise both, as clean-fid and ADM do
        print(f"warning: singular covariance product; adding {eps} to the diagonals", file=sys.stderr)
        offset = eps * np.eye(mu1.size)
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # rounding leaves tiny imaginary parts; a large one on the diagonal means the statistics are broken (ADM raises)
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: sqrtm(S1 S2) has an imaginary part of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs, splits=10):
    """Inception Score exp(E_x KL(p(y|x) || p(y))) of (N, C) class probabilities: (mean, std) over `splits` parts."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probabilities must be (N, C), got shape {probs.shape}")
    if splits < 1 or probs.shape[0] < splits:
        raise ValueError(f"the Inception Score over {splits} splits needs at least {splits} samples, got {probs.shape[0]}")
    n, scores = probs.shape[0], []
    for i in range(splits):  # the original boundaries i*N//splits (50K -> ten parts of 5K, as ADM and StyleGAN)
        part = probs[i * n // splits:(i + 1) * n // splits]  # (n_i, C)
        marginal = part.mean(0, keepdims=True)  # (1, C) p(y) over this part
        kl = special.rel_entr(part, marginal).sum(1)  # (n_i,) KL(p(y|x) || p(y)), with 0 log 0 = 0
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a, b):
    """(A, B) squared Euclidean distances; the same formula for radii and queries keeps comparisons consistent."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * (a @ b.T)
    return d.clamp_min_(0)


def _knn_radii(x, k, max_elems):
    """(N,) squared distance of each row of x to its k-th nearest other row (the row itself sits at rank 0)."""
    rows = max(1, max_elems // x.shape[0])
    return torch.cat([_squared_distances(x[i:i + rows], x).topk(k + 1, dim=1, largest=False).values[:, k]
                      for i in range(0, x.shape[0], rows)])


def _inside_any_ball(queries, centers, radii, max_elems):
    """(Q,) bool: does each query lie within at least one ball (center, radius)?"""
    rows = max(1, max_elems // centers.shape[0])
    return torch.cat([(_squared_distances(queries[i:i + rows], centers) <= radii[None, :]).any(1)
                      for i in range(0, queries.shape[0], rows)])


@torch.no_grad()
def precision_recall(real_feats, fake_feats, k=3, device=None, max_elems=2 ** 25):
    """Improved precision and recall (Kynkäänniemi et al. 2019): k-NN balls on each set, as the ADM evaluator."""
    real, fake = torch.as_tensor(np.asarray(real_feats)), torch.as_tensor(np.asarray(fake_feats))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall needs (N, D) features of one D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, "
                         f"got {real.shape[0]} real and {fake.shape[0]} generated")
    dtype = torch.float64 if torch.float64 in (real.dtype, fake.dtype) else torch.float32
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    real, fake = real.to(device, dtype), fake.to(device, dtype)  # (Nr, D), (Nf, D); chunks of max_elems distances
    precision = _inside_any_ball(fake, real, _knn_radii(real, k, max_elems), max_elems).double().mean()
    recall = _inside_any_ball(real, fake, _knn_radii(fake, k, max_elems), max_elems).double().mean()
    return float(precision), float(recall)


def within_class_spread(feats, labels, max_per_class=500):
    """Mean pairwise L2 feature distance within each class (its first max_per_class items), averaged over classes."""
    feats, labels, spreads = torch.as_tensor(np.asarray(feats), dtype=torch.float64), np.asarray(labels), {}
    for c in np.unique(labels):
        x = feats[np.flatnonzero(labels == c)[:max_per_class]]  # (n, D)
        if len(x) >= 2:
            spreads[int(c)] = float(torch.pdist(x).mean())
    return spreads


def class_diversity(feats, labels, ref_feats, ref_labels):
    """Within-class spread of samples over that of the reference, over the classes both hold (1 = as diverse)."""
    mine, ref = within_class_spread(feats, labels), within_class_spread(ref_feats, ref_labels)
    common = sorted(set(mine) & set(ref))
    return float(np.mean([mine[c] for c in common]) / np.mean([ref[c] for c in common])) if common else None


# ---- feature extractors ----


def _download_inception(path):
    """Fetch clean-fid's Inception to `path` (atomically, so a failed download leaves nothing behind)."""
    try:
        download(INCEPTION_URL, path, quiet=True)            # a failure says it all in one line
    except (OSError, ValueError) as e:       # ConnectionError and FileNotFoundError are OSErrors
        raise FileNotFoundError(f"clean-fid's Inception is not at {path} and the download from {INCEPTION_URL} failed "
                                f"({e}); copy the file there, or pass --inception PATH or --features FILE") from None


class CleanInception(torch.nn.Module):
    """clean-fid's TorchScript Inception-v3: 2048-d pool features and 1008 logits in one pass.

    mode "clean": takes 299x299 images resized outside (clean-fid's PIL bicubic); mode "legacy_tensorflow": takes
    images of any size and lets the TorchScript network resize them inside, as TF did (clean-fid's legacy mode)."""

    def __init__(self, path=INCEPTION_PATH, download=True, mode="clean"):
        super().__init__()
        if mode not in PIPELINES:
            raise ValueError(f"unknown Inception mode: {mode} ({' or '.join(PIPELINES)})")
        self.mode = mode
        if not os.path.exists(path) and download:
            _download_inception(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"clean-fid's Inception not found: {path}")
        self.net = _jit_load(path, "cpu")

    def forward(self, x):  # (B, 3, H, W) floats in [0, 255]; "clean": already resized to 299 outside
        if self.mode == "legacy_tensorflow":  # the network's own forward: TF-style resize to 299, (x-128)/128, pool
            feats = self.net(x, return_features=True).reshape(x.shape[0], -1)  # (B, 2048)
        elif x.shape[-2:] != (299, 299):
            raise ValueError(f"clean-fid's Inception takes 299x299 images, got {tuple(x.shape[-2:])}; use --resize clean")
        else:
            feats = self.net.layers((x - 128) / 128).reshape(x.shape[0], -1)  # (B, 2048): what clean-fid's FID uses
        # bias-free logits, as the ADM evaluator's and StyleGAN's IS (the original TF Inception Score had no bias)
        logits = F.linear(feats, self.net.output.weight)  # (B, 1008)
        return feats, logits


def _file_hash(path, algorithm="sha1"):
    """Hex digest of a file's bytes (identifies a feature extractor in cache keys and pipeline labels)."""
    return file_hash(path, algorithm)


def _jit_load(path, device):
    """torch.jit.load in eval mode, without torch 2.14's TorchScript deprecation warning (clean-fid's net is TorchScript)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
        return torch.jit.load(path, map_location=device).eval()


def load_torchscript_extractor(path, device="cpu"):
    """Load a TorchScript feature extractor f(x (B,3,H,W) in [0,255]) -> (B, D) or ((B, D), (B, C) logits)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"feature extractor not found: {path}")
    try:
        return _jit_load(path, device)
    except Exception as e:  # torch raises RuntimeError, ValueError, ... for non-TorchScript files
        raise ValueError(f"not a TorchScript feature extractor: {path} ({str(e).splitlines()[0]})") from None


def _run_extractor(net, x):
    """Features (B, D) and logits (B, C) or None from one forward of the extractor."""
    out = net(x)
    feats, logits = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
    feats = feats.reshape(x.shape[0], -1) if feats.ndim == 4 else feats  # (B, D, 1, 1) pool maps are fine too
    if feats.ndim != 2 or feats.shape[0] != x.shape[0] or (logits is not None and logits.ndim != 2):
        raise ValueError(f"the feature extractor must return (B, D) features [and (B, C) logits], got {tuple(feats.shape)}")
    return feats, logits


# ---- image sources ----


def list_images(folder):
    """Image files under a folder, recursively, in sorted order (the extensions clean-fid reads)."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def npz_keys(path):
    """Array names in an .npz without loading any of them."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with zipfile.ZipFile(path) as z:
            return {name[:-4] for name in z.namelist() if name.endswith(".npy")}
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"not a readable .npz: {path} ({e})") from None


def npz_array_info(path, key):
    """(shape, dtype) of one array in an .npz, read from its header only."""
    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    return shape, dtype


class ImageSource:
    """uint8 (N, H, W, 3) images read in order, in batches: an array, a folder of images or an ADM .npz's arr_0."""

    def __init__(self, source):
        self.array, self.files, self.npz = None, None, None
        if isinstance(source, list):  # image files, in this order
            self.files, self.len = [Path(f) for f in source], len(source)
            if not self.files:
                raise ValueError("no images given")
            return
        if isinstance(source, np.ndarray):
            self.array, shape, dtype = source, source.shape, source.dtype
        else:
            path = Path(source)
            if path.is_dir():
                self.files = list_images(path)
                if not self.files:
                    raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {path}")
                self.len = len(self.files)
                return
            if not path.exists():
                raise FileNotFoundError(f"images not found: {path}")
            if path.suffix != ".npz" or "arr_0" not in npz_keys(path):
                raise ValueError(f"unknown image source: {path} (expected a folder of images or an .npz with arr_0)")
            self.npz = path
            shape, dtype = npz_array_info(path, "arr_0")
        if len(shape) != 4 or shape[-1] != 3 or np.dtype(dtype) != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {np.dtype(dtype)} {tuple(shape)} in {source if self.npz else 'array'}")
        self.len = shape[0]

    def __len__(self):
        return self.len

    def batches(self, batch_size):
        """Yield lists of items (file paths or (H, W, 3) uint8 arrays), batch_size at a time, in order."""
        if self.files is not None:
            for i in range(0, self.len, batch_size):
                yield self.files[i:i + batch_size]
        elif self.array is not None:
            for i in range(0, self.len, batch_size):
                yield list(self.array[i:i + batch_size])
        else:  # stream arr_0 out of the zip so 50K 256px samples (10 GB) never sit in memory at once
            with zipfile.ZipFile(self.npz) as z, z.open("arr_0.npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran_order, _ = read_header(f)
                if fortran_order:
                    raise ValueError(f"{self.npz}: arr_0 is stored in Fortran order; save it C-contiguous")
                row = int(np.prod(shape[1:]))
                for i in range(0, self.len, batch_size):
                    n = min(batch_size, self.len - i)
                    yield list(np.frombuffer(f.read(n * row), np.uint8).reshape(n, *shape[1:]))


def _image_preparer(resize, crop=None):
    """item (path or uint8 (H, W, 3)) -> float32 (S, S, 3) in [0, 255]; "clean" is clean-fid's resize to 299.

    crop: first data.py's ADM centre crop to crop x crop (what training images get), before the feature resize."""
    if resize == "clean":
        from cleanfid.resize import build_resizer
        fn_resize = build_resizer("clean")  # per-channel float PIL bicubic, no re-quantisation
    elif resize == "none":
        fn_resize = None
    else:
        raise ValueError(f"unknown resize mode: {resize} (clean or none)")

    def prepare(item):
        if crop is not None:
            from sources.folders import center_crop_arr
            with (Image.open(item) if isinstance(item, Path) else Image.fromarray(item)) as im:
                img = np.array(center_crop_arr(im.convert("RGB"), crop))  # (crop, crop, 3) uint8
        else:
            img = np.array(Image.open(item).convert("RGB")) if isinstance(item, Path) else item  # (H, W, 3) uint8
        return fn_resize(img) if fn_resize else img.astype(np.float32)
    return prepare


# ---- features ----


@torch.no_grad()
def extract_features(images, net, batch_size=100, device="cpu", resize="clean", workers=0, progress=False, crop=None):
    """One pass of `net` over images: {"feats": (N, D) float32, "probs": (N, C) float32 or None}; crop: see
    _image_preparer."""
    source = images if isinstance(images, ImageSource) else ImageSource(images)
    prepare = _image_preparer(resize, crop)
    pool = ThreadPoolExecutor(workers) if workers > 0 else None  # PIL decode/resize release the GIL
    batches = source.batches(batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=-(-len(source) // batch_size), desc="features", file=sys.stderr)
    feats, probs = [], []
    try:
        for items in batches:
            arrays = list(pool.map(prepare, items)) if pool else [prepare(item) for item in items]
            if len({a.shape for a in arrays}) > 1:
                raise ValueError("images differ in size; use --resize clean")
            x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device)  # (B, 3, S, S) in [0, 255]
            f, logits = _run_extractor(net, x)
            feats.append(f.float().cpu().numpy())
            if logits is not None:
                probs.append(torch.softmax(logits.double(), dim=1).float().cpu().numpy())
    finally:
        if pool:
            pool.shutdown()
    return {"feats": np.concatenate(feats), "probs": np.concatenate(probs) if probs else None}


def _source_fingerprint(path):
    """A string that changes when the images behind `path` change (names, sizes, modification times)."""
    path = Path(path).resolve()
    files = list_images(path) if path.is_dir() else [path]
    h = hashlib.sha1(str(path).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return f"{path}|{len(files)}|{h.hexdigest()}"


def pipeline_label(features=None, resize="clean", pipeline="clean"):
    """The label naming a feature pipeline: "clean-fid/<mode>" or "torchscript:<sha256[:12]>/<resize>"."""
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown --pipeline {pipeline} ({' or '.join(PIPELINES)})")
    if features:
        if pipeline != "clean":
            raise ValueError(f"--pipeline {pipeline} is a mode of clean-fid's Inception; a --features extractor "
                             "takes --resize instead")
        return f"torchscript:{_file_hash(features, 'sha256')[:12]}/{resize}"
    if pipeline == "clean" and resize != "clean":
        raise ValueError(f"clean-fid's Inception in mode clean needs --resize clean, got --resize {resize}")
    return f"clean-fid/{pipeline}"


def _read_features(path):
    """{"feats", "probs", "pipeline" (None if unlabelled), "image_size"} of a features .npz."""
    with np.load(path) as z:
        return {"feats": z["feats"], "probs": z["probs"] if "probs" in z.files else None,
                "pipeline": str(z["pipeline"]) if "pipeline" in z.files else None,
                "image_size": int(z["image_size"]) if "image_size" in z.files else None,
                "labels": z["labels"] if "labels" in z.files else None}  # samples: conditioned classes; real: true ones


class Featurizer:
    """The feature network (loaded on first use) with the settings that define its features, and a feature cache.

    pipeline: "clean" or "legacy_tensorflow" (clean-fid's Inception modes; legacy resizes inside the network, so no
    resize is applied outside); self.pipeline is the label (pipeline_label) carried by every feature set made here."""

    def __init__(self, features=None, inception=INCEPTION_PATH, device="cpu", resize="clean", batch_size=100,
                 workers=0, cache_dir=None, progress=False, pipeline="clean"):
        if features and not os.path.isfile(features):
            raise FileNotFoundError(f"feature extractor not found: {features}")
        resize = "none" if pipeline == "legacy_tensorflow" else resize  # the network resizes inside
        self.pipeline = pipeline_label(features, resize, pipeline)
        self.features, self.inception, self.device, self.resize, self.mode = features, inception, device, resize, pipeline
        self.batch_size, self.workers, self.progress = batch_size, workers, progress
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._net = None
        # what the features depend on; a custom extractor is named by its content, the published Inception by its name
        extractor = f"torchscript:{_file_hash(features)}" if features else f"clean-inception-2015-12-05/{pipeline}"
        self.id = f"{extractor}|resize={resize}"
        self.name = str(features) if features else f"clean-fid inception ({pipeline})"

    def net(self):
        """The extractor module, loaded once."""
        if self._net is None:
            self._net = (load_torchscript_extractor(self.features, self.device) if self.features
                         else CleanInception(self.inception, mode=self.mode).to(self.device).eval())
        return self._net

    def __call__(self, source, crop=None):
        """{"feats", "probs", "pipeline"} of an image array, folder or .npz (cached; crop: ADM centre crop to that size
        first), or of a features .npz (read, with the pipeline label it carries, None if it has none)."""
        in_memory = isinstance(source, (np.ndarray, ImageSource))
        if not in_memory and Path(source).suffix == ".npz" and "feats" in npz_keys(source):
            return _read_features(source)
        cache = None
        if self.cache_dir is not None and not in_memory:
            key = f"{_source_fingerprint(source)}|{self.id}|crop={crop}"
            cache = self.cache_dir / f"{Path(source).resolve().name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
            if cache.exists():
                with np.load(cache) as z:
                    if str(z["key"]) == key:
                        return {"feats": z["feats"], "probs": z["probs"] if "probs" in z.files else None,
                                "pipeline": self.pipeline}
        out = extract_features(source, self.net(), self.batch_size, self.device, self.resize, self.workers,
                               self.progress, crop)
        out["pipeline"] = self.pipeline
        if cache is not None:
            save_npz(cache, feats=out["feats"], probs=out["probs"], key=np.array(key), pipeline=np.array(self.pipeline))
        return out


def image_size_of(source):
    """The resolution (height) of a samples source: first image of a folder, arr_0 of an .npz, or a features .npz's
    image_size (None if it has none)."""
    path = Path(source)
    if path.suffix == ".npz" and path.is_file() and "feats" in npz_keys(path):
        return _read_features(path)["image_size"]
    src = ImageSource(path)
    if src.files is not None:
        with Image.open(src.files[0]) as im:
            return im.size[1]
    return int(npz_array_info(path, "arr_0")[0][1])


def count_items(source):
    """How many images (or feature rows) a samples/reference source holds, read cheaply (no decoding)."""
    path = Path(source)
    if path.suffix == ".npz" and path.is_file():
        keys = npz_keys(path)
        if "feats" in keys:
            return npz_array_info(path, "feats")[0][0]
    return len(ImageSource(path))


# ---- references ----


def reference_kind(ref):
    """Check a --ref and name its kind: "folder", "features", "stats", "stats+images" or "images"."""
    path = Path(ref)
    if not path.exists():
        raise FileNotFoundError(f"reference not found: {ref}")
    if path.is_dir():
        ImageSource(path)  # raises if the folder holds no images
        return "folder"
    if path.suffix != ".npz":
        raise ValueError(f"unknown reference format: {ref} (expected a folder of images or an .npz)")
    keys = npz_keys(path)
    if "feats" in keys:
        return "features"
    if {"mu", "sigma"} <= keys:
        return "stats+images" if "arr_0" in keys else "stats"
    if "arr_0" in keys:
        return "images"
    raise ValueError(f"unknown reference .npz: {ref} has {sorted(keys)}; expected feats, mu/sigma or arr_0")


def stats_pipeline(path):
    """The feature pipeline of a statistics .npz: its "pipeline" label; unlabelled, an ADM reference batch (arr_0 or
    mu_s/sigma_s beside mu/sigma) is the ADM evaluator's TF Inception, anything else clean-fid's custom stats (mode
    from clean-fid's file name {name}_{mode}_custom_na.npz, "clean" if it names none)."""
    keys = npz_keys(path)
    if "pipeline" in keys:
        with np.load(path) as z:
            return str(z["pipeline"])
    if "arr_0" in keys or {"mu_s", "sigma_s"} <= keys:
        return ADM_PIPELINE
    return "clean-fid/legacy_tensorflow" if "legacy_tensorflow" in Path(path).name else "clean-fid/clean"


def describe_pipeline(label, path=None):
    """A label with its provenance for error messages, e.g. 'clean-fid/legacy_tensorflow (ADM reference batch)'."""
    if path is not None and label == ADM_PIPELINE and "pipeline" not in npz_keys(path) and "arr_0" in npz_keys(path):
        return f"{label} (ADM reference batch: TF Inception)"
    return label


def check_pipelines(samples, reference, where="samples", ref_name="reference"):
    """Refuse (ValueError, one line naming both) to compare features of two different feature pipelines."""
    if samples is not None and reference is not None and samples.split(" (")[0] != reference.split(" (")[0]:
        raise ValueError(f"feature pipelines differ: {where} {samples}, {ref_name} {reference}; prepare both with one "
                         "pipeline (--pipeline / --features / --resize, and evaluate.py ref for the reference)")


def reference_pipeline(ref):
    """The pipeline label a --ref file carries (None: a folder/images, featurized here, or unlabelled features)."""
    kind = reference_kind(ref)
    if kind in ("stats", "stats+images"):
        return describe_pipeline(stats_pipeline(ref), ref)
    if kind == "features":
        return _read_features(ref)["pipeline"]
    return None


def reference_image_size(ref):
    """The resolution a --ref was made at: its image_size label, else an ADM reference batch's arr_0 side; None when
    it does not matter (a folder or bare arr_0 is centre-cropped to the samples' resolution) or cannot be known
    (unlabelled statistics or features)."""
    kind = reference_kind(ref)
    if kind in ("folder", "images"):
        return None
    if "image_size" in npz_keys(ref):
        with np.load(ref) as z:
            return int(z["image_size"])
    return int(npz_array_info(ref, "arr_0")[0][1]) if kind == "stats+images" else None


def check_reference_size(ref, image_size, where="samples"):
    """Refuse (ValueError, one line naming both) a --ref made at another image size than the samples; an unlabelled
    reference (made before references were labelled) is used with a warning, as its size cannot be known."""
    if image_size is None or reference_kind(ref) in ("folder", "images"):
        return
    theirs = reference_image_size(ref)
    if theirs is None:
        print(f"warning: reference {ref} carries no image_size label: cannot check it was made at the {where}' "
              f"{image_size}px (re-make it with `evaluate.py ref` to have it checked)", file=sys.stderr)
    elif theirs != image_size:
        raise ValueError(f"image sizes differ: {where} {image_size}px, reference {ref} {theirs}px; make the reference "
                         f"at the samples' resolution (evaluate.py ref --image-size {image_size})")


def source_pipeline(source, run_pipeline):
    """The pipeline label features of a samples source will carry: a features .npz's own, else this run's."""
    path = Path(source)
    if path.suffix == ".npz" and path.is_file() and "feats" in npz_keys(path):
        return _read_features(path)["pipeline"]
    return run_pipeline


def load_reference(ref, featurizer, image_size=None):
    """Reference {"mu", "sigma", "feats" (None for statistics only), "num", "pipeline"} from a --ref.

    Reference images (a folder, an arr_0) get the ADM centre crop to image_size (the samples' resolution) before the
    feature pipeline, as training images do; a folder without image_size is refused (see `evaluate.py ref`)."""
    kind = reference_kind(ref)
    check_reference_size(ref, image_size)
    if kind == "folder" and image_size is None:
        raise ValueError(f"reference folder {ref}: its images must be centre-cropped to the samples' resolution; "
                         "prepare it with `evaluate.py ref --data DIR --image-size N --out REF.npz`")
    pipeline = reference_pipeline(ref)
    if kind == "stats+images":  # its arr_0 is featurized here for precision/recall: one pipeline with its statistics
        check_pipelines(featurizer.pipeline, pipeline, "this run's features", f"reference {ref}")
    if kind in ("stats", "stats+images"):
        with np.load(ref) as z:
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
        # the ADM reference batch: precomputed statistics for FID, its 10K arr_0 images only for precision/recall
        feats = featurizer(ref, crop=image_size)["feats"] if kind == "stats+images" else None
        return {"mu": mu, "sigma": sigma, "feats": feats, "num": None if feats is None else len(feats),
                "pipeline": pipeline}
    out = featurizer(ref, crop=None if kind == "features" else image_size)
    mu, sigma = feature_statistics(out["feats"])
    return {"mu": mu, "sigma": sigma, "feats": out["feats"], "num": len(out["feats"]), "pipeline": out["pipeline"],
            "probs": out["probs"], "labels": out.get("labels")}


def write_reference(path, feats, probs, pipeline, image_size, **meta):
    """A reference .npz: features, their statistics, the labels every reference carries (the feature pipeline, which
    names the extractor, and the image size the images were made at) and how they were made (meta)."""
    mu, sigma = feature_statistics(feats)
    save_npz(path, feats=feats, probs=probs, mu=mu, sigma=sigma, pipeline=np.array(pipeline),
             image_size=np.array(int(image_size)), **{k: np.array(v) for k, v in meta.items() if v is not None})
    return path


def load_train_reference(path):
    """A run's training set for the memorization metrics (trainset.build, written by `python -m scoring.trainset`
    or evaluate.py --train-ref auto): {"feats", "pixels", "item_ids", "real_px_d1", ..., "pipeline"}, the
    arrays it lacks as None."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"training-set features not found: {path}")
    keys = npz_keys(path)
    if "item_ids" not in keys or not keys & {"feats", "pixels"}:
        raise ValueError(f"{path} is not a training-set .npz of this version (needs item_ids and feats or pixels; "
                         "write one with `python -m scoring.trainset` or evaluate.py --train-ref auto)")
    with np.load(path) as z:
        out = {k: z[k] if k in z.files else None for k in ("feats", "pixels", "item_ids", "real_px_d1", "real_px_d2",
                                                           "real_feat_d1", "real_feat_d2")}
        out["pipeline"] = str(z["pipeline"]) if "pipeline" in z.files else None
    return out


def check_train_reference_size(path, image_size, where="samples"):
    """Refuse (ValueError, one line naming both) a --train-ref of a run at another image size than the samples: its
    pixel distances would compare images of two resolutions. An unlabelled file is used with a warning."""
    with np.load(path) as z:                              # the label only, not the pixels (load_train_reference)
        theirs = int(z["image_size"]) if "image_size" in z.files else None
    if image_size is not None and theirs is None:
        print(f"warning: training set {path} carries no image_size label: cannot check it was made at the {where}' "
              f"{image_size}px (re-make it with `python -m scoring.trainset` to have it checked)", file=sys.stderr)
    elif image_size is not None and theirs != image_size:
        raise ValueError(f"image sizes differ: {where} {image_size}px, training set {path} {theirs}px; write it from "
                         f"the run that made the samples (python -m scoring.trainset --run RUN)")


# ---- evaluation ----


def min_samples(k=3, is_splits=10):
    """Fewest samples the statistics need: a covariance (2), k-NN balls (k + 1) and the IS splits."""
    return max(2, k + 1, is_splits)


def compute_metrics(sample, ref=None, k=3, is_splits=10, device="cpu", train_ref=None, num_classes=None,
                    mem_tau=None, mem_found=None):
    """Metrics of sample features {"feats", "probs", "labels", "images" (optional uint8 NHWC)} against a reference
    from load_reference (or IS only).

    With labels (the conditioned classes) and an extractor whose logits are the model's classes (the built-in judge:
    probs (N, num_classes)): class_acc, and diversity against the reference's labelled features. With train_ref
    (load_train_reference): the memorization columns (memorization.py; pixel-space ones when images are given,
    mem_tau with a threshold mem_tau; mem_found: memorization.search's result when the caller already ran it)."""
    feats, labels, probs = sample["feats"], sample.get("labels"), sample.get("probs")
    row = {"fid": None, "is_mean": None, "is_std": None, "precision": None, "recall": None, "class_acc": None,
           "diversity": None, "shape_iou_disc": None, "shape_iou_cross": None,   # set by evaluate.py (built-in data)
           **dict.fromkeys(memorization.COLUMNS),
           "num_samples": int(len(feats)), "num_ref": None if ref is None else ref["num"], "feature_dim": int(feats.shape[1])}
    if probs is not None:
        row["is_mean"], row["is_std"] = inception_score(probs, is_splits)
    judged = (labels is not None and probs is not None and (num_classes or probs.shape[1]) == probs.shape[1]
              and int(np.max(labels)) < probs.shape[1])
    if judged:  # the extractor classifies into the classes the samples were conditioned on
        row["class_acc"] = float((probs.argmax(1) == labels).mean())
    if train_ref is not None:
        check_pipelines(sample.get("pipeline"), train_ref.get("pipeline"), ref_name="training-set features")
        row.update(memorization.memorization_metrics(train_ref, feats, sample.get("images"), mem_tau, mem_found))
    if ref is not None:
        check_pipelines(sample.get("pipeline"), ref.get("pipeline"))
        if sample.get("pipeline") is None or ref.get("pipeline") is None:
            print("warning: unlabelled features (no 'pipeline' key): cannot check that samples and reference share "
                  "one feature pipeline", file=sys.stderr)
        if ref["mu"].shape[0] != feats.shape[1]:
            raise ValueError(f"feature sizes differ: samples {feats.shape[1]}-d, reference {ref['mu'].shape[0]}-d "
                             "(use the same extractor for both)")
        if feats.shape[0] <= feats.shape[1]:
            print(f"warning: {feats.shape[0]} samples <= {feats.shape[1]} dimensions: singular covariance, "
                  "FID is unreliable", file=sys.stderr)
        mu, sigma = feature_statistics(feats)
        row["fid"] = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
        if ref["feats"] is not None:
            row["precision"], row["recall"] = precision_recall(ref["feats"], feats, k=k, device=device)
        ref_labels = ref.get("labels")
        if ref_labels is None and judged and ref.get("probs") is not None:
            ref_labels = ref["probs"].argmax(1)  # real images: the judge's classes are ~100 % right
        if labels is not None and ref_labels is not None and ref["feats"] is not None:
            row["diversity"] = class_diversity(feats, labels, ref["feats"], ref_labels)
    return row


# ---- results ----

METRIC_COLUMNS = ["cfg_scale", "fid", "is_mean", "is_std", "precision", "recall", "class_acc", "diversity",
                  "shape_iou_disc", "shape_iou_cross",
                  *memorization.COLUMNS, "num_samples", "num_ref", "feature_dim"]


def write_results(rows, out_dir):
    """Write rows (one per guidance scale) to OUT/results.json and OUT/results.csv, atomically; returns both paths.
    results.json also carries OUT/provenance.json (plumbing/provenance.py: the code and machine that measured), when
    there is one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "results.json", out / "results.csv"
    record = {"rows": rows}
    try:
        record["provenance"] = json.loads((out / "provenance.json").read_text())
    except (OSError, ValueError):       # none, or unreadable: the results still count, without their provenance
        pass
    with atomic_open(json_path, "w") as f:
        f.write(json.dumps(record, indent=2) + "\n")
    columns = METRIC_COLUMNS + sorted({key for row in rows for key in row} - set(METRIC_COLUMNS))
    with atomic_open(csv_path, "w", newline="") as f:       # csv writes its own line ends
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{c: "" if row.get(c) is None else row.get(c) for c in columns} for row in rows])
    return json_path, csv_path


def read_results(path):
    """Rows of a results.json (ours: {"rows": [...]}, or a bare list)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not a results.json: {path} ({e})") from None
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"not a results.json: {path} (expected a list of rows)")
    return rows


def plot_fid_is(runs, path):
    """Overlay runs {name: rows}: FID against IS (and precision against recall when measured), one point per scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def points(rows, x, y):
        rows = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
        return sorted(rows, key=lambda r: (r.get("cfg_scale") is None, r.get("cfg_scale") or 0))

    panels = [("is_mean", "fid", "Inception Score", "FID"), ("recall", "precision", "Recall", "Precision")]
    panels = [p for p in panels if any(points(rows, p[0], p[1]) for rows in runs.values())]
    if not panels:
        raise ValueError("nothing to plot: no run has FID and IS (or precision and recall)")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (x, y, xlabel, ylabel) in zip(axes[0], panels):
        for name, rows in runs.items():
            pts = points(rows, x, y)
            if not pts:
                continue
            ax.plot([r[x] for r in pts], [r[y] for r in pts], "o-", label=name)
            for r in pts:  # label each point with its guidance scale
                if r.get("cfg_scale") is not None:
                    ax.annotate(f"{r['cfg_scale']:g}", (r[x], r[y]), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
