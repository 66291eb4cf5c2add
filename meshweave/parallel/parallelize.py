"""Turn a model on ``meta`` into this rank's :class:`ParallelRuntime`, in the composition order below.

Order: PP split -> TP/SP -> CP attention binding -> EP (experts split over ``ep``, their weights
made FSDP-shaped shards that FSDP ignores) -> activation checkpointing -> data parallelism (FSDP /
replicated) -> materialise and initialise -> MoE aux-loss scale -> pipeline schedule, gradient
reducer and replica exchange, handed to the training loop as one runtime object.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from meshweave.comm.ops import CommGroup
from meshweave.config import Config
from meshweave.lowcomm.co2 import CO2
from meshweave.lowcomm.diloco import StreamingDiLoCo
from meshweave.lowcomm.replicas import ReplicaExchange, replica_mode
from meshweave.models.family import family_of, seam
from meshweave.models.lora import freeze_base, is_adapter, lora_init_value
from meshweave.models.moe import init_moe_buffers, moe_layers, set_aux_loss_scale
from meshweave.parallel.context import ContextParallel
from meshweave.parallel.data import (
    MIXED_PRECISION,
    FsdpPrefetch,
    apply_fsdp,
    fsdp_inside_replicas,
    replicated_reducer,
)
from meshweave.parallel.dims import ParallelDims, ParallelMesh
from meshweave.parallel.expert import bind, shard_expert_weights
from meshweave.parallel.pipeline import build_schedule, split_model
from meshweave.parallel.runtime import LossFn, ParallelRuntime
from meshweave.parallel.stages import microbatches
from meshweave.parallel.tensor import apply_tensor_parallel


def context_parallel(dims: ParallelDims, mesh: ParallelMesh, cfg: Config) -> ContextParallel | None:
    """The run's context-parallel attention over ``mesh["cp"]``, or ``None`` when cp = 1.
    Collective over the job (the hybrid method creates sub-groups)."""
    if dims.cp == 1:
        return None
    p = cfg.parallel
    return ContextParallel(mesh.group("cp"), p.cp_method, ulysses_degree=p.ulysses or None, inner=p.cp_inner)


def parallelize(
    model: nn.Module, dims: ParallelDims, mesh: ParallelMesh, cfg: Config, device: torch.device, loss_fn: LossFn
) -> ParallelRuntime:
    """Split ``model`` (on meta) for this rank, materialise and initialise it on ``device``, and
    return the runtime the training loop drives.

    With pp > 1 ``model`` is pruned in place to this rank's stages (names stay global). ``loss_fn``
    ``(logits, labels) -> token-loss sum`` is the last stage's loss. Collective over the job.
    """
    pipeline = split_model(model, cfg, mesh["pp"].get_local_rank()) if dims.pp > 1 else None
    roots = pipeline.stages if pipeline else [model]
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], overlap=cfg.comm.tp_overlap)
    cp = context_parallel(dims, mesh, cfg)
    if cp is not None:
        # Compiled blocks run CP's exchanges eagerly between their compiled halves: its autograd
        # Functions post P2P and plan blocks on the host, which dynamo cannot trace.
        seam(model).set_attention_op(torch.compiler.disable(cp.attention_op) if cfg.train.compile else cp.attention_op)
    experts = expert_parallel(model, dims, mesh, cfg)
    if cfg.lora.rank:  # before FSDP, which keeps each parameter's flag (TP styles may not)
        freeze_base(model)
    for root in {id(r): r for r in [model, *roots]}.values():
        seam(root).checkpoint_layers = cfg.parallel.activation_checkpointing
    if cfg.train.compile:
        compile_blocks(model)
    apart = replica_mode(cfg) != "dp"
    if fsdp_inside_replicas(dims, cfg):
        apply_fsdp(
            model,
            dims,
            mesh,
            cfg.parallel.mixed_precision,
            roots,
            across_replicas=not apart,
            ignored=experts,
            prefetch=FsdpPrefetch.from_config(cfg),
        )
    materialize(model, device, cfg.train.seed)
    set_aux_loss_scale(model, aux_loss_scale(dims, cfg))
    _set_positions([model, *roots], cp, pipeline is not None, cfg.train.seq_len, device)
    # A pipeline schedule runs every microbatch's backward before the step: reduce once, after.
    reducer = replicated_reducer(model, dims, mesh, cfg, overlap=cfg.comm.overlap and pipeline is None)
    replicas = replica_exchange(cfg, dims, mesh, model)
    runtime = ParallelRuntime(cfg, dims, mesh, device, model, loss_fn, cp, pipeline, None, reducer, replicas)
    if pipeline is not None:
        runtime.schedule = build_schedule(pipeline, cfg, mesh.group("pp").pg, device, runtime.pipeline_loss)
    return runtime


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` every decoder block in place (after TP and activation checkpointing,
    before FSDP, as TorchTitan orders them). In place (``Module.compile``), so parameter names,
    checkpoints and the HF name map are unchanged; blocks of one shape share their compiled code."""
    for moe in moe_layers(model):
        # Token routing sizes every grouped matmul and all-to-all from host-side counts: run the
        # dispatch eagerly between the block's compiled parts (compiled, it would recompile per count).
        moe.dispatch_op = torch.compiler.disable(moe.dispatch_op)
    for block in family_of(model).block_dict(model).values():
        block.compile()


def replica_exchange(cfg: Config, dims: ParallelDims, mesh: ParallelMesh, model: nn.Module) -> ReplicaExchange:
    """How this rank's replica exchanges with the others (lowcomm/replicas.py), over this mesh.
    Collective over the job in DiLoCo and CO2 modes."""
    mode = replica_mode(cfg)
    diloco: StreamingDiLoCo | CO2 | None = None
    # ``agree``: the ranks of one sharded replica take each sync's keep/apply decision together.
    if mode == "diloco":
        diloco = StreamingDiLoCo(model, mesh.group("dp_replicate"), cfg.comm.diloco, agree=CommGroup.world())
    elif mode == "co2":
        diloco = CO2(model, mesh.group("dp_replicate"), cfg.comm.co2, agree=CommGroup.world())
    return ReplicaExchange(
        mode,
        mesh.group("dp_replicate"),
        mesh["dp_replicate"].get_local_rank(),
        everyone=mesh.group(dims.loss_dim),
        inside=mesh.group(dims.shard_dim),
        diloco=diloco,
    )


def _set_positions(
    modules: list[nn.Module], cp: ContextParallel | None, pipelined: bool, seq_len: int, device: torch.device
) -> None:
    """Give every model (or stage) the global RoPE positions of the tokens it sees: a CP shard,
    and for pipeline stages (whose input is hidden states) the whole sequence."""
    if cp is None and not pipelined:
        return
    positions = cp.positions(seq_len, device) if cp is not None else torch.arange(seq_len, device=device)
    for module in modules:
        module.rope_positions = positions


def expert_parallel(model: nn.Module, dims: ParallelDims, mesh: ParallelMesh, cfg: Config) -> list[nn.Parameter]:
    """Split the MoE layers' experts over ``mesh["ep"]`` (meta model, after TP, before FSDP) and
    store their weights as FSDP-shaped shards (parallel/expert.py); returns those weights, which
    FSDP must ignore. Nothing to do at ep = 1, where FSDP shards the experts like any weight."""
    if dims.ep == 1:
        return []
    bind(model, mesh.group("ep"))
    # The mesh and placements FSDP gives every other parameter (apply_fsdp; FSDP2 concatenates
    # the dp mesh with a tensor-parallel parameter's tp mesh), so one grad-norm covers all.
    hsdp = dims.dp_replicate > 1 and replica_mode(cfg) == "dp"
    dp_mesh = mesh["dp_replicate", dims.shard_dim] if hsdp else mesh[dims.shard_dim]
    placements: list[Placement] = [Replicate(), Shard(0)] if hsdp else [Shard(0)]
    if dims.tp > 1:
        dp_mesh = DeviceMesh._concatenate([dp_mesh, mesh["tp"]])
        placements.append(Replicate())
    policy = MIXED_PRECISION[cfg.parallel.mixed_precision]
    return shard_expert_weights(
        model,
        dp_mesh,
        placements,
        mesh.group("edp"),
        mesh.group("dp_replicate") if hsdp else None,
        policy.param_dtype if policy is not None else None,
    )


def aux_loss_scale(dims: ParallelDims, cfg: Config) -> float:
    """``1 / (dp x cp ranks x micro-batches per rank)``: the gradient then trains on the mean MoE
    aux loss over every micro-batch of the step, as it trains on the mean token loss. Each
    micro-batch's aux loss is a function of that micro-batch's tokens, so layouts that cut the
    global batch into the same micro-batches (any ep, tp) train on the same aux loss."""
    per_rank = cfg.train.global_batch // dims.dp
    micro = microbatches(cfg) if dims.pp > 1 else per_rank // (cfg.train.micro_batch or per_rank)
    return 1.0 / (dims.dp * dims.cp * micro)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate ``model`` on ``device`` and fill it with :func:`init_value` (no communication).

    Each rank builds the full initial tensor from the seed and keeps its own shard, so the model
    is identical under every layout. Costs one full parameter on the host at a time.
    """
    init_value, cfg = family_of(model).init_value, seam(model).cfg
    model.to_empty(device=device)
    seam(model).tie_weights()
    init_moe_buffers(model)  # to_empty leaves buffers uninitialised
    for name, param in model.named_parameters():
        value = (
            lora_init_value(name, param.shape, seed) if is_adapter(name) else init_value(name, param.shape, cfg, seed)
        )
        if isinstance(param, DTensor):
            full = value.to(device=device, dtype=param.dtype)
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(value)
