"""The EMA callback against an EMA recomputed by hand from the raw weights recorded after every step: the
warm-up decay, the lerp weight, update_every_n_steps, a resume in the middle, and the swap of the EMA weights
in for validation (and the sampling callbacks) and back out for training."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from callbacks.ema import EMA, ema_weights
from datamodules.toy2d import Toy2DDataModule
from lightning_modules.ddpm import DDPM
from lightning_modules.nets import MLP


def toy_model() -> DDPM:
    torch.manual_seed(0)
    model = DDPM(MLP((2,), hidden=16, depth=1, emb_dim=8), partial(torch.optim.Adam, lr=1e-2), data_shape=(2,),
                 num_timesteps=20, sampling={"steps": 3})
    model.run_config = {"note": "ema test"}
    return model


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


class Recorder(pl.Callback):
    """Raw weights at the start and after every optimizer step, and what validation-time code sees."""

    def __init__(self):
        self.raw: dict[int, torch.Tensor] = {}
        self.seen_in_validation: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.after_validation: dict[int, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.raw.setdefault(trainer.global_step, flat(pl_module))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.after_validation[trainer.global_step] = flat(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.raw[trainer.global_step] = flat(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        with ema_weights(trainer, pl_module):
            seen = flat(pl_module)
        self.seen_in_validation.append((trainer.global_step, seen, flat(ema._average_model.module)))


def fit(tmp_path, max_steps, ema, recorder, ckpt_path=None, every=None):
    callbacks = [ema, recorder]  # the recorder after EMA: EMA's own hook has swapped back by the time it runs
    if every:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True, every_n_train_steps=every))
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=3, check_val_every_n_epoch=None,
                         limit_val_batches=1, callbacks=callbacks)
    model = toy_model()
    trainer.fit(model, datamodule=Toy2DDataModule("moons", num_train=640, num_val=64, batch_size=32), ckpt_path=ckpt_path)
    return model


def expected_ema(raw: dict[int, torch.Tensor], decay: float, every: int, steps: int) -> torch.Tensor:
    """torch's AveragedModel copies the weights at its first update; the k-th update after it lerps with
    1 - min(decay, (1 + k) / (10 + k)). Updates happen after optimizer steps s with (s - 1) % every == 0."""
    ema, k = raw[0].clone(), 0
    for s in range(1, steps + 1):
        if (s - 1) % every:
            continue
        ema = raw[s].clone() if k == 0 else torch.lerp(ema, raw[s], 1 - min(decay, (1 + k) / (10 + k)))
        k += 1
    return ema


@pytest.mark.parametrize("every", [1, 2])
def test_ema_is_the_warmed_up_average_of_the_recorded_raw_weights(tmp_path, every):
    recorder = Recorder()
    ema = EMA(decay=0.9, update_every_n_steps=every)
    model = fit(tmp_path, 9, ema, recorder)
    torch.testing.assert_close(flat(ema._average_model.module), expected_ema(recorder.raw, 0.9, every, 9), rtol=1e-6, atol=1e-7)
    # and it is not the raw weights nor a plain mean: the warm-up and the decay both matter
    assert not torch.allclose(flat(ema._average_model.module), recorder.raw[9])
    torch.testing.assert_close(flat(model), flat(ema._average_model.module), rtol=0, atol=0)  # after fit: the EMA


def test_validation_sees_the_ema_and_training_continues_from_the_raw_weights(tmp_path):
    recorder = Recorder()
    ema = EMA(decay=0.9)
    fit(tmp_path, 7, ema, recorder)
    assert [s for s, _, _ in recorder.seen_in_validation] == [3, 6]
    for step, seen, average in recorder.seen_in_validation:
        torch.testing.assert_close(seen, average, rtol=0, atol=0)
        assert not torch.equal(seen, recorder.raw[step])
        # the next step starts from the raw weights, exactly as they were before validation
        torch.testing.assert_close(recorder.after_validation[step], recorder.raw[step], rtol=0, atol=0)


def test_ema_resumes_mid_run_as_if_never_stopped(tmp_path):
    straight = EMA(decay=0.9, update_every_n_steps=2)
    fit(tmp_path / "a", 9, straight, Recorder())
    first = EMA(decay=0.9, update_every_n_steps=2)
    fit(tmp_path / "b", 5, first, Recorder(), every=5)
    resumed = EMA(decay=0.9, update_every_n_steps=2)
    fit(tmp_path / "c", 9, resumed, Recorder(), ckpt_path=tmp_path / "b" / "ckpts" / "last.ckpt")
    torch.testing.assert_close(flat(resumed._average_model.module), flat(straight._average_model.module), rtol=0, atol=0)


def test_decay_schedule_and_bad_decay():
    ema = EMA(decay=0.999)
    assert [ema.decay_at(n) for n in (0, 1, 90)] == [0.1, 2 / 11, 0.91]
    assert ema.decay_at(10**6) == 0.999 and EMA(decay=0.99, warmup=False).decay_at(0) == 0.99
    late = EMA(update_every_n_steps=3, start_step=4)  # from step index 4 on, at multiples of 3
    assert [i for i in range(13) if late.should_update(step_idx=i)] == [6, 9, 12] and not late.should_update(epoch_idx=1)
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)


def test_the_end_of_training_checkpoint_holds_the_raw_weights_and_the_ema(tmp_path):
    """Steps after the last validation are saved at the end of training; by then Lightning's own callback would
    already have copied the EMA into the module, storing it as the raw weights too."""
    from callbacks.checkpoint import Checkpoint

    recorder, ema = Recorder(), EMA(decay=0.9)
    ckpt = Checkpoint(dirpath=tmp_path / "ckpts", monitor=None, save_last=True, save_top_k=0)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=7, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=3, check_val_every_n_epoch=None,
                         limit_val_batches=1, callbacks=[ema, recorder, ckpt])
    trainer.fit(toy_model(), datamodule=Toy2DDataModule("moons", num_train=640, num_val=64, batch_size=32))
    saved = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 7
    raw = torch.cat([v.flatten() for k, v in saved["current_model_state"].items() if k.startswith("net.")])
    average = torch.cat([v.flatten() for k, v in saved["state_dict"].items() if k.startswith("net.")])
    torch.testing.assert_close(raw, recorder.raw[7], rtol=0, atol=0)
    torch.testing.assert_close(average, flat(ema._average_model.module), rtol=0, atol=0)


def test_nested_ema_contexts_keep_the_average_until_the_outermost_ends(tmp_path):
    recorder, ema = Recorder(), EMA(decay=0.9)
    model = fit(tmp_path, 4, ema, recorder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # raw weights now differ from the average
    raw = flat(model)
    with ema.average_weights(model):
        average = flat(model)
        assert not torch.equal(average, raw)
        with ema.average_weights(model):
            assert torch.equal(flat(model), average)
        assert torch.equal(flat(model), average)
    assert torch.equal(flat(model), raw)


def test_buffers_that_cannot_be_averaged_take_the_current_value():
    """Boolean masks (the transformer's attention masks) and integer counters are copied; floats are still lerped."""
    ema = EMA(decay=0.9, warmup=False)
    averaged = [torch.zeros(3), torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.long)]
    current = [torch.ones(3), torch.ones(2, dtype=torch.bool), torch.full((2,), 7)]
    ema._decay_now = 0.9
    ema._lerp(averaged, current, None)
    torch.testing.assert_close(averaged[0], torch.full((3,), 0.1))
    assert averaged[1].all() and (averaged[2] == 7).all()
