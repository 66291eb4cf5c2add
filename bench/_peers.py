"""The DeepSpeed peer the benchmarks compare meshweave with: whether it runs, its environment, and
starting it inside gloo workers.

DeepSpeed is optional (``pip install -e '.[peers]'``): a bench without it still runs and its
table shows ``skipped: <reason>``, the reason coming from :func:`deepspeed_missing` (before the
workers start) or :func:`start_peer` (inside them).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bench._common import ROOT

T = TypeVar("T")


def deepspeed_missing(disabled: bool = False) -> str:
    """Why the DeepSpeed peer will not run ("" if it will): ``--no-deepspeed`` or not installed."""
    if disabled:
        return "--no-deepspeed"
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install -e '.[peers]')"
    return ""


def deepspeed_env(cache: Path | None = None) -> dict[str, str]:
    """Worker environment for the DeepSpeed peer: its CPU accelerator and a JIT-extension cache
    (``$TORCH_EXTENSIONS_DIR``, else ``cache``, else runs/torch_extensions) kept out of git."""
    where = Path(os.environ.get("TORCH_EXTENSIONS_DIR", str(cache or ROOT / "runs" / "torch_extensions")))
    where.mkdir(parents=True, exist_ok=True)
    if where.parent.name == ".cache" and not (where.parent / ".gitignore").exists():
        (where.parent / ".gitignore").write_text("*\n")
    return {"TORCH_EXTENSIONS_DIR": str(where), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}


def start_peer(build: Callable[[Any], T], skip: str = "", limit: int = 300) -> tuple[T | None, str]:
    """In a gloo worker, collectively (every rank calls it once, at the same point): unless ``skip``
    says why not, import DeepSpeed (its logger quiet), let it adopt the default process group and
    call ``build(deepspeed)``. Returns ``(what build returned, "")``, or ``(None, reason)`` when
    skipped or when ``build`` raised on any rank — the same decision on every rank, so all ranks
    then run the peer or none does. ``reason`` (at most ``limit`` characters) is the table's
    "skipped: ..." cell."""
    import torch
    import torch.distributed as dist

    value, error = None, skip
    if not skip:
        try:
            import deepspeed

            deepspeed.utils.logger.setLevel(logging.WARNING)
            deepspeed.init_distributed(dist_backend="gloo")  # torch.distributed is up: DeepSpeed adopts it
            value = build(deepspeed)
        except Exception as e:  # noqa: BLE001 - any failure becomes the table's "skipped" row
            text = str(e).strip()
            error = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:limit]
    flag = torch.tensor([1.0 if error else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and not error:
        error = "DeepSpeed failed on another rank (see its log)"
    return (None, error) if error else (value, "")
