"""train.py's end of run: the final figure and samples come from the EMA weights, the ones last.ckpt stores as
its state_dict (not the raw weights it trained last)."""

import json

import numpy as np
import torch

from cli_harness import run_script
from lightning_modules.checkpoint import instantiate_datamodule, load_module

TOY = ["data=toy2d", "data.num_train=640", "data.num_val=64", "data.batch_size=64", "net.hidden=32", "net.depth=2", "net.emb_dim=16",
       "model.num_timesteps=20", "model.sampling.steps=4", "final_eval.num_samples=64", "callbacks.quality=null",
       "callbacks.sample_logger=null", "callbacks.exposure_bias=null", "logger=csv", "callbacks.progress_bar.refresh_rate=0",
       "callbacks.ema.decay=0.9", "model.optimizer.lr=3e-3", "trainer.max_steps=30", "trainer.val_check_interval=30"]


def test_final_samples_and_figure_come_from_the_ema_weights(tmp_path):
    assert run_script("train.py", *TOY, f"hydra.run.dir={tmp_path}").code == 0
    saved = np.load(tmp_path / "final" / "samples.npz")["samples"]
    metrics = json.loads((tmp_path / "final" / "metrics.json").read_text())
    module, ckpt = load_module(tmp_path / "checkpoints" / "last.ckpt")  # the EMA weights
    data = instantiate_datamodule(module.run_config)
    draw = lambda m: data.unnormalize(m.sample_many(64, 1024, torch.Generator().manual_seed(2024))).numpy()  # noqa: E731
    np.testing.assert_array_equal(draw(module), saved)
    metric = data.make_metric()
    assert metrics["value"] == float(metric(torch.from_numpy(draw(module))))
    raw = {k: v for k, v in ckpt["current_model_state"].items()}
    module.load_state_dict(raw)
    assert not np.allclose(draw(module), saved, atol=1e-3)  # the raw weights would have given other samples
