"""DeepSpeed-Ulysses: trade the sequence shard for a head shard, attend locally, trade back.

Each of ``U`` ranks holds ``[b, N/U, h, d]``. One all-to-all turns q, k and v (packed straight
into one send buffer, so one collective instead of DeepSpeed's three, and no more copies) into
``[b, N, h/U, d]`` — the full sequence for ``h/U`` heads — then the ordinary local kernel runs,
and a second all-to-all returns the output to ``[b, N/U, h, d]``. Both all-to-alls are their own
inverses' adjoints, so backward is the same two exchanges in reverse. Per rank and layer that
moves about ``4 N h d / U`` elements x (U-1)/U: constant when N and U grow together.

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
        raise UlyssesError(
            f"Ulysses degree {degree} does not divide the {n_heads} attention heads "
            f"(per tensor-parallel rank); choose one of {ok}"
        )
    if n_kv_heads % degree and degree % n_kv_heads:
        raise UlyssesError(
            f"Ulysses degree {degree} neither divides nor is a multiple of the {n_kv_heads} "
            "KV heads, so a KV group would be split across ranks"
        )


def _exchange_heads(parts: tuple[Tensor, ...], group: CommGroup, to_heads: bool) -> tuple[Tensor, ...]:
    """One all-to-all moving every piece between layouts, with one copy on each side of it.

    ``to_heads``: sequence shards ``[b, s, h_i, d]`` -> full-sequence head shards
    ``[b, U s, h_i/U, d]``; otherwise the inverse. Collective over ``group``.
    """
    size = group.size
    b, d = parts[0].shape[0], parts[0].shape[3]
    if to_heads:
        send = torch.cat([t.reshape(b, t.shape[1], size, -1, d).permute(2, 0, 1, 3, 4) for t in parts], dim=3)
    else:
        send = torch.cat([t.reshape(b, size, t.shape[1] // size, -1, d).permute(1, 0, 2, 3, 4) for t in parts], dim=3)
    recv = torch.empty_like(send)  # [U, b, s_local, sum h_i/U, d]; slot j comes from rank j
    ops.all_to_all_single(recv, send, group)
    chunks = recv.split([t.shape[2] // size if to_heads else t.shape[2] for t in parts], dim=3)
    s = recv.shape[2]
    if to_heads:  # slot j holds rank j's rows
        return tuple(c.permute(1, 0, 2, 3, 4).reshape(b, size * s, c.shape[3], d) for c in chunks)
    return tuple(c.permute(1, 2, 0, 3, 4).reshape(b, s, size * c.shape[3], d) for c in chunks)  # slot j: head group j


class _HeadExchange(torch.autograd.Function):
    """:func:`_exchange_heads` with autograd: the backward is the exchange the other way. One
    collective for q, k and v together (DeepSpeed issues three), as few copies as DeepSpeed."""

    @staticmethod
    def forward(ctx, to_heads: bool, group: CommGroup, *parts: Tensor):
        ctx.to_heads, ctx.group = to_heads, group
        return _exchange_heads(parts, group, to_heads)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        return (None, None, *_exchange_heads(grads, ctx.group, not ctx.to_heads))


def scatter_heads(q: Tensor, k: Tensor, v: Tensor, group: CommGroup) -> tuple[Tensor, Tensor, Tensor]:
    """Sequence-sharded q/k/v -> full-sequence head shards with one all-to-all (differentiable)."""
    size = group.size
    check_heads(q.shape[2], k.shape[2], size)
    if k.shape[2] < size:
        repeat = size // k.shape[2]
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    return _HeadExchange.apply(True, group, q, k, v)


def gather_heads(out: Tensor, group: CommGroup) -> Tensor:
    """Full-sequence head-shard output -> sequence-sharded output with all heads (differentiable)."""
    return _HeadExchange.apply(False, group, out)[0]


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    group: CommGroup,
    inner=None,
    documents: Tensor | None = None,
) -> Tensor:
    """Ulysses attention over ``group`` for contiguous sequence shards; returns the local output.

    ``inner(q, k, v, causal, documents) -> out`` runs on the gathered full-sequence head shards
    (the local kernel by default; the hybrid method passes ring / TokenRing attention).
    ``documents`` ``[b, N]``: document ids of the whole sequence, held by every rank (no bytes
    travel for them); the local kernel masks the gathered sequence with them, an ``inner`` gets
    them as they are. Collective.
    """
    qh, kh, vh = scatter_heads(q, k, v, group)
    if inner is not None:
        out = inner(qh, kh, vh, causal, documents)
    else:
        out = attention(qh, kh, vh, causal, q_docs=documents, k_docs=documents)[0]
    return gather_heads(out, group)
