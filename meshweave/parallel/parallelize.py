"""Turn a model on ``meta`` into this rank's trainable part, in the composition order of DESIGN.md.

Order: (PP split) -> (TP/SP) -> (CP attention binding) -> (EP) -> activation checkpointing ->
data parallelism (FSDP / replicated) -> materialise and initialise. The bracketed steps arrive
with their parallelisms; this build applies the rest.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from meshweave.comm.overlap import GradientReducer
from meshweave.config import Config
from meshweave.models.llama import Transformer, init_value
from meshweave.parallel.data import apply_data_parallel
from meshweave.parallel.dims import ParallelDims, ParallelMesh


def parallelize(model: Transformer, dims: ParallelDims, mesh: ParallelMesh, cfg: Config) -> GradientReducer | None:
    """Apply every configured parallelism to ``model`` (still on meta); returns the DP reducer."""
    model.checkpoint_layers = cfg.parallel.activation_checkpointing
    return apply_data_parallel(model, dims, mesh, cfg)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate ``model`` on ``device`` and fill it with :func:`init_value` (no communication).

    Each rank builds the full initial tensor from the seed and keeps its own shard, so the model
    is identical under every layout. Costs one full parameter on the host at a time.
    """
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            full = init_value(name, param.shape, model.cfg, seed).to(device=device, dtype=param.dtype)
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(init_value(name, param.shape, model.cfg, seed))
