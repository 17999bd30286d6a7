"""A conditional VAE over action chunks (the action-chunking CVAE of ACT, Zhao et al. 2023, with MLPs).

The encoder q(z | chunk, obs) sees the demonstrated chunk, so its latent can carry which way the demonstrator
went; the decoder p(chunk | z, obs) turns a latent back into a chunk. At run time no chunk is known, so z is drawn
from the prior N(0, I) and decoded: one network call per chunk. Whether the prior's draws land on the
demonstrations' modes (rather than between them, as regression does) depends on how much the posterior was allowed
to carry, i.e. on kl_weight.

Loss scaling (per sample, averaged over the batch):
    recon = sum over the chunk's horizon * action_dim elements of (x - x_hat)^2   (l2)   or |x - x_hat|   (l1)
    kl    = KL(N(mu, diag s^2) || N(0, I)) = 0.5 * sum_j (mu_j^2 + s_j^2 - 1 - log s_j^2)
    loss  = recon + kl_weight * kl
Summing over elements keeps the ELBO's proportions: with l2 and kl_weight = b the loss is b times the negative ELBO
of a Gaussian decoder with variance b / 2 (kl_weight = 1: the exact negative ELBO at decoder std 1/sqrt(2), up to a
constant); with l1, of a Laplace decoder with scale b. ACT averages its L1 over the elements and weighs KL by 10,
i.e. kl_weight = 10 * horizon * action_dim in these units.

ACT decodes z = 0 (the prior's mean) at test time; this module draws z ~ N(0, I), so the policy is stochastic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import ConfigError
from lightning_modules.direct import DirectModule

RECON_LOSSES = ("l1", "l2")


def _mlp(inputs: int, hidden: int, depth: int, outputs: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = inputs
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


class ChunkCVAE(nn.Module):
    """Encoder [flat chunk, cond] -> (mu, log s^2) and decoder [z, cond] -> flat chunk; forward() is the training
    pass (so torch.compile of the net speeds up what training runs)."""

    def __init__(self, chunk_dim: int, cond_dim: int, latent_dim: int, hidden: int, depth: int, dropout: float):
        super().__init__()
        self.chunk_dim, self.latent_dim = chunk_dim, latent_dim
        self.encoder = _mlp(chunk_dim + cond_dim, hidden, depth, 2 * latent_dim, dropout)
        self.decoder = _mlp(latent_dim + cond_dim, hidden, depth, chunk_dim, dropout)

    def encode(self, x_flat: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(torch.cat([x_flat, cond], dim=-1)).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, cond], dim=-1))

    def forward(self, x_flat: torch.Tensor, cond: torch.Tensor, eps: torch.Tensor):
        """(reconstruction, mu, logvar) for z = mu + s * eps, the reparametrised posterior draw."""
        mu, logvar = self.encode(x_flat, cond)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decode(z, cond), mu, logvar


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row, summed over the latent dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


class VAEPolicy(DirectModule):
    what = "decodes action chunks from observations and a latent"
    owns_net = True

    def __init__(self, net=None, optimizer=None, scheduler=None, data_shape=(), cond_dim=None, clip_denoised: bool = True,
                 latent_dim: int = 32, hidden: int = 256, depth: int = 3, kl_weight: float = 1.0, recon_loss: str = "l2",
                 dropout: float = 0.0):
        # The architecture is this method's own: a net passed in (net.* of the run config) does not apply.
        super().__init__(None, optimizer, scheduler, data_shape, cond_dim, clip_denoised)
        if len(self.data_shape) != 2:
            raise ConfigError(f"model=vae_policy models action chunks (horizon, action_dim), got data shape {self.data_shape}: "
                              "use data=obstacle2d or data=pusht")
        for key, value in (("latent_dim", latent_dim), ("hidden", hidden), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{key}={value!r} must be a whole number >= 1")
        if not (isinstance(kl_weight, (int, float)) and math.isfinite(kl_weight) and kl_weight >= 0):
            raise ConfigError(f"model.kl_weight={kl_weight!r} must be a finite number >= 0")
        if recon_loss not in RECON_LOSSES:
            raise ConfigError(f"model.recon_loss={recon_loss!r} is not defined: use one of {', '.join(RECON_LOSSES)}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ConfigError(f"model.dropout={dropout!r} must be in [0, 1)")
        self.latent_dim, self.kl_weight, self.recon_loss = int(latent_dim), float(kl_weight), recon_loss
        self.chunk_dim = math.prod(self.data_shape)
        self.net = ChunkCVAE(self.chunk_dim, int(self.cond_dim), self.latent_dim, int(hidden), int(depth), float(dropout))

    def sample_latent(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prior draws z ~ N(0, I), (num_samples, latent_dim), from `generator`."""
        z = torch.randn((num_samples, self.latent_dim), generator=generator, device=self._generator_device(generator))
        return z.to(self.device)

    def reconstruction(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample reconstruction error, summed over the chunk's elements (see the module docstring)."""
        err = (x - target).abs() if self.recon_loss == "l1" else (x - target).pow(2)
        return err.flatten(1).sum(dim=1)

    def loss_terms(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(recon, kl), each averaged over the batch; one posterior draw per example from `generator`."""
        x = batch["x"]
        cond = self.check_cond(batch.get("cond"), x.shape[0])
        eps = torch.randn((x.shape[0], self.latent_dim), generator=generator, device=self._generator_device(generator))
        recon_flat, mu, logvar = self.net(x.flatten(1), cond, eps.to(x))
        recon = self.reconstruction(recon_flat.view_as(x), x).mean()
        return recon, gaussian_kl(mu, logvar).mean()

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        recon, kl = self.loss_terms(batch, generator)
        self._log_terms(recon, kl, batch["x"].shape[0])
        return recon + self.kl_weight * kl

    def _log_terms(self, recon: torch.Tensor, kl: torch.Tensor, batch_size: int) -> None:
        # The base's steps log only the total; the two terms tell a collapsed posterior (kl ~ 0) from a used one.
        # Only inside a Lightning step: loss() also serves tests and scripts with no trainer.
        if self._trainer is None or getattr(self, "_current_fx_name", None) not in ("training_step", "validation_step"):
            return
        if self._current_fx_name == "training_step":
            kwargs = dict(on_step=True, on_epoch=False)
            stage = "train"
        else:
            kwargs = dict(sync_dist=True)
            stage = "val"
        self.log(f"{stage}/recon", recon.detach(), batch_size=batch_size, **kwargs)
        self.log(f"{stage}/kl", kl.detach(), batch_size=batch_size, **kwargs)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net.decode(z, cond).view(z.shape[0], *self.data_shape)

    def draw(self, cond: torch.Tensor, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
        return self.decode(self.sample_latent(num_samples, generator), cond)
