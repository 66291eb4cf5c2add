"""Who am I in the job: ``rank_info`` from torchrun's variables, SLURM's, or none; every
contradiction is a LaunchError naming the variable, and the CLI turns it into one line, exit 2."""

import os
import subprocess

import pytest

from meshweave.launch.env import LaunchError, RankInfo, rank_info
from tests.parity import MESHWEAVE, TINY

# Every variable rank_info reads (or a launcher sets next to them): scrubbed from subprocess envs so
# the outer shell (a torchrun worker, a SLURM allocation) cannot leak into a test.
LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_USE_AGENT_STORE",
)


# ---------------------------------------------------------------------------------------------
# torchrun


def test_torchrun_variables_give_the_layout():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    info = rank_info(env)
    assert info == RankInfo(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert not info.is_rank0


def test_torchrun_rank_zero_is_rank0():
    info = rank_info({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    assert info == RankInfo(0, 2, 0, 1) and info.is_rank0


def test_without_local_variables_the_whole_world_is_one_node():
    assert rank_info({"RANK": "1", "WORLD_SIZE": "2"}) == RankInfo(1, 2, 0, 2)


def test_torchrun_variables_win_over_slurm_ones():
    # One srun task per node runs torchrun (slurm/train.sbatch): its workers see both sets.
    env = {
        "RANK": "2",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS_PER_NODE": "1",
    }
    assert rank_info(env) == RankInfo(2, 4, 0, 2)


def test_a_world_of_one_from_torchrun_is_fine():
    assert rank_info({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}) == RankInfo(
        0, 1, 0, 1
    )


# ---------------------------------------------------------------------------------------------
# SLURM (one task per rank, srun without torchrun)


@pytest.mark.parametrize(
    "per_node",
    [{"SLURM_NTASKS_PER_NODE": "2"}, {"SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NODEID": "1"}],
    ids=["ntasks-per-node", "tasks-per-node-list"],
)
def test_slurm_variables_give_the_layout(per_node):
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", **per_node}
    info = rank_info(env)
    assert info == RankInfo(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert not info.is_rank0


def test_slurm_first_task_is_rank0():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "2(x2)"}
    assert rank_info(env) == RankInfo(0, 4, 0, 2) and rank_info(env).is_rank0


def test_uneven_tasks_per_node_give_this_nodes_count():
    env = {
        "SLURM_PROCID": "4",
        "SLURM_NTASKS": "5",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "2",
        "SLURM_TASKS_PER_NODE": "2(x2),1",
    }
    assert rank_info(env) == RankInfo(4, 5, 0, 1)


def test_a_single_slurm_task_is_a_single_process():
    # sbatch's batch shell (and `srun -n1`) has SLURM_PROCID=0 with one task: no distributed job.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "42"}
    assert rank_info(env) == RankInfo(0, 1, 0, 1)


def test_slurm_without_a_procid_is_a_single_process():
    assert rank_info({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "42"}) == RankInfo(0, 1, 0, 1)


# ---------------------------------------------------------------------------------------------
# nothing


def test_no_launcher_is_a_single_process():
    info = rank_info({})
    assert info == RankInfo(rank=0, world_size=1, local_rank=0, local_world_size=1)
    assert info.is_rank0


def test_unrelated_variables_are_ignored():
    assert rank_info({"HOME": "/root", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}) == RankInfo(0, 1, 0, 1)


def test_no_argument_reads_the_process_environment(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    assert rank_info() == RankInfo(0, 1, 0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_info() == RankInfo(1, 2, 0, 2)
    monkeypatch.delenv("RANK")
    with pytest.raises(LaunchError, match=r"\$WORLD_SIZE is set but \$RANK is not"):
        rank_info()


def test_the_argument_is_not_modified():
    env = {"RANK": "1", "WORLD_SIZE": "2"}
    rank_info(env)
    assert env == {"RANK": "1", "WORLD_SIZE": "2"}


# ---------------------------------------------------------------------------------------------
# contradictions: each a LaunchError whose message names the variable at fault


@pytest.mark.parametrize(
    "env, names",
    [
        ({"WORLD_SIZE": "2"}, ["$WORLD_SIZE is set", "$RANK is not"]),
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, ["$WORLD_SIZE is set", "$RANK is not"]),
        ({"RANK": "0"}, ["$RANK is set", "$WORLD_SIZE is not"]),
        ({"RANK": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, ["$RANK is set", "$WORLD_SIZE is not"]),
        ({"RANK": "2", "WORLD_SIZE": "2"}, ["rank 2", "world of 2", "RANK", "WORLD_SIZE"]),
        ({"RANK": "7", "WORLD_SIZE": "4"}, ["rank 7", "world of 4", "RANK"]),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, ["rank -1", "RANK"]),
        ({"RANK": "0", "WORLD_SIZE": "0"}, ["world of 0", "WORLD_SIZE"]),
        ({"RANK": "one", "WORLD_SIZE": "2"}, ["$RANK='one' is not an integer"]),
        ({"RANK": "1.0", "WORLD_SIZE": "2"}, ["$RANK='1.0' is not an integer"]),
        ({"RANK": "", "WORLD_SIZE": "2"}, ["$RANK='' is not an integer"]),
        ({"RANK": "0", "WORLD_SIZE": "two"}, ["$WORLD_SIZE='two' is not an integer"]),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, ["$LOCAL_RANK='x' is not an integer"]),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2.5"}, ["$LOCAL_WORLD_SIZE='2.5' is not an integer"]),
        (
            {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
            ["LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2"],
        ),
        (
            {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "2"},
            ["LOCAL_RANK=5", "LOCAL_WORLD_SIZE=2"],
        ),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "-1", "LOCAL_WORLD_SIZE": "2"}, ["LOCAL_RANK=-1"]),
        # Without LOCAL_WORLD_SIZE the whole world is the node: a local rank beyond it is still caught.
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2"}, ["LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2"]),
    ],
    ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None,
)
def test_a_contradiction_raises_naming_the_variable(env, names):
    with pytest.raises(LaunchError) as caught:
        rank_info(env)
    message = str(caught.value)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


def test_a_launch_error_is_a_runtime_error():
    # Callers that only know RuntimeError (torch's own launch failures) still catch it.
    assert issubclass(LaunchError, RuntimeError)


@pytest.mark.parametrize(
    "env, names",
    [
        ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, ["$SLURM_PROCID='x' is not an integer"]),
        (
            {"SLURM_PROCID": "4", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2"},
            ["rank 4", "world of 4", "SLURM_NTASKS"],
        ),
        (
            {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "two", "SLURM_NTASKS_PER_NODE": "2"},
            ["$SLURM_LOCALID='two' is not an integer"],
        ),
        (
            {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "2", "SLURM_NTASKS_PER_NODE": "2"},
            ["SLURM_LOCALID=2 is outside", "=2"],
        ),
    ],
)
def test_a_contradictory_slurm_environment_raises(env, names):
    with pytest.raises(LaunchError) as caught:
        rank_info(env)
    for name in names:
        assert name in str(caught.value)


# ---------------------------------------------------------------------------------------------
# srun without --ntasks-per-node, and a malformed task count


def test_srun_without_ntasks_per_node_is_accepted():
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NNODES": "2",
        "SLURM_TASKS_PER_NODE": "2(x2)",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    }
    info = rank_info(env)
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)


def test_a_non_integer_slurm_ntasks_is_a_launch_error():
    with pytest.raises(LaunchError, match="SLURM_NTASKS"):
        rank_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "four"})


# ---------------------------------------------------------------------------------------------
# through the CLI: one line on stderr, exit code 2, no traceback, before anything is written


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.procs
@pytest.mark.parametrize(
    "extra, names",
    [
        ({"WORLD_SIZE": "2"}, ["$WORLD_SIZE is set but $RANK is not"]),
        ({"RANK": "2", "WORLD_SIZE": "2"}, ["rank 2 is outside a world of 2"]),
        ({"RANK": "x", "WORLD_SIZE": "2"}, ["$RANK='x' is not an integer"]),
    ],
    ids=["world-size-without-rank", "rank-outside-world", "non-integer-rank"],
)
def test_cli_reports_a_contradictory_launch_environment_in_one_line(tmp_path, extra, names):
    out = tmp_path / "run"
    proc = subprocess.run(
        [*MESHWEAVE, "train", *TINY, "--train.steps=2", f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(**extra),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("meshweave: error: launch environment:"), lines[0]
    for name in names:
        assert name in lines[0]
    assert proc.stdout == ""
    assert not out.exists()  # refused before any run directory or process group
