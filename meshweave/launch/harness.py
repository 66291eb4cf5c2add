"""Local multi-process harness shared by `meshweave run`, the tests and the benchmarks.

- :func:`free_port`: a loopback port for a rendezvous;
- :func:`spawn`: run a function on N fresh gloo processes and collect what each returns;
- :func:`launch`: run a function (a CLI entry) in N local ranks, the way torchrun runs its workers;
- :func:`read_metrics`: the step records of a run directory.

Ranks are forked from a warm server (multiprocessing's ``forkserver``) that imported torch and
meshweave once per session: a rank starts in milliseconds instead of the seconds an interpreter
spends importing torch, and still inherits nothing of the caller but ``sys.path``, the working
directory and the environment it is given. ``spawn(fn, world_size, *args)`` gives the ranks a
default gloo process group on a free loopback port, calls ``fn(rank, world_size, *args)`` in each
and returns the results in rank order. ``fn`` must be a module-level function of an importable
module (a test module, a bench script run as ``python -m bench.x``) and its arguments and result
must pickle. A failing rank stops the job at once (its peers may be blocked in a collective) and
:class:`WorkerError` carries every failed rank's traceback; a job that outlives ``timeout`` seconds
is killed. torch is imported only in the server and the ranks, so importing this module is cheap.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# What the warm server imports before it forks a rank: everything a training rank needs.
_PRELOAD = ["torch", "torch.distributed", "meshweave.cli", "meshweave.trainer.loop"]


def _context(warm: bool) -> Any:
    """The forkserver context whose server preloads :data:`_PRELOAD`, or plain ``spawn`` (a fresh
    interpreter per rank) when the rank must act before torch is imported."""
    if not warm:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # read when the server starts, once per session
    return ctx


def _enter(env: dict[str, str], log_path: str | None) -> None:
    """Make this rank's environment exactly ``env`` (a forked rank would otherwise keep the
    server's) and, with ``log_path``, send its stdout and stderr there."""
    if log_path:
        log = open(log_path, "w")
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    os.environ.clear()
    os.environ.update(env)


def _rendezvous(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun gives a worker on a one-node job."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
    }


def _supervise(procs: list[Any], timeout: float, failed: Callable[[], bool]) -> None:
    """Wait for ``procs``; stop early once ``failed()`` (its peers may be blocked in a collective)
    or after ``timeout`` seconds, and kill whatever is still alive after a grace of 5 s in all."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline and not failed():
            time.sleep(0.05)
        grace = min(time.monotonic() + 5.0, deadline)  # a failing peer may still be writing its traceback
        for p in procs:
            p.join(timeout=max(0.0, grace - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


class WorkerError(RuntimeError):
    """A spawned rank failed or the job timed out; the message holds the failed ranks' tracebacks."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    fn: Callable,
    rank: int,
    world_size: int,
    port: int,
    results: str,
    timeout: float,
    env: dict[str, str],
    log_dir: str | None,
    rank_setup: Callable[[int], dict[str, str]] | None,
    args: tuple,
) -> None:
    """One rank in its own process: set the rendezvous variables (and ``rank_setup``'s), join the
    gloo group, run ``fn(rank, world_size, *args)``, and leave its pickled result (or its traceback)
    in ``results`` for :func:`_collect`. Exits with status 1 on failure."""
    # keep the caller's stdout for its own output: each rank's chatter goes to a file
    log_path = str(Path(log_dir) / f"rank{rank}.log") if log_dir else None
    _enter({**env, **_rendezvous(rank, world_size, port)}, log_path)
    out = Path(results)
    try:
        if rank_setup is not None:
            os.environ.update(rank_setup(rank))
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # N ranks share a couple of cores
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
        try:
            result = fn(rank, world_size, *args)
            dist.barrier()  # no rank tears the group down while a peer still talks to it
        finally:
            dist.destroy_process_group()
        (out / f"result_{rank}.tmp").write_bytes(pickle.dumps(result))
        (out / f"result_{rank}.tmp").rename(out / f"result_{rank}.pkl")
    except BaseException:
        (out / f"error_{rank}.txt").write_text(traceback.format_exc())
        raise SystemExit(1) from None


def _collect(results: str, world_size: int, timeout: float, codes: dict[str, int | None]) -> list[Any]:
    """The ranks' results in rank order, or :class:`WorkerError` with every failed rank's traceback
    (or, when none left one, the ranks that returned nothing and every process's exit code)."""
    out = Path(results)
    errors = sorted(out.glob("error_*.txt"))
    if errors:
        raise WorkerError("\n".join(f"--- {e.stem} ---\n{e.read_text()}" for e in errors))
    missing = [r for r in range(world_size) if not (out / f"result_{r}.pkl").exists()]
    if missing:
        raise WorkerError(f"ranks {missing} returned nothing within {timeout:.0f}s (exit codes {codes})")
    return [pickle.loads((out / f"result_{r}.pkl").read_bytes()) for r in range(world_size)]


def _failed(results: str, procs: list[Any]) -> bool:
    """Whether a rank has failed: it left a traceback, or its process died without one (a signal)."""
    return any(Path(results).glob("error_*.txt")) or any(p.exitcode not in (None, 0) for p in procs)


def spawn(
    fn: Callable,
    world_size: int,
    *args: Any,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    rank_setup: Callable[[int], dict[str, str]] | None = None,
) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, one process each.

    Every rank joins one default gloo group before ``fn`` runs and leaves it after a final barrier,
    so ``fn`` must make the same collectives in the same order on every rank (a rank that skips one
    hangs its peers until it fails or ``timeout`` passes). ``env`` is added to each worker's
    environment; with ``log_dir`` each rank's stdout and stderr go to ``log_dir/rank<r>.log``.
    ``rank_setup(rank)``, when given, runs in the worker before torch is imported and before the
    group is made; the variables it returns are set last, so it may move the rank (e.g. into a
    network namespace, bench/_netns.py) and override ``MASTER_ADDR`` or ``LOCAL_RANK``. It must
    pickle like ``fn``. Raises :class:`WorkerError` if a rank fails or the job times out.
    """
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    ctx = _context(warm=rank_setup is None)
    with tempfile.TemporaryDirectory(prefix="meshweave-spawn-") as results:
        port = free_port()
        env = {**os.environ, **(env or {})}
        job = (world_size, port, results, timeout, env, str(log_dir) if log_dir else None, rank_setup, args)
        procs = [
            ctx.Process(target=_worker, args=(fn, rank, *job), name=f"rank{rank}", daemon=True)
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        _supervise(procs, timeout, lambda: _failed(results, procs))
        return _collect(results, world_size, timeout, {p.name: p.exitcode for p in procs})


def _launched_rank(
    fn: Callable, rank: int, world_size: int, port: int, env: dict[str, str], log: str, args: tuple
) -> None:
    """One rank of :func:`launch`: torchrun's variables (none for a lone rank) and thread default,
    then ``fn(*args)``; the process exits with what ``fn`` raises as ``SystemExit`` (0 if it returns)."""
    _enter({**env, **(_rendezvous(rank, world_size, port) if world_size > 1 else {})}, log)
    import torch

    # The server imported torch before this rank's OMP_NUM_THREADS existed: apply it as torch would.
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // world_size)))
    fn(*args)


def launch(
    fn: Callable,
    nproc: int,
    *args: Any,
    log_dir: str | os.PathLike[str],
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> list[int | None]:
    """Run ``fn(*args)`` in ``nproc`` ranks on this machine, as torchrun runs a worker; exit codes.

    Each rank has the variables ``meshweave run``'s torchrun gives a worker (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` ...; a lone rank gets none, like a plain ``meshweave train``)
    and makes its own process group, if any; ``fn`` is typically a CLI entry. Unlike torchrun the
    ranks are forked from the warm server: the launchers are the CLI's to test, this runs many
    trainings fast. ``env`` replaces the ranks' environment (default: this process's); rank r's
    stdout and stderr go to ``log_dir/rank<r>.log``. When a rank fails the others are stopped, as
    torchrun does; ranks still running after ``timeout`` seconds are killed (exit code -9).
    """
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    ctx = _context(warm=True)
    port, env = free_port(), dict(os.environ if env is None else env)
    procs = [
        ctx.Process(
            target=_launched_rank,
            args=(fn, rank, nproc, port, env, str(Path(log_dir) / f"rank{rank}.log"), args),
            name=f"rank{rank}",
            daemon=True,
        )
        for rank in range(nproc)
    ]
    for p in procs:
        p.start()
    _supervise(procs, timeout, lambda: any(p.exitcode not in (None, 0) for p in procs))
    return [p.exitcode for p in procs]


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The step records of ``run_dir/metrics.jsonl`` in step order (a step logged twice keeps the
    last: a resumed run re-logs from its checkpoint); ``[]`` when the run logged nothing."""
    from meshweave.metrics.sinks import read_metrics as read_records

    path = Path(run_dir) / "metrics.jsonl"
    return read_records(path) if path.exists() and path.stat().st_size else []
