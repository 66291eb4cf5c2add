"""LoRA adapters out of meshweave checkpoints: ``peft``'s adapter format, and merged weights.

A LoRA run's checkpoint holds the frozen base and the adapters (``<projection>.lora_A.weight``,
``.lora_B.weight``, models/lora.py), and its manifest the ``[lora]`` section and the base the
adapters belong to (checkpoint/manager.py ``lora_info``).

- :func:`export_peft` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
  ``peft.PeftModel.from_pretrained(hf_model, OUT)`` loads onto the transformers model: tensor
  names are the projection's Hugging Face name under ``base_model.model.`` with ``.weight``
  replaced by ``.lora_A.weight`` / ``.lora_B.weight`` (peft's saved names, adapter name dropped);
  ``r`` / ``lora_alpha`` are the run's, so peft's ``scaling = lora_alpha / r`` is meshweave's.
- :func:`merge_plan` gives what export-hf needs to write ``W + (alpha / rank) B A`` in place of
  each adapted weight (``meshweave ckpt export-hf --merge-lora``; checkpoint/hf.py).

Everything here runs in one process without a process group, reading a tensor at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from meshweave.checkpoint.hf import read_model_config, read_tensors
from meshweave.checkpoint.manager import CheckpointError, read_manifest, step_of, verify
from meshweave.checkpoint.safe_load import SafeFileSystemReader
from meshweave.config import LoRAConfig
from meshweave.models.hf_config import FAMILIES, hf_names
from meshweave.models.lora import TARGETS, is_adapter

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def resolve_checkpoint(path: str | Path) -> Path:
    """A step-N directory itself, or a run directory's newest committed checkpoint."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    steps = [p for p in (path / "checkpoints").glob("step-*") if (p / "manifest.json").is_file()]
    if not steps:
        raise CheckpointError(f"{path}: neither a checkpoint (manifest.json) nor a run directory with checkpoints")
    return max(steps, key=step_of)


def lora_settings(ckpt: Path) -> tuple[LoRAConfig, str]:
    """The ``[lora]`` section a checkpoint was trained with and the base it names; CheckpointError
    when the checkpoint holds no adapters."""
    info = read_manifest(ckpt).get("lora")
    if not info:
        raise CheckpointError(f"{ckpt}: not a LoRA checkpoint (its manifest has no lora entry; train with --lora.rank)")
    base = info.pop("base", "")
    return LoRAConfig(**info), base


def is_lora_checkpoint(ckpt: Path) -> bool:
    """Whether a checkpoint's manifest says it holds LoRA adapters."""
    return bool(read_manifest(ckpt).get("lora"))


def _adapter_keys(ckpt: Path) -> list[str]:
    """The checkpoint's adapter entries (``model.``-prefixed names), in saved order."""
    meta = SafeFileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    return [k for k in meta if k.startswith("model.") and is_adapter(k)]


def peft_name(name: str, hf_family: str) -> str:
    """peft's saved name of meshweave adapter parameter ``name``
    (``layers.0.self_attn.q_proj.lora_A.weight`` ->
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``)."""
    projection, _, which = name.partition(".lora_")
    hf = hf_names(FAMILIES[hf_family], f"{projection}.weight", 0)[0][0]
    return f"base_model.model.{hf.removesuffix('.weight')}.lora_{which}"


def peft_config(lora: LoRAConfig, base: str) -> dict[str, Any]:
    """``adapter_config.json`` of adapters trained with ``lora`` on ``base``."""
    wanted = {t.strip() for t in lora.targets.split(",")}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": [path.rsplit(".", 1)[1] for short, path in TARGETS.items() if short in wanted],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def export_peft(ckpt_or_run: str | Path, out: str | Path) -> Path:
    """Write the adapters of a LoRA checkpoint (or a run's newest) as a peft adapter directory
    ``out``: ``adapter_config.json`` + ``adapter_model.safetensors`` (fp32, as trained)."""
    ckpt = resolve_checkpoint(ckpt_or_run)
    verify(ckpt)
    lora, base = lora_settings(ckpt)
    cfg, _ = read_model_config(ckpt)
    keys = _adapter_keys(ckpt)
    tensors = {peft_name(k.removeprefix("model."), cfg.hf_family): v for k, v in read_tensors(ckpt, keys).items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS), {"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config(lora, base), indent=2) + "\n")
    return out


def merge_plan(ckpt: Path) -> tuple[float, dict[str, tuple[str, str]]]:
    """``(scaling, base weight name -> (its lora_A key, its lora_B key))`` of a LoRA checkpoint,
    meshweave names (keys ``model.``-prefixed, as stored)."""
    lora, _ = lora_settings(ckpt)
    plan: dict[str, tuple[str, str]] = {}
    for key in _adapter_keys(ckpt):
        if ".lora_A." in key:
            projection = key.removeprefix("model.").split(".lora_A.")[0]
            plan[f"{projection}.weight"] = (key, key.replace(".lora_A.", ".lora_B."))
    return lora.alpha / lora.rank, plan
