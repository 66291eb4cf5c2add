"""The local launcher the parity runs use: ``launch`` runs a function in N ranks as torchrun would.

These start processes (forked from the warm server), so they are marked ``procs``; each checks one
promise of :func:`meshweave.launch.harness.launch` that the parity tests rely on without saying so.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from meshweave.launch.harness import launch

pytestmark = pytest.mark.procs

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _report(out: str) -> None:
    """Write what this rank sees: its torchrun variables, one test variable, its thread count."""
    import torch

    seen = {k: os.environ.get(k) for k in (*RANK_VARIABLES, "HARNESS_PROBE")}
    rank = os.environ.get("RANK", "solo")
    Path(out, f"{rank}.json").write_text(json.dumps({**seen, "threads": torch.get_num_threads()}))


def _exit_with(code_by_rank: dict[int, int]) -> None:
    raise SystemExit(code_by_rank.get(int(os.environ.get("RANK", "0")), 0))


def _rank1_fails_others_wait() -> None:
    if os.environ["RANK"] == "1":
        raise SystemExit(3)
    time.sleep(60)


def test_each_rank_gets_torchrun_variables_and_exactly_the_given_environment(tmp_path):
    env = {"PATH": os.environ["PATH"], "HARNESS_PROBE": "yes", "OMP_NUM_THREADS": "1"}
    assert launch(_report, 3, str(tmp_path), log_dir=tmp_path / "logs", env=env) == [0, 0, 0]
    seen = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(3)]
    assert [s["RANK"] for s in seen] == ["0", "1", "2"] == [s["LOCAL_RANK"] for s in seen]
    assert {s["WORLD_SIZE"] for s in seen} == {"3"} == {s["LOCAL_WORLD_SIZE"] for s in seen}
    assert len({s["MASTER_PORT"] for s in seen}) == 1 and {s["MASTER_ADDR"] for s in seen} == {"127.0.0.1"}
    assert all(s["HARNESS_PROBE"] == "yes" and s["threads"] == 1 for s in seen)


def test_a_lone_rank_gets_no_rank_variables_like_a_plain_train(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    assert launch(_report, 1, str(tmp_path), log_dir=tmp_path / "logs", env=env) == [0]
    seen = json.loads((tmp_path / "solo.json").read_text())
    assert all(seen[k] is None for k in RANK_VARIABLES)


def test_exit_codes_come_back_in_rank_order(tmp_path):
    assert launch(_exit_with, 2, {1: 7}, log_dir=tmp_path) == [0, 7]


def test_a_failing_rank_stops_its_peers_at_once(tmp_path):
    codes = launch(_rank1_fails_others_wait, 3, log_dir=tmp_path, timeout=50)
    # The peers sleep 60 s: they can only be gone because the launcher killed them, not at timeout.
    assert codes[1] == 3 and codes[0] == codes[2] == -9
