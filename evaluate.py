"""Quality figure of a checkpoint, with its floor, sampler, NFE and speed, printed and written as JSON:

    python evaluate.py ckpt_path=PATH [metric=auto] [num_samples=2000] [sampler=ddim] [steps=50]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.base import label_scores, one_hot, sampling_cond
from difflab.cli import entry_keys, one_line_errors, refuse_training_groups, requested_labels, writable_dir
from difflab.config_checks import check_config, check_known_keys
from difflab.errors import SAMPLER_DIVERGED, ConfigError, require_finite
from lightning_modules.checkpoint import instantiate_datamodule, load_guide, load_module, sampling_options, sampling_tag

DEFAULT_NUM_SAMPLES = {"fid": 50_000, "bpd": 512}


def held_out_data(datamodule, num: int) -> torch.Tensor:
    """Up to `num` examples of the validation split (never flipped or augmented)."""
    datamodule.setup("fit")
    chunks, have = [], 0
    for batch in datamodule.val_dataloader():
        chunks.append(batch["x"])
        have += batch["x"].shape[0]
        if have >= num:
            break
    return torch.cat(chunks)[:num]


def evaluate_bpd(module, datamodule, cfg: DictConfig, device: str) -> dict:
    """Negative log-likelihood of held-out data in bits/dim through the probability-flow ODE (score SDEs)."""
    import samplers

    if getattr(module, "provides", None) != samplers.DENOISER:
        raise ConfigError(f"metric=bpd integrates a probability-flow ODE: a {type(module).__name__} has no denoiser to "
                          "integrate (every diffusion-family method does: ddpm, edm, ncsn, vesde, vpsde, subvpsde, flow_matching)")
    x = held_out_data(datamodule, cfg.num_samples or DEFAULT_NUM_SAMPLES["bpd"])
    num_levels = getattr(datamodule, "num_levels", None)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    start, values, nfes = time.perf_counter(), [], []
    for chunk in x.split(cfg.batch_size):
        bpd, nfe = module.bits_per_dim(chunk.to(device), num_levels=num_levels, generator=generator)
        values.append(bpd.detach().cpu())
        nfes.append(nfe)
    seconds = time.perf_counter() - start
    bpd = torch.cat(values)
    return {
        "metric": "bpd", "value": float(bpd.mean()), "stderr": float(bpd.std() / len(bpd) ** 0.5), "floor": None,
        "num_samples": int(len(bpd)), "num_levels": num_levels, "sampler": "ode_adaptive (likelihood)",
        "nfe": float(sum(nfes) / len(nfes)), "sampling_seconds": round(seconds, 3),
        "samples_per_second": round(len(bpd) / max(seconds, 1e-9), 2),
    }


def make_metric(name: str, datamodule, cfg: DictConfig, device: str):
    """The datamodule's own figure for `auto`; FID can be asked for explicitly on image data."""
    if name == "auto":
        if getattr(datamodule, "fid_name", None):
            name = "fid"
        else:
            metric = datamodule.make_metric()
            if metric is None:
                raise ConfigError(f"{type(datamodule).__name__} has no quality metric: pass metric=... explicitly")
            return metric
    if name == "fid":
        from evaluation.fid import InceptionFID

        if not getattr(datamodule, "fid_name", None):
            raise ConfigError(f"metric=fid needs an image dataset with real images; {type(datamodule).__name__} has none")
        datamodule.setup("fit")
        return InceptionFID(datamodule, inception_weights=cfg.inception_weights, device=device)
    metric = datamodule.make_metric()
    if metric is None or metric.name != name:
        have = metric.name if metric is not None else "none"
        raise ConfigError(f"metric={name!r} is not available for {type(datamodule).__name__} (it has: auto, {have}, and fid for images)")
    return metric


METRICS = ("auto", "policy", "exposure_bias", "bpd", "fid", "digits_frechet", "sliced_w1")


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
@one_line_errors
def main(cfg: DictConfig) -> dict:
    check_known_keys(cfg, entry_keys("evaluate"), "evaluate")
    check_config(cfg, "evaluate")
    if cfg.metric not in METRICS:
        raise ConfigError(f"metric={cfg.metric!r} is not a metric: use one of {', '.join(METRICS)}")
    search = cfg.eps_scale_search
    if search is not None and (not OmegaConf.is_list(search) or not search or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in search)):
        raise ConfigError(f"eps_scale_search={search} must be a list of positive scales, e.g. eps_scale_search=[1.0,1.005,1.01]")
    # The result is written at the end: refuse an unwritable place before minutes of sampling are spent.
    if cfg.out and Path(cfg.out).expanduser().is_dir():
        raise ConfigError(f"out={cfg.out} is a directory; out= names the result's JSON file, e.g. out={Path(cfg.out) / 'result.json'}")
    writable_dir(Path(cfg.out).expanduser().parent if cfg.out else Path(cfg.ckpt_path).expanduser().resolve().parent.parent / "eval",
                 "out" if cfg.out else "the default out folder (<run>/eval); set out=")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if cfg.metric == "policy":
        return evaluate_policy_checkpoint(cfg, device)
    module, ckpt = load_module(cfg.ckpt_path, map_location=device)
    datamodule = instantiate_datamodule(module.run_config)
    if datamodule.data_kind == "trajectory" and cfg.metric == "auto":
        return evaluate_policy_checkpoint(cfg, device)
    if datamodule.data_kind == "trajectory":
        raise ConfigError(f"{cfg.ckpt_path} is a policy: score it with metric=policy (or metric=auto); metric={cfg.metric} needs "
                          "an unconditional generative model")
    guide = {"guide": load_guide(cfg.guide_ckpt, module, device)} if cfg.get("guide_ckpt") else {}  # autoguidance
    if cfg.metric != "bpd":  # bpd integrates the probability-flow ODE whatever the sampler
        module.check_sampling(cfg.sampler, steps=cfg.steps, **sampling_options(cfg), **guide,
                              **({"eps_scale": 1.0} if search else {}))
    if cfg.metric == "exposure_bias":
        return evaluate_exposure_bias(cfg, module, ckpt, datamodule, device)
    if cfg.metric == "bpd":
        result = {"checkpoint": str(cfg.ckpt_path), "global_step": int(ckpt.get("global_step", -1)),
                  **evaluate_bpd(module, datamodule, cfg, device), "device": device}
        return write_result(cfg, result)
    metric = make_metric(cfg.metric, datamodule, cfg, device)
    if cfg.eps_scale_search:
        from evaluation.eps_scale import search_eps_scale

        others = {k: v for k, v in sampling_options(cfg).items() if k != "eps_scale"}
        search = search_eps_scale(module, metric, cfg.eps_scale_search, cfg.num_samples or 2000, cfg.sampler, cfg.steps, cfg.seed,
                                  cfg.batch_size, **others)
        for scale, value in zip(search["scales"], search["values"]):
            print(f"eps_scale {scale:<8g} {metric.name} = {value:.4g}")
        result = {"checkpoint": str(cfg.ckpt_path), "metric": f"{metric.name}_eps_scale_search", "value": search["best_value"],
                  "floor": float(metric.floor(cfg.num_samples or 2000)), "num_samples": cfg.num_samples or 2000,
                  "sampler": cfg.sampler or module.sampler, "nfe": search["nfe"], "samples_per_second": 0.0,
                  "device": device, **search}
        return write_result(cfg, result)
    num_samples = cfg.num_samples or DEFAULT_NUM_SAMPLES.get(metric.name, 2000)
    sampler = cfg.sampler or getattr(module, "sampler", None)
    kwargs = {"sampler": cfg.sampler, "steps": cfg.steps, **sampling_options(cfg), **guide}
    labels, _, _ = requested_labels(None, num_samples, datamodule, cfg.ckpt_path)  # labelled: every class in turn
    cond = None if labels is None else one_hot(labels, datamodule.num_classes).to(device)
    if getattr(datamodule, "cond_kind", None) == "attributes":  # multi-label: the validation images' vectors in turn
        cond = sampling_cond(datamodule, num_samples)[1].to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    start = time.perf_counter()
    x, nfe = module.sample_many(num_samples, cfg.batch_size, generator, cond=cond, progress=cfg.progress, return_nfe=True, **kwargs)
    seconds = time.perf_counter() - start
    require_finite(x, f"the samples of sampler={sampler}", SAMPLER_DIVERGED)
    value = float(metric(x))
    result = {
        "checkpoint": str(cfg.ckpt_path),
        "global_step": int(ckpt.get("global_step", -1)),
        "metric": metric.name,
        "value": value,
        "floor": float(metric.floor(x.shape[0])),
        "num_samples": num_samples,
        "sampler": sampler,
        "steps": cfg.steps or getattr(module, "sample_steps", None),
        "nfe": nfe,
        "sampling_seconds": round(seconds, 3),
        "samples_per_second": round(num_samples / max(seconds, 1e-9), 2),
        "device": device,
    }
    if labels is not None:
        result.update(label_scores(datamodule, x, labels))
    return write_result(cfg, result)


def evaluate_exposure_bias(cfg: DictConfig, module, ckpt, datamodule, device: str) -> dict:
    """Exposure bias of the sampler on held-out data (Ning et al. 2024), with the quality figure beside it:
    a smaller variance gap alone can mean the samples collapsed."""
    from callbacks.exposure_bias import exposure_curve
    from difflab.pictures import save_png
    from lightning_modules.exposure_bias import measure_exposure_bias

    if not hasattr(module, "schedule"):
        raise ConfigError(f"metric=exposure_bias needs a DDPM-family checkpoint (ddpm, scheduled_sampling); this is a {type(module).__name__}")
    sampler = cfg.sampler or module.sampler
    x0 = held_out_data(datamodule, cfg.num_samples or 512).to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    fixes = sampling_options(cfg)
    ex = measure_exposure_bias(module, x0, sampler, cfg.steps, generator, batch_size=cfg.batch_size, **fixes)
    metric = datamodule.make_metric()
    quality = {}
    if metric is not None:
        x = module.sample_many(cfg.num_samples or 2000, cfg.batch_size, torch.Generator(device=device).manual_seed(cfg.seed),
                               sampler=cfg.sampler, steps=cfg.steps, **fixes)
        quality = {"quality_metric": metric.name, "quality": float(metric(x)), "quality_floor": float(metric.floor(x.shape[0]))}
    result = {
        "checkpoint": str(cfg.ckpt_path), "global_step": int(ckpt.get("global_step", -1)), "metric": "exposure_bias",
        "value": ex["delta_sum"], "floor": None, "sampler": sampler, "steps": cfg.steps or module.sample_steps, "nfe": ex["nfe"],
        "num_samples": int(x0.shape[0]), "mean_gap": ex["mean_gap"], "mean_ratio": ex["mean_ratio"], **fixes, **quality,
        "per_step": {k: ex[k].tolist() for k in ("t", "q_var", "sampler_var", "delta", "err_sampler", "err_forward",
                                                  "marginal_var_sampler", "marginal_var_forward")},
        "samples_per_second": 0.0, "device": device,
    }
    result = write_result(cfg, result)
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt_path).resolve().parent.parent / "eval" / f"{Path(cfg.ckpt_path).stem}_exposure_bias_{sampler}_{ex['nfe']:.0f}nfe{sampling_tag(cfg)}.json"
    save_png(exposure_curve(ex, f"{sampler}, {ex['nfe']} NFE"), out.with_suffix(".png"))
    if quality:
        print(f"quality beside it: {quality['quality_metric']} = {quality['quality']:.4g} (floor {quality['quality_floor']:.4g})")
    return result


def execution_tag(cfg: DictConfig) -> str:
    """A file-name suffix for a strategy or delay other than the default, so their results sit side by side."""
    if cfg.execution == "receding" and not cfg.inference_delay and not cfg.perturb:
        return ""
    extra = {"temporal_ensemble": f"_m{cfg.ensemble_m}", "bid": f"_n{cfg.bid_samples}"}.get(cfg.execution, "")
    pushed = f"_perturb{cfg.perturb}" if cfg.perturb else ""
    return f"_{cfg.execution}_delay{cfg.inference_delay}{extra}{pushed}"


def evaluate_policy_checkpoint(cfg: DictConfig, device: str) -> dict:
    """Closed-loop episodes: mean max-reward, success rate, length, NFE and latency per action chunk."""
    from envs.policy import load_policy
    from envs.runner import evaluate_policy

    fixes = sampling_options(cfg)
    execution = {"execution": cfg.execution, "inference_delay": cfg.inference_delay, "ensemble_m": cfg.ensemble_m,
                 "bid_samples": cfg.bid_samples, "bid_weak_ckpt": cfg.bid_weak_ckpt, "rtc_max_guidance": cfg.rtc_max_guidance}
    policy, datamodule = load_policy(cfg.ckpt_path, cfg.sampler, cfg.steps, cfg.n_action_steps, device, cfg.seed,
                                     execution=execution, **fixes)
    if cfg.perturb:
        policy.env_options = {"perturb": float(cfg.perturb)}
        policy.make_env().close()  # an environment without pushes refuses perturb= now, in one line
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt_path).resolve().parent.parent / "eval" / f"{Path(cfg.ckpt_path).stem}_policy_{policy.sampler or getattr(policy.module, 'sampler', 'default')}_{policy.nfe}nfe{sampling_tag(cfg)}{execution_tag(cfg)}.json"
    video_dir = out.parent / f"{out.stem}_videos" if cfg.render else None
    result = evaluate_policy(policy, cfg.num_episodes, cfg.first_seed, cfg.max_steps,
                             render_episodes=cfg.num_episodes if cfg.render else 0, video_dir=video_dir, progress=cfg.progress)
    result = {"checkpoint": str(cfg.ckpt_path), "global_step": policy.global_step, "metric": "policy", "device": device, **fixes, **result}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"policy: mean max-reward {result['mean_max_reward']:.4f}, success rate {result['success_rate']:.3f}, "
          f"mean length {result['mean_length']:.1f} over {result['num_episodes']} episodes (seeds {result['seeds'][0]}..{result['seeds'][1]}); "
          f"{result['sampler']} with {result['nfe']} NFE, {result['latency_per_chunk_s'] * 1000:.1f} ms per chunk on {device}; "
          f"{result['execution']} execution, inference delay {result['inference_delay']}, jerk {result['mean_jerk']:.4g} -> {out}")
    return result


def write_result(cfg: DictConfig, result: dict) -> dict:
    require_finite(result["value"], f"the figure {result['metric']}", SAMPLER_DIVERGED)
    guide = f"_guide-{Path(cfg.guide_ckpt).stem}" if cfg.get("guide_ckpt") else ""
    name = f"{Path(cfg.ckpt_path).stem}_{result['metric']}_{str(result['sampler']).split()[0]}_{result['nfe']:.0f}nfe{sampling_tag(cfg)}{guide}.json"
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt_path).resolve().parent.parent / "eval" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    floor = "n/a" if result["floor"] is None else f"{result['floor']:.4g}"
    accuracy = f", label accuracy {result['label_accuracy']:.4f}" if "label_accuracy" in result else ""
    print(f"{result['metric']} = {result['value']:.4g} (floor {floor}){accuracy} from {result['num_samples']} examples, "
          f"{result['sampler']} with {result['nfe']:.0f} NFE, {result['samples_per_second']} /s on {result['device']} -> {out}")
    return result


if __name__ == "__main__":
    refuse_training_groups("evaluate")
    main()
