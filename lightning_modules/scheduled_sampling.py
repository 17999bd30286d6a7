"""Scheduled sampling for DDPM: train on inputs the model produced itself, not only on forward-noised ones.

Scheduled sampling (Bengio et al. 2015) carried to diffusion: with probability p, a training input x_t is
not drawn from q(x_t | x0) but obtained by noising x0 to a higher level and letting the current net walk it
back down. The net then learns to denoise the states it will meet when sampling (exposure bias), while the
target still points at the data x0 the state came from.

Per batch row:
  m = 0 with probability 1 - p, else uniform on {1, ..., max_rollback} (max_rollback = 1: m ~ Bernoulli(p));
  p moves linearly from p_start to p_end over trainer.max_steps (or model.total_steps);
  t ~ U{0, ..., T-1-m*stride};  x_{t+m*stride} = q_sample(x0, t+m*stride, eps);
  m roll-back steps without gradient, with the same net in its training mode, land on x~_t;
  target: eps~ = (x~_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) (x0 for x0-prediction, the matching v for v).
Rows with m = 0 are plain DDPM rows (target eps). Roll-back variants (`ss_rollback`):
  renoise:      x0_hat from x_{t+1}, re-noised with fresh noise: q_sample(x0_hat, t, z) (the published code's variant);
  ancestral:    the model's own p(x_t | x_{t+1}), with the sampling block's `variance` (beta or posterior);
  sampler_step: one DDIM step with the sampling block's eta from t+stride to t, stride = ss_stride (default
                T // sample_steps), so m counts strides. The sampler's own grid (ddim_timesteps) rounds its
                strides, so it is the typical step, not necessarily one the sampler takes.
Cost: 1 + E[m] forward passes per sample (E[m] = p (max_rollback + 1) / 2), one backward, logged as
train/rollback_fraction (rows with m >= 1), train/rollback_p and train/rollback_extra_forwards.
val/loss stays DDPM's teacher-forced L_simple, so it is comparable with model=ddpm runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.ddpm import DDPM
from lightning_modules.schedules import ddim_step, extract
from difflab.errors import ConfigError

ROLLBACKS = ("renoise", "ancestral", "sampler_step")


class ScheduledSamplingDDPM(DDPM):
    """A DDPM whose training inputs are partly rolled back by the net itself; sampling is DDPM's, unchanged."""

    def __init__(
        self,
        net,
        optimizer,
        scheduler=None,
        max_rollback: int = 1,
        p_start: float = 0.0,
        p_end: float = 0.8,
        total_steps: int | None = None,
        ss_rollback: str = "renoise",
        ss_stride: int | None = None,
        **ddpm_kwargs,
    ):
        super().__init__(net, optimizer, scheduler, **ddpm_kwargs)
        if ss_rollback not in ROLLBACKS:
            raise ConfigError(f"model.ss_rollback must be one of {ROLLBACKS}, got {ss_rollback!r}")
        if ss_stride is not None and ss_rollback != "sampler_step":
            raise ConfigError(f"model.ss_stride sets the DDIM stride of ss_rollback=sampler_step; {ss_rollback!r} steps by 1")
        if not (0 <= p_start <= 1 and 0 <= p_end <= 1):
            raise ConfigError(f"model.p_start and model.p_end are probabilities, got {p_start}, {p_end}")
        if max_rollback < 0:
            raise ConfigError(f"model.max_rollback must be >= 0, got {max_rollback}")
        stride = 1
        if ss_rollback == "sampler_step":
            stride = int(ss_stride) if ss_stride is not None else max(self.num_timesteps // self.sample_steps, 1)
        if stride < 1 or max_rollback * stride > self.num_timesteps - 1:
            raise ValueError(
                f"max_rollback * stride = {max_rollback} * {stride} must lie in [0, T-1 = {self.num_timesteps - 1}]: "
                "lower model.max_rollback or model.ss_stride"
            )
        self.max_rollback = int(max_rollback)
        self.p_start, self.p_end = float(p_start), float(p_end)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.ss_rollback = ss_rollback
        self.ss_stride = stride
        self._rollback_stats: dict[str, torch.Tensor] | None = None

    # --- the schedule of p and the draw of m ---------------------------------------------------------
    def schedule_total_steps(self) -> int:
        return self.training_length("p moves from p_start to p_end over training")

    def rollback_prob(self, step: int | None = None) -> float:
        """p(k) = p_start + (p_end - p_start) * min(k / K, 1), k = the optimizer step (global_step by default)."""
        if self.p_start == self.p_end:
            return self.p_start
        step = self.global_step if step is None else step
        frac = min(max(step / self.schedule_total_steps(), 0.0), 1.0)
        return self.p_start + (self.p_end - self.p_start) * frac

    def draw_rollback(self, n: int, p: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """m per row: 0 with probability 1 - p, else uniform on {1, ..., max_rollback}."""
        rolled = torch.rand(n, device=device, generator=generator) < p
        if self.max_rollback <= 1:
            return rolled.long() * self.max_rollback
        depth = torch.randint(1, self.max_rollback + 1, (n,), device=device, generator=generator)
        return torch.where(rolled, depth, torch.zeros_like(depth))

    # --- the roll-back ---------------------------------------------------------------------------------
    def rollback_step(self, x: torch.Tensor, level: torch.Tensor, cond=None, generator: torch.Generator | None = None):
        """One step of the chosen variant from `level` to `level - ss_stride`, per row."""
        eps = self.eps(x, level, cond)
        x0_hat, eps = self.schedule.x0_and_eps(x, level, eps, self.clip_denoised)
        lower = level - self.ss_stride
        if self.ss_rollback == "sampler_step" and self.sampling_options["eta"] == 0:
            z = None  # deterministic DDIM: no draw, so the random stream does not depend on a dead value
        else:
            z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        if self.ss_rollback == "renoise":
            return self.schedule.q_sample(x0_hat, lower, z)
        if self.ss_rollback == "ancestral":
            mean, _ = self.schedule.q_posterior(x0_hat, x, level)
            return mean + torch.exp(0.5 * extract(self.schedule.ancestral_log_variance(self.sampling_options["variance"]), level, x)) * z
        abar = self.schedule.alphas_cumprod
        return ddim_step(x0_hat, eps, extract(abar, level, x), extract(abar, lower, x), self.sampling_options["eta"], z)

    @torch.no_grad()
    def rollback(self, x: torch.Tensor, level: torch.Tensor, m: torch.Tensor, cond=None, generator=None) -> torch.Tensor:
        """Roll each row m of its own steps down from `level`; the net runs only on rows still rolling."""
        for j in range(int(m.max()) if m.numel() else 0):
            rows = (m > j).nonzero().squeeze(1)
            part_cond = None if cond is None else cond[rows]
            stepped = self.rollback_step(x[rows], level[rows], part_cond, generator)
            x = x.index_copy(0, rows, stepped)
            level = level.index_copy(0, rows, level[rows] - self.ss_stride)
        return x

    # --- training ----------------------------------------------------------------------------------------
    def rolled_input(self, x0: torch.Tensor, cond=None, generator: torch.Generator | None = None, p: float | None = None):
        """(x~_t, t, eps~, m) for a batch: the rolled-back input, its level, the noise it implies, the depths."""
        n, device = x0.shape[0], x0.device
        p = self.rollback_prob() if p is None else p
        m = self.draw_rollback(n, p, device, generator)
        span = self.num_timesteps - m * self.ss_stride  # t in {0, ..., span - 1}
        u = torch.rand(n, device=device, generator=generator, dtype=torch.float64)
        t = torch.minimum((u * span).long(), span - 1)
        noise = torch.randn(x0.shape, device=device, dtype=x0.dtype, generator=generator)
        x = self.schedule.q_sample(x0, t + m * self.ss_stride, self.perturb(noise, generator))
        x = self.rollback(x, t + m * self.ss_stride, m, cond, generator)
        rolled = (m > 0).view(-1, *([1] * (x0.dim() - 1)))
        eps = torch.where(rolled, self.schedule.eps_from_x0(x, t, x0), noise)
        return x, t, eps, m

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.training:
            return super().loss(batch, generator)
        x0, cond = batch["x"], batch.get("cond")
        p = self.rollback_prob()
        x, t, eps, m = self.rolled_input(x0, cond, generator, p)
        self._rollback_stats = {
            "train/rollback_fraction": (m > 0).float().mean(),
            "train/rollback_extra_forwards": m.float().mean(),
            "train/rollback_p": torch.tensor(p),
        }
        return F.mse_loss(self.net(x, t.float(), cond), self.target(x0, t, eps))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        for name, value in (self._rollback_stats or {}).items():
            self.log(name, value, on_step=True, on_epoch=False, batch_size=batch["x"].shape[0])
        return loss
