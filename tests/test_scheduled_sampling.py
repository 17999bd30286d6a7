"""Scheduled-sampling DDPM and input perturbation: draws against their definitions, roll-backs against closed forms.

Roll-backs run with nets whose eps is exact (a point mass, or Gaussian data through analytic.GaussianMixture),
so every tolerance is a stated number of standard errors of the sample size.
"""

import math
from functools import partial

import pytest
import torch
from torch import nn

from conftest import run_cli
from lightning_modules.analytic import ExactEpsNet, GaussianMixture
from lightning_modules.ddpm import DDPM
from lightning_modules.nets import MLP
from lightning_modules.scheduled_sampling import ROLLBACKS, ScheduledSamplingDDPM
from lightning_modules.schedules import DiscreteSchedule, make_betas

T = 100


def ExactEps(mixture: GaussianMixture, num_timesteps: int = T) -> ExactEpsNet:
    return ExactEpsNet(mixture, DiscreteSchedule(make_betas("linear", num_timesteps)).alphas_cumprod)


def point_mass(mu):
    return GaussianMixture(means=[mu], stds=[0.0])


def ss_model(net=None, **kwargs) -> ScheduledSamplingDDPM:
    torch.manual_seed(0)
    net = net if net is not None else MLP((2,), hidden=32, depth=2, emb_dim=16)
    options = {k: kwargs.pop(k) for k in ("variance", "eta") if k in kwargs}  # the sampling block's, which rollbacks use
    return ScheduledSamplingDDPM(net, partial(torch.optim.Adam, lr=1e-3), data_shape=(2,), num_timesteps=T,
                                 sampling={"steps": 10, "options": options}, **kwargs)


def within(value, expected, se, k=5.0):
    assert abs(value - expected) < k * se, f"{value:.5f} vs {expected:.5f} (+-{k} x {se:.5f})"


# --- the p schedule and the draws ----------------------------------------------------------------------


def test_rollback_probability_moves_linearly_and_then_stays():
    model = ss_model(p_start=0.1, p_end=0.9, total_steps=200)
    for step, p in [(0, 0.1), (50, 0.3), (100, 0.5), (200, 0.9), (1000, 0.9)]:
        assert model.rollback_prob(step) == pytest.approx(p)
    assert ss_model(p_start=0.4, p_end=0.4).rollback_prob(7) == 0.4  # constant p needs no length
    with pytest.raises(ValueError, match="trainer.max_steps or model.total_steps"):
        ss_model(p_start=0.0, p_end=0.8).rollback_prob(3)


@pytest.mark.parametrize("max_rollback,p", [(1, 0.3), (2, 0.5), (3, 0.6)])
def test_rollback_depths_follow_their_definition(max_rollback, p):
    n = 20000
    model = ss_model(max_rollback=max_rollback)
    m = model.draw_rollback(n, p, "cpu", torch.Generator().manual_seed(0))
    expected = {0: 1 - p, **{k: p / max_rollback for k in range(1, max_rollback + 1)}}
    assert set(m.unique().tolist()) <= set(expected)
    for k, q in expected.items():
        within((m == k).float().mean().item(), q, math.sqrt(q * (1 - q) / n))


@pytest.mark.parametrize("rollback,stride", [("renoise", 1), ("sampler_step", 7)])
def test_levels_leave_room_for_the_rollback_and_are_uniform(rollback, stride):
    extra = {"ss_stride": stride} if rollback == "sampler_step" else {}
    model = ss_model(net=ExactEps(point_mass([0.5, -0.5])), max_rollback=3, ss_rollback=rollback, **extra)
    n = 12000
    x0 = torch.tensor([[0.5, -0.5]]).expand(n, 2)
    _, t, _, m = model.rolled_input(x0, generator=torch.Generator().manual_seed(1), p=0.75)
    assert (t >= 0).all() and (t + m * stride <= T - 1).all()
    for k in range(4):  # given m = k, t is uniform on {0, ..., T-1-k*stride}
        tk = t[m == k].double()
        span = T - k * stride
        within(tk.mean().item(), (span - 1) / 2, math.sqrt((span**2 - 1) / 12 / tk.numel()))
        assert tk.max().item() == span - 1


def test_the_default_stride_is_the_sampling_stride_and_bad_settings_fail():
    assert ss_model(ss_rollback="sampler_step").ss_stride == T // 10
    assert ss_model(ss_rollback="ancestral").ss_stride == 1
    with pytest.raises(ValueError, match="ss_rollback"):
        ss_model(ss_rollback="teacher")
    with pytest.raises(ValueError, match="ss_stride"):
        ss_model(ss_rollback="renoise", ss_stride=5)
    with pytest.raises(ValueError, match="max_rollback"):
        ss_model(ss_rollback="sampler_step", max_rollback=10)


# --- the roll-back: no gradient, and exactly at level t ------------------------------------------------


@pytest.mark.parametrize("rollback", ROLLBACKS)
def test_rollback_carries_no_gradient_and_the_loss_is_the_final_forward(rollback):
    model = ss_model(max_rollback=2, ss_rollback=rollback, p_start=1.0, p_end=1.0)
    calls = []
    model.net.register_forward_hook(lambda mod, inp, out: calls.append((torch.is_grad_enabled(), inp[0].shape[0])))
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))

    x, t, eps, m = model.rolled_input(x0, generator=torch.Generator().manual_seed(3))
    assert not x.requires_grad and not eps.requires_grad and (m > 0).all()
    # one forward per roll-back step on the rows still rolling, all without grad
    assert calls == [(False, 64), (False, int((m > 1).sum()))]

    expected = nn.functional.mse_loss(model.net(x, t.float()), model.target(x0, t, eps))
    expected.backward()
    want = [p.grad.clone() for p in model.net.parameters()]
    model.zero_grad()
    calls.clear()
    model.loss({"x": x0}, generator=torch.Generator().manual_seed(3)).backward()
    assert [g for g, _ in calls] == [False, False, True]  # the gradient comes from the last forward only
    for p, g in zip(model.net.parameters(), want):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("rollback,variance,eta", [
    ("renoise", "beta", 0.0), ("ancestral", "posterior", 0.0), ("sampler_step", "beta", 0.0), ("sampler_step", "beta", 1.0),
])
def test_point_mass_rollbacks_land_on_the_forward_marginal_of_their_level(rollback, variance, eta):
    """x0 = mu for every row: x0_hat is exact, so m roll-back steps from level t+m must give q(x_t | x0) exactly."""
    mu = torch.tensor([0.7, -1.2])
    extra = {"ss_stride": 5} if rollback == "sampler_step" else {}
    model = ss_model(net=ExactEps(point_mass(mu.tolist())), max_rollback=3, ss_rollback=rollback, variance=variance, eta=eta, **extra)
    n = 8000
    x0 = mu.expand(n, 2)
    x, t, eps, m = model.rolled_input(x0, generator=torch.Generator().manual_seed(5), p=1.0)
    abar = model.schedule.alphas_cumprod[t][:, None].double()
    z = ((x.double() - abar.sqrt() * mu) / (1 - abar).sqrt()).flatten()  # N(0, 1) under q(x_t | x0)
    within(z.mean().item(), 0.0, 1 / math.sqrt(z.numel()))
    within(z.var().item(), 1.0, math.sqrt(2 / z.numel()))
    torch.testing.assert_close(eps, ((x.double() - abar.sqrt() * mu) / (1 - abar).sqrt()).float(), atol=5e-3, rtol=1e-3)


def test_point_mass_deterministic_ddim_rollback_returns_the_forward_sample_itself():
    """DDIM (eta=0) with the exact eps keeps the noise: m strides down, x~_t is q_sample(x0, t, noise) with the same noise."""
    mu = [0.3, 0.9]
    model = ss_model(net=ExactEps(point_mass(mu)), max_rollback=4, ss_rollback="sampler_step", ss_stride=10)
    x0 = torch.tensor(mu).expand(500, 2)
    g = torch.Generator().manual_seed(2)
    x, t, eps, m = model.rolled_input(x0, generator=g, p=0.9)
    g = torch.Generator().manual_seed(2)  # replay the same draws to recover the forward noise
    model.draw_rollback(500, 0.9, "cpu", g)
    torch.rand(500, generator=g, dtype=torch.float64)
    noise = torch.randn(500, 2, generator=g)
    torch.testing.assert_close(x, model.schedule.q_sample(x0, t, noise), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps, noise, atol=5e-3, rtol=1e-3)


def _gaussian_rollback(rollback, t, n=20000, mu=(1.0, -0.5), s=0.5):
    """Roll x_{t+1} ~ q(x_{t+1}) of Gaussian data N(mu, s^2 I) back one step with the exact eps."""
    data = GaussianMixture(means=[list(mu)], stds=[s])
    model = ss_model(net=ExactEps(data), ss_rollback=rollback, variance="posterior")
    g = torch.Generator().manual_seed(11 + t)
    x0 = data.sample(n, generator=g)
    level = torch.full((n,), t + 1)
    x_up = model.schedule.q_sample(x0, level, torch.randn(n, 2, generator=g))
    x = model.rollback(x_up, level, torch.ones(n, dtype=torch.long), generator=g)
    return model, x.double(), torch.tensor(mu, dtype=torch.float64), s


@pytest.mark.parametrize("t", [5, 40, 90])
def test_exact_ancestral_rollback_of_gaussian_data_has_the_forward_marginal(t):
    model, x, mu, s = _gaussian_rollback("ancestral", t)
    abar = model.schedule.alphas_cumprod[t].double()
    var = abar * s**2 + 1 - abar  # q(x_t) per element
    n = x.shape[0]
    for d in range(2):
        within(x[:, d].mean().item(), (abar.sqrt() * mu[d]).item(), math.sqrt(var / n))
        within(x[:, d].var().item(), var.item(), var.item() * math.sqrt(2 / n))


def test_exact_renoise_rollback_of_gaussian_data_is_underdispersed_as_its_closed_form_says():
    """Re-noising the posterior mean drops Var(x0 | x_{t+1}): the marginal is abar_t k^2 v_{t+1} + 1 - abar_t, not q's."""
    t = 50
    model, x, mu, s = _gaussian_rollback("renoise", t)
    abar = model.schedule.alphas_cumprod.double()
    a_t, a_up = abar[t], abar[t + 1]
    v_up = a_up * s**2 + 1 - a_up
    k = a_up.sqrt() * s**2 / v_up  # E[x0 | x_{t+1}] = mu + k (x_{t+1} - sqrt(abar_{t+1}) mu)
    closed = (a_t * k**2 * v_up + 1 - a_t).item()
    forward = (a_t * s**2 + 1 - a_t).item()
    n = x.shape[0]
    for d in range(2):
        within(x[:, d].mean().item(), (a_t.sqrt() * mu[d]).item(), math.sqrt(closed / n))
        within(x[:, d].var().item(), closed, closed * math.sqrt(2 / n))
        assert x[:, d].var().item() < forward - 10 * forward * math.sqrt(2 / n)


# --- input perturbation --------------------------------------------------------------------------------


class Recorder(nn.Module):
    def forward(self, x, noise_level, cond=None):
        self.x, self.t = x.detach().clone(), noise_level.long()
        return torch.zeros_like(x)


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_input_perturbation_marginal_and_target(gamma):
    """x_t = sqrt(abar) x0 + sqrt(1 - abar)(eps + gamma xi): variance abar s^2 + (1 - abar)(1 + gamma^2); target eps."""
    net = Recorder()
    model = DDPM(net, partial(torch.optim.Adam, lr=1e-3), data_shape=(2,), num_timesteps=T, input_perturbation=gamma)
    n, s, mu = 40000, 0.5, torch.tensor([1.0, -1.0])
    g = torch.Generator().manual_seed(0)
    x0 = mu + s * torch.randn(n, 2, generator=g)
    loss = model.loss({"x": x0}, generator=g)
    abar = model.schedule.alphas_cumprod[net.t][:, None].double()
    resid = net.x.double() - abar.sqrt() * mu
    z = (resid / (abar * s**2 + (1 - abar) * (1 + gamma**2)).sqrt()).flatten()
    within(z.mean().item(), 0.0, 1 / math.sqrt(z.numel()))
    within(z.var().item(), 1.0, math.sqrt(2 / z.numel()))
    if gamma > 0:  # the check has power: the unperturbed variance is rejected
        z0 = (resid / (abar * s**2 + 1 - abar).sqrt()).flatten()
        assert z0.var().item() > 1 + 10 * math.sqrt(2 / z.numel())
    # a zero net's loss is E[target^2]: 1 for the eps target, 1 + gamma^2 had the perturbed noise been the target
    within(loss.item(), 1.0, math.sqrt(2 / (2 * n)))


def test_input_perturbation_off_keeps_the_ddpm_random_stream():
    net = Recorder()
    model = DDPM(net, partial(torch.optim.Adam, lr=1e-3), data_shape=(2,), num_timesteps=T)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    model.loss({"x": x0}, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, T, (16,), generator=g)
    noise = torch.randn(16, 2, generator=g)
    assert torch.equal(net.t, t) and torch.equal(net.x, model.schedule.q_sample(x0, t, noise))


# --- end to end --------------------------------------------------------------------------------------------

TOY = [
    "data=toy2d", "trainer.max_steps=6", "trainer.val_check_interval=3", "model.num_timesteps=50", "model.sampling.steps=5",
    "final_eval.num_samples=100", "callbacks.quality.num_samples=100", "callbacks.sample_logger.num_samples=20",
    "trainer.log_every_n_steps=1", "logger=csv",
]


def _train_log(run_dir):
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("rollback", ROLLBACKS)
def test_train_py_scheduled_sampling_runs_each_rollback(rollback, tmp_path):
    run_cli("train.py", "model=scheduled_sampling", f"model.ss_rollback={rollback}", "model.max_rollback=2",
            "model.p_start=0.5", "model.p_end=1.0", *TOY, f"hydra.run.dir={tmp_path}")
    rows = [r for r in _train_log(tmp_path) if r.get("train/rollback_fraction")]
    assert len(rows) == 6
    p = [float(r["train/rollback_p"]) for r in rows]
    assert p == pytest.approx([0.5 + 0.5 * k / 6 for k in range(6)])
    assert all(0 < float(r["train/rollback_fraction"]) <= 1 for r in rows)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "final" / "metrics.json").is_file()


@pytest.mark.slow
def test_train_py_with_input_perturbation(tmp_path):
    run_cli("train.py", "model.input_perturbation=0.1", *TOY, f"hydra.run.dir={tmp_path}")
    losses = [float(r["train/loss"]) for r in _train_log(tmp_path) if r.get("train/loss")]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)


# --- targets for every prediction, clipping inside the roll-back, cond per rolled row -------------------


class OracleNet(nn.Module):
    """Predicts the right target for each row of a batch whose clean x0 it is told: eps~ = (x - sqrt(abar) x0) /
    sqrt(1 - abar), x0 itself, or v = sqrt(abar) eps~ - sqrt(1 - abar) x0, from the x it is given."""

    def __init__(self, prediction: str, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.prediction, self.abar, self.x0 = prediction, alphas_cumprod.double(), None

    def forward(self, x, noise_level, cond=None):
        if not torch.is_grad_enabled() and self.x0 is not None and self.training_rows != x.shape[0]:
            return torch.zeros_like(x)  # a roll-back step on a subset of rows: any eps will do
        a = self.abar[noise_level.long()][:, None]
        eps = (x.double() - a.sqrt() * self.x0.double()) / (1 - a).sqrt()
        out = {"eps": eps, "x0": self.x0.double(), "v": a.sqrt() * eps - (1 - a).sqrt() * self.x0.double()}[self.prediction]
        return out.float()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_the_target_of_a_rolled_back_input_is_the_one_its_own_x_implies(prediction):
    """For a rolled-back x~_t the target is eps~, x0 or v computed from x~_t and the clean x0 (not the noise that
    built x_{t+m}): a net predicting exactly that from its input gets zero loss, rolled rows and plain rows alike."""
    model = ss_model(max_rollback=2, ss_rollback="ancestral", p_start=0.5, p_end=0.5, prediction=prediction)
    oracle = OracleNet(prediction, model.schedule.alphas_cumprod)
    model.net = oracle
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    oracle.x0, oracle.training_rows = x0, 256
    model.train()
    loss = model.loss({"x": x0}, generator=torch.Generator().manual_seed(1))
    assert loss.item() < 1e-9, loss
    assert model._rollback_stats["train/rollback_fraction"].item() > 0.3  # the rolled rows were in it


@pytest.mark.parametrize("clip", [True, False])
def test_the_rollback_step_clips_its_x0_estimate_to_the_data_range(clip):
    """Deterministic DDIM roll-back (sampler_step, eta 0) from level L to l: x_l = sqrt(abar_l) x0^ + sqrt(1 - abar_l)
    eps^, with x0^ clipped to [-1, 1] and eps^ recomputed from it when clip_denoised is on."""

    class FarOut(nn.Module):  # eps whose implied x0 is 3 everywhere
        def __init__(self, abar):
            super().__init__()
            self.abar = abar

        def forward(self, x, noise_level, cond=None):
            a = self.abar[noise_level.long()][:, None]
            return (x - a.sqrt() * 3.0) / (1 - a).sqrt()

    model = ss_model(ss_rollback="sampler_step", ss_stride=10, eta=0.0, clip_denoised=clip)
    abar = model.schedule.alphas_cumprod
    model.net = FarOut(abar)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    level = torch.full((16,), 60)
    got = model.rollback_step(x, level, None, None)
    x0 = torch.full_like(x, 1.0 if clip else 3.0)
    eps = (x - abar[60].sqrt() * x0) / (1 - abar[60]).sqrt()
    torch.testing.assert_close(got, abar[50].sqrt() * x0 + (1 - abar[50]).sqrt() * eps)


def test_each_rolled_row_is_stepped_with_its_own_cond_and_level():
    model = ss_model(ss_rollback="renoise", max_rollback=3)
    seen = []
    step = model.rollback_step
    model.rollback_step = lambda x, level, cond, g: seen.append((cond.clone(), level.clone())) or step(x, level, None, g)
    m = torch.tensor([0, 2, 1, 0, 3])
    cond = torch.arange(5.0)[:, None] * 10
    model.rollback(torch.randn(5, 2), torch.tensor([9, 8, 7, 6, 5]), m, cond, torch.Generator().manual_seed(0))
    assert [c[:, 0].tolist() for c, _ in seen] == [[10.0, 20.0, 40.0], [10.0, 40.0], [40.0]]
    assert [lv.tolist() for _, lv in seen] == [[8, 7, 5], [7, 4], [3]]


def test_training_logs_the_rollback_statistics_and_validation_uses_the_plain_loss(tmp_path):
    import lightning.pytorch as pl

    from datamodules.toy2d import Toy2DDataModule

    model = ss_model(max_rollback=2, p_start=1.0, p_end=1.0, ss_rollback="renoise")
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=1,
                         val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(model, datamodule=Toy2DDataModule("moons", num_train=256, num_val=64, batch_size=64))
    logged = trainer.callback_metrics
    assert logged["train/rollback_fraction"] == 1.0 and logged["train/rollback_p"] == 1.0
    assert 1.0 <= logged["train/rollback_extra_forwards"] <= 2.0
    # validation is DDPM's loss on forward-noised inputs, whatever p is (no roll-back in eval mode)
    model.eval()
    batch = {"x": torch.randn(64, 2, generator=torch.Generator().manual_seed(0))}
    plain = DDPM.loss(model, batch, torch.Generator().manual_seed(1))
    assert torch.equal(model.loss(batch, torch.Generator().manual_seed(1)), plain)


def test_rollback_probabilities_must_be_probabilities():
    for p_start, p_end in ((1.5, 0.5), (0.5, 1.5), (-0.1, 0.5), (0.5, -0.1)):
        with pytest.raises(ValueError, match="probabilities"):
            ss_model(p_start=p_start, p_end=p_end)


def test_the_default_rollback_is_bengio_s_single_step():
    assert ss_model().max_rollback == 1
