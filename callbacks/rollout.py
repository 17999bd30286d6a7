"""Closed-loop rollouts of the EMA policy during training: mean max-reward, success rate and a GIF in TensorBoard.

Episodes are split over DDP ranks (distinct seeds, each episode run once) and the
scores are reduced over all of them. `rollout/mean_max_reward` is logged through
the module, so ModelCheckpoint can keep the best policy by closed-loop score
(validation loss stops tracking it, as Diffusion Policy reports).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.ema import ema_weights
from callbacks.periodic import SMOKE_EPISODE_STEPS, EveryNValidations
from callbacks.quality import shard_size
from difflab.pictures import gif_bytes, save_gif


class PolicyRollout(EveryNValidations):
    def __init__(self, num_episodes: int = 10, every_n_val: int = 1, seed: int = 0, max_steps: int | None = None,
                 sampler: str | None = None, steps: int | None = None, render_episodes: int = 1, render_size: int = 96):
        super().__init__(every_n_val)
        self.num_episodes = num_episodes
        self.seed = seed
        self.max_steps = max_steps
        self.sampler, self.steps = sampler, steps
        self.render_episodes = render_episodes
        self.render_size = render_size

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(trainer.datamodule, "data_kind", None) != "trajectory" or not self.due(trainer):  # every_n_val=0: no rollouts in training
            return
        if not trainer.datamodule.task:
            if not getattr(self, "_told", False):
                rank_zero_warn("data.task is empty (no simulator for these demonstrations here): no policy rollouts; "
                               "validation reports val/loss only (callbacks.model_checkpoint.monitor=val/loss mode=min picks "
                               "the best checkpoint by it)")
                self._told = True
            return
        from envs.policy import Policy
        from envs.runner import run_episodes

        rank, world = trainer.global_rank, trainer.world_size
        num_episodes = max(self.count(trainer, self.num_episodes) // 4, 1) if trainer.fast_dev_run else self.num_episodes
        max_steps = SMOKE_EPISODE_STEPS if trainer.fast_dev_run else self.max_steps
        first = sum(shard_size(num_episodes, world, r) for r in range(rank))
        seeds = [self.seed + first + i for i in range(shard_size(num_episodes, world, rank))]
        datamodule = trainer.datamodule
        render = self.render_episodes if trainer.is_global_zero else 0
        with ema_weights(trainer, pl_module):
            policy = Policy.from_datamodule(pl_module, datamodule, seed=self.seed + rank,
                                            **self.sampling(trainer, pl_module, self.sampler, self.steps))
            results = run_episodes(policy, lambda: policy.make_env(self.render_size), seeds, max_steps, render)
        totals = torch.tensor(
            [sum(r["max_reward"] for r in results), sum(r["success"] for r in results), sum(r["length"] for r in results)],
            dtype=torch.float64, device=pl_module.device,
        )
        totals = trainer.strategy.reduce(totals, reduce_op="sum") if world > 1 else totals
        n = float(num_episodes)
        pl_module.log_dict(
            {"rollout/mean_max_reward": totals[0].item() / n, "rollout/success_rate": totals[1].item() / n,
             "rollout/mean_length": totals[2].item() / n},
            sync_dist=False, rank_zero_only=False,
        )
        if trainer.is_global_zero and results and results[0]["frames"]:
            frames = results[0]["frames"]
            save_gif(frames, Path(trainer.default_root_dir) / "rollouts" / f"step_{trainer.global_step:07d}.gif")
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):  # under fast_dev_run the loggers are Lightning's dummies
                    log_gif(logger.experiment, "rollout/episode", frames, trainer.global_step)


def log_gif(experiment, tag: str, frames: list[np.ndarray], step: int, fps: int = 10) -> None:
    """A rollout video in TensorBoard's image tab: an encoded GIF summary, which is what add_video writes,
    without add_video's moviepy dependency."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    h, w = np.asarray(frames[0]).shape[:2]
    image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif_bytes(frames, fps))
    experiment._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
