"""2-D toy distributions with known ground truth: swiss roll, 8 Gaussians, checkerboard, moons.

Scaled to roughly unit spread, so they are modelled as-is (no normalisation). The mixtures also give the
component that drew each point (data.labels=true): 8gaussians its Gaussian (8), checkerboard its square (8),
moons its moon (2); the swiss roll is one piece and has none.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from datamodules.base import ArrayDataModule, one_hot
from difflab.errors import ConfigError


def _swiss_roll(n: int, g: torch.Generator) -> torch.Tensor:
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    return (x + 0.5 * torch.randn(n, 2, generator=g)) / 5.0


EIGHT_GAUSSIANS_RADIUS, EIGHT_GAUSSIANS_STD = 2.0, 0.2


def eight_gaussians_centers() -> torch.Tensor:
    """(8, 2): the means, component k at angle k * 45 degrees."""
    angles = 2 * math.pi * torch.arange(8) / 8
    return EIGHT_GAUSSIANS_RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def _eight_gaussians_labelled(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    component = torch.randint(0, 8, (n,), generator=g)
    angles = 2 * math.pi * component / 8
    centers = EIGHT_GAUSSIANS_RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return centers + EIGHT_GAUSSIANS_STD * torch.randn(n, 2, generator=g), component


def eight_gaussians_component(x: torch.Tensor) -> torch.Tensor:
    """The nearest mean of each point (the Bayes classifier: equal weights and spreads)."""
    return torch.cdist(x.detach().float().cpu().reshape(-1, 2), eight_gaussians_centers()).argmin(1)


def _checkerboard_labelled(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # 4x4 board on [-2, 2]^2; points only on the squares where floor(x) + floor(y) is even.
    x1 = 4 * torch.rand(n, generator=g) - 2
    u = torch.rand(n, generator=g)
    lower = torch.randint(0, 2, (n,), generator=g)
    x2 = u - 2 * lower.float()
    x2 = x2 + torch.floor(x1) % 2
    # square 2 * column + (upper half of the board): column 0..3 from the left
    return torch.stack([x1, x2], dim=1), 2 * (torch.floor(x1).long() + 2) + (1 - lower)


def checkerboard_component(x: torch.Tensor) -> torch.Tensor:
    """The occupied square each point lies in (numbered as the generator's), -1 off the board's 8 squares."""
    x = x.detach().float().cpu().reshape(-1, 2)
    column, row = torch.floor(x[:, 0]).long() + 2, torch.floor(x[:, 1]).long() + 2
    on = (column >= 0) & (column < 4) & (row >= 0) & (row < 4) & ((column + row) % 2 == 0)
    return torch.where(on, 2 * column + row // 2, torch.full_like(column, -1))


def _moons_labelled(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    upper = torch.rand(n, generator=g) < 0.5
    theta = math.pi * torch.rand(n, generator=g)
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.5
    return pts + 0.05 * torch.randn(n, 2, generator=g), (~upper).long()  # 0: the upper moon, 1: the lower


def moons_component(x: torch.Tensor) -> torch.Tensor:
    """The moon whose arc is nearer each point: 0 the upper (unit half-circle over (0, 0)), 1 the lower (under (1, 0.5))."""
    q = x.detach().float().cpu().reshape(-1, 2) / 1.5 + torch.tensor([0.5, 0.25])

    def to_arc(center: tuple[float, float], side: float) -> torch.Tensor:  # side +1: the upper half-circle, -1: the lower
        d = q - torch.tensor(center)
        on_side = side * d[:, 1] >= 0
        ends = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        to_ends = torch.cdist(d, ends).min(1).values
        return torch.where(on_side, (d.norm(dim=1) - 1).abs(), to_ends)

    return (to_arc((1.0, 0.5), -1) < to_arc((0.0, 0.0), 1)).long()


def _unlabelled(labelled):
    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        return labelled(n, g)[0]

    return draw


_eight_gaussians = _unlabelled(_eight_gaussians_labelled)
_checkerboard = _unlabelled(_checkerboard_labelled)
_moons = _unlabelled(_moons_labelled)


TOY_DISTRIBUTIONS = {
    "swiss_roll": _swiss_roll,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "moons": _moons,
}

# The mixtures: (draw points and components, the component a point belongs to (Bayes-optimal for 8gaussians,
# exact for checkerboard, the nearer arc for moons), the components' names)
TOY_COMPONENTS = {
    "8gaussians": (_eight_gaussians_labelled, eight_gaussians_component, [f"{45 * k} deg" for k in range(8)]),
    "checkerboard": (_checkerboard_labelled, checkerboard_component,
                     [f"square ({column - 2}, {row - 2})" for column in range(4) for row in range(4) if (column + row) % 2 == 0]),
    "moons": (_moons_labelled, moons_component, ["upper moon", "lower moon"]),
}


def sample_toy_labelled(name: str, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(points, the component that drew each one) of a mixture toy; the same points as sample_toy's."""
    if name not in TOY_COMPONENTS:
        raise ConfigError(toy_labels_error(name))
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    x, labels = TOY_COMPONENTS[name][0](n, generator)
    return x.float(), labels.long()


def toy_labels_error(name: str) -> str:
    return (f"data.labels=true needs a toy made of components, and data.name={name} has none: the toys with labels are "
            "8gaussians (8 Gaussians), checkerboard (8 squares) and moons (2 moons); or set data.labels=false")


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    if name not in TOY_DISTRIBUTIONS:
        raise ConfigError(f"unknown toy distribution {name!r}: data.name must be one of {sorted(TOY_DISTRIBUTIONS)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return TOY_DISTRIBUTIONS[name](n, generator).float()


class Toy2DDataModule(ArrayDataModule):
    """Fresh seeded draws from a named 2-D distribution; batches are {'x': (B, 2)}, with labels=True (the mixture
    toys) also {'cond': (B, num_classes)}, the one-hot component that drew each point."""

    data_kind = "points"

    def __init__(self, name: str = "swiss_roll", num_train: int = 20000, num_val: int = 2000, seed: int = 0, batch_size: int = 256,
                 num_workers: int = 0, labels: bool | None = False):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        labels = False if labels is None else labels  # null in the config: what runs from before labels existed had
        if name not in TOY_DISTRIBUTIONS:
            raise ConfigError(f"unknown toy distribution {name!r}: data.name must be one of {sorted(TOY_DISTRIBUTIONS)}")
        if not isinstance(labels, bool):
            raise ConfigError(f"data.labels={labels!r} is not valid: data.labels must be true or false for data=toy2d")
        if labels and name not in TOY_COMPONENTS:
            raise ConfigError(toy_labels_error(name))
        self.name = name
        self.num_train = num_train
        self.num_val = num_val
        self.seed = seed
        self.data_shape = (2,)
        self.labels = labels
        self.cond_kind, self.num_classes = ("labels", len(TOY_COMPONENTS[name][2])) if labels else (None, None)
        self.class_names = TOY_COMPONENTS[name][2] if labels else None
        self.cond_dim = self.num_classes

    def load_split(self, split: str):
        n, offset = (self.num_train, 0) if split == "train" else (self.num_val, 1)
        generator = torch.Generator().manual_seed(self.seed * 2 + offset)
        if not self.labels:
            return sample_toy(self.name, n, generator)
        x, labels = sample_toy_labelled(self.name, n, generator)
        return {"x": x, "cond": one_hot(labels, self.num_classes)}

    def ground_truth(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return sample_toy(self.name, n, generator)

    def component(self, x: torch.Tensor) -> torch.Tensor:
        """The component each point belongs to (see TOY_COMPONENTS; -1: none, off the checkerboard)."""
        if self.name not in TOY_COMPONENTS:
            raise ConfigError(toy_labels_error(self.name))
        return TOY_COMPONENTS[self.name][1](x)

    def label_accuracy(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per sample: does it belong to the requested component? 8gaussians: its nearest mean; checkerboard: the
        square it lies in (off the board is a miss); moons: the nearer arc. Exact, nothing trained."""
        return self.component(x) == torch.as_tensor(labels).cpu().long()

    def render(self, x: torch.Tensor, nrow: int | None = None, labels: torch.Tensor | None = None) -> np.ndarray:
        """A scatter over ground-truth points (grey): with `labels` (each sample's requested class, labelled data) a
        colour per class, otherwise all blue. nrow, an image grid's layout, means nothing to a scatter: the callers
        (SampleLogger, train.py's final evaluation, sample.py) lay labelled samples out in different orders, so the
        class of each point is never guessed from it and they pass `labels`."""
        from difflab.pictures import scatter_over_reference

        reference = sample_toy(self.name, 2000, torch.Generator().manual_seed(10_000 + self.seed))
        if labels is None or not self.labels:
            return scatter_over_reference(x, reference, title=self.name)
        return scatter_by_class(x, torch.as_tensor(labels), reference, self.class_names, title=self.name)

    def make_metric(self):
        from evaluation.sliced_wasserstein import SlicedWassersteinToReference

        return SlicedWassersteinToReference(lambda n, g: sample_toy(self.name, n, g), seed=1000 + self.seed)


def scatter_by_class(samples: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, class_names: list[str],
                     title: str = "") -> np.ndarray:
    """2-D samples coloured by class (a colour per class) over ground-truth points (grey), one figure, HWC uint8."""
    from matplotlib import colormaps

    from difflab.pictures import agg_figure, figure_rgb

    samples = samples.detach().float().cpu().numpy().reshape(-1, 2)
    labels = labels.detach().cpu().long().numpy().reshape(-1)
    if len(labels) != len(samples):
        raise ValueError(f"{len(labels)} labels for {len(samples)} samples")
    reference = reference.detach().float().cpu().numpy()
    colours = colormaps["tab10"] if len(class_names) <= 10 else colormaps["tab20"]
    fig = agg_figure((4, 4))
    ax = fig.subplots()
    ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.85", label="data")
    for k, name in enumerate(class_names):
        chosen = labels == k
        if chosen.any():
            ax.scatter(samples[chosen, 0], samples[chosen, 1], s=3, color=colours(k % colours.N), label=name)
    lim = max(3.0, float(np.abs(reference).max()) * 1.2)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", markerscale=3, fontsize=5, ncol=2)
    return figure_rgb(fig)
