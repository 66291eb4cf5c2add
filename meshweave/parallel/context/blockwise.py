"""What the blockwise CP methods (ring, TokenRing) share: the autograd seam and the block plan.

**Autograd seam.** Each method supplies a forward ``(q, k, v, causal, group, documents) -> (out,
lse)`` and a backward ``(dout, q, k, v, out, lse, causal, group, documents) -> (dq, dk, dv)`` that
uses the final out / lse; :func:`blockwise_function` wraps the pair as a ``torch.autograd.Function``
whose ``apply(q, k, v, causal, group[, documents])`` returns ``(out, lse)`` with ``lse``
non-differentiable.

**Block plan.** On ``P`` ranks in the zigzag layout (layout.py) every method computes the blocks
``(query rank, key rank)``. :class:`BlockPlan` says, for each, which query rows and key rows are
involved and whether anything in it is visible:

- causal, ``k_rank == q_rank``: the ordinary causal block;
- causal, ``k_rank < q_rank``: every query sees the first key chunk and none of the second —
  all rows, first-half keys, unmasked;
- causal, ``k_rank > q_rank``: only the second query chunk sees anything, and it sees every key —
  second-half rows, all keys, unmasked;
- not causal: the whole block.

With ``documents`` (ids ``[b, S]`` of the whole sequence, the same on every rank) a block also
takes the document ids of its rows and keys, and a block in which no query shares a document with
any of its keys is **empty**: the methods skip it — no compute, and no message is sent for it.
A non-empty off-diagonal block is **trimmed** to the queries that share a document with one of its
keys and the keys that share one with its queries (every such pair is visible by position), so
its transfers carry only those rows. Emptiness and the trimmed rows are pure functions of
``(documents, P, causal, q_rank, k_rank)`` (:func:`chunk_sharing` + :func:`block_visible`,
:meth:`BlockPlan.rows` / :meth:`BlockPlan.cols`), so the two ends of every transfer decide alike
— and size their buffers alike — without exchanging anything. The diagonal block is never empty
(a token sees itself) and never trimmed; when its two zigzag chunks share no document it runs as
two half-size pieces (:meth:`BlockPlan.own_parts`, :func:`own_block`). A block lying in one
document in every batch row runs the unmasked kernel (masking it would change nothing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from meshweave.kernels.attention import accumulation_dtype, merge_partial
from meshweave.parallel.context.layout import SequenceLayout

Tensor = torch.Tensor


def blockwise_function(name: str, forward: Callable, backward: Callable) -> type[torch.autograd.Function]:
    """An autograd Function class named ``name`` running ``forward`` / ``backward`` (collective).

    ``apply(q, k, v, causal, group)`` or ``apply(q, k, v, causal, group, documents)``; the
    document ids get no gradient.
    """

    def fwd(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, group, documents: Tensor | None = None):
        out, lse = forward(q, k, v, causal, group, documents)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.group, ctx.documents = causal, group, documents
        ctx.mark_non_differentiable(lse)
        return out, lse

    def bwd(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(dout.contiguous(), q, k, v, out, lse, ctx.causal, ctx.group, ctx.documents)
        return dq, dk, dv, None, None, None

    doc = f"Autograd wrapper: ``{name}.apply(q, k, v, causal, group[, documents]) -> (out, lse)``."
    return type(
        name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd), "__doc__": doc}
    )


def recv_buffer(like: Tensor, rows: slice | Tensor, dim: int = 1) -> Tensor:
    """A contiguous receive buffer shaped like ``like`` with only ``rows`` (a slice or an index
    tensor, as :class:`BlockPlan` gives them) along ``dim``, in ``like``'s dtype; no copy of ``like``."""
    n = len(range(*rows.indices(like.shape[dim]))) if isinstance(rows, slice) else rows.numel()
    shape = (*like.shape[:dim], n, *like.shape[dim + 1 :])
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def chunk_sharing(documents: Tensor, size: int) -> Tensor:
    """``bool [2P, 2P]``: whether zigzag chunk ``i`` and chunk ``j`` of the sequence (``S / 2P``
    tokens each, in global order) hold a token of the same document in some batch row.

    ``documents`` ``[b, S]``: ids compared by equality only. One pass over the ids: each (row, id)
    becomes a column of a chunk-by-document incidence matrix, whose product with itself counts
    the documents two chunks share.
    """
    batch, seq = documents.shape
    chunks = 2 * size
    if seq % chunks:
        raise ValueError(f"document ids of {seq} tokens do not split into {chunks} zigzag chunks")
    _, inverse = torch.unique(documents, return_inverse=True)
    n_ids = int(inverse.max().item()) + 1 if inverse.numel() else 0
    row = torch.arange(batch, device=documents.device).unsqueeze(1)
    column = (row * n_ids + inverse).view(batch, chunks, seq // chunks)  # (row, id) as one index
    chunk = torch.arange(chunks, device=documents.device).view(1, chunks, 1).expand_as(column)
    incidence = torch.zeros(chunks, batch * n_ids, device=documents.device)
    incidence[chunk.reshape(-1), column.reshape(-1)] = 1.0
    return (incidence @ incidence.T) > 0


def block_rows(q_rank: int, k_rank: int, causal: bool) -> tuple[bool, bool]:
    """(second-half queries only, first-half keys only) of block ``(q_rank, k_rank)``: the zigzag
    halving of the module docstring (both False for the diagonal and without a causal mask)."""
    if not causal or q_rank == k_rank:
        return False, False
    return k_rank > q_rank, k_rank < q_rank


def block_visible(sharing: Tensor | list, size: int, q_rank: int, k_rank: int, causal: bool) -> bool:
    """Whether block ``(q_rank, k_rank)`` has a (query, key) pair in one document that the mask
    lets through, from :func:`chunk_sharing`'s table. Rank ``r`` owns chunks ``r`` and ``2P-1-r``."""
    if q_rank == k_rank:
        return True
    q_late, k_early = block_rows(q_rank, k_rank, causal)
    q_chunks = [2 * size - 1 - q_rank] if q_late else [q_rank, 2 * size - 1 - q_rank]
    k_chunks = [k_rank] if k_early else [k_rank, 2 * size - 1 - k_rank]
    return any(bool(sharing[i][j]) for i in q_chunks for j in k_chunks)


_PLANS: dict[tuple[int, bool, int], tuple[int, BlockPlan]] = {}


def block_plan(documents: Tensor | None, size: int, causal: bool, seq: int) -> BlockPlan:
    """The :class:`BlockPlan` of these arguments, reused while the same (unmodified) ``documents``
    tensor comes back — every layer of a microbatch and every backward pass into them share one
    ids tensor — so the plan's host copies and trimmed rows are computed once per microbatch, not
    twice per layer. The cache holds the newest plan per ``(size, causal, seq)``; a plan keeps its
    ids tensor alive, so an identity match cannot be a recycled object."""
    if documents is None:
        return BlockPlan(None, size, causal, seq)
    key = (size, causal, seq)
    cached = _PLANS.get(key)
    if cached is not None and cached[1].documents is documents and cached[0] == documents._version:
        return cached[1]
    plan = BlockPlan(documents, size, causal, seq)
    _PLANS[key] = (documents._version, plan)
    return plan


class BlockPlan:
    """The blocks of one blockwise attention call on ``size`` zigzag ranks of ``seq`` local tokens:
    their rows, their document ids and whether they are empty (module docstring).

    Without ``documents`` every block is visible, its rows are the zigzag halves (slices) and it
    carries no ids (the dense kernels run). With ``documents`` an off-diagonal block's rows are
    trimmed further to the queries that share a document with one of its keys and the keys that
    share one with its queries (index tensors; the rest would attend to nothing there), so the
    transfers carry only those rows.
    """

    def __init__(self, documents: Tensor | None, size: int, causal: bool, seq: int) -> None:
        self.documents, self.size, self.causal, self.seq = documents, size, causal, seq
        self._visible: list[list[bool]] | None = None
        self._sharing: list[list[bool]] | None = None
        if documents is not None:
            self._sharing = chunk_sharing(documents, size).tolist()  # one device-to-host copy per call
            self._visible = [
                [block_visible(self._sharing, size, qr, kr, causal) for kr in range(size)] for qr in range(size)
            ]
        self._ids: dict[int, Tensor] = {}
        self._trimmed: dict[tuple[int, int], tuple[slice | Tensor, slice | Tensor]] = {}

    def visible(self, q_rank: int, k_rank: int) -> bool:
        """False when block ``(q_rank, k_rank)`` is empty: skip it, send nothing for it."""
        return self._visible is None or self._visible[q_rank][k_rank]

    def rows(self, q_rank: int, k_rank: int) -> slice | Tensor:
        """The local query rows of ``q_rank`` that block ``(q_rank, k_rank)`` involves (a slice, or
        an index tensor with documents)."""
        if self.documents is None or q_rank == k_rank:
            return self._halves(q_rank, k_rank)[0]
        return self._trim(q_rank, k_rank)[0]

    def cols(self, q_rank: int, k_rank: int) -> slice | Tensor:
        """The local key rows of ``k_rank`` that block ``(q_rank, k_rank)`` involves (a slice, or an
        index tensor with documents)."""
        if self.documents is None or q_rank == k_rank:
            return self._halves(q_rank, k_rank)[1]
        return self._trim(q_rank, k_rank)[1]

    def masked(self, q_rank: int, k_rank: int) -> bool:
        """Whether the block needs the causal mask (the diagonal only: the rest is all or nothing)."""
        return self.causal and q_rank == k_rank

    def kernel_args(self, q_rank: int, k_rank: int) -> dict[str, Tensor]:
        """Keyword arguments of the local kernel for this block: its rows' and keys' document ids
        (``q_docs`` / ``k_docs``), none without documents."""
        if self.documents is None:
            return {}
        q_docs = self._local_ids(q_rank)[:, self.rows(q_rank, k_rank)]
        return _document_args(q_docs, self._local_ids(k_rank)[:, self.cols(q_rank, k_rank)])

    def own_parts(self, rank: int) -> list[tuple[slice, slice, bool]]:
        """(query rows, key rows, causal mask) of the pieces of ``rank``'s own block to compute.

        The whole block, unless documents leave its two zigzag chunks sharing none (then, causal,
        the later chunk sees nothing of the earlier one): then each chunk against itself only —
        with short documents the usual case, and half the work, since the kernel does not skip
        masked tiles.
        """
        whole = [(slice(None), slice(None), self.causal)]
        if self._sharing is None:
            return whole
        early, late = rank, 2 * self.size - 1 - rank
        if self._sharing[late][early]:
            return whole
        half = self.seq // 2
        return [(slice(0, half), slice(0, half), self.causal), (slice(half, None), slice(half, None), self.causal)]

    def own_kernel_args(self, rank: int, part: tuple[slice, slice, bool]) -> dict[str, Tensor]:
        """:meth:`kernel_args` of one of :meth:`own_parts`."""
        if self.documents is None:
            return {}
        ids = self._local_ids(rank)
        return _document_args(ids[:, part[0]], ids[:, part[1]])

    def _halves(self, q_rank: int, k_rank: int) -> tuple[slice, slice]:
        q_late, k_early = block_rows(q_rank, k_rank, self.causal)
        half = self.seq // 2
        return (slice(half, None) if q_late else slice(None)), (slice(0, half) if k_early else slice(None))

    def _trim(self, q_rank: int, k_rank: int) -> tuple[slice | Tensor, slice | Tensor]:
        """(query rows, key rows) of an off-diagonal block with documents: within its zigzag halves,
        the rows whose document the other side holds in the same batch row (in some batch row).
        Every pair of those is visible by position (module docstring), so nothing else is needed."""
        if (q_rank, k_rank) not in self._trimmed:
            row_half, col_half = self._halves(q_rank, k_rank)
            q_ids, k_ids = self._local_ids(q_rank)[:, row_half], self._local_ids(k_rank)[:, col_half]
            row_keep = torch.zeros(q_ids.shape[1], dtype=torch.bool, device=q_ids.device)
            col_keep = torch.zeros(k_ids.shape[1], dtype=torch.bool, device=k_ids.device)
            for b in range(q_ids.shape[0]):
                row_keep |= torch.isin(q_ids[b], k_ids[b])
                col_keep |= torch.isin(k_ids[b], q_ids[b])
            local = torch.arange(self.seq, device=q_ids.device)
            # Nothing trimmed: keep the slice, so the block's rows stay views, not copies.
            rows = row_half if bool(row_keep.all()) else local[row_half][row_keep]
            cols = col_half if bool(col_keep.all()) else local[col_half][col_keep]
            self._trimmed[(q_rank, k_rank)] = (rows, cols)
        return self._trimmed[(q_rank, k_rank)]

    def _local_ids(self, rank: int) -> Tensor:
        if rank not in self._ids:
            assert self.documents is not None
            layout = SequenceLayout(ring=self.size, ulysses=1, zigzag=True)
            index = layout.indices(self.documents.shape[1], rank).to(self.documents.device)
            self._ids[rank] = self.documents.index_select(1, index)
        return self._ids[rank]


def _document_args(q_docs: Tensor, k_docs: Tensor) -> dict[str, Tensor]:
    """The kernel's ``q_docs`` / ``k_docs`` for a block, or none when each batch row of it lies in
    one document: masking would change nothing there, and the unmasked kernels are faster."""
    first = q_docs[:, :1]
    if bool((q_docs == first).all()) and bool((k_docs == first).all()):
        return {}
    return {"q_docs": q_docs, "k_docs": k_docs}


def own_block(kernel: Callable, q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, rank: int) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of ``rank``'s queries against its own K/V, in the accumulation dtype, from
    :meth:`BlockPlan.own_parts` merged row-wise; ``kernel`` is the attention op (the caller's, so a
    patched kernel applies)."""
    parts = plan.own_parts(rank)
    if len(parts) == 1:
        return merge_partial(None, None, *kernel(q, k, v, parts[0][2], **plan.own_kernel_args(rank, parts[0])))
    out = torch.zeros(q.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=out.dtype, device=q.device)
    for part in parts:
        rows, cols, masked = part
        block_out, block_lse = kernel(q[:, rows], k[:, cols], v[:, cols], masked, **plan.own_kernel_args(rank, part))
        out[:, rows], lse[..., rows] = merge_partial(out[:, rows], lse[..., rows], block_out, block_lse)
    return out, lse


def own_block_backward(
    kernel_backward: Callable,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    plan: BlockPlan,
    rank: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`own_block`'s pieces from the final ``out`` / ``lse``, summed, in the
    accumulation dtype."""
    acc = accumulation_dtype(q.dtype)
    parts = plan.own_parts(rank)
    if len(parts) == 1:
        dq, dk, dv = kernel_backward(dout, q, k, v, out, lse, parts[0][2], **plan.own_kernel_args(rank, parts[0]))
        return dq.to(acc), dk.to(acc), dv.to(acc)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for part in parts:
        rows, cols, masked = part
        dq_p, dk_p, dv_p = kernel_backward(
            dout[:, rows],
            q[:, rows],
            k[:, cols],
            v[:, cols],
            out[:, rows],
            lse[..., rows],
            masked,
            **plan.own_kernel_args(rank, part),
        )
        dq[:, rows] += dq_p
        dk[:, cols] += dk_p
        dv[:, cols] += dv_p
    return dq, dk, dv
