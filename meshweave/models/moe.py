"""Mixture-of-experts feed-forward: router, batched SwiGLU experts, shared experts, BigMac.

:class:`MoEFeedForward` is a drop-in for the dense ``FeedForward`` (``[b, s, d] -> [b, s, d]``).
Per token the :class:`Router` picks ``top_k`` of ``num_experts`` experts and a gate weight for
each; the routed experts' outputs are gate-weighted and summed, and the shared experts (a dense
SwiGLU every token passes through, DeepSeekMoE) are added, scaled per token by a sigmoid gate
when ``shared_expert_gate`` is set (Qwen2-MoE).

The model knows nothing about meshes. Moving tokens to experts goes through one seam,
``MoEFeedForward.dispatch_op`` (a :data:`DispatchOp`)::

    dispatch_op(tokens [T, w], expert_idx [T, k], weights [T, k], experts, overlap)
        -> (routed [T, w], overlap() or None)

``expert_idx`` holds global expert ids, ``-1`` for a slot dropped by the capacity limit;
``overlap`` is the shared-expert branch, a callable the op runs while its all-to-all is in flight.
The default, :func:`local_dispatch`, permutes tokens by expert, runs the experts and combines in
one process; ``parallel/expert.py`` binds an all-to-all version. Both share :func:`sort_by_expert`
and :func:`combine`, so the un-permutation and gate weighting are the same code in either mode.

Invariants:

- routing is computed in at least fp32 from the full-width token; it is replicated (every rank
  routes its own tokens with the same gate), so it never depends on the expert-parallel degree;
- experts are stored stacked (``[E, out, in]``, Hugging Face per-expert layout stacked on dim 0)
  so expert parallelism keeps a contiguous block of dim 0 (:meth:`Experts.keep`);
- with ``low_dim > 0`` (BigMac) the routed branch runs at ``low_dim``: tokens are projected by
  ``descend`` before dispatch and by ``ascend`` after combine, so both all-to-alls move ``low_dim``
  wide rows; the router and shared experts still see the full-width token;
- capacity (``capacity_factor > 0``) drops by position: per expert, assignments are admitted in
  flattened token order (``[b*s]``, a token's k choices together) until ``capacity`` is reached;
- the aux-loss-free balancing bias (``gate.e_score_correction_bias``) is a buffer, so it is
  checkpointed; it changes which experts are selected, never the gate weights;
- with ``aux_loss_scale`` set (the trainer does, :func:`set_aux_loss_scale`), a training forward
  adds ``scale * (aux + z)`` to the gradient where the layer runs (Megatron's aux-loss
  auto-scaler): the loss value stays the language-model loss, and a pipeline stage without the
  head still back-propagates its own layers' aux losses.

Names follow Hugging Face DeepSeek-V3 / Qwen-MoE (``mlp.gate.weight``, ``mlp.experts.*``,
``mlp.shared_experts.*``), with the per-expert weights stacked; ``*.down_proj.weight`` end the
residual branch like the dense model's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from meshweave.config import MoEConfig, check_moe

Tensor = torch.Tensor


def is_moe_layer(layer_idx: int, settings: MoEConfig) -> bool:
    """Whether global layer ``layer_idx`` gets an MoE feed-forward (the last of every ``every``)."""
    return layer_idx % settings.every == settings.every - 1


def capacity(num_tokens: int, settings: MoEConfig) -> int:
    """Assignments each expert admits from ``num_tokens`` tokens: ``max(ceil(k T / E cf), min)``."""
    s = settings
    return max(math.ceil(s.top_k * num_tokens / s.num_experts * s.capacity_factor), s.min_capacity)


def _in_backward() -> bool:
    # Activation checkpointing re-runs forward inside backward; counting load there would count
    # every token twice. The autograd engine sets a graph-task id only while it executes.
    return torch._C._current_graph_task_id() != -1


class Router(nn.Module):
    """Linear gate ``dim -> E`` (no bias), softmax/sigmoid scores, top-k, capacity, aux losses.

    ``forward(x [T, dim]) -> (expert_idx [T, k] int64, weights [T, k])``; dropped slots have
    index -1 and weight 0. After each forward: ``last_aux`` (coeff * E * sum_i f_i P_i, f_i the
    fraction of the T*k assignments to expert i before dropping, P_i the mean normalised score),
    ``last_z`` (coeff * mean logsumexp(logits)^2), ``last_load`` (assignments per expert before
    dropping) and ``last_dropped`` (fraction of assignments dropped).
    """

    def __init__(self, dim: int, settings: MoEConfig) -> None:
        super().__init__()
        self.settings = settings
        self.weight = nn.Parameter(torch.empty(settings.num_experts, dim))
        nn.init.normal_(self.weight, std=0.02)
        if settings.bias_balancing:
            self.register_buffer("e_score_correction_bias", torch.zeros(settings.num_experts))
        self.e_score_correction_bias: Tensor
        self.last_aux: Tensor | None = None
        self.last_z: Tensor | None = None
        self.last_load: Tensor | None = None
        self.last_dropped = 0.0
        self.load_since_update: Tensor | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, E, k = self.settings, self.settings.num_experts, self.settings.top_k
        # fp32 at least: bf16 logits flip top-k choices between layouts and blow up the z-loss.
        xr = x.to(torch.promote_types(x.dtype, torch.float32))
        logits = F.linear(xr, self.weight.to(xr.dtype))
        scores = logits.softmax(-1) if s.score == "softmax" else logits.sigmoid()
        select = scores.detach()
        if s.bias_balancing:
            select = select + self.e_score_correction_bias.to(select.dtype)
        idx = select.topk(k, dim=-1).indices
        weights = scores.gather(-1, idx)
        if s.score == "sigmoid" or s.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)

        T = x.shape[0]
        load = torch.bincount(idx.reshape(-1), minlength=E)
        probs = scores if s.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        f = load.to(probs.dtype) / max(T * k, 1)
        self.last_aux = s.aux_loss_coeff * E * (f * probs.mean(0)).sum()
        self.last_z = s.z_loss_coeff * torch.logsumexp(logits, -1).square().mean()
        self.last_load = load.detach()
        if self.training and not _in_backward():
            acc = self.load_since_update
            self.load_since_update = self.last_load.clone() if acc is None else acc + self.last_load

        self.last_dropped = 0.0
        if s.capacity_factor > 0:
            idx, weights = self._drop_over_capacity(idx, weights)
        return idx, weights

    def _drop_over_capacity(self, idx: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        T, k = idx.shape
        flat = idx.reshape(-1)  # token-major: a token's k choices are adjacent
        onehot = F.one_hot(flat, self.settings.num_experts)
        # position of each assignment within its expert's queue, earliest token first
        position = ((onehot.cumsum(0) - 1) * onehot).sum(-1)
        keep = (position < capacity(T, self.settings)).view(T, k)
        self.last_dropped = 1.0 - keep.sum().item() / max(T * k, 1)
        return torch.where(keep, idx, -1), weights * keep.to(weights.dtype)


class _StackedWeight(nn.Module):
    """``weight [E, out, in]``: E stacked ``nn.Linear`` weights, so names end in ``.weight``."""

    def __init__(self, num: int, out_dim: int, in_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, out_dim, in_dim))
        nn.init.normal_(self.weight, std=0.02)


class Experts(nn.Module):
    """``num_experts`` SwiGLU experts ``in_dim -> ffn_dim -> in_dim``, weights stacked on dim 0.

    Holds experts ``[offset, offset + num_local)`` of ``num_experts`` (all of them until
    :meth:`keep`). ``forward(rows [N, in], counts)`` runs local expert ``e`` on the ``counts[e]``
    consecutive rows of its block (rows grouped by local expert, in expert order).
    """

    def __init__(self, num_experts: int, in_dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.num_experts, self.num_local, self.offset = num_experts, num_experts, 0
        self.gate_proj = _StackedWeight(num_experts, ffn_dim, in_dim)
        self.up_proj = _StackedWeight(num_experts, ffn_dim, in_dim)
        self.down_proj = _StackedWeight(num_experts, in_dim, ffn_dim)

    @property
    def in_dim(self) -> int:
        return self.down_proj.weight.shape[1]

    def keep(self, offset: int, count: int) -> None:
        """Keep only experts ``[offset, offset + count)``; works on ``meta`` (shapes only).

        Materialised weights are sliced; meta weights are re-created at the smaller shape, so
        initial values must come from the full-shape value sliced on dim 0.
        """
        if self.num_local != self.num_experts:
            raise ValueError("Experts.keep: already holds a subset; keep once, on the full set")
        if not (0 <= offset and count >= 1 and offset + count <= self.num_experts):
            raise ValueError(f"Experts.keep: [{offset}, {offset + count}) not within {self.num_experts} experts")
        for sub in (self.gate_proj, self.up_proj, self.down_proj):
            w = sub.weight
            if w.is_meta:
                new = torch.empty((count, *w.shape[1:]), dtype=w.dtype, device=w.device)
            else:
                new = w.detach()[offset : offset + count].clone()
            sub.weight = nn.Parameter(new, requires_grad=w.requires_grad)
        self.num_local, self.offset = count, offset

    def forward(self, rows: Tensor, counts: list[int]) -> Tensor:
        outs = []
        # A loop of per-expert GEMMs: on CPU it matches a grouped GEMM without padding waste.
        for e, chunk in enumerate(rows.split(counts)):
            h = F.silu(F.linear(chunk, self.gate_proj.weight[e])) * F.linear(chunk, self.up_proj.weight[e])
            outs.append(F.linear(h, self.down_proj.weight[e]))
        return torch.cat(outs) if outs else rows.new_zeros(0, self.in_dim)


DispatchOp = Callable[[Tensor, Tensor, Tensor, Experts, "Callable[[], Tensor] | None"], "tuple[Tensor, Tensor | None]"]


class SwiGLU(nn.Module):
    """The dense SwiGLU MLP (same names as the dense model's ``FeedForward``)."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def sort_by_expert(expert_idx: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """``(order, counts)``: flat slot indices (into ``expert_idx.view(-1)``) grouped by expert.

    Dropped slots (-1) are left out; within an expert, slots keep token order (stable sort), so
    token ``order // k`` of row ``j`` is what expert ``expert_idx.view(-1)[order[j]]`` sees.
    ``counts [num_experts]`` int64 are the group sizes.
    """
    flat = expert_idx.reshape(-1)
    valid = (flat >= 0).nonzero().squeeze(1)
    order = valid[torch.argsort(flat[valid], stable=True)]
    return order, torch.bincount(flat[valid], minlength=num_experts)


def combine(rows: Tensor, order: Tensor, weights: Tensor, num_tokens: int) -> Tensor:
    """Un-permute expert outputs ``rows`` (in :func:`sort_by_expert` order) and gate-sum per token."""
    k = weights.shape[1]
    w = weights.reshape(-1)[order].to(rows.dtype)
    out = rows.new_zeros(num_tokens, rows.shape[1])
    return out.index_add(0, order // k, rows * w[:, None])


def local_dispatch(
    tokens: Tensor, expert_idx: Tensor, weights: Tensor, experts: Experts, overlap: Callable[[], Tensor] | None = None
) -> tuple[Tensor, Tensor | None]:
    """The single-process :data:`DispatchOp`: permute by expert, run all experts, combine."""
    if experts.num_local != experts.num_experts:
        raise ValueError("local_dispatch needs the full expert set; bind an expert-parallel dispatch op")
    side = overlap() if overlap is not None else None
    order, counts = sort_by_expert(expert_idx, experts.num_experts)
    out_rows = experts(tokens[order // expert_idx.shape[1]], counts.tolist())
    return combine(out_rows, order, weights, tokens.shape[0]), side


class MoEFeedForward(nn.Module):
    """Router -> dispatch op -> experts -> combine (+ shared experts); ``[b, s, dim] -> same``."""

    def __init__(self, dim: int, settings: MoEConfig) -> None:
        super().__init__()
        check_moe(settings, dim)
        self.settings = settings
        width = settings.low_dim or dim
        self.gate = Router(dim, settings)
        self.experts = Experts(settings.num_experts, width, settings.expert_ffn_dim)
        self.shared_experts = (
            SwiGLU(dim, settings.shared_experts * settings.expert_ffn_dim) if settings.shared_experts else None
        )
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if settings.shared_expert_gate else None
        self.descend = nn.Linear(dim, width, bias=False) if settings.low_dim else None
        self.ascend = nn.Linear(width, dim, bias=False) if settings.low_dim else None
        self.dispatch_op: DispatchOp = local_dispatch
        self.aux_loss_scale: float | None = None

    def _shared_branch(self, flat: Tensor) -> Callable[[], Tensor]:
        """The shared experts on ``flat`` (gated by sigmoid when the family has a gate), as the
        callable the dispatch op runs while its all-to-all is in flight."""
        shared, gate = self.shared_experts, self.shared_expert_gate
        assert shared is not None
        if gate is None:
            return lambda: shared(flat)
        return lambda: shared(flat) * torch.sigmoid(gate(flat))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        expert_idx, weights = self.gate(flat)
        tokens = self.descend(flat) if self.descend is not None else flat
        routed, side = self.dispatch_op(
            tokens, expert_idx, weights, self.experts, self._shared_branch(flat) if self.shared_experts else None
        )
        if self.ascend is not None:
            routed = self.ascend(routed)
        if side is not None:
            routed = routed + side
        out = routed.view(shape)
        if self.aux_loss_scale is not None and torch.is_grad_enabled():
            aux, z = self.gate.last_aux, self.gate.last_z
            assert aux is not None and z is not None  # set by the router's forward above
            out = _AuxLossGrad.apply(out, aux + z, self.aux_loss_scale)
        return out


class _AuxLossGrad(torch.autograd.Function):
    """Identity on ``out``; its backward also sends gradient ``scale`` into ``aux``, so training
    minimises ``scale * aux`` beside whatever loss ``out`` feeds, without adding it to that loss."""

    @staticmethod
    def forward(ctx, out: Tensor, aux: Tensor, scale: float) -> Tensor:
        ctx.scale, ctx.aux_like = scale, (aux.shape, aux.dtype, aux.device)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        shape, dtype, device = ctx.aux_like
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


# --------------------------------------------------------------------------------------------
# what the trainer calls


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    """Every :class:`MoEFeedForward` in ``model``, in module order (the same on every rank)."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the (coefficient-weighted) load-balancing and z losses of the last forward.

    Add it to the loss of the micro-batch whose forward produced it, before the next forward
    overwrites it. Zero (a 0-d fp32 tensor) when the model has no MoE layer that has run.
    """
    terms = [t for m in moe_layers(model) for t in (m.gate.last_aux, m.gate.last_z) if t is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def set_aux_loss_scale(model: nn.Module, scale: float | None) -> None:
    """Have every MoE layer add ``scale * (aux + z)`` of each training forward to the gradient.

    For a step that sums gradients over ``n`` data-parallel (x cp) ranks and ``m`` micro-batches
    per rank, ``scale = 1 / (n m)`` trains on the mean aux loss of all micro-batches. ``None``
    turns it off (then add :func:`aux_loss` to the loss yourself)."""
    for m in moe_layers(model):
        m.aux_loss_scale = scale


def moe_metrics(model: nn.Module) -> dict[str, dict]:
    """Per MoE layer (by module name): tokens per expert, dropped fraction, aux and z of the last
    forward, from this rank's tokens only."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, MoEFeedForward) and m.gate.last_load is not None:
            r = m.gate
            assert r.last_load is not None and r.last_aux is not None and r.last_z is not None  # set together
            out[name] = {
                "tokens_per_expert": r.last_load.tolist(),
                "dropped_fraction": r.last_dropped,
                "aux": r.last_aux.item(),
                "z": r.last_z.item(),
            }
    return out


@torch.no_grad()
def update_balance_bias(model: nn.Module, reduce_load: Callable[[Tensor], Tensor] | None = None) -> None:
    """Aux-loss-free balancing: ``bias += rate * sign(mean_load - load)`` per balancing layer.

    ``load`` is what each router counted in training forwards since the previous call (summed over
    micro-batches). Call once per optimizer step on every rank. ``reduce_load`` maps the
    concatenated loads of all layers to their sum over every rank that routes different tokens
    (e.g. an all-reduce over dp x cp): without it the biases of different ranks drift apart.
    It is called exactly once, so it may be collective.
    """
    routers = [m.gate for m in moe_layers(model) if m.settings.bias_balancing]
    if not routers:
        return
    loads = [
        r.load_since_update
        if r.load_since_update is not None
        else torch.zeros(r.settings.num_experts, dtype=torch.int64, device=r.weight.device)
        for r in routers
    ]
    total = torch.cat(loads).to(torch.float64)
    if reduce_load is not None:
        total = reduce_load(total)
    for r, load in zip(routers, total.split([len(x) for x in loads])):
        step = r.settings.bias_update_rate * torch.sign(load.mean() - load)
        r.e_score_correction_bias.add_(step.to(r.e_score_correction_bias.dtype))
        r.load_since_update = None


@torch.no_grad()
def init_moe_buffers(model: nn.Module) -> None:
    """Zero the balancing biases and load counters; call after ``to_empty`` (which leaves buffers
    uninitialised) and before loading a checkpoint."""
    for m in moe_layers(model):
        if m.settings.bias_balancing:
            m.gate.e_score_correction_bias.zero_()
        m.gate.load_since_update = None
