"""A stop signal mid-run: every rank checkpoints the same step and exits; the resumed run ends
with the same losses as an uninterrupted one (bitwise, CPU fp32)."""

import os
import signal
import subprocess
import time

import pytest

from meshweave.launch.harness import read_metrics
from tests.parity import MESHWEAVE, TINY, kill_workers, losses, train_run, worker_pids

STEPS = 30


@pytest.mark.parametrize("nproc", [1, 2])
def test_usr1_checkpoints_agreed_step_then_resume_matches(tmp_path, nproc):
    whole = losses(train_run(tmp_path / "whole", nproc, steps=STEPS))
    out = tmp_path / "preempted"
    cmd = [
        *MESHWEAVE,
        *(["run", f"--nproc={nproc}"] if nproc > 1 else ["train"]),
        *TINY,
        f"--train.steps={STEPS}",
        f"--out={out}",
        "--parallel.dp_shard=-1",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    try:
        while len(read_metrics(out)) < 3 and proc.poll() is None:
            time.sleep(0.05)
        # Signal only the training processes (one rank when several): the others must learn it too.
        os.kill(worker_pids(out)[-1], signal.SIGUSR1)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        kill_workers(out)
    assert proc.returncode == 0, err[-3000:]
    events = (out / "events.log").read_text()
    assert "stop requested (SIGUSR1)" in events
    stopped_at = max(r["step"] for r in read_metrics(out))
    assert stopped_at < STEPS and (out / "checkpoints" / f"step-{stopped_at}" / "manifest.json").is_file()
    resumed = train_run(out, nproc, "--checkpoint.resume=auto", steps=STEPS)
    assert losses(resumed) == whole
