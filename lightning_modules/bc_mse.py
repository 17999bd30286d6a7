"""Behaviour cloning by regression: the action chunk straight from the observation history, MSE loss.

The baseline diffusion policies are measured against (same data, same net):
with demonstrations that go either way around an obstacle, the MSE-optimal
prediction is the average of the two ways, which goes through the obstacle.
The net is called as every denoiser is, with a zero input and noise level 0,
so any registered net serves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.base import DiffusionModule
from difflab.errors import ConfigError


class BCMSE(DiffusionModule):
    sampler = "direct"
    provides = "direct"  # no denoiser: every registry sampler is refused
    sample_steps = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.cond_dim is None:
            raise ConfigError("model=bc_mse regresses actions from observations: it needs demonstration data (data=obstacle2d or data=pusht)")

    def predict(self, cond: torch.Tensor, num_samples: int) -> torch.Tensor:
        x = torch.zeros((num_samples, *self.data_shape), device=self.device)
        out = self.net(x, torch.zeros(num_samples, device=self.device), cond)
        return out.clamp(-1.0, 1.0) if self.clip_denoised else out

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        cond = self.check_cond(batch.get("cond"), batch["x"].shape[0])
        return F.mse_loss(self.predict(cond, batch["x"].shape[0]), batch["x"])

    def refusal(self, sampler: str) -> str | None:
        return "bc_mse regresses the action chunk directly: it has no noise levels to sample through"

    def samplers(self) -> list[str]:
        return ["direct"]

    def check_sampling(self, sampler: str | None = None, **options) -> str:
        if sampler not in (None, "direct"):
            raise ConfigError(f"sampler={sampler} is not defined for BCMSE: {self.refusal(sampler)}; use sampler=direct")
        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise ConfigError(f"{', '.join(f'{k}=' for k in given)} is not an option of BCMSE (sampler=direct takes nothing): drop it")
        return "direct"

    def nfe(self, sampler: str | None = None, steps: int | None = None, **options) -> int:
        self.check_sampling(sampler, steps=steps, **options)
        return 1

    @torch.no_grad()
    def sample(self, num_samples: int, cond=None, sampler=None, steps=None, generator=None, return_nfe: bool = False,
               **options) -> torch.Tensor:
        self.check_sampling(sampler, steps=steps, **{k: v for k, v in options.items() if k not in ("progress", "callback")})
        x = self.predict(self.check_cond(cond, num_samples), num_samples)
        return (x, 1) if return_nfe else x
