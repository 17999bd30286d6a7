"""What every method shares: optimisation, logging, validation with fixed noise, RNG in checkpoints.

A method subclasses `DiffusionModule` and implements `loss(batch, generator)`
and `sample(num_samples, cond=None, sampler=None, steps=None, generator=None)`.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from difflab.errors import ConfigError, TrainingDiverged

VAL_SEED = 12345  # validation noise is fixed so val/loss is comparable across steps

# Which methods take the sampling options sample.py / evaluate.py / policies pass, for the refusal message.
OPTION_OWNERS = {
    "steps": "every method but bc_mse",
    "eta": "the DDPM family's ddim sampler (model=ddpm, scheduled_sampling)",
    "ddim_spacing": "the DDPM family's ddim and dpmpp_2m samplers",
    "eps_scale": "the DDPM family (model=ddpm, scheduled_sampling)",
    "time_shift_window": "the DDPM family's ancestral and ddim samplers",
}


class DiffusionModule(pl.LightningModule):
    sampler: str = ""  # the default sampler (a method's config sets it)
    # The options each sampler takes beyond num_samples/cond/generator (what sample.py, evaluate.py and policies
    # may pass); check_sampling refuses the others by name instead of ignoring them.
    sampler_options: dict[str, tuple[str, ...]] = {}
    # The cheapest valid setting, for trainer.fast_dev_run (a config check, not a figure).
    quick_sampling: dict = {}

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        data_shape: tuple[int, ...] = (),
        cond_dim: int | None = None,
        clip_denoised: bool = False,
    ):
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.data_shape = tuple(data_shape)
        self.cond_dim = cond_dim
        self.clip_denoised = clip_denoised
        # Set by train.py: the resolved run config, stored in every checkpoint so a checkpoint can rebuild itself.
        self.run_config: dict | None = None

    # --- what a method provides -------------------------------------------------------------
    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, num_samples: int, cond=None, sampler=None, steps=None, generator=None, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def nfe(self, sampler: str | None = None, steps: int | None = None) -> int:
        """Network evaluations per sample for a sampler setting (reported beside every quality figure)."""
        raise NotImplementedError

    def check_sampling(self, sampler: str | None = None, **options) -> str:
        """The sampler to use, after refusing options it does not take (None values are "not given")."""
        name = type(self).__name__
        sampler = sampler or self.sampler
        if sampler not in self.sampler_options:
            raise ConfigError(f"sampler={sampler!r} is not a sampler of {name}: use one of {', '.join(self.sampler_options)}")
        for key, value in options.items():
            if value is None or key in self.sampler_options[sampler]:
                continue
            takers = [s for s, opts in self.sampler_options.items() if key in opts]
            if takers:
                raise ConfigError(f"{key}= applies to {name}'s {' and '.join(takers)} sampler{'s' * (len(takers) > 1)}, not to "
                                  f"sampler={sampler}: drop {key}= or pick sampler={takers[0]}")
            owners = OPTION_OWNERS.get(key, "no method")
            raise ConfigError(f"{key}= is not an option of {name} (its samplers take: "
                              f"{', '.join(sorted({o for opts in self.sampler_options.values() for o in opts})) or 'nothing'}); "
                              f"{key}= applies to {owners}")
        return sampler

    @torch.no_grad()
    def sample_many(
        self, num_samples: int, batch_size: int = 1000, generator: torch.Generator | None = None, cond=None, progress: bool = False, **kwargs
    ) -> torch.Tensor:
        """sample() in chunks of batch_size (memory stays bounded); one generator, so the result is reproducible."""
        from tqdm.auto import tqdm

        chunks = []
        with tqdm(total=num_samples, disable=not progress, desc="sampling") as bar:
            for start in range(0, num_samples, batch_size):
                n = min(batch_size, num_samples - start)
                part = None if cond is None else cond[start : start + n]
                chunks.append(self.sample(n, cond=part, generator=generator, **kwargs).float().cpu())
                bar.update(n)
        return torch.cat(chunks) if chunks else torch.empty((0, *self.data_shape))

    # --- helpers for methods ----------------------------------------------------------------
    def prior_noise(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((num_samples, *self.data_shape), generator=generator, device=self._generator_device(generator))

    def _generator_device(self, generator: torch.Generator | None) -> torch.device:
        return generator.device if generator is not None else self.device

    def check_cond(self, cond, num_samples: int):
        if self.cond_dim is None and cond is not None:
            raise ValueError("this model was trained without conditioning: call sample(..., cond=None)")
        if self.cond_dim is not None:
            if cond is None:
                raise ValueError(f"this model is conditional (cond_dim={self.cond_dim}): pass cond of shape (N, {self.cond_dim})")
            if cond.shape[0] != num_samples:
                raise ValueError(f"cond has {cond.shape[0]} rows but num_samples={num_samples}")
        return cond

    # --- Lightning ----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["x"].shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Record the first step whose loss is not finite without a device sync (a flag tensor on the device);
        # read it when Lightning logs anyway and before any checkpoint is written.
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        if getattr(self, "_first_nonfinite", None) is None or self._first_nonfinite.device != loss.device:
            self._first_nonfinite = torch.full((), -1, device=loss.device, dtype=torch.long)
            self._step_on_device = torch.full((), self.global_step, device=loss.device, dtype=torch.long)
        elif self.global_step != self._step_on_host:
            self._step_on_device += self.global_step - self._step_on_host  # a scalar kernel argument: no copy, no sync
        self._step_on_host = self.global_step
        bad = ~torch.isfinite(loss.detach()).all()
        self._first_nonfinite = torch.where((self._first_nonfinite < 0) & bad, self._step_on_device, self._first_nonfinite)
        if self.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            self.check_diverged()

    def check_diverged(self) -> None:
        """Stop with TrainingDiverged if any training loss so far was NaN or inf."""
        first = getattr(self, "_first_nonfinite", None)
        if first is None or int(first) < 0:
            return
        from difflab.checkpoint_io import divergence_message

        trainer = self.trainer
        io = getattr(trainer.strategy, "checkpoint_io", None)
        raise TrainingDiverged(divergence_message(io if hasattr(io, "last_saved") else None,
                                                  "the training loss first went non-finite there", int(first),
                                                  getattr(trainer, "ckpt_path", None)))

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(VAL_SEED + batch_idx)
        loss = self.loss(batch, generator=generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["x"].shape[0])
        return loss

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning refuses to clip for an optimizer that unscales internally (fused Adam/AdamW) under every
        # mixed precision. Only fp16's loss scaler makes that unsafe: under bf16 (no scaler) the gradients are
        # already the true ones, so clip them directly and keep the fused step.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if gradient_clip_val and scaler is None and getattr(optimizer, "_step_supports_amp_scaling", False):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm) or "norm") == "norm":
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None:
            self.check_diverged()  # never store the weights of a run whose loss went non-finite
        checkpoint["difflab"] = {
            "config": self.run_config,
            "data_shape": list(self.data_shape),
            "cond_dim": self.cond_dim,
            "method": f"{type(self).__module__}.{type(self).__qualname__}",
        }
        # Tensors and plain types only, so checkpoints load with torch.load(weights_only=True).
        np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Applied at on_train_start, right before the first resumed step: whatever Lightning does between loading
        # and training (building loaders, prefetching a batch) then cannot shift the streams the loss draws from.
        self._rng_to_restore = checkpoint.get("rng_states")
        self._resumed_step = int(checkpoint.get("global_step", 0))

    def on_train_start(self) -> None:
        states, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if states is None:
            return
        if self.trainer.world_size == 1:
            torch.set_rng_state(states["torch"])
            kind, keys, pos, has_gauss, gauss = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(states["python"])
            if states["cuda"] is not None and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states["cuda"])
        else:
            # Only rank 0's state is saved: ranks must not share one stream, so derive a distinct one per rank.
            pl.seed_everything(self._resumed_step * 1000 + self.global_rank, workers=True, verbose=False)
