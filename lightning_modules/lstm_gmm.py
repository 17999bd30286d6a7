"""LSTM-GMM: robomimic's BC-RNN with a Gaussian-mixture action head, the baseline Diffusion Policy ran as
"LSTM-GMM" (Mandlekar et al. 2021; Chi et al. 2023, Sec. 5).

A 2-layer LSTM reads the observation window o_1..o_T, one low-dimensional observation per step with no encoder
(robomimic's low-dim setting), and at every step t emits a mixture of K diagonal Gaussians over that step's action:
means tanh(.) (inside the normalized action range), stds softplus(.) + min_std, and mixture logits. The loss is the
mean over batch and steps of -log p(a_t | o_1..o_t). A mixture, unlike an MSE regression, keeps both ways around
an obstacle instead of averaging them.

Fit to this project's data contract: every chunk step needs its own observation, so the method requires
data.horizon == data.n_obs_steps (and hence data.n_action_steps = 1): the chunk is the T per-step draws and
`Policy.act` executes its last entry, the action for the current step.

Difference from robomimic at rollout: robomimic steps the LSTM's hidden state once per environment step and resets
it every `horizon` (10) steps, so the context grows from 1 to 10 observations and restarts. Here the policy
re-reads the last T observations on every step (a sliding window, the first observation repeated at an episode
start), so every action sees exactly T observations, as the training windows do. The training loss is the same.
`step` is robomimic's stepping form; stepped from a reset it equals the window's output wherever the window covers
the whole context since the reset (tests/test_lstm_gmm.py), which is how the two rollouts relate.

At test time robomimic shrinks every component's std to 1e-4 (`low_noise_eval`): a draw picks a component from
the mixture weights and returns (about) its mean. Draws use the given torch.Generator only (torch.multinomial and
torch.randn), since torch.distributions' .sample() ignores generators.

The method builds its own net (`owns_net`): model.hidden, model.num_layers, model.num_modes; net.* does not apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from difflab.errors import ConfigError
from lightning_modules.direct import DirectModule

LOW_NOISE_STD = 1e-4  # robomimic's std of every component at evaluation under low_noise_eval


def mixture_log_prob(means: torch.Tensor, stds: torch.Tensor, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x) under sum_k softmax(logits)_k N(x; means_k, diag(stds_k^2)); means/stds (..., K, D), logits
    (..., K), x (..., D) -> (...)."""
    components = Independent(Normal(means, stds, validate_args=False), 1, validate_args=False)
    mixture = MixtureSameFamily(Categorical(logits=logits, validate_args=False), components, validate_args=False)
    return mixture.log_prob(x)


class MixtureLSTM(nn.Module):
    """The LSTM over the observation window and a linear head per step: raw (means, std parameters, logits)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: int, num_layers: int, num_modes: int):
        super().__init__()
        self.action_dim, self.num_modes = action_dim, num_modes
        self.lstm = nn.LSTM(obs_dim, hidden, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden, num_modes * (2 * action_dim + 1))

    def forward(self, obs: torch.Tensor, state=None, return_state: bool = False):
        """obs (B, T, obs_dim) -> raw means (B, T, K, D), raw stds (B, T, K, D), logits (B, T, K); from the LSTM state
        `state` (zeros when None), and the state after the last step with return_state."""
        features, state = self.lstm(obs, state)
        out = self.head(features)
        b, t = obs.shape[:2]
        k, d = self.num_modes, self.action_dim
        means, stds, logits = out.split([k * d, k * d, k], dim=-1)
        raw = (means.reshape(b, t, k, d), stds.reshape(b, t, k, d), logits)
        return (*raw, state) if return_state else raw


class LSTMGMM(DirectModule):
    owns_net = True
    what = "fits a Gaussian mixture over each step's action given the observations so far"

    def __init__(
        self,
        net: nn.Module | None = None,  # ignored: the method builds its own LSTM (owns_net)
        optimizer=None,
        scheduler=None,
        data_shape: tuple[int, ...] = (),
        cond_dim: int | None = None,
        clip_denoised: bool = True,
        n_obs_steps: int | None = None,
        hidden: int = 400,
        num_layers: int = 2,
        num_modes: int = 5,
        min_std: float = 1e-4,
        low_noise_eval: bool = True,
    ):
        super().__init__(None, optimizer, scheduler, data_shape, cond_dim, clip_denoised)
        n_obs_steps, obs_dim, action_dim = self.check_sequence_window(
            n_obs_steps, "data.horizon=10 data.n_obs_steps=10 data.n_action_steps=1")
        for key, value in (("hidden", hidden), ("num_layers", num_layers), ("num_modes", num_modes)):
            if int(value) < 1:
                raise ConfigError(f"model.{key} must be a positive integer, got {value}")
        if not min_std > 0:
            raise ConfigError(f"model.min_std must be > 0 (a floor on every component's std), got {min_std}")
        self.n_obs_steps, self.obs_dim, self.action_dim = n_obs_steps, obs_dim, action_dim
        self.num_modes, self.min_std, self.low_noise_eval = int(num_modes), float(min_std), bool(low_noise_eval)
        self.net = MixtureLSTM(self.obs_dim, action_dim, int(hidden), int(num_layers), self.num_modes)

    def mixture(self, cond: torch.Tensor, low_noise: bool = False):
        """Per-step mixture parameters for flat cond (B, T * obs_dim): means (B, T, K, D) in (-1, 1), stds
        (B, T, K, D) (all LOW_NOISE_STD with low_noise), logits (B, T, K)."""
        obs = cond.reshape(cond.shape[0], self.n_obs_steps, self.obs_dim)
        means, stds, logits = self.net(obs)
        means = torch.tanh(means)
        stds = torch.full_like(means, LOW_NOISE_STD) if low_noise else F.softplus(stds) + self.min_std
        return means, stds, logits

    def step(self, obs: torch.Tensor, state=None, low_noise: bool = False):
        """robomimic's rollout form: one observation (B, obs_dim) and the LSTM state carried from the step before (None
        at a reset) -> this step's mixture (means, stds (B, K, D), logits (B, K)) and the new state. Stepped from a
        reset over o_1..o_t it gives what `mixture` gives at step t of the window o_1..o_T."""
        means, stds, logits, state = self.net(obs[:, None], state, return_state=True)
        means = torch.tanh(means[:, 0])
        stds = torch.full_like(means, LOW_NOISE_STD) if low_noise else F.softplus(stds[:, 0]) + self.min_std
        return (means, stds, logits[:, 0]), state

    def log_prob(self, cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(a_t | o_1..o_t) for every row and step: (B, T)."""
        return mixture_log_prob(*self.mixture(cond), x)

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        cond = self.check_cond(batch.get("cond"), batch["x"].shape[0])
        return -self.log_prob(cond, batch["x"]).mean()

    def draw(self, cond: torch.Tensor, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
        means, stds, logits = self.mixture(cond, low_noise=self.low_noise_eval)
        b, t, k, d = means.shape
        device = self._generator_device(generator)
        probs = torch.softmax(logits.float(), dim=-1).reshape(b * t, k).to(device)
        pick = torch.multinomial(probs, 1, generator=generator).to(means.device)  # (B * T, 1)
        index = pick.reshape(b, t, 1, 1).expand(b, t, 1, d)
        mean, std = means.gather(2, index).squeeze(2), stds.gather(2, index).squeeze(2)
        noise = torch.randn((b, t, d), generator=generator, device=device).to(means.device, means.dtype)
        return mean + std * noise
