"""Specification of expert parallelism (meshweave.parallel.expert) on real gloo process groups.

With the experts split over an EP group of 2 or 4 ranks, each rank feeding its own tokens, the
layer must compute exactly what the single-process layer with all experts computes on the same
tokens: outputs, input gradients, router / shared / projection gradients (per rank), and expert
gradients (the owner's slice of the gradient summed over every rank's tokens). The ledger must
book exactly the rows the split sizes send away, and BigMac must shrink those bytes by dim/low_dim.
The chunked dispatch (``moe.dispatch_chunks``) must compute the same, book the same bytes, and
actually pipeline: each chunk's exchanges in flight while the experts run on its neighbour.

One job per world size (module-scoped fixtures, see ``meshweave.launch.harness.spawn``); each test checks one behaviour of
the recorded results. Everything is float64, so the only differences are summation order.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from meshweave.launch.harness import spawn
from meshweave.config import MoEConfig
from meshweave.models.moe import MoEFeedForward

pytestmark = pytest.mark.dist

DIM, LOW, E, FFN = 16, 4, 8, 12
BATCH, SEQ = 3, 8  # 24 tokens per rank
F64 = 8
SCENARIOS = {
    "dropless": {},
    "capacity": {"capacity_factor": 1.0, "min_capacity": 1},
    "bigmac": {"low_dim": LOW},
}
# 2: even halves; 3: parts of unequal size (blocks of n rows, n not a multiple of 3), some empty
CHUNKS = (2, 3)


def settings(**overrides) -> MoEConfig:
    return MoEConfig(num_experts=E, top_k=2, expert_ffn_dim=FFN, shared_experts=1, **overrides)


def full_layer(**overrides) -> MoEFeedForward:
    """The single-process reference: same weights on every rank, O(1/sqrt(fan-in)) so routing is
    decisive and outputs are O(1)."""
    m = MoEFeedForward(DIM, settings(**overrides)).double()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(p.shape[-1]))
    return m


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and a loss probe of ``rank``; independent of the world size, so runs compare."""
    gen = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(BATCH, SEQ, DIM, generator=gen, dtype=torch.float64),
            torch.randn(BATCH, SEQ, DIM, generator=gen, dtype=torch.float64))


def forward_backward(model: MoEFeedForward, rank: int) -> dict:
    """Loss = <output, probe> + aux losses; returns output, gradients and the router's load."""
    from meshweave.models.moe import aux_loss

    x, probe = rank_batch(rank)
    x.requires_grad_()
    out = model(x)
    ((out * probe).sum() + aux_loss(model)).backward()
    return {"out": out.detach(), "x_grad": x.grad, "load": model.gate.last_load.tolist(),
            "dropped": model.gate.last_dropped,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def aux_router_grad(model: MoEFeedForward, rank: int) -> torch.Tensor:
    """Gradient of the aux + z losses alone with respect to the router weight."""
    from meshweave.models.moe import aux_loss

    model.zero_grad(set_to_none=True)
    model(rank_batch(rank)[0])
    aux_loss(model).backward()
    return model.gate.weight.grad.clone()


class _Probe(torch.autograd.Function):
    """Identity on the experts' output; its backward logs the all-to-alls launched so far, i.e.
    where the experts' backward of a chunk starts."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, log: list) -> torch.Tensor:
        ctx.log = log
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from meshweave.comm.ops import LEDGER

        ctx.log.append(("backward", LEDGER.calls["ep/all_to_all"]))
        return grad, None


def pipeline_trace(group, rank: int, chunks: int) -> list[tuple[str, int]]:
    """``("forward" | "backward", all-to-alls launched)`` each time the experts start on a chunk."""
    from meshweave.comm.ops import LEDGER
    from meshweave.parallel.expert import bind

    model = full_layer()
    bind(model, group, chunks=chunks)
    log: list[tuple[str, int]] = []
    experts_forward = model.experts.forward

    def watched(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        log.append(("forward", LEDGER.calls["ep/all_to_all"]))
        return _Probe.apply(experts_forward(rows, counts), log)

    model.experts.forward = watched
    LEDGER.reset()
    x, probe = rank_batch(rank)
    (model(x) * probe).sum().backward()
    return log


def ep_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from meshweave.comm.ops import LEDGER, CommGroup
    from meshweave.models.moe import Experts
    from meshweave.parallel.expert import ExpertParallel, bind, expert_param_slices

    group = CommGroup(dist.group.WORLD, "ep")
    results: dict = {"reference": {}, "ep": {}, "ledger": {}}

    for name, overrides in SCENARIOS.items():
        full = full_layer(**overrides)
        if name == "bigmac":  # same router as "dropless", hence the same routing
            full.gate.weight.data.copy_(full_layer().gate.weight)
        results["reference"][name] = [forward_backward(copy.deepcopy(full), src) for src in range(world)]
        model = copy.deepcopy(full)
        binder = bind(model, group)
        LEDGER.reset()
        results["ep"][name] = forward_backward(model, rank)
        results["ep"][name]["splits"] = binder.last_splits
        results["ledger"][name] = {"bytes": dict(LEDGER.total_bytes), "calls": dict(LEDGER.calls)}
        for chunks in CHUNKS:
            chunked = copy.deepcopy(full)
            bind(chunked, group, chunks=chunks)
            LEDGER.reset()
            results.setdefault("chunked", {})[(chunks, name)] = {
                **forward_backward(chunked, rank),
                "bytes": dict(LEDGER.total_bytes),
                "calls": dict(LEDGER.calls),
            }
        if name == "dropless":
            results["aux_grad"] = {"ep": aux_router_grad(model, rank), "reference": aux_router_grad(full, rank)}

    # the shared branch runs while the dispatch all-to-all is in flight
    model = full_layer()
    bind(model, group)
    seen = []
    shared_forward = model.shared_experts.forward

    def watched_shared(x: torch.Tensor) -> torch.Tensor:
        seen.append(dict(LEDGER.calls))
        return shared_forward(x)

    model.shared_experts.forward = watched_shared
    LEDGER.reset()
    model(rank_batch(rank)[0])
    results["calls_seen_by_shared"] = seen
    for chunks in CHUNKS:
        model = full_layer()
        bind(model, group, chunks=chunks)
        shared_forward = model.shared_experts.forward
        model.shared_experts.forward = watched_shared
        seen.clear()
        LEDGER.reset()
        model(rank_batch(rank)[0])
        results.setdefault("chunked_calls_seen_by_shared", {})[chunks] = list(seen)
        results.setdefault("pipeline", {})[chunks] = pipeline_trace(group, rank, chunks)

    class IdentityExperts(Experts):
        def forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
            return rows

    identity = IdentityExperts(E, DIM, 1)
    ep = ExpertParallel(group)
    identity.keep(rank * E // world, E // world)
    x = rank_batch(rank)[0].view(-1, DIM)
    gen = torch.Generator().manual_seed(rank)
    idx = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(x.shape[0])])
    out, _ = ep.dispatch(x, idx, torch.full(idx.shape, 0.5, dtype=torch.float64), identity)
    results["identity_roundtrip"] = (x, out)
    out, _ = ExpertParallel(group, chunks=3).dispatch(x, idx, torch.full(idx.shape, 0.5, dtype=torch.float64), identity)
    results["chunked_identity_roundtrip"] = (x, out)

    with torch.device("meta"):
        meta = torch.nn.ModuleDict({"mlp": MoEFeedForward(DIM, settings())})
    bind(meta, group)
    results["meta"] = {"shape": tuple(meta["mlp"].experts.up_proj.weight.shape),
                       "slices": expert_param_slices(meta)}
    return results


@pytest.fixture(scope="module")
def ep2() -> list[dict]:
    return spawn(ep_worker, 2, timeout=180)


@pytest.fixture(scope="module")
def ep4() -> list[dict]:
    return spawn(ep_worker, 4, timeout=180)


@pytest.fixture(params=["ep2", "ep4"])
def results(request) -> list[dict]:
    return request.getfixturevalue(request.param)


# float64 throughout: EP changes only how many rows each expert GEMM sees at once (BLAS blocking)
# and the order in which ranks' contributions to an expert's gradient are summed; both move
# results by a few ulp (2.2e-16 relative) of O(10) values. 1e-12 is orders of magnitude above
# that and orders below any misrouted or missing token (which changes values by O(0.1)).
# Measured: at most 8.9e-15 on values up to 28, for EP=2 and EP=4.
TOL = 1e-12
LOCAL_PARAMS = ("gate.", "shared_experts.", "descend.", "ascend.")


def expected_grad(ref: list[dict], name: str, rank: int, world: int) -> torch.Tensor:
    if name.startswith(LOCAL_PARAMS):  # replicated: sees only this rank's tokens
        return ref[rank]["grads"][name]
    per_rank = E // world  # expert weights: every rank's tokens, owner's slice
    return sum(r["grads"][name] for r in ref)[rank * per_rank:(rank + 1) * per_rank]


def close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ep_output_equals_the_full_layer_on_the_same_tokens(results, scenario):
    for rank, r in enumerate(results):
        close(r["ep"][scenario]["out"], r["reference"][scenario][rank]["out"], f"rank {rank}")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ep_input_gradient_equals_the_full_layer(results, scenario):
    for rank, r in enumerate(results):
        close(r["ep"][scenario]["x_grad"], r["reference"][scenario][rank]["x_grad"], f"rank {rank}")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ep_parameter_gradients_equal_the_full_layer(results, scenario):
    world = len(results)
    for rank, r in enumerate(results):
        grads = r["ep"][scenario]["grads"]
        assert set(grads) == set(r["reference"][scenario][rank]["grads"])
        for name, g in grads.items():
            close(g, expected_grad(r["reference"][scenario], name, rank, world), f"rank {rank} {name}")


def test_capacity_scenario_actually_drops_tokens(results):
    for r in results:
        assert r["ep"]["capacity"]["dropped"] > 0
        assert r["ep"]["dropless"]["dropped"] == 0


def test_aux_loss_gradient_does_not_depend_on_the_ep_degree(ep2, ep4):
    # no communication on the aux path: identical ops on identical tokens, bit for bit
    for rank in range(2):
        assert torch.equal(ep2[rank]["aux_grad"]["ep"], ep2[rank]["aux_grad"]["reference"])
        assert torch.equal(ep4[rank]["aux_grad"]["ep"], ep2[rank]["aux_grad"]["ep"])


def test_splits_follow_the_routing_of_every_rank(results):
    world = len(results)
    per_rank = E // world
    loads = [r["ep"]["dropless"]["load"] for r in results]
    for rank, r in enumerate(results):
        sent, received = r["ep"]["dropless"]["splits"]
        assert sent == [sum(loads[rank][d * per_rank:(d + 1) * per_rank]) for d in range(world)]
        assert received == [sum(loads[s][rank * per_rank:(rank + 1) * per_rank]) for s in range(world)]


def expected_a2a_bytes(results: list[dict], rank: int, width: int) -> int:
    """Counts exchange + dispatch and combine in forward + their reverses in backward."""
    world = len(results)
    per_rank = E // world
    loads = [r["ep"]["dropless"]["load"] for r in results]
    sent_away = sum(loads[rank][e] for e in range(E) if e // per_rank != rank)
    received_away = sum(loads[s][e] for s in range(world) if s != rank
                        for e in range(rank * per_rank, (rank + 1) * per_rank))
    return (E - per_rank) * F64 + 2 * (sent_away + received_away) * width * F64


def test_ledger_books_the_all_to_all_bytes_of_the_split_sizes(results):
    for rank, r in enumerate(results):
        ledger = r["ledger"]["dropless"]
        assert ledger["bytes"] == {"ep/all_to_all": expected_a2a_bytes(results, rank, DIM)}
        assert ledger["calls"] == {"ep/all_to_all": 5}  # counts, dispatch, combine, 2 reverses


def test_bigmac_shrinks_token_all_to_all_bytes_by_dim_over_low_dim(results):
    for rank, r in enumerate(results):
        assert r["ep"]["bigmac"]["load"] == r["ep"]["dropless"]["load"]  # same routing
        counts = (E - E // len(results)) * F64  # the count exchange does not depend on width
        full = r["ledger"]["dropless"]["bytes"]["ep/all_to_all"] - counts
        low = r["ledger"]["bigmac"]["bytes"]["ep/all_to_all"] - counts
        assert full > 0 and full * LOW == low * DIM
        assert r["ledger"]["bigmac"]["bytes"] == {"ep/all_to_all": expected_a2a_bytes(results, rank, LOW)}


def test_shared_experts_run_while_the_dispatch_all_to_all_is_in_flight(results):
    for r in results:
        # launched: the count exchange and the dispatch; not yet: the combine
        assert r["calls_seen_by_shared"] == [{"ep/all_to_all": 2}]


def test_ep_dispatch_then_combine_with_identity_experts_returns_every_token_exactly(results):
    for x, out in (r["identity_roundtrip"] for r in results):
        assert torch.equal(out, x)


def test_binding_a_meta_model_shrinks_experts_and_reports_their_full_shape_and_slice(results):
    world = len(results)
    per_rank = E // world
    for rank, r in enumerate(results):
        assert r["meta"]["shape"] == (per_rank, FFN, DIM)
        slices = r["meta"]["slices"]
        assert set(slices) == {f"mlp.experts.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
        full, sl = slices["mlp.experts.down_proj.weight"]
        assert full == (E, DIM, FFN) and sl == slice(rank * per_rank, (rank + 1) * per_rank)


# --------------------------------------------------------------------------------------------
# chunked dispatch: the same numbers and bytes, pipelined


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_chunked_dispatch_output_and_gradients_equal_the_full_layer(results, scenario, chunks):
    # same TOL: chunking adds only the split of each expert's gradient GEMM into partial sums
    world = len(results)
    for rank, r in enumerate(results):
        got, ref = r["chunked"][(chunks, scenario)], r["reference"][scenario]
        close(got["out"], ref[rank]["out"], f"rank {rank} output")
        close(got["x_grad"], ref[rank]["x_grad"], f"rank {rank} input gradient")
        for name, g in got["grads"].items():
            close(g, expected_grad(ref, name, rank, world), f"rank {rank} {name}")


@pytest.mark.parametrize("chunks", CHUNKS)
def test_chunked_dispatch_books_the_same_bytes_in_one_count_exchange_and_four_per_chunk(results, chunks):
    for scenario in SCENARIOS:
        for r in results:
            got = r["chunked"][(chunks, scenario)]
            assert got["bytes"] == r["ledger"][scenario]["bytes"]
            assert got["calls"] == {"ep/all_to_all": 1 + 4 * chunks}


@pytest.mark.parametrize("chunks", CHUNKS)
def test_chunked_dispatch_runs_shared_experts_while_the_first_chunk_is_in_flight(results, chunks):
    for r in results:
        assert r["chunked_calls_seen_by_shared"][chunks] == [{"ep/all_to_all": 2}]  # counts + dispatch 0


@pytest.mark.parametrize("chunks", CHUNKS)
def test_chunked_dispatch_pipelines_exchanges_with_expert_compute_forward_and_backward(results, chunks):
    # When the experts start on chunk c: forward, launched = the counts, dispatches 0..c+1 (the
    # next one already on the wire) and combines 0..c-1 (the previous one still may be);
    # backward (after 1 + 2C forward calls), reverse combines 0..c+1 and reverse dispatches 0..c-1.
    forward = [1 + min(c + 2, chunks) + c for c in range(chunks)]
    backward = [1 + 2 * chunks + min(c + 2, chunks) + c for c in range(chunks)]
    expected = [("forward", n) for n in forward] + [("backward", n) for n in backward]
    for r in results:
        assert r["pipeline"][chunks] == expected


def test_chunked_dispatch_with_identity_experts_returns_every_token_exactly(results):
    for x, out in (r["chunked_identity_roundtrip"] for r in results):
        assert torch.equal(out, x)
