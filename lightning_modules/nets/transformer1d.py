"""Diffusion Policy's time-series diffusion transformer (Chi et al. 2023, "DP-T", `TransformerForDiffusion`).

Every noisy action of the chunk is one token of a pre-LayerNorm transformer decoder. The decoder
cross-attends to a short memory: one token for the noise level followed by one token per
observation step, encoded by a small transformer encoder (or, as in the paper's default, an MLP).
With `causal_attn` the action tokens attend only to earlier action tokens and action token i sees
the observation tokens 0..i only, which is what the paper found best for low-dimensional control
(the chunk is aligned with the history: chunk index k is the action taken after observation k).
n_layer 8, n_head 4, n_emb 256 is the paper's low-dim Push-T setting (8.97M parameters for horizon
16, action_dim 2, two 20-dim observations).
"""

import torch
from torch import Tensor, nn

from lightning_modules.nets.embeddings import Condition, as_batch, keep_checkpoint_names, sinusoidal_embedding
from lightning_modules.nets.param_groups import weight_matrix_groups


class TransformerForDiffusion1D(nn.Module):
    def __init__(
        self,
        data_shape: tuple[int, int],
        cond_dim: int | None = None,
        n_obs_steps: int = 2,
        n_layer: int = 8,
        n_head: int = 4,
        n_emb: int = 256,
        p_drop_emb: float = 0.0,
        p_drop_attn: float = 0.3,
        causal_attn: bool = True,
        n_cond_layers: int = 0,
        embedding_scale: float = 1.0,
    ):
        super().__init__()
        if len(data_shape) != 2:
            raise ValueError(f"TransformerForDiffusion1D needs data_shape (horizon, action_dim), got {tuple(data_shape)}")
        horizon, action_dim = (int(s) for s in data_shape)
        n_layer, n_head, n_emb, n_cond_layers = int(n_layer), int(n_head), int(n_emb), int(n_cond_layers)
        if n_layer < 1:
            raise ValueError(f"n_layer must be at least 1, got {n_layer}")
        if n_cond_layers < 0:
            raise ValueError(f"n_cond_layers must be >= 0 (0: an MLP encodes the memory), got {n_cond_layers}")
        if n_head < 1 or n_emb % n_head:
            raise ValueError(f"n_emb ({n_emb}) must be divisible by n_head ({n_head}): each head gets n_emb / n_head dims")
        self.data_shape = (horizon, action_dim)
        self.n_emb = n_emb
        self.causal_attn = bool(causal_attn)
        self.embedding_scale = embedding_scale

        self.input_emb = nn.Linear(action_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, horizon, n_emb))
        self.drop = nn.Dropout(p_drop_emb)

        # Memory: the noise-level token first, then the observation tokens, each with its own position.
        self.condition = Condition(cond_dim, "tokens", n_emb, n_obs_steps)
        keep_checkpoint_names(self)
        cond = self.condition
        self.cond_dim, self.n_obs_steps, self.obs_dim = cond.cond_dim, cond.n_obs_steps, cond.obs_dim
        n_memory = 1 + self.n_obs_steps
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, n_memory, n_emb))
        if n_cond_layers > 0:
            layer = nn.TransformerEncoderLayer(
                n_emb, n_head, 4 * n_emb, p_drop_attn, activation="gelu", batch_first=True, norm_first=True
            )
            # nested tensors are only used for post-norm layers; saying so silences PyTorch's warning
            self.encoder = nn.TransformerEncoder(layer, n_cond_layers, enable_nested_tensor=False)
        else:
            # The sinusoidal time token has no learned layers of its own: this MLP is what makes it trainable.
            self.encoder = nn.Sequential(nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb))

        layer = nn.TransformerDecoderLayer(
            n_emb, n_head, 4 * n_emb, p_drop_attn, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, n_layer)

        if self.causal_attn:
            # True = may NOT attend. Action token i sees action tokens j <= i ...
            steps = torch.arange(horizon)
            self.register_buffer("tgt_mask", steps[None, :] > steps[:, None], persistent=False)
            # ... and memory slot s (0: time, s >= 1: observation s - 1) only if s - 1 <= i.
            slots = torch.arange(n_memory)
            self.register_buffer("memory_mask", (slots[None, :] - 1) > steps[:, None], persistent=False)
        else:
            self.tgt_mask = None
            self.memory_mask = None

        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, action_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-style small init as in the paper: PyTorch's default fan-in init makes the 8 residual
        # blocks' sum start large, and the learned positions must start near zero but not at it.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    if getattr(module, name) is not None:
                        nn.init.normal_(getattr(module, name), std=0.02)
                for name in ("in_proj_bias", "bias_k", "bias_v"):
                    if getattr(module, name) is not None:
                        nn.init.zeros_(getattr(module, name))
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_pos_emb, std=0.02)
        # Start as the zero function like the project's other nets (an eps- or score-predictor
        # begins at the prior's mean guess); the paper keeps the 0.02-normal init here.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def optim_groups(self, weight_decay: float | None = None) -> list[dict]:
        """AdamW groups as in the paper: decay on the weight matrices only (see nets/param_groups.py); the module's
        configure_optimizers uses them, with the optimizer's weight_decay when none is given."""
        return weight_matrix_groups(self, weight_decay)

    @property
    def cond_obs_emb(self) -> nn.Linear | None:
        """Where the layer lived before Condition; code still reads it here."""
        return self.condition.cond_obs_emb

    def _memory(self, noise_level: Tensor | float, cond: Tensor | None, batch_size: int, device) -> Tensor:
        noise_level = as_batch(noise_level, batch_size, device)
        dtype = self.input_emb.weight.dtype  # follow the net (float64 for gradient checks)
        time_token = sinusoidal_embedding(noise_level * self.embedding_scale, self.n_emb).to(dtype)[:, None]
        tokens = self.condition(time_token, cond, dtype)
        return self.encoder(self.drop(tokens + self.cond_pos_emb))

    def forward(self, x: Tensor, noise_level: Tensor | float, cond: Tensor | None = None) -> Tensor:
        if x.ndim != 3 or tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"x must have shape (B, {self.data_shape[0]}, {self.data_shape[1]}), got {tuple(x.shape)}")
        memory = self._memory(noise_level, cond, x.shape[0], x.device)
        h = self.drop(self.input_emb(x) + self.pos_emb)
        h = self.decoder(h, memory, tgt_mask=self.tgt_mask, memory_mask=self.memory_mask)
        return self.head(self.ln_f(h))
