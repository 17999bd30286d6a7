"""Turn samples into pictures (HWC uint8 arrays) for TensorBoard and PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def image_grid(images: torch.Tensor, upscale: int = 1, nrow: int | None = None) -> np.ndarray:
    """images in [0, 1], (N, C, H, W) -> one grid, HWC uint8."""
    from torchvision.utils import make_grid

    images = images.detach().float().cpu().clamp(0, 1)
    if upscale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def agg_figure(figsize: tuple[float, float], dpi: int = 100):
    """A figure on its own Agg canvas: no pyplot, so the global backend (a notebook's inline one) is untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_rgb(fig) -> np.ndarray:
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def scatter_over_reference(samples: torch.Tensor, reference: torch.Tensor, title: str = "") -> np.ndarray:
    """2-D samples (blue) over ground-truth points (grey), HWC uint8."""
    samples = samples.detach().float().cpu().numpy()
    reference = reference.detach().float().cpu().numpy()
    fig = agg_figure((4, 4))
    ax = fig.subplots()
    ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.75", label="data")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:blue", label="samples")
    lim = max(3.0, float(np.abs(reference).max()) * 1.2)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", markerscale=4, fontsize=7)
    return figure_rgb(fig)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def gif_bytes(frames: list[np.ndarray], fps: int = 10) -> bytes:
    """An animated GIF of (H, W, 3) uint8 frames (PIL only: no video codec needed)."""
    import io

    from PIL import Image

    if not frames:
        raise ValueError("no frames to encode")
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buffer.getvalue()


def save_gif(frames: list[np.ndarray], path: str | Path, fps: int = 10) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.gif")
    tmp.write_bytes(gif_bytes(frames, fps))
    tmp.replace(path)
    return path
