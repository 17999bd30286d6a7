"""FID through the real path: torch-fidelity's Inception architecture loaded from a weights file on disk (randomly
initialised here: the real weights cannot be downloaded), torchmetrics' uint8 conversion and resize, and
`evaluate.py metric=fid` end to end on fake CIFAR-10. The stand-in extractor of test_fid.py is affine-equivariant,
so it cannot see a wrong [-1, 1] -> [0, 1] mapping; the uint8 images that reach Inception can."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cli_harness import run_script
from evaluation import fid as fid_module
from evaluation.fid import INCEPTION_FILE, InceptionFID
from test_image_datamodules import write_fake_cifar10


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A random-init state dict of torch-fidelity's InceptionV3 (the real file's layout and size, 91 MB)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    original_load, original_state = torch.load, nn.Module.load_state_dict
    torch.load = lambda *a, **k: {}  # build the architecture without any weights file
    nn.Module.load_state_dict = lambda self, *a, **k: None
    try:
        torch.manual_seed(0)
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path="none")
    finally:
        torch.load, nn.Module.load_state_dict = original_load, original_state
    torch.save(net.state_dict(), path)
    return path


class FakeImages:
    data_shape = (3, 8, 8)
    fid_name = "fake_real_path"

    def __init__(self, images: torch.Tensor):
        self.images = images

    def real_images_for_fid(self, split, max_images=None):
        return [{"x": self.images[: max_images or len(self.images)]}]


def test_inception_sees_the_uint8_image_of_minus_one_to_one_samples(inception_file, tmp_path):
    """-1 -> 0, 0 -> 127, 1 -> 255 (torchmetrics truncates x * 255): the pixels, not just their order, must match."""
    levels = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    real = levels.reshape(5, 1, 1, 1).expand(5, 3, 8, 8).contiguous()
    metric = InceptionFID(FakeImages(real), inception_weights=str(inception_file), cache_dir=tmp_path)
    seen = []
    metric.metric.inception.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].clone()))
    metric.update(real)
    assert seen and seen[-1].dtype == torch.uint8
    pixels = seen[-1].flatten(1)
    assert pixels.min(1).values.tolist() == pixels.max(1).values.tolist() == [0, 63, 127, 191, 255]


def test_real_statistics_count_once_over_ranks(inception_file, tmp_path, monkeypatch):
    """compute() sums states over ranks: rank 0 holds the real statistics, the others zeros."""
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rank0 = InceptionFID(FakeImages(images), inception_weights=str(inception_file), cache_dir=tmp_path)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    rank1 = InceptionFID(FakeImages(images), inception_weights=str(inception_file), cache_dir=tmp_path)  # from the cache
    for name in fid_module.REAL_STATES:
        assert torch.count_nonzero(getattr(rank1.metric, name)) == 0
        assert torch.equal(getattr(rank0.metric, name) + getattr(rank1.metric, name), getattr(rank0.metric, name))
    assert int(rank0.metric.real_features_num_samples) == 6


@pytest.mark.slow
def test_evaluate_py_metric_fid_end_to_end(inception_file, tmp_path):
    write_fake_cifar10(tmp_path / "cifar-10-batches-py")
    common = [f"data.root={tmp_path}", "data.val_size=8", "data.num_workers=0"]
    run = run_script("train.py", "data=cifar10", *common, "net=unet_small", "data.batch_size=4", "trainer.max_steps=2",
                     "trainer.val_check_interval=2", "callbacks.quality=null", "callbacks.sample_logger=null",
                     "callbacks.exposure_bias=null", "logger=csv", "final_eval.num_samples=4", "model.num_timesteps=20",
                     "model.sampling.steps=2", "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert run.code == 0, run.stderr[-3000:]
    out = tmp_path / "fid.json"
    result = run_script("evaluate.py", f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "metric=fid", "num_samples=8",
                        f"inception_weights={inception_file}", f"out={out}", "progress=false", "batch_size=8")
    assert result.code == 0, result.stderr[-3000:]
    figure = json.loads(out.read_text())
    assert figure["metric"] == "fid" and figure["num_samples"] == 8 and figure["value"] > 0 and figure["floor"] >= 0
    assert "fid =" in result.stdout
