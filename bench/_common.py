"""Helpers shared by the scripts in bench/: launching runs, spawning gloo workers, tables.

Nothing here times anything by itself; each bench decides what it measures and prints.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import pickle
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` from anywhere imports this checkout's meshweave
    sys.path.insert(0, str(ROOT))

# Flags that make a CLI run a pure training run: no progress bar, no checkpoint, no eval.
QUIET_RUN = ["--log.progress=false", "--checkpoint.save_final=false", "--checkpoint.resume=none",
             "--train.eval_interval=0"]


# ------------------------------------------------------------------------------------------------
# the real CLI


def start_cli(out: Path, nproc: int, args: Sequence[str]) -> subprocess.Popen:
    """Start ``python -m meshweave run --nproc N --out OUT ARGS`` (one intra-op thread per worker);
    returns the process. Its stdout/stderr go to OUT/stdout.log and OUT/stderr.log."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "meshweave", "run", f"--nproc={nproc}", f"--out={out}", *QUIET_RUN, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
    with open(out / "stdout.log", "w") as stdout, open(out / "stderr.log", "w") as stderr:
        return subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env, cwd=ROOT)


def _pythonpath() -> str:
    old = os.environ.get("PYTHONPATH")
    return str(ROOT) if not old else f"{ROOT}{os.pathsep}{old}"


def read_metrics(out: Path) -> list[dict]:
    """metrics.jsonl records in step order (a step logged twice keeps the last)."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def steady_comm_bytes(records: list[dict], skip: int = 1) -> dict[str, float]:
    """Per ``dim/op`` key, the median over steps after the first ``skip`` of bytes that step.

    A key absent from a step counts as 0 for that step.
    """
    use = records[skip:] or records
    keys = sorted({k for r in use for k in r.get("comm_bytes", {})})
    return {k: statistics.median(r.get("comm_bytes", {}).get(k, 0) for r in use) for k in keys}


# ------------------------------------------------------------------------------------------------
# gloo workers in fresh interpreters


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(fn: Callable, rank: int, world: int, port: int, results: str, timeout: float,
                 env: dict[str, str], log_dir: str | None, args: tuple) -> None:
    if log_dir:  # keep the bench's stdout for its tables: workers' chatter goes to a file per rank
        log = open(Path(log_dir) / f"rank{rank}.log", "w")
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    where = Path(results)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
        value = fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
        (where / f"{rank}.tmp").write_bytes(pickle.dumps(value))
        (where / f"{rank}.tmp").rename(where / f"{rank}.pkl")
    except BaseException:
        (where / f"{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1)


class WorkerError(RuntimeError):
    """A worker failed or the job timed out; the message holds the first traceback."""


def spawn(fn: Callable, world: int, *args: Any, timeout: float = 900, env: dict[str, str] | None = None,
          log_dir: Path | None = None) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks (spawned interpreters); rank-ordered results.

    ``fn`` must live at module level of an importable module (or the main script). With ``log_dir``
    each rank's stdout/stderr go to ``log_dir/rank<r>.log``.
    """
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="meshweave-bench-") as results:
        port = free_port()
        procs = [ctx.Process(target=_worker_main, args=(fn, r, world, port, results, timeout, env or {},
                                                             str(log_dir) if log_dir else None, args),
                             daemon=True, name=f"bench-rank{r}") for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        where = Path(results)
        try:
            while any(p.is_alive() for p in procs):
                if time.monotonic() > deadline or any(where.glob("*.err")):
                    break
                time.sleep(0.1)
            for p in procs:
                p.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        errors = sorted(where.glob("*.err"))
        if errors:
            raise WorkerError(f"rank {errors[0].stem} failed:\n{errors[0].read_text()}")
        missing = [r for r in range(world) if not (where / f"{r}.pkl").exists()]
        if missing:
            raise WorkerError(f"ranks {missing} returned nothing within {timeout:.0f}s")
        return [pickle.loads((where / f"{r}.pkl").read_bytes()) for r in range(world)]


# ------------------------------------------------------------------------------------------------
# tables


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A markdown table, padded so it also reads as plain text; ``right`` = right-aligned columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def fmt_int(x: float | None) -> str:
    return "-" if x is None else f"{round(x):,}"


def fmt_ratio(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


class Report:
    """Sections printed as they complete and written to ``OUT/<name>.md`` at the end."""

    def __init__(self, out: Path, name: str, title: str) -> None:
        self.out, self.name = out, name
        self.parts = [f"# {title}\n"]
        out.mkdir(parents=True, exist_ok=True)

    def add(self, text: str) -> None:
        print(text, flush=True)
        self.parts.append(text)
        self.write()

    def write(self) -> Path:
        path = self.out / f"{self.name}.md"
        path.write_text("\n\n".join(self.parts) + "\n")
        return path
