"""CIFAR-10 and CelebA datamodules on tiny fake copies in the real on-disk layouts, through the real code paths."""

import io
import os
import pickle
import struct
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from PIL import Image

from conftest import CONFIG_DIR
from datamodules.celeba import CelebADataModule
from datamodules.cifar10 import CIFAR10DataModule

# ---------------------------------------------------------------- fake CIFAR-10
# Image k: red = 8 * row, green = 8 * column (so a flip is visible), blue = 4 * k (its identity).
N_TRAIN_PER_BATCH, N_TEST = 8, 10
N_TRAIN = 5 * N_TRAIN_PER_BATCH


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str opcodes, as in the real batches (pickled by Python 2): loaded with
    encoding='latin1' their keys become str, with encoding='bytes' they stay b'data'."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def cifar_image(k: int) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return np.stack([8 * rows, 8 * cols, np.full((32, 32), 4 * k)]).astype(np.uint8)


def write_batch(path: Path, ids: range, label: bytes) -> None:
    data = np.stack([cifar_image(k).reshape(-1) for k in ids])  # row-major R, G, B planes
    labels, names = [k % 10 for k in ids], [b"%d.png" % k for k in ids]
    entry = {b"batch_label": label, b"labels": labels, b"data": data, b"filenames": names}
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(entry)
    path.write_bytes(buffer.getvalue())


@pytest.fixture
def cifar_root(tmp_path) -> Path:
    write_fake_cifar10(tmp_path / "cifar-10-batches-py")
    return tmp_path


def write_fake_cifar10(folder: Path) -> None:
    """The five training batches, the test batch and batches.meta, in the real pickle format."""
    folder.mkdir(parents=True)
    for b in range(5):
        ids = range(b * N_TRAIN_PER_BATCH, (b + 1) * N_TRAIN_PER_BATCH)
        write_batch(folder / f"data_batch_{b + 1}", ids, b"training batch %d of 5" % (b + 1))
    write_batch(folder / "test_batch", range(N_TRAIN, N_TRAIN + N_TEST), b"testing batch 1 of 1")
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump({b"num_cases_per_batch": N_TRAIN_PER_BATCH, b"label_names": [b"airplane"], b"num_vis": 3072})
    (folder / "batches.meta").write_bytes(buffer.getvalue())


def cifar(root, **kwargs) -> CIFAR10DataModule:
    return CIFAR10DataModule(root=str(root), **{"batch_size": 8, "val_size": 10, "num_workers": 0, **kwargs})


def cifar_id(x: torch.Tensor) -> int:
    return round(float((x[2].mean() + 1) * 127.5) / 4)


def is_flipped(x: torch.Tensor) -> bool:
    """The fakes (both datasets) get brighter green to the right; a mirrored one to the left."""
    return bool(x[1, :, 0].mean() > x[1, :, -1].mean())


def no_torchvision_frames(excinfo) -> bool:
    """What the user sees, chained causes included, shows no frame from inside torchvision."""
    return f"{os.sep}torchvision{os.sep}" not in "".join(traceback.format_exception(excinfo.value))


def test_cifar10_reads_the_python_batches_row_major_in_minus_one_to_one(cifar_root):
    dm = cifar(cifar_root, random_flip=False)
    x = dm.dataset("train")[0]["x"]
    assert x.shape == (3, 32, 32) == dm.data_shape and x.dtype == torch.float32
    k = cifar_id(x)
    assert torch.equal(x, torch.from_numpy(cifar_image(k)).float() / 127.5 - 1)  # planes, rows, columns in place
    assert x.min() == -1 and x.max() <= 1
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x"} and batch["x"].shape == (8, 3, 32, 32)
    assert len(dm.train_dataloader()) == (N_TRAIN - 10) // 8  # drop_last for training
    assert dm.fid_name == "cifar10_32"


def test_cifar10_val_is_carved_from_train_by_the_seed(cifar_root):
    def ids(dm, split):
        return [cifar_id(item["x"]) for item in dm.dataset(split)]

    dm = cifar(cifar_root, random_flip=False, val_size=7)
    train, val, test = ids(dm, "train"), ids(dm, "val"), ids(dm, "test")
    assert len(val) == 7 and len(train) == N_TRAIN - 7
    assert sorted(train + val) == list(range(N_TRAIN))
    assert sorted(test) == list(range(N_TRAIN, N_TRAIN + N_TEST))
    assert ids(cifar(cifar_root, val_size=7), "val") == val
    assert ids(cifar(cifar_root, val_size=7, split_seed=1), "val") != val
    with pytest.raises(ValueError, match="val_size"):
        cifar(cifar_root, val_size=N_TRAIN).setup()


def test_cifar10_flips_only_training_images_with_both_orientations(cifar_root):
    dm = cifar(cifar_root)
    torch.manual_seed(0)
    draws = [dm.dataset("train")[0]["x"] for _ in range(20)]
    flipped = [is_flipped(x) for x in draws]
    assert any(flipped) and not all(flipped)
    upright, mirrored = draws[flipped.index(False)], draws[flipped.index(True)]
    assert torch.equal(upright.flip(-1), mirrored)
    for split in ("val", "test"):
        assert not any(is_flipped(dm.dataset(split)[i % 5]["x"]) for i in range(20)), split


def test_cifar10_missing_files_give_one_clear_error(tmp_path, cifar_root):
    with pytest.raises(FileNotFoundError) as excinfo:
        cifar(tmp_path / "nowhere").setup()
    message = str(excinfo.value)
    for needed in ("cifar-10-batches-py", "data_batch_1", "test_batch", "data.download=true", "cifar-10-python.tar.gz"):
        assert needed in message
    assert no_torchvision_frames(excinfo)
    (cifar_root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: \['test_batch'\]"):
        cifar(cifar_root).setup()


def test_cifar10_failed_download_and_corrupt_batch_name_the_problem(tmp_path, cifar_root, monkeypatch):
    import torchvision.datasets

    def offline(self):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(FileNotFoundError, match="download failed.*Network is unreachable") as excinfo:
        cifar(tmp_path / "empty", download=True).setup()
    assert no_torchvision_frames(excinfo)
    cifar(cifar_root, download=True).setup()  # files present: no download attempted
    (cifar_root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"<html>not a pickle</html>")
    with pytest.raises(ValueError, match="data_batch_3"):
        cifar(cifar_root).setup()


def test_cifar10_real_images_for_fid_are_the_whole_official_sets_unflipped(cifar_root):
    dm = cifar(cifar_root, val_size=10)  # random_flip on, as in training
    torch.manual_seed(0)
    train = torch.cat([batch["x"] for batch in dm.real_images_for_fid("train")])
    assert sorted(cifar_id(x) for x in train) == list(range(N_TRAIN))  # the val carve does not change the reference
    assert not any(is_flipped(x) for x in train)
    held_out = torch.cat([batch["x"] for batch in dm.real_images_for_fid("val")])
    assert sorted(cifar_id(x) for x in held_out) == list(range(N_TRAIN, N_TRAIN + N_TEST))
    subset = [cifar_id(x) for batch in dm.real_images_for_fid("train", max_images=5) for x in batch["x"]]
    assert len(set(subset)) == 5 and subset == [cifar_id(x) for b in dm.real_images_for_fid("train", 5) for x in b["x"]]
    assert subset != list(range(5))  # spread over the split, not its first files


def test_render_and_unnormalize_give_pixels(cifar_root):
    dm = cifar(cifar_root)
    x = torch.stack([dm.dataset("val")[i]["x"] for i in range(4)])
    picture = dm.render(x)
    assert isinstance(picture, np.ndarray) and picture.dtype == np.uint8
    assert picture.shape == (2 + 2 * 34, 2 + 2 * 34, 3)  # 2x2 grid of 32x32 with 2-pixel padding
    assert picture[2, 2, 0] == 0 and picture[2 + 31, 2, 0] == 248  # red = 8 * row, top-left image
    pixels = dm.unnormalize(x)
    assert pixels.min() >= 0 and pixels.max() <= 1 and torch.allclose(pixels * 255, (x + 1) * 127.5)


# ---------------------------------------------------------------- fake CelebA
# Image k (178 wide, 218 high, like img_align_celeba): red = 20 + 5k (its identity), green grows
# left to right (a flip is visible), blue marks the geometry: 128 outside the central 140x140
# square, 255 on a 4-pixel ring just inside it, 0 in the middle.
N_CELEBA, CODES = 30, [0, 0, 0, 1, 2]  # 18 train, 6 val, 6 test, interleaved in the file
TOP, LEFT = (218 - 140) // 2, (178 - 140) // 2


def celeba_image(k: int) -> Image.Image:
    pixels = np.zeros((218, 178, 3), np.uint8)
    pixels[..., 0] = 20 + 5 * k
    pixels[..., 1] = np.linspace(0, 255, 178).round()[None, :]
    pixels[..., 2] = 128
    pixels[TOP : TOP + 140, LEFT : LEFT + 140, 2] = 255
    pixels[TOP + 4 : TOP + 136, LEFT + 4 : LEFT + 136, 2] = 0
    return Image.fromarray(pixels)


def make_fake_celeba(folder: Path) -> dict[str, list[int]]:
    (folder / "img_align_celeba").mkdir(parents=True)
    lines, ids = [], {"train": [], "val": [], "test": []}
    for k in range(N_CELEBA):
        name, code = f"{k + 1:06d}.png", CODES[k % len(CODES)]  # PNG: lossless, so the geometry is exact
        celeba_image(k).save(folder / "img_align_celeba" / name)
        lines.append(f"{name} {code}")
        ids[["train", "val", "test"][code]].append(k)
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return ids


@pytest.fixture
def celeba_root(tmp_path) -> Path:
    make_fake_celeba(tmp_path / "celeba")
    return tmp_path


def celeba(root, **kwargs) -> CelebADataModule:
    return CelebADataModule(root=str(root), **{"batch_size": 4, "num_workers": 0, **kwargs})


def celeba_id(x: torch.Tensor) -> int:
    return round((float((x[0].mean() + 1) * 127.5) - 20) / 5)


@pytest.mark.parametrize("layout", ["celeba/", "directly under root"])
def test_celeba_splits_follow_the_partition_file_in_both_layouts(tmp_path, layout):
    expected = make_fake_celeba(tmp_path / "celeba" if layout == "celeba/" else tmp_path)
    dm = celeba(tmp_path, random_flip=False)
    for split in ("train", "val", "test"):
        assert [celeba_id(item["x"]) for item in dm.dataset(split)] == expected[split], split
    assert [len(expected[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x"} and batch["x"].shape == (4, 3, 64, 64) == (4, *dm.data_shape)
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1


def test_celeba_center_crop_140_removes_the_border_then_resizes(celeba_root):
    x = celeba(celeba_root).dataset("val")[0]["x"]
    blue = (x[2] + 1) * 127.5
    assert x.shape == (3, 64, 64)
    # The ring just inside the crop fills the outermost pixels; any of the border (128) would dim them.
    edges = torch.cat([blue[0], blue[-1], blue[:, 0], blue[:, -1]])
    assert edges.min() == 255
    assert torch.all(blue[4:-4, 4:-4] == 0)  # the middle of the square stays the middle
    assert torch.all(x[1, :, 0] < -0.5) and torch.all(x[1, :, -1] > 0.5)  # green gradient, un-flipped
    small = celeba(celeba_root, resolution=32)
    assert small.dataset("test")[0]["x"].shape == (3, 32, 32) == small.data_shape
    assert (small.fid_name, celeba(celeba_root).fid_name) == ("celeba_32", "celeba_64")


def test_celeba_flips_only_training_images_with_both_orientations(celeba_root):
    dm = celeba(celeba_root)
    torch.manual_seed(0)
    draws = [dm.dataset("train")[0]["x"] for _ in range(20)]
    flipped = [is_flipped(x) for x in draws]
    assert any(flipped) and not all(flipped)
    assert torch.equal(draws[flipped.index(False)].flip(-1), draws[flipped.index(True)])
    for split in ("val", "test"):
        assert not any(is_flipped(dm.dataset(split)[i % 6]["x"]) for i in range(20)), split


def test_celeba_missing_data_gives_one_clear_error(tmp_path, celeba_root):
    with pytest.raises(FileNotFoundError) as excinfo:
        celeba(tmp_path / "nowhere").setup()
    message = str(excinfo.value)
    for needed in ("img_align_celeba", "list_eval_partition.txt", str(tmp_path / "nowhere" / "celeba"), "data.download=true", "gdown"):
        assert needed in message
    assert no_torchvision_frames(excinfo)

    (celeba_root / "celeba" / "img_align_celeba" / "000007.png").unlink()
    with pytest.raises(FileNotFoundError, match="000007.png"):
        celeba(celeba_root).setup()
    (celeba_root / "celeba" / "list_eval_partition.txt").write_text("000001.png 0\n000002.png train\n")
    with pytest.raises(ValueError, match="line 2"):
        celeba(celeba_root).setup()


def test_celeba_uses_torchvision_only_to_download_missing_data(tmp_path, celeba_root, monkeypatch):
    import torchvision.datasets

    def no_gdown(self):
        raise RuntimeError("To download files from GDrive, 'gdown' is required.")

    monkeypatch.setattr(torchvision.datasets.CelebA, "download", no_gdown)
    assert len(celeba(celeba_root, download=True).dataset("train")) == 18  # extracted copy: no download
    with pytest.raises(FileNotFoundError, match="download failed.*gdown") as excinfo:
        celeba(tmp_path / "empty", download=True).setup()
    assert no_torchvision_frames(excinfo)


def test_celeba_real_images_for_fid_are_the_partitions_unflipped(celeba_root):
    dm = celeba(celeba_root)
    torch.manual_seed(0)
    for split, size in (("train", 18), ("val", 6), ("test", 6)):
        images = torch.cat([batch["x"] for batch in dm.real_images_for_fid(split)])
        assert images.shape == (size, 3, 64, 64) and not any(is_flipped(x) for x in images), split
    assert sum(len(b["x"]) for b in dm.real_images_for_fid("train", max_images=5)) == 5
    assert dm.render(images).dtype == np.uint8 and dm.render(images).ndim == 3


def test_celeba_config_builds_the_datamodule_and_reads_data_root(celeba_root):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data=celeba", f"data.root={celeba_root}", "data.num_workers=0"])
    assert cfg.net.ch_mult == [1, 1, 2, 2, 4] and cfg.model.clip_denoised
    dm = instantiate(cfg.data)
    assert dm.data_shape == (3, 64, 64) and len(dm.dataset("val")) == 6
    assert dm.fid_name == "celeba_64" and dm.cond_dim is None and dm.data_kind == "image"


def test_image_datamodules_measure_fid_with_the_injected_extractor(cifar_root, monkeypatch, tmp_path):
    """make_metric() builds FID over the real CIFAR-10 batches; a stand-in replaces Inception exactly there."""
    from evaluation import fid
    from tests_support_features import MeanColourFeatures

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    from torchmetrics.image.fid import FrechetInceptionDistance

    monkeypatch.setattr(fid, "inception_fid", lambda weights, size: FrechetInceptionDistance(
        feature=MeanColourFeatures(), reset_real_features=False, normalize=True, input_img_size=size))
    metric = cifar(cifar_root).make_metric()
    assert metric.name == "fid" and (tmp_path / "cache" / "fid_stats" / "cifar10_32_inception2015.pt").is_file()
    real = torch.cat([b["x"] for b in cifar(cifar_root).real_images_for_fid("val")])
    noise = torch.rand_like(real) * 2 - 1
    assert metric(real) < metric(noise)
