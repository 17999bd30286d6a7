"""Shortcut models against the exact average velocity of Gaussian data (the closed forms of tests/test_mean_flow.py)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from conftest import assert_loss_optimum_at_zero
from difflab.errors import ConfigError
from lightning_modules.nets import MLP
from lightning_modules.shortcut import Shortcut
from test_mean_flow import exact_map, exact_u, sample_data, with_exact_u


def shortcut(**kw) -> Shortcut:
    return Shortcut(MLP((2,), hidden=8, depth=1, cond_dim=Shortcut.net_cond_dim(None)), partial(torch.optim.Adam),
                    data_shape=(2,), **kw)


def test_two_exact_half_steps_make_the_exact_full_step():
    g = torch.Generator().manual_seed(0)
    n = 64
    d = 0.5 ** torch.randint(1, 7, (n,), generator=g).double()
    t = 2 * d + (1 - 2 * d) * torch.rand(n, generator=g, dtype=torch.float64)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    first = exact_u(z, t - d, t)
    mid = z - d[:, None] * first
    torch.testing.assert_close((first + exact_u(mid, t - 2 * d, t - d)) / 2, exact_u(z, t - 2 * d, t), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z - 2 * d[:, None] * exact_u(z, t - 2 * d, t), exact_map(z, t, t - 2 * d))


def test_the_loss_is_minimised_by_the_exact_average_velocity():
    a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    model = with_exact_u(shortcut(self_consistency=0.5), a)
    assert_loss_optimum_at_zero(model.loss, a, sample_data, 0.3, seed=3)


def test_the_step_sizes_are_powers_of_two_and_t_leaves_room_for_two_half_steps():
    model = shortcut(min_steps=8)
    d, t = model.draw_d_t(20000, "cpu", torch.Generator().manual_seed(1))
    assert set((2 * d).unique().tolist()) == {1.0, 0.5, 0.25, 0.125}
    assert (t >= 2 * d).all() and (t <= 1).all()
    x, nfe = with_exact_u(shortcut()).sample(8, steps=4, x_T=torch.randn(8, 2, dtype=torch.float64), return_nfe=True)
    assert nfe == 4 and torch.isfinite(x).all()
    with pytest.raises(ConfigError, match="model.min_steps=6 is not valid: a power of two"):
        shortcut(min_steps=6)
