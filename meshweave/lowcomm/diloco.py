"""Streaming DiLoCo: infrequent, staggered, overlapped and quantized synchronisation of replicas.

M replicas (the ``dp_replicate`` groups; each may be FSDP / TP / PP inside) train independently
with their inner optimizer. Every H steps each parameter is synchronised once through an *outer*
step: the replicas average their outer gradients ``delta = global - local`` and apply SGD with
Nesterov momentum to fp32 *global* weights, which then replace (or mix into) the local ones.
:class:`StreamingDiLoCo` is driven by one call per inner step, :meth:`StreamingDiLoCo.after_inner_step`.

Fragments (strided). Decoder layer ``i`` (key ``str(i)`` of ``model.layers``, a global index, so
every pipeline stage agrees) belongs to fragment ``i % P``. ``embed_tokens`` and any other
parameter outside the layers go with fragment 0; ``norm`` and ``lm_head`` with the fragment of the
highest-indexed layer of ``model.layers`` (the one that feeds them). A tied head weight is the
embedding's parameter and stays in fragment 0. Frozen parameters never change, so they never sync.
A fragment may be empty on a pipeline stage; it then moves nothing.

Schedule. With spacing ``S = H / P``, fragment p *applies* at every global step ``t >= 1`` with
``t % H == (p + 1) * S % H`` (vanilla DiLoCo, P = 1: multiples of H), so over any H steps each
fragment syncs exactly once and the syncs are S steps apart: the peak bytes of a step drop ~P x.
Its outer gradient is *launched* tau steps earlier, at ``t - tau``, as an async collective that
runs under the next tau inner steps. Requiring ``0 <= tau < S`` keeps at most one fragment in
flight and every launch after its fragment's previous apply. Everything is a function of the
1-based global step, which every replica shares, so all replicas issue the same collectives in the
same order (choosing by a local counter would deadlock).

Wire. fp32: one async ``all_reduce`` (SUM, then divided by M: gloo's AVG is unreliable) of the
fragment's outer gradient, flattened into one vector of the local shards. 4-bit (``fp4`` / ``int4``,
:mod:`meshweave.comm.codecs`): each replica quantizes its delta and ``all_gather``-s codes and
scales; on arrival every replica dequantizes all M contributions (its own included) and sums them
in fp32 in rank order, so all replicas get the same bits. An all-gather rather than a
reduce-scatter + all-gather pair: the two-phase scheme re-quantizes partial sums (two quantization
errors, and a range growing with M) to send ``2 (M-1)/M`` instead of ``(M-1)`` half-bytes per
element -- the same at M = 2, 2x at M = 4, and DiLoCo runs M = 2..4. A finiteness flag rides with
the scales because a quantizer may map NaN / inf to finite codes.

Apply. At ``t`` the collective is waited for, then (as ``torch.optim.SGD(nesterov=True)`` does it)
``m = mu m + delta; global -= lr (delta + mu m)`` and ``local = lerp(global, local, alpha) =
(1 - alpha) global + alpha local``; alpha = 0 copies the global weights exactly. With tau > 0 the
local weights moved on for tau steps after the launch; alpha decides how much of that is kept.

End of training. :meth:`StreamingDiLoCo.finish`, called after the last inner step, leaves one
model: the fragment in flight is applied at once, every fragment not synced at that step gets one
more (blocking) outer step, and every replica adopts the global weights exactly (alpha only shapes
mid-run merges). Without it a streaming run would end with fragment global weights up to H - H / P
steps old, and the last launch would be bytes sent for nothing. A fragment whose final sync fails
keeps each replica's local weights (the checkpoint holds them per replica).

Failures. If the collective raises (on launch or wait), or the averaged outer gradient is not
finite, the fragment keeps its previous global weights and momentum, the local weights are left
alone, ``failed_syncs`` grows and ``last_event`` says why. A NaN on any replica poisons the sum on
every replica, so they all take the same decision; the ranks of one sharded replica agree through
an optional group (``agree``). A collective that raises on some ranks only is beyond repair here:
the process group is then broken and the trainer must restart from a checkpoint.

Checkpoints. :meth:`StreamingDiLoCo.state_dict` holds only tensors, one per parameter for global
weights and momentum (DTensors shaped like the parameter when it is one, so DCP can reshard), plus
scalars. Taken between a launch and its apply, it waits for the in-flight result and stores the
*already outer-stepped* global weights and momentum of that fragment (computed out of place, the
live state is untouched) with a marker "merge pending at step t"; a resumed run then only merges
at t. The trajectory is bit-identical to an uninterrupted run and the checkpoint stays two fp32
copies of the model; the only visible difference is that :meth:`global_weights` in the <= tau
steps before t already shows that fragment's new global weights.

Invariants: all replicas hold bit-identical global weights and momentum at all times (they start
from identical weights: the trainer initialises every replica from the same seed or checkpoint);
the global weights change only at an apply step; the ledger books a sync's bytes at its launch step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from meshweave.comm import ops
from meshweave.comm.codecs import dequantize_4bit, quantize_4bit
from meshweave.comm.ops import CommGroup, Handle
from meshweave.config import DiLoCoConfig
from meshweave.models.family import family_of

Tensor = torch.Tensor
log = logging.getLogger(__name__)


def applying_fragment(cfg: DiLoCoConfig, step: int) -> int | None:
    """The fragment whose outer step is applied after global step ``step`` (1-based), if any."""
    if step < 1:
        return None
    spacing = cfg.inner_steps // cfg.fragments
    phase = step % cfg.inner_steps
    fragment = (phase if phase else cfg.inner_steps) // spacing - 1
    return fragment if phase % spacing == 0 else None


def launching_fragment(cfg: DiLoCoConfig, step: int) -> int | None:
    """The fragment whose outer gradient is launched after global step ``step``, if any."""
    return applying_fragment(cfg, step + cfg.delay)


@dataclass
class _InFlight:
    """One fragment's outer gradient between launch and apply."""

    fragment: int
    apply_step: int
    handles: list[Handle] = field(default_factory=list)
    buffers: tuple[Tensor, ...] = ()
    numel: int = 0
    # After a wait (or a resume) the averaged delta, or None with ``error`` set when the sync failed.
    resolved: bool = False
    average: Tensor | None = None
    error: str = ""
    # Resumed from a checkpoint: global / momentum already carry the outer step; only merge.
    merge_only: bool = False


class StreamingDiLoCo:
    """The outer loop of Streaming DiLoCo for the local shards of ``model`` across ``group``.

    ``group`` spans the replicas: the ranks holding the same position in every replica (the
    ``dp_replicate`` dimension), all with the same layout, so their local shards line up. When a
    replica spans several ranks (FSDP / TP / PP), pass ``agree`` = a group holding all of them (the
    world will do: every rank syncs the same fragment at the same step) so that all parts of a
    replica fail or apply a sync together, for one 4-byte all-reduce per sync.

    For the trainer to log: ``failed_syncs``, ``applied_syncs``, ``last_event`` (the latest sync's
    outcome) and ``fragment_of`` (parameter name -> fragment).
    """

    def __init__(
        self, model: nn.Module, group: CommGroup, settings: DiLoCoConfig, agree: CommGroup | None = None
    ) -> None:
        settings.validate()
        self.model, self.group, self.settings, self.agree = model, group, settings, agree
        self.failed_syncs = 0
        self.applied_syncs = 0
        self.last_event: str | None = None
        self._inflight: _InFlight | None = None
        self._applied_at: dict[int, int] = {}  # fragment -> the step of its latest successful apply

        self.fragment_of: dict[str, int] = family_of(model).fragments(model, settings.fragments)
        named = dict(model.named_parameters())
        self._names = [n for n in named if n in self.fragment_of]
        self._params = [named[n] for n in self._names]
        self._members: list[list[int]] = [[] for _ in range(settings.fragments)]
        for i, name in enumerate(self._names):
            self._members[self.fragment_of[name]].append(i)
        with torch.no_grad():
            self._global = [_local(p).detach().float().clone() for p in self._params]
        self._momentum = [torch.zeros_like(g) for g in self._global]
        self._device = self._global[0].device if self._global else torch.device("cpu")

    # ---------------------------------------------------------------- the per-step driver

    def after_inner_step(self, step: int) -> None:
        """Launch and / or apply the outer step due after global step ``step`` (1-based, the
        same on every replica). Call it after every inner optimizer step, also after a resume."""
        if self._inflight is not None and self._inflight.apply_step < step:
            # Only possible when the schedule changed across a resume: never merge stale weights.
            stale, self._inflight = self._inflight, None
            self._fail(step, stale.fragment, f"outer gradient due at step {stale.apply_step} was never applied")
        launching = launching_fragment(self.settings, step)
        if launching is not None:
            self._launch(launching, step + self.settings.delay)
        applying = applying_fragment(self.settings, step)
        if applying is not None:
            if self._inflight is None or self._inflight.apply_step != step:
                self._fail(step, applying, "no outer gradient in flight (delay changed across a resume?)")
            else:
                self._apply(step)

    def _launch(self, fragment: int, apply_step: int) -> None:
        flight = _InFlight(fragment, apply_step)
        self._inflight = flight
        members = self._members[fragment]
        with torch.no_grad():
            delta = (
                torch.cat([(self._global[i] - _local(self._params[i]).float()).reshape(-1) for i in members])
                if members
                else torch.zeros(0, device=self._device)
            )
        flight.numel = delta.numel()
        if delta.numel() == 0:
            flight.buffers = (delta,)
            return
        try:
            if self.settings.quantize == "none":
                flight.buffers = (delta,)
                flight.handles = [ops.all_reduce(delta, self.group, async_op=True)]
            else:
                flight.buffers, flight.handles = self._launch_quantized(delta)
        except Exception as exc:  # noqa: BLE001 - any launch failure is a failed sync, by contract
            flight.error = f"launch raised {type(exc).__name__}: {exc}"

    def _launch_quantized(self, delta: Tensor) -> tuple[tuple[Tensor, ...], list[Handle]]:
        n = self.group.size
        codes, scales = quantize_4bit(delta, self.settings.quantize, self.settings.chunk_size)
        codes = codes.reshape(-1).contiguous()
        finite = torch.isfinite(delta).all().to(torch.float32).reshape(1)
        side = torch.cat([scales.reshape(-1).to(torch.float32), finite])
        all_codes = torch.empty(n * codes.numel(), dtype=codes.dtype, device=codes.device)
        all_side = torch.empty(n * side.numel(), dtype=side.dtype, device=side.device)
        handles = [
            ops.all_gather_into(all_codes, codes, self.group, async_op=True),
            ops.all_gather_into(all_side, side, self.group, async_op=True),
        ]
        return (all_codes, all_side), handles

    def _resolve(self, flight: _InFlight) -> None:
        """Wait for ``flight`` and set its averaged outer gradient (or its error) once; every rank
        calls this at the same step (apply or checkpoint), so the agreement below is collective."""
        if flight.resolved:
            return
        flight.resolved = True
        if not flight.error:
            flight.average, flight.error = self._receive(flight)
        if self.agree is not None:
            # The parts of a sharded replica sync through different groups: without this, a NaN in
            # one shard would fail its part while the others apply theirs.
            ok = torch.tensor([0.0 if flight.error else 1.0], device=self._device)
            try:
                ops.all_reduce(ok, self.agree, op=dist.ReduceOp.MIN)
            except Exception as exc:  # noqa: BLE001 - no agreement is a failed sync
                ok.zero_()
                flight.error = flight.error or f"agreement raised {type(exc).__name__}: {exc}"
            if ok.item() == 0.0 and not flight.error:
                flight.error = "another rank of this replica failed its part of the sync"

    def _receive(self, flight: _InFlight) -> tuple[Tensor | None, str]:
        """``(averaged outer gradient, "")`` or ``(None, why the sync failed)``."""
        try:
            for handle in flight.handles:
                handle.wait()
        except Exception as exc:  # noqa: BLE001 - a raising collective is a failed sync, by contract
            return None, f"collective raised {type(exc).__name__}: {exc}"
        if self.settings.quantize == "none" or not flight.handles:
            total = flight.buffers[0]
        else:
            all_codes, all_side = flight.buffers
            decoded = self._decode_sum(all_codes, all_side, flight.numel)
            if decoded is None:
                return None, "a replica's outer gradient was not finite"
            total = decoded
        average = total.div_(self.group.size)
        if not bool(torch.isfinite(average).all()):
            return None, "the averaged outer gradient is not finite"
        return average, ""

    def _decode_sum(self, all_codes: Tensor, all_side: Tensor, numel: int) -> Tensor | None:
        n, kind, chunk = self.group.size, self.settings.quantize, self.settings.chunk_size
        codes, side = all_codes.view(n, -1), all_side.view(n, -1)
        if not bool((side[:, -1] == 1).all()):
            return None
        total = None
        for r in range(n):  # rank order, the same on every replica: identical sums everywhere
            part = dequantize_4bit(codes[r], side[r, :-1], numel, kind, chunk).to(torch.float32)
            total = part if total is None else total.add_(part)
        return total

    def _apply(self, step: int, adopt: bool = False) -> bool:
        """Wait for the fragment in flight and apply its outer step (``adopt``: merge with alpha 0);
        False when the sync failed."""
        flight, self._inflight = self._inflight, None
        assert flight is not None, "no fragment in flight"
        self._resolve(flight)
        if flight.error:
            self._fail(step, flight.fragment, flight.error)
            return False
        members = self._members[flight.fragment]
        with torch.no_grad():
            if not flight.merge_only:
                assert flight.average is not None  # resolved without error
                self._outer_step(members, flight.average, self._global, self._momentum)
            alpha = 0.0 if adopt else self.settings.alpha
            for i in members:
                local = _local(self._params[i])
                if alpha == 0.0:
                    local.copy_(self._global[i])
                else:
                    local.copy_(torch.lerp(self._global[i], local.float(), alpha))
        self.applied_syncs += 1
        self._applied_at[flight.fragment] = step
        self.last_event = f"step {step}: fragment {flight.fragment} synced"
        return True

    def finish(self, step: int) -> str:
        """End training after inner step ``step`` (call after :meth:`after_inner_step` of that
        step, on every replica): apply the fragment in flight now, give every fragment not synced
        at ``step`` one more outer step, and load the global weights into the model (alpha is
        ignored), so every replica ends holding the same weights. Returns what it did."""
        synced: dict[int, bool] = {}
        scheduled = applying_fragment(self.settings, step)
        if scheduled is not None:  # applied by after_inner_step, merged with alpha
            synced[scheduled] = self._applied_at.get(scheduled) == step
            if synced[scheduled] and self.settings.alpha:
                with torch.no_grad():
                    for i in self._members[scheduled]:
                        _local(self._params[i]).copy_(self._global[i])
        if self._inflight is not None:
            fragment = self._inflight.fragment
            synced[fragment] = self._apply(step, adopt=True)
        for fragment in range(self.settings.fragments):
            if fragment not in synced:
                self._launch(fragment, step)
                synced[fragment] = self._apply(step, adopt=True)
        ok = sorted(f for f, done in synced.items() if done)
        failed = sorted(f for f, done in synced.items() if not done)
        return f"final sync: fragments {ok} hold the global weights on every replica" + (
            f"; fragments {failed} failed and keep each replica's weights" if failed else ""
        )

    def _outer_step(self, members: list[int], average: Tensor, global_: list[Tensor], momentum: list[Tensor]) -> None:
        lr, mu = self.settings.outer_lr, self.settings.outer_momentum
        offset = 0
        for i in members:
            g = global_[i]
            delta = average[offset : offset + g.numel()].view_as(g)
            offset += g.numel()
            momentum[i].mul_(mu).add_(delta)
            g.add_(delta.add(momentum[i], alpha=mu), alpha=-lr)

    def _fail(self, step: int, fragment: int, why: str) -> None:
        self.failed_syncs += 1
        self.last_event = f"step {step}: fragment {fragment} sync failed ({why}); kept the previous global weights"
        log.warning("diloco: %s", self.last_event)

    # ---------------------------------------------------------------- eval and checkpoints

    @contextlib.contextmanager
    def global_weights(self) -> Iterator[None]:
        """Temporarily load the global weights into the model (evaluate them: they score best)."""
        with torch.no_grad():
            saved = [_local(p).clone() for p in self._params]
            for p, g in zip(self._params, self._global):
                _local(p).copy_(g)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self._params, saved):
                    _local(p).copy_(s)

    def state_dict(self) -> dict[str, Tensor]:
        """Outer state as tensors only: ``global/<param>``, ``momentum/<param>``, ``failed_syncs``,
        ``applied_syncs``, ``pending_step`` / ``pending_fragment`` / ``pending_ok`` (merge due).
        Between a launch and its apply this waits for the sync (and agrees over ``agree``): call it
        on every rank at the same step, as checkpointing does."""
        global_, momentum = list(self._global), list(self._momentum)
        pending_step, pending_fragment, pending_ok = -1, -1, 0
        flight = self._inflight
        if flight is not None:
            self._resolve(flight)
            pending_step, pending_fragment, pending_ok = flight.apply_step, flight.fragment, int(not flight.error)
            if not flight.error and not flight.merge_only:
                members = self._members[flight.fragment]
                for i in members:
                    global_[i], momentum[i] = global_[i].clone(), momentum[i].clone()
                assert flight.average is not None  # resolved without error
                with torch.no_grad():
                    self._outer_step(members, flight.average, global_, momentum)
        out: dict[str, Tensor] = {}
        for name, p, g, m in zip(self._names, self._params, global_, momentum):
            out[f"global/{name}"] = _like_param(p, g)
            out[f"momentum/{name}"] = _like_param(p, m)
        for key, value in (
            ("failed_syncs", self.failed_syncs),
            ("applied_syncs", self.applied_syncs),
            ("pending_step", pending_step),
            ("pending_fragment", pending_fragment),
            ("pending_ok", pending_ok),
        ):
            out[key] = torch.tensor(value, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (possibly through DCP, onto this layout)."""
        with torch.no_grad():
            for i, name in enumerate(self._names):
                self._global[i].copy_(_plain(state[f"global/{name}"]))
                self._momentum[i].copy_(_plain(state[f"momentum/{name}"]))
        self.failed_syncs = int(state["failed_syncs"])
        self.applied_syncs = int(state["applied_syncs"])
        self._inflight = None
        if int(state["pending_step"]) >= 0:
            ok = bool(int(state["pending_ok"]))
            self._inflight = _InFlight(
                int(state["pending_fragment"]),
                int(state["pending_step"]),
                resolved=True,
                merge_only=True,
                error="" if ok else "the outer gradient failed before the checkpoint",
            )


# -------------------------------------------------------------------- helpers


def _local(p: Tensor) -> Tensor:
    """The tensor this rank holds of ``p`` (its shard when ``p`` is a DTensor)."""
    return p.to_local() if isinstance(p, DTensor) else p


def _like_param(p: Tensor, t: Tensor) -> Tensor:
    """``t`` (a local shard) as a DTensor laid out like ``p``, or ``t`` itself for a plain ``p``."""
    if not isinstance(p, DTensor):
        return t
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _plain(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
