"""The 1-bit exchange of sharded parameters, defined on their global elements (layout-free).

The momentum average of :class:`meshweave.lowcomm.onebit.OneBitAdam` over ``n`` replicas, for
parameters that a replica may shard any way (FSDP, TP, pipeline stages): parameter ``p`` of ``N``
elements is split into ``n`` rows of ``L = chunk_numel(N, n)`` global flat indices (row ``r`` served
by replica ``r``), each row into chunks of ``chunk_size`` elements with one RMS scale. A rank
compresses exactly the elements it holds; a chunk's sum of squares is summed over the ranks of its
replica that hold the parameter (one small all-reduce per mesh), so every scale is the unsharded
one. Replica ``r``'s rank with the same shard serves the shard's part of row ``r``. Signs, scales and
both error buffers are the unsharded run's element by element (up to the order of those sums).

Per call, over the replicas' ``group``: one all-to-all of packed signs and one of scales (worker
phase), one all-gather of each (server phase); every rank decodes the same bytes, so the average is
identical on every replica.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Partial, distribute_tensor

from meshweave.comm import ops
from meshweave.comm.codecs import pack_signs, unpack_signs
from meshweave.comm.ops import CommGroup

Tensor = torch.Tensor


def chunk_numel(numel: int, group_size: int) -> int:
    """Elements of the row each of ``group_size`` ranks serves for a ``numel``-element tensor."""
    return 8 * math.ceil(math.ceil(numel / group_size) / 8)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class ParamLayout:
    """Where one parameter's local elements sit in the canonical (unsharded) exchange over ``n``
    replicas: rows of ``L`` global flat indices, chunks of ``chunk_size`` inside each row."""

    order: Tensor  # local flat positions, grouped by row (ascending), stable inside a row
    counts: list[int]  # local elements per row
    chunk: Tensor  # chunk of each element of ``order`` within its row: [0, k)
    row: Tensor  # row of each element of ``order``
    chunk_counts: Tensor  # global elements per chunk, fp64 [n, k]
    k: int  # chunks per row

    @property
    def slot(self) -> Tensor:
        """Each element's chunk among all ``n * k`` chunks of the parameter."""
        return self.row * self.k + self.chunk

    def row_part(self, t: Tensor, r: int) -> Tensor:
        """The part of ``t`` (ordered like ``order``) that lies in row ``r``."""
        start = sum(self.counts[:r])
        return t[start : start + self.counts[r]]


def _global_indices(p: Tensor) -> Tensor:
    """Global flat index of each element of ``p``'s local shard, in local flat order. A DTensor's
    local slice is taken the way its values were materialised (no communication)."""
    full = torch.arange(p.numel(), dtype=torch.int64, device=_local(p).device).view(p.shape)
    if isinstance(p, DTensor):
        full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
    return full.reshape(-1)


def param_layout(p: Tensor, n: int, chunk_size: int) -> ParamLayout:
    numel, length = p.numel(), chunk_numel(p.numel(), n)
    k = math.ceil(length / chunk_size)
    index = _global_indices(p)
    row, within = index // length, index % length
    order = torch.argsort(row, stable=True)
    counts = torch.bincount(row, minlength=n).tolist()
    starts = (
        torch.arange(n, dtype=torch.float64).view(n, 1) * length + torch.arange(k, dtype=torch.float64) * chunk_size
    )
    ends = torch.minimum(
        torch.minimum(starts + chunk_size, (torch.arange(n, dtype=torch.float64).view(n, 1) + 1) * length),
        torch.tensor(float(numel), dtype=torch.float64),
    )
    chunk_counts = (ends - starts).clamp_min(0)
    return ParamLayout(order, counts, (within // chunk_size)[order], row[order], chunk_counts, k)


def sum_over_holders(parts: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """``[(partial fp64 vector, parameter)]`` -> the vectors summed over every rank holding a shard
    of that parameter (its DTensor mesh; a plain tensor is held whole). Replicated mesh dims hold
    copies, so their partials are divided by the copy count first. One collective per mesh."""
    out: list[Tensor | None] = [None] * len(parts)
    by_mesh: dict[tuple, list[int]] = {}
    for i, (vec, p) in enumerate(parts):
        if not isinstance(p, DTensor):
            out[i] = vec
            continue
        replicated = tuple(d for d, pl in enumerate(p.placements) if pl.is_replicate())
        by_mesh.setdefault((id(p.device_mesh), replicated), []).append(i)
    for (_, replicated), members in by_mesh.items():
        holder = parts[members[0]][1]
        assert isinstance(holder, DTensor)
        mesh = holder.device_mesh
        copies = math.prod(mesh.size(d) for d in replicated)
        flat = torch.cat([parts[i][0] for i in members]) / copies
        total = DTensor.from_local(flat, mesh, [Partial()] * mesh.ndim, run_check=False).full_tensor()
        for i, piece in zip(members, torch.split(total, [parts[i][0].numel() for i in members])):
            out[i] = piece
    return out  # type: ignore[return-value]


def _scales(sums: Tensor, counts: Tensor) -> Tensor:
    """RMS scales from chunk sums of squares (fp64) and element counts; 0 for empty chunks."""
    return torch.where(counts > 0, (sums / counts.clamp_min(1)).sqrt(), torch.zeros_like(sums)).to(torch.float32)


def _chunk_sums(values: Tensor, chunk: Tensor, size: int) -> Tensor:
    return torch.zeros(size, dtype=torch.float64, device=values.device).index_add_(0, chunk, values.double().square())


def _signed(values: Tensor, scales: Tensor, chunk: Tensor) -> Tensor:
    """The 1-bit code of ``values``: ``+scale`` where ``>= 0``, else ``-scale`` (its chunk's)."""
    return torch.where(values >= 0, 1.0, -1.0) * scales[chunk]


def compressed_average(
    momenta: list[Tensor],
    worker_errors: list[Tensor],
    server_errors: list[Tensor],
    params: list[Tensor],
    layouts: list[ParamLayout],
    group: CommGroup,
) -> None:
    """Replace each (flat, local) momentum by the compressed average over ``group`` of the
    replicas' momenta (collective over ``group`` and, for the scales, over each parameter's holders).
    ``worker_errors`` (flat, like the momenta) and ``server_errors`` (this rank's served elements)
    are updated in place."""
    n, me = group.size, group.rank
    errors = worker_errors

    # Worker: compress momentum + error with the unsharded chunk scales, send row r to replica r.
    xs = [(m.float() + e)[lay.order] for m, e, lay in zip(momenta, errors, layouts)]
    sums = sum_over_holders([(_chunk_sums(x, lay.slot, n * lay.k), p) for x, lay, p in zip(xs, layouts, params)])
    scales = [_scales(total, lay.chunk_counts.view(-1)) for total, lay in zip(sums, layouts)]
    for x, e, lay, sc in zip(xs, errors, layouts, scales):
        e[lay.order] = x - _signed(x, sc, lay.slot)
    row_bits = [pack_signs(torch.cat([lay.row_part(x, r) for x, lay in zip(xs, layouts)])) for r in range(n)]
    row_scales = [torch.cat([sc.view(n, lay.k)[r] for sc, lay in zip(scales, layouts)]) for r in range(n)]
    mine = row_bits[me].numel()
    recv_bits = torch.empty(n * mine, dtype=torch.uint8, device=xs[0].device if xs else None)
    recv_scales = torch.empty(n * row_scales[0].numel(), dtype=torch.float32, device=recv_bits.device)
    pending = [
        ops.all_to_all_single(
            recv_bits,
            torch.cat(row_bits),
            group,
            out_splits=[mine] * n,
            in_splits=[b.numel() for b in row_bits],
            async_op=True,
        ),
        ops.all_to_all_single(recv_scales, torch.cat(row_scales), group, async_op=True),
    ]
    for handle in pending:
        handle.wait()

    # Server: average the n copies of this rank's part of row ``me``, re-compress with the
    # unsharded scales and the server error, gather every row from its server.
    within = [lay.row_part(lay.chunk, me) for lay in layouts]
    served = [lay.counts[me] for lay in layouts]
    widths = [lay.k for lay in layouts]
    total = [torch.zeros(c, device=recv_bits.device) for c in served]
    for j in range(n):
        signs = torch.split(unpack_signs(recv_bits[j * mine : (j + 1) * mine], sum(served)), served)
        theirs = torch.split(recv_scales.view(n, -1)[j], widths)
        for t, sign, sc, w in zip(total, signs, theirs, within):
            t += sign * sc[w]
    ys = [t / n + e for t, e in zip(total, server_errors)]
    sums = sum_over_holders([(_chunk_sums(y, w, lay.k), p) for y, w, lay, p in zip(ys, within, layouts, params)])
    served_scales = [_scales(total, lay.chunk_counts[me]) for total, lay in zip(sums, layouts)]
    for y, w, sc, e in zip(ys, within, served_scales, server_errors):
        e.copy_(y - _signed(y, sc, w))
    widest = max(b.numel() for b in row_bits)
    my_bits = torch.nn.functional.pad(pack_signs(torch.cat(ys)), (0, widest - mine))
    all_bits = torch.empty(n * widest, dtype=torch.uint8, device=recv_bits.device)
    all_scales = torch.empty(n * recv_scales.numel() // n, dtype=torch.float32, device=recv_bits.device)
    pending = [
        ops.all_gather_into(all_bits, my_bits, group, async_op=True),
        ops.all_gather_into(all_scales, torch.cat(served_scales), group, async_op=True),
    ]
    for handle in pending:
        handle.wait()

    # Everyone decodes the same bytes: the averaged momentum, row by row, back in local order.
    decoded: list[list[Tensor]] = [[] for _ in params]
    for r in range(n):
        counts = [lay.counts[r] for lay in layouts]
        signs = torch.split(unpack_signs(all_bits[r * widest : (r + 1) * widest], sum(counts)), counts)
        theirs = torch.split(all_scales.view(n, -1)[r], widths)
        for out, sign, sc, lay in zip(decoded, signs, theirs, layouts):
            out.append(sign * sc[lay.row_part(lay.chunk, r)])
    for m, lay, parts in zip(momenta, layouts, decoded):
        m[lay.order] = torch.cat(parts).to(m.dtype)
