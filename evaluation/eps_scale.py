"""Pick the epsilon-scaling factor (Ning et al. 2024) for a sampler by the dataset's quality figure.

The scale is a sampling-time knob: one trained model, a few candidate scales,
the same noise for each (so the comparison is paired), lowest figure wins.
"""

from __future__ import annotations

import torch
from difflab.errors import ConfigError


def search_eps_scale(module, metric, scales, num_samples: int, sampler: str | None = None, steps: int | None = None,
                     seed: int = 0, batch_size: int = 1000, **sample_kwargs) -> dict:
    """sample_kwargs (e.g. ddim_spacing, time_shift_window) go to every sampling call unchanged."""
    import samplers

    if getattr(module, "provides", None) != samplers.DENOISER:
        raise ConfigError(f"eps scaling wraps a denoiser; a {type(module).__name__} has none")
    scales = [float(s) for s in scales]
    if not scales or min(scales) <= 0:
        raise ConfigError(f"eps_scale_search needs positive scales, e.g. [1.0,1.005,1.01,1.02], got {scales}")
    values = []
    for scale in scales:
        generator = torch.Generator(device=module.device).manual_seed(seed)
        x, nfe = module.sample_many(num_samples, batch_size, generator, sampler=sampler, steps=steps, eps_scale=scale,
                                    return_nfe=True, **sample_kwargs)
        values.append(float(metric(x)))
    best = min(range(len(scales)), key=values.__getitem__)
    return {"scales": scales, "values": values, "nfe": nfe, "best_scale": scales[best], "best_value": values[best],
            "baseline_value": values[scales.index(1.0)] if 1.0 in scales else None}
