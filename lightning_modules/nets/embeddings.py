"""Noise-level and condition embeddings shared by every denoiser net."""

import math
from functools import partial

import torch
from torch import Tensor, nn


def sinusoidal_embedding(noise_level: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer / DDPM sinusoidal embedding of a float per batch item: (B,) -> (B, dim).

    Frequencies run geometrically from 1 to 1/max_period (Ho et al. 2020,
    `get_timestep_embedding`), so step indices 0..999 and continuous values
    (sigma, t * 1000, EDM's c_noise) are both resolved.
    """
    half = dim // 2
    # Computed in float32 even under autocast: bf16 cannot tell step 998 from 999.
    exponents = torch.arange(half, device=noise_level.device, dtype=torch.float32) / max(half - 1, 1)
    freqs = torch.exp(-math.log(max_period) * exponents)
    args = noise_level.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


def as_batch(noise_level: Tensor | float, batch_size: int, device: torch.device) -> Tensor:
    """Accept a (B,) tensor, a 0-dim tensor or a Python number; return float32 (B,)."""
    noise_level = torch.as_tensor(noise_level, device=device, dtype=torch.float32)
    if noise_level.ndim == 0:
        noise_level = noise_level.expand(batch_size)
    if noise_level.shape != (batch_size,):
        raise ValueError(
            f"noise_level must have shape ({batch_size},) or be a scalar, got {tuple(noise_level.shape)}"
        )
    return noise_level


class Condition(nn.Module):
    """A net's condition input: checked, flattened, cast to the net's dtype and mixed into its noise embedding.

    An observation history (B, T, D) counts as one flat vector of T * D. How the flat vector is mixed in follows
    the paper each net reproduces (`mode`):
      "add"    (MLP, UNet): a two-layer MLP of it is added to the noise embedding, one vector for "how noisy"
               and "given what";
      "concat" (ConditionalUnet1D): it is appended raw to the step embedding, Diffusion Policy's FiLM input (each
               FiLM layer is its encoder, so there are no layers here);
      "tokens" (TransformerForDiffusion1D): it is read as n_obs_steps observations, each projected to one memory
               token after the noise-level token.
    """

    MODES = ("add", "concat", "tokens")

    def __init__(self, cond_dim: int | None, mode: str, dim: int = 0, n_obs_steps: int = 1):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.cond_dim = None if cond_dim is None else int(cond_dim)
        # The layers keep the names they had in the nets: checkpoints store them so (see keep_checkpoint_names).
        self.cond_mlp = self.cond_obs_emb = None
        self.n_obs_steps = self.obs_dim = 0
        if self.cond_dim is None:
            return
        if mode == "add":
            self.cond_mlp = nn.Sequential(nn.Linear(self.cond_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        elif mode == "tokens":
            n_obs_steps = int(n_obs_steps)
            if n_obs_steps < 1 or self.cond_dim % n_obs_steps:
                raise ValueError(
                    f"cond_dim {self.cond_dim} must be divisible by n_obs_steps {n_obs_steps}: the flat cond is read "
                    f"as (n_obs_steps, obs_dim) tokens; set the net's n_obs_steps to the data's (${{data.n_obs_steps}})"
                )
            self.n_obs_steps, self.obs_dim = n_obs_steps, self.cond_dim // n_obs_steps
            self.cond_obs_emb = nn.Linear(self.obs_dim, dim)

    def flat(self, cond: Tensor | None, batch_size: int, dtype: torch.dtype) -> Tensor | None:
        """cond as (batch_size, cond_dim) in dtype; None for a net without a condition. Raises on a mismatch."""
        if self.cond_dim is None:
            if cond is not None:
                raise ValueError("got a cond tensor, but the net was built with cond_dim=None")
            return None
        if cond is None:
            raise ValueError(f"the net was built with cond_dim={self.cond_dim}, so cond (B, {self.cond_dim}) is required")
        # A 0-dim cond has no batch axis to keep: left as is, so that the error below names its shape ().
        flat = cond.reshape(cond.shape[0], -1) if cond.ndim >= 1 else cond
        if flat.shape != (batch_size, self.cond_dim):
            seen = f"{tuple(cond.shape)}" + (f" (flattened: {tuple(flat.shape)})" if cond.ndim > 2 else "")
            raise ValueError(f"cond must have shape ({batch_size}, {self.cond_dim}), got {seen}")
        return flat.to(dtype)

    def forward(self, emb: Tensor, cond: Tensor | None, dtype: torch.dtype) -> Tensor:
        """emb: the noise embedding (B, E), for "tokens" the noise-level token (B, 1, E). dtype: the net's parameter
        dtype (float64 for gradient checks), not emb's, which autocast lowers."""
        flat = self.flat(cond, emb.shape[0], dtype)
        if flat is None:
            return emb
        if self.mode == "add":
            return emb + self.cond_mlp(flat)
        if self.mode == "concat":
            return torch.cat([emb, flat], dim=1)
        return torch.cat([emb, self.cond_obs_emb(flat.reshape(-1, self.n_obs_steps, self.obs_dim))], dim=1)


def _lift(attr: str, module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    inner = f"{prefix}{attr}."
    # Rebuilt in place rather than renamed key by key, so the keys keep their order.
    items = [(prefix + k[len(inner):] if k.startswith(inner) else k, v) for k, v in state_dict.items()]
    state_dict.clear()
    state_dict.update(items)


def _nest(attr: str, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    # Only the old spelling is moved; keys already under `attr.` (from named_parameters()) load as they are.
    layers = tuple(f"{prefix}{name}." for name in getattr(module, attr)._modules)
    for key in [k for k in state_dict if k.startswith(layers)]:
        state_dict[f"{prefix}{attr}.{key[len(prefix):]}"] = state_dict.pop(key)


def keep_checkpoint_names(host: nn.Module, attr: str = "condition") -> None:
    """Save and load the layers of `host.<attr>` (a Condition) as `host`'s own: `embed.cond_mlp.*` and
    `cond_obs_emb.*`, the names from before Condition that every checkpoint and export has. Older checkouts and
    code that compares keys before loading (envs/export.py) keep working; only named_parameters() says
    `condition.`. Plain functions in partials, not lambdas, so that nets still deepcopy (EMA) and pickle."""
    host.register_state_dict_post_hook(partial(_lift, attr))
    host.register_load_state_dict_pre_hook(partial(_nest, attr))


class NoiseLevelEmbedding(nn.Module):
    """sinusoidal(noise_level * scale) -> Linear -> SiLU -> Linear, plus the condition ("add" mode)."""

    def __init__(self, sin_dim: int, out_dim: int, cond_dim: int | None = None, embedding_scale: float = 1.0):
        super().__init__()
        self.sin_dim = sin_dim
        self.cond_dim = cond_dim
        self.embedding_scale = embedding_scale
        self.time_mlp = nn.Sequential(nn.Linear(sin_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.condition = Condition(cond_dim, "add", out_dim)
        keep_checkpoint_names(self)

    @property
    def cond_mlp(self) -> nn.Module | None:
        """Where the layer lived before Condition; code still reads it here."""
        return self.condition.cond_mlp

    def forward(self, noise_level: Tensor | float, cond: Tensor | None, batch_size: int, device) -> Tensor:
        noise_level = as_batch(noise_level, batch_size, device)
        dtype = self.time_mlp[0].weight.dtype  # follow the net (float64 for gradient checks)
        emb = self.time_mlp(sinusoidal_embedding(noise_level * self.embedding_scale, self.sin_dim).to(dtype))
        return self.condition(emb, cond, dtype)
