"""Turn a model on ``meta`` into this rank's trainable part, in the composition order of DESIGN.md.

Order: PP split -> TP/SP -> CP attention binding -> (EP) -> activation checkpointing ->
data parallelism (FSDP / replicated) -> materialise and initialise. The bracketed steps arrive
with their parallelisms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from meshweave.comm.overlap import GradientReducer
from meshweave.config import Config
from meshweave.models.llama import Transformer, init_value
from meshweave.parallel.context import ContextParallel
from meshweave.parallel.data import apply_fsdp, fsdp_inside_replicas, replicas_apart, replicated_reducer
from meshweave.parallel.dims import ParallelDims, ParallelMesh
from meshweave.parallel.pipeline import PipelineParts, split_model
from meshweave.parallel.tensor import apply_tensor_parallel


def context_parallel(dims: ParallelDims, mesh: ParallelMesh, cfg: Config) -> ContextParallel | None:
    """The run's context-parallel attention over ``mesh["cp"]``, or ``None`` when cp = 1.
    Collective over the job (the hybrid method creates sub-groups)."""
    if dims.cp == 1:
        return None
    p = cfg.parallel
    return ContextParallel(mesh.group("cp"), p.cp_method, ulysses_degree=p.ulysses or None, inner=p.cp_inner)


@dataclass
class Parallelized:
    """What the trainer drives: the gradient reducer it must ``finish()`` each step (``None`` when
    FSDP or nothing reduces), and this rank's pipeline stages (``None`` without pp)."""

    reducer: GradientReducer | None
    pipeline: PipelineParts | None


def parallelize(model: Transformer, dims: ParallelDims, mesh: ParallelMesh, cfg: Config,
                device: torch.device, cp: ContextParallel | None = None) -> Parallelized:
    """Split ``model`` (on meta) for this rank, then materialise and initialise it on ``device``.

    With pp > 1 ``model`` is pruned in place to this rank's stages (names stay global). ``cp``
    (from :func:`context_parallel`) becomes every layer's attention op; the caller feeds the model
    its sequence shards and sets their positions. Collective over the job.
    """
    pipeline = split_model(model, cfg, mesh["pp"].get_local_rank()) if dims.pp > 1 else None
    roots = pipeline.stages if pipeline else [model]
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if cp is not None:
        model.set_attention_op(cp.attention_op)
    for root in {id(r): r for r in [model, *roots]}.values():
        root.checkpoint_layers = cfg.parallel.activation_checkpointing
    if fsdp_inside_replicas(dims, cfg):
        apply_fsdp(model, dims, mesh, cfg.parallel.mixed_precision, roots, across_replicas=not replicas_apart(cfg))
    materialize(model, device, cfg.train.seed)
    # A pipeline schedule runs every microbatch's backward before the step: reduce once, after.
    overlap = cfg.comm.overlap and pipeline is None
    return Parallelized(replicated_reducer(model, dims, mesh, cfg, overlap), pipeline)


@torch.no_grad()
def materialize(model: Transformer, device: torch.device, seed: int) -> None:
    """Allocate ``model`` on ``device`` and fill it with :func:`init_value` (no communication).

    Each rank builds the full initial tensor from the seed and keeps its own shard, so the model
    is identical under every layout. Costs one full parameter on the host at a time.
    """
    model.to_empty(device=device)
    model.tie_weights()
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            full = init_value(name, param.shape, model.cfg, seed).to(device=device, dtype=param.dtype)
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(init_value(name, param.shape, model.cfg, seed))
