"""Who am I in the job: rank information from torchrun / SLURM / nothing, device, process group.

The one place that chooses between CUDA + NCCL and CPU + gloo.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a device or process group is made: rank_info needs none
    import torch
    import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


class LaunchError(RuntimeError):
    """The launch environment contradicts itself; the message names the variables."""


def _int_var(env: dict[str, str], name: str, default: int | None = None) -> int:
    if name not in env:
        if default is None:
            raise LaunchError(f"${name} is not set")
        return default
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"${name}={env[name]!r} is not an integer") from None


def rank_info(env: dict[str, str] | None = None) -> RankInfo:
    """Rank layout from torchrun's variables, else SLURM's (one task per rank), else one process.

    Raises LaunchError for a contradictory environment (one of RANK / WORLD_SIZE without the
    other, a rank outside the world, a local rank outside the node).
    """
    env = dict(os.environ if env is None else env)
    if "RANK" in env or "WORLD_SIZE" in env:
        if ("RANK" in env) != ("WORLD_SIZE" in env):
            present, missing = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
            raise LaunchError(
                f"${present} is set but ${missing} is not: launch with torchrun (which sets "
                "both), `meshweave run`, or unset it for a single process"
            )
        world = _int_var(env, "WORLD_SIZE")
        info = RankInfo(
            _int_var(env, "RANK"), world, _int_var(env, "LOCAL_RANK", 0), _int_var(env, "LOCAL_WORLD_SIZE", world)
        )
        names = ("RANK / WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    elif "SLURM_PROCID" in env and _int_var(env, "SLURM_NTASKS", 1) > 1:
        info = RankInfo(
            _int_var(env, "SLURM_PROCID"),
            _int_var(env, "SLURM_NTASKS"),
            _int_var(env, "SLURM_LOCALID", 0),
            _slurm_tasks_on_this_node(env),
        )
        names = ("SLURM_PROCID / SLURM_NTASKS", "SLURM_LOCALID", "tasks on this node")
    else:
        return RankInfo(0, 1, 0, 1)
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise LaunchError(f"rank {info.rank} is outside a world of {info.world_size} (check {names[0]})")
    if not 0 <= info.local_rank < max(info.local_world_size, 1):
        raise LaunchError(f"{names[1]}={info.local_rank} is outside {names[2]}={info.local_world_size}")
    return info


def _slurm_tasks_on_this_node(env: dict[str, str]) -> int:
    """Tasks on this node: SLURM_NTASKS_PER_NODE when given, else this node's entry of
    SLURM_TASKS_PER_NODE (always set by srun; compressed like ``2(x3),1``)."""
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int_var(env, "SLURM_NTASKS_PER_NODE")
    counts: list[int] = []
    for part in env.get("SLURM_TASKS_PER_NODE", "1").split(","):
        count, _, repeat = part.partition("(x")
        try:
            counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
        except ValueError:
            raise LaunchError(f"$SLURM_TASKS_PER_NODE={env['SLURM_TASKS_PER_NODE']!r} is not a task list") from None
    node = _int_var(env, "SLURM_NODEID", 0)
    return counts[node] if node < len(counts) else counts[-1]


def pick_device(preference: str, info: RankInfo) -> torch.device:
    """``cuda:<local_rank>`` when asked for or available (``auto``), else the CPU."""
    import torch

    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def init_process_group(device: torch.device, info: RankInfo, timeout_s: float = 600.0) -> None:
    """Create the default process group (NCCL on CUDA, gloo on CPU); also for a single process.

    A lone process gets a private in-memory store, so every code path runs the same collectives
    (each a no-op on a group of one) whether or not it was launched by torchrun.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if info.world_size == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise RuntimeError(
            "multi-process run without MASTER_ADDR/MASTER_PORT: launch with torchrun, "
            "`meshweave run --nproc N`, or slurm/train.sbatch"
        )
    dist.init_process_group(
        backend,
        store=_attempt_store(info, timeout),
        rank=info.rank,
        world_size=info.world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )


def _attempt_store(info: RankInfo, timeout: datetime.timedelta) -> dist.Store:
    """The job's key-value store, namespaced by torchrun's restart count.

    After a worker dies and torchrun restarts the group, the store may still hold the previous
    attempt's keys (gloo peer addresses of dead processes); a rank that reads one before its peer
    overwrites it connects to nothing and hangs. A prefix per attempt keeps attempts apart.
    """
    import torch.distributed as dist

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        info.world_size,
        is_master=not agent_store and info.rank == 0,
        timeout=timeout,
        multi_tenant=not agent_store,
    )
    return dist.PrefixStore(f"meshweave/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def destroy_process_group(clean: bool = True) -> None:
    """Tear down the default group; ``clean`` first waits for every rank (collective).

    Pass ``clean=False`` on an error path, where peers may never reach the barrier.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        if clean:
            # A rank that leaves while a peer still drains its last collective aborts the peer's
            # gloo threads ("terminate called without an active exception").
            dist.barrier()
        dist.destroy_process_group()
