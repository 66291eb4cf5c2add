"""Tensor-parallel communication overlapped with the matmuls it feeds (``--comm.tp_overlap=true``).

Collective matmul / async TP (the idea T3 puts in hardware), for the sequence-parallel plan of
parallel/tensor.py. Without it, a block's attention and MLP each all-gather their input from the
sequence shards, then run their column-parallel projections, and their row-parallel projection
ends in a reduce-scatter back onto the sequence shards: every byte is exposed. Here both
collectives are decomposed into ``tp`` ring steps along the sequence (chunk ``c`` = rank ``c``'s
sequence shard), each a point-to-point :func:`meshweave.comm.ops.exchange` with the ring
neighbours, posted before a chunk's matmul and waited after it, so chunk ``i``'s transfer runs
under a matmul:

- all-gather + matmul (q/k/v, gate/up: one gather feeds every column-parallel projection of the
  module): step ``k`` forwards the shard received last to rank ``r+1`` and receives the next from
  rank ``r-1`` while multiplying the shard in hand by every projection's weight.
  Backward: the input gradient is matmul + reduce-scatter (below) of ``sum_i dY_i W_i``; each
  weight gradient is one matmul ``dY_i^T X`` on the gathered input saved in forward (the
  unoverlapped plan saves the same gathered input), run under the first ring transfer.
- matmul + reduce-scatter (o, down): step ``k`` computes the partial product of chunk
  ``(r-1-k) mod tp`` while the accumulated partial of the previous chunk travels to ``r+1``; the
  accumulator that arrives at the last step holds every other rank's share of this rank's chunk.
  Backward: all-gather + matmul of the output gradient (the input gradient chunk by chunk), then
  the weight gradient in one matmul on the gathered output gradient.

Each shard can travel in :data:`PIECES` pieces, several in flight, so the pieces still on the wire
hide under the matmuls of those already in hand, not only under the matmuls of the own shard
(default 1: see :data:`PIECES`).

Bytes: a rank sends ``tp-1`` chunks of ``1/tp`` of the full tensor in each ring, exactly what the
ledger books for the collective it replaces (all-gather: ``(tp-1) x`` input bytes; reduce-scatter:
``(tp-1)/tp x`` input bytes), so the ``tp`` dim's bytes per step are unchanged; they are booked
under ``tp/send`` instead of ``tp/all_gather`` / ``tp/reduce_scatter``. At tp = 2 the two partial
sums of a reduce-scatter are added once, in either order the same float, so the results equal
the unoverlapped plan's up to the order in which the column-parallel projections' input gradients
are summed; weight gradients are the same single matmuls.

Parameters stay the DTensors the plain styles make (``Shard(0)`` column-parallel, ``Shard(1)``
row-parallel on the tp mesh), so checkpoints, FSDP and the grad norm see no difference; the
overlapped ops run on their local tensors inside :class:`torch.autograd.Function` s and return the
local tensors the plain styles return. Only plain ``nn.Linear`` projections are overlapped (LoRA
projections keep their styles, and a module whose column-parallel projections are not all plain
keeps its gather); row-parallel projections with a bias keep theirs (a replicated bias after the
reduction would need its own gradient reduction). MoE blocks (``replicated_block``) are untouched.

Inside an overlapped module the column-parallel projections return outputs computed before the
module's forward; the module receives, instead of the gathered input, a full-shape NaN view that
costs no memory, so any other use of that input fails loudly instead of silently losing gradients.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from meshweave.comm import ops
from meshweave.comm.ops import CommGroup, dim_of

# Each rank's sequence shard travels in this many pieces, several in flight: a piece's matmuls
# start as soon as it arrives (all-gather) and a partial sum leaves as soon as it is computed
# (reduce-scatter), so the matmuls of the shard on the wire could hide the transfer too, not only
# the shard in hand. 1 from measurement (bench/overlap.py's tp rows, gloo on a loaded 2-core CPU):
# 4 pieces left as much or more exposed than 1 — each extra exchange costs gloo's thread CPU the
# matmuls need. Worth re-measuring where communication has its own engine (NCCL).
PIECES = 1


def _ring(group: CommGroup) -> tuple[int, int]:
    """(next, previous) group ranks on the ring."""
    return (group.rank + 1) % group.size, (group.rank - 1) % group.size


def _pieces(rows: int, pieces: int) -> list[tuple[int, int]]:
    """``[start, end)`` of ``min(pieces, rows)`` near-equal pieces of ``rows`` rows."""
    m = max(1, min(pieces, rows))
    bounds = [i * rows // m for i in range(m + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def ring_all_gather_matmul(
    x: Tensor,
    weights: Sequence[Tensor],
    group: CommGroup,
    under_first: Callable[[], None] | None = None,
    pieces: int | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """All-gather ``x`` ``[b, s/n, in]`` (this rank's sequence shard) over ``group`` along dim 1 and
    multiply by each ``w`` ``[out_i, in]``: returns the gathered ``[b, s, in]`` and ``x_full @ w_i^T``
    ``[b, s, out_i]``. Ring steps, each shard in ``pieces`` (default :data:`PIECES`): a piece is
    forwarded and multiplied as soon as it arrives, while the next pieces are on the wire.
    ``under_first`` runs beside the first transfer. Collective over ``group``."""
    n, r = group.size, group.rank
    nxt, prv = _ring(group)
    b, sl, d = x.shape
    full = x.new_empty(b, n * sl, d)
    outs = [x.new_empty(b, n * sl, w.shape[0]) for w in weights]
    bounds = _pieces(sl, pieces or PIECES)
    cur = [x[:, lo:hi].contiguous() for lo, hi in bounds]
    arriving: list = [None] * len(bounds)
    for k in range(n):
        base = ((r - k) % n) * sl  # whose shard is in hand: rank r - k's
        incoming: list[Tensor] = []
        for p, (lo, hi) in enumerate(bounds):
            if arriving[p] is not None:
                arriving[p].wait()
            if k < n - 1:  # pass the piece on before multiplying it
                incoming.append(torch.empty_like(cur[p]))
                arriving[p] = ops.exchange([(cur[p], nxt)], [(incoming[p], prv)], group)
            rows = slice(base + lo, base + hi)
            full[:, rows] = cur[p]
            for w, out in zip(weights, outs, strict=True):
                out[:, rows] = torch.matmul(cur[p], w.t())
            if k == 0 and p == 0 and under_first is not None:
                under_first()
        cur = incoming
    return full, outs


def ring_matmul_reduce_scatter(
    partial: Callable[[int, int, int], Tensor],
    group: CommGroup,
    under_first: Callable[[], None] | None = None,
    rows: int = 0,
    pieces: int | None = None,
) -> Tensor:
    """Sum over ``group`` of ``partial(c, lo, hi)`` for this rank's chunk ``c = rank``:
    ``partial(c, lo, hi)`` is a rank's contribution to rows ``[lo, hi)`` of sequence chunk ``c``
    (``[b, hi - lo, out]``; a chunk has ``rows`` rows). Ring steps, each chunk in ``pieces``
    (default :data:`PIECES`): a
    piece's accumulated sum leaves as soon as it is computed, under the next pieces' matmuls.
    ``under_first`` runs beside the first transfer. Collective."""
    n, r = group.size, group.rank
    nxt, prv = _ring(group)
    bounds = _pieces(rows, pieces or PIECES)
    arriving: list = [None] * len(bounds)
    received: list = [None] * len(bounds)
    done: list[Tensor] = []
    for k in range(n):
        c = (r - 1 - k) % n  # the chunk whose sum passes through here now: rank r's at the last step
        for p, (lo, hi) in enumerate(bounds):
            acc = partial(c, lo, hi)
            if arriving[p] is not None:
                arriving[p].wait()
                acc = acc + received[p]
            if k < n - 1:
                received[p] = torch.empty_like(acc)
                arriving[p] = ops.exchange([(acc, nxt)], [(received[p], prv)], group)
                if k == 0 and p == 0 and under_first is not None:
                    under_first()
            else:
                done.append(acc)
    return torch.cat(done, dim=1) if len(done) > 1 else done[0]


def _rows(t: Tensor, c: int, n: int, lo: int, hi: int) -> Tensor:
    """Rows ``[lo, hi)`` of chunk ``c`` of ``n`` of ``t`` along the sequence (dim 1)."""
    base = c * (t.shape[1] // n)
    return t[:, base + lo : base + hi]


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class AllGatherMatmul(torch.autograd.Function):
    """``x_full @ w_i^T`` for each ``w_i``, ``x`` this rank's sequence shard (forward: ring
    all-gather + matmul; backward: matmul + ring reduce-scatter of the input gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: CommGroup, *weights: Tensor) -> tuple[Tensor, ...]:
        full, outs = ring_all_gather_matmul(x, weights, group)
        ctx.group = group
        ctx.save_for_backward(full, *weights)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        full, *weights = ctx.saved_tensors
        group: CommGroup = ctx.group
        n = group.size
        used = [(g, w) for g, w in zip(grads, weights, strict=True) if g is not None]
        dws: list[Tensor | None] = [None] * len(weights)

        def weight_grads() -> None:  # the same single matmul as the unoverlapped linear's
            for i, g in enumerate(grads):
                if g is not None:
                    dws[i] = _flat(g).t() @ _flat(full)

        def partial(c: int, lo: int, hi: int) -> Tensor:
            total = torch.matmul(_rows(used[0][0], c, n, lo, hi), used[0][1])
            for g, w in used[1:]:
                total = total + torch.matmul(_rows(g, c, n, lo, hi), w)
            return total

        dx = ring_matmul_reduce_scatter(partial, group, weight_grads, full.shape[1] // n)
        if n == 1:
            weight_grads()
        return (dx, None, *dws)


class _KeepInputs(torch.autograd.Function):
    """Holds :class:`MatmulReduceScatter`'s inputs for its backward. A separate node so they are
    saved *before* the ring runs: activation checkpointing stops its recomputation at the last
    saved tensor, so a block's final reduce-scatter is not re-run in backward (as the plain
    linear, which saves its input before DTensor's reduce-scatter, is not)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _: Tensor) -> tuple[None, None]:
        return None, None


class MatmulReduceScatter(torch.autograd.Function):
    """``x @ w^T`` reduce-scattered onto sequence shards: ``x`` ``[b, s, in/n]`` (row-parallel
    input), ``w`` ``[out, in/n]``, result ``[b, s/n, out]`` (forward: matmul + ring reduce-scatter;
    backward: ring all-gather + matmul of the output gradient). Call through :func:`matmul_reduce_scatter`."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, token: Tensor, group: CommGroup) -> Tensor:
        ctx.group, ctx.keep = group, token.grad_fn
        return _matmul_rs(x, w, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.keep.saved_tensors
        full_grad, (dx,) = ring_all_gather_matmul(grad, [w.t()], ctx.group)
        return dx, _flat(full_grad).t() @ _flat(x), None, None


def _matmul_rs(x: Tensor, w: Tensor, group: CommGroup) -> Tensor:
    n = group.size
    return ring_matmul_reduce_scatter(
        lambda c, lo, hi: torch.matmul(_rows(x, c, n, lo, hi), w.t()), group, None, x.shape[1] // n
    )


def matmul_reduce_scatter(x: Tensor, w: Tensor, group: CommGroup) -> Tensor:
    """:class:`MatmulReduceScatter` of ``x`` and ``w`` (differentiable when either needs a gradient)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        return _matmul_rs(x, w, group)
    return MatmulReduceScatter.apply(x, w, _KeepInputs.apply(x, w), group)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _compute_dtype(tensors: Sequence[Tensor]) -> list[Tensor]:
    """What ``F.linear`` under autocast computes with: the tensors cast to the autocast dtype."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return list(tensors)
    dtype = torch.get_autocast_dtype(device)
    return [t.to(dtype) for t in tensors]


def _group(mesh: DeviceMesh) -> CommGroup:
    pg = mesh.get_group()
    return CommGroup(pg, dim_of(pg))


_OUT = "_tp_overlap_out"


def _take_output(self: nn.Module, x: Tensor) -> Tensor:
    """Forward of an overlapped column-parallel projection: the output its module's gather computed."""
    out = self.__dict__.pop(_OUT, None)
    if out is None:
        raise RuntimeError(
            f"tp_overlap: {type(self).__name__} was called outside its module's forward (its output is "
            "computed by the module's gathered matmul)"
        )
    return out


class OverlapColwise(ColwiseParallel):
    """A column-parallel projection whose output its parent's :class:`OverlapGather` computes:
    the weights are sharded as :class:`ColwiseParallel` shards them, no hooks."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        distribute_module(module, device_mesh, self._partition_linear_fn)
        module.forward = types.MethodType(_take_output, module)
        return module


class OverlapGather(ParallelStyle):
    """The ``gather_sequence`` of a module whose column-parallel projections are ``projections``:
    one ring all-gather + matmul computes all their outputs from this rank's sequence shard."""

    def __init__(self, projections: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.projections = list(projections)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group, projections = _group(device_mesh), self.projections

        def gather_and_project(mod: nn.Module, args: tuple) -> tuple:
            x = args[0]
            if isinstance(x, DTensor):
                if tuple(x.placements) != (Shard(1),):
                    raise ValueError(f"tp_overlap expects a sequence-sharded input, got {x.placements}")
                x = x.to_local()
            inputs = _compute_dtype([x, *(_local(p.weight) for p in projections)])
            outs = AllGatherMatmul.apply(inputs[0], group, *inputs[1:])
            for proj, out in zip(projections, outs, strict=True):
                if proj.bias is not None:  # column-parallel bias: this rank's features, whole sequence
                    out = out + _local(proj.bias).to(out.dtype)
                proj.__dict__[_OUT] = out
            b, sl, d = x.shape
            placeholder = torch.full((), float("nan"), dtype=x.dtype, device=x.device).expand(b, sl * group.size, d)
            return (placeholder, *args[1:])

        module.register_forward_pre_hook(gather_and_project)
        return module


class OverlapRowwise(RowwiseParallel):
    """A bias-free row-parallel projection whose reduce-scatter onto the sequence shards is ring
    steps under its partial matmuls: weight sharded as :class:`RowwiseParallel` shards it, input
    and output local tensors (``[b, s, in/tp]`` -> ``[b, s/tp, out]``)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        distribute_module(module, device_mesh, self._partition_linear_fn)
        group = _group(device_mesh)

        def forward(self: nn.Linear, x: Tensor) -> Tensor:
            x, w = _compute_dtype([_local(x), _local(self.weight)])
            return matmul_reduce_scatter(x, w, group)

        module.forward = types.MethodType(forward, module)
        return module


def overlap_styles(root: nn.Module, plan: Mapping[str, str]) -> dict[str, ParallelStyle]:
    """The entries of ``root``'s tensor-parallel ``plan`` (models/family.py styles) that overlap
    takes over: every ``gather_sequence`` whose ``colwise`` children are all plain ``nn.Linear``
    (with them), every bias-free plain ``rowwise`` ``nn.Linear``. The rest keep their styles."""
    present = {path: style for path, style in plan.items() if _exists(root, path)}
    styles: dict[str, ParallelStyle] = {}
    for path, style in present.items():
        if style == "gather_sequence":
            children = [p for p, s in present.items() if s == "colwise" and p.startswith(path + ".")]
            modules = [root.get_submodule(p) for p in children]
            if modules and all(type(m) is nn.Linear for m in modules):
                styles[path] = OverlapGather(modules)  # type: ignore[arg-type]
                styles |= {p: OverlapColwise() for p in children}
        if style == "rowwise":
            module = root.get_submodule(path)
            if type(module) is nn.Linear and module.bias is None:
                styles[path] = OverlapRowwise()
    return styles


def _exists(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True
