"""FSDP prefetch on purpose: the all-gather schedule options change when bytes move, never the math.

``parallel.fsdp_forward_prefetch`` / ``fsdp_backward_prefetch`` (depths 0/1/2) and
``parallel.fsdp_reshard_after_forward`` (true/false) at dp_shard=2 and HSDP 2x2 reproduce the
layout's own unprefetched, resharding trajectory within 1e-6 relative per step over 10 steps: the
same collectives sum the same gradients in the same order, only earlier (the bound leaves room
for nothing but fp32 noise; a prefetched layer used before its all-gather finished would be far
off). A three-layer model so that depth 2 differs from depth 1. Every config of a layout is run
once per module and shared by the tests; the logged rows also show that real runs write
``comm_exposed_s``. Invalid values are one-line errors (exit 2) before any process starts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.parity import assert_losses_match, losses, train_run

pytestmark = pytest.mark.dist
STEPS = 10
THREE_LAYERS = ["--model.n_layers=3"]
LAYOUTS = {
    "fsdp2": (2, ["--parallel.dp_shard=2"]),
    "hsdp2x2": (4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"]),
}
# (forward depth, backward depth, reshard_after_forward); the first of each layout is its reference.
SCHEDULES = {
    "fsdp2": [(0, 0, "true"), (1, 1, "true"), (2, 2, "true"), (2, 1, "false"), (0, 0, "false")],
    "hsdp2x2": [(0, 0, "true"), (1, 2, "true"), (2, 2, "false")],
}
CASES = [
    pytest.param(layout, schedule, id=f"{layout}-fwd{schedule[0]}-bwd{schedule[1]}-reshard_{schedule[2]}")
    for layout, schedules in SCHEDULES.items()
    for schedule in schedules[1:]
]


def _args(schedule: tuple[int, int, str]) -> list[str]:
    forward, backward, reshard = schedule
    return [
        f"--parallel.fsdp_forward_prefetch={forward}",
        f"--parallel.fsdp_backward_prefetch={backward}",
        f"--parallel.fsdp_reshard_after_forward={reshard}",
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``run(layout, schedule)`` -> metrics records, each config trained once per module."""
    done: dict[tuple, list[dict]] = {}

    def get(layout: str, schedule: tuple[int, int, str]) -> list[dict]:
        if (layout, schedule) not in done:
            nproc, degrees = LAYOUTS[layout]
            out = tmp_path_factory.mktemp(f"{layout}-{'-'.join(map(str, schedule))}")
            done[layout, schedule] = train_run(out, nproc, *degrees, *THREE_LAYERS, *_args(schedule), steps=STEPS)
        return done[layout, schedule]

    return get


@pytest.mark.parametrize("layout,schedule", CASES)
def test_prefetch_schedule_keeps_the_losses(run, layout, schedule):
    reference = losses(run(layout, SCHEDULES[layout][0]))
    assert_losses_match(reference, losses(run(layout, schedule)), rtol=1e-6)


def test_rows_carry_exposed_time_of_the_fsdp_collectives(run):
    records = run("fsdp2", (1, 1, "true"))
    assert len(records) == STEPS
    for r in records:
        exposed, issued = r["comm_exposed_s"], r["comm_seconds"]
        assert "dp_shard/all_gather" in exposed and "dp_shard/reduce_scatter" in exposed
        assert all(v >= 0 for v in exposed.values())
        for key, value in exposed.items():  # the wait is part of the time in flight
            assert value <= issued[key] + 1e-6, key  # + the 1 us the rows round to
        assert 0 <= r["comm_exposed_frac"]


@pytest.mark.parametrize(
    "option,message",
    [
        ("--parallel.fsdp_forward_prefetch=-1", "parallel.fsdp_forward_prefetch"),
        ("--parallel.fsdp_backward_prefetch=-2", "parallel.fsdp_backward_prefetch"),
        ("--parallel.fsdp_reshard_after_forward=sometimes", "parallel.fsdp_reshard_after_forward"),
        ("--parallel.fsdp_reshard_after_forward=3", "does not divide the FSDP shard group"),
    ],
)
def test_invalid_prefetch_options_are_one_line_exit_2(tmp_path, option, message):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "meshweave", "run", "--nproc", "2", option, "--out", str(out)]
    # timeout only so a hung launcher fails the test instead of the session; not a speed check
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not Path(out).exists()
