"""CUDA: meshweave's async collectives are issued from the comm stream and ordered by events only.

Run under ``torch.cuda.set_sync_debug_mode("error")``, where any host synchronisation raises, so a
pass means launch, compute beside it and wait never block the host. Results are compared exactly:
the values are small integers, sums of them are exact in fp32.
"""

from __future__ import annotations

import pytest
import torch

from meshweave.launch.harness import spawn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def test_work_issued_on_the_comm_stream_is_ordered_before_the_join_without_a_host_sync():
    from meshweave.comm.streams import comm_stream, issued_on_comm_stream, join_comm_stream

    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.arange(1 << 22, device=device, dtype=torch.float32)
    out = torch.empty_like(x)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with issued_on_comm_stream(device, [x, out]):
            assert torch.cuda.current_stream(device) == comm_stream(device)
            out.copy_(x * 2)  # stands in for a collective: written on the comm stream
        a = torch.randn(2048, 2048, device=device)
        beside = a @ a  # compute queued meanwhile on the compute stream
        join_comm_stream(device)
        result = out + 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(result, x * 2 + 1)
    assert beside.shape == (2048, 2048)


def _async_all_reduce_beside_compute(rank: int, world_size: int) -> bool:
    import torch.distributed as dist

    from meshweave.comm import ops

    torch.cuda.set_device(rank)
    group = ops.CommGroup(dist.new_group(backend="nccl"), "dp")
    x = torch.full((1 << 22,), float(rank + 1), device="cuda")
    ops.all_reduce(x.clone(), group)  # communicator set-up stays outside the checked region
    torch.cuda.set_sync_debug_mode("error")
    try:
        handle = ops.all_reduce(x, group, async_op=True)
        a = torch.randn(2048, 2048, device="cuda")
        a @ a
        handle.wait()
        doubled = x * 2
        exposed = ops.LEDGER.take_exposed  # events resolve at the step boundary, not here
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert "dp/all_reduce" in exposed()
    return bool(doubled.eq(2.0 * sum(range(1, world_size + 1))).all())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 GPUs")
def test_nccl_async_all_reduce_with_compute_beside_it_never_syncs_the_host():
    assert spawn(_async_all_reduce_beside_compute, 2, timeout=300) == [True, True]
