"""A state-based DDPM policy as a folder LeRobot's `DiffusionPolicy.from_pretrained` loads (checked with lerobot 0.6.1).

    export_policy(policy, "exported/pusht_lerobot", format="lerobot")

Our `ConditionalUnet1D` is LeRobot's `DiffusionConditionalUnet1d` layer for layer (FiLM with scale, Mish, GroupNorm,
the same sinusoidal step embedding); only the parameter names differ (`KEY_RENAMES`), and the observation history
is laid out per step in LeRobot's order (`observation.state`, then `observation.environment_state`), so the FiLM
layers' observation columns are permuted to it. The folder holds LeRobot's files:

- `config.json`: `type: diffusion`, the features, the normalisation mapping and the noise schedule;
- `model.safetensors`: the renamed EMA weights;
- `policy_preprocessor.json` / `policy_postprocessor.json` with their normaliser stats (`*.safetensors`).

Our min/max normaliser is written as the min/max LeRobot's MIN_MAX mode inverts to the same map (a dimension our
normaliser only centres gets min = centre - 1, max = centre + 1). What LeRobot's format cannot express is refused
with the reason: another method or net, camera images, v-prediction, and samplers LeRobot does not run as ours do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from difflab.errors import ConfigError

LEROBOT_CHECKED = "0.6.1"
STATE, ENV = "observation.state", "observation.environment_state"
# our key -> LeRobot feature, for policies trained on Push-T's zarr (LeRobot-trained ones carry their own mapping)
PUSHT_FEATURES = {"agent_pos": STATE, "keypoint": ENV}
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = {"eps": "epsilon", "x0": "sample"}

# (pattern in our ConditionalUnet1D's state dict, LeRobot's name under diffusion.unet.)
KEY_RENAMES = [
    (r"^step_encoder\.0\.", "diffusion_step_encoder.1."),
    (r"^step_encoder\.2\.", "diffusion_step_encoder.3."),
    (r"^down\.", "down_modules."),
    (r"^mid\.", "mid_modules."),
    (r"^up\.", "up_modules."),
    (r"\.block1\.", ".conv1.block."),
    (r"\.block2\.", ".conv2.block."),
    (r"\.film\.1\.", ".cond_encoder.1."),
    (r"\.residual\.", ".residual_conv."),
    (r"^final\.0\.", "final_conv.0.block."),
    (r"^final\.1\.", "final_conv.1."),
]


def lerobot_key(name: str) -> str:
    for pattern, replacement in KEY_RENAMES:
        name = re.sub(pattern, replacement, name)
    return "diffusion.unet." + name


def _refuse(why: str) -> None:
    raise ConfigError(f"format='lerobot' cannot express this policy: {why}")


def _sampler(policy, module) -> tuple[str, int]:
    """LeRobot's noise_scheduler_type and num_inference_steps that sample as this policy does."""
    opts = {**module.sampling_defaults(policy.sampler or module.sampler), **policy.sample_kwargs}
    sampler = module.resolve_sampler(policy.sampler)
    if opts.get("guidance") is not None and float(opts["guidance"]) != 1.0:
        _refuse("LeRobot's Diffusion Policy has no classifier-free guidance; export with guidance=1 (or none)")
    if float(opts.get("eps_scale") or 1.0) != 1.0 or int(opts.get("time_shift_window") or 0):
        _refuse("epsilon scaling and time-step shifting have no LeRobot setting; export with eps_scale=1 time_shift_window=0")
    if sampler == "ancestral":
        if opts.get("variance") != "posterior":
            _refuse("LeRobot's DDPM scheduler adds the posterior variance (diffusers' fixed_small); load the policy with "
                    "variance=posterior")
        return "DDPM", module.num_timesteps
    if sampler == "ddim":
        if float(opts.get("eta") or 0.0) != 0.0:
            _refuse("LeRobot's DDIM is deterministic (eta=0); load the policy with eta=0")
        if opts.get("ddim_spacing") != "leading":
            _refuse(f"LeRobot's DDIM visits diffusers' 'leading' levels (k * T // steps), this policy's "
                    f"ddim_spacing={opts.get('ddim_spacing')}; load it with ddim_spacing=leading")
        if module.clip_denoised:
            _refuse("with clip_sample LeRobot's DDIM keeps the unclipped noise estimate after clipping x0 (diffusers' "
                    "use_clipped_model_output=False), ours re-derives it, so the chunks would differ; export "
                    "sampler=ancestral variance=posterior (LeRobot's DDPM, its Push-T default)")
        return "DDIM", int(policy.steps or module.sample_steps)
    _refuse(f"sampler={sampler} has no LeRobot scheduler (it runs DDPM = our ancestral, and DDIM)")
    raise AssertionError  # unreachable


def _layout(policy, features: dict[str, str]) -> tuple[list[tuple[str, str, int, int]], list[int]]:
    """[(LeRobot feature, our key, start, size) in LeRobot's order] and the per-step column permutation."""
    offsets, start = {}, 0
    for key in policy.low_keys:
        offsets[key] = (start, policy.obs_dims[key])
        start += policy.obs_dims[key]
    by_feature = {v: k for k, v in features.items()}
    unknown = sorted(set(features.values()) - {STATE, ENV})
    if unknown or STATE not in by_feature or set(features) != set(policy.low_keys):
        _refuse(f"LeRobot's Diffusion Policy reads {STATE} (the robot state) and {ENV}; this policy observes "
                f"{policy.low_keys} mapped as {features}: pass features={{<key>: '{STATE}', <key>: '{ENV}'}}")
    if ENV not in by_feature:
        _refuse(f"LeRobot's Diffusion Policy needs {ENV} (or a camera, which this export does not write) beside {STATE} "
                f"(its validate_features); this policy observes only {policy.low_keys}")
    layout, perm = [], []
    for feature in (STATE, ENV):
        if feature in by_feature:
            key = by_feature[feature]
            begin, size = offsets[key]
            layout.append((feature, key, begin, size))
            perm += list(range(begin, begin + size))
    return layout, perm


def lerobot_weights(net_state: dict[str, torch.Tensor], perm: list[int], step_embed_dim: int, n_obs_steps: int) -> dict:
    """Our net's weights under LeRobot's names, the FiLM layers' observation columns in LeRobot's per-step order."""
    width = len(perm)
    columns = torch.tensor(list(range(step_embed_dim)) + [step_embed_dim + s * width + j for s in range(n_obs_steps) for j in perm])
    out = {}
    for name, value in net_state.items():
        if name.endswith("film.1.weight"):
            value = value[:, columns]
        out[lerobot_key(name)] = value.detach().cpu().contiguous().clone()
    return out


def _stats(normalizer, begin: int, size: int) -> dict[str, torch.Tensor]:
    # LeRobot's MIN_MAX is 2 (x - min) / (max - min) - 1; ours (x - centre) * scale: min/max = centre -+ 1 / scale.
    center, half = normalizer.center[begin : begin + size], 1.0 / normalizer.scale[begin : begin + size]
    return {"min": center - half, "max": center + half, "mean": center.clone(), "std": half.clone()}


def export_lerobot(policy, folder: Path, features: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    from difflab.atomic_dir import atomic_dir
    from lightning_modules.ddpm import DDPM
    from lightning_modules.nets.unet1d import ConditionalUnet1D

    module = policy.module
    if not isinstance(module, DDPM):
        _refuse(f"it is a {type(module).__name__}; LeRobot's Diffusion Policy is a DDPM (model=ddpm)")
    if not isinstance(module.net, ConditionalUnet1D):
        _refuse(f"its net is a {type(module.net).__name__}; LeRobot's is the 1-D conv UNet (net=unet1d_*)")
    if policy.image_shapes or module.obs_encoder is not None:
        _refuse("it sees camera images through our encoder, whose crop and keypoint layers LeRobot's ResNet encoder "
                "does not share; export a state-based policy")
    if module.net.embedding_scale != 1.0:
        _refuse(f"net.embedding_scale={module.net.embedding_scale}; LeRobot embeds the step index itself")
    model_cfg = (module.run_config or {}).get("model", {})
    schedule, prediction = model_cfg.get("schedule", "linear"), module.prediction
    if schedule not in SCHEDULES or prediction not in PREDICTIONS:
        _refuse(f"model.schedule={schedule} model.prediction={prediction}; LeRobot takes schedules {sorted(SCHEDULES)} and "
                f"predictions {sorted(PREDICTIONS)}")
    features = dict(features or policy.feature_keys or {k: v for k, v in PUSHT_FEATURES.items() if k in policy.low_keys})
    layout, perm = _layout(policy, features)
    scheduler, inference_steps = _sampler(policy, module)
    horizon, action_dim = module.data_shape

    def feature(kind: str, size: int) -> dict:
        return {"type": kind, "shape": [size]}

    inputs = {name: feature("STATE" if name == STATE else "ENV", size) for name, _, _, size in layout}
    outputs = {"action": feature("ACTION", action_dim)}
    norm_map = {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ENV": "MIN_MAX", "ACTION": "MIN_MAX"}
    net = module.net
    config = {
        "type": "diffusion", "n_obs_steps": policy.n_obs_steps, "input_features": inputs, "output_features": outputs,
        "device": "cpu", "use_amp": False, "use_peft": False, "push_to_hub": False, "repo_id": None, "private": None,
        "tags": None, "license": None, "pretrained_path": None, "pretrained_revision": None,
        "horizon": horizon, "n_action_steps": policy.n_action_steps, "normalization_mapping": norm_map,
        "drop_n_last_frames": horizon - policy.n_action_steps - policy.n_obs_steps + 1,
        "vision_backbone": "resnet18", "resize_shape": None, "crop_ratio": 1.0, "crop_shape": None, "crop_is_random": True,
        "pretrained_backbone_weights": None, "use_group_norm": True, "spatial_softmax_num_keypoints": 32,
        "use_separate_rgb_encoder_per_camera": True,
        "down_dims": [int(block[0].block1[0].out_channels) for block in net.down], "kernel_size": int(net.down[0][0].block1[0].kernel_size[0]),
        "n_groups": int(net.down[0][0].block1[1].num_groups), "diffusion_step_embed_dim": int(net.step_embed_dim),
        "use_film_scale_modulation": True, "gradient_checkpointing": False,
        "noise_scheduler_type": scheduler, "num_train_timesteps": int(module.num_timesteps),
        "beta_schedule": SCHEDULES[schedule], "beta_start": float(model_cfg.get("beta_start", 1e-4)),
        "beta_end": float(model_cfg.get("beta_end", 0.02)), "prediction_type": PREDICTIONS[prediction],
        "clip_sample": bool(module.clip_denoised), "clip_sample_range": 1.0, "num_inference_steps": inference_steps,
        "compile_model": False, "compile_mode": "reduce-overhead", "do_mask_loss_for_padding": False,
        "optimizer_lr": 1e-4, "optimizer_betas": [0.95, 0.999], "optimizer_eps": 1e-8, "optimizer_weight_decay": 1e-6,
        "scheduler_name": "cosine", "scheduler_warmup_steps": 500,
    }
    stats = {}
    for name, _, begin, size in layout:
        stats |= {f"{name}.{k}": v for k, v in _stats(policy.obs_normalizer, begin, size).items()}
    stats |= {f"action.{k}": v for k, v in _stats(policy.action_normalizer, 0, action_dim).items()}
    stats = {k: v.float().contiguous() for k, v in stats.items()}
    normalizer = {"eps": 1e-8, "features": {**inputs, **outputs}, "norm_map": norm_map}
    pre = {"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
        {"registry_name": "normalizer_processor", "config": normalizer,
         "state_file": "policy_preprocessor_step_3_normalizer_processor.safetensors"}]}
    post = {"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor", "config": {**normalizer, "features": outputs},
         "state_file": "policy_postprocessor_step_0_unnormalizer_processor.safetensors"},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}]}
    weights = lerobot_weights(net.state_dict(), perm, int(net.step_embed_dim), policy.n_obs_steps)
    with atomic_dir(folder) as tmp:
        save_file(weights, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=4))
        (tmp / "policy_preprocessor.json").write_text(json.dumps(pre, indent=2))
        (tmp / "policy_postprocessor.json").write_text(json.dumps(post, indent=2))
        save_file(stats, str(tmp / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
        save_file(stats, str(tmp / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    return folder
