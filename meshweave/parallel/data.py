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

from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from meshweave.comm.overlap import GradientReducer
from meshweave.config import Config
from meshweave.lowcomm.replicas import replica_mode
from meshweave.models.family import family_of
from meshweave.parallel.dims import ParallelDims, ParallelMesh

MIXED_PRECISION = {
    "none": None,
    "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
}


def apply_fsdp(
    model: nn.Module,
    dims: ParallelDims,
    mesh: ParallelMesh,
    mixed_precision: str,
    roots: list[nn.Module] | None = None,
    across_replicas: bool = True,
    ignored: list[nn.Parameter] | None = None,
) -> None:
    """Shard ``model`` with FSDP2 over dp_shard (x cp), HSDP with dp_replicate across.

    Each decoder layer is one FSDP unit; ``roots`` (default: ``model``) take the rest — a
    pipeline rank passes its stage modules, each of which must be its own FSDP root. With
    ``across_replicas=False`` FSDP reduces inside each replica only (1-bit Adam and DiLoCo
    exchange between replicas themselves). ``ignored`` parameters are left alone (expert weights,
    which parallel/expert.py shards and reduces itself).
    """
    shard = dims.shard_dim
    hsdp = across_replicas and dims.dp_replicate > 1
    dp_mesh = mesh["dp_replicate", shard] if hsdp else mesh[shard]
    kwargs: dict[str, Any] = {"mesh": dp_mesh}
    if MIXED_PRECISION[mixed_precision] is not None:
        kwargs["mp_policy"] = MIXED_PRECISION[mixed_precision]
    if ignored:
        kwargs["ignored_params"] = set(ignored)
    layers = list(family_of(model).block_dict(model).values())
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


def fsdp_inside_replicas(dims: ParallelDims, cfg: Config) -> bool:
    """FSDP shards over dp_shard (x cp); apart replicas also use it for cp without dp_shard, so
    the reduction inside a replica never mixes with the one across replicas."""
    return dims.dp_shard > 1 or (replica_mode(cfg) != "dp" and dims.cp > 1)


def replicated_reducer(
    model: nn.Module, dims: ParallelDims, mesh: ParallelMesh, cfg: Config, overlap: bool
) -> GradientReducer | None:
    """The bucketed all-reduce for replicated data parallelism, or ``None`` when FSDP or a
    single replica owns the reduction. With 1-bit Adam it reduces across replicas only (the
    optimizer's warm-up; the trainer stops calling it once the momentum goes compressed); with
    DiLoCo nothing reduces across replicas. Call it after materialisation: hooks bind to the real
    parameters, which ``to_empty`` replaces."""
    mode = replica_mode(cfg)
    if mode != "dp":
        if mode == "diloco" or dims.dp_replicate == 1:
            return None
        fsdp = fsdp_inside_replicas(dims, cfg)  # FSDP writes its grads outside autograd's hooks
        return GradientReducer(
            model.parameters(),
            mesh.group("dp_replicate"),
            bucket_bytes=int(cfg.comm.bucket_mb * 2**20),
            overlap=overlap and not fsdp,
        )
    if dims.dp_shard > 1 or dims.dp_replicate * dims.cp == 1:
        return None
    group = mesh.group("dp_cp" if dims.cp > 1 else "dp_replicate")
    return GradientReducer(model.parameters(), group, bucket_bytes=int(cfg.comm.bucket_mb * 2**20), overlap=overlap)
