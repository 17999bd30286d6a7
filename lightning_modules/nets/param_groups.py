"""Optimizer parameter groups for the transformer nets: weight decay on weight matrices only (minGPT's split, which
Diffusion Policy's transformer and BET keep). Decaying biases, LayerNorms and positional tables toward zero only
removes offsets and positions; it regularises nothing."""

from __future__ import annotations

from torch import nn


def weight_matrix_groups(module: nn.Module, weight_decay: float | None = None) -> list[dict]:
    """[decayed, not decayed]: Linear weights and attention projection matrices, then everything else (weight
    decay 0). With weight_decay None the first group takes the optimizer's own setting."""
    decay, no_decay = [], []
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            is_matrix = (isinstance(sub, nn.Linear) and name == "weight") or (
                isinstance(sub, nn.MultiheadAttention) and name.endswith("proj_weight"))
            (decay if is_matrix else no_decay).append(p)
    first = {"params": decay} if weight_decay is None else {"params": decay, "weight_decay": float(weight_decay)}
    return [first, {"params": no_decay, "weight_decay": 0.0}]
