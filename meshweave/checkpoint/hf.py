"""Hugging Face interop: safetensors weights in and out of meshweave checkpoints and models.

The config translation and the weight-name tables are the families' (models/hf_config.py). Dense
parameter names are Hugging Face's without the ``model.`` prefix, experts are HF's per-expert
tensors stacked on dim 0, and rotary embeddings use the same half-split layout: weights move by
rename and stack only — no permutation, bit-exact both ways.

- :func:`import_hf` turns a HF model directory into a meshweave checkpoint (``step-0``, model only)
  plus a ``config.toml`` holding the translated model section;
- :func:`export_hf` writes a checkpoint's model as ``config.json`` + safetensors shards, streaming;
- :func:`load_hf_weights` reads a HF directory into meshweave-named full tensors, for
  ``--checkpoint.init_from``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from meshweave.checkpoint.manager import MANIFEST, checkpoint_info, read_manifest, verify, write_manifest
from meshweave.checkpoint.safe_load import SafeEmptyLoadPlanner, SafeFileSystemReader, SafeLoadPlanner
from meshweave.checkpoint.safetensors_stream import SafetensorsWriter
from meshweave.config import Config, ConfigError, ModelConfig, MoEConfig
from meshweave.models.hf_config import FAMILIES, hf_config_from_model, hf_names, read_hf_config
from meshweave.models.llama import build_model
from meshweave.models.lora import is_adapter, merged_weight
from meshweave.options import to_toml


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """DCP without a process group, minus its warning that it is assuming exactly that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _weight_files(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = {k: hf_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    else:
        single = hf_dir / "model.safetensors"
        if not single.is_file():
            raise FileNotFoundError(f"{single}: missing (safetensors weights required)")
        with safe_open(single, "pt") as f:
            files = {k: single for k in f.keys()}
    for path in set(files.values()):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (safetensors weights required)")
    return files


def hf_sources(cfg: ModelConfig, moe: MoEConfig) -> dict[str, tuple[list[str], bool]]:
    """meshweave parameter name -> (the HF tensor names it is made of, whether they are experts
    stacked on dim 0), for the whole model ``cfg`` / ``moe`` describe; a tied head has none."""
    family = FAMILIES[cfg.hf_family]
    names = build_model(cfg, moe=moe).state_dict()
    return {
        n: hf_names(family, n, moe.num_experts) for n in names if not (cfg.tie_embeddings and n == "lm_head.weight")
    }


def _complete_sources(hf_dir: Path) -> tuple[ModelConfig, MoEConfig, dict[str, Path], dict]:
    """``(cfg, moe, tensor -> file, parameter -> sources)`` of a HF directory whose tensors are
    exactly the model's: a missing or unexpected tensor is an error (names only, nothing is read)."""
    cfg, moe = read_hf_config(hf_dir)
    files = _weight_files(hf_dir)
    sources = hf_sources(cfg, moe)
    wanted = {h for hs, _ in sources.values() for h in hs}
    missing, unexpected = sorted(wanted - set(files)), sorted(set(files) - wanted)
    if cfg.tie_embeddings:  # some tied checkpoints carry the head anyway
        unexpected = [u for u in unexpected if u != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(
            f"{hf_dir}: weights do not match the config (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    return cfg, moe, files, sources


def load_hf_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All weights of a HF directory under meshweave's names (experts stacked), read tensor by
    tensor; the directory must hold exactly the model's tensors."""
    hf_dir = Path(hf_dir)
    cfg, _, files, sources = _complete_sources(hf_dir)
    state: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles = {p: stack.enter_context(safe_open(p, "pt")) for p in sorted(set(files.values()))}
        for name, (hf, stacked) in sources.items():
            parts = [handles[files[h]].get_tensor(h) for h in hf]
            state[name] = torch.stack(parts) if stacked else parts[0]
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def _local_region(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """This rank's piece of ``param`` (the tensor to fill) and where it sits in the full tensor."""
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return param.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
    return param, tuple(slice(0, n) for n in param.shape)


def _read_region(files: dict[str, Path], name: str, region: tuple[slice, ...]) -> torch.Tensor:
    """``region`` of HF tensor ``name``. The file is opened for this read only: its mapped pages
    are released at once, so a rank's resident memory never accumulates the files it reads."""
    with safe_open(files[name], "pt") as f:
        return f.get_slice(name)[region]


def fill_from_hf(model: nn.Module, hf_dir: str | Path) -> None:
    """Copy into each parameter of ``model`` (any layout: DTensor shards, a pipeline stage, a
    rank's experts) just its own region of the HF tensors, read with ``safe_open(...).get_slice``:
    a rank never reads the whole model. No communication; every rank calls it on its own model."""
    hf_dir = Path(hf_dir)
    _, _, files, sources = _complete_sources(hf_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter(name):  # LoRA adapters are not in the base model: they keep their init
                continue
            hf, stacked = sources[name]
            local, region = _local_region(param)
            if local.numel() == 0:
                continue
            if stacked:
                # Dim 0 indexes experts. A parameter whose full shape holds this module's experts
                # only (expert parallelism keeps a block of them) starts at the module's offset.
                experts = model.get_submodule(name.rsplit(".", 2)[0])
                held_only = param.shape[0] != len(hf)
                first = region[0].start + (experts.offset if held_only else 0)
                for i, e in enumerate(range(first, first + region[0].stop - region[0].start)):
                    local[i].copy_(_read_region(files, hf[e], region[1:]))
            else:
                local.copy_(_read_region(files, hf[0], region))


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Write ``out/config.toml`` and ``out/checkpoints/step-0`` (model weights, DCP) from ``hf_dir``.

    Returns the checkpoint directory; usable as ``--checkpoint.init_from``.
    """
    model_cfg, moe = read_hf_config(hf_dir)
    cfg = Config(model=model_cfg, moe=moe, out=str(out))
    state = load_hf_weights(hf_dir)
    ckpt = Path(out) / "checkpoints" / "step-0"
    ckpt.mkdir(parents=True, exist_ok=False)
    with _single_process():
        dcp.save({"model": state}, checkpoint_id=str(ckpt), no_dist=True)
    write_manifest(ckpt, checkpoint_info(cfg, world_size=1, source=f"import-hf {hf_dir}"))
    (Path(out) / "config.toml").write_text(to_toml(cfg))
    return ckpt


def _read_entries(reader: SafeFileSystemReader, keys: set[str]) -> dict[str, Any]:
    """The checkpoint entries ``keys`` (dotted names) as full tensors; only those are read."""
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


class _FileView(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file as a seekable stream of their own."""

    def __init__(self, file: io.BufferedReader, offset: int, length: int) -> None:
        self.file, self.offset, self.length, self.pos = file, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: pos, io.SEEK_CUR: self.pos + pos, io.SEEK_END: self.length + pos}[whence]
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        self.file.seek(self.offset + self.pos)
        got = self.file.readinto(memoryview(buffer)[:n])
        self.pos += got or 0
        return got or 0


def _read_tensor(ckpt: Path, metadata: Metadata, key: str) -> torch.Tensor:
    """Checkpoint entry ``key`` as one full tensor, each saved chunk loaded straight into it.

    DCP's own reader holds every tensor twice on the way (the loaded chunk and the planner's
    copy); exporting a model tensor by tensor, that doubled the peak. Falls back to DCP for
    entries stored through a transform (compression)."""
    entry = metadata.state_dict_metadata[key]
    infos = [metadata.storage_data[MetadataIndex(key, chunk.offsets)] for chunk in entry.chunks]  # type: ignore[union-attr]
    if any(info.transform_descriptors for info in infos):
        return _read_entries(SafeFileSystemReader(str(ckpt)), {key})[key]
    full = None
    for chunk, info in zip(entry.chunks, infos, strict=True):  # type: ignore[union-attr]
        with open(ckpt / info.relative_path, "rb") as f:
            part = torch.load(io.BufferedReader(_FileView(f, info.offset, info.length)), weights_only=True)
        if tuple(chunk.sizes) == tuple(entry.size):  # type: ignore[union-attr]
            return part
        if full is None:
            full = torch.empty(tuple(entry.size), dtype=part.dtype)  # type: ignore[union-attr]
        full[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes, strict=True))] = part
        del part
    assert full is not None
    return full


def read_checkpoint(ckpt: str | Path, prefix: str = "") -> dict[str, Any]:
    """The entries of a verified checkpoint whose dotted names start with ``prefix``, as full
    tensors under those names; needs no process group and no model."""
    verify(Path(ckpt))
    reader = SafeFileSystemReader(str(ckpt))
    return _read_entries(reader, {k for k in reader.read_metadata().state_dict_metadata if k.startswith(prefix)})


def read_model_config(ckpt: str | Path) -> tuple[ModelConfig, MoEConfig]:
    """The model and MoE sections a meshweave checkpoint's manifest records (MoE: dense when a
    manifest predates the ``moe`` entry)."""
    manifest = read_manifest(Path(ckpt))
    return ModelConfig(**manifest["model"]), MoEConfig(**manifest.get("moe", {}))


def read_model_weights(ckpt: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A verified meshweave checkpoint's model config and full model tensors (no process group)."""
    cfg, _ = read_model_config(ckpt)
    flat = read_checkpoint(ckpt, prefix="model.")
    return cfg, {k.removeprefix("model."): v for k, v in flat.items()}


def _shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of names whose sizes add up to at most ``max_bytes`` (a tensor larger
    than that gets a shard of its own)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def read_tensors(ckpt: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Checkpoint entries ``keys`` (as stored, e.g. ``model.layers.0...``) as full tensors, each
    read alone (:func:`_read_tensor`)."""
    metadata = SafeFileSystemReader(str(ckpt)).read_metadata()
    return {k: _read_tensor(ckpt, metadata, k) for k in keys}


def export_hf(
    ckpt: str | Path,
    out: str | Path,
    max_shard_bytes: int = 5 * 10**9,
    lora_merge: tuple[float, dict[str, tuple[str, str]]] | None = None,
) -> Path:
    """Write a checkpoint's model as a HF directory of ``cfg.hf_family``: ``config.json`` and
    ``model.safetensors``, or shards of at most ``max_shard_bytes`` with
    ``model.safetensors.index.json``. Streams tensor by tensor (each read alone from the
    checkpoint, written straight into its shard): peak memory is about the largest tensor.
    ``lora_merge`` ``(scaling, weight name -> (lora_A key, lora_B key))`` (checkpoint/adapters.py
    ``merge_plan``): those weights are written merged, ``W + scaling B A``; without it a LoRA
    checkpoint's adapters are left out (the base alone is written)."""
    verify(Path(ckpt))
    cfg, moe = read_model_config(ckpt)
    config = hf_config_from_model(cfg, moe)  # a family that cannot express the model fails first
    sources = hf_sources(cfg, moe)
    metadata = SafeFileSystemReader(str(ckpt)).read_metadata()
    meta = metadata.state_dict_metadata
    layouts: dict[str, list[tuple[str, torch.dtype, tuple[int, ...]]]] = {}
    for name, (hf, stacked) in sources.items():
        entry = meta[f"model.{name}"]
        dtype, shape = entry.properties.dtype, tuple(entry.size)  # type: ignore[union-attr]
        layouts[name] = [(h, dtype, shape[1:] if stacked else shape) for h in hf]
    sizes = {n: sum(math.prod(s) * d.itemsize for _, d, s in parts) for n, parts in layouts.items()}
    groups = _shards(sizes, max_shard_bytes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        file = "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        layout = [entry for name in group for entry in layouts[name]]
        with SafetensorsWriter(out / file, layout, {"format": "pt"}) as writer:
            for name in group:
                value = _read_tensor(Path(ckpt), metadata, f"model.{name}")
                if lora_merge is not None and name in lora_merge[1]:
                    a, b = (_read_tensor(Path(ckpt), metadata, k) for k in lora_merge[1][name])
                    value = merged_weight(value, a, b, lora_merge[0])
                hf, stacked = sources[name]
                for h, part in zip(hf, value.unbind(0) if stacked else [value], strict=True):
                    writer.write(h, part)
                del value
        weight_map |= dict.fromkeys((h for h, _, _ in layout), file)
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# Everything that shapes the weights or the forward pass; not the initialisation, the export
# family, or max_seq_len (scaled RoPE keeps its original length explicitly, models/hf_config.py).
_SHAPE_KEYS = tuple(f.name for f in fields(ModelConfig) if f.name not in ("init_std", "hf_family", "max_seq_len"))
# The MoE keys that shape the weights or the forward pass (not the training-only ones).
_MOE_KEYS = (
    "num_experts",
    "top_k",
    "every",
    "expert_ffn_dim",
    "shared_experts",
    "shared_expert_gate",
    "score",
    "renormalize",
    "bias_balancing",
    "low_dim",
)


def initial_weights_config(source: str | Path) -> tuple[ModelConfig, MoEConfig]:
    """The model and MoE sections of an ``init_from`` source: a HF directory or a checkpoint."""
    source = Path(source)
    if (source / "config.json").is_file():
        return read_hf_config(source)
    return read_model_config(source)


def check_init_from(cfg: Config) -> None:
    """ConfigError if ``checkpoint.init_from`` holds a differently shaped model (no process group)."""
    if not cfg.checkpoint.init_from:
        return
    source = Path(cfg.checkpoint.init_from)
    if (source / MANIFEST).is_file() and read_manifest(source).get("lora"):
        # init_from loads a base; the trained adapters would be dropped without a word.
        raise ConfigError(
            f"checkpoint.init_from {source} holds trained LoRA adapters that a new run would drop; continue that "
            f"run with --checkpoint.resume, or merge them first: meshweave ckpt export-hf {source} OUT --merge-lora "
            "and --checkpoint.init_from=OUT"
        )
    model, moe = initial_weights_config(cfg.checkpoint.init_from)
    pairs: list[tuple[str, str, Any, Any]] = [("model", k, model, cfg.model) for k in _SHAPE_KEYS]
    if moe.num_experts or cfg.moe.num_experts:
        pairs += [("moe", k, moe, cfg.moe) for k in _MOE_KEYS]
    for section, key, source, ours in pairs:
        if getattr(source, key) != getattr(ours, key):
            value = getattr(source, key)
            text = str(value).lower() if isinstance(value, bool) else value
            raise ConfigError(
                f"{section}.{key}={getattr(ours, key)} but checkpoint.init_from {cfg.checkpoint.init_from} has "
                f"{key}={value}; set --{section}.{key}={text} (or use its config.toml)"
            )


def load_initial_weights(model: nn.Module, cfg: Config) -> None:
    """Overwrite ``model`` (any layout) with the weights ``checkpoint.init_from`` names.

    Each rank reads only what it holds. A HF directory: the regions of its parameters
    (:func:`fill_from_hf`, no communication). A meshweave checkpoint, saved on any layout: DCP
    loads the rank's shards of the model entries its stage holds (collective over the job).
    """
    source = Path(cfg.checkpoint.init_from)
    if (source / "config.json").is_file():
        fill_from_hf(model, source)
        return
    verify(source)
    # LoRA adapters start from their init: only the base comes from the source.
    state = {k: v for k, v in get_model_state_dict(model).items() if not is_adapter(k)}
    dcp.load({"model": state}, storage_reader=SafeFileSystemReader(str(source)), planner=SafeLoadPlanner())
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a HF directory or a meshweave checkpoint with its weights, in eval mode on
    ``device``, in this process (no process group); MoE models included. Built on ``meta`` and
    filled by assignment, so the weights are held once."""
    path = Path(path)
    if (path / "config.json").is_file():
        (cfg, moe), state = read_hf_config(path), load_hf_weights(path)
    else:
        (cfg, moe), (_, state) = read_model_config(path), read_model_weights(path)
    model = build_model(cfg, moe=moe)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.to(device).eval()
