"""Ring attention: queries stay, key/value blocks travel one hop per step (zigzag layout).

Forward on rank ``r`` of ``P``: for ``s = 0 .. P-1`` the rank holds the K/V of rank ``r - s``.
Before computing with it, the rank posts the send of that block to ``r + 1`` and the receive of
the next one from ``r - 1`` (one batched P2P per step), so the hop runs under the block's compute.
Each block's ``(out, lse)`` is merged into fp32 accumulators (kernels.attention.merge_partial).

Causal masking with the zigzag layout (see layout.py; rank ``r`` owns chunks ``r`` and
``2P-1-r``) gives three kinds of block and never a partially masked off-diagonal one:

- ``s = 0`` (own K/V): the ordinary causal block;
- K/V from an earlier rank (``src < r``): every query sees the block's first chunk and none of
  its second — full-query, first-half-key, unmasked;
- K/V from a later rank (``src > r``): only the query's second chunk sees anything, and it sees
  the whole block — second-half-query, unmasked.

So every rank does ``1 + (P-1)/2`` causal-block equivalents of work: balanced. Without a causal
mask every block is full.

Backward: K/V travel the ring again, now with fp32 dK/dV accumulators beside them; a block's
gradient is computed with the *final* out/lse of the local queries
(kernels.attention.attention_backward), dQ accumulates at home, and each dK/dV accumulator has
visited every rank after ``P`` hops, arriving back at its owner.

Wire bytes per rank per layer: forward ``(P-1) |K+V|``; backward ``(P-1) |K+V| + P |dK+dV|``
(fp32), independent of how many query heads share a KV head (GQA K/V travel unexpanded).
"""

from __future__ import annotations

import torch

from meshweave.comm import ops
from meshweave.comm.ops import CommGroup
from meshweave.kernels.attention import accumulation_dtype, attention, attention_backward, merge_partial
from meshweave.parallel.context.blockwise import blockwise_function

Tensor = torch.Tensor


def _block(step: int, src: int, rank: int, causal: bool, seq: int) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal mask) of the block rank ``rank`` computes with ``src``'s K/V."""
    half = seq // 2
    if not causal:
        return slice(None), slice(None), False
    if step == 0:
        return slice(None), slice(None), True
    if src < rank:
        return slice(None), slice(0, half), False
    return slice(half, None), slice(None), False


def _pass_on(send: list[Tensor], recv_like: list[Tensor], group: CommGroup) -> tuple[list[Tensor], ops.Handle]:
    """Send ``send`` to the next rank and receive same-shaped tensors from the previous one."""
    recv = [torch.empty_like(t) for t in recv_like]
    nxt, prev = (group.rank + 1) % group.size, (group.rank - 1) % group.size
    handle = ops.exchange([(t, nxt) for t in send], [(t, prev) for t in recv], group)
    return recv, handle


def ring_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, group: CommGroup) -> tuple[Tensor, Tensor]:
    """Ring attention over ``group`` for local zigzag shards; returns ``(out, lse)`` (collective)."""
    rank, size = group.rank, group.size
    out: Tensor | None = None
    lse: Tensor | None = None
    kv = torch.cat([k, v], dim=2).contiguous()
    n_kv = k.shape[2]
    for step in range(size):
        if step < size - 1:
            (incoming,), handle = _pass_on([kv], [kv], group)
        src = (rank - step) % size
        rows, cols, masked = _block(step, src, rank, causal, q.shape[1])
        block_out, block_lse = attention(q[:, rows], kv[:, cols, :n_kv], kv[:, cols, n_kv:], masked)
        if rows == slice(None) or out is None or lse is None:  # step 0 sees every row
            out, lse = merge_partial(out, lse, block_out, block_lse)
        else:
            out[:, rows], lse[..., rows] = merge_partial(out[:, rows], lse[..., rows], block_out, block_lse)
        if step < size - 1:
            handle.wait()
            kv = incoming
    assert out is not None and lse is not None
    return out.to(q.dtype), lse


def ring_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, group: CommGroup
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`ring_forward` (collective); K/V and fp32 dK/dV travel the ring."""
    rank, size = group.rank, group.size
    if size == 1:
        return attention_backward(dout, q, k, v, out, lse, causal)
    acc = accumulation_dtype(q.dtype)
    dq = torch.zeros_like(q, dtype=acc)
    kv = torch.cat([k, v], dim=2).contiguous()
    n_kv = k.shape[2]
    dkv_in: Tensor | None = None
    dkv_handle: ops.Handle | None = None
    for step in range(size):
        if step < size - 1:
            (kv_next,), kv_handle = _pass_on([kv], [kv], group)
        src = (rank - step) % size
        rows, cols, masked = _block(step, src, rank, causal, q.shape[1])
        dq_b, dk_b, dv_b = attention_backward(
            dout[:, rows], q[:, rows], kv[:, cols, :n_kv], kv[:, cols, n_kv:], out[:, rows], lse[..., rows], masked
        )
        dq[:, rows] += dq_b
        if dkv_handle is not None and dkv_in is not None:
            dkv_handle.wait()
            dkv = dkv_in
        else:
            dkv = torch.zeros_like(kv, dtype=acc)
        dkv[:, cols] += torch.cat([dk_b, dv_b], dim=2)
        # This accumulator belongs to ``src``'s block; after P hops it is home.
        (dkv_in,), dkv_handle = _pass_on([dkv], [dkv], group)
        if step < size - 1:
            kv_handle.wait()
            kv = kv_next
    assert dkv_handle is not None and dkv_in is not None  # size > 1: at least one hop
    dkv_handle.wait()
    return dq.to(q.dtype), dkv_in[:, :, :n_kv].to(k.dtype), dkv_in[:, :, n_kv:].to(v.dtype)


RingAttention = blockwise_function("RingAttention", ring_forward, ring_backward)
