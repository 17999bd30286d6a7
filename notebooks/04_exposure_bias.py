# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Distribution shift along the noise path, and "DAgger for diffusion"
#
# A DDPM is trained only on forward-noised inputs x_t ~ q(x_t | x_0). A sampler instead feeds the net its
# own previous outputs, so every error moves the next input away from the training distribution. The same
# gap appears in imitation learning: behaviour cloning trains on expert states and then visits its own.
# DAgger (Ross et al. 2011) answers it by training on the states the learner visits, labelled by the expert.
# For diffusion the gap is called *exposure bias* (Ning et al. 2023, 2024). *Scheduled sampling* (Deng et
# al. 2023, after Bengio et al. 2015) is the DAgger-like fix: roll the net back from a higher level, then
# train it on the state it produced, with the true x_0 as the label.
#
# This notebook runs all of it on the 2-D swiss roll (`data=toy2d data.name=swiss_roll`, MLP denoiser),
# so each model trains in under a minute on one CPU thread:
# 1. what the net is trained on against what its samplers feed it;
# 2. the exposure-bias measurement of `lightning_modules/exposure_bias.py`;
# 3. a plain DDPM against two scheduled-sampling models, with the same data, seed and step count;
# 4. the cheap sampling-time fixes: epsilon scaling (Ning et al. 2024) and time-step shifting (Li et al. 2024).
#
# Every exposure figure is printed beside the quality figure. A smaller variance gap alone can mean that the
# samples collapsed. **All numbers come from one seed and short runs**, so nothing here is a recommendation.
# `benchmarks/exposure_bias.py` runs the same comparison over 3 seeds at full training length. Its table
# belongs in `benchmarks/RESULTS.md`, which had no exposure-bias section when this notebook was run.

# %%
import time

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from nbkit import SMALL, steps, compose, build, fit  # noqa: F401
from callbacks.exposure_bias import exposure_curve
from evaluation.eps_scale import search_eps_scale
from lightning_modules.exposure_bias import measure_exposure_bias

# One thread: on a 2-core machine shared with other jobs, two OpenMP threads were measured ~20x slower
# per training step than one; results do not depend on it.
torch.set_num_threads(1)

TOY = ("data=toy2d", "data.name=swiss_roll")
TRAIN_STEPS = steps(1500, 30)  # the toy's train.py default is 4000
SEED = 0

# %% [markdown]
# ## The plain model
# `build(*TOY, "model=ddpm")` is what `python train.py data=toy2d data.name=swiss_roll` composes: T = 1000
# linear-schedule levels, eps-prediction, Adam at lr 1e-3 and the residual MLP.

# %%
datamodule, plain = build(*TOY, "model=ddpm", seed=SEED)
cfg = plain.run_config["model"]
print(f"DDPM, T = {plain.num_timesteps}, {cfg['schedule']} schedule, ancestral variance = {cfg['sampling']['options']['variance']}, "
      f"lr {cfg['optimizer']['lr']}, batch {datamodule.batch_size}, "
      f"{sum(p.numel() for p in plain.net.parameters()) / 1e3:.0f}k parameters")
train_seconds = {"plain DDPM": fit(plain, datamodule, TRAIN_STEPS)}
print(f"trained {TRAIN_STEPS} steps in {train_seconds['plain DDPM']:.0f} s")

# %% [markdown]
# ## What the net is trained on, and what the sampler feeds it
# The top row shows the training inputs: held-out swiss-roll points pushed through `schedule.q_sample` to
# level t. The lower rows show the states that the trained model's own samplers reach at the same t,
# starting from x_T ~ N(0, I): the full ancestral chain (1000 steps) and DDIM with 10 steps. The states
# come from the `callback` of `module.sample`, which the quality runs below also use. If the sampler's
# cloud at a level differs from the top row, the net is being asked about inputs it never saw in training.
# The printed variance ratios are sensitive to a few far-out points, so the share of points outside the
# plotted square is printed beside them.

# %%
metric = datamodule.make_metric()
N_ANC = steps(500, 64)     # ancestral samples for the quality figure (1000 NFE each: the CPU cost)
N_FEW = steps(2000, 256)   # DDIM-10 samples
SHOW = [666, 333, 111, 0]  # levels that DDIM-10 visits (its grid is 999, 888, ..., 111, 0)
val_x = datamodule.dataset("val")[torch.arange(len(datamodule.dataset("val")))]["x"]
forward_states = {t: plain.schedule.q_sample(val_x, torch.full((len(val_x),), t),
                                             torch.randn(val_x.shape, generator=torch.Generator().manual_seed(t)))
                  for t in SHOW}

SAMPLERS = {"DDIM-10": ("ddim", 10, N_FEW), "ancestral": ("ancestral", None, N_ANC)}


def draw(module, sampler_name, keep=None, **fixes):
    """Samples from the module's own sampler, with the states at the SHOW levels when `keep` is a dict."""
    sampler, k, n = SAMPLERS[sampler_name]

    def watch(i, sigma, x):  # the samplers step in the VE form: back to the DDPM's level and VP coordinates
        t = int(module.level_of(sigma[:1]).round())
        if keep is not None and t in SHOW:
            keep[t] = x.clone() * torch.rsqrt(1 + sigma.double()[:, None] ** 2).to(x.dtype)

    return module.sample(n, sampler=sampler, steps=k, generator=torch.Generator().manual_seed(2024), callback=watch, **fixes)


visited, samples = {}, {}
for name in SAMPLERS:
    visited[name] = {}
    samples[("plain DDPM", name, "")] = draw(plain, name, visited[name])

fig, axes = plt.subplots(3, len(SHOW) + 1, figsize=(2.0 * (len(SHOW) + 1), 6.2), sharex=True, sharey=True)
rows = [("training input q(x_t|x_0)", forward_states)] + [(f"{n} sampler", visited[n]) for n in SAMPLERS]
for r, (label, states) in enumerate(rows):
    for c, t in enumerate(SHOW):
        ax = axes[r, c]
        if r > 0:
            ax.scatter(*forward_states[t][:1000].T.numpy(), s=1, c="0.8")
        ax.scatter(*states[t][:1000].T.numpy(), s=1, c="tab:blue" if r else "0.3")
        ax.set_title(f"{label.split(' ')[0]}: t = {t}", fontsize=7)
    final = val_x if r == 0 else samples[("plain DDPM", rows[r][0].split(" ")[0], "")]
    axes[r, -1].scatter(*final[:1000].T.numpy(), s=1, c="0.3" if r == 0 else "tab:orange")
    axes[r, -1].set_title("data" if r == 0 else "output x_0", fontsize=7)
    axes[r, 0].set_ylabel(label, fontsize=7)
for ax in axes.flat:
    ax.set_xlim(-3.5, 3.5)
    ax.set_ylim(-3.5, 3.5)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=6)
fig.suptitle("grey: training inputs at the same level; blue: what the sampler visits", fontsize=8)
fig.tight_layout()
plt.show()

for name in SAMPLERS:
    ratio = [float(visited[name][t].var(0).mean() / forward_states[t].var(0).mean()) for t in SHOW]
    outside = [float((visited[name][t].abs() > 3.5).any(1).float().mean()) for t in SHOW]
    print(f"{name:>9}: variance of the visited cloud / of the training inputs at t = {SHOW}: "
          + ", ".join(f"{v:.3f}" for v in ratio)
          + "; share of visited points outside the plotted square: " + ", ".join(f"{v:.1%}" for v in outside))
print(f"training inputs outside the square at t = 0: {float((forward_states[0].abs() > 3.5).any(1).float().mean()):.1%}")

# %% [markdown]
# ## Measuring exposure bias
# `measure_exposure_bias(module, x0, sampler, steps)` follows Ning et al. 2024. It starts each sampler run
# from x_T = q_sample(x0, T-1, z) for a real held-out x0, then compares the visited x^_t with
# q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) at every step:
# - `sampler_var` vs `q_var`: the spread of x^_t around sqrt(abar_t) x0 against the forward process's
#   spread. Ning's delta_t = (sqrt(sampler_var) - sqrt(q_var))^2, and `delta_sum` adds it over the visited steps.
# - `err_sampler` vs `err_forward`: the denoiser's x0 error on the sampler's inputs against fresh
#   forward-noised inputs at the same level.
# - `marginal_var_sampler` vs `marginal_var_forward`: the spread of the visited states across rows,
#   without conditioning on x0, against that of forward-noised data.
#
# Read them with the module docstring's cautions. A sampler started from x_T forgets most of x0
# (sqrt(abar_T) ~ 0.006). So even a perfect denoiser ends with sampler_var >> q_var at small t, and its x0
# error there is the distance to *another* plausible point, not to x0. Both per-sample columns therefore
# mix exposure bias with this forgetting, and they are for comparing models and samplers with each other.
# Only the marginal columns must agree (ratio 1) for an exact sampler. And `delta_sum` adds 10 terms for
# DDIM-10 but 1000 for ancestral, so compare it only within one sampler.
# `callbacks.exposure_bias.exposure_curve` draws the project's picture of one result.

# %%
N_EXPOSE = {"DDIM-10": steps(512, 64), "ancestral": steps(128, 32)}
x0_expose = val_x[:max(N_EXPOSE.values())]


def expose(module, sampler_name, **fixes):
    sampler, k, _ = SAMPLERS[sampler_name]
    return measure_exposure_bias(module, x0_expose[:N_EXPOSE[sampler_name]], sampler, k,
                                 torch.Generator().manual_seed(1), **fixes)


exposure = {("plain DDPM", name, ""): expose(plain, name) for name in SAMPLERS}
for name in SAMPLERS:
    result = exposure[("plain DDPM", name, "")]
    backend = matplotlib.get_backend()
    picture = exposure_curve(result, f"plain DDPM, {name} ({result['nfe']} NFE), {N_EXPOSE[name]} held-out x0")
    plt.switch_backend(backend)  # exposure_curve switches matplotlib to Agg, which would hide later figures
    plt.figure(figsize=(8, 3))
    plt.imshow(picture)
    plt.axis("off")
    plt.show()
    marginal = result["marginal_var_sampler"] / result["marginal_var_forward"]
    print(f"{name}: delta_sum {result['delta_sum']:.3g}; marginal variance sampler/forward from "
          f"{float(marginal.min()):.3f} to {float(marginal.max()):.3f} over the visited steps "
          f"({float(marginal[-1]):.3f} at the last one, t = {float(result['t'][-1]):.0f})")

# %% [markdown]
# ## Scheduled sampling: train on your own states
# `model=scheduled_sampling` (`ScheduledSamplingDDPM`) is DDPM with another training input. With
# probability p, rising linearly from 0 to 0.8 over training, it noises x0 to level t+m, lets the current
# net take m steps down without gradient, and trains at level t on that rolled-back x~_t. The label is the
# eps implied by the *true* x0. The roll-back step is a config option:
# - `renoise` (the published code's variant): predict x0_hat, then re-noise it to level t with fresh noise;
# - `ancestral`: the model's own p(x_t | x_{t+1});
# - `sampler_step`: one DDIM step of stride `ss_stride`. With `model.sampling.steps=10` the stride is
#   T // 10 = 100, so the net rolls in exactly the way DDIM-10 moves at sampling time.
#
# We train `renoise` and `sampler_step` with the plain model's data, seed and step count. The extra cost
# is at most one forward pass per rolled-back row, with no extra backward pass.

# %%
VARIANTS = {
    "SS renoise": ["model=scheduled_sampling", "model.ss_rollback=renoise"],
    "SS sampler_step (stride 100)": ["model=scheduled_sampling", "model.ss_rollback=sampler_step", "model.sampling.steps=10"],
}
models = {"plain DDPM": plain}
for name, overrides in VARIANTS.items():
    _, models[name] = build(*TOY, *overrides, seed=SEED)
    train_seconds[name] = fit(models[name], datamodule, TRAIN_STEPS)
    m = models[name]
    print(f"{name}: rollback={m.ss_rollback}, stride {m.ss_stride}, p {m.p_start}->{m.p_end}; "
          f"{TRAIN_STEPS} steps in {train_seconds[name]:.0f} s (plain: {train_seconds['plain DDPM']:.0f} s)")

for name in VARIANTS:
    for sampler_name in SAMPLERS:
        samples[(name, sampler_name, "")] = draw(models[name], sampler_name)
        exposure[(name, sampler_name, "")] = expose(models[name], sampler_name)

# %% [markdown]
# ## The cheap fixes: change the sampler, not the training
# - **Epsilon scaling** (Ning et al. 2024): the sampler uses eps / lambda, where lambda is a little above 1.
#   This shrinks the predicted noise that the net over-estimates on its own inputs. `sample(..., eps_scale=)`
#   sets it per call. We pick lambda for DDIM-10 with the project's `search_eps_scale`, a paired search by
#   the quality figure. It is scored on the same reference as the table below, so the picked scale's number
#   is optimistic. For the ancestral chain we take lambda = 1.01 without a search, to save CPU time.
# - **Time-step shifting** (Li et al. 2024): at each step, re-pick the level within +-window of the nominal
#   one whose forward variance best fits the current state (`time_shift_window=5`). The rule matches each
#   sample's variance over its *elements*. A 2-D point has only two elements, so the docstring warns that on
#   the toy this choice is mostly noise. We show it on DDIM-10 anyway, as the API call.

# %%
scales = [1.0, 1.005, 1.01, 1.02, 1.03] if not SMALL else [1.0, 1.01]
search = search_eps_scale(plain, metric, scales, N_FEW, "ddim", 10, seed=2024)
print("DDIM-10, plain DDPM, sliced W1 by eps_scale: "
      + ", ".join(f"{s:g}: {v:.4f}" for s, v in zip(search["scales"], search["values"]))
      + f"  -> best {search['best_scale']:g}")
# The table shows the best scale other than 1.0 (if 1.0 wins, the search itself is the result).
scale_ddim = min((s for s in search["scales"] if s != 1.0), key=lambda s: search["values"][search["scales"].index(s)])
FIXES = {
    ("DDIM-10", f"eps_scale {scale_ddim:g}"): {"eps_scale": scale_ddim},
    ("DDIM-10", "time_shift 5"): {"time_shift_window": 5},
    ("ancestral", "eps_scale 1.01"): {"eps_scale": 1.01},
}
for (sampler_name, fix), kwargs in FIXES.items():
    samples[("plain DDPM", sampler_name, fix)] = draw(plain, sampler_name, **kwargs)
    exposure[("plain DDPM", sampler_name, fix)] = expose(plain, sampler_name, **kwargs)

# %% [markdown]
# ## The table: quality beside exposure
# Quality is the toy's `sliced_w1` (sliced Wasserstein-1 to 5000 fresh ground-truth points; lower is better).
# The floor is what a fresh true sample of the same size scores. `metric.floor(N)` scores one such sample,
# and at these N that number moves a lot from draw to draw. So we score 10 fresh true sets from
# `datamodule.ground_truth` and print their mean and standard deviation. The sd is the metric's own noise at
# that N, and a model a little below the mean floor is within it. `delta_sum`, the error ratio (mean over visited steps of
# err_sampler / err_forward) and the marginal variance ratio at the last visited step (1 for an exact
# sampler) come from `measure_exposure_bias`, on 512 (DDIM-10) or 128 (ancestral) held-out points.

# %%
floors = {}
for n in sorted({len(x) for x in samples.values()}):
    true_scores = torch.tensor([metric(datamodule.ground_truth(n, torch.Generator().manual_seed(100 + i))) for i in range(10)])
    floors[n] = (float(true_scores.mean()), float(true_scores.std()))
    print(f"sliced_w1 of true samples, N = {n}: {floors[n][0]:.4f} +- {floors[n][1]:.4f} over 10 sets "
          f"(metric.floor({n}), one set: {metric.floor(n):.4f})")

table = []
for (model_name, sampler_name, fix), x in samples.items():
    ex = exposure[(model_name, sampler_name, fix)]
    table.append({
        "model": model_name, "sampler": sampler_name, "fix": fix or "-", "N": len(x),
        "quality": metric(x), "floor": floors[len(x)][0], "floor_sd": floors[len(x)][1], "delta_sum": ex["delta_sum"],
        "err_ratio": float((ex["err_sampler"] / ex["err_forward"]).mean()),
        "marg_var_ratio": float(ex["marginal_var_sampler"][-1] / ex["marginal_var_forward"][-1]),
    })
table.sort(key=lambda r: (r["sampler"], r["fix"] != "-", r["model"]))
print(f"\n{'model':<30}{'sampler':<11}{'fix':<16}{'N':>5}{'sliced_w1':>11}{'floor (sd)':>17}{'delta_sum':>11}"
      f"{'err ratio':>11}{'marg. var ratio':>17}")
for r in table:
    floor = f"{r['floor']:.4f} ({r['floor_sd']:.4f})"
    print(f"{r['model']:<30}{r['sampler']:<11}{r['fix']:<16}{r['N']:>5}{r['quality']:>11.4f}{floor:>17}"
          f"{r['delta_sum']:>11.3g}{r['err_ratio']:>11.3g}{r['marg_var_ratio']:>17.3f}")
print(f"\none seed ({SEED}), {TRAIN_STEPS} training steps per model (train.py's toy default is 4000)")

# %%
fig, axes = plt.subplots(3, 2, figsize=(9, 7.5), sharex="col")
for c, sampler_name in enumerate(SAMPLERS):
    for model_name in models:
        ex = exposure[(model_name, sampler_name, "")]
        axes[0, c].plot(ex["t"].numpy(), (ex["sampler_var"] / ex["q_var"]).numpy(), label=model_name)
        axes[1, c].plot(ex["t"].numpy(), (ex["err_sampler"] / ex["err_forward"]).numpy(), label=model_name)
        axes[2, c].plot(ex["t"].numpy(), (ex["marginal_var_sampler"] / ex["marginal_var_forward"]).numpy(), label=model_name)
    axes[0, c].set(yscale="log", title=f"{sampler_name}: sampler_var / q_var (per sample, Ning et al.)")
    axes[1, c].set(yscale="log", title=f"{sampler_name}: x0 error, sampler input / forward input")
    axes[2, c].set(xlabel="t (sampling runs right to left)", title=f"{sampler_name}: marginal variance, sampler / forward (1 = exact)")
    for ax in axes[:, c]:
        ax.axhline(1, color="0.6", lw=0.8)
    for ax in axes[:, c]:
        ax.invert_xaxis()
        ax.title.set_fontsize(8)
        ax.tick_params(labelsize=7)
axes[0, 0].legend(fontsize=7)
fig.tight_layout()
plt.show()

# %%
fig, axes = plt.subplots(len(SAMPLERS), len(models), figsize=(2.6 * len(models), 2.6 * len(SAMPLERS)), sharex=True, sharey=True)
for r, sampler_name in enumerate(SAMPLERS):
    for c, model_name in enumerate(models):
        x = samples[(model_name, sampler_name, "")]
        q = next(t["quality"] for t in table if (t["model"], t["sampler"], t["fix"]) == (model_name, sampler_name, "-"))
        axes[r, c].scatter(*val_x[:1000].T.numpy(), s=1, c="0.8")
        axes[r, c].scatter(*x[:1000].T.numpy(), s=1, c="tab:blue")
        axes[r, c].set_title(f"{model_name}\n{sampler_name}: sliced W1 {q:.3f}", fontsize=7)
        axes[r, c].set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal")
        axes[r, c].tick_params(labelsize=6)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Reading it
# The lines below are computed from the table, so they hold for this run whatever the numbers come out to.
# They compare each change with the plain DDPM under the same sampler. A lower `delta_sum` counts as a win
# only if the quality figure does not get worse. A quality change smaller than the floor's sd at that N is
# called "about the same", and so is a `delta_sum` change under 10%: a single seed cannot resolve either.
# The marginal variance ratio at the last visited step is printed beside them, because a sampler whose
# states are narrower than the data's (ratio < 1) can lower `delta_sum` simply by collapsing.

# %%
def row(model, sampler, fix="-"):
    return next(r for r in table if (r["model"], r["sampler"], r["fix"]) == (model, sampler, fix))


misleading = []
for sampler_name in SAMPLERS:
    base = row("plain DDPM", sampler_name)
    for r in table:
        if r["sampler"] != sampler_name or r is base:
            continue
        dq = r["quality"] - base["quality"]
        dd = (r["delta_sum"] - base["delta_sum"]) / base["delta_sum"]
        q_word = "about the same" if abs(dq) < r["floor_sd"] else ("better" if dq < 0 else "worse")
        d_word = "about the same" if abs(dd) < 0.1 else ("lower" if dd < 0 else "higher")
        verdict = (f"samples {q_word}, delta_sum {d_word}, marginal variance ratio "
                   f"{base['marg_var_ratio']:.2f} -> {r['marg_var_ratio']:.2f}")
        if d_word == "lower" and q_word == "worse":
            verdict += ": a smaller exposure figure with worse samples, so delta_sum must not be read alone"
            misleading.append((sampler_name, r["model"], r["fix"]))
        label = r["model"] if r["fix"] == "-" else f"plain DDPM + {r['fix']}"
        print(f"{sampler_name:>9} | {label:<30} sliced W1 {base['quality']:.4f} -> {r['quality']:.4f}, "
              f"delta_sum {base['delta_sum']:.3g} -> {r['delta_sum']:.3g}: {verdict}")
gap = row("plain DDPM", "DDIM-10")["quality"] / row("plain DDPM", "ancestral")["quality"]
print(f"\nplain DDPM: DDIM-10's sliced W1 is {gap:.1f}x the ancestral chain's on this toy and training length.")
print("One seed and short runs: differences smaller than the seed-to-seed spread (benchmarks/exposure_bias.py "
      "measures it over 3 seeds) are not evidence either way.")
assert all(np.isfinite(r["delta_sum"]) and r["delta_sum"] > 0 for r in table)
if not SMALL:  # the claims this notebook's text makes, at its default settings
    assert gap > 2, gap  # the deterministic 10-step sampler is clearly worse than the full chain on this toy
    assert row("SS sampler_step (stride 100)", "DDIM-10")["quality"] > row("plain DDPM", "DDIM-10")["quality"]
    assert misleading, "no row shows a lower delta_sum with worse samples, which the text above says can happen"
