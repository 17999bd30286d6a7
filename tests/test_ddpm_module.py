"""The DDPM LightningModule: loss, targets, learning on a fixed batch, and its sample() contract."""

from functools import partial

import pytest
import torch

from conftest import assert_loss_optimum_at_zero
from lightning_modules.ddpm import DDPM
from lightning_modules.nets import MLP


def make_ddpm(prediction="eps", num_timesteps=100, cond_dim=None, lr=3e-3):
    torch.manual_seed(0)
    net = MLP((2,), cond_dim=cond_dim, hidden=64, depth=2, emb_dim=32)
    return DDPM(
        net, partial(torch.optim.Adam, lr=lr), data_shape=(2,), cond_dim=cond_dim,
        num_timesteps=num_timesteps, prediction=prediction, sampling={"steps": 10},
    )


def fixed_batch(n=64):
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(n, 2, generator=g) * 0.5 + torch.tensor([1.0, -1.0])}


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_decreases_on_a_fixed_batch(prediction):
    model = make_ddpm(prediction)
    opt = model.optimizer_factory(params=model.parameters())
    batch = fixed_batch()
    eval_loss = lambda: model.loss(batch, torch.Generator().manual_seed(7)).item()  # noqa: E731
    before = eval_loss()
    for _ in range(300):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def test_tiny_model_overfits_one_batch_at_a_fixed_noise_level():
    """With t and noise fixed, regression of eps is a finite problem that a small net must nearly solve."""
    torch.manual_seed(0)
    net = MLP((2,), hidden=128, depth=3, emb_dim=32)
    model = DDPM(net, partial(torch.optim.Adam, lr=3e-3), data_shape=(2,), num_timesteps=100)
    opt = model.optimizer_factory(params=model.parameters())
    x0 = fixed_batch(32)["x"]
    t = torch.full((32,), 50)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    x_t = model.schedule.q_sample(x0, t, noise)
    for _ in range(2000):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model.net(x_t, t.float()), noise)
        loss.backward()
        opt.step()
    # the targets have unit variance: a loss 20x below it means the batch is memorised
    assert loss.item() < 0.05


class Constant(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, noise_level, cond=None):
        return self.out


def test_the_predictions_agree_on_eps_for_a_perfect_net():
    """If the net outputs the exact target of its parametrisation, eps() recovers the true noise."""
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    t = torch.randint(0, 100, (16,), generator=g)
    for prediction in ("eps", "x0", "v"):
        model = make_ddpm(prediction)
        x_t = model.schedule.q_sample(x0, t, noise)
        target = model.target(x0, t, noise)
        model.net = Constant(target)
        torch.testing.assert_close(model.eps(x_t, t), noise, atol=5e-4, rtol=1e-3)


def test_sample_shapes_nfe_and_reproducibility():
    model = make_ddpm()
    a = model.sample(5, sampler="ddim", steps=10, generator=torch.Generator().manual_seed(0))
    b = model.sample(5, sampler="ddim", steps=10, generator=torch.Generator().manual_seed(0))
    assert a.shape == (5, 2) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    assert model.sample(3, sampler="ancestral").shape == (3, 2)
    assert model.nfe("ancestral") == 100 and model.nfe("ddim", 10) == 10 and model.nfe() == 10
    with pytest.raises(ValueError, match="sampler='nonsense' is not a sampler"):
        model.sample(2, sampler="nonsense")
    with pytest.raises(ValueError, match="sampler=cm is not defined for DDPM: cm needs a consistency function"):
        model.sample(2, sampler="cm")
    with pytest.raises(ValueError, match="steps= is not an option of DDPM's sampler=ancestral"):
        model.sample(2, sampler="ancestral", steps=10)


def test_conditional_model_requires_cond_and_unconditional_refuses_it():
    cond_model = make_ddpm(cond_dim=3)
    assert cond_model.sample(4, cond=torch.randn(4, 3), steps=5).shape == (4, 2)
    with pytest.raises(ValueError, match="conditional"):
        cond_model.sample(4)
    with pytest.raises(ValueError, match="without conditioning"):
        make_ddpm().sample(4, cond=torch.randn(4, 3))


def test_bad_settings_fail_with_the_option_names():
    with pytest.raises(ValueError, match="prediction"):
        DDPM(MLP((2,)), partial(torch.optim.Adam), data_shape=(2,), prediction="score")
    with pytest.raises(ValueError, match="model.sampling.sampler: sampler='heunn' is not a sampler"):
        DDPM(MLP((2,)), partial(torch.optim.Adam), data_shape=(2,), sampling={"sampler": "heunn"})


class ExactPredictionNet(torch.nn.Module):
    """The exact eps of a Gaussian mixture, expressed as the module's prediction (eps, x0 or v), plus `a` times
    the input: a one-parameter family through the optimum of L_simple for that parametrisation."""

    def __init__(self, mixture, schedule, prediction):
        super().__init__()
        from lightning_modules.analytic import ExactEpsNet

        self.eps_net, self.schedule, self.prediction = ExactEpsNet(mixture, schedule.alphas_cumprod), schedule, prediction
        self.a = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, noise_level, cond=None):
        t = noise_level.long()
        eps = self.eps_net(x, noise_level)
        x0 = self.schedule.x0_from_eps(x, t, eps)
        a = self.schedule.alphas_cumprod[t][:, None]
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.prediction]
        return out + self.a * x


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_gradient_vanishes_at_the_exact_prediction(prediction):
    """E[eps | x_t], E[x0 | x_t] and E[v | x_t] minimise L_simple for their parametrisations: along the exact net
    + a x the expected gradient is 0 at a = 0 and positive at a = 0.5 (16 batch gradients, 5 standard errors).
    A wrong target (eps for v, a sign flip in v, a wrong q(x_t | x0)) moves the minimum."""
    from test_ddpm_samplers import MIXTURE

    model = make_ddpm(prediction)
    net = ExactPredictionNet(MIXTURE, model.schedule, prediction)
    model.net = net

    assert_loss_optimum_at_zero(model.loss, net.a, MIXTURE.sample, 0.5, seed=500)


def test_an_eps_scale_schedule_reaching_zero_at_the_last_step_is_refused():
    make = lambda slope: DDPM(MLP((2,)), partial(torch.optim.Adam), data_shape=(2,), num_timesteps=11,
                              sampling={"steps": 10, "options": {"eps_scale": 1.0, "eps_scale_schedule": "linear", "eps_scale_slope": slope}})
    make(-0.09)  # 1 - 0.09 * 10 > 0 at t = 10
    with pytest.raises(ValueError, match="eps_scale"):
        make(-0.1)  # exactly 0 at t = num_timesteps - 1
