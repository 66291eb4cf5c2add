"""The model seam: what the parallel code needs to know about a model family, declared by the family.

``parallel/`` (tensor, data, pipeline, expert parallelism), ``lowcomm/`` (DiLoCo fragments) and the
Hugging Face interop never name a model's attributes. They ask the model's :class:`ModelFamily`:

- ``blocks``: the ``ModuleDict`` of decoder blocks keyed by their global index. A block is the unit
  of FSDP sharding, activation checkpointing, pipeline splitting and DiLoCo fragments; keys stay
  global on every pipeline stage, so parameter names are layout-free.
- ``first_stage`` / ``last_stage``: the modules before and after the blocks (embedding; final norm
  and head). A pipeline stage without them holds ``None`` there, and the model's ``forward`` must
  accept that (hidden states in, hidden states out).
- the tensor-parallel plan, in the abstract styles of :data:`TP_STYLES` (parallel/tensor.py turns
  them into DTensor plans), so the model stays free of meshes;
- ``init_value``: the initial value of a parameter, a pure function of (name, full shape, config,
  seed), so every layout materialises the same model;
- ``hf_name``: the Hugging Face name of a parameter.

A family is declared once, next to its model (``Transformer.family`` in models/llama.py). Adding a
family means writing its model and its declaration; parallel/ and lowcomm/ do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

from meshweave.config import ModelConfig

# Abstract tensor-parallel styles, Megatron's sequence-parallel variant (parallel/tensor.py):
#   colwise            output features sharded (q/k/v, gate/up)
#   rowwise            input features sharded; output reduce-scattered onto sequence shards (o, down)
#   sequence_parallel  runs on the sequence shard (norms)
#   head_norm          a per-head norm inside column-parallel attention: runs on this rank's heads,
#                      its weight replicated (Qwen3's q/k norms)
#   feature_norm       a norm over a column-parallel projection's full output: its weight sharded
#                      like the features, the mean square summed over tp (OLMoE's q/k norms)
#   gather_sequence    the module's first input is all-gathered from sequence shards to the full sequence
#   replicated_block   the whole block runs replicated over tp on the full sequence and returns its
#                      sequence shard; its weights are replicated (MoE blocks: experts split over ep)
#   vocab_embedding    embedding sharded over the vocabulary, output onto sequence shards
#   vocab_head         head sharded over the vocabulary, logits left sharded for a loss-parallel loss
TP_STYLES = (
    "colwise",
    "rowwise",
    "sequence_parallel",
    "head_norm",
    "feature_norm",
    "gather_sequence",
    "replicated_block",
    "vocab_embedding",
    "vocab_head",
)

InitValue = Callable[[str, torch.Size, ModelConfig, int], torch.Tensor]


@dataclass(frozen=True)
class ModelFamily:
    """A model family's declaration of its structure for the parallel code (see the module docstring)."""

    name: str
    blocks: str
    first_stage: tuple[str, ...]
    last_stage: tuple[str, ...]
    root_tp_plan: Mapping[str, str]
    block_tp_plan: Callable[[nn.Module], Mapping[str, str]]
    init_value: InitValue
    hf_name: Callable[[str], str]

    def block_dict(self, model: nn.Module) -> nn.ModuleDict:
        """The model's blocks, keyed by global index (a pipeline stage holds a subset)."""
        return getattr(model, self.blocks)

    def fragments(self, model: nn.Module, n: int) -> dict[str, int]:
        """Trainable parameter name -> DiLoCo fragment in ``0..n-1``: block ``i`` belongs to
        fragment ``i % n``; last-stage modules (norm, head) go with the highest-indexed block held
        (the one that feeds them); everything else (the embedding, a head weight tied to it) with 0.
        A function of global names only, so every pipeline stage agrees."""
        blocks: Mapping[str, nn.Module] = (
            dict(self.block_dict(model).items()) if getattr(model, self.blocks, None) is not None else {}
        )
        fragment_of_param = {id(p): int(key) % n for key, block in blocks.items() for p in block.parameters()}
        last = max((int(key) for key in blocks), default=n - 1) % n

        def params_of(names: tuple[str, ...]) -> set[int]:
            modules = [getattr(model, name, None) for name in names]
            return {id(p) for m in modules if m is not None for p in m.parameters()}

        tail = params_of(self.last_stage) - params_of(self.first_stage)
        return {
            name: fragment_of_param.get(id(p), last if id(p) in tail else 0)
            for name, p in model.named_parameters()
            if p.requires_grad
        }


class FamilyModel(Protocol):
    """What a family's model class provides beside its declaration (parallel/ calls these)."""

    cfg: ModelConfig
    checkpoint_layers: bool  # recompute each block in backward
    rope_positions: torch.Tensor | None  # global positions of the tokens it sees (CP shard, stage)

    def set_attention_op(self, op: Callable[..., Any]) -> None:
        """Route every block's attention through ``op`` (the kernels.attention contract)."""

    def tie_weights(self) -> None:
        """Re-tie embedding and head after anything that replaced parameters."""


def seam(model: nn.Module) -> FamilyModel:
    """``model`` seen through :class:`FamilyModel` (its class declares a family)."""
    family_of(model)
    return cast(FamilyModel, model)


def family_of(model: nn.Module) -> ModelFamily:
    """The :class:`ModelFamily` a model class declares (its ``family`` class attribute)."""
    family = getattr(type(model), "family", None)
    if not isinstance(family, ModelFamily):
        raise TypeError(f"{type(model).__name__} declares no ModelFamily (set its `family` class attribute)")
    return family
