"""Class labels (and CelebA's attributes) for CIFAR-10, CelebA and the 2-D toys: what the batches carry, against
the data on disk; the config rules; and what the sampling callbacks draw for them (with stand-in models)."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from callbacks.quality import measure
from callbacks.sample_logger import SampleLogger
from conftest import CONFIG_DIR
from datamodules.base import label_scores, one_hot, sampling_cond
from datamodules.celeba import ATTRIBUTE_FILE, ATTRIBUTES, CelebADataModule
from datamodules.cifar10 import CLASS_NAMES, CIFAR10DataModule
from datamodules.toy2d import (TOY_COMPONENTS, Toy2DDataModule, eight_gaussians_centers, sample_toy,
                               sample_toy_labelled)
from difflab.config_checks import check_config
from difflab.errors import ConfigError, DataError, MissingFileError
from test_image_datamodules import cifar_id, celeba_id, make_fake_celeba, write_fake_cifar10


def composed(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


# ---------------------------------------------------------------- CIFAR-10
@pytest.fixture
def cifar_root(tmp_path) -> Path:
    write_fake_cifar10(tmp_path / "cifar-10-batches-py")  # image k has class k % 10 in its batch's 'labels'
    return tmp_path


def test_cifar10_labels_are_the_one_hot_of_the_stored_targets(cifar_root):
    dm = CIFAR10DataModule(root=str(cifar_root), batch_size=8, val_size=10, num_workers=0, random_flip=False, labels=True)
    assert (dm.cond_kind, dm.num_classes, dm.cond_dim, len(dm.class_names)) == ("labels", 10, 10, 10)
    for split, size in (("train", 30), ("val", 10), ("test", 10)):
        items = [dm.dataset(split)[i] for i in range(len(dm.dataset(split)))]
        assert len(items) == size
        for item in items:
            assert torch.equal(item["cond"], one_hot(torch.tensor(cifar_id(item["x"]) % 10), 10)), split
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "cond"} and batch["cond"].shape == (8, 10) and batch["cond"].dtype == torch.float32
    assert torch.equal(batch["cond"].argmax(1), torch.tensor([cifar_id(x) % 10 for x in batch["x"]]))
    assert CLASS_NAMES[0] == "airplane" and CLASS_NAMES[9] == "truck"


def test_cifar10_without_labels_is_unchanged_and_the_config_builds_both(cifar_root):
    plain = instantiate(composed("data=cifar10", f"data.root={cifar_root}", "data.num_workers=0", "data.val_size=10").data)
    assert plain.cond_kind is None and plain.cond_dim is None
    assert set(plain.dataset("val")[0]) == {"x"}
    cfg = composed("data=cifar10", f"data.root={cifar_root}", "data.num_workers=0", "data.val_size=10", "data.labels=true")
    check_config(cfg)
    dm = instantiate(cfg.data)
    assert dm.cond_kind == "labels" and dm.cond_dim == 10 and dm.dataset("val")[0]["cond"].shape == (10,)
    assert not hasattr(dm, "label_accuracy")  # no classifier: label_scores reports nothing rather than a made-up figure
    assert label_scores(dm, torch.zeros(4, 3, 32, 32), torch.arange(4)) == {}


def test_cifar10_batch_without_labels_key_is_a_data_error(cifar_root):
    import pickle

    path = cifar_root / "cifar-10-batches-py" / "data_batch_3"
    entry = pickle.loads(path.read_bytes(), encoding="bytes")
    del entry[b"labels"]
    path.write_bytes(pickle.dumps(entry))
    assert len(CIFAR10DataModule(root=str(cifar_root), val_size=10, num_workers=0).dataset("train")) == 30  # images only: fine
    with pytest.raises(DataError, match="data_batch_3: expected 'labels'"):
        CIFAR10DataModule(root=str(cifar_root), val_size=10, num_workers=0, labels=True).setup()


# ---------------------------------------------------------------- CelebA
N_CELEBA = 30  # make_fake_celeba's images 000001.png .. 000030.png


def write_attributes(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """list_attr_celeba.txt as CelebA ships it: the count, the 40 names (a trailing space), then '<image> <-1/1 x 40>'
    with the values right-aligned in width 2; returns each image's -1/1 row."""
    rows = {f"{k + 1:06d}.png": np.random.default_rng(seed + k).choice([-1, 1], size=40) for k in range(N_CELEBA)}
    lines = [str(len(rows)), " ".join(ATTRIBUTES) + " "]
    lines += [name + " " + " ".join(f"{v:2d}" for v in values) for name, values in rows.items()]
    (folder / ATTRIBUTE_FILE).write_text("\n".join(lines) + "\n")
    return rows


@pytest.fixture
def celeba_root(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    make_fake_celeba(tmp_path / "celeba")
    return tmp_path, write_attributes(tmp_path / "celeba")


def celeba(root, **kwargs) -> CelebADataModule:
    return CelebADataModule(root=str(root), **{"batch_size": 4, "num_workers": 0, "random_flip": False, **kwargs})


def test_celeba_attributes_are_the_files_values_mapped_to_0_1(celeba_root):
    root, rows = celeba_root
    dm = celeba(root, labels=True)
    assert (dm.cond_kind, dm.cond_dim, dm.num_classes) == ("attributes", 40, None) and dm.attribute_names == ATTRIBUTES
    for split in ("train", "val", "test"):
        for item in dm.dataset(split):
            expected = (rows[f"{celeba_id(item['x']) + 1:06d}.png"] + 1) / 2
            assert torch.equal(item["cond"], torch.tensor(expected, dtype=torch.float32)), split
    batch = next(iter(dm.train_dataloader()))
    assert batch["cond"].shape == (4, 40) and set(batch["cond"].unique().tolist()) <= {0.0, 1.0}
    assert set(celeba(root).dataset("val")[0]) == {"x"}  # labels=false: as before, the attribute file unread


def test_celeba_attributes_match_torchvisions_celeba(celeba_root, monkeypatch):
    """torchvision's CelebA (its md5 check of the real files switched off) reads the same vectors from the same file."""
    import torchvision.datasets

    root, _ = celeba_root
    folder = root / "celeba"
    names = [f"{k + 1:06d}.png" for k in range(N_CELEBA)]
    (folder / "identity_CelebA.txt").write_text("".join(f"{n} {k}\n" for k, n in enumerate(names)))
    (folder / "list_bbox_celeba.txt").write_text(f"{N_CELEBA}\nimage_id x_1 y_1 width height\n" + "".join(f"{n} 1 2 3 4\n" for n in names))
    (folder / "list_landmarks_align_celeba.txt").write_text(f"{N_CELEBA}\nlefteye_x\n" + "".join(f"{n} 1\n" for n in names))
    monkeypatch.setattr(torchvision.datasets.CelebA, "_check_integrity", lambda self: True)
    dm = celeba(root, labels=True)
    for split, theirs in (("train", "train"), ("val", "valid"), ("test", "test")):
        reference = torchvision.datasets.CelebA(str(root), split=theirs, target_type="attr")
        ours = torch.stack([item["cond"] for item in dm.dataset(split)])
        assert torch.equal(ours, reference.attr.float()), split
    assert [n for n in reference.attr_names if n] == ATTRIBUTES


def test_celeba_one_attribute_is_a_two_class_label(celeba_root):
    root, rows = celeba_root
    dm = celeba(root, labels="Smiling")
    column = ATTRIBUTES.index("Smiling")
    assert (dm.cond_kind, dm.num_classes, dm.cond_dim) == ("labels", 2, 2)
    assert dm.class_names == ["not Smiling", "Smiling"]
    seen = set()
    for item in dm.dataset("train"):
        smiling = int(rows[f"{celeba_id(item['x']) + 1:06d}.png"][column] == 1)
        assert torch.equal(item["cond"], one_hot(torch.tensor(smiling), 2))
        seen.add(smiling)
    assert seen == {0, 1}  # both classes occur, so the check above compared both


def test_celeba_attribute_conditions_are_the_validation_vectors_in_turn(celeba_root):
    root, _ = celeba_root
    dm = celeba(root, labels=True)
    val = torch.stack([item["cond"] for item in dm.dataset("val")])  # 6 images
    assert torch.equal(dm.attribute_conditions(8), val[torch.arange(8) % 6])
    labels, cond = sampling_cond(dm, 5, offset=4)
    assert labels is None and torch.equal(cond, val[torch.tensor([4, 5, 0, 1, 2])])
    smiling = celeba(root, labels="Smiling")
    labels, cond = sampling_cond(smiling, 5)
    assert labels.tolist() == [0, 1, 0, 1, 0] and torch.equal(cond, one_hot(labels, 2))


def test_celeba_bad_labels_name_the_setting(celeba_root):
    root, _ = celeba_root
    with pytest.raises(ConfigError, match=r"data\.labels='Smilling' is not a CelebA attribute: did you mean Smiling\?.*e\.g\. Smiling, Male"):
        celeba(root, labels="Smilling")
    with pytest.raises(ConfigError, match=r"data\.labels='happy' is not a CelebA attribute: use true .* Smiling"):
        celeba(root, labels="happy")
    with pytest.raises(ConfigError, match=r"data\.labels=1 is not valid: data\.labels must be true"):
        celeba(root, labels=1)
    (root / "celeba" / ATTRIBUTE_FILE).unlink()
    with pytest.raises(MissingFileError, match=rf"data\.labels needs CelebA's attributes: .*{ATTRIBUTE_FILE} is missing"):
        celeba(root, labels=True).setup()
    assert len(celeba(root).dataset("train")) == 18  # without labels the file is not needed


def test_celeba_malformed_attribute_file_names_the_line(celeba_root):
    root, _ = celeba_root
    path = root / "celeba" / ATTRIBUTE_FILE
    lines = path.read_text().splitlines()
    lines[5] = lines[5][: -2] + " 0"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{ATTRIBUTE_FILE}, line 6: attribute values must be 1 or -1"):
        celeba(root, labels=True).setup()
    path.write_text("\n".join(lines[:4]) + "\n")
    with pytest.raises(DataError, match="have no row in"):
        celeba(root, labels="Male").setup()


# ---------------------------------------------------------------- 2-D toys
def test_toy_labels_are_the_generating_component_and_leave_the_points_unchanged():
    for name in TOY_COMPONENTS:
        plain = Toy2DDataModule(name=name, num_train=3000, num_val=500)
        dm = Toy2DDataModule(name=name, num_train=3000, num_val=500, labels=True)
        assert plain.cond_kind is None and plain.cond_dim is None
        assert (dm.cond_kind, dm.num_classes, dm.cond_dim) == ("labels", len(dm.class_names), len(dm.class_names))
        for split in ("train", "val"):
            data = dm.dataset(split).tensors
            assert torch.equal(data["x"], plain.dataset(split).tensors["x"]), (name, split)
            labels = data["cond"].argmax(1)
            assert torch.equal(data["cond"], one_hot(labels, dm.num_classes))
            assert torch.bincount(labels, minlength=dm.num_classes).min() > 0  # every component occurs
            # the component each point lies in/nearest to is the one that drew it (noise can carry a rare
            # 8gaussians point past the midline between two means: 3.8 std away)
            assert dm.label_accuracy(data["x"], labels).float().mean() >= 0.999, (name, split)
    assert {"8gaussians": 8, "checkerboard": 8, "moons": 2} == {n: len(c[2]) for n, c in TOY_COMPONENTS.items()}


def test_eight_gaussians_labels_are_the_nearest_centre():
    centers = eight_gaussians_centers()
    angles = torch.atan2(centers[:, 1], centers[:, 0]) % (2 * torch.pi)
    assert torch.allclose(angles, torch.arange(8) * torch.pi / 4, atol=1e-6) and torch.allclose(centers.norm(dim=1), torch.full((8,), 2.0))
    x, labels = sample_toy_labelled("8gaussians", 4000, torch.Generator().manual_seed(5))
    assert torch.equal(x, sample_toy("8gaussians", 4000, torch.Generator().manual_seed(5)))
    # the generator's points sit within ~4 std (0.2) of their own component's mean
    assert (x - centers[labels]).norm(dim=1).max() < 1.0
    g = torch.Generator().manual_seed(0)
    requested = torch.arange(8).repeat(50)
    near = centers[requested] + 0.05 * torch.randn(len(requested), 2, generator=g)  # small noise: the nearest centre is certain
    dm = Toy2DDataModule(name="8gaussians", labels=True)
    assert dm.label_accuracy(near, requested).all()
    assert not dm.label_accuracy(near, (requested + 1) % 8).any()
    scores = label_scores(dm, near, requested)
    assert scores["label_accuracy"] == 1.0 and scores["per_class_accuracy"] == [1.0] * 8


def test_checkerboard_and_moons_accuracy_are_exact_geometry():
    board = Toy2DDataModule(name="checkerboard", labels=True)
    # square k's lower-left corner, from the names: the centre of each occupied square is read as that square
    corners = torch.tensor([[float(v) for v in n[len("square ("):-1].split(", ")] for n in board.class_names])
    assert torch.equal(board.component(corners + 0.5), torch.arange(8))
    assert board.component(torch.tensor([[-1.5, -0.5], [0.5, -0.5], [2.5, 0.0]])).tolist() == [-1, -1, -1]  # white squares, off board
    moons = Toy2DDataModule(name="moons", labels=True)
    theta = torch.linspace(0, torch.pi, 20)
    upper = torch.stack([torch.cos(theta) - 0.5, torch.sin(theta) - 0.25], dim=1) * 1.5
    lower = torch.stack([0.5 - torch.cos(theta), 0.25 - torch.sin(theta)], dim=1) * 1.5
    assert moons.component(upper).tolist() == [0] * 20 and moons.component(lower).tolist() == [1] * 20


def test_toys_without_components_refuse_labels_in_one_line():
    with pytest.raises(ConfigError, match=r"data\.labels=true needs a toy made of components, and data\.name=swiss_roll has none: "
                                          r"the toys with labels are 8gaussians .*checkerboard .*moons"):
        Toy2DDataModule(name="swiss_roll", labels=True)
    with pytest.raises(ConfigError, match=r"data\.labels='yes' is not valid: data\.labels must be true or false"):
        Toy2DDataModule(name="8gaussians", labels="yes")
    assert Toy2DDataModule(name="swiss_roll", labels=None).cond_kind is None  # null (the config's default) is false


def test_toy_render_takes_nrow_and_colours_by_class():
    dm = Toy2DDataModule(name="8gaussians", labels=True)
    labels = torch.arange(8).repeat_interleave(6)
    x = eight_gaussians_centers()[labels]
    coloured = dm.render(x, nrow=6, labels=labels)
    plain = dm.render(x, nrow=6)  # nrow alone (an image grid's layout): all one colour
    assert coloured.dtype == np.uint8 and coloured.ndim == 3 and coloured.shape == plain.shape
    pixels = coloured.reshape(-1, 3).astype(int)
    tab10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127)]
    for colour in tab10:  # each class drawn in its own colour
        assert (np.abs(pixels - colour).sum(1) < 10).any(), colour
    assert not (np.abs(plain.reshape(-1, 3).astype(int) - tab10[1]).sum(1) < 10).any()  # no orange without labels
    assert Toy2DDataModule(name="swiss_roll").render(sample_toy("swiss_roll", 50), nrow=5).ndim == 3


# ---------------------------------------------------------------- config rules
@pytest.mark.parametrize("overrides, message", [
    (["data=toy2d", "data.name=swiss_roll", "data.labels=true"], r"data\.labels=true needs a toy made of components, and data\.name=swiss_roll"),
    (["data=toy2d", "data.labels=Smiling"], r"data\.labels='Smiling' \(str\) is not valid: data\.labels must be true or false for data=toy2d"),
    (["data=cifar10", "data.labels=5"], r"data\.labels=5 is not valid: data\.labels must be true or false"),
    (["data.labels=1.5"], r"data\.labels=1\.5 is not valid"),
    (["data=celeba", "data.labels=Smilin"], r"data\.labels='Smilin' is not a CelebA attribute: did you mean Smiling\?"),
])
def test_config_rules_for_data_labels(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(composed(*overrides))


def test_config_rules_accept_the_new_values():
    for overrides in (["data=toy2d", "data.name=8gaussians", "data.labels=true"], ["data=toy2d"], ["data=cifar10", "data.labels=true"],
                      ["data=celeba", "data.labels=Smiling"], ["data=celeba", "data.labels=true"], ["data=celeba"], ["data.labels=true"]):
        check_config(composed(*overrides))


# ---------------------------------------------------------------- the sampling callbacks
class StandIn:
    """A 'model' for the callbacks: records the cond it is given; 2-D: the requested component's mean (one_hot
    argmax) plus small noise, or the next component's with wrong=True; images: zeros."""

    def __init__(self, shape, wrong: bool = False):
        self.device, self.shape, self.wrong, self.conds = torch.device("cpu"), shape, wrong, []

    def sample(self, n, cond=None, generator=None, **kwargs):
        self.conds.append(cond)
        if self.shape != (2,):
            return torch.zeros(n, *self.shape)
        k = (cond.argmax(1) + int(self.wrong)) % 8
        return eight_gaussians_centers()[k] + 0.05 * torch.randn(n, 2, generator=generator)

    def sample_many(self, n, batch_size, generator, cond=None, **kwargs):
        return self.sample(n, cond, generator)


def fake_trainer(datamodule, tmp_path):
    return SimpleNamespace(datamodule=datamodule, callbacks=[], fast_dev_run=False, sanity_checking=False, global_step=0,
                           default_root_dir=str(tmp_path), loggers=[], global_rank=0, world_size=1, is_global_zero=True)


class Stub:
    name = "stub"

    def __call__(self, x):
        return float(x.float().mean())


def test_labelled_toy_through_sample_logger_and_quality(tmp_path):
    dm = Toy2DDataModule(name="8gaussians", labels=True)
    trainer, model = fake_trainer(dm, tmp_path), StandIn((2,))
    SampleLogger(num_samples=40)._draw(trainer, model)
    assert model.conds[-1].argmax(1).tolist() == torch.arange(8).repeat_interleave(5).tolist()  # one row per class
    assert (tmp_path / "samples" / "step_0000000.png").is_file()
    values = measure(trainer, model, dm.make_metric(), 64, seed=0, batch_size=32)
    assert values["label_accuracy"] == 1.0 and values["sliced_w1"] >= 0  # every class drawn, each hit
    assert measure(trainer, StandIn((2,), wrong=True), Stub(), 64, seed=0, batch_size=32)["label_accuracy"] == 0.0


def test_labelled_cifar_and_celeba_attributes_through_the_callbacks(cifar_root, celeba_root, tmp_path):
    cifar = CIFAR10DataModule(root=str(cifar_root), val_size=10, num_workers=0, labels=True)
    trainer, model = fake_trainer(cifar, tmp_path), StandIn((3, 32, 32))
    SampleLogger(num_samples=20)._draw(trainer, model)  # a grid of 10 rows of 2: the render takes nrow
    assert model.conds[-1].argmax(1).tolist() == torch.arange(10).repeat_interleave(2).tolist()
    assert measure(trainer, model, Stub(), 12, seed=0, batch_size=4) == {"stub": 0.0}  # no classifier: no label_accuracy

    faces = celeba(celeba_root[0], labels=True, resolution=16)
    trainer, model = fake_trainer(faces, tmp_path / "faces"), StandIn((3, 16, 16))
    val = torch.stack([item["cond"] for item in faces.dataset("val")])
    SampleLogger(num_samples=4)._draw(trainer, model)
    assert torch.equal(model.conds[-1], val[:4])  # the first validation images' attribute vectors
    assert measure(trainer, model, Stub(), 9, seed=0, batch_size=4) == {"stub": 0.0}
    assert torch.equal(model.conds[-1], val[torch.arange(9) % 6])
    assert (tmp_path / "faces" / "samples" / "step_0000000.png").is_file()
