"""TokenRing: keys and values stay; queries go straight from their owner and partial results straight home.

Forward on rank ``r`` of ``P`` (zigzag layout, layout.py): step ``s = 0 .. P-1`` computes the block
``attention(q_o, K_r, V_r)`` for the queries of owner ``o = r + s`` (mod P) — its own at step 0.
At step ``s`` rank ``r`` receives ``o``'s queries directly from ``o``, which sends its own queries
to ``r = o - s`` in the same step; step ``s+1``'s transfer is posted before step ``s`` is computed,
so it runs under that compute. The block's partial ``(out, lse)`` goes straight back to ``o``,
which merges it in fp32 (kernels.attention.merge_partial) when it arrives — one step later, under
the next block's compute. P compute steps, P-1 query transfers, P-1 result returns.

Causal balance with halves of Q (blockwise.BlockPlan). With the zigzag layout a block whose K/V
rank is below the owner (``r < o``) involves all of ``q_o`` and the first half of ``K_r``; one
whose K/V rank is above (``r > o``) involves only the second half of ``q_o``. The owner sends
exactly the rows the receiver needs and only half-size results come back from ranks above it.
Without a causal mask every block is whole. With ``documents`` an empty block — no query sharing
a document with a visible key — is skipped on both ends: the owner sends no queries, the holder
computes nothing and returns nothing, and the owner expects nothing (the same pure function of
the ids decides on every rank, see blockwise.py). A non-empty block moves only the query rows that
share a document with one of the holder's keys, and their results back.

Why straight from the owner rather than one hop down the ring per step (the published TokenRing):
a hop-by-hop chain must carry a query block through every rank on its way, so a rank whose block
is empty could not drop it; a direct send skips exactly the empty blocks. The owner sends the same
rows the last hop would have, so the dense total is unchanged (only which rank sends them moves).

Backward (not in the public TokenRing, which is forward-only). K/V still stay put. What travels is
each owner's *query package* — ``q``, ``dout``, ``out`` (final) and ``lse`` (final) of its rows,
halved exactly like the forward's queries. Rank ``r`` computes the block gradient against its own
K/V with kernels.attention.attention_backward (the final out/lse make blocks independent), adds
dK/dV to **local** fp32 accumulators — they never travel — and returns the block's dQ straight to
the owner, who accumulates it in fp32.

Wire bytes per rank ``o`` per layer (``|x|`` this rank's shard of x; a block ``(o, r)`` with ``r``
above ``o`` is halved when causal): forward, for every other rank ``r`` whose block of ``o``'s
queries is non-empty, ``o``'s (halved) ``|Q|`` to ``r``, and for every non-empty block of another
rank's queries it computed, that block's ``|out| + |lse|`` — with documents, only the rows of the
trimmed blocks; backward the same with ``(q, dout, out, lse)`` packages and ``|dQ|`` returns.
Dense: ``(P-1)`` of each, halved for the ``P-1-o`` ranks above (queries) / the blocks of owners
below (results); ``3(P-1)/4`` on average. With
grouped-query attention |Q| = g |K| and TokenRing moves about g times what the ring moves
(bench/cp_attention.py reports both).

Every pair of ranks exchanges queries once per direction and results after them; all ranks post
their batches in the same order (query transfers of step ``s+1``, then result returns of step
``s``), so sends and receives pair up in posting order on NCCL and gloo alike. Both kinds of
message go ``s`` ranks away: TokenRing wants a link between every pair of ranks (fully connected
NVLink/NVSwitch domains), not a physical ring.
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


def _seq_dim(t: Tensor) -> int:
    """The sequence dimension of ``t``: 1 for ``[b, s, h, d]``, 2 for an lse ``[b, h, s]``."""
    return 1 if t.dim() == 4 else 2


def _rows(t: Tensor, rows: slice | Tensor) -> Tensor:
    """Sequence rows ``rows`` of ``t`` (``[b, s, ...]``, or an lse ``[b, h, s]``)."""
    return t[:, rows] if _seq_dim(t) == 1 else t[:, :, rows]


class _Schedule:
    """The P2P batches of one call: who sends whose queries to whom at each step, and the results back."""

    def __init__(self, group: CommGroup, plan: BlockPlan) -> None:
        self.group, self.plan = group, plan
        self.rank, self.size = group.rank, group.size

    def owner(self, step: int) -> int:
        return (self.rank + step) % self.size

    def source(self, step: int) -> int:
        return (self.rank - step) % self.size

    def fetch_queries(self, step: int, package: list[Tensor]) -> tuple[list[Tensor] | None, ops.Handle]:
        """Post step ``step``'s transfer: our package's rows to ``rank - step`` (which computes our
        queries against its K/V then; nothing if that block is empty) and the receive of the rows of
        ``rank + step``'s we need (None if our block of them is empty)."""
        plan, rank, receiver, owner = self.plan, self.rank, self.source(step), self.owner(step)
        sends = []
        if plan.visible(rank, receiver):
            sends = [(_rows(t, plan.rows(rank, receiver)).contiguous(), receiver) for t in package]
        recvs = None
        if plan.visible(owner, rank):
            recvs = [recv_buffer(t, plan.rows(owner, rank), _seq_dim(t)) for t in package]
        return recvs, ops.exchange(sends, [(t, owner) for t in recvs or []], self.group)

    def return_results(self, step: int, results: list[Tensor] | None, like: list[Tensor]):
        """Post step ``step``'s returns: ``results`` (our block of ``rank + step``'s queries, None if
        empty) to their owner, and the receive of ours from ``rank - step`` (None if that block is
        empty), shaped like the rows of ``like`` it computed. Returns (buffers, handle, rows)."""
        plan, rank, source = self.plan, self.rank, self.source(step)
        sends = [(t.contiguous(), self.owner(step)) for t in results] if results is not None else []
        rows = plan.rows(rank, source)
        recvs = [recv_buffer(t, rows, _seq_dim(t)) for t in like] if plan.visible(rank, source) else None
        return recvs, ops.exchange(sends, [(t, source) for t in recvs or []], self.group), rows


def tokenring_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, group: CommGroup, documents: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """TokenRing attention over ``group`` for local zigzag shards; returns ``(out, lse)`` (collective).

    ``documents``: ids ``[b, P * s]`` of the group's whole sequence (same on every rank), or None.
    """
    rank, size = group.rank, group.size
    plan = block_plan(documents, size, causal, q.shape[1])
    sched = _Schedule(group, plan)
    queries = [q.contiguous()]
    pending = sched.fetch_queries(1, queries) if size > 1 else None
    out, lse = own_block(attention, q, k, v, plan, rank)
    returning = None
    for step in range(1, size):
        assert pending is not None
        incoming, handle = pending
        pending = sched.fetch_queries(step + 1, queries) if step + 1 < size else None
        handle.wait()
        results = None
        if incoming is not None:
            owner = sched.owner(step)
            cols = plan.cols(owner, rank)
            results = list(attention(incoming[0], k[:, cols], v[:, cols], False, **plan.kernel_args(owner, rank)))
        returned = sched.return_results(step, results, [q, lse])
        if returning is not None:  # the previous step's results, which arrived under this block
            out, lse = _merge_returned(out, lse, returning)
        returning = returned
    if returning is not None:
        out, lse = _merge_returned(out, lse, returning)
    return out.to(q.dtype), lse


def _merge_returned(out: Tensor, lse: Tensor, returning) -> tuple[Tensor, Tensor]:
    results, handle, rows = returning
    handle.wait()
    if results is not None:
        block_out, block_lse = results
        out[:, rows], lse[..., rows] = merge_partial(out[:, rows], lse[..., rows], block_out, block_lse)
    return out, lse


def tokenring_backward(
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
    """Gradients of :func:`tokenring_forward` (collective): query packages travel, dK/dV stay local."""
    rank, size = group.rank, group.size
    plan = block_plan(documents, size, causal, q.shape[1])
    sched = _Schedule(group, plan)
    package = [torch.cat([q, dout.to(q.dtype), out.to(q.dtype)], dim=2).contiguous(), lse.contiguous()]
    heads = q.shape[2]
    pending = sched.fetch_queries(1, package) if size > 1 else None
    dq, dk, dv = own_block_backward(attention_backward, dout, q, k, v, out, lse, plan, rank)
    returning = None
    for step in range(1, size):
        assert pending is not None
        incoming, handle = pending
        pending = sched.fetch_queries(step + 1, package) if step + 1 < size else None
        handle.wait()
        results = None
        if incoming is not None:
            owner = sched.owner(step)
            cols = plan.cols(owner, rank)
            held, held_lse = incoming
            q_o, dout_o, out_o = held.split(heads, dim=2)
            dq_b, dk_b, dv_b = attention_backward(
                dout_o, q_o, k[:, cols], v[:, cols], out_o, held_lse, False, **plan.kernel_args(owner, rank)
            )
            dk[:, cols] += dk_b
            dv[:, cols] += dv_b
            results = [dq_b]
        returned = sched.return_results(step, results, [q])
        if returning is not None:  # the previous step's dQ, which arrived under this block
            _add_returned(dq, returning)
        returning = returned
    if returning is not None:
        _add_returned(dq, returning)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _add_returned(dq: Tensor, returning) -> None:
    results, handle, rows = returning
    handle.wait()
    if results is not None:
        dq[:, rows] += results[0]


TokenRingAttention = blockwise_function("TokenRingAttention", tokenring_forward, tokenring_backward)
