"""Ring attention: queries stay, each rank's K/V go straight to the ranks that need them (zigzag layout).

Forward on rank ``r`` of ``P``: step ``s = 0 .. P-1`` computes the block of the K/V of
``src = r - s`` (mod P) — its own at step 0. At step ``s`` rank ``r`` receives ``src``'s K/V
directly from ``src``, which sends its own K/V to ``r + s`` in the same step. Step ``s+1``'s
transfer is posted (one batched P2P) before step ``s`` is computed, so it runs under that compute.
Each block's ``(out, lse)`` is merged into fp32 accumulators (kernels.attention.merge_partial).

Which rows of a block take part, and whether it is empty, is blockwise.BlockPlan (zigzag halving,
documents): causal, a rank above ``src`` needs only the first half of ``src``'s K/V (every query
sees ``src``'s first chunk, none its second), a rank below needs all of it for its second-half
queries. The sender sends exactly those rows, so every rank does ``1 + (P-1)/2`` causal-block
equivalents of work (balanced) and moves no key nobody reads. Without a causal mask every block is
whole. With ``documents`` an empty block — no query sharing a document with a visible key — is
skipped on both ends: no compute, no K/V sent, no gradient returned; a non-empty one moves only
the K/V rows of keys that share a document with one of the reader's queries (and computes only
those queries), and returns only their dK/dV.

Why K/V go straight from their owner instead of hopping round the ring: in the zigzag layout
rank ``r``'s K/V are needed at ``r + 1`` and at ``r - 1``, i.e. all the way round, so a hop-by-hop
ring cannot drop a block that one rank skips; a direct send can. The P2P batches need a link
between every pair of ranks (one step's sends go ``s`` ranks away), like TokenRing's results.

Backward: the same K/V transfers again; each block's gradient is computed with the *final* out/lse
of the local queries (kernels.attention.attention_backward), dQ accumulates at home, and the
block's dK/dV (in the kernel's output dtype: exactly what it computed) go straight home to ``src``
one step later, under the next block's compute, where they are summed in fp32.

Wire bytes per rank ``r`` per layer, ``|X|`` this rank's shard of X (K/V with their own, unexpanded,
heads: independent of grouped-query sharing):

- not causal: forward ``(P-1) |K+V|``; backward ``(P-1) |K+V| + (P-1) |dK+dV|``;
- causal, dense: forward ``(r + (P-1-r)/2) |K+V|`` (whole to the ``r`` ranks below, the first
  half to the ``P-1-r`` above; ``3(P-1)/4 |K+V|`` on average); backward that again plus
  ``(P-1-r + r/2) |dK+dV|`` (whole for the K/V of ranks above ``r``, half for those below), which
  is ``3(P-1)/2 |K+V|`` on every rank (``|dK+dV| = |K+V|``);
- with documents: for each other rank, the K/V rows it reads (forward, and again in backward)
  plus, in backward, the dK/dV rows of the keys this rank read from it; nothing for empty blocks.

Every pair of ranks exchanges its K/V once per direction, and backward's dK/dV of a block travel
after that block's K/V; all ranks post their batches in the same order (the transfers of step
``s+1``, then the gradient returns of step ``s``), so sends and receives pair up in posting order
on NCCL and gloo alike.
"""

from __future__ import annotations

import torch

from meshweave.comm import ops
from meshweave.comm.ops import CommGroup
from meshweave.kernels.attention import attention, attention_backward, merge_partial
from meshweave.parallel.context.blockwise import (
    BlockPlan,
    block_plan,
    blockwise_function,
    own_block,
    own_block_backward,
    recv_buffer,
)

Tensor = torch.Tensor


def _fetch_kv(step: int, kv: Tensor, plan: BlockPlan, group: CommGroup) -> tuple[Tensor | None, ops.Handle]:
    """Post step ``step``'s transfer: our K/V rows to ``rank + step`` (if its block is non-empty),
    and the receive of ``rank - step``'s (None if our block of it is empty)."""
    rank, size = group.rank, group.size
    dst, src = (rank + step) % size, (rank - step) % size
    sends = [(kv[:, plan.cols(dst, rank)].contiguous(), dst)] if plan.visible(dst, rank) else []
    incoming = None
    if plan.visible(rank, src):
        incoming = recv_buffer(kv, plan.cols(rank, src))
    return incoming, ops.exchange(sends, [(incoming, src)] if incoming is not None else [], group)


def ring_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, group: CommGroup, documents: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Ring attention over ``group`` for local zigzag shards; returns ``(out, lse)`` (collective).

    ``documents``: ids ``[b, P * s]`` of the group's whole sequence (same on every rank), or None.
    """
    rank, size = group.rank, group.size
    plan = block_plan(documents, size, causal, q.shape[1])
    kv = torch.cat([k, v], dim=2).contiguous()
    n_kv = k.shape[2]
    pending = _fetch_kv(1, kv, plan, group) if size > 1 else None
    out, lse = own_block(attention, q, k, v, plan, rank)
    for step in range(1, size):
        assert pending is not None
        incoming, handle = pending
        pending = _fetch_kv(step + 1, kv, plan, group) if step + 1 < size else None
        handle.wait()
        if incoming is None:  # empty block: nothing came, nothing to compute
            continue
        src = (rank - step) % size
        rows = plan.rows(rank, src)
        block_out, block_lse = attention(
            q[:, rows], incoming[:, :, :n_kv], incoming[:, :, n_kv:], False, **plan.kernel_args(rank, src)
        )
        out[:, rows], lse[..., rows] = merge_partial(out[:, rows], lse[..., rows], block_out, block_lse)
    return out.to(q.dtype), lse


def _return_dkv(step: int, dkv: Tensor | None, kv: Tensor, plan: BlockPlan, group: CommGroup):
    """Post step ``step``'s gradient return: ``dkv`` (our block of ``rank - step``'s K/V, None if
    empty) to its owner, and the receive of ours from ``rank + step`` (None if that block is empty)."""
    rank, size = group.rank, group.size
    dst, src = (rank + step) % size, (rank - step) % size
    sends = [(dkv.contiguous(), src)] if dkv is not None else []
    incoming = recv_buffer(kv, plan.cols(dst, rank)) if plan.visible(dst, rank) else None
    handle = ops.exchange(sends, [(incoming, dst)] if incoming is not None else [], group)
    return incoming, handle, plan.cols(dst, rank)


def ring_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    group: CommGroup,
    documents: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`ring_forward` (collective): K/V come straight from their owners again and
    each block's dK/dV go straight home."""
    rank, size = group.rank, group.size
    plan = block_plan(documents, size, causal, q.shape[1])
    if size == 1:
        dq, dk, dv = own_block_backward(attention_backward, dout, q, k, v, out, lse, plan, 0)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    kv = torch.cat([k, v], dim=2).contiguous()
    n_kv = k.shape[2]
    pending: tuple[Tensor | None, ops.Handle] | None = _fetch_kv(1, kv, plan, group)
    dq, dk_own, dv_own = own_block_backward(attention_backward, dout, q, k, v, out, lse, plan, rank)
    dkv = torch.cat([dk_own, dv_own], dim=2)
    returning = None
    for step in range(1, size):
        assert pending is not None
        incoming, handle = pending
        pending = _fetch_kv(step + 1, kv, plan, group) if step + 1 < size else None
        handle.wait()
        dkv_block = None
        if incoming is not None:
            src = (rank - step) % size
            rows = plan.rows(rank, src)
            dq_b, dk_b, dv_b = attention_backward(
                dout[:, rows],
                q[:, rows],
                incoming[:, :, :n_kv],
                incoming[:, :, n_kv:],
                out[:, rows],
                lse[..., rows],
                False,
                **plan.kernel_args(rank, src),
            )
            dq[:, rows] += dq_b
            dkv_block = torch.cat([dk_b, dv_b], dim=2)
        returned = _return_dkv(step, dkv_block, kv, plan, group)
        if returning is not None:  # the previous step's return, which ran under this block
            _add_returned(dkv, returning)
        returning = returned
    assert returning is not None
    _add_returned(dkv, returning)
    return dq.to(q.dtype), dkv[:, :, :n_kv].to(k.dtype), dkv[:, :, n_kv:].to(v.dtype)


def _add_returned(dkv: Tensor, returning) -> None:
    incoming, handle, cols = returning
    handle.wait()
    if incoming is not None:
        dkv[:, cols] += incoming


RingAttention = blockwise_function("RingAttention", ring_forward, ring_backward)
