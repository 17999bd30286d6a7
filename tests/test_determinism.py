"""Every loss and every sampler draws its randomness from the generator it is given, and from nothing else:
the same generator seed gives the same loss (validation relies on it: val/loss uses fixed noise so successive
values compare) and the same samples, another seed other ones, and the global RNG is left untouched (a draw that
missed the generator would move it, and make runs depend on what else drew from it)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lightning_modules.bc_mse import BCMSE
from lightning_modules.consistency_distillation import ConsistencyDistillation
from lightning_modules.consistency_training import ConsistencyTraining
from lightning_modules.ddpm import DDPM
from lightning_modules.edm import EDM
from lightning_modules.ncsn import NCSN
from lightning_modules.nets import MLP
from lightning_modules.scheduled_sampling import ScheduledSamplingDDPM
from lightning_modules.score_sde import ScoreSDE
from lightning_modules.teachers import FunctionTeacher

ADAM = partial(torch.optim.Adam, lr=1e-3)


def net(cond_dim=None):
    torch.manual_seed(0)
    return MLP((2,), cond_dim=cond_dim, hidden=16, depth=1, emb_dim=8)


def consistency_distill():
    model = ConsistencyDistillation(net(), ADAM, data_shape=(2,), num_scales=10, mu=0.5)
    model.attach_teacher(FunctionTeacher(lambda x, s, c=None: (x / (1 + s[:, None] ** 2)).to(x.dtype), 0.002, 80.0))
    return model


METHODS = {
    "ddpm": lambda: DDPM(net(), ADAM, data_shape=(2,), num_timesteps=20, input_perturbation=0.1, sampling={"steps": 4, "options": {"eta": 1.0}}),
    "ncsn": lambda: NCSN(net(), ADAM, data_shape=(2,), num_scales=4, sampling={"steps": 2}),
    "vesde": lambda: ScoreSDE(net(), ADAM, data_shape=(2,), sde="ve", sampling={"steps": 4}),
    "vpsde": lambda: ScoreSDE(net(), ADAM, data_shape=(2,), sde="vp", likelihood_weighting=True, sampling={"steps": 25}),
    "subvpsde": lambda: ScoreSDE(net(), ADAM, data_shape=(2,), sde="subvp", sampling={"steps": 25}),
    "edm": lambda: EDM(net(), ADAM, data_shape=(2,), sampling={"steps": 3, "options": {"s_churn": 5.0}}),
    "consistency_train": lambda: ConsistencyTraining(net(), ADAM, data_shape=(2,), total_steps=100),
    "consistency_distill": consistency_distill,
    "scheduled_sampling": lambda: ScheduledSamplingDDPM(net(), ADAM, data_shape=(2,), num_timesteps=20,
                                                        max_rollback=2, p_start=1.0, p_end=1.0, total_steps=10, sampling={"steps": 4}),
    "bc_mse": lambda: BCMSE(net(cond_dim=3), ADAM, data_shape=(2,), cond_dim=3),
}


def batch(module):
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    cond = None if module.cond_dim is None else torch.randn(64, module.cond_dim, generator=torch.Generator().manual_seed(4))
    return {"x": x} if cond is None else {"x": x, "cond": cond}


def untouched_global_rng(fn):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    out = fn()
    assert torch.equal(torch.get_rng_state(), before), "drew from the global RNG instead of the generator"
    return out


@pytest.mark.parametrize("name", list(METHODS))
def test_the_loss_is_a_function_of_the_batch_and_the_generator(name):
    module = METHODS[name]()
    module.train()  # scheduled sampling rolls back only in training
    b = batch(module)
    first = untouched_global_rng(lambda: module.loss(b, torch.Generator().manual_seed(7)))
    again = untouched_global_rng(lambda: module.loss(b, torch.Generator().manual_seed(7)))
    assert torch.equal(first, again)
    if name != "bc_mse":  # regression draws nothing
        assert not torch.equal(first, module.loss(b, torch.Generator().manual_seed(8)))
    module.eval()  # the validation path (scheduled sampling: DDPM's own loss)
    val = module.loss(b, torch.Generator().manual_seed(7))
    assert torch.equal(val, module.loss(b, torch.Generator().manual_seed(7)))


SAMPLERS = [(name, sampler) for name, make in METHODS.items() for sampler in make().samplers()]


def cheap(module, sampler: str) -> dict:
    """A short setting of each registry sampler (what is checked is where the randomness comes from, not quality):
    2 levels where the grid is free, few Langevin steps, a loose adaptive solve; fixed grids keep theirs."""
    if sampler in module.fixed_grid or sampler == "direct":
        opts = {}
    else:
        opts = {"steps": 2}
    if sampler == "annealed_langevin":
        opts["n_steps_each"] = 2
    elif sampler == "langevin":
        opts["n_steps"] = 4
    elif sampler == "ode_adaptive":
        opts.update(rtol=1e-3, atol=1e-3)
    return opts


@pytest.mark.parametrize("name,sampler", SAMPLERS, ids=[f"{n}-{s}" for n, s in SAMPLERS])
def test_samples_are_a_function_of_the_generator(name, sampler):
    module = METHODS[name]().eval()
    cond = None if module.cond_dim is None else torch.randn(5, module.cond_dim, generator=torch.Generator().manual_seed(4))
    opts = cheap(module, sampler)
    draw = lambda seed: module.sample(5, cond=cond, sampler=sampler, generator=torch.Generator().manual_seed(seed), **opts)  # noqa: E731
    first = untouched_global_rng(lambda: draw(11))
    assert torch.equal(first, untouched_global_rng(lambda: draw(11)))
    if sampler != "direct":  # regression is deterministic; every other sampler starts from the generator's noise
        assert not torch.equal(first, draw(12)), "the generator's seed changed nothing"
