"""A non-finite loss skips the step without touching the weights; N in a row abort clearly."""

import math

import pytest
import torch

from meshweave.launch.env import destroy_process_group
from meshweave.trainer.loop import NonFiniteLossError, Trainer
from meshweave.validation import resolve
from tests.parity import TINY


@pytest.fixture
def trainer(tmp_path):
    cfg = resolve(None, [*TINY, f"--out={tmp_path}", "--train.steps=10", "--train.max_bad_steps=3"], world_size=1)
    t = Trainer(cfg)
    yield t
    t.close()
    destroy_process_group()


def _poison(trainer):
    """Make every microbatch's loss NaN (the runtime's per-microbatch loss); returns the clean one."""
    clean = trainer.runtime._loss
    trainer.runtime._loss = lambda microbatch: clean(microbatch) * float("nan")
    return clean


def test_non_finite_step_is_skipped_and_weights_unchanged(trainer):
    before = [p.detach().clone() for p in trainer.model.parameters()]
    _poison(trainer)
    record = trainer.train_step()
    assert math.isnan(record["loss"]) and record["skipped_steps"] == 1
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    assert all(p.grad is None for p in trainer.model.parameters())


def test_a_finite_step_resets_the_consecutive_count(trainer):
    clean = _poison(trainer)
    trainer.train_step()
    trainer.train_step()
    trainer.runtime._loss = clean
    assert math.isfinite(trainer.train_step()["loss"])
    assert trainer.bad_steps == 0 and trainer.skipped_steps == 2


def test_max_bad_steps_in_a_row_abort_with_a_clear_message(trainer):
    _poison(trainer)
    trainer.train_step()
    trainer.train_step()
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        trainer.train_step()
