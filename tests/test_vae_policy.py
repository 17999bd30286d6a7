"""The VAE policy (ACT-style action-chunking CVAE): its loss in closed form, the prior it decodes, what a fit does."""

import io
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from difflab.errors import ConfigError
from lightning_modules.vae_policy import VAEPolicy, gaussian_kl

SHAPE, COND = (8, 2), 3  # a chunk of 8 steps of 2-D actions, a 3-D observation history


def make(seed=0, **kw):
    torch.manual_seed(seed)
    settings = dict(latent_dim=4, hidden=32, depth=2, clip_denoised=False)
    settings.update(kw)
    return VAEPolicy(None, partial(torch.optim.Adam, lr=3e-3), data_shape=SHAPE, cond_dim=COND, **settings)


def two_mode_batch(g, n=256):
    """Constant observation; the whole chunk is +0.6 with probability 0.3, else -0.6."""
    up = torch.rand(n, generator=g) < 0.3
    x = torch.where(up, 0.6, -0.6)[:, None, None].expand(n, *SHAPE).clone()
    return {"x": x, "cond": torch.full((n, COND), 0.5)}


def regression_batch(g, n=128):
    """A chunk that is a smooth function of the observation (learnable from cond alone)."""
    cond = torch.rand(n, COND, generator=g) * 2 - 1
    t = torch.linspace(0, 1, SHAPE[0])
    x = torch.stack([torch.tanh(cond[:, :1] + t), torch.tanh(cond[:, 1:2] * t - cond[:, 2:])], dim=-1)
    return {"x": x, "cond": cond}


def fit(module, make_batch, steps, seed=0):
    optimizer = module.configure_optimizers()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = module.loss(make_batch(g), generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module


def by_hand(module, batch, seed, mu=None, logvar=None):
    """recon and KL recomputed from the module's encoder/decoder with the draw the module makes (one N(0, I) of shape
    (B, latent_dim) from the generator, before anything else)."""
    x, cond = batch["x"], batch["cond"]
    if mu is None:
        mu, logvar = module.net.encoder(torch.cat([x.flatten(1), cond], -1)).chunk(2, -1)
    eps = torch.randn((x.shape[0], module.latent_dim), generator=torch.Generator().manual_seed(seed))
    s2 = torch.exp(logvar)
    z = mu + s2.sqrt() * eps
    x_hat = module.net.decoder(torch.cat([z, cond], -1)).view_as(x)
    err = (x_hat - x).abs() if module.recon_loss == "l1" else (x_hat - x) ** 2
    recon = err.sum(dim=(1, 2)).mean()
    kl = (0.5 * (mu**2 + s2 - 1 - torch.log(s2)).sum(-1)).mean()
    return recon, kl


def test_kl_is_the_closed_form_for_a_fixed_encoder_output():
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), reference)
    # and the module's loss uses exactly that KL: freeze the encoder's output and compare with the hand formula
    module = make()
    module.net.encode = lambda x_flat, cond: (mu, logvar)
    batch = regression_batch(torch.Generator().manual_seed(0), n=5)
    recon, kl = module.loss_terms(batch, generator=torch.Generator().manual_seed(11))
    hand_recon, hand_kl = by_hand(module, batch, 11, mu, logvar)
    torch.testing.assert_close(kl, hand_kl)
    torch.testing.assert_close(recon, hand_recon)
    assert kl.item() > 0.5  # a nontrivial posterior, not N(0, I)


@pytest.mark.parametrize("recon_loss", ["l2", "l1"])
def test_loss_is_recon_plus_weighted_kl_from_the_modules_own_draw(recon_loss):
    module = make(recon_loss=recon_loss, kl_weight=0.7)
    batch = regression_batch(torch.Generator().manual_seed(1), n=16)
    loss = module.loss(batch, generator=torch.Generator().manual_seed(5))
    recon, kl = by_hand(module, batch, 5)
    torch.testing.assert_close(loss, recon + 0.7 * kl)
    # the draw matters: with another z the loss is another (so the check above did pin the draw)
    recon_other, kl_other = by_hand(module, batch, 6)
    assert abs((recon_other + 0.7 * kl_other - loss).item()) > 1e-4


def test_kl_weight_zero_and_huge():
    batch = two_mode_batch(torch.Generator().manual_seed(0), n=512)
    free = fit(make(kl_weight=0.0), two_mode_batch, 200)
    tight = fit(make(kl_weight=1e4), two_mode_batch, 200)
    with torch.no_grad():
        recon, kl = free.loss_terms(batch, torch.Generator().manual_seed(1))
        torch.testing.assert_close(free.loss(batch, torch.Generator().manual_seed(1)), recon)  # KL does not enter
        tight_recon, tight_kl = tight.loss_terms(batch, torch.Generator().manual_seed(1))
    # huge weight: the posterior collapses onto N(0, I), z carries nothing and the decoder predicts the data mean,
    # whose per-sample squared error is 16 elements * Var = 16 * (0.36 - 0.24^2) = 4.84
    assert tight_kl.item() < 0.05
    assert abs(tight_recon.item() - 16 * (0.36 - 0.24**2)) < 0.6
    # no weight: the posterior carries the mode, so the reconstruction is far better than the mean's
    assert kl.item() > 1.0 and recon.item() < 0.5


def test_the_loss_decreases_on_a_small_problem():
    module = make()
    batch = regression_batch(torch.Generator().manual_seed(99), n=256)
    with torch.no_grad():
        before = module.loss(batch, torch.Generator().manual_seed(7)).item()
    fit(module, regression_batch, 150)
    with torch.no_grad():
        after = module.loss(batch, torch.Generator().manual_seed(7)).item()
    assert after < 0.3 * before, (before, after)


def test_draw_decodes_prior_draws_of_z():
    module = make()
    n = 20000
    z = module.sample_latent(n, torch.Generator().manual_seed(0))
    assert z.shape == (n, module.latent_dim)
    assert (z.mean(0).abs() < 5 / n**0.5).all()
    assert ((z.std(0) - 1).abs() < 5 / (2 * n) ** 0.5).all()
    # sample() decodes exactly those draws: with a decoder that is the identity on z (latent_dim = chunk size) the
    # samples are N(0, I) themselves
    module = make(latent_dim=SHAPE[0] * SHAPE[1])
    identity = nn.Linear(module.latent_dim + COND, module.chunk_dim)
    with torch.no_grad():
        identity.weight.zero_()
        identity.weight[:, : module.latent_dim] = torch.eye(module.latent_dim)
        identity.bias.zero_()
    module.net.decoder = identity
    cond = torch.randn(n, COND)
    x = module.sample(n, cond=cond, generator=torch.Generator().manual_seed(4))
    expected = module.sample_latent(n, torch.Generator().manual_seed(4)).view(n, *SHAPE)
    torch.testing.assert_close(x, expected)
    flat = x.flatten(1)
    assert (flat.mean(0).abs() < 5 / n**0.5).all() and ((flat.std(0) - 1).abs() < 5 / (2 * n) ** 0.5).all()


def test_samples_are_reproducible_with_a_generator_and_differ_with_another():
    module = make(clip_denoised=True)
    cond = torch.randn(64, COND)
    a = module.sample(64, cond=cond, generator=torch.Generator().manual_seed(1))
    b = module.sample(64, cond=cond, generator=torch.Generator().manual_seed(1))
    c = module.sample(64, cond=cond, generator=torch.Generator().manual_seed(2))
    assert a.shape == (64, *SHAPE) and a.abs().max() <= 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    batch = regression_batch(torch.Generator().manual_seed(0), n=32)
    same = [module.loss(batch, torch.Generator().manual_seed(s)).item() for s in (3, 3, 4)]
    assert same[0] == same[1] != same[2]


def test_state_dict_round_trip_gives_identical_samples():
    trained = fit(make(seed=0), regression_batch, 20)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    fresh = make(seed=1)  # another initialisation
    cond = torch.randn(32, COND)
    draw = lambda m: m.sample(32, cond=cond, generator=torch.Generator().manual_seed(8))  # noqa: E731
    assert (draw(fresh) - draw(trained)).abs().max() > 1e-3
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(draw(fresh), draw(trained), rtol=0, atol=0)


def test_two_modes_the_posterior_carries_the_mode_and_the_samples_are_reported(record_property):
    module = fit(make(), two_mode_batch, 300)
    cond = torch.full((2, COND), 0.5)
    with torch.no_grad():
        # a correct CVAE's posterior mean tells the two chunks apart and the decoder maps it back to its chunk
        for value in (0.6, -0.6):
            chunk = torch.full((1, *SHAPE), value).expand(2, *SHAPE)
            mu, _ = module.net.encode(chunk.flatten(1), cond)
            back = module.decode(mu, cond)
            assert (back - chunk).abs().max() < 0.15, (value, back)
        n = 4000
        x = module.sample(n, cond=torch.full((n, COND), 0.5), generator=torch.Generator().manual_seed(0))
    means = x.mean(dim=(1, 2))
    near_up = (means - 0.6).abs().lt(0.15).float().mean().item()
    near_down = (means + 0.6).abs().lt(0.15).float().mean().item()
    near_zero = means.abs().lt(0.15).float().mean().item()
    report = f"two modes (data: 0.30 at +0.6, 0.70 at -0.6): near +0.6 {near_up:.3f}, near -0.6 {near_down:.3f}, near 0 {near_zero:.3f}"
    print(report)
    record_property("two_mode_fractions", report)
    assert torch.isfinite(x).all() and -0.6 <= means.mean().item() <= 0.6


def test_the_two_terms_are_logged_in_training():
    module = make(kl_weight=0.5)
    g = torch.Generator().manual_seed(0)
    batches = [regression_batch(g, n=16) for _ in range(2)]
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    logged = trainer.callback_metrics
    assert {"train/loss", "train/recon", "train/kl"} <= set(logged)
    torch.testing.assert_close(logged["train/loss"], logged["train/recon"] + 0.5 * logged["train/kl"])


@pytest.mark.parametrize("setting, value", [("recon_loss", "l3"), ("kl_weight", -1.0), ("latent_dim", 0), ("dropout", 1.0)])
def test_bad_settings_name_the_key(setting, value):
    with pytest.raises(ConfigError, match=f"model.{setting}"):
        make(**{setting: value})
