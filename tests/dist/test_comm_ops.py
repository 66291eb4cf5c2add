"""Specification of the accounted comm layer on real gloo process groups.

Each collective in ``meshweave.comm.ops`` must produce the right values and book in ``LEDGER``
exactly the bytes of the module docstring's table under ``"<dim>/<op>"``; groups of one book
nothing. ``GradientReducer`` must leave every rank with the sum over ranks of the local gradients.

The multi-process work runs once per module (one 4-rank job for the ops, one 2-rank job for the
reducer, see ``meshweave.launch.harness.spawn``); each test then checks one behaviour of the recorded results.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meshweave.launch.harness import spawn
from meshweave.comm.ops import CommGroup, CommLedger
from meshweave.comm.overlap import GradientReducer

pytestmark = pytest.mark.dist

OPS_WORLD = 4
# A 2 x 2 mesh ("rep", "shard"): rank = 2 * rep_index + shard_index, so the "shard" group of a rank
# is its row {0, 1} / {2, 3} and its "rep" group is its column {0, 2} / {1, 3}.
MESH_SHAPE = (2, 2)


def shard_peers(rank: int) -> list[int]:
    return [rank - rank % 2, rank - rank % 2 + 1]


def rep_peers(rank: int) -> list[int]:
    return [rank % 2, rank % 2 + 2]


def uneven_split(src: int, dst: int) -> int:
    """Rows rank ``src`` sends to rank ``dst`` in the uneven all-to-all (1..3, asymmetric)."""
    return (src + 2 * dst) % 3 + 1


def uneven_rows(src: int, dst: int) -> torch.Tensor:
    """The rows ``src`` sends to ``dst``: each value names (src, dst, row) so misrouting shows."""
    n = uneven_split(src, dst)
    return (src * 100 + dst * 10 + torch.arange(n, dtype=torch.float32))[:, None].repeat(1, 3)


# --------------------------------------------------------------------------------------------
# the ops job


def ops_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from meshweave.comm import ops
    from meshweave.comm.ops import LEDGER

    mesh = init_device_mesh("cpu", MESH_SHAPE, mesh_dim_names=("rep", "shard"))
    world_g = CommGroup(dist.group.WORLD, "dp")
    shard = CommGroup.from_mesh(mesh, "shard")
    rep = CommGroup.from_mesh(mesh, "rep")
    solo_pgs = [dist.new_group([r]) for r in range(world)]  # collective: every rank creates all
    solo = CommGroup(solo_pgs[rank], "solo")
    results: dict[str, dict] = {}

    def record(name: str, value) -> None:
        results[name] = {"value": value, "bytes": dict(LEDGER.total_bytes), "calls": dict(LEDGER.calls),
                         "seconds": dict(LEDGER.total_seconds)}
        LEDGER.reset()

    LEDGER.reset()
    results["group_sizes"] = {"world": world_g.size, "shard": shard.size, "rep": rep.size, "solo": solo.size,
                              "shard_rank": shard.rank, "rep_rank": rep.rank}

    t = torch.full((6,), float(rank + 1))
    ops.all_reduce(t, world_g)
    record("all_reduce", t)

    t = torch.full((6,), float(rank + 1), dtype=torch.float64)
    ops.all_reduce(t, shard)
    record("all_reduce_shard", t)

    t = torch.full((6,), float(rank + 1))
    handle = ops.all_reduce(t, world_g, async_op=True)
    handle.wait()
    completed = handle.is_completed()
    handle.wait()  # a second wait books nothing more
    record("all_reduce_async", (t, completed))

    t = rank * 10 + torch.arange(6, dtype=torch.float32).view(2, 3)
    out = torch.empty(2 * world, 3)
    ops.all_gather_into(out, t, world_g)
    record("all_gather", out)

    t = torch.arange(2 * world * 3, dtype=torch.float32).view(2 * world, 3) * (rank + 1)
    out = torch.empty(2, 3)
    ops.reduce_scatter_into(out, t, world_g)
    record("reduce_scatter", out)

    t = torch.full((5,), float(rank), dtype=torch.float64)
    ops.broadcast(t, rep, src_group_rank=1)
    record("broadcast_rep", t)

    t = (rank * 100 + torch.arange(2 * world, dtype=torch.float32))[:, None].repeat(1, 2)
    out = torch.empty(2 * world, 2)
    ops.all_to_all_single(out, t, world_g)
    record("all_to_all_even", out)

    in_splits = [uneven_split(rank, dst) for dst in range(world)]
    out_splits = [uneven_split(src, rank) for src in range(world)]
    t = torch.cat([uneven_rows(rank, dst) for dst in range(world)])
    out = torch.empty(sum(out_splits), 3)
    ops.all_to_all_single(out, t, world_g, out_splits=out_splits, in_splits=in_splits)
    record("all_to_all_uneven", out)

    send_buf = torch.full((7,), float(rank), dtype=torch.float64)
    recv_buf = torch.empty(7, dtype=torch.float64)
    handles = [ops.send(send_buf, world_g, (rank + 1) % world), ops.recv(recv_buf, world_g, (rank - 1) % world)]
    for h in handles:
        h.wait()
    record("send_recv_ring", recv_buf)

    # within the "shard" group: group rank 0 sends to group rank 1 (global ranks differ per row)
    buf = torch.full((4,), float(rank))
    if shard.rank == 0:
        ops.send(buf, shard, 1).wait()
    else:
        ops.recv(buf, shard, 0).wait()
    record("send_recv_shard", buf)

    values = {}
    t = torch.full((3,), float(rank))
    ops.all_reduce(t, solo)
    values["all_reduce"] = t
    t, out = torch.full((2, 3), float(rank)), torch.empty(2, 3)
    ops.all_gather_into(out, t, solo)
    values["all_gather"] = out
    out = torch.empty(2, 3)
    ops.reduce_scatter_into(out, t, solo)
    values["reduce_scatter"] = out
    t = torch.full((3,), float(rank))
    ops.broadcast(t, solo)
    values["broadcast"] = t
    t, out = torch.full((2, 3), float(rank)), torch.empty(2, 3)
    ops.all_to_all_single(out, t, solo)
    values["all_to_all"] = out
    ops.barrier(solo)
    values["all_reduce_scalars"] = ops.all_reduce_scalars([1.5, float(rank)], solo, torch.device("cpu"))
    record("solo", values)

    sums = ops.all_reduce_scalars([1.5, float(rank)], world_g, torch.device("cpu"))
    record("all_reduce_scalars", sums)
    return results


@pytest.fixture(scope="module")
def ops_results() -> list[dict]:
    return spawn(ops_worker, OPS_WORLD, timeout=90)


F32, F64 = 4, 8  # bytes per element


def test_groups_have_the_expected_sizes(ops_results):
    for rank, r in enumerate(ops_results):
        assert r["group_sizes"] == {"world": 4, "shard": 2, "rep": 2, "solo": 1,
                                    "shard_rank": rank % 2, "rep_rank": rank // 2}


def test_all_reduce_sums_over_the_group(ops_results):
    for r in ops_results:
        assert torch.equal(r["all_reduce"]["value"], torch.full((6,), 10.0))  # 1 + 2 + 3 + 4


def test_all_reduce_books_two_n_minus_one_over_n_of_the_tensor(ops_results):
    for r in ops_results:
        assert r["all_reduce"]["bytes"] == {"dp/all_reduce": 2 * 3 * 6 * F32 // 4}
        assert r["all_reduce"]["calls"] == {"dp/all_reduce": 1}


def test_all_reduce_on_a_mesh_dimension_is_keyed_by_that_dimension(ops_results):
    for rank, r in enumerate(ops_results):
        expected = float(sum(p + 1 for p in shard_peers(rank)))
        assert torch.equal(r["all_reduce_shard"]["value"], torch.full((6,), expected, dtype=torch.float64))
        assert r["all_reduce_shard"]["bytes"] == {"shard/all_reduce": 2 * 1 * 6 * F64 // 2}


def test_async_all_reduce_is_complete_after_wait_and_books_its_time_once(ops_results):
    for r in ops_results:
        value, completed = r["all_reduce_async"]["value"]
        assert torch.equal(value, torch.full((6,), 10.0))
        assert completed
        assert r["all_reduce_async"]["bytes"] == {"dp/all_reduce": 36}
        assert r["all_reduce_async"]["calls"] == {"dp/all_reduce": 1}
        assert r["all_reduce_async"]["seconds"]["dp/all_reduce"] > 0


def test_all_gather_concatenates_in_rank_order(ops_results):
    expected = torch.cat([src * 10 + torch.arange(6, dtype=torch.float32).view(2, 3) for src in range(4)])
    for r in ops_results:
        assert torch.equal(r["all_gather"]["value"], expected)


def test_all_gather_books_n_minus_one_times_the_input(ops_results):
    for r in ops_results:
        # (n-1) x input bytes = (n-1)/n x output bytes = 3 x 24 = 72
        assert r["all_gather"]["bytes"] == {"dp/all_gather": 3 * 6 * F32}


def test_reduce_scatter_keeps_this_ranks_chunk_of_the_sum(ops_results):
    full_sum = torch.arange(24, dtype=torch.float32).view(8, 3) * 10  # (1 + 2 + 3 + 4) x arange
    for rank, r in enumerate(ops_results):
        assert torch.equal(r["reduce_scatter"]["value"], full_sum[2 * rank:2 * rank + 2])


def test_reduce_scatter_books_n_minus_one_over_n_of_the_input(ops_results):
    for r in ops_results:
        assert r["reduce_scatter"]["bytes"] == {"dp/reduce_scatter": 3 * (24 * F32) // 4}


def test_broadcast_copies_from_the_source_group_rank(ops_results):
    for rank, r in enumerate(ops_results):
        src_global = rep_peers(rank)[1]  # group rank 1 of this rank's "rep" column
        assert torch.equal(r["broadcast_rep"]["value"], torch.full((5,), float(src_global), dtype=torch.float64))


def test_broadcast_books_n_minus_one_over_n_of_the_tensor(ops_results):
    for r in ops_results:
        assert r["broadcast_rep"]["bytes"] == {"rep/broadcast": 1 * 5 * F64 // 2}


def test_even_all_to_all_delivers_chunk_i_to_rank_i(ops_results):
    for rank, r in enumerate(ops_results):
        expected = torch.cat([(src * 100 + torch.arange(2 * rank, 2 * rank + 2, dtype=torch.float32))
                              for src in range(4)])[:, None].repeat(1, 2)
        assert torch.equal(r["all_to_all_even"]["value"], expected)


def test_even_all_to_all_books_the_bytes_addressed_to_other_ranks(ops_results):
    for r in ops_results:
        # 8 rows of 2 floats, 2 rows stay home: 6 x 8 bytes
        assert r["all_to_all_even"]["bytes"] == {"dp/all_to_all": 6 * 2 * F32}


def test_uneven_all_to_all_follows_the_split_sizes(ops_results):
    for rank, r in enumerate(ops_results):
        expected = torch.cat([uneven_rows(src, rank) for src in range(4)])
        assert torch.equal(r["all_to_all_uneven"]["value"], expected)


def test_uneven_all_to_all_books_exactly_the_rows_sent_away(ops_results):
    for rank, r in enumerate(ops_results):
        rows_away = sum(uneven_split(rank, dst) for dst in range(4) if dst != rank)
        assert r["all_to_all_uneven"]["bytes"] == {"dp/all_to_all": rows_away * 3 * F32}


def test_send_recv_moves_the_tensor_around_a_ring(ops_results):
    for rank, r in enumerate(ops_results):
        assert torch.equal(r["send_recv_ring"]["value"], torch.full((7,), float((rank - 1) % 4), dtype=torch.float64))


def test_send_books_the_tensor_and_recv_books_nothing(ops_results):
    for r in ops_results:
        assert r["send_recv_ring"]["bytes"] == {"dp/send": 7 * F64, "dp/recv": 0}
        assert r["send_recv_ring"]["calls"] == {"dp/send": 1, "dp/recv": 1}


def test_send_recv_address_group_ranks_within_a_subgroup(ops_results):
    for rank, r in enumerate(ops_results):
        sender = shard_peers(rank)[0]
        assert torch.equal(r["send_recv_shard"]["value"], torch.full((4,), float(sender)))
        expected = {"shard/send": 4 * F32} if rank == sender else {"shard/recv": 0}
        assert r["send_recv_shard"]["bytes"] == expected


def test_groups_of_one_give_identity_results(ops_results):
    for rank, r in enumerate(ops_results):
        v = r["solo"]["value"]
        for op in ("all_reduce", "broadcast"):
            assert torch.equal(v[op], torch.full((3,), float(rank))), op
        for op in ("all_gather", "reduce_scatter", "all_to_all"):
            assert torch.equal(v[op], torch.full((2, 3), float(rank))), op
        assert v["all_reduce_scalars"] == [1.5, float(rank)]


def test_groups_of_one_record_nothing(ops_results):
    for r in ops_results:
        assert r["solo"]["bytes"] == {} and r["solo"]["calls"] == {} and r["solo"]["seconds"] == {}


def test_all_reduce_scalars_sums_python_numbers_in_one_collective(ops_results):
    for r in ops_results:
        assert r["all_reduce_scalars"]["value"] == [6.0, 6.0]  # 4 x 1.5, 0 + 1 + 2 + 3
        assert r["all_reduce_scalars"]["calls"] == {"dp/all_reduce": 1}
        assert r["all_reduce_scalars"]["bytes"] == {"dp/all_reduce": 2 * 3 * 2 * F64 // 4}


# --------------------------------------------------------------------------------------------
# the ledger itself (no process group needed)


def test_ledger_keys_by_dim_and_op_and_accumulates():
    ledger = CommLedger()
    ledger.record("dp", "all_reduce", 100, 0.5)
    ledger.record("dp", "all_reduce", 20)
    ledger.record("tp", "all_gather", 7)
    assert dict(ledger.total_bytes) == {"dp/all_reduce": 120, "tp/all_gather": 7}
    assert dict(ledger.calls) == {"dp/all_reduce": 2, "tp/all_gather": 1}
    assert ledger.total_seconds["dp/all_reduce"] == 0.5
    assert ledger.cumulative_bytes() == 127


def test_ledger_take_step_returns_the_step_and_starts_a_new_one():
    ledger = CommLedger()
    ledger.record("dp", "all_reduce", 100, 0.25)
    assert ledger.take_step() == ({"dp/all_reduce": 100}, {"dp/all_reduce": 0.25})
    ledger.record("dp", "all_reduce", 5)
    assert ledger.take_step() == ({"dp/all_reduce": 5}, {"dp/all_reduce": 0.0})
    assert ledger.take_step() == ({}, {})
    assert ledger.total_bytes["dp/all_reduce"] == 105  # cumulative totals survive steps


def test_ledger_reset_clears_everything():
    ledger = CommLedger()
    ledger.record("dp", "all_reduce", 100, 1.0)
    ledger.reset()
    assert ledger.cumulative_bytes() == 0 and dict(ledger.calls) == {} and ledger.take_step() == ({}, {})


# --------------------------------------------------------------------------------------------
# GradientReducer


class Net(nn.Module):
    """Three float64 linears (several buckets at 200 bytes) and a ``spare`` layer forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
        self.spare = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_net() -> Net:
    torch.manual_seed(0)  # identical initial weights on every rank
    return Net().double()


# Parameter bytes in registration order: 192, 48, 288, 48, 144, 24 (body), 32, 16 (spare).
# Reversed and packed greedily into 200-byte buckets:
# [spare.bias 16, spare.weight 32, body.4.bias 24] [body.4.weight 144, body.2.bias 48]
# [body.2.weight 288] [body.0.bias 48] [body.0.weight 192]
# At 300 bytes: [16, 32, 24, 144, 48] [288] [48, 192].
BUCKET_BYTES = 200
EXPECTED_BUCKETS = 5


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(5, 4, generator=gen, dtype=torch.float64),
            torch.randn(5, 3, generator=gen, dtype=torch.float64))


def local_grads(seeds: list[int]) -> dict[str, torch.Tensor]:
    """Gradients one rank accumulates over micro-batches ``seeds`` (zeros where none arrives)."""
    net = make_net()
    for seed in seeds:
        x, y = batch(seed)
        ((net(x) - y) ** 2).sum().backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in net.named_parameters()}


def summed(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {n: sum(g[n] for g in per_rank) for n in per_rank[0]}


def reducer_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from meshweave.comm.ops import LEDGER

    group = CommGroup(dist.group.WORLD, "dp")
    results: dict[str, dict] = {}

    def grads_of(net: Net) -> dict[str, torch.Tensor | None]:
        return {n: (None if p.grad is None else p.grad.clone()) for n, p in net.named_parameters()}

    # one step, then a second with new data, with and without overlap
    for overlap in (True, False):
        net = make_net()
        reducer = GradientReducer(net.parameters(), group, bucket_bytes=BUCKET_BYTES, overlap=overlap)
        steps = []
        for step_seed in (100, 300):
            net.zero_grad(set_to_none=True)
            LEDGER.reset()
            x, y = batch(step_seed + rank)
            ((net(x) - y) ** 2).sum().backward()
            launched_in_backward = LEDGER.calls.get("dp/all_reduce", 0)
            reducer.finish()
            steps.append({"grads": grads_of(net), "launched_in_backward": launched_in_backward,
                          "calls": dict(LEDGER.calls), "bytes": dict(LEDGER.total_bytes)})
        results[f"overlap={overlap}"] = {
            "steps": steps,
            "expected": [summed([local_grads([s + r]) for r in range(world)]) for s in (100, 300)],
            "num_buckets": reducer.num_buckets,
            "spare_buckets": sum(any(p is q for q in net.spare.parameters() for p in b.params)
                                 for b in reducer.buckets),
            "param_bytes": sum(p.numel() * p.element_size() for p in net.parameters()),
        }
        reducer.remove_hooks()

    # gradient accumulation: micro-batch 1 under no_sync, micro-batch 2 synchronised
    for overlap in (True, False):
        net = make_net()
        reducer = GradientReducer(net.parameters(), group, bucket_bytes=BUCKET_BYTES, overlap=overlap)
        LEDGER.reset()
        with reducer.no_sync():
            x, y = batch(100 + rank)
            ((net(x) - y) ** 2).sum().backward()
        calls_after_no_sync = LEDGER.calls.get("dp/all_reduce", 0)
        x, y = batch(200 + rank)
        ((net(x) - y) ** 2).sum().backward()
        reducer.finish()
        results[f"no_sync overlap={overlap}"] = {
            "grads": grads_of(net),
            "expected": summed([local_grads([100 + r, 200 + r]) for r in range(world)]),
            "calls_after_no_sync": calls_after_no_sync,
            "calls": dict(LEDGER.calls),
            "num_buckets": reducer.num_buckets,
        }
        reducer.remove_hooks()

    # scale multiplies the sum: 1 / world is the mean over ranks
    net = make_net()
    reducer = GradientReducer(net.parameters(), group, bucket_bytes=BUCKET_BYTES, scale=1.0 / world)
    x, y = batch(100 + rank)
    ((net(x) - y) ** 2).sum().backward()
    reducer.finish()
    results["scale"] = {"grads": grads_of(net),
                        "expected": {n: g / world for n, g in summed([local_grads([100 + r])
                                                                      for r in range(world)]).items()}}
    return results


REDUCER_WORLD = 2


@pytest.fixture(scope="module")
def reducer_results() -> list[dict]:
    return spawn(reducer_worker, REDUCER_WORLD, timeout=90)


# float64 gradients of a 3-layer MLP: the reduced and the locally summed values differ at most by
# summation order, a few ulp of 2.2e-16 on O(10) values; 1e-12 is far above that and far below
# any real mistake (a missing or doubled rank contribution is O(1)).
GRAD_TOL = 1e-12


def assert_grads_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] is not None, f"{name} has no gradient after finish()"
        torch.testing.assert_close(got[name], expected[name], atol=GRAD_TOL, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_reducer_leaves_every_rank_with_the_sum_of_local_gradients(reducer_results, overlap):
    for r in reducer_results:
        res = r[f"overlap={overlap}"]
        assert res["num_buckets"] == EXPECTED_BUCKETS
        assert_grads_equal(res["steps"][0]["grads"], res["expected"][0])


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_reducer_is_correct_again_on_the_next_step(reducer_results, overlap):
    for r in reducer_results:
        res = r[f"overlap={overlap}"]
        assert_grads_equal(res["steps"][1]["grads"], res["expected"][1])


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_parameter_without_gradient_is_reduced_as_zeros(reducer_results, overlap):
    for r in reducer_results:
        for step in r[f"overlap={overlap}"]["steps"]:
            for name in ("spare.weight", "spare.bias"):
                g = step["grads"][name]
                assert g is not None and torch.equal(g, torch.zeros_like(g)), name


def test_overlap_launches_every_bucket_with_all_gradients_during_backward(reducer_results):
    for r in reducer_results:
        res = r["overlap=True"]
        # buckets holding the unused spare layer can only be launched by finish()
        assert res["spare_buckets"] == 1
        for step in res["steps"]:
            assert step["launched_in_backward"] == res["num_buckets"] - res["spare_buckets"]


def test_without_overlap_nothing_is_launched_during_backward(reducer_results):
    for r in reducer_results:
        for step in r["overlap=False"]["steps"]:
            assert step["launched_in_backward"] == 0


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_each_step_reduces_each_bucket_once_and_books_all_gradient_bytes(reducer_results, overlap):
    for r in reducer_results:
        res = r[f"overlap={overlap}"]
        for step in res["steps"]:
            assert step["calls"] == {"dp/all_reduce": res["num_buckets"]}
            # all_reduce books 2 (n-1)/n x bytes per bucket; n = 2 makes that the bytes themselves
            assert step["bytes"] == {"dp/all_reduce": res["param_bytes"]}


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_no_sync_accumulates_locally_then_reduces_the_sum_once(reducer_results, overlap):
    for r in reducer_results:
        res = r[f"no_sync overlap={overlap}"]
        assert res["calls_after_no_sync"] == 0
        assert res["calls"] == {"dp/all_reduce": res["num_buckets"]}
        assert_grads_equal(res["grads"], res["expected"])


def test_scale_multiplies_the_reduced_sum(reducer_results):
    for r in reducer_results:
        assert_grads_equal(r["scale"]["grads"], r["scale"]["expected"])


# --------------------------------------------------------------------------------------------
# bucketing (construction only: no process group needed)


NO_GROUP = CommGroup(None, "dp")  # the constructor only stores the group


def bucket_bytes_of(reducer: GradientReducer) -> list[int]:
    return [sum(p.numel() * p.element_size() for p in b.params) for b in reducer.buckets]


def test_buckets_follow_reverse_registration_order():
    net = make_net()
    reducer = GradientReducer(net.parameters(), NO_GROUP, bucket_bytes=BUCKET_BYTES)
    flat = [p for b in reducer.buckets for p in b.params]
    assert [id(p) for p in flat] == [id(p) for p in reversed(list(net.parameters()))]
    reducer.remove_hooks()


@pytest.mark.parametrize("bucket_bytes,expected", [(10**9, 1), (1, 8), (BUCKET_BYTES, EXPECTED_BUCKETS), (300, 3)])
def test_num_buckets_respects_bucket_bytes(bucket_bytes, expected):
    net = make_net()
    reducer = GradientReducer(net.parameters(), NO_GROUP, bucket_bytes=bucket_bytes)
    assert reducer.num_buckets == expected
    for size, bucket in zip(bucket_bytes_of(reducer), reducer.buckets):
        assert size <= bucket_bytes or len(bucket.params) == 1  # only a lone parameter may exceed it
    reducer.remove_hooks()


def test_bucket_is_full_before_a_new_one_starts():
    net = make_net()
    reducer = GradientReducer(net.parameters(), NO_GROUP, bucket_bytes=BUCKET_BYTES)
    sizes = bucket_bytes_of(reducer)
    first_of_next = [b.params[0] for b in reducer.buckets[1:]]
    for size, p in zip(sizes, first_of_next):
        assert size + p.numel() * p.element_size() > BUCKET_BYTES
    reducer.remove_hooks()


def test_buckets_do_not_mix_dtypes():
    a, b, c = (nn.Parameter(torch.zeros(4, dtype=dt)) for dt in (torch.float32, torch.float64, torch.float32))
    reducer = GradientReducer([a, b, c], NO_GROUP, bucket_bytes=10**6)
    assert reducer.num_buckets == 3
    assert all(len({p.dtype for p in bucket.params}) == 1 for bucket in reducer.buckets)


def test_shared_and_frozen_parameters_are_handled():
    shared, frozen = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4), requires_grad=False)
    reducer = GradientReducer([shared, frozen, shared], NO_GROUP, bucket_bytes=10**6)
    assert [p for b in reducer.buckets for p in b.params] == [shared]


def test_meta_parameters_are_rejected():
    with pytest.raises(ValueError, match="materialised"):
        GradientReducer([nn.Parameter(torch.empty(4, device="meta"))], NO_GROUP, bucket_bytes=1024)
