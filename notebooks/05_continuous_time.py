# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Continuous time: score SDEs, the probability-flow ODE, exact likelihoods and consistency models
#
# DDPM (Ho et al. 2020) and NCSN (Song & Ermon 2019) are two discretisations of one object: a forward
# stochastic differential equation that turns data into noise, run backwards with the score
# $\nabla_x \log p_t(x)$ (Song et al. 2021). Once time is continuous, three things come for free:
# a choice of sampler (reverse SDE, predictor-corrector, or a deterministic ODE), an exact
# log-likelihood through that ODE, and — by learning the ODE's flow map directly — one-step sampling
# with consistency models (Song et al. 2023).
#
# Every step below calls the project's own code: the SDEs in `lightning_modules/sde.py`, the samplers
# and likelihood in the `samplers/` package (which every method samples through, `lightning_modules/base.py`),
# the exact scores and denoisers of a Gaussian mixture in
# `lightning_modules/analytic.py`, the methods `model=vpsde`, `model=edm`, `model=consistency`, and the
# toys' quality figure (sliced Wasserstein-1, `evaluation/sliced_wasserstein.py`). Everything runs on
# 2-D toys so the notebook fits in a few CPU minutes.

# %%
import math
import os
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")

import matplotlib.pyplot as plt
import numpy as np
import torch
from nbkit import SMALL, build, compose, fit, steps  # noqa: F401

import samplers
from evaluation.sliced_wasserstein import sliced_wasserstein
from lightning_modules.analytic import GaussianMixture
from lightning_modules.sde import make_sde
from lightning_modules.teachers import teacher_from_module
from samplers import grids
from samplers.likelihood import log_likelihood

# nbkit uses 2 threads; honour a smaller OMP_NUM_THREADS (on a busy 2-core machine 2 threads can be far slower).
torch.set_num_threads(min(torch.get_num_threads(), int(os.environ.get("OMP_NUM_THREADS", "2"))))
torch.manual_seed(0)
T0 = time.perf_counter()
print("small settings" if SMALL else "default settings", "| torch threads:", torch.get_num_threads())

# %% [markdown]
# ## 1. Three forward SDEs
#
# Song et al. 2021 write the forward process as $dx = f(x,t)\,dt + g(t)\,dw$ on $t\in[0,1]$, with a
# Gaussian marginal $q(x_t\mid x_0)=\mathcal N(m(t)\,x_0,\ s(t)^2 I)$:
#
# * **VE** (variance exploding, SMLD's continuum): no drift, $s(t)$ grows geometrically from
#   `sigma_min` to `sigma_max`; the data are never shrunk, so `sigma_max` must dwarf the data's spread.
# * **VP** (variance preserving, DDPM's continuum): the data shrink by $m(t)$ while noise grows, total
#   variance stays ~1.
# * **sub-VP**: VP's drift with a smaller diffusion; its std stays below VP's at every $t$.
#
# `make_sde` builds each; `marginal(t)` returns $(m(t), s(t))$.

# %%
sdes = {name: make_sde(name) for name in ("ve", "vp", "subvp")}
t = torch.linspace(1e-3, 1.0, 200, dtype=torch.float64)
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for name, sde in sdes.items():
    mean_scale, std = sde.marginal(t)
    axes[0].plot(t, mean_scale, label=name)
    axes[1].plot(t, std, label=name)
axes[0].set(title="mean coefficient m(t)", xlabel="t")
axes[1].set(title="marginal std s(t)", xlabel="t", yscale="log")
axes[1].legend()
fig.tight_layout()
plt.show()
for name, sde in sdes.items():
    m1, s1 = (v.item() for v in sde.marginal(torch.tensor([1.0])))
    print(f"{name:6s} at t=1: m = {m1:.2e}, s = {s1:.3g}; prior std {sde.prior_std():g}")

# %% [markdown]
# The SDE and its marginal must agree: simulating the forward SDE step by step with its own
# discretisation (`sde.discretize`, for VP exactly DDPM's chain) should land on the same distribution as
# one jump with `sde.perturb`. We check this on a three-mode Gaussian mixture with unequal weights, the
# test distribution of the rest of the notebook, comparing the two point clouds with the sliced
# Wasserstein-1 distance (SW1).

# %%
mixture = GaussianMixture(means=[[-1.5, -1.0], [1.5, -1.0], [0.0, 1.5]], stds=[0.25, 0.4, 0.3], weights=[0.5, 0.3, 0.2])
n_pts = steps(2000, 500)
gen = torch.Generator().manual_seed(0)
x0 = mixture.sample(n_pts, generator=gen)
vp = sdes["vp"]
n_fwd = 1000
times_shown = [0.05, 0.2, 0.5, 1.0]
x, k, snapshots = x0.clone(), 0, {}
for i in range(1, n_fwd + 1):
    ti = i / n_fwd
    f_i, G_i = vp.discretize(x, torch.full((n_pts,), ti), 1.0 / n_fwd)
    x = x + f_i + G_i[:, None] * torch.randn(x.shape, generator=gen)
    if any(abs(ti - s) < 1e-9 for s in times_shown):
        snapshots[round(ti, 2)] = x.clone()
fig, axes = plt.subplots(1, len(times_shown), figsize=(11, 2.9), sharex=True, sharey=True)
for ax, ts in zip(axes, times_shown):
    jump = vp.perturb(x0, torch.full((n_pts,), ts), torch.randn(x0.shape, generator=gen))
    ax.scatter(*jump.T, s=1, c="0.6", label="perturb (one jump)")
    ax.scatter(*snapshots[ts].T, s=1, c="tab:blue", label="SDE, step by step")
    ax.set_title(f"VP, t = {ts}: SW1 {sliced_wasserstein(jump, snapshots[ts]):.3f}", fontsize=9)
    ax.set_aspect("equal")
axes[0].legend(fontsize=7, markerscale=5, loc="lower left")
fig.tight_layout()
plt.show()
ref_a, ref_b = mixture.sample(n_pts, generator=gen), mixture.sample(n_pts, generator=gen)
print(f"SW1 between two independent draws of the same distribution (n={n_pts}): {sliced_wasserstein(ref_a, ref_b):.3f}")

# %% [markdown]
# ## 2. Running it backwards with the exact score
#
# Anderson's reverse-time SDE $dx=[f-g^2\nabla\log p_t]\,dt+g\,d\bar w$ and the probability-flow ODE
# $dx/dt=f-\tfrac12 g^2\nabla\log p_t$ share the marginals $p_t$ (Song et al. 2021, eqs. 6 and 13); the
# `SDE` base class derives both once from $f$, $g$ and a score. The samplers need neither $f$ nor $g$:
# dividing by the mean coefficient, $x/m(t) = x_0 + \sigma n$ with $\sigma = s(t)/m(t)$ (`sde.ve_sigma(t)`),
# turns each of the three SDEs into the same variance-exploding process run on its own clock. In that **VE
# form** the probability-flow ODE reads $dx/d\sigma = (x - D(x;\sigma))/\sigma$ with the denoiser
# $D = E[x_0\mid x] = x + \sigma^2\nabla\log p_\sigma(x)$ (Tweedie), so one set of samplers, plain
# functions of $D$ on a decreasing grid of $\sigma$'s (the `samplers/` package), serves VE, VP and sub-VP
# alike, and DDPM, NCSN and EDM too. A score SDE's grid is $\sigma(t_k)$ on evenly spaced times from 1 down
# to $\epsilon = 10^{-3}$ (`grids.time_uniform`), and its prior draw $x_T$ enters as $x_T/m(1)$. A Gaussian
# mixture stays a Gaussian mixture under the forward process, so `GaussianMixture.denoiser(x, 1.0, sigma)`
# is the **exact** denoiser at every level: whatever error remains is the sampler's, not a network's.
#
# Samplers, by name from the registry `samplers.SAMPLERS`: `euler_maruyama` (reverse SDE), `pc` (the same
# predictor + one Langevin corrector step, snr 0.16), `heun` on the probability-flow ODE (2 NFE per step) and
# the adaptive RK45 solver `ode_adaptive` (in $u = \log\sigma$, where the ODE is $dx/du = x - D$). The
# reverse-SDE step is taken in the VE form too, $x + \frac{\sigma^2-\sigma'^2}{\sigma^2}(D - x) +
# \sqrt{\sigma^2-\sigma'^2}\,z$ from $\sigma$ to $\sigma'$: for VP the same limit as stepping the VP SDE in
# its own coordinates, with a different $O(dt)$ error. Each run ends with Tweedie's denoising step
# $x \mapsto D(x;\sigma(\epsilon))$ (+1 NFE), the grid's final 0 (`grids.append_zero`); the NFE column counts
# the denoiser's calls (`samplers.Counted`).

# %%
def exact_denoiser(mix):
    """A mixture's exact VE-form denoiser E[x0 | x0 + sigma n = x], at every sigma."""
    return lambda x, sigma: mix.denoiser(x, 1.0, sigma)


def mean_scale(sde, t):
    """m(t), the SDE's mean coefficient, as a float."""
    return sde.marginal(torch.tensor([float(t)], dtype=torch.float64))[0].item()


def sde_grid(sde, n_steps, eps=1e-3):
    """sigma(t_k) = s(t_k) / m(t_k) on t = 1 -> eps evenly spaced, then 0 for the final denoising step."""
    return grids.append_zero(grids.time_uniform(sde.ve_sigma, n_steps, sde.T, eps))


def run_sampler(name, sde, x_T, n_steps, generator=None):
    """The registry sampler `name` on the mixture's exact denoiser, from a prior draw x_T in the SDE's own
    coordinates (VE form: x_T / m(1)); returns (samples, NFE counted)."""
    denoiser = samplers.Counted(exact_denoiser(mixture))
    xs = samplers.get(name).fn(denoiser, x_T / mean_scale(sde, sde.T), sde_grid(sde, n_steps), generator=generator)
    return xs, denoiser.calls


def mode_weights(x):
    """Share of samples nearest to each mixture mean (a plain assignment, for reading the mode weights)."""
    nearest = torch.cdist(x.double(), mixture.means).argmin(1)
    return torch.bincount(nearest, minlength=len(mixture.weights)).double() / len(x)


n_samp = steps(2000, 400)
reference = mixture.sample(5000, generator=torch.Generator().manual_seed(1))
floor = sliced_wasserstein(mixture.sample(n_samp, generator=torch.Generator().manual_seed(2)), reference)
ve = make_sde("ve", sigma_max=8.0)  # VE needs sigma_max above the data's largest distance (~3.4 here)
runs = {}
for sde_name, sde in (("VP", vp), ("VE", ve)):
    x_T = sde.prior_sample((n_samp, 2), generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    if sde_name == "VP":
        runs["VP, Euler-Maruyama"] = run_sampler("euler_maruyama", sde, x_T, steps(1000, 200), generator=g)
    runs[f"{sde_name}, predictor-corrector"] = run_sampler("pc", sde, x_T, steps(500, 100), generator=g)
    runs[f"{sde_name}, PF-ODE Heun"] = run_sampler("heun", sde, x_T, steps(50, 25))
    # RK45 chooses its own steps between the grid's two ends (rtol = atol = 1e-4)
    counted = samplers.Counted(exact_denoiser(mixture))
    runs[f"{sde_name}, PF-ODE RK45"] = (samplers.ode.adaptive(counted, x_T / mean_scale(sde, sde.T), sde_grid(sde, 1),
                                                              rtol=1e-4, atol=1e-4), counted.calls)

print(f"{'sampler':26s} {'NFE':>5s} {'SW1':>7s}   mode weights (true {mixture.weights.numpy().round(2)})")
print(f"{'(floor: true samples)':26s} {'':>5s} {floor:7.4f}")
for name, (xs, nfe) in runs.items():
    print(f"{name:26s} {nfe:5d} {sliced_wasserstein(xs, reference):7.4f}   {mode_weights(xs).numpy().round(3)}")
# With the exact score every sampler gets the mode weights right to within 5 binomial standard errors.
for name, (xs, _) in runs.items():
    se = (mixture.weights * (1 - mixture.weights) / len(xs)).sqrt()
    assert ((mode_weights(xs) - mixture.weights).abs() < 5 * se).all(), (name, mode_weights(xs))

fig, axes = plt.subplots(2, 4, figsize=(8.8, 4.6), sharex=True, sharey=True)
axes[-1, -1].axis("off")
for ax, (name, (xs, nfe)) in zip(axes.flat, runs.items()):
    ax.scatter(*reference[:1000].T, s=1, c="0.75")
    ax.scatter(*xs[:1000].T, s=1, c="tab:blue")
    ax.set_title(f"{name}\n{nfe} NFE", fontsize=8)
    ax.set_aspect("equal")
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
fig.tight_layout()
plt.show()

# %% [markdown]
# With the exact score, what is left is each sampler's discretisation error, read against the floor (a
# fresh set of true samples scored against the same reference; at this sample size SW1 itself fluctuates by
# about the floor's size, see the two-draw figure in section 1) and against the true 0.5 / 0.3 / 0.2 mode
# weights (a 2000-sample share has a standard error of about 0.01). The ODE needs tens of evaluations
# because its paths are smooth; the SDE samplers take hundreds of small steps to simulate the noise.
#
# The ODE is also a deterministic map from noise to data: every noise draw has exactly one sample.
# Below, 12 ODE paths (RK45 is not needed for a picture: Heun with 50 steps; the sampler's
# `callback(i, sigma, x)` records the VE-form state before each step, drawn in VP coordinates
# $x_t = m(t)\,x_{VE}$ with $t = t(\sigma)$, `sde.t_of_ve_sigma`).

# %%
x_T = vp.prior_sample((12, 2), generator=torch.Generator().manual_seed(5))
states = []


def record(i, sigma, x_ve):
    t_i = vp.t_of_ve_sigma(sigma.double())
    states.append(x_ve * vp.marginal(t_i)[0][:, None].to(x_ve.dtype))  # back to VP coordinates


x_end = samplers.ode.heun(exact_denoiser(mixture), x_T / mean_scale(vp, vp.T), sde_grid(vp, 50), callback=record)
paths = torch.stack(states + [x_end])  # t = 1, ..., 1e-3, then the denoised sample
fig, ax = plt.subplots(figsize=(3.6, 3.6))
ax.scatter(*reference[:1500].T, s=1, c="0.8")
for j in range(paths.shape[1]):
    line, = ax.plot(paths[:, j, 0], paths[:, j, 1], "-", lw=0.8)
    ax.plot(*paths[0, j], "x", c=line.get_color(), ms=5)
    ax.plot(*paths[-1, j], "o", c=line.get_color(), ms=4)
ax.set(title="PF-ODE paths (VP): x noise, o sample", xlim=(-3, 3), ylim=(-3, 3))
ax.set_aspect("equal")
plt.show()

# %% [markdown]
# ## 3. Exact likelihood through the ODE
#
# Because the ODE is an invertible flow, the change-of-variables formula gives the log-density of any point:
# integrate $x$ from $t=\epsilon$ up to $t=1$ together with the divergence of the velocity, then add the
# prior's log-density (Song et al. 2021, App. D.2). `samplers.likelihood.log_likelihood` does this in the VE
# form, on $dx/du = x - D(x; e^u)$ from $u = \log\sigma(\epsilon)$ up to $\log\sigma(1)$, with RK45 and
# Hutchinson's trace estimator (one Rademacher probe per point); the VP density follows by the change of
# variables $x_{VE} = x/m(\epsilon)$, $\log p_t(x) = \log p_{VE}(x/m) - D \log m$ (what every module's
# `bits_per_dim` does). With the exact denoiser it must reproduce the mixture's true `log_prob`.

# %%
x_test = mixture.sample(steps(1000, 100), generator=torch.Generator().manual_seed(6))
eps_ll = 1e-5  # the likelihood's lower end t = eps (model=vpsde's eps)
m_lo, m_hi = mean_scale(vp, eps_ll), mean_scale(vp, vp.T)
sigma_lo, sigma_hi = (vp.ve_sigma(torch.tensor(t, dtype=torch.float64)).item() for t in (eps_ll, vp.T))
start = time.perf_counter()
logp_ve, nfe_ll = log_likelihood(exact_denoiser(mixture), x_test / m_lo, sigma_lo, sigma_hi, vp.prior_std() / m_hi,
                                 generator=torch.Generator().manual_seed(7))
logp_ode = logp_ve - x_test.shape[1] * math.log(m_lo)  # the density of x_t = m x_VE
secs = time.perf_counter() - start
logp_true = mixture.log_prob(x_test)
print(f"{len(x_test)} points, RK45 rtol=atol=1e-5, {nfe_ll} NFE, {secs:.1f} s")
print(f"mean log p, ODE (exact denoiser): {logp_ode.mean().item():.4f} nats")
print(f"mean log p, true density:        {logp_true.mean().item():.4f} nats")
err = (logp_ode - logp_true).double()
se = err.std().item() / math.sqrt(len(err))
print(f"difference of the means {err.mean().item():+.4f} nats, standard error {se:.4f} "
      f"({abs(err.mean().item()) / se:.1f} standard errors); per-point std {err.std().item():.3f} (Hutchinson noise)")
assert abs(err.mean().item()) < 4 * se  # the ODE likelihood with the exact denoiser is the true log-density
fig, ax = plt.subplots(figsize=(3.4, 3.2))
ax.scatter(logp_true, logp_ode, s=4)
lims = [logp_true.min().item(), logp_true.max().item()]
ax.plot(lims, lims, "k--", lw=0.8)
ax.set(xlabel="true log p(x)", ylabel="ODE log p(x)", title="likelihood per point")
fig.tight_layout()
plt.show()

# %% [markdown]
# The per-point spread is the Hutchinson estimator's variance (one probe per point); it averages out over
# a batch, so the printed difference of the means is to be read against its standard error: an unbiased
# estimate of the mean log-likelihood differs from the truth by about one standard error.
#
# ## 4. A learned score: `model=vpsde` on the 8 Gaussians
#
# Now a network replaces the exact score: `build('data=toy2d', 'data.name=8gaussians', 'model=vpsde')`
# composes exactly what `python train.py data=toy2d data.name=8gaussians model=vpsde` would (an MLP,
# continuous-time denoising score matching with $t\sim U(\epsilon,1)$, Vincent 2011). The 8 Gaussians are
# also a Gaussian mixture (centres on a circle of radius 2, std 0.2), so the learned model's likelihood can
# be compared with the truth.

# %%
dm_toy, vpsde_model = build("data=toy2d", "data.name=8gaussians", "model=vpsde", seed=0)
n_train = steps(1500, 100)
secs = fit(vpsde_model, dm_toy, max_steps=n_train)
print(f"vpsde: {n_train} steps in {secs:.0f} s")

metric = dm_toy.make_metric()
n_eval = steps(1000, 300)
toy_floor = metric.floor(n_eval)
learned = {}
for label, sampler, k in (("PC", "pc", steps(250, 30)), ("Euler-Maruyama", "euler_maruyama", steps(500, 60)),
                          ("PF-ODE Heun", "ode", steps(50, 10)), ("DPM-Solver++(2M)", "dpmpp_2m", steps(25, 10))):
    start = time.perf_counter()
    xs, nfe = vpsde_model.sample(n_eval, sampler=sampler, steps=k, generator=torch.Generator().manual_seed(8), return_nfe=True)
    learned[label] = (xs, nfe, time.perf_counter() - start)
print(f"{'sampler':16s} {'NFE':>5s} {'sliced W1':>9s} {'seconds':>8s}   (floor {toy_floor:.4f}: {n_eval} true samples)")
learned_sw = {}
for label, (xs, nfe, s) in learned.items():
    learned_sw[label] = metric(xs)
    print(f"{label:16s} {nfe:5d} {learned_sw[label]:9.4f} {s:8.1f}")
best = min(learned_sw, key=learned_sw.get)
print(f"closest to the floor: {best} ({learned_sw[best] / toy_floor:.1f}x the floor); "
      f"the ODE at {learned['PF-ODE Heun'][1]} NFE: {learned_sw['PF-ODE Heun'] / toy_floor:.1f}x")
fig, axes = plt.subplots(1, len(learned), figsize=(2.7 * len(learned), 2.8), sharex=True, sharey=True)
truth = dm_toy.ground_truth(1000, torch.Generator().manual_seed(9))
for ax, (label, (xs, nfe, _)) in zip(axes, learned.items()):
    outside = int((xs[:1000].abs() > 3.5).any(1).sum())
    ax.scatter(*truth.T, s=1, c="0.75")
    ax.scatter(*xs[:1000].T.clamp(-3.45, 3.45), s=1, c="tab:blue")  # points outside the frame drawn on its edge
    ax.set_title(f"learned VP, {label}\n{nfe} NFE, {outside} outside the frame", fontsize=8)
    ax.set_aspect("equal")
    ax.set_xlim(-3.5, 3.5)
    ax.set_ylim(-3.5, 3.5)
fig.tight_layout()
plt.show()

# %% [markdown]
# With a learned score the samplers no longer agree. The stochastic samplers inject fresh noise at every
# step, which can partly correct the score's errors; the ODE follows the learned field
# deterministically and carries every error to the end (Song et al. 2021 also report slightly worse FID
# for the ODE than for PC). Which one wins here, and by how much, is in the printout above; it depends on the
# short training budget.
#
# `vpsde_model.sample` runs every sampler on the module's one VE-form denoiser (`denoise(x, sigma)`,
# `lightning_modules/base.py`), so samplers written for other methods run on the VP SDE unchanged: the last row
# is DPM-Solver++(2M), the DDPM family's fast ODE solver (one NFE per step, second order in $\log\sigma$; compare
# it with Heun's row, the same ODE at four times the NFE), and `sampler="ddim"` or EDM's `"heun"` work the same
# way. The ODE samples drawn on the frame's edge lie far outside it, tens of units away at these settings (the
# titles count them): a handful of such points weighs heavily in a W1 distance, each moving 1/1000 of the mass
# that far.

# %% [markdown]
# ### Bits per dimension
#
# `module.bits_per_dim(x, num_levels=None)` runs the same ODE likelihood through the learned denoiser and
# reports $-\log p(x)/(D\ln 2)$ (continuous data: no dequantisation). The reference points: the same module and
# ODE with its `denoise` replaced by the exact denoiser of the 8-Gaussian mixture, and the mixture's closed-form
# density, on the same held-out points.

# %%
angles = 2 * math.pi * torch.arange(8) / 8
eight = GaussianMixture(means=2.0 * torch.stack([angles.cos(), angles.sin()], 1), stds=0.2)
x_val = dm_toy.dataset("val").tensors["x"][: steps(200, 40)]
start = time.perf_counter()
bpd_learned, nfe_l = vpsde_model.bits_per_dim(x_val, num_levels=None, generator=torch.Generator().manual_seed(10))
secs = time.perf_counter() - start

# The same module with the mixture's exact denoiser in the learned one's place (an instance attribute over the
# method; deleting it restores the learned model).
vpsde_model.denoise = lambda x, sigma, cond=None: eight.denoiser(x, 1.0, sigma)
bpd_exact, nfe_e = vpsde_model.bits_per_dim(x_val, num_levels=None, generator=torch.Generator().manual_seed(10))
del vpsde_model.denoise
bpd_true = -eight.log_prob(x_val) / (x_val.shape[1] * math.log(2))
def mean_se(v):
    v = v.double()
    return f"{v.mean().item():.4f} +- {v.std().item() / math.sqrt(len(v)):.4f}"


print(f"{len(x_val)} held-out points of 8gaussians, bits/dim (mean +- standard error; lower is better):")
print(f"  learned vpsde ({n_train} steps), ODE:  {mean_se(bpd_learned)}  ({nfe_l} NFE, {secs:.1f} s)")
print(f"  exact denoiser, ODE:               {mean_se(bpd_exact)}  ({nfe_e} NFE)")
print(f"  closed-form density:               {bpd_true.mean().item():.4f}")
print(f"  gap learned - exact denoiser (same points): {mean_se(bpd_learned - bpd_exact)} bits/dim")
assert abs(bpd_exact.mean().item() - bpd_true.mean().item()) < 4 * bpd_exact.double().std().item() / math.sqrt(len(bpd_exact))

# %% [markdown]
# The exact-denoiser row checks the estimator (it should sit within a couple of standard errors of the closed
# form); the learned row measures the model. The learned-minus-exact gap is the model's excess code length on
# held-out points (plus estimator noise); how large it is depends on the training budget printed above.
#
# ## 5. Consistency models: one or two network evaluations
#
# The ODE makes sampling a deterministic map, but a map that takes tens of evaluations to compute. A
# consistency model (Song et al. 2023) learns the map itself: $f(x_\sigma,\sigma)$ returns the end of the ODE
# path through $x_\sigma$, parametrised so that $f(x,\sigma_{\min})=x$ exactly. Consistency *distillation*
# trains it by asking $f$ to agree on neighbouring points of a teacher's ODE path (one Heun step of the
# teacher apart).
#
# Teacher: `model=edm` (Karras et al. 2022: VE noise $x_0+\sigma n$, preconditioned denoiser, Heun sampler,
# 18 steps = 35 NFE). Student: `model=consistency` (distillation, N = 18 Karras levels, l2, target EMA
# 0.95), warm-started from the teacher's weights. `teacher_from_module` wraps the in-memory EDM as a teacher,
# which is what `model.teacher_ckpt=<run>/checkpoints/last.ckpt` does from a file.

# %%
_, edm = build("data=toy2d", "data.name=8gaussians", "model=edm", seed=0)
n_teacher = steps(1500, 100)
secs_t = fit(edm, dm_toy, max_steps=n_teacher)
_, cm = build("data=toy2d", "data.name=8gaussians", "model=consistency", seed=0)
cm.attach_teacher(teacher_from_module(edm, config=edm.run_config))
n_cd = steps(600, 50)
secs_s = fit(cm, dm_toy, max_steps=n_cd)
print(f"EDM teacher: {n_teacher} steps, {secs_t:.0f} s; consistency distillation: {n_cd} steps, {secs_s:.0f} s")

rows = {}
for label, model, sampler, k in (
    ("teacher, Heun 18 steps", edm, "heun", 18),
    ("teacher, Euler 1 step", edm, "euler", 1),
    ("consistency, 1 step", cm, "cm", 1),
    ("consistency, 2 steps", cm, "cm", 2),
):
    start = time.perf_counter()
    xs, nfe = model.sample(n_eval, sampler=sampler, steps=k, generator=torch.Generator().manual_seed(11), return_nfe=True)
    rows[label] = (xs, nfe, metric(xs), time.perf_counter() - start)
teacher_sw = rows["teacher, Heun 18 steps"][2]
print(f"{'':24s} {'NFE':>4s} {'sliced W1':>9s} {'x teacher':>9s} {'seconds':>8s}   floor {toy_floor:.4f} ({n_eval} samples)")
for label, (_, nfe, sw, s) in rows.items():
    print(f"{label:24s} {nfe:4d} {sw:9.4f} {sw / teacher_sw:9.2f} {s:8.2f}")

fig, axes = plt.subplots(1, len(rows), figsize=(2.2 * len(rows), 2.5), sharex=True, sharey=True)
for ax, (label, (xs, nfe, sw, _)) in zip(axes, rows.items()):
    ax.scatter(*truth.T, s=1, c="0.75")
    ax.scatter(*xs[:1000].T.clamp(-4, 4), s=1, c="tab:blue")
    ax.set_title(f"{label}\n{nfe} NFE, SW1 {sw:.3f}", fontsize=8)
    ax.set_aspect("equal")
    ax.set_xlim(-3.5, 3.5)
    ax.set_ylim(-3.5, 3.5)
fig.tight_layout()
plt.show()

# %%
cd1, cd2, eul1 = rows["consistency, 1 step"][2], rows["consistency, 2 steps"][2], rows["teacher, Euler 1 step"][2]
print(f"What one step costs: the consistency model at 1 NFE scores {cd1 / teacher_sw:.2f}x the teacher's SW1 at 35 NFE "
      f"({cd2 / teacher_sw:.2f}x at 2 NFE), while the teacher itself forced to 1 step scores {eul1 / teacher_sw:.1f}x.")
print(f"Against the floor ({toy_floor:.4f}): teacher {teacher_sw - toy_floor:+.4f}, consistency 1 step {cd1 - toy_floor:+.4f}, "
      f"2 steps {cd2 - toy_floor:+.4f} above it.")
print(f"total notebook time {time.perf_counter() - T0:.0f} s")
assert eul1 > 3 * teacher_sw  # one Euler step of the teacher is far from its 35-NFE samples
if not SMALL:  # at the default settings: distillation makes one step count
    assert cd1 < 0.5 * eul1 and cd2 < 2 * teacher_sw, (cd1, cd2, eul1, teacher_sw)

# %% [markdown]
# Reading the table: the teacher forced to one Euler step just returns its denoiser's guess at
# $\sigma_{\max}$, close to the data mean; the distilled student spends the same single evaluation on the
# learned flow map. The ratio column is the price of one (or two) steps against the 35-NFE teacher at
# these short training budgets; the project's benchmark (`benchmarks/RESULTS.md`, swiss roll, 4000 + 2000
# steps) measured CD at 1 step within 1% of its teacher and at 2 steps below it. A ratio below 1 is not a
# contradiction: the student has trained for the teacher's steps plus its own (it starts from the teacher's
# weights), and the 2-step sampler re-noises halfway, which can undo part of the one-step map's error.
# Consistency *training*
# without a teacher (`model=consistency_training`, iCT) shares this base and swaps the lower point of a pair; and the same idea
# yields a one-step policy in notebook 06.
