"""What every notebook shares: the project's configs and a quiet training loop, nothing of the math.

    from nbkit import SMALL, compose, build, fit, steps

`SMALL` is true when DIFFLAB_NB_SMALL=1 (the test suite sets it): notebooks shrink their step counts with
`steps(default, small)` so the whole set runs in CI in minutes, while the stored outputs come from the
default settings.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
from hydra import compose as hydra_compose  # noqa: E402
from hydra import initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from callbacks.ema import EMA  # noqa: E402
from lightning_modules.checkpoint import build_model  # noqa: E402

SMALL = os.environ.get("DIFFLAB_NB_SMALL", "0") == "1"
CONFIG_DIR = ROOT / "configs"
RUNS = ROOT / "logs" / "notebooks"  # where a notebook that writes files (checkpoints, GIFs) puts them

for _name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=".*IProgress not found.*")  # tqdm.auto inside a kernel without ipywidgets


def steps(default: int, small: int) -> int:
    """A step (or sample, or episode) count: `default` for the stored run, `small` under the test suite."""
    return small if SMALL else default


def compose(*overrides: str) -> DictConfig:
    """configs/train.yaml with command-line style overrides, exactly as `python train.py ...` would see it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # the run paths interpolate ${hydra:...}
    with open_dict(cfg):
        cfg.paths.output_dir = str(RUNS)
        del cfg.hydra
    return cfg


def build(*overrides: str, seed: int | None = None):
    """(datamodule, method) for the overrides, set up and ready to train; the method carries its config."""
    cfg = compose(*overrides)
    pl.seed_everything(cfg.seed if seed is None else seed, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module = build_model(cfg, datamodule.data_shape, datamodule.cond_dim)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    return datamodule, module


def fit(module, datamodule, max_steps: int, ema_decay: float | None = 0.999, progress: bool = False, **trainer_kwargs):
    """Train on the CPU without logs or checkpoints; with ema_decay the module ends holding the EMA weights (in eval mode).

    Returns the wall-clock seconds of training.
    """
    callbacks = [EMA(decay=ema_decay)] if ema_decay else []
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    module.train()  # Lightning trains in the mode it finds, and a module that was sampled from is in eval mode
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)  # Lightning's WeightAveraging copies the average in at the end
    module.eval()
    return time.perf_counter() - start

