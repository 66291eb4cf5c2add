"""1-bit compressed all-reduce with error feedback, and the 1-bit Adam optimizer built on it.

Compressed all-reduce (:func:`compressed_all_reduce`) over a group of ``n`` ranks
    The flat tensor is zero-padded to ``n * L`` elements, ``L = chunk_numel(numel, n)`` (a multiple
    of 8, so each rank's chunk packs into whole bytes), and viewed as ``n`` rows of ``L``; row ``r``
    is the part rank ``r`` serves. Worker phase: compress ``row + worker_error`` row by row (a sign
    bit per element, an fp32 RMS scale per ``chunk_size`` elements, scale chunks restart at each
    row), exchange packed signs and scales with one all-to-all each. Server phase: decode the ``n``
    received copies of this rank's row, SUM them and divide by ``n`` (never ReduceOp.AVG, which has
    been wrong on gloo), compress with ``server_error``, all-gather signs and scales. Every rank
    decodes the same gathered bytes the same way, so the result is bitwise identical on all ranks.

    Padding elements are masked: they take part in neither sign nor scale, decode to 0 and keep a
    zero error, so padding never leaks into real elements through the error buffers.

    Wire bytes per rank (what the ledger books, exactly): two all-to-alls and two all-gathers,
    ``2 (n - 1) (L / 8 + 4 k)`` with ``k = ceil(L / chunk_size)`` scales per row — about 1/32 of
    an fp32 all-reduce's ``2 (n - 1) / n * 4 numel`` for large tensors. The uint8 payload travels as
    uint8 (gloo's all-to-all and all-gather accept it), so booked bytes are the bytes sent.

    One call is very lossy (relative error of order 1); error feedback makes the sum of outputs over
    calls track the sum of exact averages up to the bounded current errors (``sum_t out_t = sum_t
    mean_t - (mean of worker errors) - (server errors)`` at the end), so time-averages converge.

1-bit Adam (:class:`OneBitAdam`, Tang et al. 2021)
    Warm-up (the first ``freeze_step`` steps): exactly ``torch.optim.AdamW`` (single-tensor path),
    on gradients the caller has already averaged over the data-parallel group. Compressed phase:
    the caller stops reducing gradients; each rank folds its local gradient into its momentum, the
    momenta are averaged over ``group`` (the replicas) by the same worker / server scheme as
    :func:`compressed_all_reduce`, and the variance is frozen as a fixed preconditioner.

    Layout-exact inside a replica: the exchange is defined on each parameter's global elements
    (lowcomm/global_chunks.py), so FSDP, TP or pipeline stages inside a replica compress, scale and
    keep error feedback exactly as the unsharded replica would; the freeze's mean sqrt(v) is taken
    over the whole parameter too.
    Invariants: momenta, variances and parameters stay identical on all replicas (everyone decodes
    the same bytes); error buffers differ per rank and are saved per rank (:meth:`rank_local_state`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from meshweave.comm import ops
from meshweave.comm.codecs import compress_rows, decompress_rows
from meshweave.comm.ops import CommGroup
from meshweave.lowcomm.global_chunks import ParamLayout, chunk_numel, compressed_average, param_layout, sum_over_holders

Tensor = torch.Tensor


@dataclass
class ErrorFeedback:
    """The two error buffers of one compressed all-reduce stream (fp32, rank-specific)."""

    worker: Tensor  # [group_size * chunk_numel]: residual of this rank's own compression
    server: Tensor  # [chunk_numel]: residual of re-compressing the average of the row it serves

    @classmethod
    def zeros(cls, numel: int, group_size: int, device: torch.device | str = "cpu") -> ErrorFeedback:
        """Zero buffers sized for a ``numel``-element tensor averaged over ``group_size`` ranks."""
        length = chunk_numel(numel, group_size)
        return cls(torch.zeros(group_size * length, device=device), torch.zeros(length, device=device))


def compressed_wire_bytes(numel: int, group_size: int, chunk_size: int) -> int:
    """Bytes one rank sends in one :func:`compressed_all_reduce` (0 for a group of one)."""
    n = group_size
    if n == 1:
        return 0
    length = chunk_numel(numel, n)
    return 2 * (n - 1) * (length // 8 + 4 * math.ceil(length / chunk_size))


def compressed_all_reduce(
    x: Tensor, group: CommGroup, worker_error: Tensor, server_error: Tensor, chunk_size: int
) -> Tensor:
    """Average of ``x`` over ``group`` through 1-bit compression with error feedback (collective).

    Returns an fp32 tensor shaped like ``x``, bitwise identical on every rank. ``worker_error``
    (fp32, ``n * chunk_numel(x.numel(), n)``) and ``server_error`` (fp32, ``chunk_numel(...)``)
    are updated in place — allocate them with :meth:`ErrorFeedback.zeros` and keep them across
    calls. A group of one returns ``x`` exactly and moves nothing.
    """
    n, numel = group.size, x.numel()
    flat = x.reshape(-1).to(torch.float32)
    if n == 1:
        return flat.clone().view(x.shape)
    length = chunk_numel(numel, n)
    for name, buf, want in (("worker_error", worker_error, n * length), ("server_error", server_error, length)):
        if buf.numel() != want or buf.dtype != torch.float32:
            raise ValueError(
                f"{name} must be fp32 with {want} elements for numel={numel}, n={n}; "
                f"got {buf.dtype} x {buf.numel()} (see ErrorFeedback.zeros)"
            )
    valid = (torch.arange(n * length, device=flat.device) < numel).view(n, length)
    rows = torch.nn.functional.pad(flat, (0, n * length - numel)).view(n, length)

    signs, scales = compress_rows(rows, worker_error.view(n, length), chunk_size, valid)
    signs = signs.view(n, length // 8)
    recv_signs, recv_scales = torch.empty_like(signs), torch.empty_like(scales)
    pending = [
        ops.all_to_all_single(recv_signs, signs, group, async_op=True),
        ops.all_to_all_single(recv_scales, scales, group, async_op=True),
    ]
    for handle in pending:
        handle.wait()

    # Row i of what arrived is sender i's copy of the row this rank serves.
    mine = valid[group.rank].expand(n, length)
    received = decompress_rows(recv_signs.view(-1), recv_scales, n, length, chunk_size, mine)
    average = received.sum(dim=0, keepdim=True) / n
    my_signs, my_scales = compress_rows(average, server_error.view(1, length), chunk_size, mine[:1])

    all_signs = torch.empty(n * (length // 8), dtype=torch.uint8, device=flat.device)
    all_scales = torch.empty(n * my_scales.numel(), dtype=torch.float32, device=flat.device)
    pending = [
        ops.all_gather_into(all_signs, my_signs, group, async_op=True),
        ops.all_gather_into(all_scales, my_scales.view(-1), group, async_op=True),
    ]
    for handle in pending:
        handle.wait()
    out = decompress_rows(all_signs, all_scales.view(n, -1), n, length, chunk_size, valid)
    return out.view(-1)[:numel].view(x.shape)


def _local(t: Tensor) -> Tensor:
    """The shard this rank holds (replicas share the layout, so shards line up across the group)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _local_grad(p: Tensor) -> Tensor | None:
    g = p.grad
    if isinstance(g, DTensor):
        if any(pl.is_partial() for pl in g.placements):
            raise ValueError("OneBitAdam needs gradients reduced within the replica (got a Partial DTensor)")
        g = g.to_local()
    return g


# State that must stay fp32 whatever the parameter dtype (torch's load_state_dict would cast it).
_FP32_KEYS = ("worker_error", "server_error", "denom_floor", "v_correction")


class OneBitAdam(torch.optim.Optimizer):
    """AdamW for ``freeze_step`` steps, then 1-bit Adam: compressed momentum, frozen variance.

    Caller contract: while ``compressing`` is False, ``step()`` expects gradients averaged over
    ``group`` (the trainer's ordinary reduction); once it is True the trainer must stop reducing —
    every ``step()`` is then a collective over ``group`` in which all ranks must take part.

    Compressed phase, per parameter (``t`` = its step count, ``T`` = its count at the freeze)::

        m     <- b1 m + (1 - b1) g_local ;  m <- compressed_all_reduce(m)     (one per bucket)
        denom  = max(sqrt(v_T / (1 - b2^T)), floor) + eps                     (frozen)
        p     <- p (1 - lr wd) - lr / (1 - b1^t) * m / denom

    Bias correction: the variance's is frozen with it at ``T``; the momentum's keeps advancing, as
    in Adam, because m keeps accumulating — freezing it at ``T`` would inflate every later step by
    ``1 / (1 - b1^T)`` (2.4x for T = 5, b1 = 0.9).

    Near-zero variance: a coordinate whose gradient was ~0 throughout warm-up (a dead unit, an
    unused embedding row) has ``v ~ 0`` and would get ``denom = eps``. Its true momentum is ~0 too,
    but the sign codec sends it ``+-scale`` (the chunk RMS), so its step would be
    ``lr * scale / eps`` — about 1e8 lr — and training goes NaN. Remedy: at the freeze, ``floor =
    denom_floor_ratio * mean(sqrt(v_hat))`` over the parameter (its local shard for DTensors), or
    over its param group if that mean is 0. A dead coordinate then moves at most ``1 /
    denom_floor_ratio`` times as far as a typical one per step, and error feedback cancels the sign
    noise over later steps; coordinates with real but tiny variance get a proportionally damped
    step, as a larger eps would. ``denom_floor_ratio = 0`` disables the floor.

    State per parameter (all tensors, so DCP checkpoints them): ``step``, ``exp_avg``,
    ``exp_avg_sq``, ``worker_error`` (fp32, param-shaped), ``denom_floor``, ``v_correction``
    (``sqrt(1 - b2^T)``); the first parameter of each bucket also holds the bucket's
    ``server_error``. ``steps_done`` (global) lives in every param group. Error buffers differ per
    rank and DCP keeps one copy per key, so ``state_dict()`` leaves them out and a checkpointer
    saves :meth:`rank_local_state` per rank.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        freeze_step: int,
        group: CommGroup,
        chunk_size: int = 2048,
        denom_floor_ratio: float = 0.1,
    ) -> None:
        if freeze_step < 1:
            raise ValueError(f"freeze_step must be >= 1 (the variance needs warm-up), got {freeze_step}")
        if lr < 0 or eps < 0 or weight_decay < 0 or denom_floor_ratio < 0 or chunk_size < 1:
            raise ValueError("lr, eps, weight_decay, denom_floor_ratio must be >= 0 and chunk_size >= 1")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, steps_done=0)
        super().__init__(params, defaults)
        self.freeze_step, self.group, self.chunk_size = freeze_step, group, chunk_size
        self.denom_floor_ratio = denom_floor_ratio
        self._layouts: dict[Tensor, ParamLayout] = {}

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, but a group added mid-run joins at the current global step count."""
        if self.param_groups:
            param_group.setdefault("steps_done", self.steps_done)
        super().add_param_group(param_group)

    @property
    def steps_done(self) -> int:
        """Optimizer steps taken so far (warm-up and compressed)."""
        return int(self.param_groups[0]["steps_done"])

    @property
    def compressing(self) -> bool:
        """True when the next ``step()`` is compressed: the caller must not reduce gradients."""
        return self.steps_done >= self.freeze_step

    def _trainable(self) -> list[tuple[Tensor, dict]]:
        return [(p, g) for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _layout(self, p: Tensor) -> ParamLayout:
        """``p``'s place in the canonical exchange (computed once; a function of its layout only)."""
        if p not in self._layouts:
            self._layouts[p] = param_layout(p, self.group.size, self.chunk_size)
        return self._layouts[p]

    def _init_state(self) -> None:
        # Every trainable parameter gets its full state at the first step, gradient or not, so the
        # state's keys (which DCP loads into) are the same in both phases. Keys missing after a
        # load (the rank-local error buffers, see rank_local_state) start from zero.
        for p, _ in self._trainable():
            state = self.state[p]
            state.setdefault("step", torch.tensor(0.0))
            state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
            state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
            state.setdefault("worker_error", torch.zeros_like(p, dtype=torch.float32))
            state.setdefault("denom_floor", torch.tensor(0.0))
            state.setdefault("v_correction", torch.tensor(1.0))
            served = self._layout(p).counts[self.group.rank]
            # The part of row ``group.rank`` this rank serves; a resume onto another layout or group
            # size invalidates the residual: it restarts at zero.
            if "server_error" not in state or state["server_error"].numel() != served:
                state["server_error"] = torch.zeros(served, device=_local(p).device)

    # Error-feedback buffers differ per rank, but a DCP checkpoint keeps one copy of each key: they
    # travel in the checkpoint's per-rank file instead of the optimizer state dict.
    RANK_LOCAL = ("worker_error", "server_error")

    def state_dict(self) -> dict:
        """torch's state dict without the rank-local error buffers (see :meth:`rank_local_state`)."""
        full = super().state_dict()
        full["state"] = {
            i: {k: v for k, v in st.items() if k not in self.RANK_LOCAL} for i, st in full["state"].items()
        }
        return full

    def rank_local_state(self) -> dict[str, Tensor]:
        """This rank's error buffers (local shards), keyed by parameter position and name."""
        self._init_state()
        out = {}
        for i, (p, _) in enumerate(self._trainable()):
            for key in self.RANK_LOCAL:
                if key in self.state[p]:
                    out[f"{i}.{key}"] = _local(self.state[p][key]).detach().clone()
        return out

    def load_rank_local_state(self, saved: dict[str, Tensor]) -> None:
        """Restore :meth:`rank_local_state` from a checkpoint of the same layout."""
        self._init_state()
        for i, (p, _) in enumerate(self._trainable()):
            for key in self.RANK_LOCAL:
                target = _local(self.state[p][key]) if key in self.state[p] else None
                if f"{i}.{key}" in saved and target is not None and saved[f"{i}.{key}"].shape == target.shape:
                    target.copy_(saved[f"{i}.{key}"])

    @torch.no_grad()
    def step(self, closure=None):
        """One update; in the compressed phase a collective over ``group`` (all ranks call it)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._init_state()
        if not self.compressing:
            self._adamw_step()
        else:
            if self.steps_done == self.freeze_step:
                self._freeze_variance()
            self._compressed_step()
        for group in self.param_groups:
            group["steps_done"] += 1
        return loss

    def _adamw_step(self) -> None:
        # torch.optim.AdamW's single-tensor arithmetic, op for op, so warm-up matches it bitwise.
        for p, group in self._trainable():
            grad = _local_grad(p)
            if grad is None:
                continue
            state = self.state[p]
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            state["step"] += 1
            param, m, v = _local(p), _local(state["exp_avg"]), _local(state["exp_avg_sq"])
            if wd != 0:
                param.mul_(1 - lr * wd)
            m.lerp_(grad, 1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            step = state["step"].item()
            bias_correction2_sqrt = (1 - b2**step) ** 0.5
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            param.addcdiv_(m, denom, value=-lr / (1 - b1**step))

    def _freeze_variance(self) -> None:
        for group in self.param_groups:
            b2 = group["betas"][1]
            trainable = [p for p in group["params"] if p.requires_grad]
            for p in trainable:
                step = self.state[p]["step"].item()
                # A parameter that never had a gradient has v = 0: no correction (and no 0 / 0).
                self.state[p]["v_correction"].fill_((1 - b2**step) ** 0.5 if step > 0 else 1.0)
            # Means over each whole parameter, whatever shards this rank holds of it.
            local_sums = [
                (_local(self.state[p]["exp_avg_sq"]).sqrt() / self.state[p]["v_correction"]).double().sum().reshape(1)
                for p in trainable
            ]
            sums = [float(t) for t in sum_over_holders(list(zip(local_sums, trainable)))]
            group_mean = sum(sums) / max(sum(p.numel() for p in trainable), 1)
            for p, total in zip(trainable, sums):
                mean = total / p.numel() if p.numel() else 0.0
                self.state[p]["denom_floor"].fill_(self.denom_floor_ratio * (mean if mean > 0 else group_mean))

    def _compressed_step(self) -> None:
        for p, group in self._trainable():
            m, grad = _local(self.state[p]["exp_avg"]), _local_grad(p)
            b1 = group["betas"][0]
            if grad is None:  # still a member of the collective: its momentum decays
                m.mul_(b1)
            else:
                m.lerp_(grad, 1 - b1)
        self._average_momenta([p for p, _ in self._trainable()])
        for p, group in self._trainable():
            state = self.state[p]
            lr, b1, eps, wd = group["lr"], group["betas"][0], group["eps"], group["weight_decay"]
            state["step"] += 1
            param, m, v = _local(p), _local(state["exp_avg"]), _local(state["exp_avg_sq"])
            if wd != 0:
                param.mul_(1 - lr * wd)
            denom = torch.maximum(v.sqrt() / state["v_correction"], state["denom_floor"]).add_(eps)
            param.addcdiv_(m, denom, value=-lr / (1 - b1 ** state["step"].item()))

    def _average_momenta(self, params: list[Tensor]) -> None:
        """Replace the momenta by their compressed average over ``group`` (collective; see
        lowcomm/global_chunks.py for the canonical rows and chunks)."""
        if self.group.size == 1:  # a group of one: the momentum is its own average, nothing moves
            return
        compressed_average(
            [_local(self.state[p]["exp_avg"]).view(-1) for p in params],
            [_local(self.state[p]["worker_error"]).view(-1) for p in params],
            [self.state[p]["server_error"] for p in params],
            params,
            [self._layout(p) for p in params],
            self.group,
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore; unlike torch's default, fp32 buffers stay fp32 for low-precision parameters.

        Rank-local error buffers are not part of the state dict (torch.distributed.checkpoint
        may hand placeholders for them): they restart at zero unless
        :meth:`load_rank_local_state` follows.
        """
        state_dict = {
            **state_dict,
            "state": {
                i: {k: v for k, v in st.items() if k not in self.RANK_LOCAL and isinstance(v, Tensor)}
                for i, st in state_dict["state"].items()
            },
        }
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        keep = {
            i: {k: v.detach().clone() for k, v in state_dict["state"].get(i, {}).items() if k in _FP32_KEYS}
            for i in saved_ids
        }
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for key, value in keep[i].items():
                self.state[p][key] = (
                    value.to(device=_local(p).device, dtype=torch.float32)
                    if not isinstance(value, DTensor)
                    else value.to(dtype=torch.float32)
                )
        self._init_state()
