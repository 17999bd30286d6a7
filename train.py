"""Train any method on any dataset: `python train.py [model=...] [data=...] [key=value ...]`.

`python train.py --help` lists the config groups; see README.md for examples.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
import lightning.pytorch as pl
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from callbacks.periodic import SMOKE_EPISODE_STEPS, SMOKE_SAMPLES
from callbacks.sample_logger import log_image
from datamodules.base import balanced_labels, label_scores, one_hot, sampling_cond
from difflab.pictures import save_png
from difflab.checkpoint_io import SafeCheckpointIO
from difflab.cli import one_line_errors, print_error, refuse_moved_sampling_keys, resume_command
from difflab.config_checks import check_config
from difflab.errors import SAMPLER_DIVERGED, MissingFileError, require_finite
from lightning_modules.checkpoint import build_model, check_compatible, flat_settings, read_checkpoint

log = logging.getLogger("train")


def _instantiate_all(group: DictConfig | None) -> list:
    # Entries without _target_ are settings a data config adjusted for a callback that is not selected.
    return [instantiate(c) for c in (group or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def cpu_threads(setting, processes_per_node: int = 1) -> int | None:
    """Torch threads for training on a CPU; None leaves torch's own choice (OMP_NUM_THREADS set by the user).

    auto: on 2 cores, 2 threads train 1.45x faster than 1 on an idle machine but 3.3x to 11x slower as soon as one
    other process is busy (benchmarks/cpu_threads.py, RESULTS.md), so 1 thread there; with more cores per
    process, all but one, leaving a core to the loader, the logger and whatever else runs."""
    if setting != "auto":
        return int(setting)
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(processes_per_node, 1)
    return 1 if per_process <= 2 else per_process - 1


def apply_speed_settings(cfg: DictConfig, model, trainer: pl.Trainer) -> None:
    """CPU threads, TF32, channels_last, a fused optimizer step and torch.compile: each changes results only within
    rounding."""
    on_gpu = trainer.strategy.root_device.type == "cuda"
    if not on_gpu:
        threads = cpu_threads(cfg.speed.get("cpu_threads", "auto"), trainer.num_devices)
        if threads is not None:
            torch.set_num_threads(threads)
    torch.set_float32_matmul_precision(cfg.speed.matmul_precision)
    torch.backends.cudnn.allow_tf32 = cfg.speed.matmul_precision != "highest"
    image_net = len(model.data_shape) == 3
    channels_last = (on_gpu and image_net) if cfg.speed.channels_last == "auto" else bool(cfg.speed.channels_last)
    if channels_last and image_net:
        model.net.to(memory_format=torch.channels_last)
    fused = on_gpu if cfg.speed.get("fused_optimizer", "auto") == "auto" else bool(cfg.speed.fused_optimizer)
    factory = model.optimizer_factory
    if fused and "fused" in inspect.signature(getattr(factory, "func", factory)).parameters:
        model.optimizer_factory = functools.partial(factory, fused=True)  # one kernel for all parameters
    if cfg.speed.compile:  # true, or a torch.compile mode: reduce-overhead (CUDA graphs), max-autotune, ...
        model.net.compile(mode=None if cfg.speed.compile is True else str(cfg.speed.compile))  # in place: parameter names, checkpoints and EMA stay those of the plain net


def final_policy_evaluation(cfg: DictConfig, module, datamodule, trainer: pl.Trainer, out_dir: Path) -> dict:
    """Closed-loop episodes of the final EMA policy: the paper's scores in metrics.json, one episode as a GIF."""
    from envs.policy import Policy
    from envs.runner import evaluate_policy

    module = module.to(trainer.strategy.root_device).eval()
    smoke = bool(trainer.fast_dev_run)  # a config check: one short episode with the cheapest sampler
    skipped = ("data.task is empty: the data have no simulator here" if not datamodule.task else
               "final_eval.num_episodes=0" if cfg.final_eval.num_episodes == 0 and not smoke else None)
    if skipped:
        val_loss = trainer.callback_metrics.get("val/loss")
        result = {"global_step": trainer.global_step, "metric": "val/loss", "value": None if val_loss is None else float(val_loss),
                  "closed_loop": f"skipped ({skipped})", "samples_png": "-", "sampler": cfg.final_eval.sampler,
                  "nfe": module.nfe(cfg.final_eval.sampler, cfg.final_eval.steps)}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        for logger in trainer.loggers:
            logger.finalize("success")
        return result
    sampling = dict(module.quick_sampling) if smoke else {"sampler": cfg.final_eval.sampler, "steps": cfg.final_eval.steps}
    policy = Policy.from_datamodule(module, datamodule, seed=cfg.final_eval.seed, **sampling)
    result = evaluate_policy(policy, 1 if smoke else cfg.final_eval.num_episodes, cfg.final_eval.seed,
                             SMOKE_EPISODE_STEPS if smoke else None, render_episodes=1, video_dir=out_dir)
    result.update(global_step=trainer.global_step, metric="mean_max_reward", value=result["mean_max_reward"])
    result["samples_png"] = result.pop("videos", ["-"])[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    for logger in trainer.loggers:
        logger.log_metrics({"final/mean_max_reward": result["mean_max_reward"], "final/success_rate": result["success_rate"]}, step=trainer.global_step)
        logger.finalize("success")
    return result


def final_evaluation(cfg: DictConfig, module, datamodule, trainer: pl.Trainer, out_dir: Path) -> dict:
    """Samples from the final EMA weights: PNG, .npz in data space and the quality figure in metrics.json."""
    if datamodule.data_kind == "trajectory":
        return final_policy_evaluation(cfg, module, datamodule, trainer, out_dir)
    module.eval()
    sampler, steps = cfg.final_eval.sampler, cfg.final_eval.steps
    num_samples = cfg.final_eval.num_samples
    if trainer.fast_dev_run:  # a config check: a handful of samples with the cheapest sampler
        sampler, steps = module.quick_sampling.get("sampler"), module.quick_sampling.get("steps")
        num_samples = min(num_samples, SMOKE_SAMPLES)
    start = time.perf_counter()
    module = module.to(trainer.strategy.root_device)
    generator = torch.Generator(device=module.device).manual_seed(cfg.final_eval.seed)
    labels, cond, layout = None, None, {}
    if getattr(datamodule, "cond_kind", None) == "labels":  # every class equally often; a grid with a column per class
        labels = balanced_labels(num_samples, datamodule.num_classes)
        cond, layout = one_hot(labels, datamodule.num_classes).to(module.device), {"nrow": datamodule.num_classes}
    elif getattr(datamodule, "cond_kind", None) == "attributes":  # multi-label: the validation images' vectors in turn
        cond = sampling_cond(datamodule, num_samples)[1].to(module.device)
    x, nfe = module.sample_many(num_samples, 1024, generator, cond=cond, sampler=sampler, steps=steps, return_nfe=True)
    seconds = time.perf_counter() - start
    kept = (f"the run's checkpoints are kept; {SAMPLER_DIVERGED}, e.g. with "
            f"python evaluate.py ckpt_path={getattr(trainer.checkpoint_callback, 'last_model_path', '') or '<run>/checkpoints/last.ckpt'}")
    require_finite(x, f"the final samples (sampler={sampler or module.sampler})", kept)
    out_dir.mkdir(parents=True, exist_ok=True)
    if datamodule.data_kind != "image":  # a scatter of every sample, coloured by class where labelled
        shown, layout = x, ({"labels": labels} if labels is not None else {})
    else:
        shown = x[: 64 - 64 % datamodule.num_classes] if labels is not None else x[:64]
    image = datamodule.render(shown, **layout)
    png = save_png(image, out_dir / "samples.png")
    np.savez_compressed(out_dir / "samples.npz", samples=datamodule.unnormalize(x).numpy())
    result = {
        "num_samples": int(x.shape[0]),
        "sampler": sampler or getattr(module, "sampler", None),
        "steps": steps or getattr(module, "sample_steps", None),
        "nfe": nfe,
        "sampling_seconds": round(seconds, 3),
        "global_step": trainer.global_step,
        "samples_png": str(png),
    }
    try:
        metric = datamodule.make_metric()
    except MissingFileError as err:  # e.g. FID's Inception weights offline: the run's samples still count
        metric = None
        result["metric_skipped"] = " ".join(str(err).split())
        log.warning(f"final quality figure skipped: {result['metric_skipped']}")
    if labels is not None:
        result.update(label_scores(datamodule, x, labels))
    if metric is not None:
        result["metric"] = metric.name
        result["value"] = float(metric(x))
        require_finite(result["value"], f"the final {metric.name}", kept)
        result["floor"] = float(metric.floor(x.shape[0]))
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    log_image(trainer, "final/samples", image, trainer.global_step)
    for logger in trainer.loggers:
        if "value" in result:
            logger.log_metrics({f"final/{result['metric']}": result["value"], f"final/{result['metric']}_floor": result["floor"]}, step=trainer.global_step)
        logger.finalize("success")
    return result


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> dict | None:
    check_config(cfg, "train")
    if cfg.model.get("cond_drop", None) is None:  # resolved before the resume check compares it with the checkpoint's
        with open_dict(cfg):
            cfg.model.cond_drop = 0.1 if cfg.data.get("labels") else 0.0
    if cfg.ckpt_path:  # before any data or net is built: a wrong path or another run's checkpoint fails at once
        check_compatible(read_checkpoint(cfg.ckpt_path), cfg, cfg.ckpt_path)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule.data_shape, datamodule.cond_dim, getattr(datamodule, "obs_spec", None))
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    n_params = sum(p.numel() for p in model.net.parameters())
    encoder = "" if model.obs_encoder is None else (
        f" and an observation encoder of {sum(p.numel() for p in model.obs_encoder.parameters()) / 1e6:.2f}M")
    log.info(f"{type(model).__name__} with {type(model.net).__name__}: {n_params / 1e6:.2f}M parameters{encoder}; data shape {datamodule.data_shape}")

    out_dir = Path(cfg.paths.output_dir)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=_instantiate_all(cfg.get("callbacks")), logger=_instantiate_all(cfg.get("logger")) or False,
                                      plugins=[SafeCheckpointIO()])
    apply_speed_settings(cfg, model, trainer)
    for logger in trainer.loggers:
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_settings(model.run_config).items()}
        logger.log_hyperparams({**hparams, "net.num_params": n_params})

    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except SIGTERMException:  # Lightning's own stop after SIGTERM; the checkpoint callback saved in its on_exception
        pass
    train_seconds = time.perf_counter() - start
    ckpt_cb = trainer.checkpoint_callback
    if getattr(ckpt_cb, "interrupted", None):
        stop_after_interrupt(ckpt_cb, trainer)
    model.check_diverged()
    if not trainer.is_global_zero:
        return None

    result = final_evaluation(cfg, model, datamodule, trainer, out_dir / "final")
    result["train_seconds"] = round(train_seconds, 1)
    train_loss = trainer.callback_metrics.get("train/loss")
    result["final_train_loss"] = float(train_loss) if train_loss is not None else None
    (out_dir / "final" / "metrics.json").write_text(json.dumps(result, indent=2))

    lines = [
        f"Run directory:  {out_dir}",
        f"Checkpoints:    {ckpt_cb.last_model_path or '-'} (last), {ckpt_cb.best_model_path or '-'} (best {ckpt_cb.monitor})" if ckpt_cb else "Checkpoints:    none (no ModelCheckpoint callback)",
        f"Samples:        {result['samples_png']} ({result['sampler']}, {result['nfe']} NFE)",
    ]
    if "success_rate" in result:
        lines[-1] = f"Rollout GIF:    {result['samples_png']} ({result['sampler']}, {result['nfe']} NFE per chunk)"
        lines.append(f"Policy:         mean max-reward {result['mean_max_reward']:.3f}, success {result['success_rate']:.2f} "
                     f"over {result['num_episodes']} episodes (seeds {result['seeds'][0]}..{result['seeds'][1]}), "
                     f"{result['latency_per_chunk_s'] * 1000:.1f} ms per chunk")
    elif "closed_loop" in result:
        lines[-1] = f"Policy:         no closed-loop evaluation: {result['closed_loop']}; final val/loss {result['value']}"
    elif "value" in result:
        lines.append(f"Quality:        {result['metric']} = {result['value']:.4g} (floor {result['floor']:.4g}, {result['num_samples']} samples)"
                     + (f"; label accuracy {result['label_accuracy']:.3f}" if "label_accuracy" in result else ""))
    elif "metric_skipped" in result:
        lines.append(f"Quality:        skipped ({result['metric_skipped'][:160]}...)")
    lines += [f"Metrics:        {out_dir / 'final' / 'metrics.json'}", f"TensorBoard:    tensorboard --logdir {out_dir}"]
    print("\n" + "\n".join(lines))
    return result


def stop_after_interrupt(ckpt_cb, trainer: pl.Trainer) -> None:
    """After Ctrl-C or SIGTERM: say where the checkpoint is and how to resume; exit 130 (SIGINT) or 143 (SIGTERM)."""
    code = 143 if ckpt_cb.interrupted == "SIGTERM" else 130
    if trainer.is_global_zero:
        saved = ckpt_cb.interrupt_path or ckpt_cb.last_model_path
        if saved and Path(saved).is_file():
            print(f"\nInterrupted ({ckpt_cb.interrupted}) at step {trainer.global_step}; saved {saved}\n"
                  f"Resume with:  {resume_command(saved, trainer.default_root_dir)}", file=sys.stderr, flush=True)
        elif trainer.fast_dev_run or not ckpt_cb.save_last:
            print_error(f"interrupted ({ckpt_cb.interrupted}) at step {trainer.global_step}; no checkpoint was saved "
                        f"({'fast_dev_run writes none' if trainer.fast_dev_run else 'callbacks.model_checkpoint.save_last is off'})")
        else:
            print_error(f"interrupted ({ckpt_cb.interrupted}) at step {trainer.global_step}, before any checkpoint was written")
    sys.exit(code)


if __name__ == "__main__":
    refuse_moved_sampling_keys()
    main()
