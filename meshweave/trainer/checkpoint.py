"""Checkpoints with ``torch.distributed.checkpoint``: atomic, pruned, resumable.

Layout of ``<out>/checkpoints/``::

    step-200/            a complete checkpoint (DCP shards + .metadata + per-rank RNG files)
    step-300.tmp/        a save in progress, or one that crashed: never loaded, removed on next save

A save writes everything into ``step-N.tmp/``, waits for every rank, and only then rank 0 renames
it to ``step-N/`` — so a crash mid-save leaves the previous checkpoint untouched and loadable.
Only tensors are stored (trainer scalars become 0-d tensors; RNG states are uint8 tensors), so
loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from meshweave.comm.ops import CommGroup, barrier

_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors (CPU, and CUDA when present)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Saves and finds checkpoints under ``root``; ``save``/``load`` are collective over ``group``."""

    def __init__(self, root: str | Path, keep: int, group: CommGroup) -> None:
        self.root, self.keep, self.group = Path(root), keep, group

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := _STEP_DIR.match(p.name)) and (p / ".metadata").is_file()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint ``--checkpoint.resume`` names: ``auto`` (newest, if any), ``none``, or a path."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"checkpoint.resume={resume!r}: not a complete checkpoint directory "
                                    "(no .metadata); use auto, none, or a step-N directory")
        return path

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, int | float]) -> Path:
        """Write ``step-N/`` atomically, then keep only the newest ``keep`` (collective)."""
        final = self.root / f"step-{step}"
        tmp = self.root / f"step-{step}.tmp"
        if self.group.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.group)
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
            "trainer": _to_tensors(trainer_state),
        }
        dcp.save(state, checkpoint_id=str(tmp), process_group=self.group.pg)
        torch.save(rng_state(), tmp / f"rng-rank{self.group.rank}.pt")
        barrier(self.group)
        if self.group.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune()
        barrier(self.group)
        return final

    def _prune(self) -> None:
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, int | float]) -> dict[str, int | float]:
        """Restore model, optimizer and RNG from ``path``; returns the saved trainer scalars.

        ``trainer_state`` gives the keys and types to read back (collective).
        """
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
            "trainer": _to_tensors(trainer_state),
        }
        dcp.load(state, checkpoint_id=str(path), process_group=self.group.pg)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        rng_file = path / f"rng-rank{self.group.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return {k: type(trainer_state[k])(v.item()) for k, v in state["trainer"].items()}


def _to_tensors(values: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else torch.int64)
            for k, v in values.items()}
