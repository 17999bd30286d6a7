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
# and likelihood in `lightning_modules/sde_samplers.py`, the exact scores of a Gaussian mixture in
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

from evaluation.sliced_wasserstein import sliced_wasserstein
from lightning_modules.analytic import GaussianMixture
from lightning_modules.sde import make_sde
from lightning_modules.sde_samplers import (
    euler_maruyama,
    ode_log_likelihood,
    predictor_corrector,
    probability_flow_ode,
    probability_flow_ode_adaptive,
)
from lightning_modules.teachers import teacher_from_module

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
# `SDE` base class derives both once from $f$, $g$ and a score. A Gaussian mixture stays a Gaussian mixture
# under the forward process, so `GaussianMixture.score(x, m(t), s(t))` is the **exact** score at every
# $t$: whatever error remains is the sampler's, not a network's.
#
# Samplers, all from `sde_samplers.py`: `euler_maruyama` (reverse SDE), `predictor_corrector` (reverse
# diffusion predictor + one Langevin corrector step, snr 0.16), `probability_flow_ode` (Heun, 2 NFE per
# step) and the adaptive RK45 ODE solver. Each ends with Tweedie's denoising step (+1 NFE).

# %%
def exact_score(sde):
    return lambda x, tt: mixture.score(x, *sde.marginal(tt))


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
    score = exact_score(sde)
    x_T = sde.prior_sample((n_samp, 2), generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    n_sde = steps(1000, 200)
    if sde_name == "VP":
        runs["VP, Euler-Maruyama"] = (euler_maruyama(score, sde, x_T, n_sde, generator=g), n_sde + 1)
    runs[f"{sde_name}, predictor-corrector"] = (predictor_corrector(score, sde, x_T, steps(500, 100), generator=g), 2 * steps(500, 100) + 1)
    runs[f"{sde_name}, PF-ODE Heun"] = (probability_flow_ode(score, sde, x_T, steps(50, 25)), 2 * steps(50, 25) + 1)
    runs[f"{sde_name}, PF-ODE RK45"] = probability_flow_ode_adaptive(score, sde, x_T, rtol=1e-4, atol=1e-4)

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
# Below, 12 ODE paths (RK45 is not needed for a picture: Heun with 50 steps, recording the state by
# running the solver to intermediate end times).

# %%
x_T = vp.prior_sample((12, 2), generator=torch.Generator().manual_seed(5))
score = exact_score(vp)
ends = [1.0, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 1e-3]
# Each snapshot integrates from t=1 to an end time `e` (the sampler's eps) without the final denoising step.
paths = torch.stack([x_T] + [probability_flow_ode(score, vp, x_T, steps=50, eps=e, denoise=False) for e in ends[1:]])
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
# prior's log-density (Song et al. 2021, App. D.2). `ode_log_likelihood` does this with RK45 and
# Hutchinson's trace estimator (one Rademacher probe per point). With the exact score it must reproduce the
# mixture's true `log_prob`.

# %%
x_test = mixture.sample(steps(1000, 100), generator=torch.Generator().manual_seed(6))
start = time.perf_counter()
logp_ode, nfe_ll = ode_log_likelihood(exact_score(vp), vp, x_test, generator=torch.Generator().manual_seed(7))
secs = time.perf_counter() - start
logp_true = mixture.log_prob(x_test)
print(f"{len(x_test)} points, RK45 rtol=atol=1e-5, {nfe_ll} NFE, {secs:.1f} s")
print(f"mean log p, ODE (exact score): {logp_ode.mean().item():.4f} nats")
print(f"mean log p, true density:      {logp_true.mean().item():.4f} nats")
err = (logp_ode - logp_true).double()
se = err.std().item() / math.sqrt(len(err))
print(f"difference of the means {err.mean().item():+.4f} nats, standard error {se:.4f} "
      f"({abs(err.mean().item()) / se:.1f} standard errors); per-point std {err.std().item():.3f} (Hutchinson noise)")
assert abs(err.mean().item()) < 4 * se  # the ODE likelihood with the exact score is the true log-density
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
for label, sampler, k in (("PC", "pc", steps(250, 30)), ("Euler-Maruyama", "euler_maruyama", steps(500, 60)), ("PF-ODE Heun", "ode", steps(50, 10))):
    start = time.perf_counter()
    xs = vpsde_model.sample(n_eval, sampler=sampler, steps=k, generator=torch.Generator().manual_seed(8))
    learned[label] = (xs, vpsde_model.nfe(sampler, k), time.perf_counter() - start)
print(f"{'sampler':16s} {'NFE':>5s} {'sliced W1':>9s} {'seconds':>8s}   (floor {toy_floor:.4f}: {n_eval} true samples)")
learned_sw = {}
for label, (xs, nfe, s) in learned.items():
    learned_sw[label] = metric(xs)
    print(f"{label:16s} {nfe:5d} {learned_sw[label]:9.4f} {s:8.1f}")
best = min(learned_sw, key=learned_sw.get)
print(f"closest to the floor: {best} ({learned_sw[best] / toy_floor:.1f}x the floor); "
      f"the ODE at {learned['PF-ODE Heun'][1]} NFE: {learned_sw['PF-ODE Heun'] / toy_floor:.1f}x")
fig, axes = plt.subplots(1, 3, figsize=(8, 2.8), sharex=True, sharey=True)
truth = dm_toy.ground_truth(1000, torch.Generator().manual_seed(9))
for ax, (label, (xs, nfe, _)) in zip(axes, learned.items()):
    ax.scatter(*truth.T, s=1, c="0.75")
    ax.scatter(*xs[:1000].T, s=1, c="tab:blue")
    ax.set_title(f"learned VP, {label}, {nfe} NFE", fontsize=8)
    ax.set_aspect("equal")
fig.tight_layout()
plt.show()

# %% [markdown]
# With a learned score the samplers no longer agree. The stochastic samplers inject fresh noise at every
# step, which can partly correct the score's errors; the ODE follows the learned field
# deterministically and carries every error to the end (Song et al. 2021 also report slightly worse FID
# for the ODE than for PC). Which one wins here, and by how much, is in the printout above; it depends on the
# short training budget.

# %% [markdown]
# ### Bits per dimension
#
# `module.bits_per_dim(x, num_levels=None)` runs the same ODE likelihood through the learned score and
# reports $-\log p(x)/(D\ln 2)$ (continuous data: no dequantisation). The reference points: the same ODE
# with the exact score of the 8-Gaussian mixture, and the mixture's closed-form density, on the same
# held-out points.

# %%
angles = 2 * math.pi * torch.arange(8) / 8
eight = GaussianMixture(means=2.0 * torch.stack([angles.cos(), angles.sin()], 1), stds=0.2)
x_val = dm_toy.dataset("val").tensors["x"][: steps(200, 40)]
start = time.perf_counter()
bpd_learned, nfe_l = vpsde_model.bits_per_dim(x_val, num_levels=None, generator=torch.Generator().manual_seed(10))
secs = time.perf_counter() - start


class ExactScoreModel:
    """What bits_per_dim reads from a module (sde, score, eps), filled with the mixture's exact score."""

    sde, eps = vpsde_model.sde, vpsde_model.eps

    def score(self, x, tt, cond=None):
        return eight.score(x, *self.sde.marginal(tt))


from lightning_modules.sde_samplers import bits_per_dim  # noqa: E402

bpd_exact, nfe_e = bits_per_dim(ExactScoreModel(), x_val, num_levels=None, generator=torch.Generator().manual_seed(10))
bpd_true = -eight.log_prob(x_val) / (x_val.shape[1] * math.log(2))
def mean_se(v):
    v = v.double()
    return f"{v.mean().item():.4f} +- {v.std().item() / math.sqrt(len(v)):.4f}"


print(f"{len(x_val)} held-out points of 8gaussians, bits/dim (mean +- standard error; lower is better):")
print(f"  learned vpsde ({n_train} steps), ODE:  {mean_se(bpd_learned)}  ({nfe_l} NFE, {secs:.1f} s)")
print(f"  exact score, ODE:                  {mean_se(bpd_exact)}  ({nfe_e} NFE)")
print(f"  closed-form density:               {bpd_true.mean().item():.4f}")
print(f"  gap learned - exact score (same points): {mean_se(bpd_learned - bpd_exact)} bits/dim")
assert abs(bpd_exact.mean().item() - bpd_true.mean().item()) < 4 * bpd_exact.double().std().item() / math.sqrt(len(bpd_exact))

# %% [markdown]
# The exact-score row checks the estimator (it should sit within a couple of standard errors of the closed
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
# 18 steps = 35 NFE). Student: `model=consistency` (mode=distill, N = 18 Karras levels, l2, target EMA
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
    xs = model.sample(n_eval, sampler=sampler, steps=k, generator=torch.Generator().manual_seed(11))
    rows[label] = (xs, model.nfe(sampler, k), metric(xs), time.perf_counter() - start)
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
# without a teacher (`model.mode=train`, iCT) is the same module with another target; and the same idea
# yields a one-step policy in notebook 06.
