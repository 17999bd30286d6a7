"""Every file in configs/ composes and instantiates; wrong keys and groups fail with their names."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, get_class
from omegaconf import open_dict

from conftest import CONFIG_DIR, run_cli
from lightning_modules.checkpoint import method_settings, build_model, build_obs_encoder
from test_policy import METHOD_DATA  # the data settings a method needs beyond a data config's defaults


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


def build(cfg, meta: bool = False):
    """The datamodule and the method; meta=True builds the net's parameters on the meta device (shapes only, no
    memory or init time: the experiment nets are 4.6M-71M parameters each)."""
    datamodule = instantiate(cfg.data)
    spec = getattr(datamodule, "obs_spec", None)
    if not meta or getattr(get_class(cfg.model._target_), "owns_net", False):  # a method's own net is small
        return datamodule, build_model(cfg, datamodule.data_shape, datamodule.cond_dim, spec)
    shape = tuple(int(d) for d in datamodule.data_shape)
    with torch.device("meta"):
        encoder = build_obs_encoder(cfg, spec)
        cond_dim = datamodule.cond_dim if encoder is None else encoder.out_dim
        net = instantiate(cfg.net, data_shape=shape, cond_dim=cond_dim)
    method, cond_drop = method_settings(cfg)
    model = instantiate(method, net=net, data_shape=shape, cond_dim=cond_dim)
    model.enable_cond_drop(cond_drop)
    return datamodule, model


@pytest.mark.parametrize("data", options("data"))
def test_every_data_config_builds_a_datamodule_and_model(data, tmp_path):
    extra = []
    if data == "lerobot":  # a folder in LeRobot's layout; the config's defaults name LeRobot's Push-T features
        pytest.importorskip("pyarrow")
        pytest.importorskip("av")
        from lerobot_layout import write_lerobot
        from test_lerobot_data import episodes

        extra = [f"data.root={write_lerobot(tmp_path / 'lerobot', episodes((20, 20)))}"]
    cfg = compose_train([f"data={data}", *extra], tmp_path)
    datamodule, model = build(cfg)
    assert tuple(model.data_shape) == tuple(datamodule.data_shape)
    x = torch.zeros(2, *datamodule.data_shape)
    cond = None if model.cond_dim is None else torch.zeros(2, model.cond_dim)
    out = model.net(x, torch.zeros(2), cond)
    assert out.shape == x.shape


@pytest.mark.parametrize("net", options("net"))
@pytest.mark.parametrize("model", options("model"))
def test_every_model_and_net_config_instantiates(model, net, tmp_path):
    # A net sized for larger images is built on data of its size (the default digits are 8x8).
    data = {"unet_celeba64": ["data=celeba"], "unet1d_small": ["data=pusht"], "unet1d_paper": ["data=pusht"], "unet1d_tiny": ["data=pusht"],
            "transformer1d": ["data=pusht"], "transformer1d_small": ["data=pusht"]}.get(net, [])
    if model in ("bc_mse", "vae_policy"):  # methods that need trajectory data
        if net.startswith("unet_"):
            pytest.skip(f"{model} models action chunks (trajectory data); image UNets need images")
        data = ["data=obstacle2d"]
    if model in METHOD_DATA:  # these build their own net from model.* (owns_net)
        if net != "mlp":
            pytest.skip(f"{model} builds its own net: net= does not apply (checked once, with net=mlp)")
        data = ["data=obstacle2d", *METHOD_DATA[model]]
    cfg = compose_train([f"model={model}", f"net={net}", *data], tmp_path)
    _, module = build(cfg, meta=True)
    optim = module.configure_optimizers()
    optimizer = optim["optimizer"] if isinstance(optim, dict) else optim
    assert isinstance(optimizer, torch.optim.Optimizer) and optimizer.defaults["lr"] == cfg.model.optimizer.lr
    # every trainable parameter is optimised (frozen copies ride along without gradients: a consistency target net)
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in module.parameters() if p.requires_grad} <= optimised and {id(p) for p in module.net.parameters()} <= optimised


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


# The published settings each experiment pins (key: value), with their sources; a changed value must be a
# deliberate change of this table too. Parameter counts are of the project's nets at those settings.
PAPER = {
    "cifar10_ddpm": {  # Ho et al. 2020, Appendix B
        "model.num_timesteps": 1000, "model.schedule": "linear", "model.beta_start": 1e-4, "model.beta_end": 0.02,
        "model.prediction": "eps", "model.optimizer.lr": 2e-4, "model.scheduler.warmup_steps": 5000, "data.batch_size": 128,
        "callbacks.ema.decay": 0.9999, "trainer.gradient_clip_val": 1.0, "trainer.max_steps": 800_000, "net.dropout": 0.1,
        "net.ch": 128, "net.ch_mult": [1, 2, 2, 2], "net.num_res_blocks": 2, "net.attn_resolutions": [16], "data.random_flip": True,
    },
    "cifar10_ncsn": {  # Song & Ermon 2019, Section 5 and Appendix B
        "model.sigma_max": 1.0, "model.sigma_min": 0.01, "model.num_scales": 10, "model.sampling.steps": 100,
        "model.sampling.options.step_lr": 2e-5, "model.denoise": False, "model.optimizer.lr": 1e-3, "data.batch_size": 128,
        "trainer.max_steps": 200_000, "callbacks.ema": None,
    },
    "cifar10_ncsnv2": {  # Song & Ermon 2020, Table / Appendix: sigma_1 = 50, L = 232, T = 5, eps = 6.2e-6, EMA 0.999
        "model.sigma_max": 50.0, "model.sigma_min": 0.01, "model.num_scales": 232, "model.sampling.steps": 5,
        "model.sampling.options.step_lr": 6.2e-6, "model.denoise": True, "model.parametrization": "v2", "model.optimizer.lr": 1e-4,
        "data.batch_size": 128, "trainer.max_steps": 300_000, "callbacks.ema.decay": 0.999,
    },
    "cifar10_vesde": {  # Song et al. 2021 (NCSN++ cont.), Appendix H: sigma 0.01 -> 50, PC with snr 0.16, N = 1000
        "model.sde": "ve", "model.sigma_min": 0.01, "model.sigma_max": 50.0, "model.eps": 1e-5, "model.sampling.sampler": "pc",
        "model.sampling.steps": 1000, "model.predictor": "reverse_diffusion", "model.corrector": "langevin", "model.sampling.options.snr": 0.16,
        "model.sampling.options.n_corrector_steps": 1, "model.optimizer.lr": 2e-4, "model.scheduler.warmup_steps": 5000, "data.batch_size": 128,
        "trainer.max_steps": 1_300_000, "trainer.gradient_clip_val": 1.0, "callbacks.ema.decay": 0.999, "net.num_res_blocks": 4,
    },
    "cifar10_vpsde": {  # Song et al. 2021 (DDPM++ cont.): beta 0.1 -> 20, EM predictor, no corrector, EMA 0.9999
        "model.sde": "vp", "model.beta_min": 0.1, "model.beta_max": 20.0, "model.eps": 1e-5, "model.sample_eps": 1e-3,
        "model.predictor": "euler_maruyama", "model.corrector": "none", "model.sampling.steps": 1000, "model.optimizer.lr": 2e-4,
        "model.scheduler.warmup_steps": 5000, "data.batch_size": 128, "trainer.max_steps": 1_300_000,
        "trainer.gradient_clip_val": 1.0, "callbacks.ema.decay": 0.9999, "net.num_res_blocks": 4,
    },
    "cifar10_edm": {  # Karras et al. 2022, Table 1 and Appendix F (CIFAR-10, VP-sized net, 200 Mimg at batch 512)
        "model.sigma_data": 0.5, "model.p_mean": -1.2, "model.p_std": 1.2, "model.sampling.steps": 18, "model.sigma_min": 0.002,
        "model.sigma_max": 80.0, "model.rho": 7.0, "model.optimizer.lr": 1e-3, "data.batch_size": 512, "trainer.max_steps": 390_000,
        "net.dropout": 0.13, "model.scheduler.warmup_steps": 20_000, "callbacks.ema.decay": 0.99965,
    },
    "cifar10_cd": {  # Song et al. 2023 (CD on CIFAR-10): N = 18, mu = 0, Adam 4e-4, batch 512, 800k; l2 as LPIPS is unavailable
        "model._target_": "lightning_modules.consistency_distillation.ConsistencyDistillation", "model.num_scales": 18, "model.mu": 0.0, "model.loss": "l2", "model.sigma_min": 0.002,
        "model.sigma_max": 80.0, "model.sigma_data": 0.5, "model.rho": 7.0, "model.optimizer.lr": 4e-4, "data.batch_size": 512,
        "trainer.max_steps": 800_000, "callbacks.ema.decay": 0.9999, "model.cm_sigmas": [80.0, 0.661],
    },
    "cifar10_ict": {  # Song & Dhariwal 2023 (iCT): s0 = 10, s1 = 1280, P_mean -1.1, P_std 2.0, pseudo-Huber, dropout 0.3
        "model._target_": "lightning_modules.consistency_training.ConsistencyTraining", "model.s0": 10, "model.s1": 1280, "model.p_mean": -1.1, "model.p_std": 2.0,
        "model.loss": "pseudo_huber", "model.optimizer.lr": 1e-4, "data.batch_size": 1024, "trainer.max_steps": 400_000,
        "net.dropout": 0.3, "callbacks.ema.decay": 0.99993, "model.cm_sigmas": [80.0, 0.821],
    },
    "pusht_ddpm": {  # Chi et al. 2023 (state-based CNN): T = 100, squared cosine, eps, AdamW 1e-4 / 1e-6, horizon 16, 2 obs, 8 actions
        "model.num_timesteps": 100, "model.schedule": "cosine", "model.prediction": "eps", "model.optimizer._target_": "torch.optim.AdamW",
        "model.optimizer.lr": 1e-4, "model.optimizer.weight_decay": 1e-6, "data.horizon": 16, "data.n_obs_steps": 2,
        "data.n_action_steps": 8, "data.obs_keys": ["keypoint", "agent_pos"], "model.scheduler.warmup_steps": 500,
    },
    "pusht_image": {  # Chi et al. 2023 (image-based CNN): frames + agent_pos, ResNet-18 with GroupNorm, spatial softmax 32, 64 features, 84 crop
        "model.num_timesteps": 100, "model.schedule": "cosine", "model.prediction": "eps", "model.optimizer.lr": 1e-4,
        "data.horizon": 16, "data.n_obs_steps": 2, "data.n_action_steps": 8, "data.obs_keys": ["image", "agent_pos"],
        "obs_encoder._target_": "lightning_modules.nets.obs_encoder.ObsEncoder", "obs_encoder.backbone": "resnet18",
        "obs_encoder.crop": 84, "obs_encoder.num_kp": 32, "obs_encoder.feature_dim": 64,
    },
    "pusht_bc_mse": {"model.optimizer.lr": 1e-4, "model.optimizer.weight_decay": 1e-6, "data.horizon": 16, "data.n_obs_steps": 2},
    "pusht_consistency": {"model._target_": "lightning_modules.consistency_distillation.ConsistencyDistillation", "model.sampling.steps": 1,
                          "model.sampling.options.init_noise_scale": 0.5, "data.horizon": 16, "data.n_obs_steps": 2},
    "pusht_edm": {  # pusht_ddpm's protocol with EDM's preconditioning (the consistency policies' teacher): Heun-10 = 19 NFE
        "model._target_": "lightning_modules.edm.EDM", "model.sampling.sampler": "heun", "model.sampling.steps": 10,
        "model.optimizer._target_": "torch.optim.AdamW", "model.optimizer.lr": 1e-4, "model.optimizer.weight_decay": 1e-6,
        "model.scheduler.warmup_steps": 500, "data.horizon": 16, "data.n_obs_steps": 2, "data.n_action_steps": 8,
        "trainer.max_steps": 10000, "callbacks.ema.decay": 0.9999,
    },
    "pusht_ect": {  # ECT (Geng et al. 2024) from pusht_edm: lr 1e-4, one step, 8 stages of q = 2
        "model._target_": "lightning_modules.consistency_tuning.ConsistencyTuning", "model.sampling.steps": 1,
        "model.optimizer.lr": 1e-4, "model.q": 2.0, "model.num_stages": 8, "model.loss": None, "model.sampling.options.init_noise_scale": 0.5, "data.horizon": 16,
        "data.n_obs_steps": 2,
    },
    "pusht_ddpm_transformer": {  # DP-T, state-based: pusht_ddpm's DDPM on the transformer, AdamW 1e-4 / 0.1, betas (0.9, 0.95), warm-up 1000
        "model._target_": "lightning_modules.ddpm.DDPM", "net._target_": "lightning_modules.nets.transformer1d.TransformerForDiffusion1D",
        "model.num_timesteps": 100, "model.schedule": "cosine", "model.prediction": "eps", "model.optimizer.lr": 1e-4,
        "model.optimizer.weight_decay": 0.1, "model.optimizer.betas": [0.9, 0.95], "model.scheduler.warmup_steps": 1000,
        "data.horizon": 16, "data.n_obs_steps": 2, "data.n_action_steps": 8, "net.causal_attn": True,
    },
    "pusht_lstm_gmm": {  # robomimic BC-RNN-GMM as Diffusion Policy ran it: LSTM 2 x 400, 5 modes, Adam 1e-4, batch 256, horizon 10, 1 action
        "model._target_": "lightning_modules.lstm_gmm.LSTMGMM", "model.hidden": 400, "model.num_layers": 2, "model.num_modes": 5,
        "model.min_std": 1e-4, "model.low_noise_eval": True, "model.optimizer._target_": "torch.optim.Adam", "model.optimizer.lr": 1e-4,
        "data.horizon": 10, "data.n_action_steps": 1, "data.batch_size": 256,
    },
    "pusht_bet": {  # BET as Diffusion Policy ran it: 24 bins, minGPT 4 x 4 x 72, dropout 0.1, focal gamma 2, window 3, AdamW 1e-4 / 0.1
        "model._target_": "lightning_modules.bet.BET", "model.n_bins": 24, "model.n_layer": 4, "model.n_head": 4, "model.n_embd": 72,
        "model.dropout": 0.1, "model.focal_gamma": 2.0, "model.optimizer.lr": 1e-4, "model.optimizer.weight_decay": 0.1,
        "data.horizon": 3, "data.n_obs_steps": 3, "data.n_action_steps": 1,
    },
    "pusht_vae": {  # an ACT-style CVAE on pusht_ddpm's data: z ~ N(0, I) of 32 dims, AdamW 1e-4 / 1e-4 (ACT's)
        "model._target_": "lightning_modules.vae_policy.VAEPolicy", "model.latent_dim": 32, "model.optimizer.lr": 1e-4,
        "model.optimizer.weight_decay": 1e-4, "data.horizon": 16, "data.n_obs_steps": 2, "data.n_action_steps": 8,
    },
    "pusht_flow": {  # pusht_ddpm's protocol with the flow-matching objective: same data, net, optimizer, EMA and steps
        "model._target_": "lightning_modules.flow_matching.FlowMatching", "model.time_sampling": "logit_normal",
        "model.sampling.sampler": "euler", "model.sampling.steps": 10, "model.optimizer._target_": "torch.optim.AdamW",
        "model.optimizer.lr": 1e-4, "model.optimizer.weight_decay": 1e-6, "data.horizon": 16, "data.n_obs_steps": 2,
        "data.n_action_steps": 8, "model.scheduler.warmup_steps": 500, "trainer.max_steps": 8000, "callbacks.ema.decay": 0.9999,
    },
    "pusht_mean_flow": {  # pusht_flow's protocol with MeanFlow's objective, 1 NFE per chunk
        "model._target_": "lightning_modules.mean_flow.MeanFlow", "model.ratio_r_neq_t": 0.25, "model.jvp": "exact",
        "model.sampling.sampler": "mean_flow", "model.sampling.steps": 1, "model.optimizer.lr": 1e-4,
        "data.horizon": 16, "data.n_obs_steps": 2, "data.n_action_steps": 8, "trainer.max_steps": 8000,
    },
}
NET_PARAMS = {"cifar10_ddpm": (35.5e6, 35.9e6), "cifar10_vesde": (58.5e6, 58.9e6), "pusht_ddpm": (4.4e6, 4.7e6),
              "pusht_flow": (4.4e6, 4.7e6), "pusht_edm": (4.4e6, 4.7e6), "pusht_ect": (4.4e6, 4.7e6),
              "pusht_ddpm_transformer": (1.1e6, 1.3e6), "pusht_lstm_gmm": (1.8e6, 2.0e6)}


def test_every_experiment_has_its_paper_settings_pinned():
    assert sorted(PAPER) == options("experiment")


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_pins_the_paper_settings_and_builds(experiment, tmp_path):
    from omegaconf import OmegaConf

    cfg = compose_train([f"experiment={experiment}"], tmp_path)
    for key, value in PAPER[experiment].items():
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == value, f"{experiment}: {key} = {got!r}, the paper's is {value!r}"
    _, module = build(cfg, meta=True)
    n = sum(p.numel() for p in module.net.parameters())
    low, high = NET_PARAMS.get(experiment, (1, float("inf")))
    assert low < n < high, n


def test_toy_data_switches_to_the_mlp_unless_the_user_picks_a_net(tmp_path):
    assert compose_train(["data=toy2d"], tmp_path).net._target_.endswith("MLP")
    assert compose_train(["data=toy2d", "net=unet_small"], tmp_path).net._target_.endswith("UNet")


def test_tuned_defaults_apply_to_their_method_and_dataset_only(tmp_path):
    """configs/tuned/<model>_<data>.yaml is optional in the defaults list, so a misnamed file would be skipped in
    silence: every file must name a real pair, and it must change that pair's config and no other."""
    models = {p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")}
    datas = {p.stem for p in (CONFIG_DIR / "data").glob("*.yaml")}
    tuned = sorted(p.stem for p in (CONFIG_DIR / "tuned").glob("*.yaml"))
    assert "ddpm_digits" in tuned
    for name in tuned:
        assert any(name == f"{m}_{d}" for m in models for d in datas), f"configs/tuned/{name}.yaml names no model_data pair"
    default = compose_train([], tmp_path).model
    assert (default.sampling.sampler, default.sampling.steps, default.sampling.options.ddim_spacing) == ("dpmpp_2m", 10, "quadratic")
    toy = compose_train(["data=toy2d"], tmp_path).model
    assert (toy.sampling.sampler, toy.sampling.steps, toy.sampling.options.ddim_spacing) == ("ddim", 50, "uniform")
    assert compose_train(["experiment=pusht_ddpm"], tmp_path).model.sampling.sampler == "ddim"


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
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), num_devices=1)
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
    cpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), num_devices=1)
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
