"""A normal run is quiet and its logged comm bytes add up.

One 4-process tp2 x dp_shard2 run (the demo's layout) with evals and checkpoints between logged
rows: stderr carries no library warning (the grad norm over the (dp_shard, tp) mesh used to print
torch's "2 sequential all_reduce operations" warning), and with ``--log.interval=5`` the logged
``comm_bytes`` rows sum exactly to the final ``comm_bytes_total`` (each row holds the ledger since
the previous logged row, so unlogged steps, evals and checkpoint saves are counted once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.parity import TINY

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def demo_layout_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("console")
    cmd = [
        sys.executable,
        "-m",
        "meshweave",
        "run",
        "--nproc=4",
        *TINY,
        f"--out={out}",
        "--train.steps=12",
        "--parallel.tp=2",
        "--parallel.dp_shard=2",
        "--log.interval=5",
        "--train.eval_interval=3",
        "--checkpoint.interval=4",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return proc, rows


def test_a_tp2_fsdp2_run_prints_no_warnings(demo_layout_run):
    proc, _ = demo_layout_run
    lines = (proc.stdout + proc.stderr).splitlines()
    warnings = [line for line in lines if "warn" in line.lower()]
    assert not warnings, "\n".join(warnings)


def test_logged_comm_bytes_rows_sum_to_the_total(demo_layout_run):
    _, rows = demo_layout_run
    assert [r["step"] for r in rows] == [5, 10, 12]
    logged = sum(sum(r["comm_bytes"].values()) for r in rows)
    assert logged == rows[-1]["comm_bytes_total"] > 0
