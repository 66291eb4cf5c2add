"""Helpers shared by the scripts in bench/: launching runs, spawning gloo workers, tables.

Nothing here times anything by itself; each bench decides what it measures and prints.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` from anywhere imports this checkout's meshweave
    sys.path.insert(0, str(ROOT))

# Spawning gloo workers, ports and run directories: the one harness tests and launch/ use too.
from meshweave.launch.harness import WorkerError, free_port, read_metrics, spawn  # noqa: E402

__all__ = ["ROOT", "QUIET_RUN", "Report", "WorkerError", "free_port", "fmt_int", "fmt_ratio", "md_table",
           "package_version", "deepspeed_env", "read_metrics", "spawn", "start_cli", "steady_comm_bytes"]

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


def steady_comm_bytes(records: list[dict], skip: int = 1) -> dict[str, float]:
    """Per ``dim/op`` key, the median over steps after the first ``skip`` of bytes that step.

    A key absent from a step counts as 0 for that step.
    """
    use = records[skip:] or records
    keys = sorted({k for r in use for k in r.get("comm_bytes", {})})
    return {k: statistics.median(r.get("comm_bytes", {}).get(k, 0) for r in use) for k in keys}


# ------------------------------------------------------------------------------------------------
# the peers and the machine


def package_version(name: str) -> str:
    """The installed version of ``name``, or "(not installed)" (DeepSpeed is an optional peer)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "(not installed)"


def deepspeed_env(cache: Path | None = None) -> dict[str, str]:
    """Worker environment for the DeepSpeed peer: its CPU accelerator and a JIT-extension cache
    (``$TORCH_EXTENSIONS_DIR``, else ``cache``, else runs/torch_extensions) kept out of git."""
    where = Path(os.environ.get("TORCH_EXTENSIONS_DIR", str(cache or ROOT / "runs" / "torch_extensions")))
    where.mkdir(parents=True, exist_ok=True)
    if where.parent.name == ".cache" and not (where.parent / ".gitignore").exists():
        (where.parent / ".gitignore").write_text("*\n")
    return {"TORCH_EXTENSIONS_DIR": str(where), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}


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
