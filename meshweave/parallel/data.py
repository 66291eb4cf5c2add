"""Data parallelism: replicated (meshweave's bucketed all-reduce), FSDP2, or HSDP.

- ``dp_shard > 1``: FSDP2 ``fully_shard`` per decoder layer, then the root; with
  ``dp_replicate > 1`` too, the 2-D mesh makes it HSDP (shard inside, replicate across).
- only ``dp_replicate > 1``: parameters stay whole; gradients go through
  :class:`meshweave.comm.overlap.GradientReducer`, bucketed and overlapped with backward.

Context-parallel ranks hold the same parameters and see different tokens, so for gradients they
are data-parallel ranks: FSDP shards over ``dp_shard x cp`` and the replicated reducer sums over
``dp_replicate x cp``.

Either way gradients are **summed** over data-parallel ranks: the trainer divides the loss by the
global token count, so the sum is the gradient of the global mean loss.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from meshweave.comm.overlap import GradientReducer
from meshweave.config import Config
from meshweave.parallel.dims import ParallelDims, ParallelMesh

MIXED_PRECISION = {
    "none": None,
    "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
}


def apply_fsdp(model: nn.Module, dims: ParallelDims, mesh: ParallelMesh, mixed_precision: str,
               roots: list[nn.Module] | None = None) -> None:
    """Shard ``model`` with FSDP2 over dp_shard (x cp), HSDP with dp_replicate across.

    Each decoder layer is one FSDP unit; ``roots`` (default: ``model``) take the rest — a
    pipeline rank passes its stage modules, each of which must be its own FSDP root.
    """
    shard = dims.shard_dim
    dp_mesh = mesh["dp_replicate", shard] if dims.dp_replicate > 1 else mesh[shard]
    kwargs = {"mesh": dp_mesh}
    if MIXED_PRECISION[mixed_precision] is not None:
        kwargs["mp_policy"] = MIXED_PRECISION[mixed_precision]
    layers = list(model.layers.values())
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again at once by backward: keep them gathered.
        fully_shard(layer, reshard_after_forward=i < len(layers) - 1, **kwargs)
    for root in roots or [model]:
        fully_shard(root, **kwargs)
        _sum_not_average(root)


def _sum_not_average(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM


def replicated_reducer(model: nn.Module, dims: ParallelDims, mesh: ParallelMesh, cfg: Config,
                       overlap: bool) -> GradientReducer | None:
    """The bucketed all-reduce for replicated-only data parallelism, or ``None`` when FSDP or a
    single replica owns the reduction. Call it after materialisation: hooks bind to the real
    parameters, which ``to_empty`` replaces."""
    if dims.dp_shard > 1 or dims.dp_replicate * dims.cp == 1:
        return None
    group = mesh.group("dp_cp" if dims.cp > 1 else "dp_replicate")
    return GradientReducer(model.parameters(), group,
                           bucket_bytes=int(cfg.comm.bucket_mb * 2**20), overlap=overlap)


def gradient_sync(model: nn.Module, reducer: GradientReducer | None, enabled: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-step: sync gradients only on the last one of an accumulation."""
    if reducer is not None:
        return contextlib.nullcontext() if enabled else reducer.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()
