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
# # 03 · DDPM: the forward process, L_simple, ancestral sampling and DDIM
#
# This notebook follows the DDPM part of the lecture (Ho et al. 2020) on scikit-learn's 8x8 handwritten
# digits. It covers the noising process q(x_t | x_0) in closed form, the noise schedule, the training loss
# L_simple, then sampling with the full ancestral chain and with DDIM (Song et al. 2021) in a few steps,
# each scored against its floor. Every step calls difflab's own code: `build()` composes exactly what
# `python train.py` composes (`data=digits`, `model=ddpm`, `net=unet_small`), and the schedule, loss,
# samplers and metric come from `lightning_modules/` and `evaluation/`.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from nbkit import SMALL, steps, compose, build, fit  # noqa: F401
from lightning_modules.schedules import DiscreteSchedule, make_betas

# One thread: on a 2-core machine shared with other jobs, two OpenMP threads were measured ~20x slower
# per training step than one (they spin-wait on each other); results do not depend on it.
torch.set_num_threads(1)

# `python train.py` with one change: lr 1e-3 instead of 2e-4 (the README's own example uses 1e-3), so that a
# short CPU run gives recognisable digits. Seed 42, train.py's default.
datamodule, module = build("model.optimizer.lr=1e-3")
cfg = module.run_config["model"]
print(f"{type(module).__name__} with {type(module.net).__name__} "
      f"({sum(p.numel() for p in module.net.parameters()) / 1e6:.2f}M parameters), data shape {datamodule.data_shape}")
print(f"T = {module.num_timesteps}, schedule = {cfg['schedule']} (betas {cfg['beta_start']}..{cfg['beta_end']}), "
      f"prediction = {cfg['prediction']}, clip_denoised = {cfg['clip_denoised']}, lr = {cfg['optimizer']['lr']}, "
      f"batch = {datamodule.batch_size}")

# %% [markdown]
# ## The data
# 1797 grey 8x8 digits with pixel values 0..16, scaled to [-1, 1]. The datamodule keeps 20% (359 images)
# as a held-out split. That split is also the floor of the quality figure at the end.

# %%
train_x = datamodule.dataset("train")[torch.arange(64)]["x"]
print("train / val images:", len(datamodule.dataset("train")), "/", len(datamodule.dataset("val")),
      "| pixel range", float(train_x.min()), "..", float(train_x.max()))
plt.figure(figsize=(3, 3))
plt.imshow(datamodule.render(train_x))
plt.axis("off")
plt.title("64 training digits", fontsize=9)
plt.show()

# %% [markdown]
# ## The forward process in closed form
# DDPM adds Gaussian noise in T = 1000 small steps, x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps.
# Composing the steps gives q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), with abar_t the product of
# (1 - beta_s) over s <= t. So any x_t is one draw away from x_0, and that is what training uses.
# `schedule.q_sample(x0, t, eps)` implements this draw. Below, one digit is noised with the *same* eps at
# several t. The project indexes t from 0, so t = 999 is the paper's t = T.

# %%
schedule = module.schedule
levels = [0, 50, 100, 200, 300, 500, 700, 999]
x0 = train_x[:1].expand(len(levels), -1, -1, -1)
eps = torch.randn(x0[:1].shape, generator=torch.Generator().manual_seed(0)).expand_as(x0)
x_t = schedule.q_sample(x0, torch.tensor(levels), eps)

fig, axes = plt.subplots(1, len(levels), figsize=(1.2 * len(levels), 1.6))
for ax, t, img in zip(axes, levels, x_t):
    ax.imshow(datamodule.render(img[None]))
    ax.set_title(f"t={t}\nabar={float(schedule.alphas_cumprod[t]):.3f}", fontsize=7)
    ax.axis("off")
plt.show()
print("pixel values outside [-1, 1] are clipped only for display; x_t itself has std",
      [round(float(v.std()), 2) for v in x_t])

# %% [markdown]
# ## The schedule: abar_t and the signal-to-noise ratio
# SNR(t) = abar_t / (1 - abar_t) is the ratio of signal to noise variance in q(x_t | x_0). Ho et al.'s
# linear betas (1e-4..0.02) spend many steps at low SNR, where the digit is already gone. Nichol & Dhariwal's
# cosine schedule (`model.schedule=cosine`, built here by the same `make_betas`) lowers it more evenly.
# Both end close to SNR = 0, so x_T ~ N(0, I) is a valid start for sampling.

# %%
cosine = DiscreteSchedule(make_betas("cosine", module.num_timesteps))
t_axis = np.arange(module.num_timesteps)
fig, (left, right) = plt.subplots(1, 2, figsize=(8, 2.8))
for name, sch in (("linear (default)", schedule), ("cosine", cosine)):
    abar = sch.alphas_cumprod.double()
    left.plot(t_axis, abar.numpy(), label=name)
    right.plot(t_axis, torch.log10(abar / (1 - abar)).numpy(), label=name)
left.set(xlabel="t", ylabel="abar_t", title="abar_t")
right.set(xlabel="t", ylabel="log10 SNR", title="log10 SNR(t) = log10 abar/(1-abar)")
left.legend(fontsize=8)
right.axhline(0, color="0.6", lw=0.8)
fig.tight_layout()
plt.show()
for name, sch in (("linear", schedule), ("cosine", cosine)):
    abar = sch.alphas_cumprod.double()
    print(f"{name}: abar at t=999 = {float(abar[-1]):.2e} (SNR {float(abar[-1] / (1 - abar[-1])):.1e}); "
          f"SNR falls below 1 at t = {int((abar < 0.5).nonzero()[0])} of 1000")
# closed forms: abar_999 = prod(1 - beta_t) for Ho et al.'s betas; the cosine schedule's SNR crosses 1 near T/2
assert abs(float(schedule.alphas_cumprod[-1]) / float(torch.prod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))) - 1) < 1e-4
assert 480 < int((cosine.alphas_cumprod < 0.5).nonzero()[0]) < 520

# %% [markdown]
# ## The loss: L_simple
# Ho et al.'s simplified objective (their eq. 14) draws t uniformly, builds x_t with `q_sample` and regresses
# the net's output on the eps that made it: L_simple = E ||eps - eps_theta(x_t, t)||^2. `module.loss(batch)`
# is exactly that. A net that always answers 0 scores E[eps^2] = 1. We score the held-out split with fixed
# t and noise (the `val/loss` of training) before and after training.

# %%
def val_loss(module) -> float:
    was_training = module.training
    module.eval()  # dropout off, as in validation
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        losses = [module.loss(batch, generator=generator) for batch in datamodule.val_dataloader()]
    module.train(was_training)  # Lightning keeps the mode it finds, so training must start in train mode
    return float(torch.stack(losses).mean())


loss_before = val_loss(module)
print(f"L_simple on the held-out digits, untrained net: {loss_before:.3f}")

# %% [markdown]
# ## Training
# `fit` runs Lightning's `Trainer` with the run's optimizer (Adam, here lr 1e-3 after 200 warm-up steps) and
# an EMA of the weights (decay 0.999), and leaves the EMA weights in the module. `python train.py` trains for
# 3000 steps at lr 2e-4. Here we train for 800 steps (printed below) to keep the notebook to a few CPU minutes.
# The samples are therefore rougher than the default run's (README: digits_frechet 18.5 after 3000 steps,
# floor 14.7).

# %%
train_steps = steps(800, 20)
seconds = fit(module, datamodule, train_steps)
loss_after = val_loss(module)
print(f"trained {train_steps} steps (batch {datamodule.batch_size}) in {seconds:.0f} s; "
      f"held-out L_simple {loss_before:.3f} -> {loss_after:.3f} (EMA weights)")
assert 0.95 < loss_before < 1.05  # an untrained net predicts ~0, and eps has unit variance
assert loss_after < (0.2 if not SMALL else loss_before)

# %% [markdown]
# ## Reverse process: what a sampler walks through
# Sampling runs the chain backwards from x_T ~ N(0, I). Ancestral sampling (Ho et al. 2020, Algorithm 2)
# takes all 1000 steps. Each step moves to the mean of p_theta(x_{t-1} | x_t) and adds noise of variance
# beta_t (`model.sampling.options.variance=beta`). DDIM (Song et al. 2021) uses the same trained net but jumps between a few
# levels deterministically (eta = 0). The `callback` of `module.sample` shows every state a DDIM-10 run visits.

# %%
visited = []
module.sample(4, sampler="ddim", steps=10, generator=torch.Generator().manual_seed(1),
              callback=lambda i, t, x: visited.append((int(t[0]), x.clone())))
final = module.sample(4, sampler="ddim", steps=10, generator=torch.Generator().manual_seed(1))
fig, axes = plt.subplots(1, len(visited) + 1, figsize=(1.1 * (len(visited) + 1), 1.6))
for ax, (t, x) in zip(axes, visited):
    ax.imshow(datamodule.render(x))
    ax.set_title(f"t={t}", fontsize=7)
    ax.axis("off")
axes[-1].imshow(datamodule.render(final))
axes[-1].set_title("x_0", fontsize=7)
axes[-1].axis("off")
plt.show()

# %% [markdown]
# ## Samples and their quality
# The quality figure is `datamodule.make_metric()`: a Fréchet distance between Gaussian fits of features
# from a small CNN digit classifier that the project trains once and caches (`evaluation/digits_classifier.py`,
# the digits analogue of FID), measured against the training split. Its floor is what the 359 held-out real
# digits score. The estimate is biased upwards when the sample is small, so values are only comparable at
# equal N. The full chain costs 1000 network evaluations per sample, so on this CPU we draw fewer ancestral
# samples. Each sampler is therefore scored at a common N, beside a floor at the same N: the mean and sd over
# 10 random N-subsets of the held-out digits. DDIM is also scored at N = 359, where the project's own floor
# applies.

# %%
metric = datamodule.make_metric()
val_x = datamodule.dataset("val")[torch.arange(len(datamodule.dataset("val")))]["x"]
n_common = steps(128, 16)
n_full = steps(len(val_x), 32)
floor_full = metric.floor()
subsets = [torch.randperm(len(val_x), generator=torch.Generator().manual_seed(i))[:n_common] for i in range(10)]
floor_draws = torch.tensor([metric(val_x[idx]) for idx in subsets])
floor_common, floor_sd = float(floor_draws.mean()), float(floor_draws.std())
print(f"digits_frechet floor: {floor_full:.2f} (all 359 held-out digits); "
      f"{floor_common:.2f} +- {floor_sd:.2f} for random subsets of {n_common} of them")

runs = {  # name: (sampler, steps, number of samples)
    "ancestral (1000 NFE)": ("ancestral", None, n_common),
    "DDIM-50": ("ddim", 50, n_full),
    "DDIM-10": ("ddim", 10, n_full),
}
samples, rows = {}, []
for name, (sampler, k, n) in runs.items():
    start = time.perf_counter()
    x = module.sample(n, sampler=sampler, steps=k, generator=torch.Generator().manual_seed(2024))
    secs = time.perf_counter() - start
    samples[name] = x
    at_common = metric(x[:n_common])
    at_full = metric(x) if n == n_full else float("nan")
    rows.append((name, module.nfe(sampler, k), n, secs, at_common, at_full))

print(f"\n{'sampler':<22}{'NFE':>6}{'N':>6}{'seconds':>9}   frechet@N={n_common} (floor {floor_common:.1f}+-{floor_sd:.1f})"
      f"   frechet@N={n_full} (floor {floor_full:.2f})")
for name, nfe, n, secs, a, b in rows:
    print(f"{name:<22}{nfe:>6}{n:>6}{secs:>9.1f}   {a:>30.2f}   {'-' if np.isnan(b) else f'{b:.2f}':>26}")

# %%
fig, axes = plt.subplots(1, len(samples), figsize=(3 * len(samples), 3.2))
for ax, (name, x) in zip(axes, samples.items()):
    ax.imshow(datamodule.render(x[:36]))
    ax.set_title(name, fontsize=9)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## What the numbers say
# Read the table above together with the settings: one seed, 800 training steps at lr 1e-3 (not the default
# 3000 at 2e-4) and 128 ancestral samples. The line below is computed from the table rather than written in advance.

# %%
best = min(rows, key=lambda r: r[4])
print(f"lowest digits_frechet at N={n_common}: {best[0]} ({best[4]:.2f}, floor {floor_common:.2f} +- {floor_sd:.2f}); "
      + ", ".join(f"{r[0]} {r[4]:.2f}" for r in rows if r is not best))
for name, _, _, _, value, _ in rows:
    z = (value - floor_common) / floor_sd
    print(f"  {name}: {z:+.1f} floor sds from the floor at N={n_common}"
          + (" (N is too small to tell it from real digits)" if abs(z) < 1 else ""))
print(f"differences between samplers smaller than ~{floor_sd:.0f} at N={n_common} are within the metric's own noise")
ddim10, ddim50 = rows[2][5], rows[1][5]
print(f"DDIM-10 vs DDIM-50 at N={n_full}: {ddim10:.2f} vs {ddim50:.2f}, "
      f"{100 * (ddim10 - ddim50) / ddim50:+.0f}% for 5x fewer network evaluations")
print(f"the full chain took {rows[0][3] / max(rows[2][3], 1e-9) * n_full / n_common:.0f}x more time per sample than DDIM-10")
assert 14.0 < floor_full < 15.5 and [r[1] for r in rows] == [1000, 50, 10]
if not SMALL:  # what the text below says, at the default settings
    assert ddim50 < ddim10 and all(r[4] > 0.5 * floor_common for r in rows), rows
