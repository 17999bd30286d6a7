"""Methods that draw an action chunk in one pass, with no noise levels to sample through: regression (bc_mse),
mixture-density and bin-and-offset heads (lstm_gmm, bet), a VAE's decoder (vae_policy).

They keep the contract every method has (`loss`, `sample(n, cond)`, `nfe`), so the policy wrapper, the runner
and the callbacks take them as they take a diffusion policy; their only sampler is `direct`, with NFE 1.
"""

from __future__ import annotations

import torch

from difflab.errors import ConfigError
from lightning_modules.base import DiffusionModule


class DirectModule(DiffusionModule):
    provides = "direct"  # no denoiser: every registry sampler is refused
    default_sampling = {"sampler": "direct", "steps": 1, "options": {}}
    what = "maps observations to actions"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.cond_dim is None:
            raise ConfigError(f"model={self.config_name} {self.what}: it needs demonstration data (data=obstacle2d or data=pusht)")

    @property
    def config_name(self) -> str:
        return type(self).__module__.rsplit(".", 1)[-1]

    def check_sequence_window(self, n_obs_steps: int | None, example: str) -> tuple[int, int, int]:
        """For a sequence model that reads one observation per chunk step (lstm_gmm, bet): (n_obs_steps, obs_dim,
        action_dim), after checking that the chunk and the observation window line up."""
        name = self.config_name
        if len(self.data_shape) != 2:
            raise ConfigError(f"model={name} models action chunks (horizon, action_dim), got data shape {self.data_shape}: "
                              "use trajectory data (data=obstacle2d or data=pusht)")
        horizon, action_dim = self.data_shape
        if n_obs_steps is None:
            raise ConfigError("model.n_obs_steps is not set: use model.n_obs_steps=${data.n_obs_steps} (the default)")
        n_obs_steps = int(n_obs_steps)
        if horizon != n_obs_steps:
            raise ConfigError(
                f"model={name} reads one observation per chunk step, so it needs data.horizon == data.n_obs_steps "
                f"(got data.horizon={horizon}, data.n_obs_steps={n_obs_steps}): e.g. {example}")
        if self.cond_dim % n_obs_steps:
            raise ConfigError(f"model.n_obs_steps={n_obs_steps} does not divide cond_dim={self.cond_dim}: "
                              "keep model.n_obs_steps=${data.n_obs_steps}")
        return n_obs_steps, self.cond_dim // n_obs_steps, action_dim

    def draw(self, cond: torch.Tensor, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
        """(num_samples, *data_shape) chunks for the (already checked) cond rows, in normalized units."""
        raise NotImplementedError

    def refusal(self, sampler: str) -> str | None:
        return f"{self.config_name} draws the action chunk in one pass: it has no noise levels to sample through"

    def samplers(self) -> list[str]:
        return ["direct"]

    def check_sampling(self, sampler: str | None = None, **options) -> str:
        name = type(self).__name__
        if sampler not in (None, "direct"):
            raise ConfigError(f"sampler={sampler} is not defined for {name}: {self.refusal(sampler)}; use sampler=direct")
        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise ConfigError(f"{', '.join(f'{k}=' for k in given)} is not an option of {name} (sampler=direct takes nothing): drop it")
        return "direct"

    def nfe(self, sampler: str | None = None, steps: int | None = None, **options) -> int:
        self.check_sampling(sampler, steps=steps, **options)
        return 1

    @torch.no_grad()
    def sample(self, num_samples: int, cond=None, sampler=None, steps=None, generator=None, return_nfe: bool = False,
               **options) -> torch.Tensor:
        self.check_sampling(sampler, steps=steps, **{k: v for k, v in options.items() if k not in ("progress", "callback", "x_T")})
        x = self.draw(self.check_cond(cond, num_samples), num_samples, generator)
        if self.clip_denoised:
            x = x.clamp(-1.0, 1.0)
        return (x, 1) if return_nfe else x
