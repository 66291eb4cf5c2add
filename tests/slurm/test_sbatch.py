"""meshweave under a real SLURM: sbatch -N 2 trains; a time-limit warning checkpoints, requeues and
resumes to the same final loss as an uninterrupted run.

Losses are compared bitwise with a local 2-process run: both are two gloo ranks summing the same
gradients in the same ring order, so any difference means state was lost or the data shifted.
"""

import subprocess
import sys
import time
from pathlib import Path

from meshweave.launch.harness import free_port, read_metrics
from tests.parity import TINY, losses, train_run
from tests.slurm.conftest import cluster_report, job_state, wait_for_state

REPO = Path(__file__).resolve().parents[2]
LAYOUT = ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]


def _sbatch(env, cwd, out, steps, *extra):
    args = [*TINY, f"--train.steps={steps}", f"--out={out}", *LAYOUT, *extra]
    job = subprocess.run(
        ["sbatch", "--parsable", "-N", "2", "--time=10", str(REPO / "slurm" / "train.sbatch"), *args],
        env={**env, "MESHWEAVE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MESHWEAVE_PORT": str(free_port())},
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    assert job.returncode == 0, job.stderr
    return job.stdout.strip().split(";")[0]


def _job_log(cwd, job_id):
    logs = list(Path(cwd).glob(f"*-{job_id}.out"))
    return logs[0].read_text() if logs else "(no job output)"


def _failure(env, cwd, job_id):
    """Everything needed to tell why a job did not complete: its output, SLURM's record, daemon logs."""
    return f"{_job_log(cwd, job_id)}\n{cluster_report(env, job_id)}"


def test_sbatch_on_two_nodes_trains_like_two_local_processes(slurm, tmp_path, reference_run):
    local = losses(reference_run(2, *LAYOUT, steps=10))
    job_id = _sbatch(slurm, tmp_path, tmp_path / "run", 10)
    state = wait_for_state(slurm, job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    assert state == "COMPLETED", _failure(slurm, tmp_path, job_id)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 11))
    assert losses(records) == local
    assert "2 nodes x 1" in _job_log(tmp_path, job_id)


def test_time_limit_warning_checkpoints_requeues_and_resumes(slurm, tmp_path):
    steps = 100
    local = losses(train_run(tmp_path / "local", 2, *LAYOUT, steps=steps))
    out = tmp_path / "run"
    job_id = _sbatch(slurm, tmp_path, out, steps, "--checkpoint.interval=10", "--checkpoint.resume=auto")
    deadline = time.monotonic() + 300
    while len(read_metrics(out)) < 5:
        assert time.monotonic() < deadline and job_state(slurm, job_id) in ("PENDING", "RUNNING"), _failure(
            slurm, tmp_path, job_id
        )
        time.sleep(0.5)
    # What SLURM does at --signal=B:USR1@T: signal the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm, check=True)
    # The script checkpoints, exits and requeues. The requeued job starts once the first run's
    # credential has expired (cred_expire, 10 s on the test cluster): started sooner, slurmd would
    # refuse the same job id's batch launch ("already killed") and the job would end FAILED.
    state = wait_for_state(slurm, job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    log = _job_log(tmp_path, job_id)
    assert state == "COMPLETED", _failure(slurm, tmp_path, job_id)
    events = (out / "events.log").read_text()
    assert "stop requested" in events and "resumed from" in events, events
    assert "requeueing" in log and "restart 1" in log
    records = read_metrics(out)
    assert records[-1]["step"] == steps
    assert records[-1]["loss"] == local[-1]
    assert losses(records) == local
