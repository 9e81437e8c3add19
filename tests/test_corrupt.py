"""Tests for corrupt.py: exact counts, never the same class, prior-following flips, swaps, manifest, CLI errors."""

import ast
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import corrupt
from corrupt import (apply_manifest, corrupt_batch, corrupt_labels, load_manifest, load_rewrites, make_manifest,
                     rewrite_captions, sample_rewrites, save_manifest, swap_captions)

SKEWED_PRIOR = np.array([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])


def _skewed_labels(n, seed=123):
    """n labels with exactly the skewed class frequencies, in random order."""
    counts = np.round(SKEWED_PRIOR * n).astype(int)
    counts[0] += n - counts.sum()
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))


def _transition_chi2(old, new, num_classes, model):
    """Chi-square p-value of observed (old -> new) counts against model(y) = target probabilities for class y."""
    stat, dof = 0.0, 0
    for y in range(num_classes):
        targets = new[old == y]
        if len(targets) == 0:
            continue
        probs = model(y)  # (C,), zero at y
        observed = np.bincount(targets, minlength=num_classes)
        support = probs > 0
        assert observed[~support].sum() == 0  # nothing lands where the model forbids it
        expected = len(targets) * probs[support]
        stat += (((observed[support] - expected) ** 2) / expected).sum()
        dof += support.sum() - 1
    return stats.chi2.sf(stat, dof)


# ---- symmetric ----

def test_symmetric_5_percent_of_100k_flips_exactly_5000_following_the_prior():
    labels = _skewed_labels(100_000)
    new, idx = corrupt_labels(labels, 0.05, seed=0)
    assert len(idx) == 5000 and len(np.unique(idx)) == 5000 and np.all(np.diff(idx) > 0)
    assert np.all(new[idx] != labels[idx])  # never to its own class
    keep = np.ones(len(labels), bool)
    keep[idx] = False
    assert np.array_equal(new[keep], labels[keep])  # nothing else changed
    counts = np.bincount(labels)
    old, flipped = labels[idx], new[idx]

    def prior_without(y):  # the empirical prior restricted to classes != y
        p = counts / (len(labels) - counts[y])
        p[y] = 0
        return p

    def uniform_others(y):  # the wrong model, to show the test can tell them apart
        p = np.full(len(counts), 1 / (len(counts) - 1))
        p[y] = 0
        return p

    assert _transition_chi2(old, flipped, len(counts), prior_without) > 1e-3
    assert _transition_chi2(old, flipped, len(counts), uniform_others) < 1e-6


def test_symmetric_selection_is_uniform_over_samples():
    labels = _skewed_labels(50_000, seed=5)
    _, idx = corrupt_labels(labels, 0.2, seed=1)  # 10,000 chosen
    # per class: chosen in proportion to class size
    chosen = np.bincount(labels[idx], minlength=6)
    expected = len(idx) * np.bincount(labels) / len(labels)
    assert stats.chisquare(chosen, expected).pvalue > 1e-3
    # per position: no part of the dataset is favoured
    assert stats.chisquare(np.bincount(idx * 10 // len(labels), minlength=10)).pvalue > 1e-3


def test_empty_classes_are_never_targets_and_num_classes_only_bounds():
    labels = np.array([0, 1, 1, 2, 2, 2, 5, 5] * 500)
    a, ia = corrupt_labels(labels, 0.3, seed=2)
    b, ib = corrupt_labels(labels, 0.3, num_classes=10, seed=2)
    assert np.array_equal(a, b) and np.array_equal(ia, ib)
    assert set(np.unique(a)) <= {0, 1, 2, 5}


def test_exact_count_is_round_ratio_n():
    for n, ratio in [(7, 0.5), (10, 0.25), (1001, 0.075), (3, 0.0)]:
        labels = np.arange(n) % 3
        _, idx = corrupt_labels(labels, ratio, seed=0)
        assert len(idx) == round(ratio * n)


def test_determinism_and_input_types():
    labels = _skewed_labels(5000)
    a = corrupt_labels(labels, 0.1, seed=3)
    b = corrupt_labels(labels.astype(np.int32).tolist(), 0.1, seed=3)
    c = corrupt_labels(labels, 0.1, seed=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(labels=[0, 1, 2], ratio=1.0), "ratio"),
    (dict(labels=[0, 1, 2], ratio=-0.1), "ratio"),
    (dict(labels=[0, 1, 2], ratio=float("nan")), "ratio"),
    (dict(labels=[], ratio=0.1), "empty"),
    (dict(labels=[0.0, 1.0], ratio=0.1), "integers"),
    (dict(labels=[0, -1, 2], ratio=0.1), ">= 0"),
    (dict(labels=[0, 0, 0, 0], ratio=0.5), "2 classes"),
    (dict(labels=[0, 0, 0, 0], ratio=0.5, num_classes=1), "2 classes"),
    (dict(labels=[0, 1, 7], ratio=0.5, num_classes=5), "label 7"),
    (dict(labels=[0, 1, 2], ratio=0.5, kind="pairflip"), "pairflip"),
    (dict(labels=[0, 1, 2], ratio=0.5, seed=-1), "seed"),
    (dict(labels=[0, 1, 2], ratio=0.5, classes=[0, 1]), "asymmetric"),
])
def test_label_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        corrupt_labels(**kwargs)


# ---- asymmetric ----

def test_asymmetric_flips_only_inside_the_class_set_uniformly():
    labels = np.random.default_rng(0).integers(0, 10, 20_000)
    classes = [2, 5, 7]
    new, idx = corrupt_labels(labels, 0.1, kind="asymmetric", classes=classes, seed=0)
    assert len(idx) == 2000  # a fraction of the whole dataset
    assert np.isin(labels[idx], classes).all() and np.isin(new[idx], classes).all()
    assert np.all(new[idx] != labels[idx])
    keep = np.ones(len(labels), bool)
    keep[idx] = False
    assert np.array_equal(new[keep], labels[keep])

    def others_in_set(y):
        p = np.zeros(10)
        p[[c for c in classes if c != y]] = 0.5
        return p

    assert _transition_chi2(labels[idx], new[idx], 10, others_in_set) > 1e-3


def test_asymmetric_target_may_be_absent_from_labels():
    labels = np.array([0, 1] * 50)
    new, idx = corrupt_labels(labels, 0.5, kind="asymmetric", classes=[0, 1, 5], seed=0)
    assert 5 in new[idx]


@pytest.mark.parametrize("classes, ratio, message", [
    ([2, 5], 0.5, "only"),  # ~20% eligible cannot give 50%
    (None, 0.1, "needs classes"),
    ([3], 0.1, "at least 2"),
    ([2, 2, 5], 0.1, "duplicates"),
    ([-1, 2], 0.1, ">= 0"),
    ([2, 99], 0.1, "99"),
])
def test_asymmetric_errors(classes, ratio, message):
    labels = np.arange(1000) % 10
    with pytest.raises(ValueError, match=message):
        corrupt_labels(labels, ratio, num_classes=10, kind="asymmetric", classes=classes)


# ---- per-step random flips ----

def test_corrupt_batch_exact_count_prior_targets_and_asymmetric_set():
    counts = np.array([5000, 3000, 1500, 500])                       # the dataset's (skewed) class prior
    labels = np.random.default_rng(1).integers(0, 4, 20_000)
    new, idx = corrupt_batch(labels, 0.1, counts, rng=np.random.default_rng(0))
    assert len(idx) == 2000 and np.sum(new != labels) == 2000       # exactly round(ratio * B), never its own class

    def prior_others(y):
        p = counts.astype(float)
        p[y] = 0
        return p / p.sum()

    assert _transition_chi2(labels[idx], new[idx], 4, prior_others) > 1e-3
    assert np.array_equal(new, corrupt_batch(labels, 0.1, counts, rng=np.random.default_rng(0))[0])
    asym, aidx = corrupt_batch(labels, 0.1, counts, "asymmetric", [1, 3], rng=5)
    assert len(aidx) == 2000 and set(labels[aidx]) <= {1, 3} and np.all(asym[aidx] == 4 - labels[aidx])
    few = np.array([0, 0, 1, 2, 2, 2, 2, 2])                         # 1 eligible item, round(0.5 * 8) = 4 asked
    assert corrupt_batch(few, 0.5, counts, "asymmetric", [1, 3], rng=0)[0].tolist() == [0, 0, 3, 2, 2, 2, 2, 2]
    assert len(corrupt_batch(labels, 0.0, counts, rng=0)[1]) == 0
    with pytest.raises(ValueError, match="label"):
        corrupt_batch(labels, 0.1, counts[:3], rng=0)


# ---- captions ----

def _permutation(old, new):
    """For distinct captions: perm[i] = the sample whose caption i now carries."""
    where = {c: i for i, c in enumerate(old)}
    return np.array([where[c] for c in new])


def _cycle_lengths(perm):
    seen, lengths = set(), []
    for start in range(len(perm)):
        if start in seen or perm[start] == start:
            continue
        j, length = start, 0
        while j not in seen:
            seen.add(j)
            j, length = perm[j], length + 1
        lengths.append(length)
    return sorted(lengths)


@pytest.mark.parametrize("ratio, k, cycles", [(0.1, 100, [2] * 50), (0.101, 101, [2] * 49 + [3]), (0.003, 3, [3])])
def test_swap_exact_count_pairs_and_one_three_cycle(ratio, k, cycles):
    captions = [f"caption {i}" for i in range(1000)]
    new, idx = swap_captions(captions, ratio, seed=0)
    assert len(idx) == k and np.all(np.diff(idx) > 0)
    changed = [i for i in range(1000) if new[i] != captions[i]]
    assert changed == idx.tolist()
    assert Counter(new) == Counter(captions)
    assert _cycle_lengths(_permutation(captions, new)) == cycles


def test_swap_with_duplicates_counts_only_real_changes():
    captions = ["a dog"] * 500 + ["a cat"] * 300 + ["a car"] * 200
    for ratio in (0.3, 0.301):
        new, idx = swap_captions(captions, ratio, seed=1)
        changed = [i for i in range(len(captions)) if new[i] != captions[i]]
        assert changed == idx.tolist() and len(idx) == round(ratio * len(captions))
        assert Counter(new) == Counter(captions)


def test_swap_determinism():
    captions = [f"c{i}" for i in range(200)]
    a, b, c = (swap_captions(captions, 0.2, seed=s) for s in (4, 4, 5))
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[0] != c[0]


@pytest.mark.parametrize("captions, ratio, message", [
    ([f"c{i}" for i in range(20)], 0.05, "1 corrupted"),
    (["same"] * 100, 0.1, "duplicate"),
    (["a", "b"] * 50, 0.03, "3 distinct"),
    ([], 0.1, "empty"),
    (["a", 3], 0.1, "not a string"),
    (["a", "b"], 1.0, "ratio"),
])
def test_swap_errors(captions, ratio, message):
    with pytest.raises(ValueError, match=message):
        swap_captions(captions, ratio)


def test_rewrite_applies_and_validates():
    captions = ["a dog", "a cat", "a car", "a tree"]
    new, idx = rewrite_captions(captions, {2: "a bus", "0": "a wolf"})
    assert new == ["a wolf", "a cat", "a bus", "a tree"] and idx.tolist() == [0, 2]
    for rewrites, message in [({4: "x"}, "out of range"), ({"-1": "x"}, "non-negative"), ({True: "x"}, "integer"),
                              ({1: "a cat"}, "equals the original"), ({1: None}, "not a string"),
                              ([(1, "x"), (1, "y")], "twice")]:
        with pytest.raises(ValueError, match=message):
            rewrite_captions(captions, rewrites)


def test_sample_rewrites_draws_exactly_round_ratio_n_reproducibly():
    pool = {str(i): f"rewrite {i}" for i in range(0, 1000, 4)}                  # 250 rewrites for N = 1000 captions
    picked = sample_rewrites(pool, 0.05, 1000, seed=3)
    assert len(picked) == 50 and all(pool[k] == v for k, v in picked.items())
    assert picked == sample_rewrites(dict(reversed(list(pool.items()))), 0.05, 1000, seed=3)   # key order is irrelevant
    assert picked != sample_rewrites(pool, 0.05, 1000, seed=4)
    assert sample_rewrites(pool, 0.0, 1000) == dict(sorted(pool.items(), key=lambda kv: int(kv[0])))   # 0 = all
    with pytest.raises(ValueError, match="asks for 500 rewrites but the table has 250"):
        sample_rewrites(pool, 0.5, 1000)


def test_load_rewrites_errors(tmp_path):
    (tmp_path / "ok.json").write_text(json.dumps({"1": "x"}))
    assert load_rewrites(tmp_path / "ok.json") == {"1": "x"}
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_rewrites(tmp_path / "nope.json")
    for text, message in [("{", "not valid JSON"), ("[1]", "non-empty JSON object"), ("{}", "non-empty")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_rewrites(tmp_path / "bad.json")


# ---- manifest ----

def test_manifest_round_trip_and_reapply(tmp_path):
    labels = _skewed_labels(3000)
    new, idx = corrupt_labels(labels, 0.05, seed=9)
    manifest = make_manifest("symmetric", 0.05, 9, labels, new, idx, num_classes=None)
    assert manifest["n"] == 3000 and manifest["indices"] == idx.tolist()
    assert manifest["old"] == labels[idx].tolist() and manifest["new"] == new[idx].tolist()
    path = tmp_path / "m.json"
    save_manifest(path, manifest)
    loaded = load_manifest(path)
    assert loaded == manifest
    assert np.array_equal(apply_manifest(labels, loaded), new)
    # the record carries what is needed to recompute it
    again, _ = corrupt_labels(labels, loaded["ratio"], seed=loaded["seed"], **loaded["params"])
    assert np.array_equal(again, new)
    with pytest.raises(ValueError, match="recorded"):
        apply_manifest(np.roll(labels, 1), loaded)
    with pytest.raises(ValueError, match="3000"):
        apply_manifest(labels[:-1], loaded)


def test_caption_manifest_keeps_unicode(tmp_path):
    captions = ["un chat très mignon", "ein Hund", "猫", "a tree 🌳"]
    new, idx = swap_captions(captions, 0.5, seed=0)
    save_manifest(tmp_path / "c.json", make_manifest("swap", 0.5, 0, captions, new, idx))
    assert apply_manifest(captions, load_manifest(tmp_path / "c.json")) == new


def test_make_manifest_checks_idx():
    with pytest.raises(ValueError, match="exactly the samples"):
        make_manifest("symmetric", 0.5, 0, [0, 1, 2, 3], [1, 1, 2, 0], [0])


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("indices"), "missing keys"),
    (lambda m: m.update(format="other"), "not a"),
    (lambda m: m.update(kind="pairflip"), "kind"),
    (lambda m: m.update(ratio=1.5), "ratio"),
    (lambda m: m.update(n=0), "positive"),
    (lambda m: m.update(indices=m["indices"][::-1]), "increasing"),
    (lambda m: m.update(indices=m["indices"][:-1] + [99]), "increasing"),
    (lambda m: m.update(new=m["old"]), "equal old and new"),
    (lambda m: m.update(new=[True] * len(m["new"])), "must be int"),
    (lambda m: m.update(num_corrupted=1), "disagree"),
    (lambda m: m.update(ratio=0.3), "round"),
])
def test_load_manifest_rejects_bad_files(tmp_path, edit, message):
    labels = np.arange(20) % 4
    new, idx = corrupt_labels(labels, 0.2, seed=0)
    manifest = make_manifest("symmetric", 0.2, 0, labels, new, idx)
    edit(manifest)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message):
        load_manifest(path)


def test_load_manifest_missing_or_not_json(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_manifest(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(tmp_path / "broken.json")


# ---- command line ----

def _run(*args, cwd):
    return subprocess.run([sys.executable, str(Path(corrupt.__file__).resolve()), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_cli_labels_writes_output_and_manifest(tmp_path):
    labels = _skewed_labels(2000)
    (tmp_path / "labels.txt").write_text("".join(f"{v}\n" for v in labels))
    r = _run("labels.txt", "--ratio", "0.05", "--kind", "symmetric", "--seed", "0", "-o", "out.txt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = np.array([int(s) for s in (tmp_path / "out.txt").read_text().split()])
    expected, idx = corrupt_labels(labels, 0.05, seed=0)
    assert np.array_equal(out, expected)
    manifest = load_manifest(tmp_path / "out.txt.manifest.json")
    assert manifest["indices"] == idx.tolist() and manifest["kind"] == "symmetric"


def test_cli_asymmetric_swap_and_rewrite(tmp_path):
    (tmp_path / "labels.txt").write_text("".join(f"{i % 10}\n" for i in range(1000)))
    r = _run("labels.txt", "--ratio", "0.1", "--kind", "asymmetric", "--classes", "1,4,8", "--num-classes", "10",
             "-o", "asym.txt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "asym.txt.manifest.json")
    assert len(m["indices"]) == 100 and set(m["new"]) <= {1, 4, 8} and m["params"]["classes"] == [1, 4, 8]

    captions = [f"photo number {i}" for i in range(100)]
    (tmp_path / "caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    r = _run("caps.txt", "--captions", "--ratio", "0.05", "--seed", "2", "-o", "swapped.txt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "swapped.txt").read_text().splitlines() == swap_captions(captions, 0.05, seed=2)[0]

    (tmp_path / "rw.json").write_text(json.dumps({"3": "a painting of a boat"}))
    r = _run("caps.txt", "--captions", "--kind", "rewrite", "--rewrites", "rw.json", "-o", "rw.txt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rw.txt").read_text().splitlines()[3] == "a painting of a boat"
    assert load_manifest(tmp_path / "rw.txt.manifest.json")["indices"] == [3]

    pool = {str(i): f"a painting of photo {i}" for i in range(0, 100, 2)}      # --ratio draws 5 of these 50
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    r = _run("caps.txt", "--captions", "--kind", "rewrite", "--rewrites", "pool.json", "--ratio", "0.05", "--seed", "1",
             "-o", "rw5.txt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "rw5.txt.manifest.json")
    assert m["indices"] == sorted(int(k) for k in sample_rewrites(pool, 0.05, 100, seed=1)) and m["seed"] == 1


def _run_in_process(args, cwd, capsys, monkeypatch):
    """corrupt.main in this process (a subprocess per case would cost ~0.5 s each): -> (exit code, stderr)."""
    monkeypatch.chdir(cwd)
    try:
        code = corrupt.main([str(a) for a in args])
    except SystemExit as e:  # argparse errors exit directly
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("content, args, message", [
    ("0\n1\n2\n", ["--ratio", "1.0"], "ratio"),
    ("0\n1\n2\n", ["--ratio", "-0.1"], "ratio"),
    ("0\n1\n2\n", ["--ratio", "abc"], "ratio"),
    ("", ["--ratio", "0.1"], "empty"),
    ("0\n1\ncat\n2\n", ["--ratio", "0.1"], "line 3"),
    ("4\n4\n4\n4\n", ["--ratio", "0.5"], "2 classes"),
    ("0\n1\n7\n", ["--ratio", "0.5", "--num-classes", "5"], "label 7"),
    ("0\n1\n2\n", ["--ratio", "0.5", "--kind", "swap"], "--captions"),
    ("0\n1\n2\n", ["--ratio", "0.5", "--kind", "asymmetric", "--classes", "1,x"], "--classes"),
    ("0\n1\n2\n", ["--ratio", "0.9", "--kind", "asymmetric", "--classes", "1,2"], "only"),
    ("0\n1\n2\n", ["--ratio", "0.5", "--classes", "1,2"], "asymmetric"),
    ("a\nb\n", ["--captions", "--ratio", "0.5", "--kind", "symmetric"], "--captions"),
    ("a\nb\n", ["--captions", "--kind", "swap"], "--ratio"),
    ("a\nb\n", ["--captions", "--kind", "rewrite", "--rewrites", "missing.json"], "missing.json"),
    (b"caf\xe9\n", ["--captions", "--ratio", "0.5"], "in.txt is not UTF-8"),
    (None, ["--ratio", "0.1"], "not found"),
])
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, content, args, message):
    if isinstance(content, bytes):
        (tmp_path / "in.txt").write_bytes(content)
    elif content is not None:
        (tmp_path / "in.txt").write_text(content)
    (tmp_path / "out.txt").write_text("keep me\n")  # an existing output must survive a failed run
    code, err = _run_in_process(["in.txt", *args, "-o", "out.txt"], tmp_path, capsys, monkeypatch)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("corrupt.py: error") and message in err, err
    assert (tmp_path / "out.txt").read_text() == "keep me\n"
    assert not (tmp_path / "out.txt.manifest.json").exists()
    expected = ["out.txt"] + (["in.txt"] if content is not None else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)


def test_cli_bad_input_in_a_real_process(tmp_path):
    """The same contract seen from outside: exit status 2, one stderr line, no traceback, nothing written."""
    (tmp_path / "in.txt").write_text("0\n1\nfoo\n")
    for args in (["--ratio", "0.1"], ["--ratio", "oops"]):  # our check, then argparse's
        r = _run("in.txt", *args, "-o", "out.txt", cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "out.txt").exists() and not (tmp_path / "out.txt.manifest.json").exists()


def test_cli_refuses_to_overwrite_its_input(tmp_path):
    (tmp_path / "labels.txt").write_text("0\n1\n2\n3\n")
    r = _run("labels.txt", "--ratio", "0.5", "-o", "labels.txt", cwd=tmp_path)
    assert r.returncode == 2 and "overwrite" in r.stderr
    assert (tmp_path / "labels.txt").read_text() == "0\n1\n2\n3\n"


def test_module_file_imports_only_numpy_and_stdlib():
    tree = ast.parse(Path(corrupt.__file__).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert roots - {"numpy"} <= sys.stdlib_module_names, roots
