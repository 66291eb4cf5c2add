"""A checkpoint saved under one layout resumes under another: DCP reshards model and optimizer,
the loader continues from the global sample index.

1e-5 relative per step over the 5 resumed steps: the resumed state is bit-identical, so the only
differences are the new layout's summation order (all-reduce / reduce-scatter / TP partial sums),
which the uninterrupted runs already show at ~1e-7.
"""

import shutil

import pytest

from tests.parity import assert_losses_match, losses, train_run

pytestmark = pytest.mark.dist
STEPS, STOP = 10, 5


@pytest.fixture(scope="module")
def saved_at_fsdp4(tmp_path_factory):
    """An uninterrupted dp_shard=4 run's losses, and a run directory holding its step-5 checkpoint."""
    whole = losses(train_run(tmp_path_factory.mktemp("whole"), 4, "--parallel.dp_shard=4", steps=STEPS))
    split = tmp_path_factory.mktemp("split")
    train_run(
        split, 4, "--parallel.dp_shard=4", "--checkpoint.save_final=true", f"--train.stop_at_step={STOP}", steps=STEPS
    )
    return whole, split


@pytest.mark.parametrize(
    "nproc,layout",
    [
        pytest.param(4, ["--parallel.tp=2", "--parallel.dp_shard=2"], id="tp2-fsdp2"),
        pytest.param(1, [], id="single-process"),
        pytest.param(4, ["--parallel.dp_replicate=4", "--parallel.dp_shard=1"], id="replicate4"),
    ],
)
def test_resume_onto_another_layout_continues_the_trajectory(tmp_path, saved_at_fsdp4, nproc, layout):
    whole, split = saved_at_fsdp4
    run = tmp_path / "run"
    shutil.copytree(split, run)
    (run / "metrics.jsonl").unlink()
    records = train_run(run, nproc, *layout, "--checkpoint.resume=auto", steps=STEPS)
    assert [r["step"] for r in records] == list(range(STOP + 1, STEPS + 1))
    assert_losses_match(whole[STOP:], losses(records), rtol=1e-5)
    events = (run / "events.log").read_text()
    if nproc != 4:
        assert "layout changed" in events and "RNG streams re-derived" in events
