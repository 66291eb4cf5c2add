"""Local multi-process harness shared by `meshweave run`, the tests and the benchmarks.

- :func:`free_port`: a loopback port for a rendezvous;
- :func:`spawn`: run a function on N fresh gloo processes and collect what each returns;
- :func:`read_metrics`: the step records of a run directory.

``spawn(fn, world_size, *args)`` starts ``world_size`` interpreters with the ``spawn`` start method
(nothing of the caller is inherited but ``sys.path``), gives them a default gloo process group on a
free loopback port, calls ``fn(rank, world_size, *args)`` in each and returns the results in rank
order. ``fn`` must be a module-level function of an importable module (a test module, a bench
script) and its arguments and result must pickle. A failing rank stops the job at once (its peers
may be blocked in a collective) and :class:`WorkerError` carries every failed rank's traceback; a
job that outlives ``timeout`` seconds is killed. torch is imported only inside the workers.
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
from pathlib import Path
from typing import Any, Callable


class WorkerError(RuntimeError):
    """A spawned rank failed or the job timed out; the message holds the failed ranks' tracebacks."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(fn: Callable, rank: int, world_size: int, args: tuple, results: str | os.PathLike[str],
             timeout: float) -> None:
    """One rank of a spawned job, in its own process with ``MASTER_ADDR`` / ``MASTER_PORT`` set: join
    the gloo group, run ``fn(rank, world_size, *args)``, and leave its pickled result (or its
    traceback) in ``results`` for :func:`collect_results`. Exits with status 1 on failure."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share a couple of cores
    out = Path(results)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
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


def failed(results: str | os.PathLike[str]) -> bool:
    """Whether a rank of the job writing to ``results`` has failed (its peers may now hang)."""
    return any(Path(results).glob("error_*.txt"))


def collect_results(results: str | os.PathLike[str], world_size: int, timeout: float, hint: str = "") -> list[Any]:
    """The ranks' results in rank order, or :class:`WorkerError` with every failed rank's traceback
    (or the ranks that returned nothing within ``timeout``; ``hint`` says where to look)."""
    out = Path(results)
    errors = sorted(out.glob("error_*.txt"))
    if errors:
        raise WorkerError("\n".join(f"--- {e.stem} ---\n{e.read_text()}" for e in errors))
    missing = [r for r in range(world_size) if not (out / f"result_{r}.pkl").exists()]
    if missing:
        raise WorkerError(f"ranks {missing} returned nothing within {timeout:.0f}s{hint}")
    return [pickle.loads((out / f"result_{r}.pkl").read_bytes()) for r in range(world_size)]


def _worker(fn: Callable, rank: int, world_size: int, port: int, results: str, timeout: float,
            env: dict[str, str], log_dir: str | None, args: tuple) -> None:
    if log_dir:  # keep the caller's stdout for its own output: each rank's chatter goes to a file
        log = open(Path(log_dir) / f"rank{rank}.log", "w")
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    run_rank(fn, rank, world_size, args, results, timeout)


def spawn(fn: Callable, world_size: int, *args: Any, timeout: float = 120, env: dict[str, str] | None = None,
          log_dir: str | os.PathLike[str] | None = None) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, one process each.

    ``env`` is added to each worker's environment; with ``log_dir`` each rank's stdout and stderr go
    to ``log_dir/rank<r>.log``. Raises :class:`WorkerError` if a rank fails or the job times out.
    """
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="meshweave-spawn-") as results:
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(fn, rank, world_size, port, results, timeout, env or {},
                                                   str(log_dir) if log_dir is not None else None, args),
                             name=f"rank{rank}", daemon=True)
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            # Stop early when a rank has failed: its peers may be blocked in a collective.
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline and not failed(results):
                time.sleep(0.05)
            for p in procs:
                p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        codes = {p.name: p.exitcode for p in procs}
        return collect_results(results, world_size, timeout, hint=f" (exit codes {codes})")


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The step records of ``run_dir/metrics.jsonl`` in step order (a step logged twice keeps the
    last: a resumed run re-logs from its checkpoint); ``[]`` when the run logged nothing."""
    from meshweave.metrics.sinks import read_metrics as read_records

    path = Path(run_dir) / "metrics.jsonl"
    return read_records(path) if path.exists() and path.stat().st_size else []
