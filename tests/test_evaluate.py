"""Tests for evaluate.py: metrics against closed forms, clean-fid and brute force; the CLI end to end; bad input."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.spatial.distance import cdist

import evaluate as ev
from conftest import fill_disk, one_error_line
from plumbing.common import WriteFailed
from scoring import metrics

REPO = Path(__file__).resolve().parents[1]


# ---- helpers ----


def random_cov(rng, d, scale=1.0):
    """A random well-conditioned SPD matrix (d, d)."""
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.5 * np.eye(d))


def closed_form_fid(mu1, s1, mu2, s2):
    """FID through eigendecompositions: tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), no sqrtm of a product."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


class TinyExtractor(torch.nn.Module):
    """A stand-in feature network: 8-d features and 5 logits from a 4x4 average pool of the image."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(48, 8, generator=g) / 7)
        self.head = torch.nn.Parameter(torch.randn(8, 5, generator=g))

    def forward(self, x):
        z = F.adaptive_avg_pool2d(x / 255.0, 4).flatten(1)  # (B, 48)
        f = torch.tanh(3 * z @ self.proj)  # (B, 8)
        return f, f @ self.head


class FakeInception(torch.nn.Module):
    """Shaped like clean-fid's TorchScript Inception: `layers` -> (B, 2048, 1, 1) and an `output` Linear(2048, 1008)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(3, 2048, 1))
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, x):
        return self.layers(x)


def jit_save(module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(module).save(str(path))
    return path


def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


def make_images(rng, n, bright=0, size=16, every=3):
    """n uint8 (size, size, 3) noise images; one in `every` brightened by `bright`."""
    imgs = rng.integers(0, 196, (n, size, size, 3))
    imgs[::every] += bright
    return np.clip(imgs, 0, 255).astype(np.uint8)


def run_cli(*args):
    return subprocess.run([sys.executable, "evaluate.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny extractor file and two folders of 24 PNGs each (samples and reference)."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    samples, reference = make_images(rng, 24), make_images(rng, 24, bright=70, every=2)
    return {"root": root, "extractor": jit_save(TinyExtractor(), root / "tiny.pt"),
            "samples_array": samples, "samples": write_pngs(root / "A", samples), "ref": write_pngs(root / "B", reference)}


# ---- Fréchet distance ----


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = random_cov(rng, 6), random_cov(rng, 6, 2.0)  # generic covariances: S1 S2 is not symmetric
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed_form_fid(mu1, s1, mu2, s2), rel=1e-9)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)
    # 1-D: (m1-m2)^2 + (s1-s2)^2 in standard deviations
    assert metrics.frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9 + 1)


def test_fid_of_gaussian_samples_matches_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.zeros(4), np.array([2.0, -1.0, 0.5, 1.0])
    s1, s2 = random_cov(rng, 4), random_cov(rng, 4, 3.0)
    x1 = rng.multivariate_normal(mu1, s1, size=40_000)
    x2 = rng.multivariate_normal(mu2, s2, size=40_000)
    fid = metrics.frechet_distance(*metrics.feature_statistics(x1), *metrics.feature_statistics(x2))
    expected = closed_form_fid(mu1, s1, mu2, s2)
    assert expected > 5
    assert fid == pytest.approx(expected, rel=0.02)


def test_frechet_distance_equals_cleanfid():
    from cleanfid.fid import frechet_distance as cleanfid_frechet
    rng = np.random.default_rng(3)
    for n, d in [(300, 32), (20, 48)]:  # the second has singular covariances (fewer samples than dimensions)
        a, b = rng.normal(size=(n, d)), rng.normal(0.3, 1.5, size=(n, d))
        stats = (*metrics.feature_statistics(a), *metrics.feature_statistics(b))
        ours, theirs = metrics.frechet_distance(*stats), cleanfid_frechet(*stats)
        assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-9)
    # clean-fid's own from-features route (float32 features, as the network gives) agrees too
    from cleanfid.fid import fid_from_feats
    a32, b32 = rng.normal(size=(200, 16)).astype(np.float32), rng.normal(0.5, 1, size=(200, 16)).astype(np.float32)
    ours = metrics.frechet_distance(*metrics.feature_statistics(a32), *metrics.feature_statistics(b32))
    assert ours == pytest.approx(fid_from_feats(a32, b32), rel=1e-5)


def test_frechet_distance_bad_statistics():
    with pytest.raises(ValueError, match="imaginary"):  # a "covariance" with a negative eigenvalue
        metrics.frechet_distance([0.0, 0.0], np.eye(2), [0.0, 0.0], np.diag([1.0, -1.0]))
    with pytest.raises(ValueError, match="do not match"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.feature_statistics(np.zeros((1, 4)))


# ---- Inception Score ----


def test_inception_score_constructed_probabilities():
    assert metrics.inception_score(np.full((100, 7), 1 / 7)) == pytest.approx((1.0, 0.0))
    k = 6
    one_hot = np.eye(k)[np.arange(10 * k * 3) % k]  # each of the 10 splits holds every class equally often
    mean, std = metrics.inception_score(one_hot, splits=10)
    assert mean == pytest.approx(k) and std == pytest.approx(0, abs=1e-12)


def test_inception_score_matches_direct_formula():
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 2, size=(1000, 10))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in np.split(probs, 5):
        py = part.mean(0)
        scores.append(np.exp(np.mean([np.sum(p * (np.log(p) - np.log(py))) for p in part])))
    assert metrics.inception_score(probs, splits=5) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)
    with pytest.raises(ValueError, match="at least 10 samples"):
        metrics.inception_score(probs[:9], splits=10)


# ---- precision / recall ----


def test_precision_recall_known_answers():
    real = np.arange(10.0)[:, None]  # k=3 radii: 3 at both ends, 2 inside
    fake = np.array([[4.5], [100.0], [-2.5], [12.5]])  # inside, far, within 3 of 0, 3.5 beyond 9
    precision, recall = metrics.precision_recall(real, fake, k=3, device="cpu")
    assert precision == pytest.approx(0.5) and recall == pytest.approx(1.0)  # 100's 3rd neighbour is 102.5 away
    real = np.arange(10.0)[:, None] + 0.25
    fake = np.arange(5.0)[:, None]  # radii 3, 2, 2, 2, 3: covers reals up to 7 -> 0.25 ... 6.25
    assert metrics.precision_recall(real, fake, k=3, device="cpu") == pytest.approx((1.0, 0.7))
    assert metrics.precision_recall(fake, real, k=3, device="cpu") == pytest.approx((0.7, 1.0))  # roles swap
    far = np.arange(10.0)[:, None] + 1000
    assert metrics.precision_recall(real, far, k=3, device="cpu") == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than 3 samples"):
        metrics.precision_recall(real, fake[:3], k=3)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_against_brute_force(k):
    rng = np.random.default_rng(5 + k)
    real = np.concatenate([rng.normal(0, 1, (40, 3)), rng.normal(4, 0.5, (20, 3))])
    fake = np.concatenate([rng.normal(0.5, 1.2, (35, 3)), rng.normal(8, 1, (10, 3))])
    radius_real = np.sort(cdist(real, real), axis=1)[:, k]  # plain distances; column 0 is the point itself
    radius_fake = np.sort(cdist(fake, fake), axis=1)[:, k]
    precision = (cdist(fake, real) <= radius_real[None]).any(1).mean()
    recall = (cdist(real, fake) <= radius_fake[None]).any(1).mean()
    # a tiny chunk budget forces many row chunks through both code paths
    got = metrics.precision_recall(real, fake, k=k, device="cpu", max_elems=100)
    assert got == pytest.approx((precision, recall))
    assert 0 < precision < 1 and 0 < recall < 1
    got32 = metrics.precision_recall(real.astype(np.float32), fake.astype(np.float32), k=k, device="cpu")
    assert got32 == pytest.approx((precision, recall))


# ---- features ----


def test_features_equal_across_sources_and_cache(data, tmp_path):
    net = metrics.load_torchscript_extractor(data["extractor"])
    from_array = metrics.extract_features(data["samples_array"], net, batch_size=7, resize="none")
    from_folder = metrics.extract_features(data["samples"], net, batch_size=5, resize="none", workers=2)
    metrics.save_npz(tmp_path / "s.npz", arr_0=data["samples_array"])
    from_npz = metrics.extract_features(tmp_path / "s.npz", net, batch_size=10, resize="none")
    assert from_array["feats"].shape == (24, 8) and from_array["probs"].shape == (24, 5)
    for other in (from_folder, from_npz):  # features bit-equal; logits may differ in the last bit across batch sizes
        np.testing.assert_array_equal(other["feats"], from_array["feats"])
        np.testing.assert_allclose(other["probs"], from_array["probs"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(from_array["probs"].sum(1), 1, rtol=1e-6)

    featurizer = metrics.Featurizer(data["extractor"], resize="none", cache_dir=tmp_path / "cache")
    first = featurizer(tmp_path / "s.npz")
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1
    with np.load(cached[0]) as z:  # the cache holds exactly what was returned
        np.testing.assert_array_equal(z["feats"], first["feats"])
    assert metrics.Featurizer(data["extractor"], resize="none", cache_dir=tmp_path / "cache")._net is None
    again = metrics.Featurizer(data["extractor"], resize="none", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again(tmp_path / "s.npz")["feats"], first["feats"])
    assert again._net is None  # served from the cache: the network was never loaded
    # a features .npz is read back as features
    np.testing.assert_array_equal(featurizer(cached[0])["feats"], first["feats"])


def test_clean_inception_wrapper_matches_cleanfid(tmp_path):
    from cleanfid.inception_torchscript import InceptionV3W
    jit_save(FakeInception(), tmp_path / "inception-2015-12-05.pt")
    ours = metrics.CleanInception(str(tmp_path / "inception-2015-12-05.pt"), download=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates torch.jit.load, which clean-fid calls
        theirs = InceptionV3W(str(tmp_path), download=False)
    x = torch.rand(2, 3, 299, 299) * 255
    feats, logits = ours(x)
    torch.testing.assert_close(feats, theirs(x))
    torch.testing.assert_close(logits, feats @ ours.net.output.weight.T)  # bias-free, as the ADM evaluator
    with pytest.raises(ValueError, match="299x299"):
        ours(torch.rand(1, 3, 32, 32))
    with pytest.raises(FileNotFoundError, match="not found"):
        metrics.CleanInception(str(tmp_path / "missing.pt"), download=False)


# ---- command line ----


def test_metrics_cli_end_to_end_matches_cleanfid(data, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("metrics", "--samples", data["samples"], "--ref", data["ref"], "--features", data["extractor"],
                   "--out", out, "--is-splits", "2", "--workers", "0", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert json.loads((out / "results.json").read_text())["provenance"]["argv"][1:3] == ["metrics", "--samples"]
    # clean-fid's own pipeline (its resize to 299, its data loader, its statistics) on the same folders and network
    from cleanfid import fid
    net = metrics.load_torchscript_extractor(data["extractor"])
    expected = fid.compute_fid(str(data["samples"]), str(data["ref"]), mode="clean", custom_feat_extractor=lambda x: net(x)[0],
                               device=torch.device("cpu"), num_workers=0, batch_size=8, verbose=False)
    assert expected > 0.01
    assert row["fid"] == pytest.approx(expected, rel=1e-4)
    # IS and P/R from the cached features agree with the library functions on them
    cache = {p.name.split("-")[0]: np.load(p) for p in (out / "features").glob("*.npz")}
    assert row["is_mean"] == pytest.approx(metrics.inception_score(cache["A"]["probs"], 2)[0])
    assert (row["precision"], row["recall"]) == pytest.approx(metrics.precision_recall(cache["B"]["feats"], cache["A"]["feats"]))
    assert row["num_samples"] == 24 and row["num_ref"] == 24 and row["feature_dim"] == 8
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["cfg_scale", "fid", "is_mean", "is_std", "precision", "recall"]

    # the cached features .npz serve as samples and reference: same numbers, no images read
    code = ev.main(["metrics", "--samples", str(out / "features" / next(p.name for p in (out / "features").iterdir()
                                                                         if p.name.startswith("A"))),
                    "--ref", str(next((out / "features").glob("B-*.npz"))), "--out", str(tmp_path / "again"),
                    "--is-splits", "2", "--cfg-scales", "1.5"])
    assert code == 0
    (row2,) = json.loads((tmp_path / "again" / "results.json").read_text())["rows"]
    assert row2["cfg_scale"] == 1.5
    assert row2["fid"] == pytest.approx(row["fid"], rel=1e-12) and row2["precision"] == row["precision"]


def test_stats_reference_and_adm_reference_batch(data, tmp_path):
    net = metrics.load_torchscript_extractor(data["extractor"])
    ref_images = np.stack([np.array(Image.open(p)) for p in metrics.list_images(data["ref"])])
    ref_feats = metrics.extract_features(ref_images, net, resize="none")["feats"]
    mu, sigma = metrics.feature_statistics(ref_feats)
    featurizer = metrics.Featurizer(data["extractor"], resize="none")
    label = np.array(featurizer.pipeline)      # statistics made by this extractor say so
    metrics.save_npz(tmp_path / "stats.npz", mu=mu, sigma=sigma, pipeline=label)
    metrics.save_npz(tmp_path / "adm_ref.npz", mu=mu, sigma=sigma, arr_0=ref_images, pipeline=label)
    sample = featurizer(data["samples"])
    by_folder = metrics.compute_metrics(sample, metrics.load_reference(data["ref"], featurizer, 16), is_splits=2)
    by_stats = metrics.compute_metrics(sample, metrics.load_reference(tmp_path / "stats.npz", featurizer), is_splits=2)
    by_adm = metrics.compute_metrics(sample, metrics.load_reference(tmp_path / "adm_ref.npz", featurizer), is_splits=2)
    assert by_stats["fid"] == pytest.approx(by_folder["fid"], rel=1e-9) and by_stats["precision"] is None
    assert by_adm["fid"] == pytest.approx(by_folder["fid"], rel=1e-9)
    assert (by_adm["precision"], by_adm["recall"]) == (by_folder["precision"], by_folder["recall"])


def test_plot_cli_and_plot_errors(tmp_path):
    for name, shift in [("clean", 0.0), ("cep", -1.0)]:
        rows = [{"cfg_scale": s, "fid": 10 + shift + (s - 2) ** 2, "is_mean": 100 * s, "precision": 0.5 + s / 10,
                 "recall": 0.6 - s / 10} for s in (1.5, 2.0, 3.0)]
        metrics.write_results(rows, tmp_path / name)
    fig = tmp_path / "fig.png"
    assert ev.main(["plot", str(tmp_path / "clean/results.json"), str(tmp_path / "cep/results.json"), "-o", str(fig)]) == 0
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="nothing to plot"):
        metrics.plot_fid_is({"x": [{"cfg_scale": 1.5, "fid": None}]}, tmp_path / "none.png")


def test_bad_input_subprocess(data, tmp_path):
    """A real process: exit 2, exactly one line on stderr naming the problem, no traceback, nothing written."""
    proc = run_cli("metrics", "--samples", data["samples"], "--ref", tmp_path / "missing_ref",
                   "--features", data["extractor"], "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"evaluate.py: error: reference not found: {tmp_path / 'missing_ref'}"
    assert not (tmp_path / "out").exists()


def test_bad_input_in_process(data, tmp_path, capsys):
    few = write_pngs(tmp_path / "few", make_images(np.random.default_rng(9), 3))
    (tmp_path / "ckpt.pt").write_bytes(b"not yet")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pt")   # a weights file of another format
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    metrics.save_npz(tmp_path / "odd.npz", weights=np.zeros(3))
    (tmp_path / "ref.txt").write_text("not a reference")
    metrics.save_npz(tmp_path / "float.npz", arr_0=np.zeros((12, 8, 8, 3), np.float32))
    cases = [
        (["metrics", "--samples", str(data["samples"]), "--ref", str(tmp_path / "ref.txt")], "unknown reference format"),
        (["metrics", "--samples", str(few), "--ref", str(data["ref"])], "statistics need at least 10"),
        (["metrics", "--samples", str(data["samples"]), "--ref", str(few), "--k", "3"], "need at least 4"),
        (["metrics", "--samples", str(tmp_path / "odd.npz"), "--ref", str(data["ref"])], "unknown image source"),
        (["metrics", "--samples", str(tmp_path / "float.npz"), "--ref", str(data["ref"])], "must be uint8"),
        (["metrics", "--samples", str(data["samples"]), "--ref", str(tmp_path / "odd.npz")], "unknown reference .npz"),
        (["metrics", "--samples", str(data["samples"]), "--ref", str(data["ref"]), "--cfg-scales", "1,x"], "--cfg-scales"),
        (["metrics", "--samples", str(data["samples"]), "--ref", str(data["ref"]), "--features", str(tmp_path / "junk.pt")],
         "not a TorchScript"),
        ([str(tmp_path / "missing.pt"), "--ref", str(data["ref"])], "checkpoint not found"),
        ([str(tmp_path / "ckpt.pt"), "--ref", str(data["ref"]), "--num-samples", "5"], "statistics need"),
        ([str(tmp_path / "ckpt.pt"), "--ref", str(data["ref"])], "cannot read checkpoint"),
        ([str(tmp_path / "foreign.pt"), "--ref", str(data["ref"])], "not a nanoCEP checkpoint"),
        (["plot", str(tmp_path / "nope.json")], "results not found"),
        (["metrics", "--samples", str(tmp_path / "nowhere"), "--ref", str(data["ref"])], "images not found"),
    ]
    for args, message in cases:
        try:
            extra = [] if args[0] == "plot" else ["--out", str(tmp_path / "out")]
            extra += [] if args[0] == "plot" or "--features" in args else ["--features", str(data["extractor"])]
            code = ev.main(args + extra)
        except SystemExit as e:  # argparse's own errors exit from inside main
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "out").exists(), args


def test_a_full_disk_is_one_line_and_keeps_the_previous_results(data, tmp_path, monkeypatch, capsys):
    """results.json, a sample PNG or a rank's shard file that does not fit: one line naming it, exit 1, the results
    written before left as they were, no temporary file."""
    args = ["metrics", "--samples", str(data["samples"]), "--ref", str(data["ref"]), "--features",
            str(data["extractor"]), "--out", str(tmp_path), "--is-splits", "2", "--workers", "0", "--device", "cpu"]
    assert ev.main(args) == 0
    before = (tmp_path / "results.json").read_bytes()
    capsys.readouterr()
    with monkeypatch.context() as m:
        fill_disk(m, "results.json")
        assert ev.main(args) == 1
    line = one_error_line(capsys, "evaluate.py")
    assert line == f"evaluate.py: error: cannot write {tmp_path / 'results.json'}: No space left on device"
    assert (tmp_path / "results.json").read_bytes() == before and not list(tmp_path.glob(".*.part"))
    featurizer = metrics.Featurizer(data["extractor"], resize="none")
    kwargs = dict(num_classes=3, cfg_scales=[1.0], featurizer=featurizer, num_samples=12, batch_size=4, is_splits=2)
    for name, png in (("000003.png", True), ("shard000.npz", False)):
        with monkeypatch.context() as m, pytest.raises(WriteFailed, match=f"cannot write .*{name}: No space left"):
            fill_disk(m, name)
            ev.sample_and_evaluate(fake_sampler, out_dir=tmp_path / "s", write_png=png, **kwargs)
        assert not list((tmp_path / "s").rglob(".*.part"))


# ---- sampling plumbing (the sampler itself comes from train_dit.py) ----


def fake_sampler(labels, seeds, cfg_scale):
    """Deterministic per seed: noise tinted by the label, so a sharded run must reproduce a single-process one."""
    images = [np.random.default_rng(s).integers(0, 200, (16, 16, 3)) + 5 * int(y) for s, y in zip(seeds, labels)]
    return (np.stack(images) + 10 * cfg_scale).clip(0, 255).astype(np.uint8)


def test_labels_seeds_shards():
    labels = ev.balanced_labels(50_000, 1000)
    assert np.array_equal(np.bincount(labels), np.full(1000, 50))
    shards = [ev.shard_indices(103, r, 4) for r in range(4)]
    assert np.array_equal(np.concatenate(shards), np.arange(103)) and {len(s) for s in shards} == {25, 26}
    assert np.array_equal(ev.sample_seeds(4, 7), [7, 8, 9, 10])


def test_sharded_sampling_equals_single_process(data, tmp_path):
    featurizer = metrics.Featurizer(data["extractor"], resize="none")
    kwargs = dict(num_classes=3, cfg_scales=[1.0, 2.0], featurizer=featurizer, ref=data["ref"], num_samples=14, seed=5,
                  batch_size=4, write_npz=True, is_splits=2, settings={"sampler": "fake"}, shape_fidelity=True)
    single = ev.sample_and_evaluate(fake_sampler, out_dir=tmp_path / "one", write_png=True, **kwargs)
    # two ranks run one after the other (no process group: barriers are no-ops); rank 0 merges last
    assert ev.sample_and_evaluate(fake_sampler, out_dir=tmp_path / "two", rank=1, world_size=2, **kwargs) is None
    sharded = ev.sample_and_evaluate(fake_sampler, out_dir=tmp_path / "two", rank=0, world_size=2, **kwargs)
    for scale in ("cfg1", "cfg2"):
        with np.load(tmp_path / "one" / scale / "samples.npz") as a, np.load(tmp_path / "two" / scale / "samples.npz") as b:
            assert a["arr_0"].shape == (14, 16, 16, 3) and a["arr_0"].dtype == np.uint8
            np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
            np.testing.assert_array_equal(b["labels"], np.arange(14) % 3)
            np.testing.assert_array_equal(b["seeds"], 5 + np.arange(14))
            np.testing.assert_array_equal(a["arr_0"][9], fake_sampler([9 % 3], [14], float(scale[3:]))[0])
        assert not list((tmp_path / "two" / scale).glob("shard*"))
        with np.load(tmp_path / "two" / scale / "features.npz") as f:   # labelled, so a later comparison is checked
            assert str(f["pipeline"]) == featurizer.pipeline and int(f["image_size"]) == 16
    pngs = sorted(p.name for p in (tmp_path / "one" / "cfg2" / "samples").iterdir())
    assert pngs == [f"{i:06d}.png" for i in range(14)]
    assert [r["cfg_scale"] for r in sharded] == [1.0, 2.0] and sharded[0]["sampler"] == "fake"
    for a, b in zip(single, sharded):
        assert a["fid"] == pytest.approx(b["fid"], rel=1e-12) and a["precision"] == b["precision"]
        # each rank scores its own slice's shapes; the merged mean is the one process's (labels 0-2: discs only)
        assert a["shape_iou_disc"] == pytest.approx(b["shape_iou_disc"], rel=1e-12) and b["shape_iou_cross"] is None
    assert json.loads((tmp_path / "two" / "results.json").read_text())["rows"][1]["world_size"] == 2
    # with both shapes among the labels, each rank's shape scores must be joined to its own samples' labels
    kwargs.update(num_classes=10, cfg_scales=[2.0], num_samples=20)
    single = ev.sample_and_evaluate(fake_sampler, out_dir=tmp_path / "one10", **kwargs)
    ev.sample_and_evaluate(fake_sampler, out_dir=tmp_path / "two10", rank=1, world_size=2, **kwargs)
    sharded = ev.sample_and_evaluate(fake_sampler, out_dir=tmp_path / "two10", rank=0, world_size=2, **kwargs)
    for column in ("shape_iou_disc", "shape_iou_cross"):
        assert single[0][column] == pytest.approx(sharded[0][column], rel=1e-12) and 0 <= single[0][column] <= 1


def test_checkpoint_end_to_end_offline(data, tmp_path, capsys):
    """A tiny DiT trained by train_dit.py evaluates into results.json and a plot, with the tiny extractor, offline."""
    import train_dit
    run = tmp_path / "run"
    assert train_dit.main(["--image-size", "16", "--batch-size", "8", "--steps", "20", "--sample-every", "0",
                           "--builtin-length", "32", "--log-every", "10", "--ema-decay", "0.5", "--out", str(run)]) == 0
    out = tmp_path / "eval"
    code = ev.main([str(run / "last.pt"), "--num-samples", "12", "--cfg-scales", "1,3", "--steps", "3",
                    "--batch-size", "6", "--features", str(data["extractor"]), "--ref", str(data["ref"]),
                    "--out", str(out), "--is-splits", "2", "--npz", "--resize", "none"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["cfg_scale"] for r in rows] == [1.0, 3.0] and rows[0]["model"] == "DiT-T/2"
    # the code and machine that measured: provenance.json, also inside results.json, this repository's commit
    from plumbing import provenance
    assert results["provenance"] == json.loads((out / "provenance.json").read_text())
    assert results["provenance"]["commit"] == provenance.code_state()["commit"]
    assert all(np.isfinite(r["fid"]) and r["train_step"] == 20 for r in rows)
    assert all(0 <= r["precision"] <= 1 and r["dtype"] == "fp32" for r in rows)   # the metric, not the dtype
    with np.load(out / "cfg3" / "samples.npz") as z:
        images, labels = z["arr_0"], z["labels"]
    assert images.shape == (12, 16, 16, 3) and images.dtype == np.uint8
    # a built-in checkpoint's rows grade the shapes too: the row is scoring/shapes.py on the saved samples
    from scoring import shapes
    iou = shapes.shape_iou(images, labels)
    assert rows[1]["shape_iou_disc"] == pytest.approx(iou["disc"]) and rows[1]["shape_iou_cross"] == pytest.approx(iou["cross"])
    assert not np.array_equal(images, np.load(out / "cfg1" / "samples.npz")["arr_0"])   # guidance changes samples
    sample_fn, info = ev.load_sampler(run / "last.pt", steps=3)
    again = sample_fn(torch.tensor([5, 6]), [5, 6], 3.0)                              # image i = seed i: reproducible
    np.testing.assert_array_equal(again, images[5:7])
    assert ev.main(["plot", str(out / "results.json"), "-o", str(tmp_path / "fig.png")]) == 0
    assert (tmp_path / "fig.png").stat().st_size > 0
    # a reference made at 8px is refused for these 16px samples before any sampling, in one line naming both
    flags = ["--features", str(data["extractor"]), "--resize", "none"]
    assert ev.main(["ref", "--data", "builtin", "--image-size", "8", "--builtin-length", "12", *flags,
                    "--out", str(tmp_path / "ref8.npz")]) == 0
    capsys.readouterr()
    assert ev.main([str(run / "last.pt"), "--num-samples", "12", "--steps", "1", *flags, "--ref",
                    str(tmp_path / "ref8.npz"), "--out", str(tmp_path / "eval8"), "--is-splits", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image sizes differ: samples 16px, reference" in err and "8px" in err
    assert not (tmp_path / "eval8").exists()


def test_raw_class_embedding_samples_the_raw_rows_and_the_default_the_smoothed_ones(data, tmp_path, capsys):
    """evaluate.py on a --label-smoothing checkpoint samples with (1-eps) E[y] + eps mean(E), the embedding it was
    trained on; --raw-class-embedding with E[y]. Oracle: the same weights with the smoothing written into the table."""
    import train_dit
    run = tmp_path / "run"
    assert train_dit.main(["--image-size", "16", "--batch-size", "8", "--steps", "6", "--sample-every", "0",
                           "--builtin-length", "32", "--label-smoothing", "0.5", "--ema-decay", "0",
                           "--out", str(run)]) == 0
    flags = ["--num-samples", "12", "--cfg-scales", "3", "--steps", "2", "--batch-size", "6", "--features",
             str(data["extractor"]), "--ref", str(data["ref"]), "--is-splits", "2", "--npz", "--resize", "none"]
    images = {}
    for name, extra in (("default", []), ("raw", ["--raw-class-embedding"])):
        assert ev.main([str(run / "last.pt"), *flags, "--out", str(tmp_path / name), *extra]) == 0
        row = json.loads((tmp_path / name / "results.json").read_text())["rows"][0]
        assert row["class_embedding"] == {"default": "as trained", "raw": "raw"}[name]
        with np.load(tmp_path / name / "cfg3" / "samples.npz") as z:
            images[name], labels = z["arr_0"], z["labels"]
    assert not np.array_equal(images["default"], images["raw"])          # the flag changes what is sampled
    ckpt = torch.load(run / "last.pt", weights_only=True)
    key, K = "y_embedder.embedding_table.weight", 10
    for name, smooth in (("default", True), ("raw", False)):             # a model without smoothing, rows as sampled
        table = ckpt["ema"][key].clone()
        if smooth:
            table[:K] = 0.5 * table[:K] + 0.5 * table[:K].mean(0)
        torch.save({**ckpt, "config": {**ckpt["config"], "label_smoothing": 0.0}, "ema": {**ckpt["ema"], key: table}},
                   tmp_path / f"{name}.pt")
        sample_fn, _ = ev.load_sampler(tmp_path / f"{name}.pt", steps=2)
        np.testing.assert_array_equal(sample_fn(torch.as_tensor(labels[:4]), [0, 1, 2, 3], 3.0), images[name][:4])
    capsys.readouterr()                                                   # a checkpoint without smoothing refuses it
    assert ev.main([str(tmp_path / "raw.pt"), *flags, "--out", str(tmp_path / "x"), "--raw-class-embedding"]) == 2
    assert "trained without --label-smoothing" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_ldm_checkpoint_samples_like_a_dit_one(tmp_path):
    """evaluate.py rebuilds a train_ldm.py checkpoint from its config exactly as it does a DiT one."""
    import train_ldm
    assert train_ldm.main(["--steps", "3", "--batch-size", "8", "--sample-every", "0", "--builtin-length", "32",
                           "--log-every", "1", "--out", str(tmp_path)]) == 0
    sample_fn, info = ev.load_sampler(tmp_path / "last.pt", steps=3)
    images = sample_fn(torch.tensor([0, 1]), [0, 1], 2.0)
    assert info["kind"] == "ldm" and info["num_classes"] == 10
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8


def test_text_checkpoint_samples_from_prompts(tmp_path, capsys):
    """A text-conditional DiT samples from --prompts: labels index the prompts; without prompts, one clear error."""
    import train_dit
    run = tmp_path / "run"
    assert train_dit.main(["--cond", "text", "--image-size", "8", "--batch-size", "8", "--steps", "2",
                           "--sample-every", "0", "--builtin-length", "32", "--log-every", "1", "--text-width", "32",
                           "--text-depth", "1", "--context-length", "16", "--out", str(run)]) == 0
    prompts = ["a large red disc at the middle of a dark background", "a small blue cross at the top left"]
    sample_fn, info = ev.load_sampler(run / "last.pt", steps=2, prompts=prompts)
    assert info["cond"] == "text" and info["num_classes"] == 2
    images = sample_fn(torch.tensor([0, 1, 0]), [3, 4, 3], 2.0)
    assert images.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(images[0], images[2])                      # same prompt, same seed
    with pytest.raises(ValueError, match="--prompts"):
        ev.load_sampler(run / "last.pt", steps=2)


class ToyEpsModel(torch.nn.Module):
    """A fixed nonlinear eps-model with a CFG null label, enough for make_sample_fn (no training needed)."""

    class cond:
        null_like = staticmethod(lambda y: torch.full_like(y, 3))

    def forward(self, x, t, y):
        return torch.sin(x + t.view(-1, 1, 1, 1) / 300.0 + y.view(-1, 1, 1, 1) / 2.0) * 0.8


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_stochastic_sampling_two_shards_equal_one_process(sampler, eta):
    """Per-step noise comes from each image's seed: shards sampled by two fresh processes equal one process."""
    from diffusion import GaussianDiffusion, make_beta_schedule
    diffusion = GaussianDiffusion(make_beta_schedule("linear"))
    sample_fn = ev.make_sample_fn(ToyEpsModel(), diffusion, (3, 8, 8), None, "cpu", sampler, 6, False,
                                  **({"eta": eta} if eta else {}))
    labels, seeds = ev.balanced_labels(8, 3), ev.sample_seeds(8, 40)

    def run(rank, world):  # each rank is a fresh process: its global RNG starts from the same state
        torch.manual_seed(0)
        return ev.sample_shard(sample_fn, labels, seeds, ev.shard_indices(8, rank, world), 2.0, batch_size=2)

    one = run(0, 1)
    np.testing.assert_array_equal(np.concatenate([run(0, 2), run(1, 2)]), one)
    deterministic = ev.make_sample_fn(ToyEpsModel(), diffusion, (3, 8, 8), None, "cpu", "ddim", 6, False)
    assert not np.array_equal(deterministic(labels[:2], seeds[:2].tolist(), 2.0), one[:2])   # step noise is used


# ---- FID references: evaluate.py ref, centre crops, pipeline labels ----


def as_uint8(image):
    """A data.py training tensor (3, H, W) in [-1, 1] back to the uint8 (H, W, 3) it was made from."""
    return np.rint((image.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)


def test_ref_command_gives_training_preprocessing_and_a_label(data, tmp_path):
    import hashlib
    import data as datasets
    rng = np.random.default_rng(4)
    for c, (h, w) in enumerate([(24, 40), (50, 30)]):                  # non-square: a squash would differ
        write_pngs(tmp_path / "val" / f"c{c}", [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(6)])
    out = tmp_path / "ref.npz"
    args = ["--features", str(data["extractor"]), "--resize", "none", "--workers", "0"]
    assert ev.main(["ref", "--data", str(tmp_path / "val"), "--image-size", "16", "--out", str(out), *args]) == 0
    # independent reference: the training dataset's own items (ADM centre crop), no flip
    ds = datasets.build_dataset(str(tmp_path / "val"), 16)
    crops = np.stack([as_uint8(ds[2 * i][0]) for i in range(len(ds))])
    net = metrics.load_torchscript_extractor(data["extractor"])
    want = metrics.extract_features(crops, net, resize="none")["feats"]
    sha = hashlib.sha256(Path(data["extractor"]).read_bytes()).hexdigest()[:12]
    with np.load(out) as z:
        np.testing.assert_array_equal(z["feats"], want)
        np.testing.assert_allclose(z["mu"], want.mean(0), rtol=1e-6)
        assert str(z["pipeline"]) == f"torchscript:{sha}/none" and int(z["image_size"]) == 16
    squashed = np.stack([np.array(Image.open(p).resize((16, 16), Image.BICUBIC)) for p in metrics.list_images(tmp_path / "val")])
    assert not np.allclose(metrics.extract_features(squashed, net, resize="none")["feats"], want, atol=1e-3)
    # a folder given straight to --ref gets the same crop: same FID as the prepared reference
    fids = []
    for ref in (tmp_path / "val", out):
        assert ev.main(["metrics", "--samples", str(data["samples"]), "--ref", str(ref), "--is-splits", "2",
                        "--out", str(tmp_path / f"m{len(fids)}"), *args]) == 0
        fids.append(json.loads((tmp_path / f"m{len(fids)}" / "results.json").read_text())["rows"][0]["fid"])
    assert fids[0] == pytest.approx(fids[1], rel=1e-9)
    before = out.read_bytes()                                          # an existing --out is never overwritten
    assert ev.main(["ref", "--data", str(tmp_path / "val"), "--image-size", "16", "--out", str(out), *args]) == 2
    assert out.read_bytes() == before


def test_ref_reads_imagenet_val_flat_or_in_class_folders_alike(data, tmp_path):
    """docs/evaluation.md's val command: ImageNet val as distributed (one flat folder of .JPEG files) and val sorted into class
    folders give the same reference statistics (labels play no part in FID)."""
    import shutil
    rng = np.random.default_rng(5)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(
            tmp_path / f"ILSVRC2012_val_{i:08d}.JPEG", format="JPEG")
    (tmp_path / "flat").mkdir()
    for i, f in enumerate(sorted(tmp_path.glob("*.JPEG"))):
        shutil.copy(f, tmp_path / "flat" / f.name)
        (tmp_path / "classes" / f"n{i % 2:08d}").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp_path / "classes" / f"n{i % 2:08d}" / f.name)
    args = ["--image-size", "16", "--features", str(data["extractor"]), "--resize", "none", "--workers", "0"]
    for layout in ("flat", "classes"):
        assert ev.main(["ref", "--data", str(tmp_path / layout), *args, "--out", str(tmp_path / f"{layout}.npz")]) == 0
    with np.load(tmp_path / "flat.npz") as a, np.load(tmp_path / "classes.npz") as b:
        assert int(a["num_images"]) == 6
        np.testing.assert_allclose(a["mu"], b["mu"], rtol=1e-6)
        np.testing.assert_allclose(a["sigma"], b["sigma"], rtol=1e-5, atol=1e-9)


def test_ref_builtin_with_a_seed_gives_held_out_images(data, tmp_path):
    import data as datasets
    args = ["--data", "builtin", "--image-size", "8", "--builtin-length", "12", "--features", str(data["extractor"]),
            "--resize", "none"]
    assert ev.main(["ref", *args, "--seed", "3", "--out", str(tmp_path / "s3.npz")]) == 0
    assert ev.main(["ref", *args, "--out", str(tmp_path / "s0.npz")]) == 0
    ds = datasets.BuiltinShapes(8, 12, seed=3)
    want = metrics.extract_features(np.stack([as_uint8(ds[2 * i][0]) for i in range(12)]),
                                    metrics.load_torchscript_extractor(data["extractor"]), resize="none")["feats"]
    with np.load(tmp_path / "s3.npz") as a, np.load(tmp_path / "s0.npz") as b:
        np.testing.assert_array_equal(a["feats"], want)
        assert int(a["seed"]) == 3 and str(a["data"]) == "builtin" and not np.array_equal(a["feats"], b["feats"])


def test_mixed_feature_pipelines_are_refused(data, tmp_path, capsys):
    featurizer = metrics.Featurizer(data["extractor"], resize="none")
    sample = featurizer(data["samples"])
    mu, sigma = metrics.feature_statistics(sample["feats"])
    metrics.save_npz(tmp_path / "adm.npz", mu=mu, sigma=sigma, arr_0=data["samples_array"])   # an ADM reference batch
    metrics.save_npz(tmp_path / "custom_clean_custom_na.npz", mu=mu, sigma=sigma)             # clean-fid custom stats
    assert metrics.reference_pipeline(tmp_path / "adm.npz").startswith("clean-fid/legacy_tensorflow (ADM")
    assert metrics.reference_pipeline(tmp_path / "custom_clean_custom_na.npz") == "clean-fid/clean"
    with pytest.raises(ValueError, match="feature pipelines differ.*torchscript:.*legacy_tensorflow"):
        metrics.load_reference(tmp_path / "adm.npz", featurizer)
    other = dict(sample, pipeline="clean-fid/clean")
    ref = metrics.load_reference(data["ref"], featurizer, 16)
    with pytest.raises(ValueError, match="samples clean-fid/clean, reference torchscript:"):
        metrics.compute_metrics(other, ref, is_splits=2)
    assert metrics.compute_metrics(sample, ref, is_splits=2)["fid"] > 0                      # one pipeline: fine
    cases = [(["--features", str(data["extractor"]), "--resize", "none"], "adm.npz", "legacy_tensorflow (ADM"),
             (["--pipeline", "legacy_tensorflow"], "custom_clean_custom_na.npz", "reference"),
             (["--pipeline", "legacy_tensorflow"], "adm.npz", None)]                      # the matching pair passes
    for flags, ref_name, message in cases:
        capsys.readouterr()
        code = ev.main(["metrics", "--samples", str(data["samples"]), "--ref", str(tmp_path / ref_name),
                        "--out", str(tmp_path / "never"), "--inception", str(tmp_path / "absent.pt"), *flags])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        if message is None:       # got past the pipeline check, to the (absent) network
            assert "Inception" in err and "pipelines differ" not in err
        else:
            assert "feature pipelines differ" in err and message in err
            assert ("clean-fid/legacy_tensorflow" in err) and ("clean-fid/clean" in err or "torchscript:" in err)
    assert not (tmp_path / "never" / "results.json").exists()
    # a features reference from before references were labelled is measured, with a warning that it is unchecked
    ref = metrics.Featurizer(data["extractor"], resize="none")(data["ref"])
    metrics.save_npz(tmp_path / "unlabelled.npz", feats=ref["feats"], probs=ref["probs"])
    assert ev.main(["metrics", "--samples", str(data["samples"]), "--ref", str(tmp_path / "unlabelled.npz"),
                    "--features", str(data["extractor"]), "--resize", "none", "--is-splits", "2",
                    "--out", str(tmp_path / "unchecked")]) == 0
    assert "unlabelled.npz carries no pipeline label" in capsys.readouterr().err


def test_references_made_at_another_image_size_are_refused(data, tmp_path, capsys):
    """Every reference written is labelled with its image size; a labelled one (or an ADM batch, by its arr_0) made at
    another size than the samples is refused in one line (exit 2); an unlabelled one is used with a warning."""
    flags = ["--features", str(data["extractor"]), "--resize", "none", "--is-splits", "2"]
    for size in (16, 8):
        assert ev.main(["ref", "--data", str(data["ref"]), "--image-size", str(size), *flags[:4],
                        "--out", str(tmp_path / f"ref{size}.npz")]) == 0
        with np.load(tmp_path / f"ref{size}.npz") as z:
            assert int(z["image_size"]) == size and str(z["pipeline"]).startswith("torchscript:")
    featurizer = metrics.Featurizer(data["extractor"], resize="none")
    ref_images = np.stack([np.array(Image.open(p)) for p in metrics.list_images(data["ref"])])   # 16px
    mu, sigma = metrics.feature_statistics(featurizer(ref_images)["feats"])
    label = np.array(featurizer.pipeline)
    metrics.save_npz(tmp_path / "adm8.npz", mu=mu, sigma=sigma, arr_0=ref_images[:, :8, :8], pipeline=label)
    metrics.save_npz(tmp_path / "unlabelled.npz", mu=mu, sigma=sigma, pipeline=label)
    for ref, code in (("ref16.npz", 0), ("ref8.npz", 2), ("adm8.npz", 2), ("unlabelled.npz", 0)):
        capsys.readouterr()
        out = tmp_path / f"m-{ref}"
        got = ev.main(["metrics", "--samples", str(data["samples"]), "--ref", str(tmp_path / ref), *flags,
                       "--out", str(out)])
        err = capsys.readouterr().err
        assert got == code, err
        if code == 2:
            line = err.strip()
            assert len(line.splitlines()) == 1 and "image sizes differ: samples" in line
            assert "16px" in line and f"{tmp_path / ref} 8px" in line and not out.exists()
        assert ("no image_size label" in err) == (ref == "unlabelled.npz")
    with pytest.raises(ValueError, match="image sizes differ: samples 16px"):
        metrics.load_reference(tmp_path / "ref8.npz", featurizer, image_size=16)


class FakeInceptionTF(FakeInception):
    """Like FakeInception, with the real file's forward(img, return_features): its own resize to 299 inside."""

    def forward(self, x, return_features: bool = False):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats = self.layers((x - 128) / 128).reshape(-1, 2048)
        return feats if return_features else torch.softmax(self.output(feats), dim=1)


def test_legacy_tensorflow_pipeline_matches_cleanfid(tmp_path):
    """--pipeline legacy_tensorflow: no resize outside, the network's own forward, as clean-fid's legacy mode."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer
    path = jit_save(FakeInceptionTF(), tmp_path / "inception-2015-12-05.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = InceptionV3W(str(tmp_path), download=False, resize_inside=True)
    images = make_images(np.random.default_rng(3), 2, size=32)
    assert np.array_equal(build_resizer("legacy_tensorflow")(images[0]), images[0])   # clean-fid resizes nothing outside
    featurizer = metrics.Featurizer(inception=str(path), pipeline="legacy_tensorflow")
    assert featurizer.pipeline == "clean-fid/legacy_tensorflow" and featurizer.resize == "none"
    ours = featurizer(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(torch.from_numpy(ours["feats"]), theirs(x))
    clean = metrics.Featurizer(inception=str(path))(images)["feats"]                  # the default resizes outside
    assert clean.shape == ours["feats"].shape and not np.allclose(clean, ours["feats"], atol=1e-4)
    with pytest.raises(ValueError, match="mode of clean-fid's Inception"):
        metrics.Featurizer(str(path), pipeline="legacy_tensorflow")                   # not for a custom --features



@pytest.fixture(scope="module")
def cep_run(tmp_path_factory):
    """A 2-step DiT run on 12 built-in items with label smoothing 0.5 and CEP-U at gamma 2 (AdamW: Muon imports the
    compiler, seconds)."""
    import train_dit
    run = tmp_path_factory.mktemp("ceprun") / "run"
    assert train_dit.main(["--image-size", "16", "--batch-size", "8", "--steps", "2", "--sample-every", "0",
                           "--builtin-length", "12", "--label-smoothing", "0.5", "--cep", "uniform", "--cep-gamma",
                           "2", "--optimizer", "adamw", "--out", str(run)]) == 0
    return run


def test_condition_scale_of_a_checkpoint_with_known_class_rows(cep_run, tmp_path):
    """class_embed_norm is the mean L2 norm of the rows the model is fed (the smoothed ones under --label-smoothing,
    the raw ones with --raw-class-embedding; never the null row), cep_noise_norm sqrt(d) x CEP's per-element std."""
    ckpt = torch.load(cep_run / "last.pt", weights_only=True)
    key = "y_embedder.embedding_table.weight"
    K, D = 10, ckpt["ema"][key].shape[1]
    rows = torch.zeros(K + 1, D)
    rows[:K, 0] = torch.arange(1.0, K + 1)                     # class c: (c + 1) e_0; the null row much longer
    rows[:K, 1] = 1.0
    rows[K] = 100.0
    for mode in ("uniform", "gaussian", "none"):
        torch.save({**ckpt, "config": {**ckpt["config"], "cep": mode}, "ema": {**ckpt["ema"], key: rows}},
                   tmp_path / f"{mode}.pt")
    smoothed = 0.5 * rows[:K] + 0.5 * rows[:K].mean(0)          # (K, D)
    want = {"as trained": smoothed.norm(dim=1).mean().item(), "raw": rows[:K].norm(dim=1).mean().item()}
    for raw in (False, True):
        _, info = ev.load_sampler(tmp_path / "uniform.pt", raw_class_embedding=raw)
        assert info["class_embed_norm"] == pytest.approx(want["raw" if raw else "as trained"], rel=1e-6)
    assert info["cep_noise_norm"] == pytest.approx(2 / np.sqrt(3))            # uniform: half-width 2/sqrt(d)
    assert info["cep_noise_to_embed"] == pytest.approx(2 / np.sqrt(3) / want["raw"], rel=1e-6)
    _, info = ev.load_sampler(tmp_path / "gaussian.pt")
    assert info["cep_noise_norm"] == pytest.approx(2.0) and info["class_embed_norm"] == pytest.approx(want["as trained"])
    _, info = ev.load_sampler(tmp_path / "none.pt")
    assert info["cep_noise_norm"] == 0 and info["cep_noise_to_embed"] == 0


def test_train_ref_writes_the_per_sample_memorization_arrays(data, cep_run, tmp_path, monkeypatch):
    """--train-ref auto: memorization_s<scale>.npz holds the distances behind mem_ratio_px (its d1 < d2 / 3 share is
    the row's), nearest_s<scale>.npz the first samples beside the training views nearest them; the rows carry the
    condition's scale."""
    import functools
    import data as datasets
    from scoring import metrics as m, shapes, trainset
    monkeypatch.setattr(trainset, "build", functools.partial(trainset.build, num_fresh=50))   # a quick chance level
    monkeypatch.setattr(shapes, "item_iou", lambda images, labels: np.zeros(len(images)))    # not measured here
    out = tmp_path / "eval"
    assert ev.main([str(cep_run / "last.pt"), "--num-samples", "40", "--cfg-scales", "1,2", "--steps", "2",
                    "--batch-size", "20", "--features", str(data["extractor"]), "--resize", "none", "--is-splits", "2",
                    "--train-ref", "auto", "--npz", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    train_ref = m.load_train_reference(next((out / "features").glob("train-ref-*.npz")))
    items = trainset.images_of(datasets.training_set(json.loads((cep_run / "config.json").read_text())), range(12))
    for row in rows:
        s = row["cfg_scale"]
        assert row["cep_noise_norm"] == pytest.approx(2 / np.sqrt(3))
        assert row["cep_noise_to_embed"] == pytest.approx(row["cep_noise_norm"] / row["class_embed_norm"])
        with np.load(out / f"memorization_s{s:g}.npz") as z:
            arrays = dict(z)
        with np.load(out / f"cfg{s:g}" / "samples.npz") as z:
            samples, labels = z["arr_0"], z["labels"]
        for key in ("d1", "d2", "d1_feat", "d2_feat"):
            assert arrays[key].shape == (40,) and arrays[key].dtype == np.float32
        assert arrays["nearest_item"].shape == (40,) and arrays["nearest_item"].max() < 12
        np.testing.assert_array_equal(arrays["labels"], labels)
        assert np.mean(arrays["d1"] < arrays["d2"] / 3) == row["mem_ratio_px"]
        assert np.mean(arrays["d1_feat"] < arrays["d2_feat"] / 3) == row["mem_ratio_feat"]
        assert np.median(arrays["d1"]) == pytest.approx(row["nn_px_median"], rel=1e-6)
        with np.load(out / f"nearest_s{s:g}.npz") as z:
            shown, nearest, item, view = z["samples"], z["nearest"], z["nearest_item"], z["nearest_view"]
        assert shown.shape == nearest.shape == (32, 16, 16, 3) and nearest.dtype == np.uint8
        np.testing.assert_array_equal(shown, samples[:32])
        np.testing.assert_array_equal(nearest, train_ref["pixels"][view])           # the view nearest each sample,
        assert all(np.array_equal(n, items[i]) or np.array_equal(n, items[i][:, ::-1]) for n, i in zip(nearest, item))
        d1 = np.linalg.norm(shown.reshape(32, -1) / 127.5 - nearest.reshape(32, -1) / 127.5, axis=1)
        np.testing.assert_allclose(d1, arrays["d1"][:32], rtol=1e-5)               # ... at the distance d1
