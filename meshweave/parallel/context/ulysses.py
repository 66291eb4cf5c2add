"""DeepSpeed-Ulysses: trade the sequence shard for a head shard, attend locally, trade back.

Each of ``U`` ranks holds ``[b, N/U, h, d]``. One all-to-all turns q, k and v (packed into one
buffer, so one collective instead of DeepSpeed's three) into ``[b, N, h/U, d]`` — the full
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


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: CommGroup) -> Tensor:
        ctx.group = group
        return seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return heads_to_seq(grad, ctx.group), None


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
    b, s, h, d = q.shape
    h_kv = k.shape[2]
    # Interleave per destination so one all-to-all carries q, k and v: [b, s, U, (h+2h_kv)/U, d].
    packed = torch.cat([t.reshape(b, s, size, -1, d) for t in (q, k, v)], dim=3).reshape(b, s, -1, d)
    gathered = _SeqToHeads.apply(packed, group)
    return gathered.split([h // size, h_kv // size, h_kv // size], dim=2)


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
