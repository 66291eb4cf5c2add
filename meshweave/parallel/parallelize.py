"""Turn a model on ``meta`` into this rank's trainable part, in the composition order of DESIGN.md.

Order: PP split -> TP/SP -> CP attention binding -> EP (experts split over ``ep``, their weights
made FSDP-shaped shards that FSDP ignores) -> activation checkpointing -> data parallelism (FSDP /
replicated) -> materialise and initialise -> MoE aux-loss scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from meshweave.comm.overlap import GradientReducer
from meshweave.config import Config
from meshweave.models.llama import Transformer, init_value
from meshweave.models.moe import init_moe_buffers, set_aux_loss_scale
from meshweave.parallel.context import ContextParallel
from meshweave.parallel.data import (
    MIXED_PRECISION,
    apply_fsdp,
    fsdp_inside_replicas,
    replicas_apart,
    replicated_reducer,
)
from meshweave.parallel.dims import ParallelDims, ParallelMesh
from meshweave.parallel.expert import bind, shard_expert_weights
from meshweave.parallel.pipeline import PipelineParts, split_model
from meshweave.parallel.stages import microbatches
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
    experts = expert_parallel(model, dims, mesh, cfg)
    for root in {id(r): r for r in [model, *roots]}.values():
        root.checkpoint_layers = cfg.parallel.activation_checkpointing
    if fsdp_inside_replicas(dims, cfg):
        apply_fsdp(model, dims, mesh, cfg.parallel.mixed_precision, roots, across_replicas=not replicas_apart(cfg),
                   ignored=experts)
    materialize(model, device, cfg.train.seed)
    set_aux_loss_scale(model, aux_loss_scale(dims, cfg))
    # A pipeline schedule runs every microbatch's backward before the step: reduce once, after.
    overlap = cfg.comm.overlap and pipeline is None
    return Parallelized(replicated_reducer(model, dims, mesh, cfg, overlap), pipeline)


def expert_parallel(model: Transformer, dims: ParallelDims, mesh: ParallelMesh, cfg: Config) -> list[nn.Parameter]:
    """Split the MoE layers' experts over ``mesh["ep"]`` (meta model, after TP, before FSDP) and
    store their weights as FSDP-shaped shards (parallel/expert.py); returns those weights, which
    FSDP must ignore. Nothing to do at ep = 1, where FSDP shards the experts like any weight."""
    if dims.ep == 1:
        return []
    bind(model, mesh.group("ep"))
    # The mesh and placements FSDP gives every other parameter (apply_fsdp; FSDP2 concatenates
    # the dp mesh with a tensor-parallel parameter's tp mesh), so one grad-norm covers all.
    hsdp = dims.dp_replicate > 1 and not replicas_apart(cfg)
    dp_mesh = mesh["dp_replicate", dims.shard_dim] if hsdp else mesh[dims.shard_dim]
    placements = [Replicate(), Shard(0)] if hsdp else [Shard(0)]
    if dims.tp > 1:
        dp_mesh = DeviceMesh._concatenate([dp_mesh, mesh["tp"]])
        placements.append(Replicate())
    policy = MIXED_PRECISION[cfg.parallel.mixed_precision]
    return shard_expert_weights(model, dp_mesh, placements, mesh.group("edp"),
                                mesh.group("dp_replicate") if hsdp else None,
                                policy.param_dtype if policy is not None else None)


def aux_loss_scale(dims: ParallelDims, cfg: Config) -> float:
    """``1 / (dp x cp ranks x micro-batches per rank)``: the gradient then trains on the mean MoE
    aux loss over every micro-batch of the step, as it trains on the mean token loss. Each
    micro-batch's aux loss is a function of that micro-batch's tokens, so layouts that cut the
    global batch into the same micro-batches (any ep, tp) train on the same aux loss."""
    per_rank = cfg.train.global_batch // dims.dp
    micro = microbatches(cfg) if dims.pp > 1 else per_rank // (cfg.train.micro_batch or per_rank)
    return 1.0 / (dims.dp * dims.cp * micro)


@torch.no_grad()
def materialize(model: Transformer, device: torch.device, seed: int) -> None:
    """Allocate ``model`` on ``device`` and fill it with :func:`init_value` (no communication).

    Each rank builds the full initial tensor from the seed and keeps its own shard, so the model
    is identical under every layout. Costs one full parameter on the host at a time.
    """
    model.to_empty(device=device)
    model.tie_weights()
    init_moe_buffers(model)  # to_empty leaves buffers uninitialised
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            full = init_value(name, param.shape, model.cfg, seed).to(device=device, dtype=param.dtype)
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(init_value(name, param.shape, model.cfg, seed))
