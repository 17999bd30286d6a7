"""Easy consistency tuning (ECT) and the issue-19 options of every consistency model: ECT's map r(t) and its
stages in closed form, its loss term by term, its warm start and refusals; distillation with iCT's pairs and
weights; the denoising term; the reduced first noise draw, against the exact law of a Gaussian's consistency fn.
"""

import math

import pytest
import torch
from omegaconf import OmegaConf

from difflab.errors import ConfigError
from lightning_modules.checkpoint import build_model
from lightning_modules.consistency import ict_pair_probs, pseudo_huber_c
from lightning_modules.consistency_distillation import ConsistencyDistillation
from lightning_modules.consistency_tuning import ConsistencyTuning, ect_lower_sigma, ect_stage
from lightning_modules.teachers import FunctionTeacher
from samplers.ode import heun_step
from test_consistency import (
    M,
    NET_CFG,
    OPT_CFG,
    S,
    AffineNet,
    ExactConsistencyNet,
    adam,
    assert_gaussian,
    cm,
    gaussian_denoiser,
    ict_loss_by_hand,
    mixture_points,
    paper_consistency_fn,
    small_mlp,
    write_ckpt,
)

TUNING = "lightning_modules.consistency_tuning.ConsistencyTuning"


def at_step(monkeypatch, step):
    """Pretend the optimizer has taken `step` steps (global_step is the trainer's; there is none here)."""
    monkeypatch.setattr(ConsistencyTuning, "global_step", property(lambda self: step))


# --- ECT's map from t to r -----------------------------------------------------------------------------


def test_ect_lower_sigma_is_its_closed_form_and_halves_the_gap_each_stage():
    t = torch.tensor([0.01, 0.5, 1.9, 2.0, 5.0, 80.0], dtype=torch.float64)
    for stage in range(4):
        expected = [max(0.0, v * (1 - 2.0 ** -(stage + 1) * (1 + 8 / (1 + math.exp(v))))) for v in t.tolist()]
        torch.testing.assert_close(ect_lower_sigma(t, stage), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    # at large t, n(t) -> 1: the gap t - r is t / 2^(stage + 1), so each stage halves it
    big = torch.tensor([80.0], dtype=torch.float64)
    gaps = [(big - ect_lower_sigma(big, s)).item() for s in range(8)]
    for a, b in zip(gaps, gaps[1:]):
        assert a / b == pytest.approx(2.0, rel=1e-9)
    assert gaps[0] == pytest.approx(40.0, rel=1e-9)
    # stage 0 clamps r to 0 wherever q^-1 n(t) > 1, i.e. sigmoid(-t) > 1/8, t < ln 7: the plain denoising loss
    assert ect_lower_sigma(torch.tensor([1.94]), 0).item() == 0.0 and ect_lower_sigma(torch.tensor([1.95]), 0).item() > 0
    # other q, k, b enter where they should
    torch.testing.assert_close(ect_lower_sigma(torch.tensor([3.0], dtype=torch.float64), 1, q=4.0, k=2.0, b=0.5),
                               torch.tensor([3.0 * (1 - 4.0**-2 * (1 + 2 / (1 + math.exp(1.5))))], dtype=torch.float64))


def test_ect_stage_splits_the_run_into_equal_parts():
    assert [ect_stage(s, 1000, 8) for s in (0, 124, 125, 250, 999, 1000, 5000)] == [0, 0, 1, 2, 7, 7, 7]
    assert ect_stage(3, 1, 4) == 3 and ect_stage(0, 0, 4) == 0


def tuning(**kw):
    kw.setdefault("total_steps", 1000)
    return ConsistencyTuning(kw.pop("net", None) or small_mlp(), adam, data_shape=(2,), **kw)


@pytest.mark.parametrize("step, stage", [(0, 0), (700, 5), (999, 7)])
def test_tuning_pairs_are_ects_map_of_a_lognormal_t(monkeypatch, step, stage):
    at_step(monkeypatch, step)
    model = tuning()
    r, t = model.pair(20_000, "cpu", torch.Generator().manual_seed(0))
    lo = model.sigma_min  # 0.002 as the module keeps it (float32-rounded)
    assert lo == pytest.approx(0.002) and t.min() >= 2 * lo and t.max() <= 80.0 and (r >= lo).all() and (r < t).all()
    torch.testing.assert_close(r, ect_lower_sigma(t, stage).clamp(min=lo), rtol=0, atol=0)
    # log t ~ N(-1.1, 2^2): the clamps touch only the tails, so the median stays (SE 1.25 * 2 / sqrt(n))
    assert abs(t.log().median().item() + 1.1) < 5 * 1.2533 * 2 / math.sqrt(20_000)
    assert model.schedule_logs() == {"train/ect_stage": float(stage), "train/dt_ratio": 2.0 ** -(stage + 1)}


def test_tuning_loss_is_the_weighted_pseudo_huber_gap_of_one_shared_noise(monkeypatch):
    """ECT's loss is iCT's with ECT's pairs: E[ 1 / (t - r) d(f(x + t z, t), sg f(x + r z, r)) ], the same z."""
    at_step(monkeypatch, 600)
    model = tuning(net=AffineNet(), mu=0.0)
    x0 = mixture_points(256, seed=3).float()
    torch.testing.assert_close(model.loss({"x": x0}, torch.Generator().manual_seed(5)).double(),
                               ict_loss_by_hand(model, x0, seed=5), rtol=2e-4, atol=0)


# --- ECT starts from a trained EDM model -------------------------------------------------------------


def build_tuning(init_ckpt, net=NET_CFG):
    cfg = {"net": net, "model": {"_target_": TUNING, "init_ckpt": init_ckpt and str(init_ckpt), "total_steps": 100, "optimizer": OPT_CFG}}
    model = build_model(OmegaConf.create(cfg), (2,), None)
    model.run_config = {"net": net}
    return model


def test_tuning_warm_starts_from_an_edm_checkpoint(tmp_path):
    edm = write_ckpt(tmp_path / "edm.ckpt", {"_target_": "lightning_modules.edm.EDM"})
    torch.manual_seed(0)
    torch.nn.init.normal_(edm.net.fc_out.weight)
    write_ckpt(tmp_path / "edm.ckpt", {"_target_": "lightning_modules.edm.EDM"}, module=edm)
    model = build_tuning(tmp_path / "edm.ckpt")
    assert not torch.equal(model.net.fc_out.weight, edm.net.fc_out.weight)
    model.setup("fit")
    for name, value in edm.net.state_dict().items():
        torch.testing.assert_close(model.net.state_dict()[name], value, rtol=0, atol=0)
    # the student's f at its largest level is then the teacher's denoiser there up to c_skip: c_out -> EDM's
    x = torch.randn(7, 2)
    sigma = torch.full((7,), 80.0)
    torch.testing.assert_close(model.consistency_fn(x, sigma), edm.denoise(x, 80.0), rtol=1e-3, atol=1e-4)
    # nothing of the source stays in the module tree or the state dict
    assert set(model.state_dict()) == set(build_tuning(None).state_dict())


def test_tuning_refuses_no_checkpoint_and_one_it_cannot_start_from(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.init_ckpt=PATH"):
        build_tuning(None).setup("fit")
    write_ckpt(tmp_path / "ddpm.ckpt", {"_target_": "lightning_modules.ddpm.DDPM", "num_timesteps": 100})
    with pytest.raises(ConfigError, match=r"model\.init_ckpt=.*ddpm model's net is fed x_t and t"):
        build_tuning(tmp_path / "ddpm.ckpt").setup("fit")
    write_ckpt(tmp_path / "edm.ckpt", {"_target_": "lightning_modules.edm.EDM"})
    with pytest.raises(ConfigError, match=r"net settings differ"):
        build_tuning(tmp_path / "edm.ckpt", net={**NET_CFG, "hidden": 16}).setup("fit")
    write_ckpt(tmp_path / "edm_sd.ckpt", {"_target_": "lightning_modules.edm.EDM", "sigma_data": 1.0})
    with pytest.raises(ConfigError, match=r"sigma_data=1.0 differs"):
        build_tuning(tmp_path / "edm_sd.ckpt").setup("fit")
    write_ckpt(tmp_path / "ct.ckpt", {"_target_": "lightning_modules.consistency_training.ConsistencyTraining"})
    with pytest.raises(ConfigError, match=r"one-step model"):
        build_tuning(tmp_path / "ct.ckpt").setup("fit")
    # a resumed run has its weights in the checkpoint Lightning restores: nothing to load, nothing to refuse
    resumed = build_tuning(None)
    resumed.run_config = {"net": NET_CFG, "ckpt_path": "last.ckpt"}
    resumed.setup("fit")
    build_tuning(None).setup("validate")


# --- distillation with iCT's pairs and weights ---------------------------------------------------------


def test_distillation_lognormal_pairs_follow_icts_probabilities():
    n = 200_000
    freqs = {}
    for pairs in ("uniform", "lognormal"):
        model = ConsistencyDistillation(small_mlp(), adam, data_shape=(2,), num_scales=12, pairs=pairs)
        lo, hi = model.pair(n, "cpu", torch.Generator().manual_seed(0))
        grid = model.train_grid(12, "cpu")
        idx = torch.searchsorted(grid, lo)
        torch.testing.assert_close(hi, grid[idx + 1], rtol=0, atol=0)
        freqs[pairs] = torch.bincount(idx, minlength=11).double() / n
    p = ict_pair_probs(model.train_grid(12, "cpu"), -1.1, 2.0)
    bound = 5 * (p * (1 - p) / n).sqrt() + 1e-4
    assert ((freqs["lognormal"] - p).abs() < bound).all(), (freqs["lognormal"], p)
    assert ((freqs["uniform"] - 1 / 11).abs() < 5 * math.sqrt(1 / 11 / n)).all()
    assert (freqs["uniform"] - p).abs().max() > 0.05  # the two laws are far apart on this grid


@pytest.mark.parametrize("weighting", ["uniform", "ict"])
def test_distillation_weighting_is_one_or_icts_inverse_gap(weighting):
    model = ConsistencyDistillation(small_mlp(), adam, data_shape=(2,), num_scales=18, weighting=weighting)
    model.attach_teacher(FunctionTeacher(gaussian_denoiser, 0.002, 80.0))
    g = torch.Generator().manual_seed(0)
    lo, hi = model.pair(64, "cpu", g)
    x0 = M + S * torch.randn(64, 2, generator=g, dtype=torch.float64)
    z = torch.randn(64, 2, generator=g, dtype=torch.float64)
    x_hi = x0 + hi[:, None] * z
    x_lo, weight = model.lower_point(x0, x_hi, z, hi, lo, None)
    torch.testing.assert_close(x_lo, heun_step(gaussian_denoiser, x_hi, hi, lo))
    expected = 1 / (hi - lo) if weighting == "ict" else torch.ones_like(lo)
    torch.testing.assert_close(weight.double(), expected.double(), rtol=1e-12, atol=0)


# --- the denoising term and the reduced first draw, options of every consistency model -----------------


def test_dsm_weight_adds_the_weighted_distance_of_f_to_the_clean_point():
    x0 = mixture_points(256, seed=3).float()
    plain = cm(AffineNet(), mu=0.0, total_steps=400_000).loss({"x": x0}, torch.Generator().manual_seed(5))
    with_dsm = cm(AffineNet(), mu=0.0, total_steps=400_000, dsm_weight=0.3)
    g = torch.Generator().manual_seed(5)
    lo, hi = with_dsm.pair(256, "cpu", g)
    z = torch.randn(x0.shape, generator=g)
    student = paper_consistency_fn(x0 + hi[:, None].float() * z, hi)
    c = pseudo_huber_c(2)
    dsm = (((student - x0.double()).pow(2).sum(1) + c**2).sqrt() - c) / math.sqrt(2)
    got = with_dsm.loss({"x": x0}, torch.Generator().manual_seed(5))
    torch.testing.assert_close((got - plain).double(), 0.3 * dsm.mean(), rtol=2e-4, atol=0)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_init_noise_scale_shrinks_the_first_draw(scale):
    """x_T = scale sigma_max z through the exact consistency fn of N(M, S^2), an affine map with slope
    r = sqrt(S^2 + sigma_min^2) / sqrt(S^2 + sigma_max^2): the law is N(M (1 - r), (r scale sigma_max)^2)."""
    model = cm(ExactConsistencyNet(0.002), mu=0.0, sampling={"options": {"init_noise_scale": scale}})
    x = model.sample(50_000, generator=torch.Generator().manual_seed(0)).double()
    r = math.sqrt(S**2 + 0.002**2) / math.sqrt(S**2 + 80.0**2)
    assert_gaussian(x, M * (1 - r), r * scale * 80.0)
    # the same as a per-call sampling option (evaluate.py / sample.py init_noise_scale=) of a model built at 1
    default = cm(ExactConsistencyNet(0.002), mu=0.0)
    assert torch.equal(default.sample(500, generator=torch.Generator().manual_seed(1), init_noise_scale=scale),
                       model.sample(500, generator=torch.Generator().manual_seed(1)))


def test_init_noise_scale_is_an_option_of_consistency_sampling_only():
    with pytest.raises(ConfigError, match=r"init_noise_scale must be in \(0, 1\]"):
        cm(ExactConsistencyNet(0.002), mu=0.0).sample(4, init_noise_scale=2.0)
    from lightning_modules.edm import EDM

    with pytest.raises(ConfigError, match="init_noise_scale= is not an option"):
        EDM(small_mlp(), adam, data_shape=(2,)).sample(4, sampler="heun", steps=2, init_noise_scale=0.5)


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: cm(dsm_weight=-0.1), "model.dsm_weight"),
        (lambda: cm(sampling={"options": {"init_noise_scale": 0.0}}), "model.sampling.options.init_noise_scale"),
        (lambda: cm(sampling={"options": {"init_noise_scale": 1.5}}), "model.sampling.options.init_noise_scale"),
        (lambda: tuning(q=1.0), "model.q"),
        (lambda: tuning(num_stages=0), "model.num_stages"),
        (lambda: tuning(b=0.0), "model.b"),
        (lambda: ConsistencyDistillation(small_mlp(), adam, data_shape=(2,), pairs="log"), "model.pairs"),
        (lambda: ConsistencyDistillation(small_mlp(), adam, data_shape=(2,), weighting="snr"), "model.weighting"),
        (lambda: ConsistencyDistillation(small_mlp(), adam, data_shape=(2,), p_std=0.0), "model.p_std"),
    ],
)
def test_bad_issue19_settings_are_refused_with_their_names(make, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make()
