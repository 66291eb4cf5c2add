"""Faults: a worker killed with SIGKILL is restarted by torchrun and the job finishes as if
nothing happened; a hung rank makes the others fail within the collective timeout, naming the op."""

import os
import signal
import subprocess
import sys
import threading
import time

from meshweave.launch.harness import free_port, read_metrics
from tests.parity import TINY, kill_workers, losses, train_run, worker_pids

STEPS = 40


def _torchrun(out, *extra, steps=STEPS, max_restarts=1):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--max-restarts={max_restarts}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "-m",
        "meshweave",
        "train",
        *TINY,
        f"--train.steps={steps}",
        f"--out={out}",
        "--parallel.dp_replicate=2",
        "--parallel.dp_shard=1",
        *extra,
    ]


def _wait_for_step(out, proc, step):
    while max((r["step"] for r in read_metrics(out)), default=0) < step and proc.poll() is None:
        time.sleep(0.05)


def test_kill_9_worker_restarts_and_finishes_with_the_uninterrupted_loss(tmp_path):
    whole = losses(train_run(tmp_path / "whole", 2, "--parallel.dp_replicate=2", "--parallel.dp_shard=1", steps=STEPS))
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _torchrun(out, "--checkpoint.interval=4", "--checkpoint.resume=auto", "--checkpoint.keep=20"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        _wait_for_step(out, proc, 6)
        os.kill(worker_pids(out)[-1], signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        kill_workers(out)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in (out / "events.log").read_text()
    records = read_metrics(out)
    assert records[-1]["step"] == STEPS
    assert records[-1]["loss"] == whole[-1]  # bitwise: the restart resumed exact state
    assert losses(records) == whole


def _stderr_lines(proc: subprocess.Popen) -> tuple[list[str], threading.Thread]:
    """Collect ``proc``'s stderr lines in the background: the list grows as they arrive, the
    thread ends at end of file."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    return lines, reader


def test_hung_rank_fails_the_others_within_the_timeout_naming_the_op(tmp_path):
    out = tmp_path / "hung"
    proc = subprocess.Popen(
        _torchrun(out, "--comm.timeout_s=5", steps=100_000, max_restarts=0),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    stopped = None
    try:
        _wait_for_step(out, proc, 2)
        stopped = worker_pids(out)[-1]
        os.kill(stopped, signal.SIGSTOP)  # alive but silent: the worst kind of failure
        (lines, reader), deadline = _stderr_lines(proc), time.monotonic() + 180
        while not any("did not complete within" in text for text in lines) and proc.poll() is None:
            assert time.monotonic() < deadline, "no rank reported the hung collective"
            time.sleep(0.1)
        # The others failed; let the stopped worker take torchrun's SIGTERM now instead of
        # after torchrun's 30 s grace period (a stopped process does not act on signals).
        os.kill(stopped, signal.SIGCONT)
        proc.wait(timeout=120)
        reader.join(timeout=30)
    finally:
        if stopped:
            try:
                os.kill(stopped, signal.SIGCONT)
            except ProcessLookupError:
                pass
        proc.kill()
        kill_workers(out)
    err = "".join(lines)
    assert proc.returncode != 0
    line = next(text for text in err.splitlines() if "did not complete within" in text)
    assert "comm.timeout_s=5s" in line and "all_reduce on mesh dim" in line and line.startswith("meshweave: rank ")
