"""fae_fast/eval/fid.py and training/evaluate.py with a randomly initialised conv net as the feature extractor.

These tests check the plumbing (images -> features -> Gaussian moments -> Frechet distance, reference
statistics from folders and ADM .npz files, caches, errors), not Inception numbers: the real extractor's
weights are not downloadable here, and no test ever stands in for them.
"""
import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from fae_fast.eval import fid
from training import evaluate


class RandomConv:
    """A small conv net with fixed random weights: uint8 (B, 3, H, W) -> features (B, 32), logits (B, 10)."""

    name = "random-conv"

    def __init__(self, reads_adm_stats: bool = False):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 10)
        self.reads_adm_stats, self.calls = reads_adm_stats, 0

    @torch.no_grad()
    def __call__(self, images):
        self.calls += 1
        f = self.net(images.float() / 127.5 - 1)
        return f, self.head(f)


def images(n: int, seed: int, brightness: int = 0, size: int = 32) -> np.ndarray:
    """Smooth random images (N, size, size, 3) uint8, optionally brightened by a constant offset."""
    rng = np.random.default_rng(seed)
    base = rng.normal(128, 40, (n, size // 4, size // 4, 3)).repeat(4, 1).repeat(4, 2)
    return np.clip(base + rng.normal(0, 10, base.shape) + brightness, 0, 255).astype(np.uint8)


def batches(x: np.ndarray, size: int = 50):
    return (x[i: i + size] for i in range(0, len(x), size))


def reference_of(x: np.ndarray, extractor) -> fid.Reference:
    feats = fid.extract_features(batches(x), extractor).features
    return fid.Reference(*fid.moments(feats), feats, "test")


def fid_of(a: np.ndarray, b: np.ndarray, extractor) -> float:
    samples = fid.extract_features(batches(a), extractor)
    return fid.score(samples, reference_of(b, extractor), isc=False, prc=False)["fid"]


def test_fid_plumbing_identical_sets_score_zero_and_shifted_sets_more():
    """Plumbing, not Inception numbers: the same 400 images give ~0; a second draw of the same
    distribution gives the estimator's floor; brightness offsets give clearly more, growing with the offset."""
    extractor, a = RandomConv(), images(400, seed=0)
    same = fid_of(a, a, extractor)
    floor = fid_of(a, images(400, seed=1), extractor)
    small, large = fid_of(a, images(400, seed=1, brightness=30), extractor), fid_of(a, images(400, 1, 80), extractor)
    assert abs(same) < 1e-8
    assert floor > 0
    assert small > 5 * floor and large > 2 * small, (floor, small, large)


def test_fid_does_not_depend_on_the_batch_size():
    extractor, a, b = RandomConv(), images(120, 0), images(120, 1, 20)
    ref = reference_of(b, extractor)
    scores = [fid.score(fid.extract_features(batches(a, size), extractor), ref, isc=False, prc=False)["fid"]
              for size in (7, 120)]
    assert scores[0] == pytest.approx(scores[1], rel=1e-6)


def test_feature_progress_reports_count_rate_and_eta(capsys):
    progress = fid.FeatureProgress("samples", total=300, every=0.0)
    fid.extract_features(batches(images(300, 0), size=100), RandomConv(), progress=progress)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" images")[0] for line in lines] == ["samples: 100/300", "samples: 200/300", "samples: 300/300"]
    assert all(" img/s | ETA " in line for line in lines) and lines[-1].endswith("ETA 0:00:00")


def test_non_uint8_images_are_refused():
    with pytest.raises(ValueError, match=r"images must be uint8 \(N, H, W, 3\)"):
        fid.extract_features([images(4, 0).astype(np.float32)], RandomConv())


def test_folder_reference_is_computed_once_then_read_from_its_cache(tmp_path):
    folder = tmp_path / "ref"
    folder.mkdir()
    data = images(30, 0, size=64)
    for i, img in enumerate(data):
        Image.fromarray(img).resize((80, 64)).save(folder / f"{i:03d}.png")  # not square: ADM's center crop
    extractor = RandomConv()
    first = fid.load_reference(folder, extractor, batch=8, size=32, workers=0)
    calls = extractor.calls
    second = fid.load_reference(folder, extractor, batch=8, size=32, workers=0)
    assert calls == 4 and extractor.calls == calls  # 30 images in batches of 8, then nothing
    assert Path(f"{folder}.random-conv.stats.npz").is_file()
    assert torch.equal(first.mu, second.mu) and torch.equal(first.features, second.features)
    assert first.features.shape == (30, 32)
    Image.fromarray(data[0]).save(folder / "extra.png")  # the folder changed: recomputed, not stale
    assert fid.load_reference(folder, extractor, batch=8, size=32, workers=0).features.shape == (31, 32)


def test_adm_reference_batch_mu_sigma_are_used_only_by_an_extractor_that_reads_them(tmp_path):
    ref_images = images(60, 3)
    mu, sigma = np.full(32, 0.5), np.eye(32) * 2.0
    path = tmp_path / "VIRTUAL_test.npz"
    np.savez(path, arr_0=ref_images, mu=mu, sigma=sigma)
    adm = fid.load_reference(path, RandomConv(reads_adm_stats=True), batch=16)
    assert np.array_equal(adm.mu.numpy(), mu) and np.array_equal(adm.sigma.numpy(), sigma)
    assert adm.features.shape == (60, 32)  # precision/recall still use the reference images
    other = fid.load_reference(path, RandomConv(), batch=16, cache=tmp_path / "c.npz")
    expected = reference_of(ref_images, RandomConv())
    torch.testing.assert_close(other.mu, expected.mu)
    with pytest.raises(ValueError, match="dimension 32 but the extractor gives 5"):
        fid.score(fid.Features(torch.zeros(3, 5), None), other)
    np.savez(tmp_path / "empty.npz", labels=np.arange(3))
    with pytest.raises(ValueError, match="holds neither images"):
        fid.load_reference(tmp_path / "empty.npz", RandomConv())


def test_missing_inception_weights_say_which_file_goes_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    target = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError) as err:
        fid.inception_weights_path()
    assert f"place it at {target}" in str(err.value) and fid.INCEPTION_URL in str(err.value)
    with pytest.raises(FileNotFoundError, match="Inception weights file /nowhere/w.pth does not exist"):
        fid.inception_weights_path("/nowhere/w.pth")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"placed by hand")
    assert fid.inception_weights_path() == target  # found where the error said, no download tried


def test_a_corrupt_inception_file_is_named(tmp_path):
    pytest.importorskip("torch_fidelity")
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(RuntimeError, match=f"Inception weights file {bad} could not be loaded"):
        fid.InceptionExtractor(torch.device("cpu"), str(bad))


def test_inception_extractor_wires_torch_fidelitys_network(tmp_path, monkeypatch):
    """The real network with random weights (its file cannot be downloaded here): pool features and
    unbiased logits come back in that order and shape. Plumbing only; no score is computed."""
    inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.save({}, tmp_path / "empty.pth")
    extractor = fid.InceptionExtractor(torch.device("cpu"), str(tmp_path / "empty.pth"))
    features, logits = extractor(torch.from_numpy(images(2, 0, size=64)).permute(0, 3, 1, 2))
    assert features.shape == (2, 2048) and logits.shape == (2, 1008) and extractor.name == "inception-v3-compat"


def test_missing_torch_fidelity_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch_fidelity", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[eval\]"):
        fid.inception_score(torch.zeros(10, 3))


def test_inception_score_and_precision_recall_through_torch_fidelity():
    pytest.importorskip("torch_fidelity")
    confident = torch.eye(10).repeat(20, 1) * 50  # 200 samples, 10 classes, each certain: IS = 10
    assert fid.inception_score(confident, splits=1)["inception_score"] == pytest.approx(10, rel=1e-3)
    assert fid.inception_score(torch.zeros(200, 10))["inception_score"] == pytest.approx(1)
    a = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    b = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    assert fid.precision_recall(a, a) == {"precision": 1.0, "recall": 1.0}
    far = fid.precision_recall(a + 10, b)
    assert far["precision"] == 0 and far["recall"] == 0
    near = fid.precision_recall(a, b)
    assert near["precision"] > 0.5 and near["recall"] > 0.5


def test_evaluate_program_writes_one_line_and_a_json(tmp_path, capsys):
    pytest.importorskip("torch_fidelity")
    np.savez(tmp_path / "samples.npz", arr_0=images(100, 0), arr_1=np.arange(100) % 10)
    np.savez(tmp_path / "ref.npz", arr_0=images(80, 1, brightness=40))
    record = evaluate.main([f"--samples={tmp_path / 'samples.npz'}", f"--ref={tmp_path / 'ref.npz'}", "--batch=32"],
                           extractor=RandomConv())
    out = capsys.readouterr().out.splitlines()
    results = [line for line in out if line.startswith("FID ")]
    assert len(results) == 1 and results[0].startswith(f"FID {record['fid']:.3f} | IS ")
    assert "precision" in results[0] and "(random-conv)" in results[0]
    # each long pass ends with a progress line: its count, its rate and an ETA of zero
    assert any(line.startswith("samples: 100/100 images |") and line.endswith("ETA 0:00:00") for line in out), out
    assert any(line.startswith("reference ") and "80/80 images" in line for line in out), out
    saved = json.loads((tmp_path / "samples.npz.metrics.json").read_text())
    assert saved["fid"] == record["fid"] > 0 and saved["num_samples"] == 100 and saved["extractor"] == "random-conv"


def test_evaluate_program_without_inception_weights_stops_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    np.savez(tmp_path / "s.npz", arr_0=images(4, 0))
    with pytest.raises((FileNotFoundError, ImportError), match="Inception weights|pip install"):
        evaluate.main([f"--samples={tmp_path / 's.npz'}", f"--ref={tmp_path / 's.npz'}"])
    with pytest.raises(FileNotFoundError, match="--ref='/no/ref.npz' does not exist"):
        evaluate.main([f"--samples={tmp_path / 's.npz'}", "--ref=/no/ref.npz"])
    np.savez(tmp_path / "latents.npz", arr_0=np.zeros((4, 16, 4), np.float32))
    with pytest.raises(ValueError, match=r"shape \(4, 16, 4\), not images"):
        evaluate.main([f"--samples={tmp_path / 'latents.npz'}", f"--ref={tmp_path / 's.npz'}"])


def test_a_damaged_npz_is_named(tmp_path):
    bad = tmp_path / "samples_10x8x8x3.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=f"{bad} is not a readable .npz with arr_0"):
        evaluate.parse_args([f"--samples={bad}", f"--ref={tmp_path}"])


@pytest.mark.parametrize("n", [40, 300])  # fewer samples than dimensions (the toy at 16x16x32), and more
def test_low_rank_gaussian_scores_as_the_dense_frechet_distance(n):
    from fae_fast.eval.frechet import LowRankGaussian, moments

    g = torch.Generator().manual_seed(n)
    d, k = 96, 7
    truth = LowRankGaussian(torch.randn(d, generator=g), torch.randn(d, k, generator=g), floor=0.3)
    samples = 0.5 + 1.3 * torch.randn(n, 4, d // 4, generator=g, dtype=torch.float64)
    # the d x d computation, written out: R = C^1/2 by eigendecomposition, tr (R S R)^1/2 over its eigenvalues;
    # R S R has rank min(n - 1, d), and its zero eigenvalues come out as +-1e-14 noise whose square roots
    # would add ~1e-6, so only the nonzero ones are summed
    mean, sample_cov = moments(samples)
    vals, vecs = torch.linalg.eigh(truth.covariance())
    root = (vecs * vals.sqrt()) @ vecs.T
    spectrum = torch.linalg.eigvalsh(root @ sample_cov @ root)
    cross = spectrum[spectrum > 1e-9 * spectrum.max()].sqrt().sum()
    dense = float((mean - truth.mean).square().sum() + sample_cov.trace() + truth.covariance().trace() - 2 * cross)
    assert (spectrum > 1e-9 * spectrum.max()).sum() == min(n - 1, d)
    assert truth.frechet_distance(samples) == pytest.approx(dense, rel=1e-9)
    assert truth.frechet_distance(samples) > 10  # far from the truth: the comparison is not of two zeros


def test_toy_references_are_its_class_and_mixture_gaussians():
    from fae_fast.data.toy import ToyLatents

    toy = ToyLatents(num_classes=3, tokens=4, channels=5, rank=2, seed=1)
    for k in range(3):
        reference = toy.reference(k)
        assert torch.equal(reference.mean, toy.means[k])
        torch.testing.assert_close(reference.covariance(), toy.covariance(k), rtol=1e-12, atol=1e-12)
    mean, covariance = toy.mixture_moments()
    mixture = toy.mixture_reference()
    torch.testing.assert_close(mixture.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mixture.covariance(), covariance, rtol=1e-12, atol=1e-12)
    # true samples of the mixture score near its estimator floor, far below a shifted set
    labels = torch.arange(3000) % 3
    true = toy.sample(labels, torch.Generator().manual_seed(2))
    assert mixture.frechet_distance(true) < 0.1 * mixture.frechet_distance(true + 1.0)
