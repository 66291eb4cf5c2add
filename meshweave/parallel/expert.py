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

**Chunked dispatch** (``chunks = C > 1``, ``moe.dispatch_chunks``): steps 3-4 become a pipeline
over C chunks (:class:`_ChunkedExperts`), so that the wire and the experts work at the same time::

    dispatch 0 | shared experts
    wait 0, dispatch 1 | experts on 0, combine 0
    wait 1, dispatch 2 | experts on 1, combine 1  ...   then wait every combine

and backward mirrors it (reverse combine of chunk i+1 in flight while the experts' backward runs
on chunk i, whose reverse dispatch then runs under chunk i+1's). A chunk is a slice of *every*
(source, expert) block: block of ``n`` rows -> part ``c`` = rows ``[c n // C, (c+1) n // C)``.
Why not chunks of tokens: a token chunk's rows per expert are known only after another count
exchange (C more latency-bound, synchronous collectives on the critical path, and more ledger
bytes), while slicing each block needs only the one exchange of step 2 — sender and receiver
compute every chunk's splits from the counts they already hold — and gives every chunk ~1/C of
every expert's rows, so the pipeline stages are even however skewed the routing is. The
exchanged rows are the same, so the bytes are unchanged; each row meets the same weights and
the combine un-permutes back to step 1's order, so outputs are identical and only the expert
weights' gradient is summed in C partial GEMMs instead of one (fp rounding).

Every exchange goes through :mod:`meshweave.comm.ops`, so the ledger books it under the group's
dim as ``"<dim>/all_to_all"``; the token all-to-alls are autograd functions whose backward is the
reverse all-to-all (also through ``ops``). Per forward + backward a rank books
``(E - E/ep) * 8`` bytes of counts plus ``2 (sent_away + received_away) * width * itemsize`` where
``width`` is ``low_dim`` when BigMac is on, else ``dim`` — whatever the number of chunks (in
``1 + 4 C`` calls).

Dropped slots (capacity mode) are removed before dispatch, so capacity bounds each (source,
expert) block by ``capacity`` rows and the exchange stays variable-size (no padding); dropless
is the same path with nothing removed. All members of the EP group must run the same MoE layers
in the same order (forward and backward): each dispatch is a sequence of collectives.

Initialisation of sharded experts (:func:`bind` alone): parameters keep their names and only
dim 0 shrinks, so build the full-shape value (``init_value(name, full_shape, ...)``) and copy its
dim-0 slice — :func:`expert_param_slices` gives both for every sharded parameter. (The trainer's
expert shards are DTensors of the full shape, which ``materialize`` initialises like any other.)

Gradients of expert parameters already sum the contributions of all tokens of the EP group
(they arrive through the reverse all-to-all). Data-parallel reduction of expert parameters must
therefore run over the ranks holding the *same* experts (dp / ep of them) while keeping the
dense normalisation (divide by the full data-parallel token count, not by dp / ep).

In the trainer (:func:`shard_expert_weights`), EP borrows from the FSDP dim ``dp_shard x cp``
(N ranks), unflattened ``("ep", "edp")`` with ``ep`` outer (parallel/dims.py). Expert weights are
stored like FSDP stores every other weight — a ``DTensor`` ``Shard(0)`` over the FSDP mesh (plus
``Replicate`` over dp_replicate for HSDP and over tp) — and FSDP itself is told to ignore them:

- storage: FSDP rank ``i`` holds rows ``[i E/N, (i+1) E/N)``; with ``ep`` outer these are the
  ``edp``-th slice of its EP block, so a layout with ep > 1 stores exactly what ep = 1 stores
  (checkpoints, optimizer state, init and the grad-norm need no EP case, and they reshard freely);
- forward: the layer all-gathers its EP block over ``edp`` (the ranks holding the same experts;
  in the compute dtype, like FSDP's ``param_dtype``) and the dispatch exchanges tokens over ``ep``;
- backward: the block's gradient (already summed over the EP group's tokens) is reduce-scattered
  over ``edp`` in the parameter dtype and all-reduced over dp_replicate — a SUM over every
  data-parallel rank exactly once, as FSDP sums the dense gradients, so the trainer's
  global-token normalisation holds for experts too.

Why not let FSDP2 shard the experts over ``edp``: their shards would live on an ``(edp, ep)``
mesh and every other weight's on the flat FSDP mesh; the trainer's one ``clip_grad_norm_`` cannot
stack norms of DTensors on different meshes, and checkpoints would carry the EP layout.

The MoE layer computes on plain tensors: :class:`LocalCompute` swaps its DTensor parameters for
local tensors (the gathered block, or ``to_local()`` of a tp-replicated weight) for the
duration of each forward, activation-checkpoint recomputation included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement

from meshweave.comm import ops
from meshweave.comm.ops import CommGroup, Handle
from meshweave.models.moe import (
    Experts,
    MoEFeedForward,
    combine,
    moe_layers,
    moe_metrics,
    sort_by_expert,
    update_balance_bias,
)

Tensor = torch.Tensor


class _AllToAll(torch.autograd.Function):
    """Rows ``x`` (``in_splits`` to each rank) -> rows received (``out_splits`` from each rank).

    With ``handles`` (a list) the exchange is launched async and its handle appended: the caller
    must ``wait()`` before reading the output. Backward is the reverse exchange, synchronous.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, group: CommGroup, out_splits: list[int], in_splits: list[int], handles: list[Handle] | None
    ) -> Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        h = ops.all_to_all_single(
            out, x.contiguous(), group, out_splits=out_splits, in_splits=in_splits, async_op=handles is not None
        )
        if handles is not None:
            handles.append(h)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        back = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        ops.all_to_all_single(back, grad.contiguous(), ctx.group, out_splits=ctx.in_splits, in_splits=ctx.out_splits)
        return back, None, None, None, None


def _expert_major(counts: Tensor) -> Tensor:
    """Permutation taking rows laid out ``[source][local expert]`` (sizes ``counts [ep, El]``)
    to ``[local expert][source]``; stable, so each source's rows keep their order."""
    ep, el = counts.shape
    block = torch.repeat_interleave(torch.arange(ep * el, device=counts.device), counts.reshape(-1))
    return torch.argsort(block % el, stable=True)


def _parts(counts: Tensor, chunks: int) -> Tensor:
    """``[..., chunks]`` sizes of cutting each block of ``counts[...]`` rows into ``chunks``
    contiguous parts, part ``c`` = rows ``[c n // chunks, (c+1) n // chunks)``."""
    cuts = counts.unsqueeze(-1) * torch.arange(chunks + 1, device=counts.device) // chunks
    return cuts.diff(dim=-1)


@dataclass
class _ChunkPlan:
    """Who sends what in each chunk of a chunked dispatch; all lists indexed ``[chunk]``.

    ``send_order``: positions of the expert-sorted rows, chunk-major (within a chunk, expert order
    as before, hence grouped by destination rank); ``send_sizes[c][r]`` / ``recv_sizes[c][r]``:
    rows of chunk ``c`` to / from group rank ``r``; ``regroup[c]``: received ``[source][expert]``
    -> ``[expert][source]`` (:func:`_expert_major`) and ``restore[c]`` its inverse;
    ``expert_rows[c]``: rows per local expert.
    """

    send_order: Tensor
    send_sizes: list[list[int]]
    recv_sizes: list[list[int]]
    regroup: list[Tensor]
    restore: list[Tensor]
    expert_rows: list[list[int]]

    @classmethod
    def make(cls, counts: Tensor, recv_counts: Tensor, chunks: int) -> _ChunkPlan:
        """From this rank's rows per global expert ``counts [E]`` (in sorted order) and the rows
        each source sends to each local expert ``recv_counts [ep, El]``; no communication."""
        ep, el = recv_counts.shape
        # chunk of each sorted row: row p of an n-row expert block is in part ceil((p+1) C / n) - 1
        block = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        start = counts.cumsum(0) - counts
        pos = torch.arange(block.numel(), device=counts.device) - start[block]
        chunk_of = ((pos + 1) * chunks - 1) // counts[block]
        sent = _parts(counts.view(ep, el), chunks).sum(1)  # [ep, C]
        received = _parts(recv_counts, chunks)  # [ep, El, C]
        regroup = [_expert_major(received[:, :, c]) for c in range(chunks)]
        return cls(
            send_order=torch.argsort(chunk_of, stable=True),
            send_sizes=sent.T.tolist(),
            recv_sizes=received.sum(1).T.tolist(),
            regroup=regroup,
            restore=[torch.argsort(r) for r in regroup],
            expert_rows=received.sum(0).T.tolist(),
        )


@contextlib.contextmanager
def _weights_as(experts: Experts, weights: Sequence[Tensor]) -> Iterator[None]:
    """Run ``experts`` with ``weights`` (gate, up, down) in place of its own, then put them back."""
    subs = (experts.gate_proj, experts.up_proj, experts.down_proj)
    saved = [sub._parameters["weight"] for sub in subs]
    for sub, w in zip(subs, weights, strict=True):
        sub._parameters["weight"] = w  # type: ignore[assignment]  # a plain tensor, as LocalCompute does
    try:
        yield
    finally:
        for sub, old in zip(subs, saved, strict=True):
            sub._parameters["weight"] = old


def _expert_weights(experts: Experts) -> list[Tensor]:
    return [experts.gate_proj.weight, experts.up_proj.weight, experts.down_proj.weight]


class _ChunkedExperts(torch.autograd.Function):
    """Sorted rows ``[N, w]`` (chunk-major, ``plan.send_order``) -> the experts' outputs for them,
    same layout: dispatch, local experts and combine pipelined over the plan's chunks, forward
    and backward (module docstring). Collective over the group, in the same order on every rank.

    The experts of each chunk run under ``enable_grad`` on leaf copies of the rows and weights,
    and backward back-propagates each chunk's small graph as its reverse combine arrives, so the
    reverse exchanges are pipelined too; the weights' gradient is the chunks' sum. ``side`` gets
    ``overlap()`` (run while the first dispatch is in flight, recorded by autograd as usual).
    """

    @staticmethod
    def forward(
        ctx,
        rows: Tensor,
        group: CommGroup,
        plan: _ChunkPlan,
        experts: Experts,
        overlap: Callable[[], Tensor] | None,
        side: list[Tensor],
        track: bool,
        *weights: Tensor,
    ) -> Tensor:
        chunks = len(plan.send_sizes)
        sends = rows.split([sum(s) for s in plan.send_sizes])
        recv = [rows.new_empty((sum(s), *rows.shape[1:])) for s in plan.recv_sizes]
        back = [rows.new_empty(t.shape) for t in sends]

        def dispatch(c: int) -> Handle:
            return ops.all_to_all_single(
                recv[c], sends[c].contiguous(), group, plan.recv_sizes[c], plan.send_sizes[c], async_op=True
            )

        leaves = [w.detach().requires_grad_(w.requires_grad) for w in weights]
        graphs: list[tuple[Tensor, Tensor]] = []
        combines: list[Handle] = []
        pending = dispatch(0)
        if overlap is not None:
            with torch.enable_grad():
                side.append(overlap())
        for c in range(chunks):
            pending.wait()
            if c + 1 < chunks:
                pending = dispatch(c + 1)
            x = recv[c][plan.regroup[c]]
            if track:
                x.requires_grad_()
                with torch.enable_grad(), _weights_as(experts, leaves):
                    y = experts(x, plan.expert_rows[c])
                graphs.append((x, y))
                y = y.detach()
            else:
                y = experts(x, plan.expert_rows[c])
            out = y[plan.restore[c]]
            combines.append(
                ops.all_to_all_single(back[c], out, group, plan.send_sizes[c], plan.recv_sizes[c], async_op=True)
            )
        for h in combines:
            h.wait()
        ctx.group, ctx.plan, ctx.graphs, ctx.leaves = group, plan, graphs, leaves
        return torch.cat(back)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        group, plan, graphs, leaves = ctx.group, ctx.plan, ctx.graphs, ctx.leaves
        ctx.graphs = None  # the chunks' graphs are freed as they are used
        chunks = len(plan.send_sizes)
        grads = grad.split([sum(s) for s in plan.send_sizes])
        at_experts = [grad.new_empty((sum(s), *grad.shape[1:])) for s in plan.recv_sizes]
        at_origin = [grad.new_empty(g.shape) for g in grads]

        def reverse_combine(c: int) -> Handle:
            return ops.all_to_all_single(
                at_experts[c], grads[c].contiguous(), group, plan.recv_sizes[c], plan.send_sizes[c], async_op=True
            )

        reverse_dispatches: list[Handle] = []
        pending = reverse_combine(0)
        for c in range(chunks):
            pending.wait()
            if c + 1 < chunks:
                pending = reverse_combine(c + 1)
            x, y = graphs[c]
            graphs[c] = None
            torch.autograd.backward(y, at_experts[c][plan.regroup[c]])
            assert x.grad is not None  # x requires grad and every row reaches y
            gx = x.grad[plan.restore[c]]
            reverse_dispatches.append(
                ops.all_to_all_single(at_origin[c], gx, group, plan.send_sizes[c], plan.recv_sizes[c], async_op=True)
            )
        for h in reverse_dispatches:
            h.wait()
        return (torch.cat(at_origin), None, None, None, None, None, None, *(w.grad for w in leaves))


class ExpertParallel:
    """Shards MoE layers over an EP :class:`CommGroup` and provides their dispatch op."""

    def __init__(self, group: CommGroup, chunks: int = 1) -> None:
        if chunks < 1:
            raise ValueError(f"dispatch chunks={chunks} must be >= 1")
        self.group, self.chunks = group, chunks
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

    def dispatch(
        self,
        tokens: Tensor,
        expert_idx: Tensor,
        weights: Tensor,
        experts: Experts,
        overlap: Callable[[], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
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

        if self.chunks > 1:
            plan = _ChunkPlan.make(counts, recv_counts, self.chunks)
            side_out: list[Tensor] = []
            weights_ = _expert_weights(experts)
            track = torch.is_grad_enabled() and (rows.requires_grad or any(w.requires_grad for w in weights_))
            chunked = _ChunkedExperts.apply(
                rows[plan.send_order], g, plan, experts, overlap, side_out, track, *weights_
            )
            returned = chunked[torch.argsort(plan.send_order)]  # back to the sorted order of step 1
            side = side_out[0] if side_out else None
        else:
            returned, side = self._unchunked(rows, recv_counts, send_splits, recv_splits, experts, overlap)
        self.last_splits = (send_splits, recv_splits)  # binder-wide; per layer on the experts:
        experts.last_splits = self.last_splits  # type: ignore[assignment]  # a plain attribute of nn.Module
        return combine(returned, order, weights, tokens.shape[0]), side

    def _unchunked(
        self,
        rows: Tensor,
        recv_counts: Tensor,
        send_splits: list[int],
        recv_splits: list[int],
        experts: Experts,
        overlap: Callable[[], Tensor] | None,
    ) -> tuple[Tensor, Tensor | None]:
        """Steps 3-4 in one piece: the dispatch under ``overlap()``, experts, the combine."""
        g = self.group
        handles: list[Handle] = []
        received = _AllToAll.apply(rows, g, recv_splits, send_splits, handles)
        side = overlap() if overlap is not None else None
        handles[0].wait()

        regroup = _expert_major(recv_counts)
        out_rows = experts(received[regroup], recv_counts.sum(0).tolist())
        back = out_rows[torch.argsort(regroup)]
        return _AllToAll.apply(back, g, send_splits, recv_splits, None), side


def bind(model: nn.Module, group: CommGroup, chunks: int | None = None) -> ExpertParallel:
    """Shard every MoE layer of ``model`` over ``group`` and route its dispatch through it, in
    ``chunks`` pipelined chunks (default: the layers' ``moe.dispatch_chunks``).

    Call on every member of ``group`` with the same model structure, before materialisation (or
    after: materialised experts are sliced). Returns the binder (its ``last_splits`` for metrics).
    """
    layers = moe_layers(model)
    if chunks is None:
        chunks = layers[0].settings.dispatch_chunks if layers else 1
    ep = ExpertParallel(group, chunks)
    for moe in layers:
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


# --------------------------------------------------------------------------------------------
# expert weights in the trainer: FSDP-shaped shards, gathered per layer over edp


class LocalCompute:
    """Runs one MoE layer on plain tensors while its registered parameters stay DTensors.

    Before each forward every DTensor parameter of the layer is replaced by a local tensor —
    ``gathers[id(module)](param)`` for the expert weights, else ``param.to_local()`` (a
    replicated weight) — and the DTensors are put back after it. Both are differentiable, so
    gradients arrive in the DTensor parameters' ``.grad`` with their placements.
    """

    def __init__(self, moe: MoEFeedForward) -> None:
        self.entries = [(sub, name) for sub in moe.modules() for name in sub._parameters]
        self.gathers: dict[int, Callable[[DTensor], torch.Tensor]] = {}
        self._saved: list[tuple[nn.Module, str, nn.Parameter]] = []
        moe.register_forward_pre_hook(self._enter)
        moe.register_forward_hook(self._exit, always_call=True)

    def _enter(self, module: nn.Module, args: tuple) -> None:
        for sub, name in self.entries:
            p = sub._parameters[name]
            if isinstance(p, DTensor):
                self._saved.append((sub, name, p))
                # a plain tensor in _parameters: what FSDP does too, minus the Parameter wrapper
                # (which would cut the autograd edge back to the DTensor)
                sub._parameters[name] = self.gathers.get(id(sub), _to_local)(p)

    def _exit(self, module: nn.Module, args: tuple, out: object) -> None:
        while self._saved:
            sub, name, p = self._saved.pop()
            sub._parameters[name] = p


def _to_local(p: DTensor) -> torch.Tensor:
    return p.to_local()


def local_compute(moe: MoEFeedForward) -> LocalCompute:
    """The layer's :class:`LocalCompute`, installed on first use (tensor and expert parallelism
    both need it; one set of hooks serves both)."""
    installed = moe.__dict__.get("_local_compute")
    if installed is None:
        installed = moe.__dict__["_local_compute"] = LocalCompute(moe)
    return installed


class _GatherBlock(torch.autograd.Function):
    """This rank's slice -> its EP block: all-gather over ``edp`` in ``dtype``. Backward:
    reduce-scatter over ``edp`` in the slice's dtype, then all-reduce over ``replicate``."""

    @staticmethod
    def forward(
        ctx, piece: torch.Tensor, edp: CommGroup, replicate: CommGroup | None, dtype: torch.dtype
    ) -> torch.Tensor:
        ctx.edp, ctx.replicate, ctx.dtype = edp, replicate, piece.dtype
        src = piece.to(dtype).contiguous()
        block = src.new_empty((edp.size * src.shape[0], *src.shape[1:]))
        ops.all_gather_into(block, src, edp)
        return block

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = grad.to(ctx.dtype).contiguous()
        piece = full.new_empty((full.shape[0] // ctx.edp.size, *full.shape[1:]))
        ops.reduce_scatter_into(piece, full, ctx.edp)
        if ctx.replicate is not None:
            ops.all_reduce(piece, ctx.replicate)
        return piece, None, None, None


def _gather_block(p: DTensor, edp: CommGroup, replicate: CommGroup | None, dtype: torch.dtype) -> Tensor:
    """This rank's whole ep block of an expert weight, gathered over ``edp`` (see _GatherBlock)."""
    return _GatherBlock.apply(p.to_local(), edp, replicate, dtype)


def shard_expert_weights(
    model: nn.Module,
    mesh: DeviceMesh,
    placements: Sequence[Placement],
    edp: CommGroup,
    replicate: CommGroup | None,
    compute_dtype: torch.dtype | None,
) -> list[nn.Parameter]:
    """Turn the expert blocks left by :func:`bind` into dim-0 shards of the full tensors on the
    FSDP ``mesh`` (``placements``: ``Shard(0)`` on the FSDP dim, ``Replicate`` elsewhere); call
    on the meta model. Returns the parameters, which FSDP must ignore.

    ``mesh`` must be the mesh FSDP gives the other parameters (so one grad-norm covers all), and
    its FSDP dim must be ``("ep", "edp")`` flattened with ``ep`` outer, so that slice ``edp.rank``
    of this rank's block is slice ``i`` of the full tensor for FSDP rank ``i``.
    """
    params = []
    for moe in moe_layers(model):
        experts, gathers = moe.experts, local_compute(moe).gathers
        slice_rows = experts.num_local // edp.size
        for sub in (experts.gate_proj, experts.up_proj, experts.down_proj):
            w = sub.weight
            full = torch.Size((experts.num_experts, *w.shape[1:]))
            piece = torch.empty((slice_rows, *w.shape[1:]), dtype=w.dtype, device="meta")
            sub.weight = nn.Parameter(
                DTensor.from_local(
                    piece, mesh, placements, shape=full, stride=torch.empty(full, device="meta").stride()
                ),
                requires_grad=w.requires_grad,
            )
            dtype = compute_dtype or w.dtype
            gathers[id(sub)] = partial(_gather_block, edp=edp, replicate=replicate, dtype=dtype)
            params.append(sub.weight)
    return params


def expert_metrics(model: nn.Module) -> dict[str, dict]:
    """:func:`~meshweave.models.moe.moe_metrics` plus, per expert-parallel layer, the rows its
    newest dispatch sent to (``ep_rows_sent``) and received from (``ep_rows_received``) each EP
    rank: with the ledger's ``ep/all_to_all`` bytes they give the bytes per dispatched row."""
    out = moe_metrics(model)
    for name, m in model.named_modules():
        splits = getattr(m.experts, "last_splits", None) if isinstance(m, MoEFeedForward) else None
        if splits is not None and name in out:
            out[name]["ep_rows_sent"], out[name]["ep_rows_received"] = splits
    return out


def balance_experts(model: nn.Module, group: CommGroup) -> None:
    """Aux-loss-free balancing after an optimizer step: :func:`update_balance_bias` with the
    routers' loads summed over ``group`` (every rank routing different tokens: dp x cp), so all
    ranks move their biases alike. Collective over ``group`` when the model balances by bias."""

    def summed(load: torch.Tensor) -> torch.Tensor:
        ops.all_reduce(load, group)
        return load

    update_balance_bias(model, summed)
    for moe in moe_layers(model):  # the counters are read only for balancing: keep them per step
        moe.gate.load_since_update = None
