"""Every file in configs/ composes and instantiates; wrong keys and groups fail with their names."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from conftest import CONFIG_DIR, run_cli
from lightning_modules.checkpoint import build_model


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_train(overrides: list[str], tmp_path: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def build(cfg):
    datamodule = instantiate(cfg.data)
    return datamodule, build_model(cfg, datamodule.data_shape, datamodule.cond_dim)


@pytest.mark.parametrize("data", options("data"))
def test_every_data_config_builds_a_datamodule_and_model(data, tmp_path):
    cfg = compose_train([f"data={data}"], tmp_path)
    datamodule, model = build(cfg)
    assert tuple(model.data_shape) == tuple(datamodule.data_shape)
    x = torch.zeros(2, *datamodule.data_shape)
    cond = None if datamodule.cond_dim is None else torch.zeros(2, datamodule.cond_dim)
    out = model.net(x, torch.zeros(2), cond)
    assert out.shape == x.shape


@pytest.mark.parametrize("net", options("net"))
@pytest.mark.parametrize("model", options("model"))
def test_every_model_and_net_config_instantiates(model, net, tmp_path):
    # A net sized for larger images is built on data of its size (the default digits are 8x8).
    data = {"unet_celeba64": ["data=celeba"], "unet1d_small": ["data=pusht"], "unet1d_paper": ["data=pusht"], "unet1d_tiny": ["data=pusht"]}.get(net, [])
    if model == "bc_mse":
        if net.startswith("unet_"):
            pytest.skip("bc_mse regresses action chunks (trajectory data); image UNets need images")
        data = ["data=obstacle2d"]
    cfg = compose_train([f"model={model}", f"net={net}", *data], tmp_path)
    _, module = build(cfg)
    optim = module.configure_optimizers()
    assert optim is not None


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_config_instantiates(trainer, tmp_path):
    cfg = compose_train([f"trainer={trainer}"], tmp_path)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip(f"trainer={trainer} needs a GPU (accelerator=gpu); composition was checked above")
    with open_dict(cfg):
        cfg.trainer.logger = False
    trainer_obj = instantiate(cfg.trainer)
    assert trainer_obj.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("group", ["callbacks", "logger"])
def test_callbacks_and_loggers_instantiate(group, tmp_path):
    for option in options(group):
        cfg = compose_train([f"{group}={option}"], tmp_path)
        for name, sub in (cfg.get(group) or {}).items():
            if "_target_" in sub:
                assert instantiate(sub) is not None, name


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_builds(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}"], tmp_path)
    _, module = build(cfg)
    assert sum(p.numel() for p in module.parameters()) > 0


def test_cifar10_ddpm_experiment_pins_the_paper_settings(tmp_path):
    cfg = compose_train(["experiment=cifar10_ddpm"], tmp_path)
    assert cfg.model.optimizer.lr == 2e-4 and cfg.model.scheduler.warmup_steps == 5000
    assert cfg.data.batch_size == 128 and cfg.callbacks.ema.decay == 0.9999
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.max_steps == 800_000
    _, module = build(cfg)
    assert 35.5e6 < sum(p.numel() for p in module.net.parameters()) < 35.9e6


def test_toy_data_switches_to_the_mlp_unless_the_user_picks_a_net(tmp_path):
    assert compose_train(["data=toy2d"], tmp_path).net._target_.endswith("MLP")
    assert compose_train(["data=toy2d", "net=unet_small"], tmp_path).net._target_.endswith("UNet")


@pytest.mark.slow
def test_misspelt_key_and_group_fail_at_start_naming_them():
    bad_key = run_cli("train.py", "model.optimizr.lr=1", check=False)
    assert bad_key.returncode != 0 and "optimizr" in bad_key.stderr
    bad_group = run_cli("train.py", "model=ddpx", check=False)
    assert bad_group.returncode != 0 and "ddpx" in bad_group.stderr and "ddpm" in bad_group.stderr


@pytest.mark.slow
def test_help_lists_the_config_groups():
    out = run_cli("train.py", "--help").stdout
    for group in ("model", "data", "trainer", "callbacks", "logger", "experiment", "net"):
        assert f"{group}:" in out, group
    assert "toy2d" in out and "cifar10_ddpm" in out


def test_slurm_launcher_config_sizes_the_job_from_the_trainer(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="optional extra: pip install -e '.[slurm]'")
    cfg = compose_train(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"], tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)


def test_speed_settings_apply_channels_last_and_compile_without_renaming_parameters(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from train import apply_speed_settings

    cfg = compose_train(["net.ch=16", "speed.channels_last=true", "speed.compile=true"], tmp_path)
    _, module = build(cfg)
    names = list(module.state_dict())
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    apply_speed_settings(cfg, module, trainer)
    conv = next(m for m in module.net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert module.net._compiled_call_impl is not None and list(module.state_dict()) == names
    graphs = compose_train(["net.ch=16", "speed.compile=reduce-overhead"], tmp_path)
    _, graphed = build(graphs)
    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw.get("mode")))
    apply_speed_settings(graphs, graphed, trainer)
    assert modes == ["reduce-overhead"]
    torch.set_float32_matmul_precision("highest")
    auto = compose_train(["net.ch=16"], tmp_path)
    _, plain = build(auto)
    apply_speed_settings(auto, plain, trainer)  # auto: channels_last only on a GPU
    conv = next(m for m in plain.net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels > 1)
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.set_float32_matmul_precision("highest")


def test_fused_optimizer_is_chosen_on_gpu_only_and_bf16_training_still_clips(tmp_path):
    """speed.fused_optimizer=auto fuses Adam only on a GPU; Lightning alone would refuse to clip its gradients."""
    from types import SimpleNamespace

    import lightning.pytorch as pl

    from train import apply_speed_settings

    cfg = compose_train(["net.ch=16", "data.batch_size=8"], tmp_path)
    _, module = build(cfg)
    cpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    apply_speed_settings(cfg, module, cpu)
    assert "fused" not in module.optimizer_factory.keywords
    gpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda")))
    apply_speed_settings(cfg, module, gpu)  # device type is all it reads: no GPU needed
    assert module.optimizer_factory.keywords["fused"] is True
    torch.set_float32_matmul_precision("highest")

    # Fused Adam runs on the CPU too, so the bf16 + fused + clip path is exercised here.
    clip, norms = 1e-3, []
    datamodule = instantiate(cfg.data)

    class RecordNorm(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            def post_hook(optimizer, *_):  # Lightning's closure runs inside step(): the grads exist only after it
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

            trainer.optimizers[0].register_step_post_hook(post_hook)

    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=3, gradient_clip_val=clip, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[RecordNorm()])
    trainer.fit(module, datamodule=datamodule)
    assert trainer.optimizers[0].defaults["fused"] is True
    assert len(norms) == 3 and max(norms) <= clip * 1.01
