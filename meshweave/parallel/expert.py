"""Expert parallelism: each rank of the EP group holds ``E / ep`` experts; tokens travel to them.

Layout: group rank ``r`` owns the contiguous block of experts ``[r E/ep, (r+1) E/ep)``; router,
shared experts and BigMac projections stay replicated. Every rank routes its own tokens.

Dispatch (:meth:`ExpertParallel.dispatch`, the :data:`~meshweave.models.moe.DispatchOp` bound into
every MoE layer), per layer and micro-batch:

1. sort this rank's (token, slot) assignments by global expert id — which also groups them by
   owning rank, since blocks are contiguous;
2. exchange the per-expert counts (``all_to_all_single`` of ``E`` int64: rank ``r`` learns how
   many rows every source sends to each of its local experts) to size the uneven splits;
3. launch the token all-to-all asynchronously and run the shared-expert branch while it is in
   flight (overlap; on a shared 2-core CPU it shows only when the wire is the bottleneck);
4. regroup received rows from (source, expert) to (expert, source) order, run local experts,
   restore (source, expert) order and all-to-all back with the splits swapped;
5. un-permute and gate-weight on the origin rank (:func:`~meshweave.models.moe.combine`, the same
   code as the single-process op, so a token's sum runs in the same order as without EP).

Every exchange goes through :mod:`meshweave.comm.ops`, so the ledger books it under the group's
dim as ``"<dim>/all_to_all"``; the token all-to-alls are autograd functions whose backward is the
reverse all-to-all (also through ``ops``). Per forward + backward a rank books
``(E - E/ep) * 8`` bytes of counts plus ``2 (sent_away + received_away) * width * itemsize`` where
``width`` is ``low_dim`` when BigMac is on, else ``dim``.

Dropped slots (capacity mode) are removed before dispatch, so capacity bounds each (source,
expert) block by ``capacity`` rows and the exchange stays variable-size (no padding); dropless
is the same path with nothing removed. All members of the EP group must run the same MoE layers
in the same order (forward and backward): each dispatch is a sequence of collectives.

Initialisation of sharded experts: parameters keep their names and only dim 0 shrinks, so build
the full-shape value (``init_value(name, full_shape, ...)``) and copy its dim-0 slice —
:func:`expert_param_slices` gives both for every sharded parameter.

Gradients of expert parameters already sum the contributions of all tokens of the EP group
(they arrive through the reverse all-to-all). Data-parallel reduction of expert parameters must
therefore run over the ranks holding the *same* experts (dp / ep of them) while keeping the
dense normalisation (divide by the full data-parallel token count, not by dp / ep).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from meshweave.comm import ops
from meshweave.comm.ops import CommGroup, Handle
from meshweave.models.moe import Experts, MoEFeedForward, combine, moe_layers, sort_by_expert

Tensor = torch.Tensor


class _AllToAll(torch.autograd.Function):
    """Rows ``x`` (``in_splits`` to each rank) -> rows received (``out_splits`` from each rank).

    With ``handles`` (a list) the exchange is launched async and its handle appended: the caller
    must ``wait()`` before reading the output. Backward is the reverse exchange, synchronous.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: CommGroup, out_splits: list[int], in_splits: list[int],
                handles: list[Handle] | None) -> Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        h = ops.all_to_all_single(out, x.contiguous(), group, out_splits=out_splits, in_splits=in_splits,
                                  async_op=handles is not None)
        if handles is not None:
            handles.append(h)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        back = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        ops.all_to_all_single(back, grad.contiguous(), ctx.group, out_splits=ctx.in_splits,
                              in_splits=ctx.out_splits)
        return back, None, None, None, None


def _expert_major(counts: Tensor) -> Tensor:
    """Permutation taking rows laid out ``[source][local expert]`` (sizes ``counts [ep, El]``)
    to ``[local expert][source]``; stable, so each source's rows keep their order."""
    ep, el = counts.shape
    block = torch.repeat_interleave(torch.arange(ep * el, device=counts.device), counts.reshape(-1))
    return torch.argsort(block % el, stable=True)


class ExpertParallel:
    """Shards MoE layers over an EP :class:`CommGroup` and provides their dispatch op."""

    def __init__(self, group: CommGroup) -> None:
        self.group = group
        # (sent to each rank, received from each rank) rows of the newest dispatch, for metrics
        self.last_splits: tuple[list[int], list[int]] | None = None

    def check(self, num_experts: int) -> None:
        """Raise ``ValueError`` unless the group size divides ``num_experts``."""
        ep = self.group.size
        if num_experts % ep:
            choices = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
            raise ValueError(f"ep={ep} does not divide moe num_experts={num_experts} (choose ep in {choices})")

    def shard_experts(self, moe: MoEFeedForward) -> None:
        """Keep only this rank's contiguous block of ``moe``'s experts (no communication).

        Works on a ``meta`` model (dim 0 of the stacked weights shrinks); on a materialised one
        the local slice is kept. Every rank of the group must shard the same layers.
        """
        self.check(moe.experts.num_experts)
        per_rank = moe.experts.num_experts // self.group.size
        moe.experts.keep(self.group.rank * per_rank, per_rank)

    def dispatch(self, tokens: Tensor, expert_idx: Tensor, weights: Tensor, experts: Experts,
                 overlap: Callable[[], Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        """The expert-parallel :data:`~meshweave.models.moe.DispatchOp` (collective over the group).

        ``expert_idx`` holds global ids (-1 = dropped); ``experts`` must have been sharded by
        :meth:`shard_experts` for this group. Returns ``(routed [T, width], overlap())``.
        """
        g, ep, el = self.group, self.group.size, experts.num_local
        if el * ep != experts.num_experts:
            raise ValueError(f"experts hold {el} of {experts.num_experts}; shard them over ep={ep} first")
        order, counts = sort_by_expert(expert_idx, experts.num_experts)
        rows = tokens[order // expert_idx.shape[1]]

        recv_counts = torch.empty_like(counts)
        ops.all_to_all_single(recv_counts, counts, g)
        recv_counts = recv_counts.view(ep, el)  # [source rank, local expert]
        send_splits = counts.view(ep, el).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()

        handles: list[Handle] = []
        received = _AllToAll.apply(rows, g, recv_splits, send_splits, handles)
        side = overlap() if overlap is not None else None
        handles[0].wait()

        regroup = _expert_major(recv_counts)
        out_rows = experts(received[regroup], recv_counts.sum(0).tolist())
        back = out_rows[torch.argsort(regroup)]
        returned = _AllToAll.apply(back, g, send_splits, recv_splits, None)
        self.last_splits = (send_splits, recv_splits)
        return combine(returned, order, weights, tokens.shape[0]), side


def bind(model: nn.Module, group: CommGroup) -> ExpertParallel:
    """Shard every MoE layer of ``model`` over ``group`` and route its dispatch through it.

    Call on every member of ``group`` with the same model structure, before materialisation (or
    after: materialised experts are sliced). Returns the binder (its ``last_splits`` for metrics).
    """
    ep = ExpertParallel(group)
    for moe in moe_layers(model):
        ep.shard_experts(moe)
        moe.dispatch_op = ep.dispatch
    return ep


def expert_param_slices(model: nn.Module) -> dict[str, tuple[torch.Size, slice]]:
    """``name -> (full shape, dim-0 slice kept)`` for every stacked expert parameter of ``model``.

    Materialisation fills ``param`` with ``init_value(name, full_shape, ...)[slice]`` so every EP
    degree starts from the same experts. Unsharded experts are listed too (the slice is all).
    """
    out = {}
    for prefix, m in model.named_modules():
        if isinstance(m, Experts):
            for name, p in m.named_parameters():
                full = torch.Size((m.num_experts, *p.shape[1:]))
                out[f"{prefix}.{name}" if prefix else name] = (full, slice(m.offset, m.offset + m.num_local))
    return out
