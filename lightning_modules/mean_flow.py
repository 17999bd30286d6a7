"""MeanFlow (Geng et al. 2025): one-step generation trained from scratch, on the linear path of flow matching.

The net learns the average velocity over an interval, u(z_t, r, t) = (1 / (t - r)) int_r^t v(z_s, s) ds, so one
evaluation jumps z_r = z_t - (t - r) u. Differentiating (t - r) u = int_r^t v in t gives the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v . du/dz + du/dt  (r held fixed),

and training regresses u onto a stop-gradient target built from it, with the conditional velocity v = n - x0 in
v's place and the total derivative as one Jacobian-vector product along (v, 0, 1) (`torch.func.jvp`; `model.jvp=
finite_difference` is the fallback for a net jvp cannot trace, central differences with O(h^2) error). (r, t) are
two logit-normal draws sorted, and r = t for a `1 - model.ratio_r_neq_t` share (plain flow matching there, where u
is v). The per-sample loss is weighted adaptively, sg(1 / (||e||^2 + c)^p) ||e||^2 (p = `model.adaptive_p`).

The net sees t through its noise-level input (999 t, as flow matching feeds it) and the interval t - r through the
shared condition module: sinusoidal features of 999 (t - r) are appended to the data's condition (`net_cond_dim`),
so every net that takes a condition vector takes MeanFlow's second time without a change.
"""

from __future__ import annotations

import torch

import samplers
from difflab.errors import ConfigError
from lightning_modules.base import DiffusionModule
from lightning_modules.nets.embeddings import sinusoidal_embedding
from lightning_modules.paths import LinearPath, bcast
from samplers import grids
from samplers.core import batch_sigma

INTERVAL_DIM = 32  # sinusoidal features of the interval t - r, appended to the condition vector
JVPS = ("exact", "finite_difference")


class MeanFlow(DiffusionModule):
    provides = samplers.FLOW_MAP
    quick_sampling = {"sampler": "mean_flow", "steps": 1}
    default_sampling = {"sampler": "mean_flow", "steps": 1, "options": {}}

    def __init__(
        self,
        net,
        optimizer,
        scheduler=None,
        data_shape=(),
        cond_dim=None,
        clip_denoised: bool = False,
        ratio_r_neq_t: float = 0.25,
        logit_mean: float = -0.4,
        logit_std: float = 1.0,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
        jvp: str = "exact",
        fd_step: float = 1e-3,
        t_max: float = 0.999,
        cfg_scale: float = 1.0,
        sampling: dict | None = None,
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised, sampling)
        if not 0.0 <= ratio_r_neq_t <= 1.0:
            raise ConfigError(f"model.ratio_r_neq_t={ratio_r_neq_t} is not valid: the share of draws with r < t, in [0, 1]")
        if logit_std <= 0 or adaptive_p < 0 or adaptive_c <= 0 or fd_step <= 0:
            raise ConfigError("model.logit_std, model.adaptive_c and model.fd_step must be > 0 and model.adaptive_p >= 0")
        if jvp not in JVPS:
            raise ConfigError(f"model.jvp={jvp!r} is not valid: use one of {', '.join(JVPS)}")
        if not 0 < t_max < 1:
            raise ConfigError(f"model.t_max={t_max} is not valid: 0 < t_max < 1 (sampling starts there from pure noise)")
        self.path = LinearPath()
        self.ratio_r_neq_t, self.logit_mean, self.logit_std = float(ratio_r_neq_t), float(logit_mean), float(logit_std)
        self.adaptive_p, self.adaptive_c = float(adaptive_p), float(adaptive_c)
        self.jvp_mode, self.fd_step, self.t_max = jvp, float(fd_step), float(t_max)
        if cfg_scale <= 0:
            raise ConfigError(f"model.cfg_scale={cfg_scale} is not valid: a guidance scale > 0 (1: no guidance)")
        self.cfg_scale = float(cfg_scale)
        self.check_default_sampler()

    @classmethod
    def net_cond_dim(cls, cond_dim: int | None) -> int:
        return (cond_dim or 0) + INTERVAL_DIM

    # --- the average velocity -------------------------------------------------------------------------
    def average_velocity(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        interval = sinusoidal_embedding(999.0 * (t - r), INTERVAL_DIM).to(z.dtype)
        net_cond = interval if cond is None else torch.cat([cond.reshape(cond.shape[0], -1).to(z.dtype), interval], 1)
        return self.net(z, 999.0 * t, net_cond)

    def draw_r_t(self, n: int, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two logit-normal times sorted (r <= t); r = t for a 1 - ratio_r_neq_t share."""
        pair = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(2, n, device=device, generator=generator))
        r, t = pair.min(0).values, pair.max(0).values
        same = torch.rand(n, device=device, generator=generator) >= self.ratio_r_neq_t
        return torch.where(same, t, r), t

    def total_derivative(self, z, r, t, v, cond):
        """(u, d/dt u along dz/dt = v, dr/dt = 0, dt/dt = 1)."""
        fn = lambda z_, r_, t_: self.average_velocity(z_, r_, t_, cond)  # noqa: E731
        tangents = (v, torch.zeros_like(r), torch.ones_like(t))
        if self.jvp_mode == "finite_difference":
            h = self.fd_step
            ahead = fn(z + h * v, r, t + h)
            behind = fn(z - h * v, r, t - h)
            return fn(z, r, t), (ahead - behind) / (2 * h)
        try:
            return torch.func.jvp(fn, (z, r, t), tangents)
        except (RuntimeError, NotImplementedError) as err:
            raise ConfigError(f"torch.func.jvp cannot trace this net ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                              "train with model.jvp=finite_difference (central differences, error O(model.fd_step^2))") from None

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x0, cond = batch["x"], batch.get("cond")
        r, t = self.draw_r_t(x0.shape[0], x0.device, generator)
        r, t = r.to(x0.dtype), t.to(x0.dtype)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        z = self.path.perturb(x0, t, noise)
        v = self.guided_velocity(batch, z, t, self.path.velocity_target(x0, t, noise))
        u, dudt = self.total_derivative(z, r, t, v, cond)
        target = (v - bcast(t - r, x0) * dudt).detach()
        err = (u - target).flatten(1).pow(2).sum(1)
        weight = (err.detach() + self.adaptive_c).pow(-self.adaptive_p)
        return (weight * err).mean() / x0[0].numel()

    def guided_velocity(self, batch: dict, z, t, v):
        """MeanFlow's classifier-free guidance, folded into training (Geng et al. 2025, Sec. 4.2): on the rows that
        kept their condition the field is w v + (1 - w) u(z_t, t, t | null), the model's own unconditional velocity
        (stop-gradient); dropped rows keep v. One step then samples the guided field, with no second pass."""
        if self.cfg_scale == 1.0 or batch.get("cond") is None:
            return v
        if self.null_cond is None:
            raise ConfigError("model.cfg_scale needs the learned null condition: train with model.cond_drop=0.1 as well")
        cond = batch["cond"]
        null = self.null_cond.to(cond.dtype).expand(cond.shape[0], -1)
        with torch.no_grad():
            u_null = self.average_velocity(z, t, t, null).to(v.dtype)
        kept = ~batch.get("cond_dropped", torch.zeros(cond.shape[0], dtype=torch.bool, device=cond.device))
        return torch.where(bcast(kept, v).bool(), self.cfg_scale * v + (1 - self.cfg_scale) * u_null, v)

    # --- sampling: the flow map between VE levels -------------------------------------------------------
    @property
    def sigma_range(self) -> tuple[float, float]:
        return 0.0, float(self.path.ve_sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    def grid(self, sampler: str, steps: int, options: dict | None = None) -> torch.Tensor:
        """Evenly spaced t from t_max down to 0."""
        return grids.time_uniform(self.path.ve_sigma, steps, self.t_max, 0.0)

    def sampling_denoiser(self, cond, sampler: str, options: dict):
        def jump(x, sigma, sigma_next):
            t, r = self.path.t_of_ve_sigma(sigma), self.path.t_of_ve_sigma(sigma_next)
            z = self.path.from_ve(x, sigma)
            z_r = z - bcast(t - r, z) * self.average_velocity(z, r, t, cond).to(z.dtype)
            return self.path.to_ve(z_r, sigma_next)
        return jump

    def denoise(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """One jump from sigma to 0: the end of x's trajectory (what one-step sampling returns)."""
        sigma = batch_sigma(sigma, x)
        return self.sampling_denoiser(cond, "mean_flow", {})(x, sigma, torch.zeros_like(sigma))
