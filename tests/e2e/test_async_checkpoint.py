"""Async save: training continues while the checkpoint is written; the result equals a sync save."""

import torch

from meshweave.checkpoint.hf import read_checkpoint
from meshweave.checkpoint.manager import verify
from tests.parity import losses, train_run

STEPS, EVERY = 6, 3


def test_training_steps_run_while_the_async_save_writes(tmp_path):
    # A ~3M-parameter model: its ~36 MB of weights and Adam moments take tens of ms to write,
    # while the next step starts within a millisecond of save() returning.
    bigger = [
        "--model.dim=256",
        "--model.n_layers=4",
        "--model.ffn_dim=704",
        "--model.n_heads=8",
        "--model.n_kv_heads=4",
    ]
    records = train_run(
        tmp_path,
        2,
        *bigger,
        "--parallel.dp_shard=2",
        "--checkpoint.async=true",
        f"--checkpoint.interval={EVERY}",
        "--checkpoint.keep=5",
        steps=STEPS,
    )
    manifest = verify(tmp_path / "checkpoints" / f"step-{EVERY}")
    after = records[EVERY]  # the step right after the save was started
    step_started = after["time"] - after["step_time_s"]
    assert manifest["saved_unix"] <= step_started < manifest["written_unix"], (manifest, after)
    assert "committed after" in (tmp_path / "events.log").read_text()


def test_async_checkpoint_equals_sync_checkpoint(tmp_path):
    common = [f"--checkpoint.interval={EVERY}", "--checkpoint.keep=5", "--parallel.dp_shard=2"]
    sync = train_run(tmp_path / "sync", 2, *common, steps=STEPS)
    asyn = train_run(tmp_path / "async", 2, *common, "--checkpoint.async=true", steps=STEPS)
    assert losses(sync) == losses(asyn)
    a = read_checkpoint(tmp_path / "sync" / "checkpoints" / f"step-{EVERY}")
    b = read_checkpoint(tmp_path / "async" / "checkpoints" / f"step-{EVERY}")
    assert a.keys() == b.keys() and any(k.startswith("optim.state.") for k in a) and len(a) > 20
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
