"""Tensor parallelism with sequence parallelism, as DTensor plans over the ``tp`` mesh dim.

Per decoder layer (Megatron-style, the sequence-parallel variant):

- norms run sequence-parallel: activations between blocks are sharded on the sequence dim
  (``Shard(1)``), so norms and residual adds cost 1/tp of the memory and compute;
- attention and MLP inputs are all-gathered to the full sequence; q/k/v and gate/up are
  column-parallel (each rank owns ``n_heads/tp`` heads, ``n_kv_heads/tp`` KV heads, ``ffn/tp``
  columns), o/down are row-parallel and reduce-scatter back onto the sequence shards;
- the embedding is vocab-parallel (row-wise over the vocabulary, reduce-scattered onto sequence
  shards), and the head is column-parallel over the vocabulary with logits left sharded, so the
  cross entropy runs under :func:`loss_context` without gathering full-vocab logits on any rank.

MoE layers keep attention tensor-parallel and run the MoE block replicated over tp: its input
is all-gathered to the full sequence, every tp rank routes and computes the same tokens (their
expert-parallel peers are the ranks with the same tp index) and keeps its sequence shard of the
output. Its weights are ``Replicate`` DTensors (so FSDP and the grad-norm see one mesh for every
parameter) that the block reads as local tensors (parallel/expert.py ``LocalCompute``); their
gradients are identical on every tp rank, so ``Replicate`` is exact and nothing reduces over tp.

The model code is unchanged: attention reshapes with ``-1`` heads and reads the full sequence
length from the replicated input. Divisibility is checked by config validation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from meshweave.models.family import family_of, seam
from meshweave.models.lora import LoRALinear
from meshweave.models.moe import MoEFeedForward
from meshweave.parallel.expert import local_compute
from meshweave.parallel.tp_overlap import overlap_styles


def _style(name: str, module: nn.Module, tp_mesh: DeviceMesh) -> ParallelStyle:
    """The DTensor style of an abstract plan entry (models/family.py's TP_STYLES) for ``module``."""
    if name == "colwise":
        return LoRAColwise() if isinstance(module, LoRALinear) else ColwiseParallel()
    if name == "rowwise":
        return (
            LoRARowwise(output_layouts=Shard(1))
            if isinstance(module, LoRALinear)
            else RowwiseParallel(output_layouts=Shard(1))
        )
    if name == "sequence_parallel":
        return SequenceParallel()
    if name == "head_norm":  # input [b, s, heads, d] holds this rank's heads: dim 2 is the sharded one
        return SequenceParallel(sequence_dim=2, use_local_output=True)
    if name == "feature_norm":
        return FeatureNorm()
    if name == "gather_sequence":
        return PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    if name == "vocab_embedding":
        return VocabEmbedding(input_layouts=Replicate(), output_layouts=Shard(1))
    if name == "vocab_head":
        return ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    if name == "replicated_block":
        if not isinstance(module, MoEFeedForward):
            raise ValueError(f"replicated_block is for MoE blocks, not {type(module).__name__}")
        _replicate_parameters(module, tp_mesh)
        return PrepareModuleInputOutput(
            input_layouts=(Shard(1),),
            desired_input_layouts=(Replicate(),),
            use_local_input=True,
            output_layouts=(Replicate(),),
            desired_output_layouts=(Shard(1),),
            use_local_output=True,
        )
    raise ValueError(f"unknown tensor-parallel style {name!r}")


def _shard_lora(module: nn.Module, mesh: DeviceMesh, layouts: dict[str, Placement]) -> None:
    """Make each direct parameter of ``module`` a DTensor of the placement ``layouts`` gives its
    name (``weight`` / ``bias``), keeping its ``requires_grad``."""
    for name, p in list(module.named_parameters(recurse=False)):
        dist = distribute_tensor(p, mesh, [layouts[name]], src_data_rank=None)
        module.register_parameter(name, nn.Parameter(dist, requires_grad=p.requires_grad))


class LoRAColwise(ColwiseParallel):
    """Column parallelism for a :class:`~meshweave.models.lora.LoRALinear`: the base weight and
    bias and ``lora_B`` are sharded on their output dim, ``lora_A`` (whose output, rank wide, every
    rank needs whole) is replicated, so ``B A x`` comes out sharded like ``W x``. ``A``'s gradient
    sums the ranks' partial products through DTensor's backward (a tp all-reduce of ``r x in``)."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        layout: Placement = Replicate() if name == "lora_A" else Shard(0)
        _shard_lora(module, device_mesh, {"weight": layout, "bias": Shard(0)})


class LoRARowwise(RowwiseParallel):
    """Row parallelism for a :class:`~meshweave.models.lora.LoRALinear`: the base weight and
    ``lora_A`` are sharded on their input dim, ``lora_B`` and the bias replicated, so both ``W x``
    and ``B (A x)`` are partial sums that add first and then share the base output's single
    reduction (reduce-scatter onto the sequence shards)."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        layout: Placement = Replicate() if name == "lora_B" else Shard(1)
        _shard_lora(module, device_mesh, {"weight": layout, "bias": Replicate()})


class VocabEmbedding(RowwiseParallel):
    """The vocab-parallel embedding, whose reduce-scatter onto the sequence shards completes before
    it returns (``RowwiseParallel`` leaves it in flight). The first block needs the result at once
    anyway; and a compiled block handed the in-flight ``AsyncCollectiveTensor`` returns a plain
    gradient where the eager redistribute behind it needs a DTensor one (torch 2.13)."""

    @staticmethod
    def _prepare_output_fn(
        output_layouts: Sequence[Placement],
        use_local_output: bool,
        mod: nn.Module,
        outputs: DTensor,
        device_mesh: DeviceMesh,
    ) -> object:
        outputs = outputs.redistribute(placements=output_layouts, async_op=False)
        return outputs.to_local() if use_local_output else outputs


class FeatureNorm(ParallelStyle):
    """A norm over the features a column-parallel projection left sharded on the last dim: its
    weight is sharded the same way, and it runs on DTensors, so the mean square over the full
    width is all-reduced over tp (forward) and the weight's gradient stays on its shard."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def shard_weights(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for param_name, p in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(param_name, nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])))

        def to_dtensor(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            return (DTensor.from_local(inputs[0], mesh, [Shard(-1)], run_check=False), *inputs[1:])

        def to_local(mod: nn.Module, output: DTensor, mesh: DeviceMesh) -> object:
            return output.redistribute(mesh, [Shard(-1)]).to_local()

        # distribute_module's hooks may return a replacement input / output (its annotation says None).
        return distribute_module(module, device_mesh, shard_weights, to_dtensor, to_local)  # type: ignore[arg-type]


def _apply_plan(root: nn.Module, plan: Mapping[str, str], tp_mesh: DeviceMesh, overlap: bool = False) -> None:
    styles = {
        path: _style(name, root.get_submodule(path), tp_mesh) for path, name in plan.items() if _present(root, path)
    }
    if overlap:  # parallel/tp_overlap.py: the same layouts, communication under the matmuls
        styles |= overlap_styles(root, plan)
    parallelize_module(root, tp_mesh, styles)


def _present(root: nn.Module, path: str) -> bool:
    """Whether ``path`` names a module of ``root`` (a pipeline stage holds ``None`` for parts it lacks)."""
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, overlap: bool = False) -> None:
    """Shard ``model`` in place over ``tp_mesh`` (1-D) by its family's plan. Call on the meta
    model, before FSDP. ``overlap``: the blocks' gathers and reduce-scatters run as ring steps
    under their matmuls (parallel/tp_overlap.py)."""
    family = family_of(model)
    _apply_plan(model, family.root_tp_plan, tp_mesh)
    for block in family.block_dict(model).values():
        _apply_plan(block, family.block_tp_plan(block), tp_mesh, overlap)
    seam(model).tie_weights()  # a tied head must stay the embedding's (now sharded) parameter


def _replicate_parameters(moe: MoEFeedForward, tp_mesh: DeviceMesh) -> None:
    """Make ``moe``'s weights ``Replicate`` DTensors over tp (no communication: every rank
    initialises them from the same values) and have the block compute on their local tensors."""
    for sub in moe.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:  # bias=False
                continue
            replicated = DTensor.from_local(p.detach(), tp_mesh, [Replicate()], run_check=False)
            sub.register_parameter(name, nn.Parameter(replicated, requires_grad=p.requires_grad))
    local_compute(moe)


def loss_context(tp_enabled: bool) -> contextlib.AbstractContextManager:
    """Where the loss and its backward must run: vocab-sharded cross entropy under TP."""
    return loss_parallel() if tp_enabled else contextlib.nullcontext()


def settle_gradients(params: list) -> None:
    """Bring each DTensor gradient to its parameter's layout, once per step.

    Sequence-parallel norm weights are replicated but their gradients come out ``Partial`` (each
    rank holds its sequence shard's contribution). Left so, the grad-norm and the optimizer step
    would each all-reduce them; settling them here does it once. A no-op for gradients already in
    their parameter's layout (everything FSDP or the replicated reducer has handled).
    """
    for p in params:
        grad = p.grad
        if isinstance(grad, DTensor) and grad.placements != p.placements:
            p.grad = grad.redistribute(p.device_mesh, p.placements)
