"""The shared layer of the benchmarks: options, runs and the report.

A bench script is its experiment only — what to run, what to measure, which rows and columns show
it — and hands the rest to this module: :func:`options` (the options every bench shares),
:func:`run_cli` / :func:`run_clis` / :func:`run_nodes` (training runs through the real CLI),
:func:`run_ranks` (gloo workers through :mod:`meshweave.launch.harness`, optionally on shaped
links) and :class:`Report` (markdown sections, the JSON of raw numbers, the plot). The DeepSpeed
peer is bench/_peers.py, the shaped links bench/_netns.py. Nothing here times anything by itself.

Run a bench from the repository root as a module: ``.venv/bin/python -m bench.<name> [options]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from meshweave.launch.harness import WorkerError, read_metrics, spawn

ROOT = Path(__file__).resolve().parent.parent

# Flags that make a CLI run a pure training run: no progress bar, no checkpoint, no eval.
QUIET_RUN = [
    "--log.progress=false",
    "--checkpoint.save_final=false",
    "--checkpoint.resume=none",
    "--train.eval_interval=0",
]


# ------------------------------------------------------------------------------------------------
# options


def options(
    doc: str, quick: str, *, out: Path = ROOT / "bench" / "results", tables: str = "", deepspeed: bool = False
) -> argparse.ArgumentParser:
    """A parser with the options benches share — ``--quick`` (``quick`` says what it shortens),
    ``--out`` (default ``out``) and, when asked, ``--tables`` (default ``tables``, parsed to a list
    of ints) and ``--no-deepspeed`` — described by the first paragraph of ``doc``; the bench adds
    its own options."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--out", type=Path, default=out, help="where the report (markdown, JSON, plot) and worker logs go")
    if tables:
        ap.add_argument("--tables", type=int_list, default=tables, help="which tables to run, e.g. 1 or 1,3")
    if deepspeed:
        ap.add_argument("--no-deepspeed", action="store_true", help="run without the DeepSpeed peer")
    return ap


def int_list(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]`` (empty items ignored)."""
    return [int(t) for t in text.split(",") if t.strip()]


# ------------------------------------------------------------------------------------------------
# training runs through the real CLI


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI run: one intra-op thread per worker, this checkout's meshweave."""
    old = os.environ.get("PYTHONPATH")
    path = str(ROOT) if not old else f"{ROOT}{os.pathsep}{old}"
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


@dataclass
class CliRun:
    """A finished CLI run: its directory, exit code (or why it was stopped), wall-clock seconds
    from start to exit, and the records of its metrics.jsonl (whatever it logged, also on failure)."""

    out: Path
    code: int | str
    wall_s: float
    records: list[dict] = field(default_factory=list)

    @classmethod
    def read(cls, out: Path, code: int | str, wall_s: float) -> CliRun:
        """The run that left ``out`` with exit ``code`` after ``wall_s`` seconds."""
        return cls(out, code, wall_s, read_metrics(out))

    @property
    def ok(self) -> bool:
        return self.code == 0

    def steady_comm_bytes(self, skip: int = 1) -> dict[str, float]:
        """Per ``dim/op`` key, the median over the steps after the first ``skip`` of the bytes sent
        that step (a key absent from a step counts as 0 there)."""
        use = self.records[skip:] or self.records
        keys = sorted({k for r in use for k in r.get("comm_bytes", {})})
        return {k: statistics.median(r.get("comm_bytes", {}).get(k, 0) for r in use) for k in keys}

    def error(self, logs: Sequence[str] = ("stderr.log",), lines: int = 3, chars: int = 400) -> str:
        """``exit <code>`` and the last non-empty ``lines`` of each of ``logs`` that exists: a "failed" cell."""
        tail = ""
        for name in logs:
            if (self.out / name).exists():
                kept = [ln for ln in (self.out / name).read_text().splitlines() if ln.strip()]
                tail += f" [{name}: {' | '.join(kept[-lines:])[-chars:]}]"
        return f"exit {self.code}{tail}"


def start_cli(out: Path, nproc: int, args: Sequence[str]) -> subprocess.Popen:
    """Start ``python -m meshweave run --nproc N --out OUT`` with :data:`QUIET_RUN` and ``args``;
    returns the process. Its stdout/stderr go to OUT/stdout.log and OUT/stderr.log; a
    metrics.jsonl left by an earlier run in OUT is removed first, so every record read is this run's."""
    cmd = [sys.executable, "-m", "meshweave", "run", f"--nproc={nproc}", f"--out={out}", *QUIET_RUN, *args]
    with _fresh(out, "stdout.log") as stdout, open(out / "stderr.log", "w") as stderr:
        return subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=cli_env(), cwd=ROOT)


def run_clis(runs: Mapping[str, tuple[Path, int, Sequence[str]]], timeout: float, jobs: int = 1) -> dict[str, CliRun]:
    """Run each ``name -> (out, nproc, args)`` through :func:`start_cli`, ``jobs`` at a time (bytes
    do not depend on timing; times do, so timed runs go one at a time); a run past ``timeout``
    seconds is killed with its workers. Prints one progress line per run."""
    pending, running, done = list(runs.items()), [], {}
    while pending or running:
        while pending and len(running) < jobs:
            name, (out, nproc, args) = pending.pop(0)
            running.append((name, out, start_cli(out, nproc, args), time.perf_counter()))
        for item in list(running):
            name, out, proc, started = item
            code: int | str | None = proc.poll()
            if code is None and time.perf_counter() - started > timeout:
                stop_tree(proc)
                code = f"timeout after {timeout:.0f} s"
            if code is None:
                continue
            running.remove(item)
            done[name] = CliRun.read(out, code, time.perf_counter() - started)
            print(f"  {name}: exit {code}, {len(done[name].records)} steps, {done[name].wall_s:.0f} s", flush=True)
        time.sleep(0.2)
    return {name: done[name] for name in runs}


def run_cli(out: Path, nproc: int, args: Sequence[str], timeout: float) -> CliRun:
    """One CLI run (see :func:`run_clis`)."""
    return run_clis({out.name: (out, nproc, args)}, timeout)[out.name]


def run_nodes(
    out: Path,
    args: Sequence[str],
    timeout: float,
    master: str,
    port: int,
    prefixes: Sequence[Sequence[str]],
    envs: Sequence[dict[str, str]],
) -> CliRun:
    """One multi-node run with one process per node: node ``r`` runs ``torchrun --nnodes N
    --node-rank r -m meshweave train --out OUT`` (:data:`QUIET_RUN` and ``args``; N =
    ``len(prefixes)``) behind ``prefixes[r]`` (e.g. :meth:`bench._netns.ShapedNetwork.command`)
    with ``envs[r]`` added to :func:`cli_env`, its output in OUT/node<r>.log. Stops every node
    when one fails or ``timeout`` passes; the code is then why."""
    procs = []
    started = time.perf_counter()
    for rank, (prefix, env) in enumerate(zip(prefixes, envs, strict=True)):
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(prefixes)}", f"--node-rank={rank}"]
        rendezvous = ["--nproc-per-node=1", f"--master-addr={master}", f"--master-port={port}"]
        cmd = [*prefix, *torchrun, *rendezvous, "-m", "meshweave", "train", f"--out={out}", *QUIET_RUN, *args]
        with _fresh(out, f"node{rank}.log", clear=rank == 0) as log:
            procs.append(
                subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=cli_env(**env), cwd=ROOT
                )
            )
    code: int | str | None = None
    try:
        while code is None:  # every node done, or one failed, or out of time
            time.sleep(0.2)
            polled = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in polled):
                code = f"a node exited with {polled}"
            elif all(c == 0 for c in polled):
                code = 0
            elif time.perf_counter() - started > timeout:
                code = f"timeout after {timeout:.0f} s"
    finally:
        for p in procs:
            if p.poll() is None:
                stop_tree(p)
    return CliRun.read(out, code if code is not None else "interrupted", time.perf_counter() - started)


def _fresh(out: Path, log: str, clear: bool = True) -> TextIO:
    """Make the run directory, drop a stale metrics.jsonl (when ``clear``), open ``log`` for writing."""
    out.mkdir(parents=True, exist_ok=True)
    if clear:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    return open(out / log, "w")


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a run this bench started and every process below it (torchrun puts its workers in a
    session of their own, so killing the launcher alone would leave them running)."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, then theirs), from /proc."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


# ------------------------------------------------------------------------------------------------
# gloo workers


def run_ranks(
    fn: Callable,
    world: int,
    *args: Any,
    log_dir: Path,
    timeout: float,
    env: dict[str, str] | None = None,
    rate_mbit: float | None = None,
) -> list[Any] | str:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks (:func:`meshweave.launch.harness.spawn`;
    with ``rate_mbit``, each rank in a network namespace of its own on links shaped to that rate,
    bench/_netns.py), each rank's output in ``log_dir/rank<r>.log``. Returns the rank-ordered
    results, or, when a rank failed or the job timed out, the line for the table:
    ``failed: <last line of the error> (traceback in log_dir/error.txt)``."""
    try:
        if rate_mbit is None:
            return spawn(fn, world, *args, timeout=timeout, env=env, log_dir=log_dir)
        from bench._netns import spawn_in_namespaces

        return spawn_in_namespaces(fn, world, *args, rate_mbit=rate_mbit, timeout=timeout, env=env, log_dir=log_dir)
    except WorkerError as e:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "error.txt").write_text(str(e))
        return f"failed: {str(e).strip().splitlines()[-1]} (traceback in {log_dir / 'error.txt'})"


# ------------------------------------------------------------------------------------------------
# the report


def package_version(name: str) -> str:
    """The installed version of ``name``, or "(not installed)" (DeepSpeed is an optional peer)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "(not installed)"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A markdown table, padded so it also reads as plain text; ``right`` = right-aligned columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def fmt_int(x: float | None) -> str:
    return "-" if x is None else f"{round(x):,}"


def fmt_ratio(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


class Report:
    """One bench's output: markdown sections printed as they complete, with ``OUT/<name>.md``
    rewritten after each; when the bench keeps raw numbers in :attr:`raw`, ``OUT/<name>.json``
    is rewritten with it (so an interrupted bench leaves what it measured so far)."""

    def __init__(self, out: Path, name: str, title: str, json_indent: int | None = 1) -> None:
        self.out, self.name, self.json_indent = out, name, json_indent
        self.parts = [f"# {title}\n"]
        self.raw: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.load_start = os.getloadavg()
        out.mkdir(parents=True, exist_ok=True)

    @property
    def md_path(self) -> Path:
        return self.out / f"{self.name}.md"

    @property
    def json_path(self) -> Path:
        return self.out / f"{self.name}.json"

    def environment(self, *packages: str) -> str:
        """``torch 2.x, DeepSpeed y, N cores, load average L at start`` for the report's first line."""
        names = {"deepspeed": "DeepSpeed"}
        versions = [f"{names.get(p, p)} {package_version(p)}" for p in packages]
        return ", ".join([*versions, f"{os.cpu_count()} cores, load average {self.load_start[0]:.2f} at start"])

    def add(self, text: str) -> None:
        print(text, flush=True)
        self.parts.append(text)
        self.write()

    def write(self) -> Path:
        """Rewrite the markdown (and the JSON when :attr:`raw` holds anything); the markdown's path."""
        self.md_path.write_text("\n\n".join(self.parts) + "\n")
        if self.raw:
            self.json_path.write_text(json.dumps(self.raw, indent=self.json_indent, default=str))
        return self.md_path

    def figure(self, *args: Any, **kwargs: Any) -> tuple[Any, Any] | None:
        """``matplotlib.pyplot.subplots(*args, **kwargs)`` on the headless Agg backend; None when
        matplotlib is missing (the report then says the plot was not written)."""
        try:
            import matplotlib
        except ImportError:
            return None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt.subplots(*args, **kwargs)

    def save_figure(self, fig: Any, dpi: int = 120) -> Path:
        """Lay out ``fig``, write it to ``OUT/<name>.png`` and close it; returns the path."""
        import matplotlib.pyplot as plt

        path = self.out / f"{self.name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        return path

    def finish(self, note: str = "") -> int:
        """The closing section (``note``, total time, load average, where the files are); 0."""
        load = os.getloadavg()
        total = time.perf_counter() - self.started
        if self.raw:
            self.raw["total_s"] = total
            self.raw["load_average"] = {"start": self.load_start, "end": load}
        where = f"Markdown: {self.md_path}" + (f"; raw numbers: {self.json_path}" if self.raw else "")
        self.add(f"{note}Total bench time: {total:.0f} s; load average {load[0]:.2f} at the end. {where}")
        return 0
