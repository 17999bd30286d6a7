"""Samplers as plain functions of a VE-form denoiser, one signature, in a registry by name.

    sampler(denoiser, x, sigmas, generator=None, callback=None, progress=False, **options) -> x

`denoiser(x, sigma)` is E[x0 | x = x0 + sigma n] with sigma a (B,) tensor; `sigmas` a decreasing grid (see
samplers.grids), usually ending at 0; x starts at sigmas[0]. This package depends on torch alone (scipy for
the adaptive solver and likelihoods), never on a method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from samplers import consistency, langevin, mean_flow, ode, stochastic
from samplers.core import Counted, batch_sigma, bcast, clipped

# What a sampler needs of the model: an estimate of E[x0 | x] (every diffusion-family method), a consistency
# function, whose output is the end of x's ODE trajectory and not a posterior mean, or a flow map jump(x, sigma,
# sigma_next) built from an average velocity (MeanFlow).
DENOISER, CONSISTENCY, FLOW_MAP = "denoiser", "consistency", "flow_map"


def _transitions(levels: list[float]) -> int:
    return len(levels) - 1


def _heun_nfe(levels: list[float], options: dict) -> int:
    return sum(1 if ode.heun_first_order(s, s_next) else 2 for s, s_next in zip(levels[:-1], levels[1:]))


def _pc_nfe(levels: list[float], options: dict) -> int:
    n_corr = int(options.get("n_corrector_steps", 1))
    return sum(1 + n_corr if s > 0 else 1 for s in levels[1:])


def _annealed_nfe(levels: list[float], options: dict) -> int:
    positive = sum(s > 0 for s in levels)
    return positive * int(options.get("n_steps_each", 100)) + int(levels[-1] == 0)


@dataclass(frozen=True)
class Sampler:
    name: str
    fn: Callable
    options: tuple[str, ...]
    nfe: Callable[[list[float], dict], int | None]  # from the grid and options; None: known only after the solve
    needs: str = DENOISER
    ode: bool = False  # deterministic: integrates the probability-flow ODE
    doc: str = field(default="", compare=False)


SAMPLERS: dict[str, Sampler] = {s.name: s for s in [
    Sampler("euler", ode.euler, (), lambda g, o: _transitions(g), ode=True, doc="Euler on the PF-ODE (= DDIM, eta 0)"),
    Sampler("heun", ode.heun, ("s_churn", "s_tmin", "s_tmax", "s_noise"), _heun_nfe, ode=True,
            doc="EDM's Heun (Algorithm 1; 2 with s_churn)"),
    Sampler("dpmpp_2m", ode.dpmpp_2m, ("min_ratio", "lower_order_final"), lambda g, o: _transitions(g), ode=True, doc="DPM-Solver++(2M)"),
    Sampler("ode_adaptive", ode.adaptive, ("rtol", "atol"), lambda g, o: None, ode=True, doc="RK45 in log sigma"),
    Sampler("ddim", stochastic.ddim, ("eta",), lambda g, o: _transitions(g), doc="DDIM, eq. 12 with eta"),
    Sampler("ancestral", stochastic.ancestral, ("variance",), lambda g, o: _transitions(g),
            doc="DDPM's posterior step (Ho et al. Algorithm 2)"),
    Sampler("euler_maruyama", stochastic.euler_maruyama, (), lambda g, o: _transitions(g), doc="reverse SDE, Euler-Maruyama"),
    Sampler("pc", stochastic.pc, ("snr", "n_corrector_steps"), _pc_nfe, doc="predictor-corrector (reverse SDE + Langevin)"),
    Sampler("annealed_langevin", langevin.annealed_langevin, ("n_steps_each", "step_lr"), _annealed_nfe,
            doc="NCSN's annealed Langevin dynamics"),
    Sampler("langevin", langevin.langevin, ("n_steps", "step_size"), lambda g, o: int(o.get("n_steps", 1000)),
            doc="Langevin at the lowest level only"),
    Sampler("cm", consistency.multistep, ("sigma_min",), lambda g, o: sum(s > 0 for s in g), needs=CONSISTENCY,
            doc="consistency sampling (Algorithm 1)"),
    Sampler("mean_flow", mean_flow.jumps, (), lambda g, o: _transitions(g), needs=FLOW_MAP,
            doc="MeanFlow's jumps z_r = z_t - (t - r) u (1 NFE a step)"),
]}


def get(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}: the samplers are {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


__all__ = ["SAMPLERS", "Sampler", "get", "Counted", "batch_sigma", "bcast", "clipped", "DENOISER", "CONSISTENCY", "FLOW_MAP"]
