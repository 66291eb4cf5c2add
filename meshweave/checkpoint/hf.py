"""Hugging Face interop: safetensors weights in and out of meshweave checkpoints and models.

The config translation is the families' (models/hf_config.py). meshweave parameter names are
Hugging Face's without the ``model.`` prefix (the family's ``hf_name``, models/family.py), and
rotary embeddings use the same half-split layout, so dense weights move with a rename only — no
permutation, bit-exact both ways.

- :func:`import_hf` turns a HF model directory into a meshweave checkpoint (``step-0``, model only)
  plus a ``config.toml`` holding the translated model section;
- :func:`export_hf` writes a checkpoint's model as ``config.json`` + ``model.safetensors``;
- :func:`load_hf_weights` reads a HF directory into meshweave-named full tensors, for
  ``--checkpoint.init_from``.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from meshweave.checkpoint.manager import checkpoint_info, read_manifest, verify, write_manifest
from meshweave.checkpoint.safe_load import SafeEmptyLoadPlanner, SafeFileSystemReader
from meshweave.config import Config, ConfigError, ModelConfig, to_toml
from meshweave.models.hf_config import hf_config_from_model, read_hf_config
from meshweave.models.llama import Transformer, build_model


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """DCP without a process group, minus its warning that it is assuming exactly that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_hf_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All weights of a HF directory (single or sharded safetensors), renamed to meshweave's names.

    Checks that the names are exactly the model's: a missing or unexpected tensor is an error.
    """
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    hf_state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise FileNotFoundError(f"{hf_dir / name}: missing (safetensors weights required)")
        hf_state.update(load_file(hf_dir / name))
    cfg = read_hf_config(hf_dir)
    wanted = {Transformer.family.hf_name(n): n for n in build_model(cfg).state_dict()}
    missing = sorted(set(wanted) - set(hf_state))
    if cfg.tie_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    unexpected = sorted(
        set(hf_state) - set(wanted) - {"lm_head.weight"} if cfg.tie_embeddings else set(hf_state) - set(wanted)
    )
    if missing or unexpected:
        raise ValueError(
            f"{hf_dir}: weights do not match the config (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    state = {wanted[k]: v for k, v in hf_state.items() if k in wanted}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Write ``out/config.toml`` and ``out/checkpoints/step-0`` (model weights, DCP) from ``hf_dir``.

    Returns the checkpoint directory; usable as ``--checkpoint.init_from``.
    """
    cfg = Config(model=read_hf_config(hf_dir), out=str(out))
    state = load_hf_weights(hf_dir)
    ckpt = Path(out) / "checkpoints" / "step-0"
    ckpt.mkdir(parents=True, exist_ok=False)
    with _single_process():
        dcp.save({"model": state}, checkpoint_id=str(ckpt), no_dist=True)
    write_manifest(ckpt, checkpoint_info(cfg, world_size=1, source=f"import-hf {hf_dir}"))
    (Path(out) / "config.toml").write_text(to_toml(cfg))
    return ckpt


def read_checkpoint(ckpt: str | Path, prefix: str = "") -> dict[str, Any]:
    """The entries of a verified checkpoint whose dotted names start with ``prefix``, as full
    tensors under those names; needs no process group and no model."""
    verify(Path(ckpt))
    reader = SafeFileSystemReader(str(ckpt))
    keys = {k for k in reader.read_metadata().state_dict_metadata if k.startswith(prefix)}
    state: dict[str, Any] = {}
    # The private loader, as torch's own dcp_to_torch_save uses: the public one only fills keys
    # the caller's dict already has.
    with _single_process():
        _load_state_dict(state, storage_reader=reader, planner=SafeEmptyLoadPlanner(keys=keys), no_dist=True)
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", state)
    return flat


def read_model_weights(ckpt: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A verified meshweave checkpoint's model config and full model tensors (no process group)."""
    cfg = ModelConfig(**read_manifest(Path(ckpt))["model"])
    flat = read_checkpoint(ckpt, prefix="model.")
    return cfg, {k.removeprefix("model."): v for k, v in flat.items()}


def export_hf(ckpt: str | Path, out: str | Path) -> Path:
    """Write a checkpoint's model as a HF directory (``config.json`` + ``model.safetensors``)."""
    cfg, state = read_model_weights(ckpt)
    hf_state = {
        Transformer.family.hf_name(k): v.contiguous()
        for k, v in state.items()
        if not (cfg.tie_embeddings and k == "lm_head.weight")
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_from_model(cfg), indent=2) + "\n")
    return out


# Everything that shapes the weights or the forward pass; not the initialisation, the export
# family, or max_seq_len (scaled RoPE keeps its original length explicitly, models/hf_config.py).
_SHAPE_KEYS = tuple(f.name for f in fields(ModelConfig) if f.name not in ("init_std", "hf_family", "max_seq_len"))


def initial_weights_config(source: str | Path) -> ModelConfig:
    """The model config of an ``init_from`` source: a HF directory or a meshweave checkpoint."""
    source = Path(source)
    if (source / "config.json").is_file():
        return read_hf_config(source)
    return ModelConfig(**read_manifest(source)["model"])


def check_init_from(cfg: Config) -> None:
    """ConfigError if ``checkpoint.init_from`` holds a differently shaped model (no process group)."""
    if not cfg.checkpoint.init_from:
        return
    source = initial_weights_config(cfg.checkpoint.init_from)
    for key in _SHAPE_KEYS:
        if getattr(source, key) != getattr(cfg.model, key):
            raise ConfigError(
                f"model.{key}={getattr(cfg.model, key)} but checkpoint.init_from "
                f"{cfg.checkpoint.init_from} has {key}={getattr(source, key)}; set "
                f"--model.{key}={getattr(source, key)} (or use its config.toml)"
            )


def load_initial_weights(model: torch.nn.Module, cfg: Config) -> None:
    """Overwrite ``model`` (any layout) with the full weights ``checkpoint.init_from`` names.

    Every rank reads the source and keeps its own shard of the entries its stage holds (collective
    through DCP's state-dict API).
    """
    source = Path(cfg.checkpoint.init_from)
    if (source / "config.json").is_file():
        state = load_hf_weights(source)
    else:
        _, state = read_model_weights(source)
    # A pipeline stage holds some of the blocks: it takes its own entries (the source was checked
    # complete against the whole model when it was read).
    held = set(model.state_dict())
    own: dict[str, Any] = {k: v for k, v in state.items() if k in held}
    set_model_state_dict(model, own, options=StateDictOptions(full_state_dict=True, strict=True))
