"""The sampling block: model.sampling = {sampler, steps, options}, the one place sampler settings live.

The golden file holds tiny toy models saved by the code before the block (flat model.sampler, model.sample_steps,
model.eta, ...: tests/data/make_flat_sampling_golden.py, run in that checkout) with the samples that code drew.
"""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from difflab.cli import moved_sampling_key
from lightning_modules.checkpoint import build_model, check_model_settings, current_config

GOLDEN = torch.load(Path(__file__).parent / "data" / "flat_sampling_golden.pt", weights_only=True)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_flat_config_checkpoints_sample_identically(name):
    case = GOLDEN[name]
    cfg = OmegaConf.create(case["config"])
    assert "sampling" not in cfg.model and ("sampler" in cfg.model or "n_steps_each" in cfg.model)
    model = build_model(cfg, (2,), None)
    model.load_state_dict(case["state_dict"])
    with torch.no_grad():
        x = model.eval().sample(6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, case["samples"], rtol=0, atol=0)


def test_flat_settings_move_into_the_block():
    cfg = current_config(OmegaConf.create(GOLDEN["ddpm"]["config"]))
    assert cfg.model.sampling == {"sampler": "ddim", "steps": 7, "options": {
        "variance": "beta", "eta": 0.5, "ddim_spacing": "quadratic", "eps_scale": 1.0, "eps_scale_schedule": "constant",
        "eps_scale_slope": 0.0, "time_shift_window": 0, "time_shift_cutoff": 0, "time_shift_data_var": None}}
    assert not {"sampler", "sample_steps", "eta"} & set(cfg.model)
    ncsn = current_config(OmegaConf.create(GOLDEN["ncsn"]["config"])).model.sampling
    assert ncsn.steps == 3 and ncsn.options == {"step_lr": 1e-5, "step_size": 5e-5}  # n_steps_each, langevin_step_size


def test_resume_compares_old_and_new_layouts():
    """A flat-layout checkpoint resumed with today's config: sampling settings may differ, the rest may not."""
    saved = OmegaConf.create(GOLDEN["ddpm"]["config"])
    now = current_config(saved)
    now.model.sampling.options.eta = 1.0  # a sampling setting: allowed
    check_model_settings(saved, now, "x.ckpt")
    now.model.num_timesteps = 100
    with pytest.raises(Exception, match="model.num_timesteps=50"):
        check_model_settings(saved, now, "x.ckpt")


def test_block_options_reach_the_sampler_and_calls_override_them():
    cfg = current_config(OmegaConf.create(GOLDEN["edm"]["config"]))
    model = build_model(cfg, (2,), None)
    model.load_state_dict(GOLDEN["edm"]["state_dict"])
    assert model.sampling_defaults("heun")["s_churn"] == 10 and "s_churn" not in model.sampling_defaults("euler")
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    with torch.no_grad():
        churned = model.sample(6, generator=g())
        plain = model.sample(6, generator=g(), s_churn=0.0)
    assert not torch.equal(churned, plain)
    cfg.model.sampling.options.s_churn = 0.0
    model = build_model(cfg, (2,), None)
    model.load_state_dict(GOLDEN["edm"]["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(model.sample(6, generator=g()), plain, rtol=0, atol=0)


@pytest.mark.parametrize("block, match", [
    ({"sampler": "heun", "stepz": 3}, r"model.sampling.stepz is not a setting"),
    ({"steps": 0}, r"model.sampling.steps=0 is not valid"),
    ({"options": {"s_curn": 1.0}}, r"model.sampling.options.s_curn is not an option of any sampler of EDM .*s_churn"),
    ({"sampler": "cm"}, r"model.sampling.sampler: sampler=cm is not defined for EDM"),
])
def test_bad_sampling_blocks_are_refused_in_one_line(block, match):
    cfg = current_config(OmegaConf.create(GOLDEN["edm"]["config"]))
    cfg.model.sampling = block
    with pytest.raises(Exception, match=match):  # Hydra's instantiate wraps it; train.py prints the ConfigError's line
        build_model(cfg, (2,), None)


def test_old_command_line_keys_name_their_new_place():
    assert moved_sampling_key("model.sampler=heun") == ("model.sampler is now model.sampling.sampler (sampler settings live "
                                                       "in the model's sampling block): pass model.sampling.sampler=heun")
    assert "model.sampling.steps=10" in moved_sampling_key("model.sample_steps=10")
    assert "model.sampling.options.eta=1" in moved_sampling_key("model.eta=1")
    assert "model.sampling.options.step_size=1e-5" in moved_sampling_key("model.langevin_step_size=1e-5")
    assert moved_sampling_key("model.num_timesteps=10") is None and moved_sampling_key("data.eta=1") is None
