"""Specification of exposed communication time in the run's outputs: the console line and the plot.

metrics.jsonl rows carry ``comm_seconds`` (issued: time in flight) and ``comm_exposed_s`` (compute
waiting) per ``"<dim>/<op>"``; the console shows the total exposed time and its share of the row's
wall time; comm_bytes.png shows issued vs exposed per mesh dim. (That real runs write the fields is
tests/dist/test_fsdp_prefetch.py's job.)
"""

from __future__ import annotations

import json
from pathlib import Path

from meshweave.metrics.plots import comm_time_by_dim, plot_run
from meshweave.metrics.sinks import format_console_line

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(step: int, scale: float = 1.0) -> dict:
    return {
        "step": step,
        "loss": 3.0,
        "comm_bytes": {"dp_shard/all_gather": 1000, "dp_shard/reduce_scatter": 500, "tp/all_reduce": 10},
        "comm_seconds": {"dp_shard/all_gather": 0.4 * scale, "dp_shard/reduce_scatter": 0.2, "tp/all_reduce": 0.1},
        "comm_exposed_s": {"dp_shard/all_gather": 0.1 * scale, "tp/all_reduce": 0.1},
        "comm_exposed_frac": 0.25,
    }


def test_console_line_shows_total_exposed_and_its_share():
    line = format_console_line(_row(3), 10)
    assert line.endswith("| exposed 0.200s (25%)")


def test_console_line_without_exposed_figures_is_unchanged():
    assert format_console_line({"step": 1, "loss": 2.0, "comm_exposed_s": {}}, 5) == "step 1/5 | loss 2.0000"


def test_issued_and_exposed_are_summed_per_dim():
    series = comm_time_by_dim([_row(1), _row(2, scale=2.0), {"step": 3, "loss": 1.0}])
    assert set(series) == {"dp_shard", "tp"}
    assert series["dp_shard"]["step"] == [1, 2]  # a row without comm figures is not a point
    assert series["dp_shard"]["issued"] == [0.4 + 0.2, 0.8 + 0.2]
    assert series["dp_shard"]["exposed"] == [0.1, 0.2]  # reduce_scatter had nothing exposed
    assert series["tp"]["issued"] == series["tp"]["exposed"] == [0.1, 0.1]


def test_comm_plot_renders_with_exposed_time(tmp_path: Path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(_row(s)) + "\n" for s in range(1, 6)))
    paths = plot_run(str(tmp_path))
    comm = Path(paths[-1])
    assert comm.name == "comm_bytes.png" and comm.read_bytes().startswith(PNG_MAGIC)
