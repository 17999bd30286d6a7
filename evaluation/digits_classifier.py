"""Offline sample quality for the 8x8 digits: a Frechet distance in the feature
space of a small CNN trained by the project (the digits analogue of FID).

The classifier is trained once on the train split with a fixed seed and cached
under `$DIFFLAB_CACHE` (default `~/.cache/difflab`); the reference statistics
of the train split are cached next to it, keyed by a digest of the weights so a
retrained classifier never meets stale statistics.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from evaluation.frechet import FrechetDistance, atomic_write

CLASSIFIER_VERSION = 1
TRAIN_SEED = 0
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFLAB_CACHE") or Path.home() / ".cache" / "difflab")


DIGITS_MAX = 16.0  # pixel values in load_digits are integers 0..16


def load_digits_split(split: str, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images in [-1, 1] shaped (N, 1, 8, 8) float32 and labels (N,) int64.

    The split is a fixed permutation of the 1797 images (seed 0 by default), so the digits classifier, the
    Frechet floor and every training run (datamodules.digits reads it from here) see the same train/val split.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    digits = load_digits()
    images = (digits.images.astype(np.float32) / DIGITS_MAX) * 2.0 - 1.0
    images = images[:, None]
    labels = digits.target.astype(np.int64)
    if split == "all":
        return images, labels
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(val_fraction * len(images)))
    idx = order[:n_val] if split == "val" else order[n_val:]
    return images[idx], labels[idx]


def _digits_split(split: str, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return load_digits_split(split, val_fraction=val_fraction, seed=seed)


def _split_tensors(split: str, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _digits_split(split, val_fraction, seed)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(np.ascontiguousarray(labels))


class DigitsClassifier(nn.Module):
    """conv(1->32) -> conv(32->64) -> pool -> fc(128) -> fc(10); features = the 128-d layer."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()


def train_digits_classifier(
    val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = DEFAULT_SPLIT_SEED, epochs: int = 15
) -> tuple[DigitsClassifier, float]:
    """Train on the train split only (the val split stays unseen for the floor)."""
    # Metrics are often built inside Lightning's validation loop, which runs under inference mode.
    with torch.inference_mode(False), torch.enable_grad():
        return _train(val_fraction, seed, epochs)


def _train(val_fraction: float, seed: int, epochs: int) -> tuple[DigitsClassifier, float]:
    x_train, y_train = _split_tensors("train", val_fraction, seed)
    x_val, y_val = _split_tensors("val", val_fraction, seed)
    # One thread: the batches are tiny, and multi-threaded OpenMP on a busy
    # machine (parallel test runs) was measured 30x slower; it also makes the
    # weights independent of the core count.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # fork_rng: training it (once per cache) must not move the caller's RNG, or a run that happens to train it
    # would draw other noise than its resumed copy, which finds it cached.
    with torch.random.fork_rng(devices=[]):
        return _train_seeded(x_train, y_train, x_val, y_val, epochs, num_threads)


def _train_seeded(x_train, y_train, x_val, y_val, epochs: int, num_threads: int) -> tuple[DigitsClassifier, float]:
    try:
        torch.manual_seed(TRAIN_SEED)
        gen = torch.Generator().manual_seed(TRAIN_SEED)
        model = DigitsClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x_train), generator=gen).split(64):
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
        return model, accuracy(model, x_val, y_val)
    finally:
        torch.set_num_threads(num_threads)


def _classifier_path(cache_dir: Path, val_fraction: float, seed: int) -> Path:
    suffix = "" if (val_fraction, seed) == (DEFAULT_VAL_FRACTION, DEFAULT_SPLIT_SEED) else f"_vf{val_fraction}_s{seed}"
    return cache_dir / f"digits_classifier_v{CLASSIFIER_VERSION}{suffix}.pt"


def load_digits_classifier(
    cache_dir: str | Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
) -> tuple[DigitsClassifier, float]:
    """The cached classifier (eval mode) and its val accuracy; trains and caches it on first use.

    A non-default split gets its own file, since a classifier trained on another
    split may have seen these val images.
    """
    path = _classifier_path(Path(cache_dir) if cache_dir is not None else default_cache_dir(), val_fraction, seed)
    model = DigitsClassifier()
    if path.exists():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
        model.eval()
        return model, float(ckpt["val_accuracy"])
    start = time.perf_counter()
    model, val_acc = train_digits_classifier(val_fraction, seed)
    checkpoint = {
        "state_dict": model.state_dict(),
        "val_accuracy": val_acc,
        "val_fraction": val_fraction,
        "split_seed": seed,
        "train_seconds": time.perf_counter() - start,
    }
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    return model, val_acc


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class DigitsFrechetDistance:
    """Frechet distance of samples to the digits train split in classifier-feature space.

    The estimate is biased upwards at small sample sizes (the covariance of N
    samples is noisy), so compare models at N >= 359, the size of the val split
    whose score is `floor()`: scores below the floor are not meaningful, and
    scores at smaller N are not comparable with it.
    """

    name = "digits_frechet"

    def __init__(self, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = DEFAULT_SPLIT_SEED, cache_dir=None):
        self.val_fraction = val_fraction
        self.seed = seed
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.classifier, self.classifier_accuracy = load_digits_classifier(cache_dir, val_fraction, seed)
        stats_path = cache_dir / f"digits_frechet_ref_vf{val_fraction}_s{seed}_{_weights_digest(self.classifier)}.npz"
        reference = None if stats_path.exists() else _split_tensors("train", val_fraction, seed)[0]
        self._frechet = FrechetDistance(self._features, reference=reference, cache_path=stats_path)
        self._floor: float | None = None

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        # Clamping matches what a rendered sample would show; out-of-range pixels
        # would otherwise put features far outside anything seen in training.
        x = torch.as_tensor(x).detach().to("cpu", torch.float32).clamp(-1.0, 1.0)
        return self.classifier.features(x.reshape(-1, 1, 8, 8))

    def __call__(self, samples: torch.Tensor) -> float:
        return self._frechet(samples)

    def floor(self, n: int | None = None) -> float:
        """Score of the 359 real val images (never trained on) against train.

        `n` is accepted for a uniform interface and ignored: the held-out split has a fixed size.
        """
        if self._floor is None:
            self._floor = self(_split_tensors("val", self.val_fraction, self.seed)[0])
        return self._floor
