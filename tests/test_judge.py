"""Tests for judge.py and the judge metrics in metrics.py/evaluate.py: class accuracy, Fréchet distance, memorization
and diversity on real built-in images (a small judge built once, ~10 s); determinism; the CLIs end to end; bad input."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate as ev
from scoring import judge
from scoring import metrics, trainset

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_images=3000, steps=250, width=8)  # the default recipe, smaller: still ~100 % on held-out images


@pytest.fixture(scope="module")
def small_judge(tmp_path_factory):
    return judge.build(judge.JudgeConfig(**SMALL), tmp_path_factory.mktemp("judge") / "judge.pt", progress=False)


@pytest.fixture(scope="module")
def net(small_judge):
    return judge.load(small_judge)


def features(net, num, seed, flips=None):
    """{"feats", "probs", "labels"} of fresh real images, as evaluate.py's feature pass would give them."""
    imgs, labels = judge.render_images(16, num, seed, flips)
    out = metrics.extract_features(imgs, net, batch_size=250, resize="none")
    return {**out, "labels": labels, "images": imgs}


def test_real_images_score_full_accuracy_and_near_zero_frechet_distance(net):
    a, b = features(net, 1000, 77), features(net, 1000, 78)
    row = metrics.compute_metrics(a, None, num_classes=10)
    assert row["class_acc"] >= 0.98
    fd_real = metrics.frechet_distance(*metrics.feature_statistics(a["feats"]), *metrics.feature_statistics(b["feats"]))
    # the same images with their shapes' colours dimmed by a third: a visible change must move the distance a lot
    dim = (b["images"].astype(np.float32) * 0.67).astype(np.uint8)
    f_dim = metrics.extract_features(dim, net, resize="none")["feats"]
    fd_dim = metrics.frechet_distance(*metrics.feature_statistics(a["feats"]), *metrics.feature_statistics(f_dim))
    spread = np.trace(np.cov(a["feats"], rowvar=False))
    assert fd_real < 0.05 * spread and fd_real < 0.2 * fd_dim


def test_shuffled_labels_score_chance_accuracy(net):
    s = features(net, 1000, 79)
    s["labels"] = np.random.default_rng(0).permutation(s["labels"])
    acc = metrics.compute_metrics(s, None, num_classes=10)["class_acc"]
    assert abs(acc - 0.1) < 0.05  # 1000 draws: std 0.0095


def test_class_accuracy_is_only_reported_for_a_judge_of_the_models_classes(net):
    s = features(net, 20, 80)
    assert metrics.compute_metrics(s, None, num_classes=1000)["class_acc"] is None  # e.g. Inception on ImageNet
    assert metrics.compute_metrics({**s, "labels": None}, None)["class_acc"] is None


def test_copies_of_training_items_are_memorized_and_fresh_images_are_not(small_judge, net):
    """The ratio test in judge features: copies (slightly noisy, half mirrored) 1, fresh real images ~ 0, at two
    training-set sizes."""
    from scoring import memorization as mem
    rng = np.random.default_rng(1)
    for length in (50, 500):
        tr = trainset.build({"data": "builtin", "image_size": 16, "builtin_length": length, "seed": 5},
                            featurize=lambda images: judge.judge_images(net, images)[0], num_fresh=300)
        assert tr["feats"].shape[0] == 2 * length and np.median(tr["real_feat_d1"]) > 0
        k = min(length, 200)
        imgs, _ = judge.render_images(16, k, seed=5, flips=np.arange(k) % 2 == 1)     # copies, half of them mirrored
        noisy = np.clip(imgs + rng.integers(-2, 3, imgs.shape), 0, 255).astype(np.uint8)

        def rate(images):
            feats = metrics.extract_features(images, net, resize="none")["feats"]
            return mem.ratio_memorized(*mem.item_distances(feats, tr["feats"], tr["item_ids"], normalize=True))
        assert rate(noisy) >= 0.95 and mem.ratio_memorized(tr["real_feat_d1"], tr["real_feat_d2"]) <= 0.02


def test_diversity_is_one_for_real_images_and_small_for_collapsed_samples(net):
    ref, s = features(net, 1000, 82), features(net, 500, 83)
    assert 0.9 < metrics.class_diversity(s["feats"], s["labels"], ref["feats"], ref["labels"]) < 1.1
    collapsed = s["feats"][np.arange(500) % 10 + 10 * (np.arange(500) % 2)]  # two images per class, repeated
    assert metrics.class_diversity(collapsed, s["labels"], ref["feats"], ref["labels"]) < 0.5


def test_build_is_deterministic_and_keyed_by_its_settings(tmp_path):
    cfg = judge.JudgeConfig(num_images=200, steps=3, width=4)
    a, b = (judge.train_judge(cfg, progress=False).state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cfg.key() != judge.JudgeConfig(num_images=200, steps=4, width=4).key()
    assert judge.default_path(16) != judge.default_path(32)


def write_judge_refs(small_judge, folder, num, length, flip):
    """folder/ref.npz (`judge.py ref`, num fresh images) and folder/train.npz (`scoring.trainset` of a built-in run
    of `length` items, seed 3, written as folder/run/config.json, through the judge)."""
    assert judge.main(["ref", "--num", str(num), "--judge", str(small_judge), "--out", str(folder / "ref.npz")]) == 0
    (folder / "run").mkdir()
    (folder / "run" / "config.json").write_text(json.dumps({"data": "builtin", "image_size": 16,
                                                            "builtin_length": length, "seed": 3, "flip": flip}))
    assert trainset.main(["--run", str(folder / "run"), "--features", str(small_judge), "--num-fresh", "500",
                          "--out", str(folder / "train.npz")]) == 0


def test_evaluate_metrics_cli_writes_the_judge_columns(small_judge, net, tmp_path):
    sample = features(net, 300, 84)
    metrics.save_npz(tmp_path / "samples.npz", feats=sample["feats"], probs=sample["probs"], labels=sample["labels"])
    write_judge_refs(small_judge, tmp_path, num=500, length=100, flip=True)
    assert ev.main(["metrics", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
                    "--train-ref", str(tmp_path / "train.npz"), "--features", str(small_judge), "--resize", "none",
                    "--out", str(tmp_path / "eval")]) == 0
    row = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"][0]
    assert row["class_acc"] >= 0.98 and row["mem_ratio_feat"] <= 0.05 and 0.8 < row["diversity"] < 1.2
    assert row["mem_ratio_px"] is None and row["nn_px_real_mean"] > 0   # features only: no pixels of the samples
    assert row["fid"] >= 0 and row["precision"] > 0.5
    header = (tmp_path / "eval" / "results.csv").read_text().splitlines()[0].split(",")
    assert {"fid", "precision", "recall", "class_acc", "mem_ratio_px", "mem_ratio_feat", "nn_feat_mean",
            "nn_feat_real_mean", "diversity"} <= set(header)


def test_judge_references_are_labelled_and_another_extractor_is_refused(small_judge, net, tmp_path, capsys):
    """judge.py ref and scoring.trainset label their files with the judge's pipeline (its file's hash) and the image
    size, so features of another extractor (a rebuilt judge, any --features) are refused in one line, not just warned about."""
    write_judge_refs(small_judge, tmp_path, num=20, length=20, flip=False)
    label = metrics.pipeline_label(str(small_judge), "none")
    for name in ("ref.npz", "train.npz"):
        with np.load(tmp_path / name) as z:
            assert str(z["pipeline"]) == label and int(z["image_size"]) == 16
    other = tmp_path / "other.pt"                                   # another extractor of the same shape
    with warnings.catch_warnings():                                 # torch 2.14 deprecates TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(judge.JudgeNet(16, width=4)), str(other))
    metrics.save_npz(tmp_path / "samples.npz", arr_0=features(net, 20, 84)["images"])     # images: featurized here
    for refs, names in ((["--ref", "ref.npz"], "reference"), (["--train-ref", "train.npz"], "training-set features")):
        capsys.readouterr()
        args = ["metrics", "--samples", str(tmp_path / "samples.npz"), "--features", str(other), "--resize", "none",
                "--is-splits", "2", "--out", str(tmp_path / "eval")] + [refs[0], str(tmp_path / refs[1])]
        assert ev.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "feature pipelines differ" in err and names in err
        assert label in err and metrics.pipeline_label(str(other), "none") in err
    assert not (tmp_path / "eval").exists()
    with np.load(tmp_path / "train.npz") as z:                      # the training set of a run at another size
        metrics.save_npz(tmp_path / "train8.npz", **{**dict(z), "image_size": np.array(8)})
    capsys.readouterr()
    assert ev.main(["metrics", "--samples", str(tmp_path / "samples.npz"), "--features", str(small_judge),
                    "--resize", "none", "--is-splits", "2", "--train-ref", str(tmp_path / "train8.npz"),
                    "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image sizes differ: samples" in err and "train8.npz 8px" in err
    assert not (tmp_path / "eval").exists()
    with np.load(tmp_path / "train.npz") as z:                      # one from before the size label: a warning
        metrics.save_npz(tmp_path / "train_old.npz", **{k: z[k] for k in z.files if k != "image_size"})
    metrics.check_train_reference_size(tmp_path / "train_old.npz", 16)
    assert "train_old.npz carries no image_size label" in capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_2(small_judge, tmp_path, capsys):
    assert trainset.main(["--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "train.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m scoring.trainset: error:") and "not found" in err and len(err.splitlines()) == 1
    np.savez(tmp_path / "wrong.npz", feats=np.zeros((5, 3)))
    assert ev.main(["metrics", "--samples", str(tmp_path / "wrong.npz"), "--train-ref", str(tmp_path / "wrong.npz")]) == 2
    assert "item_ids" in capsys.readouterr().err
    assert not (tmp_path / "train.npz").exists()
    (tmp_path / "kept.npz").write_text("a reference")               # an existing output is never written over
    for main, args in ((judge.main, ["ref", "--num", "10", "--judge", str(small_judge)]),
                       (trainset.main, ["--run", str(tmp_path / "nowhere")]),
                       (ev.main, ["ref", "--data", "builtin", "--image-size", "16"])):
        assert main([*args, "--out", str(tmp_path / "kept.npz")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "kept.npz exists" in err
    assert (tmp_path / "kept.npz").read_text() == "a reference"


def test_final_grid_hook_prints_and_logs_the_class_accuracy(small_judge, monkeypatch):
    from types import SimpleNamespace
    monkeypatch.setattr(judge, "default_path", lambda *args, **kwargs: small_judge)
    monkeypatch.setattr(judge, "judge_path", lambda *args, **kwargs: small_judge)
    imgs, labels = judge.render_images(16, 40, 85)
    grid = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1            # (N, 3, 16, 16) in [-1, 1]
    records, lines = [], []
    cfg = SimpleNamespace(data="builtin", cond="class", steps=10, image_size=16, sample_cfg=4.0)
    judge.judge_final_grid(cfg, grid, labels, records.append, lines.append)
    judge.judge_final_grid(cfg, grid, (labels + 5) % 10, records.append, lines.append)  # every shape called wrong
    acc = [r["class_acc"] for r in records]
    assert acc[0] >= 0.95 and acc[1] <= 0.05 and f"class accuracy {acc[0]:.3f}" in lines[0]
    judge.judge_final_grid(SimpleNamespace(**{**vars(cfg), "data": "/data/imagenet"}), grid, labels, records.append)
    assert len(records) == 2  # other data: no verdict
