"""Checkpoints users can trust: damage is detected with the file named, and auto-resume falls back."""

import pickle
import shutil
import subprocess
import time

import pytest

from meshweave.checkpoint.manager import CheckpointError, verify
from meshweave.checkpoint.safe_load import UnsafeCheckpointError, safe_load_metadata
from tests.parity import MESHWEAVE, losses, train_run

STEPS = 6


@pytest.fixture
def two_checkpoints(tmp_path):
    """A run with complete checkpoints at steps 3 and 6 (and its losses)."""
    records = train_run(tmp_path, 1, "--checkpoint.interval=3", "--checkpoint.keep=3", steps=STEPS)
    return tmp_path, losses(records)


def _largest_shard(ckpt):
    return max((p for p in ckpt.glob("*.distcp")), key=lambda p: p.stat().st_size)


def _resume_auto(run_dir):
    """Resume the same schedule from whatever checkpoint auto picks."""
    return train_run(
        run_dir, 1, "--checkpoint.resume=auto", "--checkpoint.interval=3", "--checkpoint.keep=3", steps=STEPS
    )


def _fallback_event(run_dir):
    return [line for line in (run_dir / "events.log").read_text().splitlines() if "skipping checkpoint" in line]


def test_complete_checkpoint_verifies(two_checkpoints):
    run_dir, _ = two_checkpoints
    manifest = verify(run_dir / "checkpoints" / "step-6")
    assert manifest["step"] == 6 and manifest["world_size"] == 1
    assert ".metadata" in manifest["files"] and "rng-rank0.pt" in manifest["files"]


def test_truncated_shard_is_named_and_auto_resume_falls_back(two_checkpoints):
    run_dir, uninterrupted = two_checkpoints
    shard = _largest_shard(run_dir / "checkpoints" / "step-6")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        verify(shard.parent)
    records = _resume_auto(run_dir)
    assert any(shard.name in line for line in _fallback_event(run_dir))
    assert "resumed from" in (run_dir / "events.log").read_text()
    # fell back to step 3 and re-ran 4..6 to the same losses as before (bitwise: same state)
    assert losses(records)[3:] == uninterrupted[3:]


def test_deleted_shard_is_named_and_auto_resume_falls_back(two_checkpoints):
    run_dir, uninterrupted = two_checkpoints
    shard = _largest_shard(run_dir / "checkpoints" / "step-6")
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: missing"):
        verify(shard.parent)
    records = _resume_auto(run_dir)
    assert any(shard.name in line for line in _fallback_event(run_dir))
    assert losses(records)[3:] == uninterrupted[3:]


def test_flipped_byte_fails_the_checksum(two_checkpoints):
    run_dir, _ = two_checkpoints
    shard = _largest_shard(run_dir / "checkpoints" / "step-6")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify(shard.parent)


def test_save_killed_midway_leaves_previous_checkpoint_loadable(two_checkpoints):
    # What a save killed after writing some shards leaves behind: step-N.tmp without a manifest.
    run_dir, uninterrupted = two_checkpoints
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step-6")
    partial = ckpts / "step-6.tmp"
    shutil.copytree(ckpts / "step-3", partial)
    (partial / "manifest.json").unlink()
    _largest_shard(partial).unlink()
    records = _resume_auto(run_dir)
    assert (
        "resumed from" in (run_dir / "events.log").read_text()
        and str(ckpts / "step-3") in (run_dir / "events.log").read_text()
    )
    assert losses(records)[3:] == uninterrupted[3:]
    assert not partial.exists()  # the next commit cleans it up


def test_real_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    # SIGKILL the trainer as soon as a save's .tmp directory appears; whatever the timing, the
    # newest loadable checkpoint is a complete one and resume reaches the end.
    args = ["--checkpoint.interval=2", "--checkpoint.keep=5", "--model.dim=128", "--model.ffn_dim=352"]
    proc = subprocess.Popen(
        [
            *MESHWEAVE,
            "train",
            *args,
            "--model.n_layers=2",
            "--model.n_heads=4",
            "--model.n_kv_heads=2",
            "--model.vocab_size=260",
            "--train.seq_len=64",
            "--train.global_batch=8",
            "--train.steps=40",
            "--log.progress=false",
            f"--out={tmp_path}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = tmp_path / "checkpoints"
    try:
        while proc.poll() is None and not list(ckpts.glob("step-4.tmp")):
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    for path in ckpts.glob("step-*"):
        if path.suffix != ".tmp" and (path / "manifest.json").exists():
            verify(path)  # every committed checkpoint is intact
    assert (ckpts / "step-2" / "manifest.json").is_file()


def test_explicit_resume_of_a_damaged_checkpoint_is_a_one_line_error(two_checkpoints, tmp_path):
    run_dir, _ = two_checkpoints
    shard = _largest_shard(run_dir / "checkpoints" / "step-6")
    shard.unlink()
    proc = subprocess.run(
        [*MESHWEAVE, "train", f"--checkpoint.resume={shard.parent}", f"--out={tmp_path / 'x'}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and shard.name in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_metadata_unpickler_refuses_arbitrary_globals():
    with pytest.raises(UnsafeCheckpointError, match="builtins.print"):
        safe_load_metadata(pickle.dumps(_Evil()))


def test_inspect_reports_step_layout_tensors_and_validity(two_checkpoints):
    run_dir, _ = two_checkpoints
    ckpt = run_dir / "checkpoints" / "step-6"
    out = subprocess.run([*MESHWEAVE, "ckpt", "inspect", str(ckpt)], capture_output=True, text=True).stdout
    assert "valid: yes" in out and "step: 6" in out and "model.layers.0.self_attn.q_proj.weight" in out
    assert "world size: 1" in out
    shard = _largest_shard(ckpt)
    shard.write_bytes(b"")
    out = subprocess.run([*MESHWEAVE, "ckpt", "inspect", str(ckpt)], capture_output=True, text=True).stdout
    assert "valid: NO" in out and shard.name in out
