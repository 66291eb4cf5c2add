"""Specification of the 1-bit compressed all-reduce and OneBitAdam on real gloo process groups.

``compressed_all_reduce`` must give every rank the same result, lose nothing to compression over
time (error feedback), and book exactly the packed bytes in the ledger — ~1/30 of an fp32
all-reduce. ``OneBitAdam`` must be AdamW during warm-up, keep ranks identical and still optimise
once compressing, survive a state_dict round trip bitwise, and not blow up on dead coordinates.

The multi-process work runs once per world size (2 and 4 ranks, see ``meshweave.launch.harness.spawn``); each test then
checks one behaviour of the recorded results.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from meshweave.launch.harness import spawn
from meshweave.lowcomm.onebit import chunk_numel, compressed_wire_bytes

pytestmark = pytest.mark.dist

WORLDS = [2, 4]
NUMEL = 10_001  # not a multiple of 8 * n: exercises the padding
CHUNK = 256
CALLS = 50
BIG = 1_000_000
BIG_CHUNK = 2048
F32 = 4


def rank_input(rank: int) -> torch.Tensor:
    """Correlated data, as momenta of replicas are: a shared signal plus rank-specific noise."""
    shared = torch.randn(NUMEL, generator=torch.Generator().manual_seed(1000))
    return shared + 0.5 * torch.randn(NUMEL, generator=torch.Generator().manual_seed(rank))


def exact_mean(world: int) -> torch.Tensor:
    return torch.stack([rank_input(r).double() for r in range(world)]).mean(0)


# --------------------------------------------------------------------------------------------
# the optimizer scenarios (each rank runs them on its own data)


SHAPES = [(30, 40), (777,)]
TRAIN_LR, WARMUP, COMPRESSED = 0.01, 10, 150


def targets(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(50 + rank)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def initial_params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(7)  # identical on every rank
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in SHAPES]


def set_local_grads(params, rank: int, step: int) -> None:
    """Gradient of 0.5 ||p - target_rank||^2 plus seeded noise: different data on every rank."""
    gen = torch.Generator().manual_seed(10_000 * rank + step)
    for p, t in zip(params, targets(rank)):
        p.grad = (p.detach() - t) + 0.3 * torch.randn(p.shape, generator=gen)


def global_loss(params, world: int) -> float:
    """Mean over ranks of 0.5 ||p - target_r||^2 (computable anywhere: targets are seeded)."""
    return sum(0.5 * sum(((p.detach() - t) ** 2).sum().item() for p, t in zip(params, targets(r)))
               for r in range(world)) / world


def train(opt, params, rank, world, group, steps, first_step=0) -> list[bool]:
    """The trainer's contract: reduce gradients (SUM / n) only while the optimizer isn't compressing."""
    from meshweave.comm import ops

    flags = []
    for step in range(first_step, first_step + steps):
        set_local_grads(params, rank, step)
        flags.append(opt.compressing)
        if not opt.compressing:
            for p in params:
                ops.all_reduce(p.grad, group)
                p.grad /= world
        opt.step()
    return flags


def onebit_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from meshweave.comm import ops
    from meshweave.lowcomm.onebit import ErrorFeedback, OneBitAdam, compressed_all_reduce
    from meshweave.comm.ops import LEDGER, CommGroup

    group = CommGroup(dist.group.WORLD, "dp")
    solo = CommGroup([dist.new_group([r]) for r in range(world)][rank], "solo")
    out: dict = {}

    # one call, then CALLS calls on the same input
    x = rank_input(rank)
    errors = ErrorFeedback.zeros(NUMEL, world)
    total = torch.zeros(NUMEL, dtype=torch.float64)
    for t in range(CALLS):
        y = compressed_all_reduce(x, group, errors.worker, errors.server, CHUNK)
        if t == 0:
            out["first"] = y.clone()
        total += y.double()
    out.update(sum=total, worker_error=errors.worker.clone(), server_error=errors.server.clone())

    # ledger: one compressed call vs one fp32 all-reduce of a 1M-element tensor
    big = torch.randn(BIG, generator=torch.Generator().manual_seed(rank))
    errors = ErrorFeedback.zeros(BIG, world)
    LEDGER.reset()
    compressed_all_reduce(big, group, errors.worker, errors.server, BIG_CHUNK)
    out["compressed_bytes"], out["compressed_calls"] = dict(LEDGER.total_bytes), dict(LEDGER.calls)
    LEDGER.reset()
    ops.all_reduce(big, group)
    out["fp32_bytes"] = LEDGER.cumulative_bytes()

    # a group of one
    LEDGER.reset()
    solo_errors = ErrorFeedback.zeros(NUMEL, 1)
    out["solo"] = (compressed_all_reduce(x, solo, solo_errors.worker, solo_errors.server, CHUNK),
                   dict(LEDGER.calls))
    try:
        compressed_all_reduce(x, group, torch.zeros(3), errors.server, CHUNK)
        out["bad_buffer"] = "accepted"
    except ValueError as e:
        out["bad_buffer"] = str(e)

    # warm-up against torch.optim.AdamW on identical (already averaged) gradients
    ours, theirs = initial_params(), initial_params()
    opt = OneBitAdam(ours, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                     freeze_step=WARMUP, group=group, chunk_size=CHUNK)
    ref = torch.optim.AdamW(theirs, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for step in range(WARMUP):
        set_local_grads(ours, 0, step)
        set_local_grads(theirs, 0, step)
        opt.step()
        ref.step()
    out["warmup_diff"] = max((a - b).abs().max().item() for a, b in zip(ours, theirs))

    # training: warm-up with reduced gradients, then compressed with local ones
    params = initial_params()
    opt = OneBitAdam(params, lr=TRAIN_LR, weight_decay=0.01, freeze_step=WARMUP, group=group, chunk_size=CHUNK)
    out["loss_start"] = global_loss(params, world)
    flags = train(opt, params, rank, world, group, WARMUP)
    out["loss_at_freeze"] = global_loss(params, world)
    flags += train(opt, params, rank, world, group, COMPRESSED, first_step=WARMUP)
    out.update(flags=flags, steps_done=opt.steps_done, loss_end=global_loss(params, world),
               params=[p.detach().clone() for p in params],
               optimum_loss=global_loss([sum(targets(r)[i] for r in range(world)) / world
                                         for i in range(len(SHAPES))], world))

    # state_dict round trip, mid compressed phase
    saved_state, saved_params = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    saved_local = {k: v.clone() for k, v in opt.rank_local_state().items()}
    out["state_keys"] = sorted({k for s in saved_state["state"].values() for k in s})
    out["local_keys"] = sorted({k.split(".", 1)[1] for k in saved_local})
    out["saved_worker_error_norm"] = sum(v.norm().item() for k, v in saved_local.items() if k.endswith("worker_error"))
    train(opt, params, rank, world, group, 5, first_step=WARMUP + COMPRESSED)
    continued = [p.detach().clone() for p in params]
    restored_params = [torch.nn.Parameter(p.clone()) for p in saved_params]
    restored = OneBitAdam(restored_params, lr=TRAIN_LR, weight_decay=0.01, freeze_step=WARMUP, group=group,
                          chunk_size=CHUNK)
    restored.load_state_dict(saved_state)
    restored.load_rank_local_state(saved_local)
    out["restored_compressing"] = restored.compressing
    train(restored, restored_params, rank, world, group, 5, first_step=WARMUP + COMPRESSED)
    out["round_trip_equal"] = all(torch.equal(a, b.detach()) for a, b in zip(continued, restored_params))

    # dead coordinates: every 4th one never sees a gradient
    for ratio in (0.0, 0.1):
        gen = torch.Generator().manual_seed(99)
        target = torch.randn(1024, generator=gen)
        p = torch.nn.Parameter(torch.zeros(1024))
        dead = torch.arange(1024) % 4 == 0
        opt = OneBitAdam([p], lr=TRAIN_LR, freeze_step=5, group=group, chunk_size=64, denom_floor_ratio=ratio)
        moves = []
        for step in range(35):
            noise = torch.randn(1024, generator=torch.Generator().manual_seed(rank * 1000 + step))
            p.grad = torch.where(dead, 0.0, p.detach() - target + 0.3 * noise)
            if not opt.compressing:  # the average of the rank gradients, computed locally
                p.grad = torch.where(dead, 0.0, p.detach() - target)
            before = p.detach().clone()
            opt.step()
            move = (p.detach() - before).abs()
            moves.append((move[dead].max().item(), move[~dead].mean().item()))
        out[f"dead ratio={ratio}"] = {"max_move": max(d for d, _ in moves[5:]),
                                      "max_move_vs_live": max(d / live for d, live in moves[5:]),
                                      "dead_drift": p.detach()[dead].abs().max().item(),
                                      "finite": bool(torch.isfinite(p).all()),
                                      "live_loss": 0.5 * ((p.detach() - target)[~dead] ** 2).sum().item(),
                                      "live_loss_start": 0.5 * (target[~dead] ** 2).sum().item()}

    # a parameter with no gradient during warm-up joins the compressed phase
    live, late = torch.nn.Parameter(torch.zeros(100)), torch.nn.Parameter(torch.zeros(100))
    opt = OneBitAdam([live, late], lr=TRAIN_LR, freeze_step=3, group=group, chunk_size=64)
    late_moves = []
    for step in range(10):
        live.grad = live.detach() - 1
        late.grad = None if step < 3 else late.detach() - 1
        before = late.detach().clone()
        opt.step()
        late_moves.append((late.detach() - before).abs().max().item())
    out["late"] = {"moves": late_moves, "floor": opt.state[late]["denom_floor"].item(),
                   "live_floor": opt.state[live]["denom_floor"].item()}
    return out


@pytest.fixture(scope="module", params=WORLDS, ids=[f"n={n}" for n in WORLDS])
def results(request) -> tuple[int, list[dict]]:
    return request.param, spawn(onebit_worker, request.param, timeout=240)


# --------------------------------------------------------------------------------------------
# compressed_all_reduce


def test_every_rank_gets_the_bitwise_same_average(results):
    _, rs = results
    for r in rs[1:]:
        assert torch.equal(r["first"], rs[0]["first"]) and torch.equal(r["sum"], rs[0]["sum"])


def test_one_call_is_within_the_one_bit_error_bound(results):
    """Per chunk, sign * RMS keeps the L2 norm and misses by ||c - d||^2 = 2 ||c||^2 - 2 ||c||_2
    ||c||_1 / sqrt(len) <= 2 ||c||^2. The worker stage thus errs by <= sqrt(2) mean_i ||x_i||, the
    average it re-compresses has norm <= mean_i ||x_i||, so the server stage adds <= sqrt(2) that:
    ||out - mean|| <= 2 sqrt(2) mean_i ||x_i||. One call is lossy: the test also shows it is far
    from exact (relative error > 0.2), which is why error feedback matters."""
    world, rs = results
    mean = exact_mean(world)
    bound = 2 * math.sqrt(2) * sum(rank_input(r).norm().item() for r in range(world)) / world
    error = (rs[0]["first"].double() - mean).norm().item()
    assert error <= bound
    assert error / mean.norm().item() > 0.2


def test_error_feedback_loses_nothing_over_repeated_calls(results):
    """Outputs telescope: sum_t out_t = T mean - mean_i(worker_error_i) - server_error (rows of
    the server error in rank order), from zero errors. Each call adds a few fp32 roundings of
    O(5)-sized values (errors grow to ~4x the data), ~1e-6 each; over 50 calls that stays far
    below 1e-3, while dropping any error term would miss by O(1)."""
    world, rs = results
    worker = torch.stack([r["worker_error"].double() for r in rs]).mean(0)[:NUMEL]
    server = torch.cat([r["server_error"].double() for r in rs])[:NUMEL]
    reconstructed = rs[0]["sum"] + worker + server
    torch.testing.assert_close(reconstructed, CALLS * exact_mean(world), atol=1e-3, rtol=0)


def test_average_of_repeated_calls_converges_to_the_true_mean(results):
    """By the identity above the average of T outputs misses the mean by (bounded errors) / T.
    The errors saturate at a few times the data's norm, so at T = 50 the relative error is a few
    percent (single call: > 20%); 0.1 bounds it with margin."""
    world, rs = results
    mean = exact_mean(world)
    assert ((rs[0]["sum"] / CALLS - mean).norm() / mean.norm()).item() < 0.1


def test_padding_stays_out_of_the_error_buffers(results):
    world, rs = results
    for r in rs:
        assert torch.all(r["worker_error"][NUMEL:] == 0)
    assert torch.all(torch.cat([r["server_error"] for r in rs])[NUMEL:] == 0)


def test_ledger_books_exactly_the_packed_signs_and_scales(results):
    """Per rank: all-to-all sends n-1 rows of L/8 sign bytes and k fp32 scales; the all-gather sends
    this rank's row to n-1 peers: the same amounts."""
    world, rs = results
    length = 8 * math.ceil(math.ceil(BIG / world) / 8)
    per_op = (world - 1) * (length // 8 + F32 * math.ceil(length / BIG_CHUNK))
    for r in rs:
        assert r["compressed_bytes"] == {"dp/all_to_all": per_op, "dp/all_gather": per_op}
        assert r["compressed_calls"] == {"dp/all_to_all": 2, "dp/all_gather": 2}
        assert compressed_wire_bytes(BIG, world, BIG_CHUNK) == 2 * per_op
        assert chunk_numel(BIG, world) == length


def test_compressed_bytes_are_under_a_twentieth_of_an_fp32_all_reduce(results):
    world, rs = results
    ratio = sum(rs[0]["compressed_bytes"].values()) / rs[0]["fp32_bytes"]
    print(f"n={world}: compressed / fp32 all-reduce bytes = {ratio:.4f} (1/{1 / ratio:.1f})")
    assert rs[0]["fp32_bytes"] == 2 * (world - 1) * BIG * F32 // world
    assert ratio <= 1 / 20


def test_group_of_one_returns_the_input_exactly_and_moves_nothing(results):
    for rank, r in enumerate(results[1]):
        value, calls = r["solo"]
        assert torch.equal(value, rank_input(rank)) and calls == {}


def test_mis_sized_error_buffers_are_rejected(results):
    for r in results[1]:
        assert "worker_error must be fp32" in r["bad_buffer"]


# --------------------------------------------------------------------------------------------
# OneBitAdam


def test_warmup_is_adamw(results):
    """Same arithmetic op for op as AdamW's single-tensor path: identical in practice; 1e-7 allows
    an ulp of O(1) fp32 values should a torch release reorder an operation."""
    for r in results[1]:
        assert r["warmup_diff"] <= 1e-7


def test_compressing_switches_on_after_freeze_step(results):
    for r in results[1]:
        assert r["flags"] == [False] * WARMUP + [True] * COMPRESSED
        assert r["steps_done"] == WARMUP + COMPRESSED


def test_all_ranks_keep_identical_parameters_when_compressing(results):
    _, rs = results
    for r in rs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r["params"], rs[0]["params"]))


def test_compressed_phase_keeps_decreasing_the_loss(results):
    """Ranks see different targets; the global optimum is their mean. From the freeze point the
    compressed phase must close most of the remaining gap to that optimum (noise of 0.3 per
    coordinate and lr 0.01 leave a small floor, hence "half", not "all")."""
    for r in results[1]:
        gap_at_freeze = r["loss_at_freeze"] - r["optimum_loss"]
        assert r["loss_at_freeze"] < r["loss_start"]
        assert r["loss_end"] - r["optimum_loss"] < 0.5 * gap_at_freeze


def test_error_buffers_are_rank_local_state_not_in_the_shared_state_dict(results):
    """DCP keeps one copy per key, so the per-rank error buffers must not be in state_dict()."""
    for r in results[1]:
        assert {"step", "exp_avg", "exp_avg_sq"} <= set(r["state_keys"])
        assert not {"worker_error", "server_error"} & set(r["state_keys"])
        assert r["local_keys"] == ["server_error", "worker_error"]
        assert r["saved_worker_error_norm"] > 0


def test_state_dict_round_trip_continues_bitwise_identically(results):
    for r in results[1]:
        assert r["restored_compressing"]
        assert r["round_trip_equal"]


def test_without_a_floor_dead_coordinates_blow_up(results):
    """The failure the floor exists for: v ~ 0, denominator eps = 1e-8, sign-coded momentum of
    chunk-RMS size, so a dead coordinate jumps by ~lr * 0.1 / 1e-8 — far beyond 1e3."""
    for r in results[1]:
        assert r["dead ratio=0.0"]["max_move"] > 1e3


def test_floor_keeps_dead_coordinates_still_and_training_intact(results):
    """With the floor at 0.1 x mean sqrt(v) a dead coordinate's denominator is at least a tenth of
    a typical one, and its sign-coded momentum is of typical size (the chunk RMS), so per step it
    moves at most ~10x the mean live coordinate (measured: ~7x). Error feedback alternates the sign
    of that noise, so after 30 compressed steps it sits well inside 30 such steps (~0.15 each at
    lr 0.01 early on, when 1 / (1 - b1^t) ~ 2): 1.0 bounds the drift. Live coordinates keep
    converging: 30 steps of ~lr toward targets ~1 away cut their loss by over 20%."""
    for r in results[1]:
        res = r["dead ratio=0.1"]
        assert res["finite"] and res["max_move_vs_live"] <= 10
        assert res["dead_drift"] < 1.0
        assert res["live_loss"] < 0.8 * res["live_loss_start"]


def test_parameter_without_warmup_gradients_gets_the_group_floor_and_finite_steps(results):
    """Its v is 0, so its own mean gives no floor; the group's mean does (here the live parameter,
    whose floor is 0.1 x its mean sqrt(v) ~ 0.1, averaged over both: half that). Its steps then
    stay near lr / floor-scale, nowhere near lr / eps."""
    for r in results[1]:
        late = r["late"]
        assert late["moves"][:3] == [0.0, 0.0, 0.0]
        assert late["floor"] == pytest.approx(late["live_floor"] / 2, rel=1e-6)
        assert all(math.isfinite(m) and m < 1.0 for m in late["moves"]) and late["moves"][-1] > 0
