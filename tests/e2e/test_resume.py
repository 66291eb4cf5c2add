"""Stop after step k, resume with checkpoint.resume=auto: the next steps equal an uninterrupted run.

Bitwise on CPU fp32: the checkpoint holds the exact model, optimizer moments, step (which fixes the
LR schedule) and sample position, and the computation is deterministic, so any difference at all
means some state was lost.
"""

import pytest

from meshweave.launch.harness import read_metrics
from tests.parity import losses, train_run

STEPS, STOP = 10, 4


def _interrupted_then_resumed(out, nproc, *layout):
    first = train_run(out, nproc, *layout, "--checkpoint.save_final=true", f"--train.stop_at_step={STOP}", steps=STEPS)
    assert [r["step"] for r in first] == list(range(1, STOP + 1))
    assert (out / "checkpoints" / f"step-{STOP}" / ".metadata").is_file()
    train_run(out, nproc, *layout, "--checkpoint.resume=auto", steps=STEPS)
    return read_metrics(out)


@pytest.mark.parametrize(
    "nproc,layout",
    [
        pytest.param(1, [], id="single"),
        pytest.param(2, ["--parallel.dp_shard=2"], id="fsdp2"),
        pytest.param(2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"], id="replicate2"),
    ],
)
def test_resumed_losses_equal_uninterrupted_bitwise(tmp_path, reference_run, nproc, layout):
    uninterrupted = losses(reference_run(nproc, *layout, steps=STEPS))
    resumed = _interrupted_then_resumed(tmp_path / "split", nproc, *layout)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert losses(resumed) == uninterrupted


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    records = train_run(tmp_path, 1, "--checkpoint.resume=auto", steps=2)
    assert [r["step"] for r in records] == [1, 2]


def test_keep_prunes_old_checkpoints_and_leaves_no_tmp(tmp_path):
    train_run(tmp_path, 1, "--checkpoint.interval=2", "--checkpoint.keep=2", steps=8)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["LATEST", "step-6", "step-8"]
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step-8"


def test_resume_from_explicit_path(tmp_path):
    train_run(tmp_path / "a", 1, "--checkpoint.interval=3", "--checkpoint.keep=5", steps=6)
    uninterrupted = losses(read_metrics(tmp_path / "a"))
    records = train_run(tmp_path / "b", 1, f"--checkpoint.resume={tmp_path / 'a' / 'checkpoints' / 'step-3'}", steps=6)
    assert [r["step"] for r in records] == [4, 5, 6]
    assert losses(records) == uninterrupted[3:]
