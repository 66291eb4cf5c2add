"""Every collective meshweave issues, and the ledger that accounts for it.

A collective runs on a :class:`CommGroup` — a process group plus the mesh-dimension name it
belongs to — and records ``(dim, op, bytes_sent, seconds)`` in the process-wide :data:`LEDGER`.

``bytes_sent`` is what one rank puts on the wire under the bandwidth-optimal algorithm for the op
(ring / pairwise), so it is comparable across backends and world sizes:

==================  ===========================================================
all_reduce          2 (n-1)/n x tensor bytes
all_gather          (n-1)/n x output bytes   (= (n-1) x input bytes)
reduce_scatter      (n-1)/n x input bytes
broadcast           (n-1)/n x tensor bytes   (pipelined broadcast, averaged over ranks)
all_to_all          input bytes addressed to other ranks (exact, from the split sizes)
send                tensor bytes;  recv: 0 (the sender accounts for it)
==================  ===========================================================

``seconds`` is the host-observed time from launch until :meth:`Handle.wait` returns. For an async
op that overlaps compute it is time in flight, not time exposed. Groups of size 1 move nothing and
record nothing.

**Exposed time** — how long compute actually stood still waiting for communication — is booked
per ``"<dim>/<op>"`` beside it (:meth:`CommLedger.take_exposed`, metrics.jsonl ``comm_exposed_s``):

- an async op: the time its :meth:`Handle.wait` blocks. Work done between launch and wait is
  hidden; a wait on an already finished op books ~0.
- a synchronous op (``async_op=False``): its whole duration, launch to completion — nothing ran
  beside it.
- CPU: the host clock around the blocking call (the host *is* the compute).
  CUDA: ``wait()`` does not block the host, it makes the current (compute) stream wait on the
  communication; a timing event is recorded on the compute stream just before the wait (before
  the launch, for a synchronous op) and one just after, so their elapsed time is exactly how long
  the compute stream was held up. Events are resolved when the step's figures are taken (the
  trainer already synchronises there for the loss), never on the critical path.

On CUDA every async op here is issued from the comm stream and joined by events only, never a host
sync (comm/streams.py).

Collectives torch issues itself (FSDP2, DTensor) get the same treatment where they can be seen:
see comm/capture.py for what is and is not measured there.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from meshweave.comm.streams import issued_on_comm_stream, join_comm_stream

Tensor = torch.Tensor


_GROUP_DIMS: dict[str, str] = {}
_local = threading.local()
# The newest collective this process launched: what a timeout error names.
LAST_LAUNCHED: dict[str, str] = {"dim": "-", "op": "-"}


def note_launch(dim: str, op: str) -> None:
    LAST_LAUNCHED["dim"], LAST_LAUNCHED["op"] = dim, op


def register_group(pg: dist.ProcessGroup, dim: str) -> None:
    """Name the mesh dimension ``pg`` spans, for collectives torch issues on it (see capture.py)."""
    _GROUP_DIMS[pg.group_name] = dim


def dim_of(pg: dist.ProcessGroup) -> str:
    """The registered mesh-dimension name of ``pg`` ("world" for the default group)."""
    if pg.group_name in _GROUP_DIMS:
        return _GROUP_DIMS[pg.group_name]
    return "world" if pg == dist.group.WORLD else f"group:{pg.group_name}"


@contextlib.contextmanager
def suspend_recording():
    """Collectives issued inside are not recorded again (the caller records them once)."""
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth


def recording_suspended() -> bool:
    return getattr(_local, "depth", 0) > 0


@dataclass(frozen=True)
class CommGroup:
    """A process group with the name of the mesh dimension it spans (the ledger's key)."""

    pg: dist.ProcessGroup
    dim: str

    @property
    def size(self) -> int:
        return dist.get_world_size(self.pg)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.pg)

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh, dim: str) -> CommGroup:
        """The group of ``mesh[dim]`` (a named, possibly flattened, dimension)."""
        return cls(mesh.get_group(dim), dim)

    @classmethod
    def world(cls) -> CommGroup:
        assert dist.group.WORLD is not None, "no default process group"
        return cls(dist.group.WORLD, "world")


class CommLedger:
    """Bytes, seconds, exposed seconds and call counts per ``"<dim>/<op>"``: cumulative and since
    the last step (exposed time: see the module docstring)."""

    def __init__(self) -> None:
        self.total_bytes: dict[str, int] = defaultdict(int)
        self.total_seconds: dict[str, float] = defaultdict(float)
        self.total_exposed: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._step_bytes: dict[str, int] = defaultdict(int)
        self._step_seconds: dict[str, float] = defaultdict(float)
        self._step_exposed: dict[str, float] = defaultdict(float)
        # CUDA: (key, event before the wait, event after it) on the compute stream, unresolved.
        self._pending_events: list[tuple[str, Any, Any]] = []

    def record(self, dim: str, op: str, nbytes: int, seconds: float = 0.0) -> None:
        key = f"{dim}/{op}"
        self.total_bytes[key] += nbytes
        self._step_bytes[key] += nbytes
        self.calls[key] += 1
        self.add_seconds(dim, op, seconds)

    def add_seconds(self, dim: str, op: str, seconds: float) -> None:
        key = f"{dim}/{op}"
        self.total_seconds[key] += seconds
        self._step_seconds[key] += seconds

    def add_exposed(self, dim: str, op: str, seconds: float) -> None:
        """Book ``seconds`` of compute waiting on ``dim/op`` (host-measured)."""
        key = f"{dim}/{op}"
        self.total_exposed[key] += seconds
        self._step_exposed[key] += seconds

    def add_exposed_events(self, dim: str, op: str, before: Any, after: Any) -> None:
        """Book the compute-stream stall between two recorded CUDA timing events, resolved later."""
        self._pending_events.append((f"{dim}/{op}", before, after))

    def _resolve_events(self) -> None:
        pending, self._pending_events = self._pending_events, []
        for key, before, after in pending:
            after.synchronize()
            seconds = before.elapsed_time(after) / 1e3
            self.total_exposed[key] += seconds
            self._step_exposed[key] += seconds

    def take_exposed(self) -> dict[str, float]:
        """Exposed seconds per key since the previous call (CUDA events resolved here); keys with
        traffic but no wait are absent."""
        self._resolve_events()
        out = dict(self._step_exposed)
        self._step_exposed.clear()
        return out

    def take_step(self) -> tuple[dict[str, int], dict[str, float]]:
        """Bytes and seconds per key since the previous call, then start a new step."""
        out = dict(self._step_bytes), dict(self._step_seconds)
        self._step_bytes.clear()
        self._step_seconds.clear()
        return out

    def cumulative_bytes(self) -> int:
        return sum(self.total_bytes.values())

    def reset(self) -> None:
        self.total_bytes.clear()
        self.total_seconds.clear()
        self.total_exposed.clear()
        self.calls.clear()
        self._step_bytes.clear()
        self._step_seconds.clear()
        self._step_exposed.clear()
        self._pending_events.clear()


LEDGER = CommLedger()


def stall_begin(device: torch.device | None) -> float | tuple[Any, Any]:
    """Mark the point where compute starts waiting on communication: the host clock, or on CUDA a
    timing event recorded on ``device``'s current (compute) stream, with that stream. Pass the mark
    to :func:`stall_end`."""
    if device is not None and device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event, stream
    return time.perf_counter()


def stall_end(mark: float | tuple[Any, Any], dim: str, op: str) -> None:
    """Book the wait since ``mark`` (from :func:`stall_begin`) as exposed time of ``dim/op``: on
    CUDA an event recorded after the wait on the same stream; their gap is the stream's stall."""
    if isinstance(mark, float):
        LEDGER.add_exposed(dim, op, time.perf_counter() - mark)
    else:
        before, stream = mark
        after = torch.cuda.Event(enable_timing=True)
        after.record(stream)
        LEDGER.add_exposed_events(dim, op, before, after)


class Handle:
    """An in-flight collective. ``wait()`` blocks until done (on CUDA: orders the current stream
    after it) and books its time and its exposed time once.

    ``stall``: for a synchronous op, the mark taken before the launch, so the whole op counts as
    exposed; async ops take their mark when ``wait()`` is called.
    """

    def __init__(
        self,
        work: dist.Work | list[dist.Work] | None,
        dim: str,
        op: str,
        started: float,
        device: torch.device | None = None,
        stall: float | tuple[Any, Any] | None = None,
    ) -> None:
        self._work, self._dim, self._op, self._started = work, dim, op, started
        self._device, self._stall = device, stall
        self._done = work is None

    def wait(self) -> None:
        if self._done:
            return
        mark = self._stall if self._stall is not None else stall_begin(self._device)
        for work in self._works():
            work.wait()
        if self._stall is None:  # async: issued from the comm stream
            join_comm_stream(self._device)
        self._done = True
        stall_end(mark, self._dim, self._op)
        LEDGER.add_seconds(self._dim, self._op, time.perf_counter() - self._started)

    def is_completed(self) -> bool:
        return self._done or all(w.is_completed() for w in self._works())

    def _works(self) -> list[dist.Work]:
        if self._work is None:
            return []
        return self._work if isinstance(self._work, list) else [self._work]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def wire_bytes(kind: str, nbytes: int, n: int) -> int:
    """Bytes one of ``n`` ranks sends for a collective of ``kind`` on a tensor of ``nbytes``
    (the input for gather / scatter / all-to-all): the table in the module docstring."""
    return {
        "all_reduce": 2 * (n - 1) * nbytes // n,
        "gather": (n - 1) * nbytes,
        "scatter": (n - 1) * nbytes // n,
        "bcast": (n - 1) * nbytes // n,
        "a2a": (n - 1) * nbytes // n,
        "p2p": nbytes,
    }[kind]


def _launch(group: CommGroup, op: str, nbytes: int, fn, async_op: bool, tensors: Sequence[Tensor]) -> Handle:
    """Record, launch ``fn`` (which returns the async work), and wait at once unless ``async_op``.
    ``tensors``: every tensor the collective reads or writes (on CUDA an async op is issued from
    the comm stream, comm/streams.py, and they are kept alive on it; exposed time uses events)."""
    device = tensors[0].device if tensors else None
    started = time.perf_counter()
    stall = None if async_op else stall_begin(device)
    LEDGER.record(group.dim, op, nbytes)
    note_launch(group.dim, op)
    issued_on = issued_on_comm_stream(device, tensors) if async_op else contextlib.nullcontext()
    with suspend_recording(), issued_on:
        work = fn()
    handle = Handle(work, group.dim, op, started, device, stall)
    if not async_op:
        handle.wait()
    return handle


_DONE = Handle(None, "", "", 0.0)


def all_reduce(
    t: Tensor, group: CommGroup, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, async_op: bool = False
) -> Handle:
    """In-place all-reduce of ``t`` over ``group`` (collective: every member calls it).

    Use SUM and divide yourself rather than AVG: gloo's AVG has produced wrong results.
    """
    n = group.size
    if n == 1:
        return _DONE
    return _launch(
        group,
        "all_reduce",
        wire_bytes("all_reduce", _nbytes(t), n),
        lambda: dist.all_reduce(t, op=op, group=group.pg, async_op=True),
        async_op,
        [t],
    )


def all_gather_into(out: Tensor, t: Tensor, group: CommGroup, async_op: bool = False) -> Handle:
    """Gather every member's ``t`` into ``out`` (``[n * t.shape[0], ...]``, rank order)."""
    n = group.size
    if n == 1:
        out.copy_(t)
        return _DONE
    return _launch(
        group,
        "all_gather",
        wire_bytes("gather", _nbytes(t), n),
        lambda: dist.all_gather_single(out, t, group=group.pg, async_op=True),
        async_op,
        [t, out],
    )


def reduce_scatter_into(
    out: Tensor, t: Tensor, group: CommGroup, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, async_op: bool = False
) -> Handle:
    """Reduce ``t`` (``[n * out.shape[0], ...]``) over ``group``; this rank keeps its chunk."""
    n = group.size
    if n == 1:
        out.copy_(t)
        return _DONE
    return _launch(
        group,
        "reduce_scatter",
        wire_bytes("scatter", _nbytes(t), n),
        lambda: dist.reduce_scatter_single(out, t, op=op, group=group.pg, async_op=True),
        async_op,
        [t, out],
    )


def broadcast(t: Tensor, group: CommGroup, src_group_rank: int = 0, async_op: bool = False) -> Handle:
    """Overwrite ``t`` on every member with the copy held by group rank ``src_group_rank``."""
    n = group.size
    if n == 1:
        return _DONE
    src = dist.get_global_rank(group.pg, src_group_rank)
    return _launch(
        group,
        "broadcast",
        wire_bytes("bcast", _nbytes(t), n),
        lambda: dist.broadcast(t, src=src, group=group.pg, async_op=True),
        async_op,
        [t],
    )


def all_to_all_single(
    out: Tensor,
    t: Tensor,
    group: CommGroup,
    out_splits: Sequence[int] | None = None,
    in_splits: Sequence[int] | None = None,
    async_op: bool = False,
) -> Handle:
    """Exchange dim-0 chunks of ``t``: chunk i goes to group rank i (uneven with split sizes)."""
    n = group.size
    if n == 1:
        out.copy_(t)
        return _DONE
    row = _nbytes(t) // max(t.shape[0], 1)
    rows = list(in_splits) if in_splits is not None else [t.shape[0] // n] * n
    sent = (sum(rows) - rows[group.rank]) * row
    return _launch(
        group,
        "all_to_all",
        sent,
        lambda: dist.all_to_all_single(out, t, out_splits, in_splits, group=group.pg, async_op=True),
        async_op,
        [t, out],
    )


def send(t: Tensor, group: CommGroup, dst_group_rank: int) -> Handle:
    """Point-to-point send to group rank ``dst_group_rank`` (async; wait before reusing ``t``)."""
    dst = dist.get_global_rank(group.pg, dst_group_rank)
    return _launch(group, "send", _nbytes(t), lambda: dist.isend(t, dst=dst, group=group.pg), True, [t])


def recv(t: Tensor, group: CommGroup, src_group_rank: int) -> Handle:
    """Point-to-point receive into ``t`` from group rank ``src_group_rank`` (async)."""
    src = dist.get_global_rank(group.pg, src_group_rank)
    return _launch(group, "recv", 0, lambda: dist.irecv(t, src=src, group=group.pg), True, [t])


def exchange(sends: Sequence[tuple[Tensor, int]], recvs: Sequence[tuple[Tensor, int]], group: CommGroup) -> Handle:
    """Post a batch of point-to-point sends and receives at once (async; wait before touching them).

    ``sends`` / ``recvs`` are ``(tensor, peer group rank)`` pairs. Every rank must post its batch
    in an order consistent with its peers' (sends and receives between two ranks matched in
    sequence) — on NCCL the batch is one coalesced launch, which is what keeps ring schedules free
    of deadlocks. Books the sent bytes as one ``send`` entry.
    """
    if not sends and not recvs:
        return _DONE
    to_global = lambda peer: dist.get_global_rank(group.pg, peer)  # noqa: E731

    def launch():
        ops = [dist.P2POp(dist.isend, t, to_global(peer), group.pg) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, to_global(peer), group.pg) for t, peer in recvs]
        return dist.batch_isend_irecv(ops)

    tensors = [t for t, _ in (*sends, *recvs)]
    return _launch(group, "send", sum(_nbytes(t) for t, _ in sends), launch, True, tensors)


def barrier(group: CommGroup) -> None:
    """Block until every member arrives (moves no payload)."""
    if group.size > 1:
        _launch(group, "barrier", 0, lambda: dist.barrier(group=group.pg, async_op=True), False, [])


def all_reduce_scalars(
    values: Sequence[float], group: CommGroup, device: torch.device, dtype: torch.dtype = torch.float64
) -> list[float]:
    """SUM-reduce a few Python numbers in one collective; returns the sums as floats."""
    t = torch.tensor(list(values), dtype=dtype, device=device)
    all_reduce(t, group)
    return t.tolist()
