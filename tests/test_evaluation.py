"""Offline sample-quality metrics: Frechet distance, the digits classifier metric, sliced W1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation import digits_classifier as dc
from evaluation.frechet import FrechetDistance, frechet_distance, gaussian_stats
from evaluation.sliced_wasserstein import SlicedWassersteinToReference, sliced_wasserstein


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- Frechet distance -------------------------------------------------------


def test_frechet_zero_for_identical_stats():
    feats = torch.randn(500, 6, generator=_gen(0))
    mu, sigma = gaussian_stats(feats)
    assert mu.dtype == np.float64 and sigma.shape == (6, 6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_closed_form_diagonal():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_singular_covariances():
    # Rank-deficient covariances (fewer samples than dimensions) must stay finite and exact.
    a, b = np.array([1.0, 2.0, 0.0, 0.0]), np.array([4.0, 0.0, 1.0, 0.0])
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(np.zeros(4), np.diag(a), np.zeros(4), np.diag(b)) == pytest.approx(expected)


N, D = 2000, 4
# Expected distance between two N-sample Gaussian fits of N(0, I_D): 2D/N from the
# means plus about D(D+1)/(2N) from the covariances; allow 5x that.
SAMPLING_BOUND = 5 * (2 * D + D * (D + 1) / 2) / N


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1)


def test_frechet_two_draws_of_same_gaussian_is_small():
    x, y = torch.randn(N, D, generator=_gen(1)), torch.randn(N, D, generator=_gen(2))
    assert FrechetDistance(_identity, reference=x)(y) < SAMPLING_BOUND


def test_frechet_grows_with_mean_shift():
    x, y = torch.randn(N, D, generator=_gen(1)), torch.randn(N, D, generator=_gen(2))
    metric = FrechetDistance(_identity, reference=x)
    shifts = [0.0, 0.5, 1.0, 2.0]
    dists = [metric(y + s) for s in shifts]
    assert all(d1 < d2 for d1, d2 in zip(dists, dists[1:]))
    for s, d in zip(shifts, dists):
        # ||dmu||^2 = s^2 D, up to the sampling noise of the mean (std sqrt(2D/N) along the shift).
        assert d == pytest.approx(s**2 * D, abs=SAMPLING_BOUND + 8 * s * np.sqrt(2 * D / N))


def test_frechet_reference_stats_cached_and_reused(tmp_path):
    calls = []

    def feature_fn(x):
        calls.append(len(x))
        return _identity(x)

    x, y = torch.randn(N, D, generator=_gen(1)), torch.randn(300, D, generator=_gen(2))
    path = tmp_path / "stats" / "ref.npz"
    first = FrechetDistance(feature_fn, reference=x, cache_path=path, batch_size=512)
    assert path.exists() and sum(calls) == N and len(calls) == 4  # batched
    assert [p.name for p in path.parent.iterdir()] == ["ref.npz"]  # no temporary left behind

    calls.clear()
    second = FrechetDistance(feature_fn, reference=None, cache_path=path)
    assert calls == []
    np.testing.assert_array_equal(second.mu_ref, first.mu_ref)
    np.testing.assert_array_equal(second.sigma_ref, first.sigma_ref)
    assert second(y) == first(y)

    with pytest.raises(ValueError):
        FrechetDistance(feature_fn, reference=None, cache_path=tmp_path / "missing.npz")


# --- digits classifier and its Frechet distance -----------------------------


@pytest.fixture(scope="module")
def cache_dir(difflab_cache):
    # conftest points DIFFLAB_CACHE at a per-session folder: the classifier trains once, ~/.cache is untouched.
    return difflab_cache


@pytest.fixture(scope="module")
def digits_metric(cache_dir):
    return dc.DigitsFrechetDistance()


def test_the_digits_split_is_a_fixed_partition_the_datamodule_shares():
    from datamodules.digits import DigitsDataModule  # a broken project import must fail here, not skip

    images, labels = dc.load_digits_split("all")
    train, val = dc.load_digits_split("train", 0.2, 0), dc.load_digits_split("val", 0.2, 0)
    assert len(val[0]) == round(0.2 * len(images)) and len(train[0]) + len(val[0]) == len(images) == 1797
    rows = {tuple(x.ravel()) + (int(y),) for x, y in zip(images, labels)}
    assert {tuple(x.ravel()) + (int(y),) for x, y in zip(*train)} | {tuple(x.ravel()) + (int(y),) for x, y in zip(*val)} == rows
    assert images.min() == -1.0 and images.max() == 1.0
    np.testing.assert_array_equal(dc.load_digits_split("val", 0.2, 0)[0], val[0])  # the same split every call
    assert not np.array_equal(dc.load_digits_split("val", 0.2, 1)[0], val[0])  # and another for another seed
    np.testing.assert_array_equal(DigitsDataModule(val_fraction=0.2, split_seed=0).load_split("val").numpy(), val[0])


def test_classifier_accuracy_and_cache_reuse(cache_dir, monkeypatch):
    path = cache_dir / "digits_classifier_v1.pt"
    model, acc = dc.load_digits_classifier()
    assert path.exists()
    assert acc >= 0.97
    assert not model.training
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("classifier was retrained despite the cache")

    monkeypatch.setattr(dc, "train_digits_classifier", no_training)
    model2, acc2 = dc.load_digits_classifier()
    assert acc2 == acc and path.stat().st_mtime_ns == mtime
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)


def test_digits_frechet_orders_sample_quality(digits_metric):
    metric = digits_metric
    assert metric.name == "digits_frechet" and metric.classifier_accuracy >= 0.97
    floor = metric.floor()
    val_images = torch.from_numpy(dc._digits_split("val", 0.2, 0)[0])
    assert metric(val_images) == pytest.approx(floor)

    train_images = torch.from_numpy(dc._digits_split("train", 0.2, 0)[0])
    subset = train_images[torch.randperm(len(train_images), generator=_gen(0))[: len(val_images)]]
    noise = torch.rand(len(val_images), 1, 8, 8, generator=_gen(1)) * 2 - 1
    blur = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    degraded = F.conv2d(F.pad(subset, (1, 1, 1, 1), mode="replicate"), blur[None, None]) + 0.3

    real_score, noise_score, degraded_score = metric(subset), metric(noise), metric(degraded)
    # Train images are part of the reference (and were trained on), so they may
    # score below the floor, but never far above it.
    assert real_score < 2 * floor
    assert noise_score > 10 * floor
    assert 2 * floor < degraded_score < noise_score
    # Out-of-range pixels are clamped, as a rendered sample would be.
    assert metric(noise * 5) == pytest.approx(metric((noise * 5).clamp(-1, 1)))


def test_digits_reference_stats_reused(digits_metric, cache_dir, monkeypatch):
    assert len(list(cache_dir.glob("digits_frechet_ref_*.npz"))) == 1

    def no_reference(*args, **kwargs):
        raise AssertionError("train split reloaded despite cached reference statistics")

    monkeypatch.setattr(dc, "_split_tensors", no_reference)
    again = dc.DigitsFrechetDistance()
    np.testing.assert_array_equal(again._frechet.mu_ref, digits_metric._frechet.mu_ref)


# --- sliced Wasserstein -----------------------------------------------------


def test_sliced_wasserstein_separates_distributions():
    x = torch.randn(2000, 2, generator=_gen(0))
    same = sliced_wasserstein(x, torch.randn(2000, 2, generator=_gen(1)))
    shifted = sliced_wasserstein(x, torch.randn(2000, 2, generator=_gen(2)) + 1.0)
    assert same < 0.1
    assert shifted > 0.5 and shifted > 10 * same


def test_sliced_wasserstein_unequal_sizes_is_exact_in_1d():
    from scipy import stats as scipy_stats  # a core dependency

    x = torch.randn(37, 1, generator=_gen(0))
    y = torch.randn(101, 1, generator=_gen(1)) + 0.3
    expected = scipy_stats.wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy())
    # In 1-D every unit direction is +-1, which leaves W1 unchanged.
    assert sliced_wasserstein(x, y, num_projections=3) == pytest.approx(expected, rel=1e-9)


def test_sliced_wasserstein_to_reference_floor():
    def sample_fn(n, generator):
        return torch.randn(n, 2, generator=generator)

    metric = SlicedWassersteinToReference(sample_fn, num_reference=2000, seed=0)
    assert metric.name == "sliced_w1"
    floor = metric.floor()
    assert floor == metric.floor()  # deterministic, cached
    shifted = metric(sample_fn(2000, _gen(5)) + 0.25)
    assert floor < shifted
    assert metric(sample_fn(2000, _gen(6))) < shifted
    assert metric.floor(200) > floor  # fewer samples, noisier estimate
