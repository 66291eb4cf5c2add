"""The comm stream: where meshweave's asynchronous collectives are issued on CUDA.

Every async collective of :mod:`meshweave.comm.ops` (the data-parallel buckets, ring / TokenRing /
Ulysses exchanges, expert dispatch, DiLoCo / CO2 outer syncs, 1-bit Adam's exchanges) is launched
from one dedicated stream per device instead of the compute stream, and ordered by events only:

- launch: the comm stream first waits on the compute stream (an event: the inputs the compute
  stream wrote are ready), then the collective is issued from it. NCCL's own stream follows the
  issuing stream, so later compute never sits behind the launch in one stream's queue.
- wait (:meth:`~meshweave.comm.ops.Handle.wait`): NCCL's ``Work.wait`` orders the caller's stream
  after the collective, and the caller's stream waits on the comm stream: both are stream waits,
  the host does not block.
- memory: every tensor the collective reads or writes is marked used on the comm stream
  (``record_stream``), so the caching allocator cannot hand its memory to compute-stream work while
  the collective may still touch it, even if the caller drops its reference early.

Off CUDA (gloo on CPU) there are no streams: the context is a no-op and the host wait in ``Work``
is the ordering. Synchronous collectives stay on the caller's stream (nothing would run beside
them). Nothing here synchronises the host; tests/gpu/ checks that under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

Tensor = torch.Tensor

_STREAMS: dict[int, torch.cuda.Stream] = {}


def comm_stream(device: torch.device) -> torch.cuda.Stream:
    """The comm stream of CUDA ``device`` (one per device and process, created on first use)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=torch.device("cuda", index))
    return _STREAMS[index]


@contextlib.contextmanager
def issued_on_comm_stream(device: torch.device | None, tensors: Sequence[Tensor]) -> Iterator[None]:
    """Run the body (which issues an async collective on ``tensors``) from ``device``'s comm
    stream, after everything already queued on the current stream; a no-op off CUDA."""
    if device is None or device.type != "cuda":
        yield
        return
    compute = torch.cuda.current_stream(device)
    comm = comm_stream(device)
    comm.wait_stream(compute)
    with torch.cuda.stream(comm):
        yield
    for t in tensors:
        t.record_stream(comm)


def join_comm_stream(device: torch.device | None) -> None:
    """Order the current stream after everything issued so far on ``device``'s comm stream (an
    event wait, no host sync); a no-op off CUDA. Called by a handle's ``wait``."""
    if device is not None and device.type == "cuda":
        torch.cuda.current_stream(device).wait_stream(comm_stream(device))
