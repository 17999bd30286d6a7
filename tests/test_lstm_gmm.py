"""LSTM-GMM (robomimic BC-RNN-GMM): the mixture likelihood is the closed form, training fits a two-mode action
distribution with the right weights, the LSTM is causal, low-noise sampling returns component means, sampling is
reproducible and survives a state_dict round trip, and a chunk longer than the observation window is refused."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from difflab.errors import ConfigError
from lightning_modules.lstm_gmm import LOW_NOISE_STD, LSTMGMM, mixture_log_prob

ADAM = partial(torch.optim.Adam, lr=1e-2)


def make(T=3, obs_dim=2, action_dim=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    settings = {"hidden": 32, "num_layers": 2, "num_modes": 5, **kwargs}
    return LSTMGMM(None, ADAM, data_shape=(T, action_dim), cond_dim=T * obs_dim, n_obs_steps=T, **settings)


def by_hand(means, stds, logits, x):
    """logsumexp_k [log w_k + sum_d log N(x_d; mu_kd, s_kd)], written out from the densities."""
    log_w = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    z = (x.unsqueeze(-2) - means) / stds
    log_normal = (-0.5 * z**2 - torch.log(stds) - 0.5 * math.log(2 * math.pi)).sum(-1)
    return torch.logsumexp(log_w + log_normal, dim=-1)


def test_mixture_log_likelihood_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    B, T, K, D = 4, 3, 5, 2
    means, stds = torch.randn(B, T, K, D, generator=g), 0.1 + torch.rand(B, T, K, D, generator=g)
    logits, x = torch.randn(B, T, K, generator=g), torch.randn(B, T, D, generator=g)
    torch.testing.assert_close(mixture_log_prob(means, stds, logits, x), by_hand(means, stds, logits, x))

    # Through the module, with the net's raw head outputs fixed: means are tanh-squashed, stds softplus + min_std,
    # and the loss is the mean of -log p over rows and steps.
    module = make(T=T, action_dim=D, min_std=0.05)
    raw_means, raw_stds = 2 * torch.randn(B, T, K, D, generator=g), torch.randn(B, T, K, D, generator=g)
    module.net.forward = lambda obs: (raw_means, raw_stds, logits)
    cond = torch.zeros(B, T * 2)
    expected = by_hand(torch.tanh(raw_means), F.softplus(raw_stds) + 0.05, logits, x)
    torch.testing.assert_close(module.log_prob(cond, x), expected)
    torch.testing.assert_close(module.loss({"x": x, "cond": cond}), -expected.mean())


def test_loss_decreases_on_a_small_problem():
    module = make(T=3)
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(64, 6, generator=g)
    x = torch.tanh(cond.reshape(64, 3, 2).flip(-1))  # each step's action a function of that step's observation
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    first = module.loss({"x": x, "cond": cond}).item()
    for _ in range(100):
        optimizer.zero_grad()
        loss = module.loss({"x": x, "cond": cond})
        loss.backward()
        optimizer.step()
    assert loss.item() < first - 1.0, (first, loss.item())


def test_two_mode_actions_keep_their_weights_and_no_mass_between_them():
    """Constant observation, a = +0.6 w.p. 0.3 and -0.6 w.p. 0.7: the draws split 0.3 / 0.7 between the modes
    (within 5 standard errors) and almost none lands near 0, where a regression to the mean would put them all."""
    module = make(T=2, obs_dim=1, action_dim=1, seed=0)
    n_data = 1000
    g = torch.Generator().manual_seed(2)
    signs = torch.ones(n_data, 2)
    for t in range(2):  # exactly 30% of the rows at +0.6 at each step, independently placed
        signs[torch.randperm(n_data, generator=g)[: int(0.7 * n_data)], t] = -1.0
    x = (0.6 * signs + 0.01 * torch.randn(n_data, 2, generator=g)).unsqueeze(-1)
    cond = torch.full((n_data, 2), 0.5)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        module.loss({"x": x, "cond": cond}).backward()
        optimizer.step()
    module.eval()
    n = 4000
    draws = module.sample(n, cond=torch.full((n, 2), 0.5), generator=torch.Generator().manual_seed(3))
    assert draws.shape == (n, 2, 1)
    se = math.sqrt(0.3 * 0.7 / n)
    for t in range(2):
        a = draws[:, t, 0]
        up, down = ((a - 0.6).abs() < 0.1).float().mean().item(), ((a + 0.6).abs() < 0.1).float().mean().item()
        assert abs(up - 0.3) < 5 * se and abs(down - 0.7) < 5 * se, (t, up, down)
        assert (a.abs() < 0.3).float().mean().item() < 0.01


def test_step_t_does_not_depend_on_later_observations():
    module = make(T=5)
    g = torch.Generator().manual_seed(4)
    cond = torch.randn(3, 10, generator=g)
    later = cond.clone()
    later[:, 6:] += 3.0  # observations of steps 3 and 4 (0-based) changed
    before, after = module.mixture(cond), module.mixture(later)
    for a, b in zip(before, after):
        torch.testing.assert_close(a[:, :3], b[:, :3], rtol=0, atol=0)
        assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-3  # the changed steps do see their own observations
    # and so do the draws, under the same generator
    d1 = module.sample(3, cond=cond, generator=torch.Generator().manual_seed(5))
    d2 = module.sample(3, cond=later, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(d1[:, :3], d2[:, :3], rtol=0, atol=0)


@pytest.mark.parametrize("low_noise", [True, False])
def test_low_noise_eval_draws_sit_on_a_component_mean(low_noise):
    module = make(T=2, low_noise_eval=low_noise).eval()
    g = torch.Generator().manual_seed(6)
    cond = torch.randn(500, 4, generator=g) * 0.1
    draws = module.sample(500, cond=cond, generator=torch.Generator().manual_seed(7))
    means, stds, _ = module.mixture(cond)  # the trained stds (an untrained net: about softplus(0) = 0.69)
    nearest = (draws.unsqueeze(2) - means).abs().amax(-1).amin(-1)  # (B, T): distance to the closest component mean
    if low_noise:
        assert nearest.max() < 1e-3 and LOW_NOISE_STD < 1e-3
    else:
        assert nearest.median() > 0.1 and stds.min() > 0.3  # the switch is what makes the draws sit on the means


def test_draws_are_reproducible_with_the_generator_and_leave_the_global_rng_alone():
    module = make(T=3, low_noise_eval=False).eval()
    cond = torch.randn(16, 6, generator=torch.Generator().manual_seed(8))
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = module.sample(16, cond=cond, generator=torch.Generator().manual_seed(9))
    b = module.sample(16, cond=cond, generator=torch.Generator().manual_seed(9))
    c = module.sample(16, cond=cond, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-2
    assert torch.equal(torch.get_rng_state(), state)


def test_state_dict_round_trip_gives_identical_samples():
    module = make(T=3, seed=0).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the fresh init a second module would also have
    other = make(T=3, seed=1).eval()
    cond = torch.randn(32, 6, generator=torch.Generator().manual_seed(11))
    draw = lambda m: m.sample(32, cond=cond, generator=torch.Generator().manual_seed(12))  # noqa: E731
    assert not torch.equal(draw(module), draw(other))
    other.load_state_dict(module.state_dict())
    assert torch.equal(draw(module), draw(other))
    assert module.nfe() == 1 and module.samplers() == ["direct"]


def test_a_chunk_longer_than_the_observation_window_is_refused():
    with pytest.raises(ConfigError, match=r"data\.horizon == data\.n_obs_steps .*data\.horizon=16, data\.n_obs_steps=2.*"
                                          r"data\.horizon=10 data\.n_obs_steps=10 data\.n_action_steps=1"):
        LSTMGMM(None, ADAM, data_shape=(16, 2), cond_dim=4, n_obs_steps=2, hidden=8)
    with pytest.raises(ConfigError, match="needs demonstration data"):
        LSTMGMM(None, ADAM, data_shape=(2,), cond_dim=None, n_obs_steps=1, hidden=8)
    with pytest.raises(ConfigError, match="model.num_modes"):
        LSTMGMM(None, ADAM, data_shape=(2, 2), cond_dim=4, n_obs_steps=2, num_modes=0)


def test_stepping_the_hidden_state_equals_the_window_when_it_covers_the_context():
    """robomimic's stateful rollout (one observation a step, the LSTM state carried from a reset) gives, at every step
    t, the mixture the window form gives at step t of o_1..o_T: the sliding-window rollout re-reads the same
    context whenever the window covers everything since the reset."""
    model = make(T=6)
    obs = torch.randn(3, 6, 2, generator=torch.Generator().manual_seed(9))
    window = model.mixture(obs.reshape(3, -1))
    state = None
    for t in range(6):
        (means, stds, logits), state = model.step(obs[:, t], state)
        torch.testing.assert_close(means, window[0][:, t], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stds, window[1][:, t], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits, window[2][:, t], rtol=1e-5, atol=1e-6)
    # from a reset at step 3, stepping o_4..o_6 is the window o_4..o_6 (the context since the reset), not o_1..o_6
    state = None
    for t in range(3, 6):
        (means, _, _), state = model.step(obs[:, t], state)
    short = model.net(obs[:, 3:6])[0]
    torch.testing.assert_close(means, torch.tanh(short[:, -1]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(means, window[0][:, 5], atol=1e-3)
