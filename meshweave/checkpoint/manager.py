"""Checkpoints with ``torch.distributed.checkpoint``: atomic, verified, optionally asynchronous.

Layout of ``<out>/checkpoints/``::

    step-200/            complete: DCP shards + .metadata + rng-rank*.pt (+ local-rank*.pt) + manifest.json
    step-300.tmp/        a save in progress, or one that crashed: never loaded, removed later
    LATEST               name of the newest committed checkpoint (moved only after commit)

A save writes into ``step-N.tmp/``. When every rank's data is on disk (DCP's metadata is written
last, after all ranks report), rank 0 *commits*: it writes ``manifest.json`` — step, the layout it
was saved under, the model shape, and the size and SHA-256 of every file — then renames the
directory to ``step-N/``, then moves ``LATEST`` and prunes to ``keep``. A crash at any point
leaves the previous checkpoint untouched.

Loading verifies the manifest first and names the first missing, truncated or altered file;
``resume=auto`` then falls back to the next older complete checkpoint with a warning. Tensors load
weights-only and DCP's pickled metadata goes through a restricted unpickler (``safe_load.py``):
nothing arbitrary is ever unpickled. Checkpoint keys do not depend on the layout, so a checkpoint
loads onto any layout the model allows; DCP reshards.

With ``async_save`` the state is staged to host memory and written by a background thread on a
process group of its own (so its collectives never interleave with training's); training continues
and the commit happens when the write is durable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from meshweave.checkpoint.safe_load import SafeFileSystemReader, SafeLoadPlanner
from meshweave.comm.ops import CommGroup, barrier, broadcast
from meshweave.config import Config

# Optimizer state and hyperparameters keyed per parameter name ("param_groups.<fqn>.lr"), not as
# a list of groups saved by one rank: a pipeline rank holds only its stages' parameters, so only
# per-name keys load onto another pipeline layout.
LAYOUT_FREE = StateDictOptions(flatten_optimizer_state_dict=True)

MANIFEST = "manifest.json"
LATEST = "LATEST"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the bad file."""


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Record size and SHA-256 of every file in ``directory`` plus ``info``; written last, fsynced."""
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != MANIFEST:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {**info, "files": files}
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(directory / MANIFEST)
    _fsync_dir(directory)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory}: {MANIFEST} is missing (the save did not finish)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None


def verify(directory: Path, checksums: bool = True) -> dict[str, Any]:
    """The manifest of ``directory`` after checking every listed file; CheckpointError names the
    first missing, truncated or altered one."""
    manifest = read_manifest(directory)
    for name, expected in manifest["files"].items():
        path = Path(directory) / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{path}: {size} bytes, expected {expected['size']} (truncated or altered)")
        if checksums and _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch (file altered or corrupt)")
    return manifest


def step_of(directory: Path) -> int:
    match = _STEP_DIR.match(Path(directory).name)
    if not match:
        raise CheckpointError(f"{directory}: not a step-N checkpoint directory")
    return int(match.group(1))


class CheckpointManager:
    """Saves, verifies and finds checkpoints under ``root``. ``save``/``load``/``resolve`` are
    collective over ``group``; ``info`` (layout, model shape) goes into every manifest."""

    def __init__(
        self,
        root: str | Path,
        keep: int,
        group: CommGroup,
        info: dict[str, Any],
        async_save: bool = False,
        replica: int | None = None,
    ) -> None:
        self.root, self.keep, self.group, self.info = Path(root), keep, group, info
        # Replicas that train apart (DiLoCo) hold different weights: each saves its own copy.
        self.replica_key = f"replica{replica}" if replica is not None else None
        self.async_save = async_save
        # Async writes run DCP collectives from a background thread: give them their own group.
        self._io_pg = dist.new_group(backend="gloo") if async_save else group.pg
        self._pending: tuple[int, Path, Future] | None = None
        self._committer: threading.Thread | None = None
        self.last_commit: dict[str, float] = {}

    # -------------------------------------------------------------------------------- finding

    def complete(self) -> list[Path]:
        """Committed checkpoints (they have a manifest), oldest first. Not verified."""
        if not self.root.is_dir():
            return []
        found = [(step_of(p), p) for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
        return [p for _, p in sorted(found)]

    def newest_valid(self, warn: Callable[[str], None]) -> Path | None:
        """The newest checkpoint that verifies; each one skipped is reported through ``warn``."""
        for path in reversed(self.complete()):
            try:
                verify(path)
                return path
            except CheckpointError as e:
                warn(f"warning: skipping checkpoint {path}: {e}; falling back to an older one")
        return None

    def resolve(self, resume: str, warn: Callable[[str], None]) -> Path | None:
        """The checkpoint ``--checkpoint.resume`` names, agreed by all ranks (collective).

        ``auto``: newest valid one, if any (rank 0 verifies, everyone follows); ``none``; or a
        path, which must verify — an explicit choice never falls back silently.
        """
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            if self.group.rank == 0:
                verify(path)
            barrier(self.group)
            return path
        choice = torch.tensor([-1], dtype=torch.int64)
        if self.group.rank == 0:
            newest = self.newest_valid(warn)
            choice[0] = step_of(newest) if newest is not None else -1
        broadcast(choice, self.group)
        return None if int(choice) < 0 else self.root / f"step-{int(choice)}"

    # -------------------------------------------------------------------------------- saving

    def _state(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, int | float],
        extra: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """What DCP saves and loads: model, optimizer (per replica when replicas differ), trainer
        scalars as tensors, and ``extra`` state (e.g. ``{"diloco": ...}``) at the top level."""
        weights = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer, options=LAYOUT_FREE),
        }
        state = {self.replica_key: weights} if self.replica_key else weights
        return {**state, "trainer": _to_tensors(trainer_state), **(extra or {})}

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, int | float],
        extra: dict[str, Any] | None = None,
        rank_local: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Start writing ``step-N``; blocking unless async. Returns the final directory name.

        ``rank_local`` tensors differ per rank and are saved per rank (like RNG states), e.g.
        1-bit Adam's error-feedback buffers; they come back only on the same world size.
        """
        self.wait()
        tmp = self.root / f"step-{step}.tmp"
        if self.group.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.group)
        state = self._state(model, optimizer, trainer_state, extra)
        torch.save(rng_state(), tmp / f"rng-rank{self.group.rank}.pt")
        if rank_local:
            torch.save(rank_local, tmp / f"local-rank{self.group.rank}.pt")
        started = time.time()
        if self.async_save:
            future: Any = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._io_pg)
        else:
            dcp.save(state, checkpoint_id=str(tmp), process_group=self._io_pg)
            future = Future()
            future.set_result(None)
        self._pending = (step, tmp, future)
        if self.group.rank == 0:
            self._committer = threading.Thread(
                target=self._commit, args=(step, tmp, future, started), name=f"meshweave-commit-{step}", daemon=True
            )
            self._committer.start()
        if not self.async_save:
            self.wait()
        return self.root / f"step-{step}"

    def _commit(self, step: int, tmp: Path, future: Future, started: float) -> None:
        future.result()  # DCP writes .metadata only after every rank's data is written
        write_manifest(tmp, {**self.info, "step": step, "saved_unix": started, "written_unix": time.time()})
        final = self.root / f"step-{step}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(self.root)
        pointer = self.root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        pointer.rename(self.root / LATEST)
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step-*.tmp"):
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
        self.last_commit = {"step": step, "started_unix": started, "committed_unix": time.time()}

    def in_flight(self) -> bool:
        """True while an async save is still writing or committing (this rank's view)."""
        if self._pending is None:
            return False
        return not self._pending[2].done() or (self._committer is not None and self._committer.is_alive())

    def wait(self) -> None:
        """Block until the pending save is written and committed (collective)."""
        if self._pending is None:
            return
        _, _, future = self._pending
        future.result()
        if self._committer is not None:
            self._committer.join()
        self._pending, self._committer = None, None
        barrier(self.group)

    # -------------------------------------------------------------------------------- loading

    def load(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, int | float],
        extra: dict[str, Any] | None = None,
    ) -> tuple[dict[str, int | float], dict[str, Any], dict[str, torch.Tensor] | None]:
        """Restore model and optimizer from ``path`` onto the current layout (collective).

        ``extra`` is filled in place with the saved values of the same keys. Returns the saved
        trainer scalars (typed like ``trainer_state``), the manifest, and this rank's
        ``rank_local`` tensors (``None`` unless saved on the same world size). RNG states are
        restored only when the world size matches; the caller re-derives them otherwise.
        """
        manifest = read_manifest(path)
        state = self._state(model, optimizer, trainer_state, extra)
        dcp.load(
            state,
            storage_reader=SafeFileSystemReader(str(path)),
            planner=SafeLoadPlanner(),
            process_group=self.group.pg,
        )
        weights = state[self.replica_key] if self.replica_key else state
        set_model_state_dict(model, weights["model"])
        set_optimizer_state_dict(model, optimizer, weights["optim"], options=LAYOUT_FREE)
        same_world = manifest.get("world_size") == dist.get_world_size()
        rng_file = Path(path) / f"rng-rank{self.group.rank}.pt"
        if same_world and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        local_file = Path(path) / f"local-rank{self.group.rank}.pt"
        rank_local = torch.load(local_file, weights_only=True) if same_world and local_file.is_file() else None
        scalars = {k: type(trainer_state[k])(v.item()) for k, v in state["trainer"].items()}
        return scalars, manifest, rank_local


def _to_tensors(values: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else torch.int64) for k, v in values.items()}


def checkpoint_info(cfg: Config, world_size: int, **extra: Any) -> dict[str, Any]:
    """What every manifest records besides files: model and MoE sections, layout, world size, and
    for a LoRA run the adapters' settings and base (:func:`lora_info`)."""
    layout = {
        k: v for k, v in asdict(cfg.parallel).items() if k in ("dp_replicate", "dp_shard", "tp", "cp", "pp", "ep")
    }
    if world_size == 1:
        layout = {k: 1 for k in layout}
    return {
        "format": 1,
        "model": asdict(cfg.model),
        "moe": asdict(cfg.moe),
        "layout": layout,
        "world_size": world_size,
        **({"lora": lora_info(cfg)} if cfg.lora.rank else {}),
        **extra,
    }


def lora_info(cfg: Config) -> dict[str, Any]:
    """The ``[lora]`` section and the base the adapters belong to (``checkpoint.init_from``, or
    the seed's initial weights), as a LoRA run's manifests record them."""
    base = cfg.checkpoint.init_from or f"seed {cfg.train.seed} (no checkpoint.init_from)"
    return {**asdict(cfg.lora), "base": base}


def describe(ckpt: str | Path) -> str:
    """``meshweave ckpt inspect``: step, layout, validity, and every tensor with shape and dtype."""
    path = Path(ckpt)
    lines = [f"checkpoint {path}"]
    try:
        manifest = verify(path)
        lines.append("valid: yes (every file present, sizes and SHA-256 match the manifest)")
    except Exception as e:  # report, don't raise: inspecting a broken checkpoint is the point
        lines.append(f"valid: NO — {e}")
        try:
            manifest = read_manifest(path)
        except Exception:
            return "\n".join(lines)
    layout = ", ".join(f"{k}={v}" for k, v in manifest.get("layout", {}).items())
    lines.append(f"step: {manifest.get('step')}   world size: {manifest.get('world_size')}   layout: {layout}")
    m = manifest.get("model", {})
    lines.append(
        "model: "
        + ", ".join(
            f"{k}={m[k]}" for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size") if k in m
        )
    )
    total = sum(f["size"] for f in manifest.get("files", {}).values())
    lines.append(f"files: {len(manifest.get('files', {}))}, {total / 2**20:.2f} MiB")
    metadata = SafeFileSystemReader(str(path)).read_metadata()
    numel = 0
    for key, meta in sorted(metadata.state_dict_metadata.items()):
        if not isinstance(meta, TensorStorageMetadata):
            continue
        numel += meta.size.numel() if key.startswith("model.") else 0
        dtype = str(meta.properties.dtype).replace("torch.", "")
        lines.append(f"  {key:<60} {str(tuple(meta.size)):<18} {dtype}")
    lines.append(f"model parameters: {numel:,}")
    return "\n".join(lines)
