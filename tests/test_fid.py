"""The FID pipeline with a stand-in feature extractor injected where Inception goes."""

import pytest
import torch
from torch import nn

from callbacks.quality import shard_size
from evaluation import fid as fid_module
from evaluation.fid import INCEPTION_FILE, InceptionFID, find_inception_weights, inception_fid
from tests_support_features import MeanColourFeatures


class FakeImages:
    """What InceptionFID needs from an image datamodule: data_shape, fid_name, real_images_for_fid."""

    data_shape = (3, 8, 8)
    fid_name = "fake_8"

    def __init__(self, n=2000, seed=0):
        self.n, self.seed = n, seed
        self.calls = 0

    @staticmethod
    def draw(n, generator, shift=0.0):
        base = torch.rand(n, 3, 1, 1, generator=generator) * 1.2 - 0.6 + shift
        return (base + 0.2 * torch.randn(n, 3, 8, 8, generator=generator)).clamp(-1, 1)

    def real_images_for_fid(self, split, max_images=None):
        self.calls += 1
        g = torch.Generator().manual_seed(self.seed if split == "train" else self.seed + 1)
        x = self.draw(max_images or self.n, g)
        return [{"x": chunk} for chunk in x.split(500)]


def test_fid_is_near_zero_for_one_distribution_and_grows_with_a_mean_shift(tmp_path):
    metric = InceptionFID(FakeImages(), feature_extractor=MeanColourFeatures(), cache_dir=tmp_path)
    g = torch.Generator().manual_seed(5)
    same = metric(FakeImages.draw(2000, g))
    shifts = [0.1, 0.2, 0.4]
    shifted = [metric(FakeImages.draw(2000, g, shift)) for shift in shifts]
    # two draws of 2000 from one distribution: FID ~ D/N-sized noise; a 0.1 mean shift moves 12 features ~0.1 each
    assert same < 0.02
    assert same < shifted[0] < shifted[1] < shifted[2]
    assert shifted[0] > 5 * same


def test_real_statistics_are_cached_once_and_reused(tmp_path):
    data = FakeImages()
    InceptionFID(data, feature_extractor=MeanColourFeatures(), cache_dir=tmp_path)
    cached = list((tmp_path / "fid_stats").glob("fake_8_meancolour.pt"))
    assert len(cached) == 1 and data.calls == 1
    extractor = MeanColourFeatures()
    again = InceptionFID(data, feature_extractor=extractor, cache_dir=tmp_path)
    assert data.calls == 1 and extractor.calls == 0  # nothing recomputed
    g = torch.Generator().manual_seed(6)
    assert again(FakeImages.draw(1000, g)) < 0.05


def test_floor_compares_held_out_real_images(tmp_path):
    metric = InceptionFID(FakeImages(), feature_extractor=MeanColourFeatures(), cache_dir=tmp_path)
    floor = metric.floor(num_images=2000)
    assert 0 < floor < 0.02
    assert metric(FakeImages.draw(2000, torch.Generator().manual_seed(7), 0.2)) > 10 * floor


def test_missing_inception_weights_fail_clearly_and_never_fall_back(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFLAB_INCEPTION", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILE):
        find_inception_weights(tmp_path / "nope.pth")
    assert find_inception_weights() is None
    # Make the download fail for certain (no network here, and none wanted in a test).
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setattr(tf_inception, "URL_INCEPTION_V3", "http://127.0.0.1:9/" + INCEPTION_FILE)
    with pytest.raises(FileNotFoundError, match="DIFFLAB_INCEPTION") as err:
        inception_fid(None, (3, 32, 32))
    assert INCEPTION_FILE in str(err.value) and "No other network" in str(err.value)


def test_shards_add_up_to_the_total():
    for total in (1, 7, 64, 1001):
        for world in (1, 2, 3, 8):
            sizes = [shard_size(total, world, r) for r in range(world)]
            assert sum(sizes) == total and max(sizes) - min(sizes) <= 1
    assert fid_module.REAL_STATES[0] == "real_features_sum"
