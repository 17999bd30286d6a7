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

from lightning_modules.direct import DirectModule


class BCMSE(DirectModule):
    what = "regresses actions from observations"

    def predict(self, cond: torch.Tensor, num_samples: int) -> torch.Tensor:
        x = torch.zeros((num_samples, *self.data_shape), device=self.device)
        out = self.net(x, torch.zeros(num_samples, device=self.device), cond)
        return out.clamp(-1.0, 1.0) if self.clip_denoised else out

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        cond = self.check_cond(batch.get("cond"), batch["x"].shape[0])
        return F.mse_loss(self.predict(cond, batch["x"].shape[0]), batch["x"])

    def draw(self, cond: torch.Tensor, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
        return self.predict(cond, num_samples)
