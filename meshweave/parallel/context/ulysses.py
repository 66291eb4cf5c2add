"""DeepSpeed-Ulysses: trade the sequence shard for a head shard, attend locally, trade back.

Each of ``U`` ranks holds ``[b, N/U, h, d]``. One all-to-all turns q, k and v (packed straight
into one send buffer, so one collective instead of DeepSpeed's three, and no more copies) into ``[b, N, h/U, d]`` — the full
sequence for ``h/U`` heads — then the ordinary local kernel runs, and a second all-to-all returns
the output to ``[b, N/U, h, d]``. Both all-to-alls are their own inverses' adjoints, so backward
is the same two exchanges in reverse. Per rank and layer that moves about ``4 N h d / U``
elements x (U-1)/U: constant when N and U grow together.

Grouped-query attention: rank ``u`` gets query heads ``[u h/U, (u+1) h/U)``, which use KV heads
``[u h_kv/U, ...)`` when ``U`` divides ``h_kv``. When ``U > h_kv`` each KV head is repeated
``U / h_kv`` times first, so every rank receives the one KV head its query heads read — a KV
group is never torn apart. Other degrees raise :class:`UlyssesError` naming the workable ones.
"""

from __future__ import annotations

import torch

from meshweave.comm import ops
from meshweave.comm.ops import CommGroup
from meshweave.kernels.attention import attention

Tensor = torch.Tensor


class UlyssesError(ValueError):
    """Head counts that the Ulysses degree cannot split."""


def check_heads(n_heads: int, n_kv_heads: int, degree: int) -> None:
    """Raise :class:`UlyssesError` unless ``degree`` ranks can split these (local) head counts."""
    if n_heads % degree:
        ok = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
        raise UlyssesError(f"Ulysses degree {degree} does not divide the {n_heads} attention heads "
                           f"(per tensor-parallel rank); choose one of {ok}")
    if n_kv_heads % degree and degree % n_kv_heads:
        raise UlyssesError(f"Ulysses degree {degree} neither divides nor is a multiple of the {n_kv_heads} "
                           "KV heads, so a KV group would be split across ranks")


def _exchange(x: Tensor, group: CommGroup) -> Tensor:
    """All-to-all of ``x`` ``[U, ...]``: slice ``i`` goes to rank ``i``; slot ``i`` comes from rank ``i``."""
    x = x.contiguous()
    out = torch.empty_like(x)
    ops.all_to_all_single(out, x, group)
    return out


def seq_to_heads(x: Tensor, group: CommGroup) -> Tensor:
    """``[b, s, h, d]`` sequence shard -> ``[b, U s, h/U, d]`` head shard (collective)."""
    b, s, h, d = x.shape
    size = group.size
    parts = _exchange(x.reshape(b, s, size, h // size, d).permute(2, 0, 1, 3, 4), group)
    return parts.permute(1, 0, 2, 3, 4).reshape(b, size * s, h // size, d)


def heads_to_seq(x: Tensor, group: CommGroup) -> Tensor:
    """Inverse of :func:`seq_to_heads`: ``[b, U s, h/U, d]`` -> ``[b, s, h, d]`` (collective)."""
    b, full, hu, d = x.shape
    size = group.size
    parts = _exchange(x.reshape(b, size, full // size, hu, d).permute(1, 0, 2, 3, 4), group)
    return parts.permute(1, 2, 0, 3, 4).reshape(b, full // size, size * hu, d)


def _send_buffer(parts: list[Tensor], size: int, seq_major: bool) -> Tensor:
    """Pieces -> one contiguous all-to-all buffer ``[U, b, s, sum h_i/U, d]`` (slot j -> rank j),
    in a single copy. ``seq_major``: pieces are ``[b, s, h_i, d]`` (split heads); else
    ``[b, U s, h_i/U, d]`` (split the sequence)."""
    b, d = parts[0].shape[0], parts[0].shape[3]
    if seq_major:
        return torch.cat([t.reshape(b, t.shape[1], size, -1, d).permute(2, 0, 1, 3, 4) for t in parts], dim=3)
    return torch.cat([t.reshape(b, size, t.shape[1] // size, -1, d).permute(1, 0, 2, 3, 4) for t in parts], dim=3)


class _ScatterHeads(torch.autograd.Function):
    """q, k, v sequence shards -> full-sequence head shards in one all-to-all, with one copy on
    each side of it (backward mirrors it): as few copies as DeepSpeed's, a third of its launches."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, group: CommGroup):
        size = group.size
        ctx.group, ctx.split = group, [t.shape[2] // size for t in (q, k, v)]
        send = _send_buffer([q, k, v], size, seq_major=True)
        recv = torch.empty_like(send)
        ops.all_to_all_single(recv, send, group)
        b, s, d = q.shape[0], q.shape[1], q.shape[3]
        # slot j holds rank j's rows: [U, b, s, h_i/U, d] -> [b, U s, h_i/U, d]
        return tuple(part.permute(1, 0, 2, 3, 4).reshape(b, size * s, part.shape[3], d)
                     for part in recv.split(ctx.split, dim=3))

    @staticmethod
    def backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor):
        group, size = ctx.group, ctx.group.size
        send = _send_buffer([dq, dk, dv], size, seq_major=False)
        recv = torch.empty_like(send)
        ops.all_to_all_single(recv, send, group)
        b, s, d = dq.shape[0], dq.shape[1] // size, dq.shape[3]
        # slot j holds head group j of this rank's rows: [U, b, s, h_i/U, d] -> [b, s, h_i, d]
        grads = tuple(part.permute(1, 2, 0, 3, 4).reshape(b, s, size * part.shape[3], d)
                      for part in recv.split(ctx.split, dim=3))
        return (*grads, None)


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: CommGroup) -> Tensor:
        ctx.group = group
        return heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return seq_to_heads(grad, ctx.group), None


def scatter_heads(q: Tensor, k: Tensor, v: Tensor, group: CommGroup) -> tuple[Tensor, Tensor, Tensor]:
    """Sequence-sharded q/k/v -> full-sequence head shards with one all-to-all (differentiable)."""
    size = group.size
    check_heads(q.shape[2], k.shape[2], size)
    if k.shape[2] < size:
        repeat = size // k.shape[2]
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    return _ScatterHeads.apply(q, k, v, group)


def gather_heads(out: Tensor, group: CommGroup) -> Tensor:
    """Full-sequence head-shard output -> sequence-sharded output with all heads (differentiable)."""
    return _HeadsToSeq.apply(out, group)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, group: CommGroup,
                      inner=None) -> Tensor:
    """Ulysses attention over ``group`` for contiguous sequence shards; returns the local output.

    ``inner(q, k, v, causal) -> out`` runs on the gathered full-sequence head shards (the local
    kernel by default; the hybrid method passes ring / TokenRing attention). Collective.
    """
    qh, kh, vh = scatter_heads(q, k, v, group)
    out = inner(qh, kh, vh, causal) if inner is not None else attention(qh, kh, vh, causal)[0]
    return gather_heads(out, group)
