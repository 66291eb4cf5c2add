"""Specification of exposed communication time: what the ledger books as compute waiting on comm.

Exposed time is the part of a collective compute stood still for: an async op books the time its
``wait()`` blocks (and nothing before it is waited), a synchronous op its whole duration; the same
holds for the collectives torch issues itself (comm/capture.py): synchronous ``torch.distributed``
calls, ``async_op=True`` works waited later, functional collectives waited on first use.

No wall-clock thresholds: the tests check presence, absence, non-negativity, and the logical
invariant exposed <= issued seconds of the same op (the wait is part of the time in flight). The
one lower bound used is physical: a wait that sleeps ``s`` seconds blocks for at least ``s``.
The multi-process part is one 2-rank gloo job for the module.
"""

from __future__ import annotations

import time

import pytest
import torch

from meshweave.comm import ops
from meshweave.comm.ops import LEDGER, CommLedger, Handle
from meshweave.launch.harness import spawn

pytestmark = pytest.mark.dist

SLEEP_S = 0.02


class _SlowWork:
    """A stand-in for ``dist.Work`` whose wait blocks ``SLEEP_S`` seconds."""

    def wait(self) -> bool:
        time.sleep(SLEEP_S)
        return True

    def is_completed(self) -> bool:
        return False


class _FakeEvent:
    """A stand-in for a CUDA timing event: ``elapsed_time`` in ms, as torch.cuda.Event."""

    def __init__(self, ms: float) -> None:
        self.ms, self.synchronized = ms, False

    def synchronize(self) -> None:
        self.synchronized = True

    def elapsed_time(self, other: _FakeEvent) -> float:
        return other.ms - self.ms


# --------------------------------------------------------------------------------------------
# the ledger and the handle, without a process group


def test_async_handle_books_its_blocking_wait_as_exposed():
    LEDGER.reset()
    handle = Handle(_SlowWork(), "dp", "all_reduce", time.perf_counter())  # type: ignore[arg-type]
    assert LEDGER.take_exposed() == {}  # launched, not waited: nothing exposed yet
    handle.wait()
    handle.wait()  # a second wait books nothing more
    exposed = LEDGER.take_exposed()
    assert set(exposed) == {"dp/all_reduce"}
    assert exposed["dp/all_reduce"] >= SLEEP_S  # it blocked at least as long as the work slept
    assert exposed["dp/all_reduce"] <= LEDGER.total_seconds["dp/all_reduce"]
    assert LEDGER.take_exposed() == {}  # taken: the next step starts empty
    LEDGER.reset()


def test_cuda_event_pairs_resolve_when_the_step_is_taken():
    ledger = CommLedger()
    before, after = _FakeEvent(10.0), _FakeEvent(12.5)
    ledger.add_exposed_events("tp", "all_gather", before, after)
    ledger.add_exposed("tp", "all_gather", 0.5)
    assert not after.synchronized  # nothing synchronises before the figures are asked for
    assert ledger.take_exposed() == {"tp/all_gather": pytest.approx(0.5 + 2.5e-3)}
    assert after.synchronized
    assert ledger.total_exposed["tp/all_gather"] == pytest.approx(0.5025)
    ledger.reset()
    assert ledger.take_exposed() == {} and dict(ledger.total_exposed) == {}


def test_cuda_wait_is_timed_by_events_on_the_compute_stream(monkeypatch):
    # No GPU here: fake CUDA events whose timestamps are the GPU clock of the stream they were
    # recorded on, to check the wiring — both events on the device's current stream, resolved late.

    clock = {"ms": 100.0}
    recorded: list[tuple[str, str]] = []

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.ms = None

        def record(self, stream=None) -> None:
            recorded.append(("record", stream))
            self.ms = clock["ms"]

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, other) -> float:
            return other.ms - self.ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"compute-stream-of-{device}")
    # An async op was issued from the comm stream (comm/streams.py): the wait joins it, between
    # the two events, so the stall it causes is counted too.
    monkeypatch.setattr(ops, "join_comm_stream", lambda device: recorded.append(("join", str(device))))
    LEDGER.reset()
    device = torch.device("cuda", 1)

    class Work:
        def wait(self) -> None:
            clock["ms"] += 40.0  # the compute stream stalls 40 ms behind the communication

        def is_completed(self) -> bool:
            return False

    Handle(Work(), "tp", "all_gather", time.perf_counter(), device).wait()  # type: ignore[arg-type]
    assert recorded == [
        ("record", "compute-stream-of-cuda:1"),
        ("join", "cuda:1"),
        ("record", "compute-stream-of-cuda:1"),
    ]
    assert LEDGER.take_exposed() == {"tp/all_gather": pytest.approx(0.040)}
    LEDGER.reset()


# --------------------------------------------------------------------------------------------
# one 2-rank job: ops.py collectives and the ones torch issues


def exposed_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    from meshweave.comm import capture, ops

    capture.install()
    pg = dist.new_group(list(range(world)))
    ops.register_group(pg, "cap")
    group = ops.CommGroup(dist.group.WORLD, "dp")
    out: dict[str, dict] = {}

    def take(name: str) -> None:
        out[name] = {"exposed": LEDGER.take_exposed(), "seconds": LEDGER.take_step()[1]}

    LEDGER.reset()
    ops.all_reduce(torch.ones(1000), group)
    take("sync")

    handle = ops.all_reduce(torch.ones(1000), group, async_op=True)
    take("async_before_wait")
    handle.wait()
    take("async_after_wait")

    dist.all_gather_into_tensor(torch.empty(2000), torch.ones(1000), group=pg)
    take("torch_sync")

    work = dist.all_gather_into_tensor(torch.empty(2000), torch.ones(1000), group=pg, async_op=True)
    take("torch_async_before_wait")
    work.wait()
    take("torch_async_after_wait")

    reduced = funcol.all_reduce(torch.ones(1000), "sum", pg)
    take("funcol_before_use")
    total = float(reduced.sum())  # first use waits
    take("funcol_after_use")
    out["funcol_value"] = {"sum": total}
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return spawn(exposed_worker, 2, timeout=120)


def _check(entry: dict, key: str) -> None:
    assert key in entry["exposed"], entry
    assert 0.0 <= entry["exposed"][key] <= entry["seconds"][key]


def test_synchronous_collective_is_exposed_for_its_whole_duration(results):
    for r in results:
        _check(r["sync"], "dp/all_reduce")


def test_async_collective_is_exposed_only_once_waited(results):
    for r in results:
        assert r["async_before_wait"]["exposed"] == {}
        _check(r["async_after_wait"], "dp/all_reduce")


def test_synchronous_torch_collective_is_exposed_under_its_registered_dim(results):
    for r in results:
        _check(r["torch_sync"], "cap/all_gather")


def test_async_torch_work_is_exposed_when_its_wait_blocks(results):
    for r in results:
        assert r["torch_async_before_wait"]["exposed"] == {}
        _check(r["torch_async_after_wait"], "cap/all_gather")


def test_functional_collective_is_exposed_at_its_first_use(results):
    for r in results:
        assert r["funcol_before_use"]["exposed"] == {}
        _check(r["funcol_after_use"], "cap/all_reduce")
        assert r["funcol_value"]["sum"] == 2000.0  # the wrapped wait still returns the reduced data
