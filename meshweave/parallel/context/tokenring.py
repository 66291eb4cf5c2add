"""TokenRing: keys and values stay; queries travel one way and partial results go straight home.

Forward on rank ``r`` of ``P`` (zigzag layout, layout.py): at step ``s`` the rank holds the
queries of owner ``o = r + s`` (mod P). It posts the pass of those queries to ``r - 1`` (and the
receive of owner ``o + 1``'s from ``r + 1``), computes the block ``attention(q_o, K_r, V_r)``,
and sends the partial ``(out, lse)`` straight back to ``o``, which merges it in fp32
(kernels.attention.merge_partial) when it arrives — one step later, under the next block's
compute. Queries flow one way round the ring while results flow to their owners, so both
directions of the links carry traffic. P compute steps, P-1 query hops, P-1 result returns.

Causal balance with halves of Q. With the zigzag layout a block whose K/V come from an earlier
rank (``r < o``) involves all of ``q_o`` and the first half of ``K_r``; one whose K/V come from a
later rank (``r > o``) involves only the second half of ``q_o``. Queries travel *downwards*
(``r - 1``), so a query block first visits the ranks below its owner (full Q needed) and, after
wrapping from rank 0 to rank P-1, only ranks above it (half Q needed): from the wrap on only the
second half is sent, and only half-size results come back. Without a causal mask every block
is full and nothing is halved.

Backward (not in the public TokenRing, which is forward-only). The same movement, reversed in
nothing: K/V still stay put. What travels is each owner's *query package* — ``q``, ``dout``,
``out`` (final) and ``lse`` (final) of its rows, halved exactly like the forward's queries. Rank
``r`` computes the block gradient against its own K/V with kernels.attention.attention_backward
(the final out/lse make blocks independent), adds dK/dV to **local** fp32 accumulators — they
never travel, unlike ring attention's — and returns the block's dQ straight to the owner, who
accumulates it in fp32. So backward moves ``(P-1)`` query packages (3 x |Q| + lse) one hop and
``(P-1)`` dQ blocks home; ring attention moves ``(P-1)`` K/V blocks and ``P`` fp32 dK/dV blocks.
Which is cheaper depends on the shape: with grouped-query attention |Q| = g |K| and TokenRing
moves about g times more than the ring (bench/cp_attention.py reports both).

Result routing needs a link between every pair of ranks (one step's sends go ``s`` ranks away):
right for fully connected NVLink/NVSwitch domains, not for a physical ring.
"""

from __future__ import annotations

import torch

from meshweave.comm import ops
from meshweave.comm.ops import CommGroup
from meshweave.kernels.attention import accumulation_dtype, attention, attention_backward, merge_partial
from meshweave.parallel.context.blockwise import blockwise_function

Tensor = torch.Tensor


def _halved(owner: int, rank: int, causal: bool) -> bool:
    """Whether ``rank`` needs only the second half of ``owner``'s queries (causal, K/V later)."""
    return causal and rank > owner


def _block(step: int, owner: int, rank: int, causal: bool, seq: int) -> tuple[slice, bool]:
    """(key rows, causal mask) of the block ``rank`` computes for ``owner``'s (possibly halved) queries."""
    if not causal:
        return slice(None), False
    if step == 0:
        return slice(None), True
    if rank < owner:
        return slice(0, seq // 2), False
    return slice(None), False


def _row_slice(halved: bool, seq: int) -> slice:
    return slice(seq // 2, None) if halved else slice(None)


class _Schedule:
    """Who holds whose queries at each step, and the P2P batches that move them and their results."""

    def __init__(self, group: CommGroup, causal: bool, seq: int) -> None:
        self.group, self.causal, self.seq = group, causal, seq
        self.rank, self.size = group.rank, group.size

    def owner(self, step: int) -> int:
        return (self.rank + step) % self.size

    def pass_queries(self, step: int, package: list[Tensor]) -> tuple[list[Tensor], ops.Handle]:
        """Send the package of step ``step`` down the ring; receive step ``step + 1``'s from above.

        The receiver needs a halved package iff it is above the next owner; the sender cuts
        its package accordingly (it only ever holds at least what the receiver needs).
        """
        rank, size = self.rank, self.size
        below = (rank - 1) % size
        held_half = _halved(self.owner(step), rank, self.causal)
        send_half = _halved(self.owner(step), below, self.causal)
        recv_half = _halved(self.owner(step + 1), rank, self.causal)
        sends = [_rows(t, send_half, self.seq, held_half).contiguous() for t in package]
        recvs = [_empty_rows(t, recv_half, self.seq, held_half) for t in package]
        return recvs, ops.exchange([(t, below) for t in sends], [(t, (rank + 1) % size) for t in recvs], self.group)

    def return_results(self, step: int, results: list[Tensor], like: list[Tensor]) -> tuple[list[Tensor], ops.Handle]:
        """Send this step's block results to their owner; receive ours from the rank holding our queries."""
        rank, size = self.rank, self.size
        source = (rank - step) % size
        halved = _halved(rank, source, self.causal)
        recvs = [_empty_rows(t, halved, self.seq) for t in like]
        handle = ops.exchange(
            [(t.contiguous(), self.owner(step)) for t in results], [(t, source) for t in recvs], self.group
        )
        return recvs, handle


def _rows(t: Tensor, halved: bool, seq: int, already: bool = False) -> Tensor:
    """A view of the second half of ``t``'s sequence rows when ``halved`` (``t`` is ``[b, s, ...]``
    or an lse ``[b, h, s]``); ``already`` means ``t`` holds only the second half already."""
    if not halved or already:
        return t
    return t.narrow(1 if t.dim() == 4 else 2, seq // 2, seq - seq // 2)


def _empty_rows(t: Tensor, halved: bool, seq: int, already: bool = False) -> Tensor:
    """An uninitialised receive buffer shaped like :func:`_rows` of ``t`` (no copy of ``t``)."""
    return torch.empty(_rows(t, halved, seq, already).shape, dtype=t.dtype, device=t.device)


def tokenring_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, group: CommGroup) -> tuple[Tensor, Tensor]:
    """TokenRing attention over ``group`` for local zigzag shards; returns ``(out, lse)`` (collective)."""
    seq, size = q.shape[1], group.size
    plan = _Schedule(group, causal, seq)
    out: Tensor | None = None
    lse: Tensor | None = None
    held = q.contiguous()
    pending: tuple[list[Tensor], ops.Handle, int] | None = None
    for step in range(size):
        owner = plan.owner(step)
        if step < size - 1:
            (incoming,), q_handle = plan.pass_queries(step, [held])
        cols, masked = _block(step, owner, plan.rank, causal, seq)
        block_out, block_lse = attention(held, k[:, cols], v[:, cols], masked)
        if step == 0 or out is None or lse is None:
            out, lse = merge_partial(None, None, block_out, block_lse)
        else:
            returned = plan.return_results(step, [block_out, block_lse], [q, lse])
        if pending is not None:
            out, lse = _merge_returned(out, lse, pending, plan)
        pending = (*returned, step) if step > 0 else None
        if step < size - 1:
            q_handle.wait()
            held = incoming
    assert out is not None and lse is not None
    if pending is not None:
        out, lse = _merge_returned(out, lse, pending, plan)
    return out.to(q.dtype), lse


def _merge_returned(out: Tensor, lse: Tensor, pending, plan: _Schedule) -> tuple[Tensor, Tensor]:
    (block_out, block_lse), handle, step = pending
    handle.wait()
    source = (plan.rank - step) % plan.size
    rows = _row_slice(_halved(plan.rank, source, plan.causal), plan.seq)
    out[:, rows], lse[..., rows] = merge_partial(out[:, rows], lse[..., rows], block_out, block_lse)
    return out, lse


def tokenring_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, group: CommGroup
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`tokenring_forward` (collective): query packages travel, dK/dV stay local."""
    seq, size = q.shape[1], group.size
    plan = _Schedule(group, causal, seq)
    acc = accumulation_dtype(q.dtype)
    dq = torch.zeros_like(q, dtype=acc)
    dk, dv = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
    held = [torch.cat([q, dout.to(q.dtype), out.to(q.dtype)], dim=2).contiguous(), lse.contiguous()]
    heads = q.shape[2]
    pending = None
    for step in range(size):
        owner = plan.owner(step)
        if step < size - 1:
            incoming, q_handle = plan.pass_queries(step, held)
        cols, masked = _block(step, owner, plan.rank, causal, seq)
        package, package_lse = held
        q_o, dout_o, out_o = package.split(heads, dim=2)
        dq_b, dk_b, dv_b = attention_backward(dout_o, q_o, k[:, cols], v[:, cols], out_o, package_lse, masked)
        dk[:, cols] += dk_b
        dv[:, cols] += dv_b
        if step == 0:
            dq += dq_b
        else:
            returned = plan.return_results(step, [dq_b], [q])
        if pending is not None:
            _add_returned_dq(dq, pending, plan)
        pending = (*returned, step) if step > 0 else None
        if step < size - 1:
            q_handle.wait()
            held = incoming
    if pending is not None:
        _add_returned_dq(dq, pending, plan)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _add_returned_dq(dq: Tensor, pending, plan: _Schedule) -> None:
    (dq_block,), handle, step = pending
    handle.wait()
    source = (plan.rank - step) % plan.size
    dq[:, _row_slice(_halved(plan.rank, source, plan.causal), plan.seq)] += dq_block


TokenRingAttention = blockwise_function("TokenRingAttention", tokenring_forward, tokenring_backward)
