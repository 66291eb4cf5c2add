"""PNG plots of a run's ``metrics.jsonl``: loss, throughput and communication volume per step.

Plotting reads only the run directory, so it works on a finished run, a crashed one, or a copy
on a laptop without the GPUs that produced it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

# Headless by construction: training hosts have no display, and Agg needs none.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
from matplotlib.axes import Axes  # noqa: E402

from meshweave.metrics.sinks import read_metrics  # noqa: E402


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records whose ``key`` is a number."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _note_if_empty(ax: Axes, has_data: bool, what: str) -> None:
    # An empty plot is still written so a run always has the same three files; say why it's empty.
    if not has_data:
        ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes)


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _plot_loss(records: list[dict[str, Any]], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs, ys = _series(records, "loss")
    ax.plot(xs, ys, label="train loss", linewidth=1.2)
    ex, ey = _series(records, "eval_loss")
    if ex:
        ax.plot(ex, ey, "o-", label="eval loss", markersize=4)
    _note_if_empty(ax, bool(xs or ex), "loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    if xs or ex:
        ax.legend()
    return _save(fig, path)


def _plot_throughput(records: list[dict[str, Any]], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs, ys = _series(records, "tokens_per_s")
    ax.plot(xs, ys, linewidth=1.2)
    _note_if_empty(ax, bool(xs), "throughput")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s (global)")
    ax.set_title("Throughput")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_comm(records: list[dict[str, Any]], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    keys = sorted({k for r in records if isinstance(r.get("comm_bytes"), dict) for k in r["comm_bytes"]})
    for key in keys:
        xs, ys = [], []
        for r in records:
            v = (r.get("comm_bytes") or {}).get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                xs.append(r["step"])
                ys.append(v / 1e6)
        ax.plot(xs, ys, label=key, linewidth=1.2)
    _note_if_empty(ax, bool(keys), "communication")
    ax.set_xlabel("step")
    ax.set_ylabel("MB per step")
    ax.set_title("Communication volume by <dim>/<op>")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write loss.png, throughput.png and comm_bytes.png for ``run_dir``; return their paths.

    ``out_dir`` defaults to ``run_dir/plots``. All three files are always written (with a note
    when a series is absent). Raises ValueError naming metrics.jsonl if it is missing or empty.
    """
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    return [
        _plot_loss(records, out / "loss.png"),
        _plot_throughput(records, out / "throughput.png"),
        _plot_comm(records, out / "comm_bytes.png"),
    ]
