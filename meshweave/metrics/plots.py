"""PNG plots of a run's ``metrics.jsonl``: loss, throughput, and communication per step (volume by
``<dim>/<op>``; time issued vs exposed by dim).

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


def comm_time_by_dim(records: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per mesh dim, the series ``step``, ``issued`` (seconds in flight, ``comm_seconds``) and
    ``exposed`` (seconds compute waited, ``comm_exposed_s``), each summed over the dim's ops; a
    row without a dim's figure counts 0 for it. Dims come from ``"<dim>/<op>"`` keys."""
    dims = sorted(
        {k.rsplit("/", 1)[0] for r in records for f in ("comm_seconds", "comm_exposed_s") for k in r.get(f) or {}}
    )
    out: dict[str, dict[str, list[float]]] = {d: {"step": [], "issued": [], "exposed": []} for d in dims}
    for r in records:
        if not isinstance(r.get("comm_exposed_s"), dict) and not isinstance(r.get("comm_seconds"), dict):
            continue
        for d in dims:
            for field, series in (("comm_seconds", "issued"), ("comm_exposed_s", "exposed")):
                values = r.get(field) or {}
                out[d][series].append(sum(float(v or 0.0) for k, v in values.items() if k.rsplit("/", 1)[0] == d))
            out[d]["step"].append(r["step"])
    return out


def _plot_comm(records: list[dict[str, Any]], path: Path) -> str:
    fig, (ax, ax_time) = plt.subplots(2, 1, figsize=(8, 8))
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

    # Issued (in flight) vs exposed (compute waiting) per dim: the gap is what overlap hid.
    by_dim = comm_time_by_dim(records)
    for i, (d, series) in enumerate(by_dim.items()):
        color = f"C{i % 10}"
        ax_time.plot(series["step"], series["issued"], color=color, linewidth=1.2, label=f"{d} issued")
        ax_time.plot(
            series["step"], series["exposed"], color=color, linestyle="--", linewidth=1.2, label=f"{d} exposed"
        )
    _note_if_empty(ax_time, bool(by_dim), "communication time")
    ax_time.set_xlabel("step")
    ax_time.set_ylabel("seconds per row (rank 0)")
    ax_time.set_title("Communication time by dim: issued (solid) vs exposed (dashed)")
    ax_time.grid(alpha=0.3)
    if by_dim:
        ax_time.legend(fontsize="small")
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
