"""Behavior Transformers (model=bet): k-means bins, the focal + offset loss, sampling the modes, causality,
bins in checkpoints, and the data settings it needs."""

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from callbacks.ema import EMA
from datamodules.obstacle2d import Obstacle2DDataModule
from difflab.errors import ConfigError
from lightning_modules.bet import BET, focal_loss, kmeans


def make_bet(horizon=3, obs_dim=2, action_dim=2, **kwargs):
    settings = dict(n_bins=4, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    settings.update(kwargs)
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1, betas=[0.9, 0.95])
    return BET(None, optimizer, None, data_shape=(horizon, action_dim), cond_dim=horizon * obs_dim, n_obs_steps=horizon, **settings)


def test_kmeans_recovers_separated_clusters_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    truth = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    labels = torch.randint(3, (600,), generator=gen)
    points = truth[labels] + 0.05 * torch.randn(600, 2, generator=gen)
    centers = kmeans(points, 3, iters=50, seed=0)
    # each true center has a found center within 0.02 (the cluster mean's error is ~0.05 / sqrt(200) = 0.004)
    err = torch.cdist(truth, centers).min(dim=1).values
    assert err.max() < 0.02, err
    assert torch.cdist(centers, centers).topk(2, largest=False).values[:, 1].min() > 1.0  # three distinct centers
    assert torch.equal(kmeans(points, 3, iters=50, seed=0), centers)
    # Lloyd's fixed point: every center is the mean of the points nearest to it
    nearest = torch.cdist(points, centers).argmin(1)
    means = torch.stack([points[nearest == j].mean(0) for j in range(3)])
    torch.testing.assert_close(means, centers, atol=1e-5, rtol=0)


def test_bins_and_offsets_reconstruct_actions_and_the_loss_is_focal_plus_true_bin_offset():
    torch.manual_seed(0)
    module = make_bet(horizon=3, n_bins=5, focal_gamma=2.0, offset_loss_scale=0.7)
    train = torch.rand(400, 2) * 2 - 1
    centers = module.fit_bins(train).clone()
    assert module.is_fitted
    a = torch.rand(6, 3, 2) * 2 - 1
    bins, target = module.targets(a)
    torch.testing.assert_close(centers[bins] + target, a, atol=1e-6, rtol=0)
    dist = torch.cdist(a.reshape(-1, 2), centers)  # the true bin is the nearest center: its offset is the smallest
    assert torch.equal(bins.reshape(-1), dist.argmin(1))
    assert (target.reshape(-1, 2).norm(dim=1) <= dist.min(1).values + 1e-6).all()

    logits = torch.randn(6, 3, 5)
    offsets = 0.3 * torch.randn(6, 3, 5, 2)
    module.head = lambda cond: (logits, offsets)
    loss = module.loss({"x": a, "cond": torch.zeros(6, 6)})
    focal, sq = 0.0, 0.0
    for i in range(6):
        for t in range(3):
            j = int(dist[i * 3 + t].argmin())
            p = math.exp(logits[i, t, j]) / sum(math.exp(v) for v in logits[i, t].tolist())
            focal += -((1 - p) ** 2) * math.log(p)
            sq += sum((float(offsets[i, t, j, d]) - (float(a[i, t, d]) - float(centers[j, d]))) ** 2 for d in range(2))
    expected = focal / 18 + 0.7 * sq / (18 * 2)
    assert abs(float(loss) - expected) < 1e-5, (float(loss), expected)


def test_focal_loss_closed_form_and_cross_entropy_at_gamma_zero():
    torch.manual_seed(0)
    logits = 3 * torch.randn(50, 7)
    target = torch.randint(7, (50,))
    p = torch.softmax(logits.double(), -1)[torch.arange(50), target]
    for gamma in (0.5, 2.0, 3.0):
        torch.testing.assert_close(focal_loss(logits, target, gamma).double(), -(1 - p) ** gamma * p.log(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(focal_loss(logits, target, 0.0), F.cross_entropy(logits, target, reduction="none"), atol=1e-6, rtol=1e-6)
    # focal down-weights confident tokens: never above cross-entropy, and strictly below where p > 0
    assert (focal_loss(logits, target, 2.0) < F.cross_entropy(logits, target, reduction="none")).all()


def test_two_mode_actions_are_sampled_with_their_weights():
    """Constant observation, actions +0.6 w.p. 0.3 and -0.6 w.p. 0.7: the drawn actions split 0.3 / 0.7 between the
    modes and none falls between them (an MSE regression would put them all near -0.24). Cross-entropy (gamma 0):
    the focal loss is not a proper scoring rule, its optimum flattens the mode weights."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    n = 2000
    sign = torch.ones(n)
    sign[torch.randperm(n, generator=gen)[: int(0.7 * n)]] = -1.0  # exactly 30% at +0.6
    actions = (0.6 * sign + 0.01 * torch.randn(n, generator=gen)).reshape(n, 1, 1)
    module = make_bet(horizon=1, obs_dim=1, action_dim=1, n_bins=4, focal_gamma=0.0)
    module.fit_bins(actions)
    batch = {"x": actions, "cond": torch.zeros(n, 1)}
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    for _ in range(200):  # full batch: the optimum is the empirical 0.3 / 0.7 exactly
        opt.zero_grad()
        module.loss(batch).backward()
        opt.step()
    module.eval()
    m = 4000
    draws = module.sample(m, cond=torch.zeros(m, 1), generator=torch.Generator().manual_seed(2)).reshape(-1)
    se = math.sqrt(0.3 * 0.7 / m)
    up, down = ((draws - 0.6).abs() < 0.15).float().mean(), ((draws + 0.6).abs() < 0.15).float().mean()
    assert abs(up - 0.3) < 5 * se and abs(down - 0.7) < 5 * se, (up, down)
    assert (draws.abs() < 0.3).float().mean() < 0.005
    # a temperature reweights the learned bin probabilities to p^(1/T) / sum p^(1/T)
    probs = torch.softmax(module.head(torch.zeros(1, 1))[0].reshape(-1).detach().double(), -1)
    module.temperature = 0.25
    draws = module.sample(m, cond=torch.zeros(m, 1), generator=torch.Generator().manual_seed(3)).reshape(-1)
    sharp = probs**4 / (probs**4).sum()
    up_bins = module.bin_centers.reshape(-1) > 0
    want = float(sharp[up_bins].sum())
    assert abs(want - 0.3) > 0.06  # the check below can tell T = 0.25 from T = 1
    up = ((draws - 0.6).abs() < 0.15).float().mean()
    assert abs(up - want) < 5 * math.sqrt(want * (1 - want) / m), (up, want)


def test_token_t_does_not_see_later_observations():
    torch.manual_seed(0)
    module = make_bet(horizon=4, obs_dim=3, n_layer=2, dropout=0.1).eval()
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    obs = torch.randn(5, 4, 3)
    changed = obs.clone()
    changed[:, 2:] = torch.randn(5, 2, 3)
    logits_a, offsets_a = module.head(obs.reshape(5, -1))
    logits_b, offsets_b = module.head(changed.reshape(5, -1))
    torch.testing.assert_close(logits_a[:, :2], logits_b[:, :2], atol=1e-6, rtol=0)
    torch.testing.assert_close(offsets_a[:, :2], offsets_b[:, :2], atol=1e-6, rtol=0)
    assert (logits_a[:, 2:] - logits_b[:, 2:]).abs().max() > 1e-3  # the later tokens do read them


def tiny_data():
    datamodule = Obstacle2DDataModule(num_episodes=20, horizon=3, n_obs_steps=3, n_action_steps=1, batch_size=32)
    datamodule.setup()
    return datamodule


def test_bins_are_fitted_at_setup_kept_in_checkpoints_and_not_refitted(tmp_path):
    torch.manual_seed(0)
    datamodule = tiny_data()
    module = make_bet(horizon=3, obs_dim=datamodule.obs_dim, n_bins=6)
    with pytest.raises(RuntimeError, match="setup"):
        module.loss(next(iter(datamodule.train_dataloader())))
    # EMA's copy is made before the module's setup and swapped in for the sanity check: it must get the bins too
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[EMA(decay=0.9)], num_sanity_val_steps=1, limit_val_batches=1, accelerator="cpu")
    trainer.fit(module, datamodule=datamodule)
    actions = datamodule.dataset("train").tensors["x"].reshape(-1, 2)
    expected = kmeans(actions, 6, iters=50, seed=0)
    assert torch.equal(module.bin_centers, expected) and module.is_fitted
    path = tmp_path / "bet.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for state in (ckpt["state_dict"], ckpt["current_model_state"]):  # the EMA weights and the raw ones
        assert torch.equal(state["bin_centers"], expected) and float(state["bins_fitted"]) == 1.0

    loaded = make_bet(horizon=3, obs_dim=datamodule.obs_dim, n_bins=6)
    loaded.load_state_dict(ckpt["state_dict"])
    cond = datamodule.dataset("val").tensors["cond"][:8]
    module.eval(), loaded.eval()
    draw = lambda m: m.sample(8, cond=cond, generator=torch.Generator().manual_seed(4))  # noqa: E731
    torch.testing.assert_close(draw(loaded), draw(module), atol=0, rtol=0)

    # setup keeps fitted bins (a resumed run, a loaded checkpoint): other "training actions" are not used
    other = torch.rand(500, 2) * 2 - 1
    loaded.training_actions = lambda: other
    loaded.setup("fit")
    assert torch.equal(loaded.bin_centers, expected)
    loaded.bins_fitted.zero_()  # unfitted: setup fits on what it is given
    loaded.setup("fit")
    assert torch.equal(loaded.bin_centers, kmeans(other, 6, iters=50, seed=0))


def test_horizon_other_than_n_obs_steps_is_refused():
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-4)
    with pytest.raises(ConfigError, match=r"data\.horizon == data\.n_obs_steps .*data\.horizon=3 data\.n_obs_steps=3 data\.n_action_steps=1"):
        BET(None, optimizer, None, data_shape=(16, 2), cond_dim=4, n_obs_steps=2)
    with pytest.raises(ConfigError, match="model.n_head"):
        make_bet(n_embd=18, n_head=4)
    with pytest.raises(ConfigError, match="model.temperature"):
        make_bet(temperature=0.0)
