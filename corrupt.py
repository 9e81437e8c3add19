"""
Static condition corruption: flip class labels or swap captions of a fraction of a dataset, reproducibly.

This is the data side of "Slight Corruption in Pre-training Data Makes Better Diffusion Models" (Chen et al.,
NeurIPS 2024, arXiv 2405.20494, Sec. 3.1 and App. B.1). The paper corrupts a fixed fraction eta of the training
pairs once, before training (eta in {2.5, 5, 7.5, 10, 15, 20}%; "slight" means eta <= 7.5%):

  symmetric   flip y to another class drawn from the dataset's class prior (ImageNet-1K labels)
  asymmetric  flip only samples of a chosen class set, into another class of that set
  swap        swap captions between random pairs (CC3M captions)
  rewrite     captions rewritten outside nanoCEP (the paper used GPT-4); a fraction eta of N drawn from them
              (sample_rewrites), applied and recorded here

Every corruption can be recorded in a JSON manifest (kind, ratio, seed, N, corrupted indices, old and new
values) so that a training run is reproducible and inspectable. The random stream is numpy's PCG64, so the same
seed gives the same result on every platform (for a given numpy version). Only numpy and the standard library
are used: copy this file into your own project.

Library use:

    from corrupt import corrupt_labels, make_manifest, save_manifest
    new_labels, idx = corrupt_labels(labels, ratio=0.05, kind="symmetric", seed=0)
    save_manifest("labels.manifest.json", make_manifest("symmetric", 0.05, 0, labels, new_labels, idx))

Command line (one label or caption per line; the manifest is written to OUT.manifest.json):

    python corrupt.py labels.txt --ratio 0.05 --kind symmetric --seed 0 -o labels_noisy.txt
    python corrupt.py labels.txt --ratio 0.05 --kind asymmetric --classes 3,8,42 -o labels_asym.txt
    python corrupt.py captions.txt --captions --ratio 0.05 --kind swap --seed 0 -o captions_noisy.txt
    python corrupt.py captions.txt --captions --kind rewrite --rewrites rewrites.json -o captions_rw.txt
    python corrupt.py captions.txt --captions --kind rewrite --rewrites rewrites.json --ratio 0.05 -o captions_rw.txt

(nanoCEP's own scripts share one copy of their file and CLI plumbing in plumbing/common.py; this file keeps its own small
atomic write and one-line argparse error on purpose, so that it stays a single copyable file.)
"""

import argparse
import json
import math
import numbers
import os
import sys

import numpy as np

LABEL_KINDS = ("symmetric", "asymmetric")
CAPTION_KINDS = ("swap", "rewrite")
MANIFEST_FORMAT = "nanocep.corruption"
MANIFEST_VERSION = 1


# ---- validation helpers ----

def _rng(seed):
    """PCG64 generator: a bit stream numpy keeps identical across platforms."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.Generator(np.random.PCG64(int(seed)))


def _check_ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    return float(ratio)


def _num_to_corrupt(ratio, n):
    """The exact number of corrupted samples: round(ratio * n), Python's round (half to even)."""
    return int(round(ratio * n))


def _num_in_expectation(ratio, n, rng):
    """floor(ratio * n), plus one with probability frac(ratio * n): a count whose mean is exactly ratio * n.

    A fixed round(ratio * n) per batch would train at another rate (B = 32: 0.01 flips nothing, 0.05 and 0.075 both
    flip 2 = 6.25 %). The coin is always drawn, so the stream of later draws does not depend on the ratio."""
    exact = ratio * n
    k = math.floor(exact)
    return int(k) + int(rng.random() < exact - k)


def _as_labels(labels, num_classes=None, min_classes=0):
    """Validate labels -> (int64 array (N,), num_classes); num_classes defaults to max(max label + 1, min_classes)."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("labels is empty")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        raise ValueError(f"labels must be >= 0, found {lo} at index {int(np.argmin(arr))}")
    if num_classes is None:
        num_classes = max(hi + 1, min_classes)
    elif isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ValueError(f"num_classes must be an integer, got {num_classes!r}")
    elif hi >= num_classes:
        raise ValueError(f"label {hi} at index {int(np.argmax(arr))} is out of range for num_classes={num_classes}")
    elif min_classes > num_classes:
        raise ValueError(f"class {min_classes - 1} is out of range for num_classes={num_classes}")
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes to flip labels, got num_classes={num_classes}")
    return arr, int(num_classes)


def _as_captions(captions):
    captions = list(captions)
    if not captions:
        raise ValueError("captions is empty")
    if not set(map(type, captions)) <= {str}:  # fast path in C; find the culprit only on failure
        i = next(i for i, c in enumerate(captions) if not isinstance(c, str))
        raise ValueError(f"caption {i} is not a string: {captions[i]!r}")
    return captions


# ---- label corruption ----

def corrupt_labels(labels, ratio, num_classes=None, kind="symmetric", classes=None, seed=0):
    """Flip exactly round(ratio*N) labels to another class; return (new_labels int64 (N,), sorted idx int64 (K,)).

    symmetric:  K samples are chosen uniformly without replacement; each new label follows the empirical class
                prior restricted to classes != y, i.e. P(c | y) = n_c / (N - n_y).
    asymmetric: K samples are chosen among those whose label is in `classes`; each flips to one of the other
                classes of `classes`, uniformly (the paper does not say how the target is drawn). `ratio` is a
                fraction of the whole dataset.
    num_classes defaults to max(label) + 1 and only bounds-checks here (the prior comes from the data).
    """
    if kind not in LABEL_KINDS:
        raise ValueError(f"kind must be one of {LABEL_KINDS}, got {kind!r}")
    ratio = _check_ratio(ratio)
    rng = _rng(seed)
    cls = _as_classes(classes) if kind == "asymmetric" else None
    # the class set widens the default range, so a class absent from the labels is still a legal target
    y, num_classes = _as_labels(labels, num_classes, min_classes=int(cls.max()) + 1 if cls is not None else 0)
    if kind == "symmetric" and classes is not None:
        raise ValueError("classes is only used with kind='asymmetric'")
    k = _num_to_corrupt(ratio, len(y))
    counts = np.bincount(y, minlength=num_classes)  # (C,) the prior symmetric targets follow
    if kind == "symmetric" and k > 0 and np.count_nonzero(counts) < 2:
        raise ValueError(f"symmetric flips need at least 2 classes present in labels, found only class {int(y[0])}")
    eligible = int(np.isin(y, cls).sum()) if kind == "asymmetric" else len(y)
    if k > eligible:
        raise ValueError(f"ratio {ratio} asks for {k} flips but only {eligible} samples have a label in classes")
    return _flip(y, k, kind, counts, cls, num_classes, rng)


def _flip(y, k, kind, counts, cls, num_classes, rng):
    """Flip k of the labels y (N,) (asymmetric: k of those in cls, or all of them if fewer) -> (new (N,), idx (K,))."""
    new = y.copy()
    if kind == "symmetric":
        idx = np.sort(rng.choice(len(y), size=k, replace=False)).astype(np.int64)  # (K,)
        new[idx] = _prior_other_class(y[idx], counts, rng)
        return new, idx
    eligible = np.flatnonzero(np.isin(y, cls))  # (E,)
    idx = np.sort(eligible[rng.choice(len(eligible), size=min(k, len(eligible)), replace=False)]).astype(np.int64)
    new[idx] = _other_in_set(y[idx], cls, num_classes, rng)
    return new, idx


def _prior_other_class(old, counts, rng):
    """Targets (K,) for labels old (K,): class c != y with probability n_c / (N - n_y), the prior `counts` (C,)
    restricted to the other classes."""
    # Draw a uniform random sample among the N - n_y samples of another class and take its label: that is
    # exactly the prior restricted to classes != y, with no rejection loop. Samples are laid out sorted by
    # class, so class c owns positions [ends[c] - n_c, ends[c]); we draw a position outside y's block.
    ends = np.cumsum(counts)  # (C,)
    starts = ends - counts
    pos = rng.integers(0, ends[-1] - counts[old])  # (K,) uniform in [0, N - n_y)
    pos = pos + counts[old] * (pos >= starts[old])  # skip over y's own block
    return np.searchsorted(ends, pos, side="right")


def _other_in_set(old, cls, num_classes, rng):
    """Targets (K,) for labels old (K,), all in cls: another class of cls, uniformly."""
    slot_of = np.full(num_classes, -1, dtype=np.int64)
    slot_of[cls] = np.arange(len(cls))
    slot = slot_of[old]  # (K,) position of y inside cls
    target = rng.integers(0, len(cls) - 1, size=len(old))  # (K,) uniform over the other len(cls) - 1 slots
    return cls[target + (target >= slot)]


def _as_classes(classes):
    """Validate the asymmetric class set -> int64 array (M,), M >= 2, distinct, non-negative."""
    if classes is None:
        raise ValueError("kind='asymmetric' needs classes (the class set flips stay inside)")
    cls = np.asarray(list(classes))
    if cls.ndim != 1 or (cls.size and cls.dtype.kind not in "iu"):
        raise ValueError(f"classes must be a list of integers, got {list(classes)!r}")
    cls = cls.astype(np.int64)
    if len(cls) < 2:
        raise ValueError(f"classes needs at least 2 classes to flip between, got {cls.tolist()}")
    if len(np.unique(cls)) != len(cls):
        raise ValueError(f"classes has duplicates: {cls.tolist()}")
    if cls.min() < 0:
        raise ValueError(f"classes must be >= 0, got {int(cls.min())}")
    return cls


def corrupt_batch(labels, ratio, class_counts, kind="symmetric", classes=None, rng=0):
    """Per-step corruption of one global batch ("random data corruption", paper Table 7) -> (new (B,), sorted idx (K,)).

    The static rule of corrupt_labels, re-drawn for every batch: ratio*B samples flip *in expectation* (floor(ratio*B),
    plus one with probability frac(ratio*B), so every ratio trains at its own rate whatever B is); symmetric targets
    follow the *dataset's* class prior `class_counts` (C,) restricted to classes != y (a batch is too small to be its
    own prior); asymmetric flips are chosen among the batch's samples whose label is in `classes` (all of them if the
    batch has fewer) and go to another class of `classes`, uniformly. `rng` is a numpy Generator
    or a seed: derive it from (seed, step) and pass the whole global batch, so 1 process and N processes agree.
    """
    if kind not in LABEL_KINDS:
        raise ValueError(f"kind must be one of {LABEL_KINDS}, got {kind!r}")
    ratio = _check_ratio(ratio)
    if not isinstance(rng, np.random.Generator):
        rng = _rng(rng)
    counts = np.asarray(class_counts)
    if counts.ndim != 1 or counts.dtype.kind not in "iu" or (counts.size and counts.min() < 0):
        raise ValueError("class_counts must be a 1-D array of non-negative integer counts (the dataset's class sizes)")
    cls = _as_classes(classes) if kind == "asymmetric" else None
    y, num_classes = _as_labels(labels, len(counts))
    if kind == "symmetric" and classes is not None:
        raise ValueError("classes is only used with kind='asymmetric'")
    if kind == "asymmetric" and int(cls.max()) >= num_classes:
        raise ValueError(f"class {int(cls.max())} is out of range for {num_classes} classes")
    k = _num_in_expectation(ratio, len(y), rng)
    if kind == "symmetric" and k > 0 and np.count_nonzero(counts) < 2:
        raise ValueError("symmetric flips need at least 2 classes with samples in class_counts")
    return _flip(y, k, kind, counts.astype(np.int64), cls, num_classes, rng)


# ---- caption corruption ----

def swap_captions(captions, ratio, seed=0):
    """Swap captions between random pairs until exactly round(ratio*N) samples carry another sample's caption.

    Returns (new_captions list, sorted idx int64). A pair only counts when its two captions differ, so duplicate
    captions never count as corrupted; an odd count uses one 3-cycle of three distinct captions. The multiset of
    captions is unchanged. Raises ValueError when the count is 1 (impossible) or duplicates leave too few pairs.
    """
    captions = _as_captions(captions)
    ratio = _check_ratio(ratio)
    rng = _rng(seed)
    n = len(captions)
    k = _num_to_corrupt(ratio, n)
    if k == 1:
        raise ValueError(f"ratio {ratio} of {n} captions asks for 1 corrupted caption; a swap changes at least 2")
    num_pairs = (k - 3) // 2 if k % 2 else k // 2
    pairs, triple = [], None
    # Walk a random order. `waiting` holds unmatched indices that all share one caption (an index with another
    # caption would have been matched at once), so pairing the next different caption is O(1) per step.
    order = rng.permutation(n).tolist() if k else []
    waiting, pos = [], 0
    while len(pairs) < num_pairs and pos < n:
        i = order[pos]
        pos += 1
        if waiting and captions[waiting[-1]] != captions[i]:
            pairs.append((waiting.pop(), i))
        else:
            waiting.append(i)
    if len(pairs) < num_pairs:
        raise ValueError(f"cannot corrupt {k} of {n} captions: too many duplicate captions to form distinct pairs")
    if k % 2:
        # a 3-cycle needs three pairwise different captions among the unused indices (waiting share one caption)
        pool = waiting[-1:] + order[pos:]
        a = pool[0] if pool else None
        b = next((j for j in pool if captions[j] != captions[a]), None) if pool else None
        c = None if b is None else next((j for j in pool if captions[j] not in (captions[a], captions[b])), None)
        if c is None:
            raise ValueError(f"cannot corrupt {k} of {n} captions: an odd count needs 3 distinct unused captions")
        triple = (a, b, c)
    new = list(captions)
    for a, b in pairs:
        new[a], new[b] = captions[b], captions[a]
    if triple is not None:
        a, b, c = triple
        new[a], new[b], new[c] = captions[b], captions[c], captions[a]  # a 3-cycle: nobody keeps its caption
    idx = np.sort(np.array([j for p in pairs for j in p] + list(triple or ()), dtype=np.int64))
    return new, idx


def rewrite_captions(captions, rewrites):
    """Apply externally produced rewrites {index: new caption} -> (new_captions list, sorted idx int64).

    Keys may be ints or decimal strings (as read back from JSON); every rewrite must be a string that differs
    from the original caption, otherwise it would not be a corruption.
    """
    captions = _as_captions(captions)
    items = rewrites.items() if hasattr(rewrites, "items") else rewrites
    new = list(captions)
    seen = set()
    for key, text in items:
        if isinstance(key, str) and key.strip().isdigit():
            i = int(key)
        elif isinstance(key, numbers.Integral) and not isinstance(key, bool):
            i = int(key)
        else:
            raise ValueError(f"rewrite index must be a non-negative integer, got {key!r}")
        if not 0 <= i < len(captions):
            raise ValueError(f"rewrite index {i} is out of range for {len(captions)} captions")
        if i in seen:
            raise ValueError(f"rewrite index {i} appears twice")
        if not isinstance(text, str):
            raise ValueError(f"rewrite for index {i} is not a string: {text!r}")
        if text == captions[i]:
            raise ValueError(f"rewrite for index {i} equals the original caption, so it would not corrupt it")
        seen.add(i)
        new[i] = text
    return new, np.array(sorted(seen), dtype=np.int64)


def load_rewrites(path):
    """Read a rewrites file, a JSON object {index: new caption} -> dict (ValueError / FileNotFoundError naming it)."""
    table = _read_json(path, "rewrites file")
    if not isinstance(table, dict) or not table:
        raise ValueError(f"rewrites file {path} must hold a non-empty JSON object {{index: caption}}")
    return table


def sample_rewrites(rewrites, ratio, n, seed=0):
    """round(ratio*n) of the rewrites {index: caption}, drawn without replacement by `seed`; all of them if ratio is 0.

    This is how a run corrupts exactly the fraction eta of N captions from a larger pool of rewrites. Entries are
    taken in numeric order of their index before drawing, so the result does not depend on the file's key order.
    """
    ratio = _check_ratio(ratio)
    items = sorted(rewrites.items(), key=lambda kv: (len(str(kv[0])), str(kv[0])))   # numeric order of the keys
    if ratio == 0:
        return dict(items)
    k = _num_to_corrupt(ratio, n)
    if k > len(items):
        raise ValueError(f"ratio {ratio} of {n} captions asks for {k} rewrites but the table has {len(items)}")
    pick = _rng(seed).choice(len(items), size=k, replace=False)
    return dict(items[i] for i in sorted(pick))


def corrupt_captions(captions, kind, ratio=0.0, seed=0, rewrites=None):
    """The caption corruption a run or the CLI asks for -> (new captions list, sorted idx int64, its manifest).

    swap:    swap_captions with `ratio` and `seed` (the paper's CC3M default).
    rewrite: the rewrites file `rewrites` (JSON {index: caption}); round(ratio * N) of its entries drawn with `seed`
             (sample_rewrites), or all of them when ratio is 0. The manifest records the measured ratio k / N.
    """
    captions = _as_captions(captions)
    if kind == "swap":
        new, idx = swap_captions(captions, ratio, seed=seed)
        return new, idx, make_manifest(kind, ratio, seed, captions, new, idx)
    if kind != "rewrite":
        raise ValueError(f"unknown caption corruption {kind!r} (expected one of {CAPTION_KINDS})")
    if not rewrites:
        raise ValueError("kind='rewrite' needs a rewrites file, a JSON object {index: rewritten caption}")
    new, idx = rewrite_captions(captions, sample_rewrites(load_rewrites(rewrites), ratio, len(captions), seed))
    if any(not c.strip() for c in new):
        raise ValueError(f"rewrites file {rewrites} holds an empty caption")
    manifest = make_manifest(kind, len(idx) / len(captions), seed if ratio else None, captions, new, idx,
                             rewrites=rewrites)
    return new, idx, manifest


# ---- manifest ----

def make_manifest(kind, ratio, seed, old_values, new_values, idx, **params):
    """Build the JSON-ready record of a corruption from the full old/new sequences and the corrupted indices.

    `params` holds what else is needed to reproduce it (e.g. num_classes, classes). Checks that exactly the
    samples in idx changed.
    """
    if kind in LABEL_KINDS:  # vectorised: a 1.28M-label dataset takes milliseconds, not a Python loop
        old_arr, new_arr = np.asarray(old_values), np.asarray(new_values)
        if old_arr.ndim != 1 or old_arr.shape != new_arr.shape:
            raise ValueError(f"old_values {old_arr.shape} and new_values {new_arr.shape} must be 1-D of equal length")
        changed = np.flatnonzero(old_arr != new_arr)
        old_changed, new_changed = old_arr[changed].tolist(), new_arr[changed].tolist()
        n = len(old_arr)
    else:
        old_values, new_values = list(old_values), list(new_values)
        if len(old_values) != len(new_values):
            raise ValueError(f"old_values has {len(old_values)} items but new_values has {len(new_values)}")
        changed = [i for i, (a, b) in enumerate(zip(old_values, new_values)) if a != b]
        old_changed, new_changed = [old_values[i] for i in changed], [new_values[i] for i in changed]
        n = len(old_values)
    changed = [int(i) for i in changed]
    idx = np.asarray(idx, dtype=np.int64).tolist()
    if idx != changed:
        raise ValueError("idx must list, sorted and once each, exactly the samples whose value changed")
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "kind": kind,
        "ratio": float(ratio),
        "seed": None if seed is None else int(seed),
        "n": n,
        "num_corrupted": len(changed),
        "params": {k: _plain(v) for k, v in params.items()},
        "indices": changed,
        "old": old_changed,
        "new": new_changed,
    }
    return validate_manifest(manifest)


def _plain(value):
    """numpy arrays/scalars -> JSON-friendly Python values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def validate_manifest(manifest):
    """Check a manifest's structure and consistency; return it unchanged or raise ValueError."""
    if not isinstance(manifest, dict):
        raise ValueError(f"manifest must be a JSON object, got {type(manifest).__name__}")
    required = ("format", "version", "kind", "ratio", "seed", "n", "num_corrupted", "params", "indices", "old", "new")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise ValueError(f"manifest is missing keys: {', '.join(missing)}")
    m = manifest
    if m["format"] != MANIFEST_FORMAT or m["version"] != MANIFEST_VERSION:
        raise ValueError(f"not a {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest: format={m['format']!r} "
                         f"version={m['version']!r}")
    if m["kind"] not in LABEL_KINDS + CAPTION_KINDS:
        raise ValueError(f"manifest kind must be one of {LABEL_KINDS + CAPTION_KINDS}, got {m['kind']!r}")
    if m["kind"] == "rewrite":  # its ratio is measured, k / n, and may be anything in [0, 1]
        if isinstance(m["ratio"], bool) or not isinstance(m["ratio"], (int, float)) or not 0 <= m["ratio"] <= 1:
            raise ValueError(f"manifest ratio must be in [0, 1], got {m['ratio']!r}")
    else:
        _check_ratio(m["ratio"])
    if m["seed"] is not None and (isinstance(m["seed"], bool) or not isinstance(m["seed"], int) or m["seed"] < 0):
        raise ValueError(f"manifest seed must be a non-negative integer or null, got {m['seed']!r}")
    n = m["n"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"manifest n must be a positive integer, got {n!r}")
    if not isinstance(m["params"], dict):
        raise ValueError("manifest params must be an object")
    idx, old, new = m["indices"], m["old"], m["new"]
    if not (isinstance(idx, list) and isinstance(old, list) and isinstance(new, list)):
        raise ValueError("manifest indices, old and new must be lists")
    if not len(idx) == len(old) == len(new) == m["num_corrupted"]:
        raise ValueError(f"manifest lengths disagree: num_corrupted={m['num_corrupted']!r}, indices={len(idx)}, "
                         f"old={len(old)}, new={len(new)}")
    if m["kind"] != "rewrite" and len(idx) != _num_to_corrupt(m["ratio"], n):
        raise ValueError(f"manifest has {len(idx)} corrupted samples but round(ratio * n) = "
                         f"{_num_to_corrupt(m['ratio'], n)}")
    value_type = int if m["kind"] in LABEL_KINDS else str
    prev = -1
    for i, a, b in zip(idx, old, new):
        if isinstance(i, bool) or not isinstance(i, int) or not prev < i < n:
            raise ValueError(f"manifest indices must be increasing integers in [0, {n}), found {i!r} after {prev}")
        for v in (a, b):
            if isinstance(v, bool) or not isinstance(v, value_type):
                raise ValueError(f"manifest value at index {i} must be {value_type.__name__}, got {v!r}")
        if a == b:
            raise ValueError(f"manifest index {i} has equal old and new values {a!r}")
        prev = i
    return manifest


def save_manifest(path, manifest):
    """Validate and write a manifest as UTF-8 JSON (one key per line, lists on one line), atomically."""
    validate_manifest(manifest)
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in manifest.items())
    _write_atomic(path, "{\n" + body + "\n}\n")


def load_manifest(path):
    """Read and validate a manifest written by save_manifest."""
    return validate_manifest(_read_json(path, "manifest"))


def _read_json(path, what):
    """A JSON file's content; a missing or malformed file is an error naming `what` and the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


def apply_manifest(values, manifest):
    """Re-apply a recorded corruption to the clean values (labels -> int64 array, captions -> list).

    Checks that N and every recorded old value match, so a manifest cannot silently be applied to other data.
    """
    validate_manifest(manifest)
    labels = manifest["kind"] in LABEL_KINDS
    new = np.asarray(values, dtype=np.int64).copy() if labels else list(values)
    if len(new) != manifest["n"]:
        raise ValueError(f"manifest is for {manifest['n']} samples, got {len(new)}")
    for i, a, b in zip(manifest["indices"], manifest["old"], manifest["new"]):
        if new[i] != a:
            raise ValueError(f"sample {i} is {_plain(new[i])!r} but the manifest recorded {a!r}: wrong data?")
        new[i] = b
    return new


# ---- command line ----

def _write_atomic(path, text):
    """Write text to a temp file beside path, then rename: a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_lines(path):
    """One value per line; a final newline does not add an empty entry."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"input file is empty: {path}")
    return lines


def _parse_labels(lines, path):
    labels = []
    for lineno, s in enumerate(lines, 1):
        try:
            labels.append(int(s.strip()))
        except ValueError:
            raise ValueError(f"{path} line {lineno}: {s!r} is not an integer label") from None
    return np.array(labels, dtype=np.int64)


def _parse_classes(text):
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated integers, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (argparse would also print the usage)
        sys.stderr.write(f"corrupt.py: error: {message}\n")
        sys.exit(2)


def _corrupt_lines(lines, kind, args):
    """The CLI's corruption of the input lines -> (old, new, idx, output text, manifest)."""
    if args.captions:
        new, idx, manifest = corrupt_captions(lines, kind, args.ratio or 0.0, args.seed, args.rewrites)
        if any("\n" in c or "\r" in c for c in new):
            raise ValueError("a rewritten caption contains a line break; captions are one per line")
        return lines, new, idx, "".join(c + "\n" for c in new), manifest
    old = _parse_labels(lines, args.input)
    classes = _parse_classes(args.classes) if args.classes is not None else None
    new, idx = corrupt_labels(old, args.ratio, num_classes=args.num_classes, kind=kind, classes=classes,
                              seed=args.seed)
    params = {"num_classes": args.num_classes}  # exactly the arguments that reproduce it
    if classes is not None:
        params["classes"] = classes
    manifest = make_manifest(kind, args.ratio, args.seed, old, new, idx, **params)
    return old, new, idx, "".join(f"{v}\n" for v in new.tolist()), manifest


def main(argv=None):
    p = _Parser(description="Corrupt a fixed fraction of labels or captions (one per line) and write a manifest.")
    p.add_argument("input", help="labels.txt (one integer label per line) or captions.txt with --captions")
    p.add_argument("-o", "--output", required=True, help="output file; the manifest goes to OUTPUT.manifest.json")
    p.add_argument("--ratio", type=float, help="fraction of samples to corrupt, in [0, 1) (rewrite: draws that "
                   "fraction of N among the rewrites; default all of them)")
    p.add_argument("--kind", choices=LABEL_KINDS + CAPTION_KINDS,
                   help="default: symmetric for labels, swap for captions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions", action="store_true", help="the input holds captions, not labels")
    p.add_argument("--classes", help="asymmetric: comma-separated class ids that flip among themselves")
    p.add_argument("--num-classes", type=int, help="number of classes (default: max label + 1)")
    p.add_argument("--rewrites", help="rewrite: JSON object {index: new caption}")
    args = p.parse_args(argv)
    kind = args.kind or ("swap" if args.captions else "symmetric")
    manifest_path = args.output + ".manifest.json"
    try:
        if args.captions != (kind in CAPTION_KINDS):
            raise ValueError(f"--kind {kind} is for {'captions' if kind in CAPTION_KINDS else 'labels'}; "
                             f"{'add' if kind in CAPTION_KINDS else 'drop'} --captions")
        if os.path.abspath(args.output) == os.path.abspath(args.input):
            raise ValueError("output would overwrite the input file; pick another -o")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise ValueError(f"output folder does not exist: {os.path.dirname(args.output)}")
        if kind != "rewrite" and args.ratio is None:
            raise ValueError(f"--kind {kind} needs --ratio")
        if kind == "rewrite" and args.rewrites is None:
            raise ValueError("--kind rewrite needs --rewrites FILE.json")
        if args.classes is not None and kind != "asymmetric":
            raise ValueError("--classes is only used with --kind asymmetric")
        old, new, idx, text, manifest = _corrupt_lines(_read_lines(args.input), kind, args)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        sys.stderr.write(f"corrupt.py: error: {e}\n")
        return 2
    save_manifest(manifest_path, manifest)
    _write_atomic(args.output, text)
    what = "captions" if args.captions else "labels"
    print(f"corrupted {len(idx)}/{len(old)} {what} ({kind}, ratio {manifest['ratio']:g}, seed {manifest['seed']}) -> "
          f"{args.output}, {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
