"""FID with torchmetrics' FrechetInceptionDistance and torch-fidelity's Inception weights.

The real statistics (sums of features and of their outer products) are computed
once per dataset and resolution and cached on disk; every later evaluation only
runs the generated images through Inception. Any nn.Module mapping images to
(N, D) features can stand in for Inception (tests do), injected exactly where
Inception goes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from difflab.errors import MissingFileError

from evaluation.digits_classifier import default_cache_dir
from evaluation.frechet import atomic_write

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


NO_FID_HINT = "To train without FID, pass callbacks.quality=null (samples and checkpoints are unaffected)."


def find_inception_weights(path: str | os.PathLike | None = None) -> str | None:
    """The weights file from `path`, $DIFFLAB_INCEPTION or torch's hub cache; None if none exists."""
    candidates = [path, os.environ.get("DIFFLAB_INCEPTION"), Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return str(candidate)
    if path:
        raise MissingFileError(f"Inception weights not found at {path} (expected torch-fidelity's {INCEPTION_FILE}). {NO_FID_HINT}")
    return None


def _missing_weights(err: Exception) -> MissingFileError:
    return MissingFileError(
        f"FID needs torch-fidelity's Inception weights ({INCEPTION_FILE}, ~91 MB) and could not load or download "
        f"them ({type(err).__name__}: {err}). Download {INCEPTION_URL} on a machine with internet and either put it in "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'} or pass its path (callbacks.quality / evaluate.py: "
        "inception_weights=PATH, or set DIFFLAB_INCEPTION=PATH). No other network is substituted for it. "
        f"{NO_FID_HINT}"
    )


def inception_fid(weights_path: str | None, input_img_size: tuple[int, ...]):
    """torchmetrics' FID with torch-fidelity's InceptionV3 ('pt_inception-2015-12-05', 2048-d pool features) from a
    local file or the usual cache (downloading it is torch-fidelity's own behaviour and needs the internet). It takes
    float images in [0, 1] and converts them to uint8 itself, which it does only for its built-in extractor (a module
    passed as `feature` gets the floats, and Inception refuses them)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    local = find_inception_weights(weights_path)
    try:
        return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=local, reset_real_features=False,
                                        normalize=True, input_img_size=input_img_size)
    except Exception as err:
        raise _missing_weights(err) from err


class InceptionFID:
    """FID of generated images (in [-1, 1]) against a datamodule's real training images."""

    name = "fid"

    def __init__(
        self,
        datamodule,
        feature_extractor: nn.Module | None = None,
        inception_weights: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_real: int | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 250,
    ):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if feature_extractor is None:
            self.extractor_id = "inception2015"
            self.metric = inception_fid(inception_weights, tuple(datamodule.data_shape)).to(device)
        else:  # a stand-in (tests): it gets the float images in [0, 1] as they are
            self.extractor_id = getattr(feature_extractor, "cache_id", type(feature_extractor).__name__)
            self.metric = FrechetInceptionDistance(feature=feature_extractor, reset_real_features=False, normalize=True,
                                                   input_img_size=tuple(datamodule.data_shape)).to(device)
        self.datamodule = datamodule
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_real = max_real
        cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
        suffix = f"_n{max_real}" if max_real else ""
        self.cache_path = cache_root / "fid_stats" / f"{datamodule.fid_name}_{self.extractor_id}{suffix}.pt"
        self.real_images_seen = 0
        self._floor: float | None = None
        self._load_or_compute_real()

    @staticmethod
    def _to_unit(x: torch.Tensor) -> torch.Tensor:
        return ((x.float().clamp(-1, 1) + 1) / 2).to(torch.float32)

    def _load_or_compute_real(self) -> None:
        if self.cache_path.is_file():
            states = torch.load(self.cache_path, map_location=self.device, weights_only=True)
        else:
            for batch in self.datamodule.real_images_for_fid("train", self.max_real):
                self.metric.update(self._to_unit(batch["x"]).to(self.device), real=True)
                self.real_images_seen += batch["x"].shape[0]
            states = {name: getattr(self.metric, name).detach().cpu() for name in REAL_STATES}
            atomic_write(self.cache_path, lambda f: torch.save(states, f))
        self._set_real(states)

    def _set_real(self, states: dict) -> None:
        # Under DDP compute() sums states over ranks: only rank 0 holds the real statistics, so they count once.
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        for name in REAL_STATES:
            value = states[name].to(self.device)
            setattr(self.metric, name, value if rank == 0 else torch.zeros_like(value))

    def to(self, device: str | torch.device) -> "InceptionFID":
        self.device = torch.device(device)
        self.metric.to(self.device)
        return self

    def update(self, samples: torch.Tensor) -> None:
        for chunk in samples.split(self.batch_size):
            self.metric.update(self._to_unit(chunk).to(self.device), real=False)

    def compute(self) -> float:
        """FID over every rank's updates since the last reset; resets the generated side only."""
        value = float(self.metric.compute())
        self.metric.reset()  # keeps the real statistics (reset_real_features=False)
        return value

    def __call__(self, samples: torch.Tensor) -> float:
        self.update(samples)
        return self.compute()

    def floor(self, num_images: int | None = 10_000) -> float:
        """FID of up to `num_images` held-out real images (the val split) against the training statistics."""
        if self._floor is None:
            seen = 0
            for batch in self.datamodule.real_images_for_fid("val", num_images):
                self.update(batch["x"])
                seen += batch["x"].shape[0]
            self._floor = self.compute()
        return self._floor
