"""Run from a checkout: builds tiny toy2d models from the checkout's configs, samples them, saves config + weights + samples."""
import sys, torch
from pathlib import Path
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
root = Path.cwd()
sys.path.insert(0, str(root))
from lightning_modules.checkpoint import build_model

CASES = {
    "ddpm": ["model=ddpm", "model.num_timesteps=50", "model.sample_steps=7", "model.eta=0.5", "model.ddim_spacing=quadratic"],
    "ddpm_eps": ["model=ddpm", "model.num_timesteps=50", "model.sample_steps=5", "model.eps_scale=1.05", "model.eps_scale_schedule=linear", "model.eps_scale_slope=0.001"],
    "edm": ["model=edm", "model.sample_steps=5", "model.s_churn=10"],
    "ncsn": ["model=ncsn", "model.num_scales=4", "model.n_steps_each=3", "model.step_lr=1e-5"],
    "vpsde": ["model=vpsde", "model.sample_steps=5", "model.snr=0.1"],
    "flow": ["model=flow_matching", "model.sample_steps=4"],
    "ict": ["model=consistency_training", "model.sample_steps=2", "model.init_noise_scale=0.5", "model.total_steps=10"],
}
out = {}
with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
    for name, overrides in CASES.items():
        cfg = compose(config_name="train", overrides=["data=toy2d", "net.hidden=16", "net.depth=2", *overrides])
        torch.manual_seed(0)
        model = build_model(cfg, (2,), None).eval()
        config = {"model": OmegaConf.to_container(cfg.model, resolve=True), "net": OmegaConf.to_container(cfg.net, resolve=True)}
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            x = model.sample(6, generator=g)
        out[name] = {"config": config, "state_dict": {k: v.clone() for k, v in model.state_dict().items()}, "samples": x}
        print(name, model.sampler, model.sample_steps, x[0].tolist())
torch.save(out, sys.argv[1])
