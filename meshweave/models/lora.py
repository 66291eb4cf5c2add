"""LoRA adapters (Hu et al. 2021) as a model transform, with the math and names of ``peft``.

:func:`apply_lora` replaces the targeted projections of every decoder block (on any device,
usually ``meta``) by :class:`LoRALinear`: the same ``nn.Linear`` (so its ``weight`` / ``bias``
keep their names, their Hugging Face mapping and their initial values) plus two small matrices

    y = W x + b + scaling * B (A (dropout(x))),   A [rank, in], B [out, rank], scaling = alpha / rank

computed in peft's order (``result + lora_B(lora_A(dropout(x))) * scaling``), so the logits of a
meshweave model and of peft's ``LoraModel`` agree to rounding. ``A`` starts as peft's
``kaiming_uniform_(a=sqrt(5))`` (uniform in +-1/sqrt(in)) drawn from a generator seeded by
(seed, name) like every other meshweave parameter (:func:`lora_init_value`), ``B`` at zero, so
the adapted model starts equal to the base. Parameter names are
``<projection>.lora_A.weight`` / ``.lora_B.weight``: peft's saved names under ``base_model.model.``
once the projection's own name is mapped to Hugging Face's.

The module knows nothing about meshes: tensor parallelism shards ``A`` and ``B`` consistently
with the base weight (parallel/tensor.py), FSDP shards whatever is left trainable.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from meshweave.config import LoRAConfig

Tensor = torch.Tensor

# lora.targets short name -> the projection's path inside a decoder block
TARGETS: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
ADAPTER_MARKERS = (".lora_A.", ".lora_B.")


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a rank-``rank`` update; see the module docstring. The base ``weight`` /
    ``bias`` may be stored in a lower precision than the input: they are cast up per call."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        rank: int,
        alpha: float,
        dropout: float,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        weight: Tensor = self.weight
        bias: Tensor | None = self.bias
        if weight.dtype != x.dtype:  # a frozen base stored in bf16 under fp32 activations
            weight = weight.to(x.dtype)
            bias = bias.to(x.dtype) if bias is not None else None
        result = F.linear(x, weight, bias)
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.dtype != x.dtype:  # bf16 autocast of a bf16 base leaves activations bf16
            a, b = a.to(x.dtype), b.to(x.dtype)
        return result + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling

    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` ``[out, in]`` (what merging adds to ``weight``); full tensors only."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def merged_weight(weight: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``weight + scaling * (B @ A)`` computed in fp32, in ``weight``'s dtype: the merged weight
    whose plain linear equals the adapted one (peft's ``merge`` adds the same delta)."""
    return (weight.float() + (b.float() @ a.float()) * scaling).to(weight.dtype)


def is_adapter(name: str) -> bool:
    """Whether parameter ``name`` belongs to a LoRA adapter (everything else is the frozen base)."""
    return any(m in name for m in ADAPTER_MARKERS)


def target_names(cfg: LoRAConfig) -> list[str]:
    """The block-relative module paths ``cfg.targets`` names, in :data:`TARGETS` order."""
    wanted = {t.strip() for t in cfg.targets.split(",") if t.strip()}
    return [path for short, path in TARGETS.items() if short in wanted]


def apply_lora(blocks: Iterable[nn.Module], cfg: LoRAConfig) -> int:
    """Replace each targeted ``nn.Linear`` of every decoder block in ``blocks``
    by a :class:`LoRALinear` on the same device, and freeze everything but the adapters of the
    model they belong to via :func:`freeze_base` (call it on the root). Returns how many
    projections took adapters. With ``cfg.base_dtype = "bf16"`` the adapted projections' base
    weights are stored in bf16 (adapters stay fp32)."""
    base_dtype = torch.bfloat16 if cfg.base_dtype == "bf16" else None
    count = 0
    for block in blocks:
        for path in target_names(cfg):
            parent_path, _, attr = path.rpartition(".")
            try:
                parent = block.get_submodule(parent_path)
            except AttributeError:
                continue
            old = getattr(parent, attr, None)
            if not isinstance(old, nn.Linear) or isinstance(old, LoRALinear):
                continue  # e.g. an MoE layer's mlp has no dense gate_proj
            new = LoRALinear(
                old.in_features,
                old.out_features,
                old.bias is not None,
                cfg.rank,
                cfg.alpha,
                cfg.dropout,
                device=old.weight.device,
                dtype=base_dtype or old.weight.dtype,
            )
            setattr(parent, attr, new)
            count += 1
    return count


def freeze_base(model: nn.Module) -> None:
    """``requires_grad`` on for adapter parameters, off for every other parameter of ``model``.
    Idempotent; call again after anything that re-creates parameters without keeping the flag."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))


def lora_init_value(name: str, shape: torch.Size, seed: int) -> Tensor:
    """The initial fp32 value of adapter parameter ``name`` of full shape ``shape``, on the CPU:
    ``lora_A`` uniform in +-1/sqrt(in) (peft's kaiming_uniform_(a=sqrt(5)) bound), ``lora_B``
    zeros. A pure function of (seed, name, shape), like models/llama.py's init_value."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    bound = 1.0 / math.sqrt(shape[1])
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of the full (unsharded) model; tied weights once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
