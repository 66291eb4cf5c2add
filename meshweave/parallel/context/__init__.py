"""Context parallelism: one attention API over four methods, usable outside the trainer.

::

    cp = ContextParallel(mesh, method="ring")          # mesh: 1-D DeviceMesh or ProcessGroup
    q_local = cp.shard(q_full, seq_dim=1)              # this rank's tokens, in the method's layout
    out_local = cp.attention(q_local, k_local, v_local, causal=True)
    out_local = cp.attention(q_local, k_local, v_local, documents=doc_ids)  # packed: [b, N] ids, whole
    out_full = cp.unshard(out_local, seq_dim=1)        # every rank gets the full tensor back

Methods (ALGORITHMS.md has the published numbers):

- ``ulysses`` (ulysses.py): all-to-all to head shards, local attention, all-to-all back.
  Contiguous layout. Needs the degree to divide the (per-TP-rank) head count.
- ``ring`` (ring.py): each rank's K/V go straight to the ranks that read them (zigzag layout for causal balance).
- ``tokenring`` (tokenring.py): Q travels, results return to their owner; trainable backward.
- ``hybrid`` (hybrid.py): Ulysses over ``ulysses_degree`` consecutive ranks, ring (or TokenRing
  with ``inner="tokenring"``) across the groups of them.

Document masking (packed sequences): ``documents`` are the document ids ``[b, N]`` of the *whole*
sequence, the same on every rank (kernels/documents.py); a token attends only within its
document. Ulysses gathers the full sequence per head shard and masks locally; ring and TokenRing
skip every block pair that shares no document — no compute and no bytes for it.

Sequence lengths must split as the layout needs (layout.py): the ring-style methods cut the
sequence into ``2P`` zigzag chunks, Ulysses into ``P`` pieces; anything else raises
:class:`LayoutError` before any communication. All collectives go through meshweave.comm, so the
ledger books them under the group's mesh-dimension name (``cp``, or ``cp_ulysses`` / ``cp_ring``
for the hybrid's sub-groups).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from meshweave.comm import ops
from meshweave.comm.ops import CommGroup
from meshweave.kernels.attention import attention as local_attention
from meshweave.kernels.documents import Documents
from meshweave.parallel.context.layout import LayoutError, SequenceLayout
from meshweave.parallel.context.ring import RingAttention
from meshweave.parallel.context.tokenring import TokenRingAttention
from meshweave.parallel.context.ulysses import UlyssesError, check_heads, ulysses_attention
from meshweave.parallel.dims import default_ulysses_degree

Tensor = torch.Tensor
METHODS = ("ulysses", "ring", "tokenring", "hybrid")

__all__ = ["ContextParallel", "LayoutError", "UlyssesError", "METHODS", "check_heads"]


def _as_group(mesh: DeviceMesh | dist.ProcessGroup | CommGroup, dim: str) -> CommGroup:
    if isinstance(mesh, CommGroup):
        return mesh
    if isinstance(mesh, DeviceMesh):
        if mesh.ndim != 1:
            raise ValueError(f"ContextParallel wants a 1-D mesh over the CP ranks, got {mesh.ndim}-D")
        return CommGroup(mesh.get_group(), dim)
    registered = ops.dim_of(mesh)
    return CommGroup(mesh, dim if registered.startswith("group:") else registered)


class ContextParallel:
    """Context-parallel attention over the ranks of ``mesh`` with one of :data:`METHODS`.

    Construction is collective over ``mesh`` (the hybrid method creates its two sub-groups).
    ``shard`` / ``attention`` / ``unshard`` keep one invariant: the concatenation of every rank's
    shard, reordered by :meth:`unshard`, is the full sequence, and ``attention`` on shards equals
    full-sequence attention restricted to this rank's query rows.
    """

    def __init__(
        self,
        mesh: DeviceMesh | dist.ProcessGroup | CommGroup,
        method: str = "ring",
        ulysses_degree: int | None = None,
        inner: str = "ring",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown context-parallel method {method!r}; choose one of {', '.join(METHODS)}")
        if inner not in ("ring", "tokenring"):
            raise ValueError(f"the hybrid's inner method must be ring or tokenring, not {inner!r}")
        self.group = _as_group(mesh, "cp")
        self.method, self.inner = method, inner
        size = self.group.size
        if method == "hybrid":
            ulysses = ulysses_degree or default_ulysses_degree(size)
            if size % ulysses or not 1 <= ulysses <= size:
                raise ValueError(f"ulysses_degree={ulysses} does not divide the CP degree {size}")
        else:
            ulysses = size if method == "ulysses" else 1
        self.ulysses_degree, self.ring_degree = ulysses, size // ulysses
        self.layout = SequenceLayout(
            ring=self.ring_degree, ulysses=ulysses, zigzag=method != "ulysses", method=f"context parallelism ({method})"
        )
        self.ulysses_group, self.ring_group = self._sub_groups()

    def _sub_groups(self) -> tuple[CommGroup, CommGroup]:
        """(Ulysses group, ring group) of this rank. For the hybrid: consecutive ranks form a
        Ulysses group, ranks with the same Ulysses index a ring group."""
        if self.method == "ulysses":
            return self.group, _single(self.group)
        if self.method in ("ring", "tokenring") or self.ulysses_degree == 1:
            return _single(self.group), self.group
        if self.ring_degree == 1:
            return self.group, _single(self.group)
        ranks = dist.get_process_group_ranks(self.group.pg)
        u, me = self.ulysses_degree, self.group.rank
        ulysses_ranks = ranks[me - me % u : me - me % u + u]
        ring_ranks = ranks[me % u :: u]
        return (
            _new_group(ulysses_ranks, f"{self.group.dim}_ulysses"),
            _new_group(ring_ranks, f"{self.group.dim}_ring"),
        )

    # ------------------------------------------------------------------------------------
    # layout

    def check(self, seq_len: int) -> None:
        """Raise :class:`LayoutError` unless a sequence of ``seq_len`` tokens splits for this method."""
        self.layout.check(seq_len)

    def positions(self, seq_len: int, device: torch.device | str = "cpu") -> Tensor:
        """Global token positions of this rank's shard (what RoPE must rotate by)."""
        return self.layout.indices(seq_len, self.group.rank).to(device)

    def shard(self, x: Tensor, seq_dim: int = 1) -> Tensor:
        """This rank's shard of the full tensor ``x`` along ``seq_dim`` (no communication)."""
        return x.index_select(seq_dim, self.positions(x.shape[seq_dim], x.device))

    def unshard(self, x_local: Tensor, seq_dim: int = 1) -> Tensor:
        """The full tensor from every rank's shard, in original order (collective).

        Autograd treats the result as replicated: the gradient of a rank's shard is its own slice
        of the incoming gradient (as for a DTensor Shard -> Replicate redistribution).
        """
        return _Unshard.apply(x_local, seq_dim, self)

    def _gather(self, x_local: Tensor, seq_dim: int) -> Tensor:
        moved = x_local.movedim(seq_dim, 0).contiguous()
        gathered = torch.empty(
            (self.group.size * moved.shape[0], *moved.shape[1:]), dtype=moved.dtype, device=moved.device
        )
        ops.all_gather_into(gathered, moved, self.group)
        seq_len = gathered.shape[0]
        inverse = torch.empty(seq_len, dtype=torch.long)
        inverse[self.layout.gather_order(seq_len)] = torch.arange(seq_len)
        return gathered.index_select(0, inverse.to(gathered.device)).movedim(0, seq_dim)

    # ------------------------------------------------------------------------------------
    # attention

    def attention(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool = True, documents: Tensor | None = None
    ) -> Tensor:
        """Attention for local shards ``[b, s_local, h, d]`` (k/v may have fewer heads); returns the
        local output shard ``[b, s_local, h, d]``. ``documents``: ids ``[b, N]`` of the whole
        sequence (identical on every rank), to attend within documents only. Differentiable;
        collective over the CP group."""
        seq_len = q.shape[1] * self.group.size
        self.check(seq_len)
        if documents is not None and tuple(documents.shape) != (q.shape[0], seq_len):
            raise ValueError(
                f"ContextParallel.attention: documents {tuple(documents.shape)} must be the whole "
                f"sequence's ids [batch, {seq_len}] (the same on every rank), not a shard"
            )
        if self.method == "ulysses":
            return ulysses_attention(q, k, v, causal, self.group, documents=documents)
        if self.method == "ring":
            return _blockwise(RingAttention, q, k, v, causal, self.group, documents)
        if self.method == "tokenring":
            return _blockwise(TokenRingAttention, q, k, v, causal, self.group, documents)
        return ulysses_attention(q, k, v, causal, self.ulysses_group, inner=self._across, documents=documents)

    def _across(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, documents: Tensor | None) -> Tensor:
        """The hybrid's ring stage on the Ulysses-gathered zigzag shard of its ring group; the
        whole sequence's ``documents`` serve the ring group as they serve the whole group."""
        if self.ring_group.size == 1:
            return local_attention(q, k, v, causal, q_docs=documents, k_docs=documents)[0]
        kernel = RingAttention if self.inner == "ring" else TokenRingAttention
        return _blockwise(kernel, q, k, v, causal, self.ring_group, documents)

    def attention_op(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool, documents: Documents | None = None
    ) -> tuple[Tensor, None]:
        """The model's attention-op seam (models/llama.py): ``(out, None)`` — no lse is needed
        after the last layer's attention, so none is gathered."""
        return self.attention(q, k, v, causal, documents.ids if documents is not None else None), None

    def __repr__(self) -> str:
        extra = f", ulysses={self.ulysses_degree} x {self.inner}={self.ring_degree}" if self.method == "hybrid" else ""
        return f"ContextParallel({self.method}, P={self.group.size}{extra})"


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local: Tensor, seq_dim: int, cp: ContextParallel) -> Tensor:
        ctx.seq_dim, ctx.cp = seq_dim, cp
        return cp._gather(x_local, seq_dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.cp.shard(grad, ctx.seq_dim), None, None


def _blockwise(kernel, q: Tensor, k: Tensor, v: Tensor, causal: bool, group: CommGroup, documents: Tensor | None):
    """Run a blockwise method (ring / TokenRing) and keep its output; without documents the
    Function is called exactly as before the document argument existed."""
    if documents is None:
        return kernel.apply(q, k, v, causal, group)[0]
    return kernel.apply(q, k, v, causal, group, documents)[0]


def _single(group: CommGroup) -> CommGroup:
    """A stand-in group of one (this rank): methods that skip a dimension never communicate on it."""
    return _SelfGroup(group.pg, group.dim)


class _SelfGroup(CommGroup):
    @property
    def size(self) -> int:
        return 1

    @property
    def rank(self) -> int:
        return 0


def _new_group(ranks: list[int], dim: str) -> CommGroup:
    """A sub-group created by its members only (no world-wide collective), registered as ``dim``."""
    pg = dist.new_group(ranks, use_local_synchronization=True)
    ops.register_group(pg, dim)
    return CommGroup(pg, dim)
