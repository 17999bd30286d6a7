"""Behavior Transformers (BET; Shafiullah et al. 2022), the baseline Diffusion Policy ran as "BET" (Chi et al. 2023).

Actions are split into a discrete and a continuous part: k-means over the training actions gives k bin centers,
and an action a is (its nearest center c_j, the offset a - c_j). A causal minGPT reads the observation window
o_1..o_T, one token per step (a linear embedding plus a learned position embedding), and at token t predicts the
action a_t as logits over the k bins and one offset per bin (k x action_dim). The loss is the focal loss of the
true bin (the nearest center of a_t) plus offset_loss_scale times the MSE between the TRUE bin's predicted offset and
a_t - c_true. A draw samples a bin from softmax(logits / temperature) and adds that bin's predicted offset; the
categorical keeps the modes of multimodal demonstrations apart where a regression would average them.

Fit to this project's data contract: every chunk step needs its own observation, so the method requires
data.horizon == data.n_obs_steps (and hence data.n_action_steps = 1), Diffusion Policy's BET setting (window 3):
the chunk is the T per-token draws and `Policy.act` executes its last entry, the action for the current step.

The bins are fitted once, in setup("fit"), on every action vector of the training chunks (normalized units, as
the loss sees them), with a seeded k-means++ / Lloyd; they are registered buffers, so they travel in every
checkpoint, and a module whose bins are already fitted (loaded weights) keeps them. Diffusion Policy's blockpush
config scales the offset loss by 1000 ("actions are very small": raw units); here actions are in [-1, 1], and the
default scale is BET's 1.0.

The method builds its own net (`owns_net`): model.n_layer / n_head / n_embd / dropout; net.* does not apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from difflab.errors import ConfigError
from lightning_modules.direct import DirectModule
from lightning_modules.nets.param_groups import weight_matrix_groups

# Enough points for k bins in a low-dimensional action space; a seeded subset above it bounds time and memory.
KMEANS_MAX_POINTS = 2**18
_DIST_CHUNK = 65536  # rows per distance block in k-means (a few MB per block)


def _sq_dist(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    return (points.pow(2).sum(1, keepdim=True) - 2.0 * points @ centers.T + centers.pow(2).sum(1)[None]).clamp_min(0.0)


def _nearest(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    return torch.cat([_sq_dist(block, centers).argmin(1) for block in points.split(_DIST_CHUNK)])


def kmeans(points: torch.Tensor, k: int, iters: int = 50, seed: int = 0, max_points: int = KMEANS_MAX_POINTS) -> torch.Tensor:
    """(k, D) centers of (N, D) points: k-means++ seeding then Lloyd iterations, in float64 on the CPU with its own
    generator, so the same points and seed give the same centers on every rank and machine. An empty cluster keeps
    its previous center."""
    points = points.detach().reshape(len(points), -1).to("cpu", torch.float64)
    n, d = points.shape
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    gen = torch.Generator().manual_seed(int(seed))
    if n > max_points:
        points = points[torch.randperm(n, generator=gen)[:max_points]]
        n = max_points
    centers = torch.empty(k, d, dtype=torch.float64)
    centers[0] = points[int(torch.randint(n, (1,), generator=gen))]
    closest = (points - centers[0]).pow(2).sum(1)
    for j in range(1, k):
        total = float(closest.sum())
        # D^2 sampling; with fewer distinct points than k every point is already a center, so pick uniformly
        pick = torch.multinomial(closest / total, 1, generator=gen) if total > 0 else torch.randint(n, (1,), generator=gen)
        centers[j] = points[int(pick)]
        closest = torch.minimum(closest, (points - centers[j]).pow(2).sum(1))
    assign = None
    for _ in range(int(iters)):
        new = _nearest(points, centers)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, assign, points)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None]
    return centers.float()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """-(1 - p)^gamma log p of the target class, per row (logits (..., K), target (...) -> (...)); cross-entropy at
    gamma 0. It down-weights tokens the model already classifies well (Lin et al. 2017, as BET uses it)."""
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return -(1.0 - logp.exp()).pow(gamma) * logp


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.reshape(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in self.qkv(x).split(c, dim=-1))
        # is_causal: token t attends to tokens <= t only, so a_t depends on o_1..o_t
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2 / minGPT)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class BinOffsetGPT(nn.Module):
    """A causal GPT over observation tokens with BET's head: per token, logits over k bins and k offsets."""

    def __init__(self, obs_dim: int, action_dim: int, block_size: int, n_bins: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float):
        super().__init__()
        self.block_size, self.n_bins, self.action_dim = block_size, n_bins, action_dim
        self.obs_emb = nn.Linear(obs_dim, n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, block_size, n_embd))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, n_bins * (1 + action_dim))
        self.apply(self._init_weights)

    def optim_groups(self, weight_decay: float | None = None) -> list[dict]:
        """minGPT / BET's split: weight decay on the linear layers' weights only."""
        return weight_matrix_groups(self, weight_decay)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # minGPT's initialisation: small normal weights, zero biases (LayerNorm keeps ones / zeros)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (B, T, obs_dim), T <= block_size -> logits (B, T, k), offsets (B, T, k, action_dim)."""
        b, t, _ = obs.shape
        if t > self.block_size:
            raise ValueError(f"{t} observation tokens, but the GPT was built for at most {self.block_size}")
        x = self.drop(self.obs_emb(obs) + self.pos_emb[:, :t])
        for block in self.blocks:
            x = block(x)
        out = self.head(self.ln_f(x))
        logits, offsets = out.split([self.n_bins, self.n_bins * self.action_dim], dim=-1)
        return logits, offsets.reshape(b, t, self.n_bins, self.action_dim)


class BET(DirectModule):
    owns_net = True
    what = "classifies each step's action into k-means bins and regresses its offset from the observations so far"

    def __init__(
        self,
        net: nn.Module | None = None,  # ignored: the method builds its own GPT (owns_net)
        optimizer=None,
        scheduler=None,
        data_shape: tuple[int, ...] = (),
        cond_dim: int | None = None,
        clip_denoised: bool = True,
        n_obs_steps: int | None = None,
        n_bins: int = 24,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 72,
        dropout: float = 0.1,
        focal_gamma: float = 2.0,
        offset_loss_scale: float = 1.0,
        temperature: float = 1.0,
        kmeans_seed: int = 0,
        kmeans_iters: int = 50,
    ):
        super().__init__(None, optimizer, scheduler, data_shape, cond_dim, clip_denoised)
        n_obs_steps, obs_dim, action_dim = self.check_sequence_window(
            n_obs_steps, "data.horizon=3 data.n_obs_steps=3 data.n_action_steps=1 (Diffusion Policy's BET window)")
        for key, value in (("n_bins", n_bins), ("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd),
                           ("kmeans_iters", kmeans_iters)):
            if int(value) != value or int(value) < 1:
                raise ConfigError(f"model.{key} must be a positive integer, got {value}")
        if int(n_embd) % int(n_head):
            raise ConfigError(f"model.n_embd={n_embd} must be a multiple of model.n_head={n_head} (each head gets n_embd / n_head dims)")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {dropout}")
        if not focal_gamma >= 0:
            raise ConfigError(f"model.focal_gamma must be >= 0 (0: cross-entropy), got {focal_gamma}")
        if not offset_loss_scale >= 0:
            raise ConfigError(f"model.offset_loss_scale must be >= 0, got {offset_loss_scale}")
        if not temperature > 0:
            raise ConfigError(f"model.temperature must be > 0 (1: the learned bin probabilities), got {temperature}")
        self.n_obs_steps, self.obs_dim, self.action_dim = n_obs_steps, obs_dim, action_dim
        self.n_bins, self.focal_gamma = int(n_bins), float(focal_gamma)
        self.offset_loss_scale, self.temperature = float(offset_loss_scale), float(temperature)
        self.kmeans_seed, self.kmeans_iters = int(kmeans_seed), int(kmeans_iters)
        self.net = BinOffsetGPT(self.obs_dim, action_dim, n_obs_steps, self.n_bins, int(n_layer), int(n_head), int(n_embd), float(dropout))
        # Buffers, so the bins are in every checkpoint and EMA copy; float (not bool) so EMA's lerp over every
        # buffer accepts the flag, and a lerp between equal values leaves both exactly as they are.
        self.register_buffer("bin_centers", torch.zeros(self.n_bins, action_dim))
        self.register_buffer("bins_fitted", torch.zeros(()))

    # --- bins ---------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return bool(self.bins_fitted > 0)

    def fit_bins(self, actions: torch.Tensor) -> torch.Tensor:
        """Fit the k bin centers on actions (..., action_dim) in normalized units; returns them."""
        actions = actions.reshape(-1, self.action_dim)
        if len(actions) < self.n_bins:
            raise ConfigError(f"model.n_bins={self.n_bins} is more than the {len(actions)} training actions: lower model.n_bins")
        centers = kmeans(actions, self.n_bins, self.kmeans_iters, self.kmeans_seed)
        with torch.no_grad():
            self.bin_centers.copy_(centers)
            self.bins_fitted.fill_(1.0)
        return self.bin_centers

    def training_actions(self) -> torch.Tensor:
        """Every action vector of the training chunks, (N * horizon, action_dim), from the trainer's datamodule."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "dataset"):
            raise RuntimeError("BET fits its action bins on the training actions in setup('fit'): call "
                               "trainer.fit(module, datamodule=<a trajectory datamodule>), or module.fit_bins(actions) first")
        x = datamodule.dataset("train").tensors["x"]
        return x.reshape(-1, x.shape[-1])

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if not self.is_fitted:
            actions = self.training_actions()
            self.fit_bins(actions)
            rank_zero_info(f"BET: {self.n_bins} action bins from k-means (seed {self.kmeans_seed}) over {len(actions)} training actions")
        self._share_bins_with_averaged_copies()

    def _share_bins_with_averaged_copies(self) -> None:
        # Lightning runs the callbacks' setup before the module's, so an EMA callback (WeightAveraging) has already
        # copied this module with unfitted bins; validation swaps that copy in (the sanity check runs before any
        # EMA update) and checkpoints store it as `state_dict`. Give the copy the bins.
        for callback in getattr(self._trainer, "callbacks", None) or ():
            average = getattr(getattr(callback, "_average_model", None), "module", None)
            if isinstance(average, BET):
                with torch.no_grad():
                    average.bin_centers.copy_(self.bin_centers)
                    average.bins_fitted.copy_(self.bins_fitted)

    def _require_bins(self) -> None:
        if not self.is_fitted:
            raise RuntimeError("BET's action bins are not fitted: they are fitted on the training actions in setup('fit') "
                               "(trainer.fit with the datamodule) or loaded with a checkpoint; or call module.fit_bins(actions)")

    def nearest_bin(self, actions: torch.Tensor) -> torch.Tensor:
        """Index of the nearest bin center of each action (..., action_dim) -> (...)."""
        return (actions.unsqueeze(-2) - self.bin_centers.to(actions.dtype)).pow(2).sum(-1).argmin(-1)

    def targets(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(true bin, offset target a - center[true bin]) of each action (..., action_dim)."""
        bins = self.nearest_bin(actions)
        return bins, actions - self.bin_centers.to(actions.dtype)[bins]

    # --- the method ---------------------------------------------------------------------------
    def head(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (B, T, k) and offsets (B, T, k, action_dim) for flat cond (B, T * obs_dim)."""
        return self.net(cond.reshape(cond.shape[0], self.n_obs_steps, self.obs_dim))

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        self._require_bins()
        x = batch["x"]
        cond = self.check_cond(batch.get("cond"), x.shape[0])
        logits, offsets = self.head(cond)
        bins, target = self.targets(x)
        index = bins[..., None, None].expand(*bins.shape, 1, self.action_dim)
        true_offset = offsets.gather(-2, index).squeeze(-2)  # only the true bin's offset is trained
        class_loss = focal_loss(logits, bins, self.focal_gamma).mean()
        return class_loss + self.offset_loss_scale * F.mse_loss(true_offset.float(), target.float())

    def draw(self, cond: torch.Tensor, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
        self._require_bins()
        logits, offsets = self.head(cond)
        b, t, k = logits.shape
        probs = torch.softmax(logits.float() / self.temperature, dim=-1).reshape(b * t, k)
        pick = torch.multinomial(probs.to(self._generator_device(generator)), 1, generator=generator).to(logits.device)
        bins = pick.reshape(b, t)
        index = bins[..., None, None].expand(b, t, 1, self.action_dim)
        return self.bin_centers.to(offsets.dtype)[bins] + offsets.gather(-2, index).squeeze(-2)

