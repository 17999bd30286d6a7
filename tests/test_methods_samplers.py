"""The methods x samplers table: every registry sampler on every method, each cell run on an exact denoiser.

Each method's `denoise` is replaced by the exact VE-form denoiser of a 2-D Gaussian mixture (a consistency model's
by the exact consistency function of a Gaussian), so a cell measures the method's grid, prior and options with the
sampler, not a net. A defined cell must reproduce the data: its sliced W1 to a reference set stays within a bound
set by the floor of true samples of the same size plus the sampler's own discretisation allowance at that step
count. An undefined cell must be refused with a reason. `python tests/test_methods_samplers.py` prints the README's
table from the same cells.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import samplers
from difflab.errors import ConfigError
from evaluation.sliced_wasserstein import sliced_wasserstein
from lightning_modules.analytic import GaussianMixture
from lightning_modules.bc_mse import BCMSE
from lightning_modules.consistency_training import ConsistencyTraining
from lightning_modules.ddpm import DDPM
from lightning_modules.edm import EDM
from lightning_modules.flow_matching import FlowMatching
from lightning_modules.ncsn import NCSN
from lightning_modules.nets import MLP
from lightning_modules.score_sde import ScoreSDE

MIXTURE = GaussianMixture([[-1.0, -0.5], [1.0, 0.5]], [0.25])
GAUSS_STD = 0.5  # the consistency cell's data: N(0, 0.5^2 I), whose consistency function is linear
N = 2000
OPT = partial(torch.optim.Adam)


def _net():
    return MLP((2,), hidden=8, depth=1)


METHODS = {
    "ddpm": lambda: DDPM(_net(), OPT, data_shape=(2,)),
    "ncsn": lambda: NCSN(_net(), OPT, data_shape=(2,), sigma_max=5.0, sigma_min=0.01, num_scales=10),
    "vesde": lambda: ScoreSDE(_net(), OPT, data_shape=(2,), sde="ve", sigma_max=5.0),
    "vpsde": lambda: ScoreSDE(_net(), OPT, data_shape=(2,), sde="vp"),
    "subvpsde": lambda: ScoreSDE(_net(), OPT, data_shape=(2,), sde="subvp"),
    "edm": lambda: EDM(_net(), OPT, data_shape=(2,)),
    "flow_matching": lambda: FlowMatching(_net(), OPT, data_shape=(2,)),
    "consistency": lambda: ConsistencyTraining(_net(), OPT, data_shape=(2,), total_steps=10),
    "bc_mse": lambda: BCMSE(_net(), OPT, data_shape=(2,), cond_dim=2),
}

# Steps and options per sampler for an exact denoiser: enough that the discretisation error stays below ALLOWANCE.
SETTINGS = {
    "euler": dict(steps=60),
    "heun": dict(steps=30),
    "dpmpp_2m": dict(steps=20),
    "ode_adaptive": dict(),
    "ddim": dict(steps=60, eta=0.5),
    "ancestral": dict(steps=300),
    "euler_maruyama": dict(steps=300),
    "pc": dict(steps=150, snr=0.1, n_corrector_steps=1),
    "annealed_langevin": dict(steps=30, n_steps_each=40),
    "langevin": dict(steps=300),
    "cm": dict(steps=2),
}
ALLOWANCE = 0.05  # sliced W1 a sampler may add at these settings (the floor at N = 2000 is ~0.02)


def exact(module) -> torch.nn.Module:
    if module.provides == samplers.CONSISTENCY:
        lo = module.sigma_min
        module.denoise = lambda x, sigma, cond=None: x * samplers.bcast(((GAUSS_STD**2 + lo**2) / (GAUSS_STD**2 + sigma**2)).sqrt(), x)
    else:
        module.denoise = lambda x, sigma, cond=None: MIXTURE.denoiser(x.double(), 1.0, sigma.double()).to(x.dtype)
    return module


def cell_options(module, sampler: str) -> dict:
    opts = dict(SETTINGS[sampler])
    if sampler in module.fixed_grid:
        opts.pop("steps", None)
    if sampler == "annealed_langevin":
        # alpha_i = step_lr sigma_i^2 / sigma_L^2: a step of 0.1 sigma_i^2 at every level, whatever the grid
        levels = [s for s in module.grid(sampler, opts.get("steps") or module.sample_steps, {}).tolist() if s > 0]
        opts["step_lr"] = 0.1 * levels[-1] ** 2
    return opts


def true_samples(module, seed: int) -> torch.Tensor:
    """N draws of the cell's data: the mixture, or the consistency cell's Gaussian at sigma_min."""
    g = torch.Generator().manual_seed(seed)
    if module.provides == samplers.CONSISTENCY:
        return math.sqrt(GAUSS_STD**2 + module.sigma_min**2) * torch.randn(N, 2, generator=g)
    return MIXTURE.sample(N, generator=g)


def run_cell(name: str, sampler: str, seed: int = 0):
    """(W1 to the reference, floor, NFE spent, the module's predicted NFE) of one defined cell."""
    module = exact(METHODS[name]())
    opts = cell_options(module, sampler)
    g = torch.Generator().manual_seed(seed)
    x_T = None
    if sampler == "langevin":
        # one level only: Langevin must leave p_sigma_L invariant, so start it there
        s = float(module.grid(sampler, 1)[-1])
        x_T = MIXTURE.sample(N, generator=g) + s * torch.randn(N, 2, generator=g)
    x, nfe = module.sample(N, sampler=sampler, generator=g, return_nfe=True, x_T=x_T, **opts)
    ref = true_samples(module, 7)
    floor = sliced_wasserstein(true_samples(module, 8), ref)
    return sliced_wasserstein(x, ref), floor, nfe, module.nfe(sampler, opts.get("steps"), **{k: v for k, v in opts.items() if k != "steps"})


CELLS = [(m, s) for m in METHODS for s in samplers.SAMPLERS]


@pytest.mark.parametrize("name,sampler", CELLS)
def test_every_defined_cell_reproduces_the_data_and_every_other_is_refused(name, sampler):
    module = METHODS[name]()
    why = module.refusal(sampler)
    if why is not None:
        with pytest.raises(ConfigError, match=f"sampler={sampler} is not defined for {type(module).__name__}: "):
            module.sample(4, cond=torch.zeros(4, 2) if module.cond_dim else None, sampler=sampler)
        return
    w1, floor, nfe, predicted = run_cell(name, sampler)
    assert w1 < floor + ALLOWANCE, f"{name} x {sampler}: sliced W1 {w1:.4f} (floor {floor:.4f})"
    assert predicted is None or predicted == nfe


def table() -> str:
    names = list(samplers.SAMPLERS)
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    reasons: dict[str, str] = {}
    for name in METHODS:
        row = []
        for sampler in names:
            module = METHODS[name]()
            why = module.refusal(sampler)
            if why is not None:
                key = reasons.setdefault(why, f"r{len(reasons) + 1}")
                row.append(f"— ({key})")
                continue
            w1, floor, nfe, _ = run_cell(name, sampler)
            row.append(f"{w1:.3f} ({nfe:g})")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"- {key}: {why}" for why, key in reasons.items()]
    return "\n".join(lines)




@pytest.mark.parametrize("name", ["ddpm", "ncsn", "vesde", "vpsde", "subvpsde", "edm", "flow_matching"])
def test_every_ode_method_has_the_exact_likelihood_of_gaussian_data(name):
    """bits_per_dim through the method's own denoiser, sigma range and coordinates: with the exact denoiser of
    N(0, s^2 I) (J_D a multiple of I, so Rademacher probes are exact) the log-density of the data read as the
    method's state at sigma_lo is N(x / m; 0, (s^2 + sigma_lo^2) I) / m^d, m its mean scale there. Only the RK45
    tolerance and the prior's approximation at sigma_hi remain (0.01 nats per dimension; the table's VE methods stop
    at sigma_max = 5, where N(0, 25) for N(0, 25.25) alone costs up to 0.02, so here they take the usual 50)."""
    module = {"ncsn": lambda: NCSN(_net(), OPT, data_shape=(2,), sigma_max=50.0, sigma_min=0.01, num_scales=10),
              "vesde": lambda: ScoreSDE(_net(), OPT, data_shape=(2,), sde="ve", sigma_max=50.0)}.get(name, METHODS[name])()
    s = GAUSS_STD
    module.denoise = lambda x, sigma, cond=None: x * samplers.bcast(s**2 / (s**2 + sigma.double() ** 2), x)
    x = s * torch.randn(100, 2, generator=torch.Generator().manual_seed(3))
    bpd, nfe = module.bits_per_dim(x, num_levels=None, generator=torch.Generator().manual_seed(4))
    lo, _, _, m = module.likelihood_bounds()
    var = s**2 + lo**2
    true_logp = -0.5 * (x.double() / m).pow(2).sum(1) / var - math.log(2 * math.pi * var) - 2 * math.log(m)
    err = (-bpd.double() * 2 * math.log(2)) - true_logp
    assert err.abs().max() / 2 < 0.01, (name, err.abs().max())
    assert nfe > 10
    # and it can fail: a denoiser of the wrong scale gives another density
    module.denoise = lambda x, sigma, cond=None: x * samplers.bcast(0.36 / (0.36 + sigma.double() ** 2), x)
    wrong, _ = module.bits_per_dim(x, num_levels=None, generator=torch.Generator().manual_seed(4))
    assert ((-wrong.double() * 2 * math.log(2)) - true_logp).abs().mean() / 2 > 0.05


def test_a_consistency_model_and_bc_mse_have_no_likelihood():
    for name in ("consistency", "bc_mse"):
        module = METHODS[name]()
        with pytest.raises(ConfigError, match="metric=bpd needs a probability-flow ODE"):
            module.bits_per_dim(torch.zeros(2, 2), cond=torch.zeros(2, 2) if module.cond_dim else None)


LANGEVIN_METHODS = [m for m in METHODS if METHODS[m]().refusal("annealed_langevin") is None]


@pytest.mark.parametrize("name", LANGEVIN_METHODS)
def test_annealed_langevin_with_its_default_step_is_stable_on_every_method_it_is_offered_for(name):
    """NCSN's eps = 2e-5 is tuned to sigma_L = 0.01; on EDM's levels (sigma_L = 0.002) it made every sample NaN. The
    default keeps NCSN's eps / sigma_L^2, and an eps past the stability bound (2 sigma_L^2) is refused."""
    module = exact(METHODS[name]())
    g = torch.Generator().manual_seed(0)
    x = module.sample(N, sampler="annealed_langevin", steps=30, n_steps_each=40, generator=g)
    ref = true_samples(module, 7)
    assert torch.isfinite(x).all()
    assert sliced_wasserstein(x, ref) < sliced_wasserstein(true_samples(module, 8), ref) + ALLOWANCE
    lowest = min(s for s in module.grid("annealed_langevin", 30).tolist() if s > 0)
    with pytest.raises(ConfigError, match=r"step_lr=.* diverges on .* lowest level"):
        module.sample(4, sampler="annealed_langevin", steps=30, step_lr=2.5 * lowest**2)


# --- few steps on steep grids: the exact probability-flow map of Gaussian data -----------------------------------

STEEP = {  # top sigma 2e4 (cosine T=1000), 2e3 (Push-T's cosine T=100), 999 (flow matching's t_max = 0.999)
    "cosine_ddpm_10": (lambda: DDPM(_net(), OPT, data_shape=(2,), schedule="cosine"), 10),
    "cosine_ddpm_quadratic_10": (lambda: DDPM(_net(), OPT, data_shape=(2,), schedule="cosine", sampling={"options": {"ddim_spacing": "quadratic"}}), 10),
    "pusht_cosine_t100_10": (lambda: DDPM(_net(), OPT, data_shape=(2,), schedule="cosine", num_timesteps=100), 10),
    "flow_matching_5": (lambda: FlowMatching(_net(), OPT, data_shape=(2,)), 5),
    "flow_matching_10": (lambda: FlowMatching(_net(), OPT, data_shape=(2,)), 10),
}
# mean |error| to the exact map each sampler stays under on all five grids (measured: euler <= 0.10, dpmpp_2m <= 0.063,
# heun <= 0.011; heun was 5.4 / 39 / 0.53 / 0.75 / 0.070 before it took first-order steps from the noise regime)
STEEP_BOUND = {"euler": 0.12, "dpmpp_2m": 0.08, "heun": 0.02}


def steep_error(case: str, sampler: str) -> tuple[float, int]:
    """(mean |error| to the exact probability-flow map, NFE spent) of a sampler from the top of a steep grid."""
    make, steps = STEEP[case]
    module, s = make(), GAUSS_STD
    module.denoise = lambda x, sigma, cond=None: x * samplers.bcast(s**2 / (s**2 + sigma.double() ** 2), x).to(x.dtype)
    top = float(module.grid(sampler, steps, module.sampling_defaults(sampler))[0])
    x_T = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # start from the exact marginal at the top, x_T sqrt(s^2 + top^2) in the VE form (x_T in the method's own
    # coordinates is that over its to_ve factor, prior_std(top)); the map scales it by s / sqrt(s^2 + top^2)
    exact = x_T * s
    start = x_T * math.sqrt(s**2 + top**2) / module.prior_std(top)
    x, nfe = module.sample(4000, sampler=sampler, steps=steps, x_T=start, return_nfe=True)
    assert nfe == module.nfe(sampler, steps)
    return float((x.double() - exact).abs().mean()), nfe


@pytest.mark.parametrize("sampler", sorted(STEEP_BOUND))
@pytest.mark.parametrize("case", sorted(STEEP))
def test_few_step_ode_samplers_follow_the_exact_map_on_steep_grids(case, sampler):
    """Data N(0, s^2 I): the VE probability-flow ODE maps x at sigma to x sqrt(s^2 + sigma'^2) / sqrt(s^2 + sigma^2),
    so the end point of a sampler from the top level is known exactly; the NFE it spent is the one it predicts."""
    error, _ = steep_error(case, sampler)
    assert error < STEEP_BOUND[sampler], f"{case} x {sampler}: {error:.4f}"


def steep_table() -> str:
    lines = ["| grid | " + " | ".join(sorted(STEEP_BOUND)) + " |", "|---|" + "---|" * len(STEEP_BOUND)]
    for case in sorted(STEEP):
        cells = [steep_error(case, sampler) for sampler in sorted(STEEP_BOUND)]
        lines.append(f"| {case} | " + " | ".join(f"{e:.4f} ({n})" for e, n in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(steep_table() if "--steep" in sys.argv else table())
