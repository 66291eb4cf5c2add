"""Data parallelism: replicated (meshweave's bucketed all-reduce), FSDP2, or HSDP.

- ``dp_shard > 1``: FSDP2 ``fully_shard`` per decoder layer, then the root; with
  ``dp_replicate > 1`` too, the 2-D mesh makes it HSDP (shard inside, replicate across).
  Prefetch is explicit (:class:`FsdpPrefetch`, the ``parallel.fsdp_*`` options): each layer
  starts the all-gathers of the next layers in forward and of the previous ones in backward,
  asynchronously, so they run under the current layer's compute.
- only ``dp_replicate > 1``: parameters stay whole; gradients go through
  :class:`meshweave.comm.overlap.GradientReducer`, bucketed and overlapped with backward.

Context-parallel ranks hold the same parameters and see different tokens, so for gradients they
are data-parallel ranks: FSDP shards over ``dp_shard x cp`` and the replicated reducer sums over
``dp_replicate x cp``.

Either way gradients are **summed** over data-parallel ranks: the trainer divides the loss by the
global token count, so the sum is the gradient of the global mean loss.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class FsdpPrefetch:
    """How FSDP2 schedules its all-gathers (``parallel.fsdp_*``; see config.py for the defaults).

    ``forward`` / ``backward``: layers whose all-gather a layer starts early, in forward the next
    ones, in backward the previous ones (FSDP2's ``set_modules_to_forward_prefetch`` /
    ``set_modules_to_backward_prefetch``). With either above 0 every layer unshards with
    ``async_op=True`` (FSDP2's ``_set_unshard_async_op``): the prefetched all-gather is then in flight while
    the current layer computes — on CPU the only way it can be, since FSDP2 has no side streams
    there, and on CUDA what FSDP2 recommends with explicit prefetching (no inter-stream
    fragmentation). 0 and 0 leave FSDP2's implicit schedule. ``reshard_after_forward``: "auto"
    (true but for the last layer, whose parameters backward needs at once), "true", "false", or a
    number of ranks to keep the parameters sharded over between forward and backward.

    The config defaults (1, 1, "auto") are measured (bench/overlap.py, bench/README.md): over a
    shaped link depth 1 halved the exposed communication of FSDP2's implicit schedule (0.53 -> 0.29
    s per step at 1 Gbit/s, 5.2 -> 2.5 s at 100 Mbit/s); depth 2 and reshard "false" were no
    better, the latter at the cost of every layer's full parameters held from forward to backward.
    """

    forward: int = 0
    backward: int = 0
    reshard_after_forward: str = "auto"

    @classmethod
    def from_config(cls, cfg: Config) -> FsdpPrefetch:
        p = cfg.parallel
        return cls(p.fsdp_forward_prefetch, p.fsdp_backward_prefetch, p.fsdp_reshard_after_forward)

    def reshard(self, layer: int, n_layers: int) -> bool | int:
        """FSDP2's ``reshard_after_forward`` for layer ``layer`` of ``n_layers``."""
        if self.reshard_after_forward == "auto":
            return layer < n_layers - 1
        if self.reshard_after_forward in ("true", "false"):
            return self.reshard_after_forward == "true"
        return int(self.reshard_after_forward)


def _set_prefetch(layers: list[nn.Module], prefetch: FsdpPrefetch) -> None:
    """Explicit forward / backward prefetch lists over ``layers`` (one FSDP root's, in order)."""
    if not (prefetch.forward or prefetch.backward):
        return
    units: list[FSDPModule] = [layer for layer in layers if isinstance(layer, FSDPModule)]
    assert len(units) == len(layers), "fully_shard every layer first"
    for i, unit in enumerate(units):
        # Private in torch 2.13 (public in earlier FSDP2 releases); the flag FSDP2 reads is per group.
        unit._set_unshard_async_op(True)
        if prefetch.forward:
            unit.set_modules_to_forward_prefetch(units[i + 1 : i + 1 + prefetch.forward])
        if prefetch.backward and i > 0:  # backward meets the layers in reverse: nearest first
            unit.set_modules_to_backward_prefetch(units[max(0, i - prefetch.backward) : i][::-1])


def apply_fsdp(
    model: nn.Module,
    dims: ParallelDims,
    mesh: ParallelMesh,
    mixed_precision: str,
    roots: list[nn.Module] | None = None,
    across_replicas: bool = True,
    ignored: list[nn.Parameter] | None = None,
    prefetch: FsdpPrefetch | None = None,
) -> None:
    """Shard ``model`` with FSDP2 over dp_shard (x cp), HSDP with dp_replicate across.

    Each decoder layer is one FSDP unit; ``roots`` (default: ``model``) take the rest — a
    pipeline rank passes its stage modules, each of which must be its own FSDP root. With
    ``across_replicas=False`` FSDP reduces inside each replica only (1-bit Adam and DiLoCo
    exchange between replicas themselves). ``ignored`` parameters are left alone (expert weights,
    which parallel/expert.py shards and reduces itself). ``prefetch``: the all-gather schedule
    (default: FSDP2's implicit one); prefetch lists never cross from one root's layers to another's.
    """
    prefetch = prefetch or FsdpPrefetch()
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
        fully_shard(layer, reshard_after_forward=prefetch.reshard(i, len(layers)), **kwargs)
    for root in roots or [model]:
        fully_shard(root, **kwargs)
        _sum_not_average(root)
        owned = {id(m) for m in root.modules()}
        _set_prefetch([layer for layer in layers if id(layer) in owned], prefetch)


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
    DiLoCo or CO2 nothing reduces across replicas. Call it after materialisation: hooks bind to the real
    parameters, which ``to_empty`` replaces."""
    mode = replica_mode(cfg)
    if mode != "dp":
        if mode in ("diloco", "co2") or dims.dp_replicate == 1:
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
