"""The run's log sinks: metrics.jsonl, events.log, the console and Weights & Biases.

Rank 0 owns every sink. One logged step is one JSON object on one line of ``metrics.jsonl`` in
the run directory, so a crashed or resumed run leaves a file that is still readable line by line;
the same record goes to the console (a compact line, under a tqdm bar when progress is on) and,
when enabled, to Weights & Biases. Lifecycle messages go to ``events.log``.
"""

from __future__ import annotations

import datetime
import json
import math
import netrc
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from meshweave.metrics.telemetry import GpuTelemetry

# Every line of metrics.jsonl carries these keys (None when not measured), in this order.
METRIC_KEYS: tuple[str, ...] = (
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "step_time_s",
    "mfu",
    "mem_peak_bytes",
    "comm_bytes",
    "comm_bytes_total",
    "gpu_util",
    "gpu_mem_bytes",
    "gpu_power_w",
)


# --------------------------------------------------------------------------------------------
# record serialisation and console formatting


def to_json_value(value: Any) -> Any:
    """``value`` as plain JSON data: tensors and numpy scalars become numbers, nan/inf become None.

    Unknown objects become their ``str``: a log line must never be what kills a long run.
    """
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return to_json_value(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays, without importing numpy here
        return to_json_value(value.tolist())
    return str(value)


_CONSOLE_FIELDS: tuple[tuple[str, str], ...] = (
    ("loss", "loss {:.4f}"),
    ("eval_loss", "eval {:.4f}"),
    ("lr", "lr {:.1e}"),
    ("grad_norm", "gnorm {:.3f}"),
    ("tokens_per_s", "{:,.0f} tok/s"),
    ("mfu", "mfu {:.1f}%"),
)


def format_console_line(record: dict[str, Any], total_steps: int) -> str:
    """The compact one-line summary of a record; fields that are None or absent are left out."""
    parts = [f"step {record['step']}/{total_steps}"]
    for key, fmt in _CONSOLE_FIELDS:
        if record.get(key) is not None:
            parts.append(fmt.format(100 * record[key] if key == "mfu" else record[key]))
    comm = record.get("comm_bytes")
    if isinstance(comm, dict) and comm:
        parts.append(f"comm {sum(v for v in comm.values() if v is not None) / 1e6:.2f} MB")
    exposed = record.get("comm_exposed_s")
    if isinstance(exposed, dict) and exposed:
        total = sum(v for v in exposed.values() if v is not None)
        share = record.get("comm_exposed_frac")
        parts.append(f"exposed {total:.3f}s" + (f" ({100 * share:.0f}%)" if isinstance(share, float) else ""))
    return " | ".join(parts)


def _wandb_credentials_present() -> bool:
    """Whether wandb would find credentials without prompting: env, or `wandb login`'s netrc."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "api.wandb.ai")).split("/")[0]
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host.split(":")[0]) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def _wandb_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record as wandb wants it: comm_bytes flattened to ``comm/<dim>/<op>``, Nones dropped."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == "step" or value is None:
            continue
        if key == "comm_bytes" and isinstance(value, dict):
            out.update({f"comm/{k}": v for k, v in value.items() if v is not None})
        elif key == "comm_exposed_s" and isinstance(value, dict):
            out.update({f"comm_exposed/{k}": v for k, v in value.items() if v is not None})
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# the logger


class MetricsLogger:
    """Rank 0's sinks for step records and events: metrics.jsonl, events.log, console, wandb.

    On any other rank every method is a no-op and nothing is created. Each :meth:`log` call
    appends exactly one complete line to ``metrics.jsonl`` and flushes it, and an existing file is
    appended to, never truncated, so a resumed run keeps its history (the trainer rewinds it if
    it must).
    """

    def __init__(
        self,
        run_dir: str,
        log_cfg: Any,
        total_steps: int,
        is_rank0: bool,
        config_dict: dict[str, Any] | None = None,
        start_step: int = 0,
    ) -> None:
        self.enabled = is_rank0
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self._metrics: TextIO | None = None
        self._events: TextIO | None = None
        self._bar: tqdm | None = None
        self._wandb_run: Any = None
        self._telemetry: GpuTelemetry | None = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = self._open_append(self.run_dir / "metrics.jsonl")
        self._events = self._open_append(self.run_dir / "events.log")
        self._telemetry = GpuTelemetry()
        # A bar in a log file is a wall of carriage returns: only draw it on a terminal.
        if log_cfg.progress and sys.stderr.isatty():
            self._bar = tqdm(
                total=total_steps, initial=start_step, file=sys.stderr, unit="step", dynamic_ncols=True, desc="train"
            )
        if log_cfg.wandb:
            try:
                self._wandb_run = self._init_wandb(log_cfg, config_dict, start_step)
            except BaseException:
                self.close()
                raise

    @staticmethod
    def _open_append(path: Path) -> TextIO:
        # A crash mid-write can leave a final line without its newline; start on a fresh line so
        # the torn line stays one malformed line instead of corrupting the next record too.
        torn = False
        if path.is_file() and path.stat().st_size > 0:
            with open(path, "rb") as raw:
                raw.seek(-1, os.SEEK_END)
                torn = raw.read(1) != b"\n"
        f = open(path, "a", encoding="utf-8")
        if torn:
            f.write("\n")
            f.flush()
        return f

    def _init_wandb(self, log_cfg: Any, config_dict: dict[str, Any] | None, start_step: int) -> Any:
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                "log.wandb=true but wandb is not installed: pip install 'meshweave[wandb]' (or set log.wandb=false)"
            ) from None
        # An explicit WANDB_MODE is the user's choice; otherwise never block on a login prompt.
        mode = None
        if not os.environ.get("WANDB_MODE") and not _wandb_credentials_present():
            mode = "offline"
            self.event("wandb: no API key or login found, logging offline (sync later with `wandb sync`)")
        # Keep the run id in the run directory so a resumed run continues the same wandb run.
        id_file = self.run_dir / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if start_step > 0 and id_file.is_file() else ""
        if not run_id:
            run_id = uuid.uuid4().hex[:12]
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
        return wandb.init(
            project=log_cfg.wandb_project,
            name=log_cfg.wandb_run_name or None,
            config=config_dict,
            dir=str(self.run_dir),
            mode=mode,
            id=run_id,
            resume="allow",
        )

    def log(self, record: dict[str, Any]) -> None:
        """Append one step record (must have ``step``) to every sink.

        Missing :data:`METRIC_KEYS` are filled with None (GPU telemetry is read here when absent),
        extra keys are kept, and values are made JSON-safe (nan/inf -> null).
        """
        if not self.enabled:
            return
        if "step" not in record:
            raise ValueError("MetricsLogger.log: record has no 'step'")
        if "gpu_util" not in record and self._telemetry is not None:
            record = {**self._telemetry.read(), **record}
        clean = {key: to_json_value(record.get(key)) for key in METRIC_KEYS}
        if clean["comm_bytes"] is None:
            clean["comm_bytes"] = {}
        clean.update({k: to_json_value(v) for k, v in record.items() if k not in clean})

        assert self._metrics is not None
        self._metrics.write(json.dumps(clean, allow_nan=False) + "\n")
        self._metrics.flush()

        line = format_console_line(clean, self.total_steps)
        if self._bar is not None:
            step = int(clean["step"])
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            shown = (("loss", "loss", "{:.4f}"), ("lr", "lr", "{:.1e}"), ("tok/s", "tokens_per_s", "{:,.0f}"))
            self._bar.set_postfix(
                {name: fmt.format(clean[key]) for name, key, fmt in shown if clean[key] is not None}, refresh=False
            )
        self._say(line)
        if self._wandb_run is not None:
            self._wandb_run.log(_wandb_record(clean), step=int(clean["step"]))

    def event(self, msg: str) -> None:
        """Append ``<local ISO time> msg`` to events.log and print ``[meshweave] msg``."""
        if not self.enabled:
            return
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        if self._events is not None:
            self._events.write(f"{stamp} {msg}\n")
            self._events.flush()
        self._say(f"[meshweave] {msg}")

    def _say(self, line: str) -> None:
        # tqdm.write lifts the bar out of the way so the line is not printed through it.
        if self._bar is not None:
            tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """Close the bar, finish wandb, shut NVML and close the files. Safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if self._telemetry is not None:
            self._telemetry.close()
            self._telemetry = None
        for f in (self._metrics, self._events):
            if f is not None:
                f.close()
        self._metrics = self._events = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Step records of a metrics.jsonl, sorted by step, one per step (the last one written wins).

    Lines that are not JSON objects with an integer ``step`` (a torn final line, stray output)
    are skipped. Raises ValueError naming the file if it is missing or holds no records.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such metrics file (is this a meshweave run directory?)")
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            step = record.get("step")
            if isinstance(step, bool) or not isinstance(step, int):
                continue
            # A resumed run rewinds to its checkpoint and re-logs those steps; the rerun is current.
            by_step[step] = record
    if not by_step:
        raise ValueError(f"{path}: no step records (file is empty or malformed)")
    return [by_step[s] for s in sorted(by_step)]
