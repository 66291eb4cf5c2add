"""Run a function on N local gloo ranks and collect what each returns.

``spawn(fn, world_size, *args)`` starts ``world_size`` fresh interpreters (the ``spawn`` start
method, so nothing of the test process is inherited), gives them a default gloo process group on a
free loopback port, calls ``fn(rank, world_size, *args)`` in each, and returns the return values
in rank order. ``fn`` and its return value must be picklable (``fn`` at module level of a test
module; tensors are fine). If a worker raises, :func:`spawn` raises ``WorkerError`` carrying that
worker's traceback; if the job outlives ``timeout`` seconds, every worker is killed.

Imported as ``_spawn``: pytest's default "prepend" import mode puts ``tests/dist`` (which has no
``__init__.py``) on ``sys.path`` before importing the test modules here, and spawned workers inherit
that ``sys.path``, so they can import both this module and the test module that defines ``fn``.
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
    """A spawned rank failed; the message holds its traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world_size: int, port: int, out_dir: str, timeout: float,
            args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share a couple of cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    out = Path(out_dir)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        payload = pickle.dumps(result)
        (out / f"result_{rank}.tmp").write_bytes(payload)
        (out / f"result_{rank}.tmp").rename(out / f"result_{rank}.pkl")
    except BaseException:
        (out / f"error_{rank}.txt").write_text(traceback.format_exc())
        raise SystemExit(1)


def spawn(fn: Callable, world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, one process each."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="meshweave-spawn-") as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(fn, rank, world_size, port, out_dir, timeout, args),
                             name=f"rank{rank}", daemon=True)
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        out = Path(out_dir)
        try:
            # Stop early when a rank has failed: its peers may be blocked in a collective.
            while any(p.is_alive() for p in procs):
                if time.monotonic() > deadline or any(out.glob("error_*.txt")):
                    break
                time.sleep(0.05)
            for p in procs:
                p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        errors = sorted(out.glob("error_*.txt"))
        if errors:
            raise WorkerError("\n".join(f"--- {e.stem} ---\n{e.read_text()}" for e in errors))
        missing = [r for r in range(world_size) if not (out / f"result_{r}.pkl").exists()]
        if missing:
            codes = {p.name: p.exitcode for p in procs}
            raise WorkerError(f"ranks {missing} returned nothing within {timeout}s (exit codes {codes})")
        return [pickle.loads((out / f"result_{r}.pkl").read_bytes()) for r in range(world_size)]
