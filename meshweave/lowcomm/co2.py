"""CO2 (Sun et al., ICLR 2024): local updating, the outer all-reduce hidden under the whole next round.

M replicas (the ``dp_replicate`` groups; each may be FSDP / TP / PP inside) train apart from a
shared *anchor* with their inner optimizer. Round ``r`` is global steps ``rH + 1 .. (r+1)H``.
After the round's last inner step every replica (:meth:`CO2.after_inner_step`):

1. takes its pseudo-gradient ``delta_r = anchor_r - local`` (fp32, its local shards);
2. waits for the all-reduce launched one round earlier (``delta_{r-1}`` summed over replicas,
   divided by M on arrival): it has had the whole of round r to travel, so on a link that moves
   the model in less than H steps of compute this wait is ~0 — the exchange is fully hidden;
3. launches the async all-reduce of ``delta_r``, consumed at the end of round r+1;
4. takes the outer step with the one-round-stale average ``avg = mean delta_{r-1}``::

       m = mu m + avg / gap_penalty          staleness-gap penalty (lambda >= 1)
       m = clamp(m, -clip, clip)             outer-update clipping (clip = 0: off)
       anchor_{r+1} = anchor_r - outer_lr m

5. loads ``anchor_{r+1}`` into the model, so round r+1 starts from the same weights everywhere.

At the end of round 0 nothing is in flight: round 1 restarts from ``anchor_0`` and round 0's
progress lands at the end of round 1 — the one round of staleness that buys the full overlap.
Penalty and clipping are those of the authors' released implementation (fairscale-CO2's
``CO2DistributedDataParallel``): the stale pseudo-gradient enters the momentum divided by the
constant ``gap_penalty``, and the momentum is clamped element-wise (their code computes the
clamp but drops its result; here it is applied). Unlike Streaming DiLoCo's Nesterov step, the
momentum is heavy-ball, as theirs.

End of training (:meth:`CO2.finish`): a partial last round ends as a full one would, then the
round in flight is waited for and applied at once, so the final weights hold every round's
progress and every replica ends with the same model.

Failures, as in meshweave.lowcomm.diloco: a raising collective or a non-finite average skips
that outer step (anchor and momentum unchanged, ``failed_syncs`` grows, ``last_event`` says
why); the ranks of a sharded replica agree through ``agree`` (one 4-byte all-reduce per round),
and the model still restarts from the anchor, so the replicas stay identical.

Checkpoints (:meth:`CO2.state_dict`) hold anchor and momentum (one tensor per parameter, laid
out like it, so DCP reshards them) and the round in flight *resolved*: saving waits for it and
stores its averaged pseudo-gradient (``pending/<param>``, with ``pending_ok``), which a resumed
run applies at the next round end exactly as the uninterrupted run would — the trajectory is
bit-identical, for a third fp32 copy of the model in the checkpoint.

Invariants: all replicas hold bit-identical anchor and momentum; the anchor changes only at a
round end; all replicas issue the same collectives in the same order (everything is a function
of the 1-based global step); the ledger books a round's bytes at its launch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from meshweave.comm import ops
from meshweave.comm.ops import CommGroup, Handle
from meshweave.config import CO2Config
from meshweave.lowcomm.diloco import _like_param, _local, _plain

Tensor = torch.Tensor
log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """One round's pseudo-gradient between launch and use."""

    round: int
    handles: list[Handle] = field(default_factory=list)
    buffer: Tensor | None = None
    resolved: bool = False
    average: Tensor | None = None  # after resolution, unless ``error``
    error: str = ""


class CO2:
    """The outer loop of CO2 for the local shards of ``model`` across ``group`` (the replicas).

    ``group``: the ranks holding the same position in every replica (``dp_replicate``), all with
    the same layout. ``agree``: a group holding every rank of a replica (the world will do), so
    that all parts of a sharded replica apply or skip a round together.

    For the trainer to log: ``failed_syncs``, ``applied_syncs``, ``last_event``.
    """

    def __init__(self, model: nn.Module, group: CommGroup, settings: CO2Config, agree: CommGroup | None = None) -> None:
        settings.validate()
        self.group, self.settings, self.agree = group, settings, agree
        self.failed_syncs = 0
        self.applied_syncs = 0
        self.last_event: str | None = None
        self._inflight: _InFlight | None = None
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        with torch.no_grad():
            self._anchor = [_local(p).detach().float().clone() for p in self._params]
        self._momentum = [torch.zeros_like(a) for a in self._anchor]
        self._device = self._anchor[0].device if self._anchor else torch.device("cpu")

    # ---------------------------------------------------------------- the per-step driver

    def after_inner_step(self, step: int) -> None:
        """End the round if global step ``step`` (1-based, the same on every replica) is its last.
        Call after every inner optimizer step, also after a resume."""
        if step % self.settings.inner_steps == 0:
            self._round_end(step)

    def _round_end(self, step: int) -> None:
        with torch.no_grad():
            delta = (
                torch.cat([(a - _local(p).float()).reshape(-1) for a, p in zip(self._anchor, self._params)])
                if self._anchor
                else torch.zeros(0, device=self._device)
            )
        stale, self._inflight = self._inflight, None
        if stale is not None:
            self._resolve(stale)
        self._inflight = self._launch(delta, -(-step // self.settings.inner_steps) - 1)
        if stale is not None:
            self._apply(step, stale)
        self._load_anchor()

    def _launch(self, delta: Tensor, round_: int) -> _InFlight:
        flight = _InFlight(round_, buffer=delta)
        if delta.numel():
            try:
                flight.handles = [ops.all_reduce(delta, self.group, async_op=True)]
            except Exception as exc:  # noqa: BLE001 - any launch failure is a failed round, by contract
                flight.error = f"launch raised {type(exc).__name__}: {exc}"
        return flight

    def _resolve(self, flight: _InFlight) -> None:
        """Wait for ``flight`` and set its average (or its error) once; every rank calls this at
        the same step (round end, checkpoint or finish), so the agreement is collective."""
        if flight.resolved:
            return
        flight.resolved = True
        if not flight.error:
            try:
                for handle in flight.handles:
                    handle.wait()
            except Exception as exc:  # noqa: BLE001 - a raising collective is a failed round
                flight.error = f"collective raised {type(exc).__name__}: {exc}"
        if not flight.error:
            assert flight.buffer is not None  # set at launch
            flight.average = flight.buffer.div_(self.group.size)
            if not bool(torch.isfinite(flight.average).all()):
                flight.error = "the averaged pseudo-gradient is not finite"
        flight.buffer = None
        if self.agree is not None:
            ok = torch.tensor([0.0 if flight.error else 1.0], device=self._device)
            try:
                ops.all_reduce(ok, self.agree, op=dist.ReduceOp.MIN)
            except Exception as exc:  # noqa: BLE001 - no agreement is a failed round
                ok.zero_()
                flight.error = flight.error or f"agreement raised {type(exc).__name__}: {exc}"
            if ok.item() == 0.0 and not flight.error:
                flight.error = "another rank of this replica failed its part of the round"

    def _apply(self, step: int, flight: _InFlight) -> None:
        """The outer step with ``flight``'s (resolved) average, or a failed round."""
        if flight.error:
            self.failed_syncs += 1
            self.last_event = f"step {step}: round {flight.round} outer step skipped ({flight.error}); anchor kept"
            log.warning("co2: %s", self.last_event)
            return
        assert flight.average is not None  # resolved without error
        s, offset = self.settings, 0
        with torch.no_grad():
            for anchor, m in zip(self._anchor, self._momentum):
                avg = flight.average[offset : offset + anchor.numel()].view_as(anchor)
                offset += anchor.numel()
                m.mul_(s.outer_momentum).add_(avg, alpha=1.0 / s.gap_penalty)
                if s.clip > 0:
                    m.clamp_(-s.clip, s.clip)
                anchor.add_(m, alpha=-s.outer_lr)
        self.applied_syncs += 1
        self.last_event = f"step {step}: round {flight.round} applied"

    def _load_anchor(self) -> None:
        with torch.no_grad():
            for p, anchor in zip(self._params, self._anchor):
                _local(p).copy_(anchor)

    def finish(self, step: int) -> str:
        """End training after inner step ``step`` (after :meth:`after_inner_step` of that step, on
        every replica): end a partial round, then wait for and apply the round in flight, so the
        model holds every round's progress, the same on every replica. Returns what it did."""
        if step % self.settings.inner_steps:
            self._round_end(step)
        flight, self._inflight = self._inflight, None
        if flight is None:
            return "final sync: nothing in flight"
        failed = self.failed_syncs
        self._resolve(flight)
        self._apply(step, flight)
        self._load_anchor()
        if self.failed_syncs != failed:
            return f"final sync failed ({flight.error}); every replica holds the anchor without the last round"
        return f"final sync: round {flight.round} applied, every replica holds the anchor"

    # ---------------------------------------------------------------- eval and checkpoints

    @contextlib.contextmanager
    def global_weights(self) -> Iterator[None]:
        """Temporarily load the anchor into the model (the replicas' common weights)."""
        with torch.no_grad():
            saved = [_local(p).clone() for p in self._params]
        self._load_anchor()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self._params, saved):
                    _local(p).copy_(s)

    def state_dict(self) -> dict[str, Tensor]:
        """``anchor/<param>``, ``momentum/<param>``, ``pending/<param>`` (the round in flight,
        resolved: call on every rank at the same step, as checkpointing does), ``pending_ok``
        (-1: nothing in flight, 0: it failed, 1: it holds an average), ``pending_round``,
        ``failed_syncs``, ``applied_syncs``."""
        flight = self._inflight
        ok = -1
        if flight is not None:
            self._resolve(flight)
            ok = 0 if flight.error else 1
        out: dict[str, Tensor] = {}
        offset = 0
        for name, p, anchor, m in zip(self._names, self._params, self._anchor, self._momentum):
            out[f"anchor/{name}"] = _like_param(p, anchor)
            out[f"momentum/{name}"] = _like_param(p, m)
            pending = torch.zeros_like(anchor)
            if ok == 1:
                assert flight is not None and flight.average is not None
                pending = flight.average[offset : offset + anchor.numel()].view_as(anchor)
            out[f"pending/{name}"] = _like_param(p, pending)
            offset += anchor.numel()
        for key, value in (
            ("pending_ok", ok),
            ("pending_round", flight.round if flight is not None else -1),
            ("failed_syncs", self.failed_syncs),
            ("applied_syncs", self.applied_syncs),
        ):
            out[key] = torch.tensor(value, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (possibly through DCP, onto this layout)."""
        with torch.no_grad():
            for i, name in enumerate(self._names):
                self._anchor[i].copy_(_plain(state[f"anchor/{name}"]))
                self._momentum[i].copy_(_plain(state[f"momentum/{name}"]))
        self.failed_syncs = int(state["failed_syncs"])
        self.applied_syncs = int(state["applied_syncs"])
        ok, self._inflight = int(state["pending_ok"]), None
        if ok >= 0:
            flight = _InFlight(int(state["pending_round"]), resolved=True)
            if ok:
                flight.average = torch.cat([_plain(state[f"pending/{n}"]).float().reshape(-1) for n in self._names])
            else:
                flight.error = "the round in flight failed before the checkpoint"
            self._inflight = flight
