"""Specification of CO2 (``meshweave.lowcomm.co2``) on real gloo process groups.

Every rank is one replica of a small MLP trained by plain AdamW on its own random regression
batches; :class:`CO2` runs the outer loop. :func:`reference` is the algorithm of the module
docstring written in one process without meshweave (both replicas side by side): the gloo run
must reproduce it, round by round, including the one-round staleness, the penalty, the clipping
and the final sync. One job of two replicas per module; each test checks one behaviour.

In the trainer (two replicas of the tiny model through the CLI): CO2's eval loss against
Streaming DiLoCo's at the same inner steps, its all-reduce booked only at round ends, and a
resume from a checkpoint taken with a round in flight.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meshweave.config import CO2Config
from meshweave.launch.harness import spawn
from tests.parity import assert_losses_match, losses, train_run

pytestmark = pytest.mark.dist

H, STEPS = 3, 11  # rounds end at 3, 6, 9; steps 10-11 are a partial round that finish() ends
# gap penalty and a clip that bites (|momentum| entries reach ~3e-2 here): both must show
SETTINGS = CO2Config(enabled=True, inner_steps=H, outer_lr=0.8, outer_momentum=0.5, gap_penalty=1.5, clip=0.01)
STOP = 4  # a checkpoint with round 0's all-reduce still in flight


def make_model() -> nn.Module:
    torch.manual_seed(0)  # every replica starts from the same weights, as CO2 requires
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def inner_step(model: nn.Module, opt: torch.optim.Optimizer, replica: int, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 * replica + step)
    x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
    opt.zero_grad(set_to_none=True)
    F.mse_loss(model(x), y).backward()
    opt.step()


def make_inner(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-2, foreach=False)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference(steps: int, s: CO2Config) -> dict:
    """Two replicas in one process: anchors after every round end and the final weights."""
    models = [make_model() for _ in range(2)]
    opts = [make_inner(m) for m in models]
    anchor = [p.detach().clone() for p in models[0].parameters()]
    momentum = [torch.zeros_like(a) for a in anchor]
    pending: list[torch.Tensor] | None = None
    anchors = {}

    def round_end() -> None:
        nonlocal pending
        deltas = [[a - p.detach() for a, p in zip(anchor, m.parameters())] for m in models]
        fresh = [(d0 + d1) / 2 for d0, d1 in zip(*deltas)]
        if pending is not None:
            apply(pending)
        pending = fresh
        load()

    def apply(avg: list[torch.Tensor]) -> None:
        for a, m, g in zip(anchor, momentum, avg):
            m.mul_(s.outer_momentum).add_(g, alpha=1 / s.gap_penalty)
            if s.clip:
                m.clamp_(-s.clip, s.clip)
            a.add_(m, alpha=-s.outer_lr)

    def load() -> None:
        with torch.no_grad():
            for model in models:
                for p, a in zip(model.parameters(), anchor):
                    p.copy_(a)

    for step in range(1, steps + 1):
        for r in range(2):
            inner_step(models[r], opts[r], r, step)
        if step % s.inner_steps == 0:
            round_end()
            anchors[step] = torch.cat([a.reshape(-1) for a in anchor])
    if steps % s.inner_steps:
        round_end()
    assert pending is not None
    apply(pending)
    load()
    return {"anchors": anchors, "final": [flat(m) for m in models]}


def co2_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from meshweave.comm.ops import LEDGER, CommGroup
    from meshweave.lowcomm.co2 import CO2

    group = CommGroup(dist.group.WORLD, "dp_replicate")
    out: dict = {"anchors": {}, "bytes_at": {}}

    model = make_model()
    opt = make_inner(model)
    co2 = CO2(model, group, SETTINGS)
    for step in range(1, STEPS + 1):
        LEDGER.reset()
        inner_step(model, opt, rank, step)
        co2.after_inner_step(step)
        out["bytes_at"][step] = dict(LEDGER.total_bytes)
        if step % H == 0:
            with co2.global_weights():
                out["anchors"][step] = flat(model)
    out["finish"] = co2.finish(STEPS)
    out["final"] = flat(model)

    # resume: state saved with round 0 in flight, loaded into a fresh CO2 (a new process would
    # also restore model and optimizer: copied here), then run to the end
    model = make_model()
    opt = make_inner(model)
    co2 = CO2(model, group, SETTINGS)
    for step in range(1, STOP + 1):
        inner_step(model, opt, rank, step)
        co2.after_inner_step(step)
    state = {k: v.clone() for k, v in co2.state_dict().items()}
    resumed_model = copy.deepcopy(model)
    resumed_opt = make_inner(resumed_model)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    resumed = CO2(resumed_model, group, SETTINGS)
    resumed.load_state_dict(state)
    for step in range(STOP + 1, STEPS + 1):
        inner_step(resumed_model, resumed_opt, rank, step)
        resumed.after_inner_step(step)
    resumed.finish(STEPS)
    out["resumed_final"] = flat(resumed_model)
    out["pending_ok"] = int(state["pending_ok"])
    return out


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return spawn(co2_worker, 2, timeout=120)


@pytest.fixture(scope="module")
def ref() -> dict:
    return reference(STEPS, SETTINGS)


# The gloo run does what the reference does in the same fp32 operations (the all-reduce of two
# replicas adds the same two numbers, then halves): equal bit for bit.


def test_anchors_follow_the_reference_round_by_round(runs, ref):
    for r in runs:
        assert r["anchors"].keys() == ref["anchors"].keys() == {3, 6, 9}
        for step, anchor in r["anchors"].items():
            assert torch.equal(anchor, ref["anchors"][step]), f"anchor after step {step}"


def test_round_zero_is_applied_only_at_the_end_of_round_one(runs):
    # one round stale: after round 0 the anchor is still the initial weights
    initial = flat(make_model())
    for r in runs:
        assert torch.equal(r["anchors"][3], initial)
        assert not torch.equal(r["anchors"][6], initial)


def test_finish_leaves_every_replica_with_the_reference_final_weights(runs, ref):
    assert torch.equal(runs[0]["final"], runs[1]["final"])
    for r in runs:
        assert torch.equal(r["final"], ref["final"][0])
        assert "round 3 applied" in r["finish"]  # the partial round 3 (steps 10-11), synced at the end


def test_each_round_is_one_all_reduce_launched_at_its_end(runs):
    params = flat(make_model()).numel()
    for r in runs:
        for step, booked in r["bytes_at"].items():
            expected = {"dp_replicate/all_reduce": 2 * (2 - 1) * params * 4 // 2} if step % H == 0 else {}
            assert booked == expected, f"step {step}"


def test_resume_from_a_checkpoint_with_a_round_in_flight_reproduces_the_uninterrupted_run(runs):
    for r in runs:
        assert r["pending_ok"] == 1  # the checkpoint held round 0's resolved average
        assert torch.equal(r["resumed_final"], r["final"])


def test_reference_really_clips_and_penalises():
    # the settings above must exercise both: without them the weights differ
    plain = CO2Config(enabled=True, inner_steps=H, outer_lr=0.8, outer_momentum=0.5)
    unclipped = CO2Config(enabled=True, inner_steps=H, outer_lr=0.8, outer_momentum=0.5, gap_penalty=1.5, clip=0.0)
    final = reference(STEPS, SETTINGS)["final"][0]
    assert not torch.allclose(final, reference(STEPS, plain)["final"][0], atol=1e-4)
    assert not torch.allclose(final, reference(STEPS, unclipped)["final"][0], atol=1e-4)


# --------------------------------------------------------------------------------------------
# in the trainer

REPLICAS = ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]
ROUND, LONG = 8, 80  # ten rounds


def co2_args(inner: int) -> list[str]:
    return ["--comm.co2.enabled=true", f"--comm.co2.inner_steps={inner}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, list[dict]]:
    """CO2 with its default outer optimizer, H = 8, 80 steps, eval on the replicas' common weights
    after the final sync."""
    evaluate = [f"--train.eval_interval={LONG}", "--train.eval_batches=4"]
    return {"co2": train_run(tmp_path_factory.mktemp("co2"), 2, *REPLICAS, *evaluate, *co2_args(ROUND), steps=LONG)}


def test_co2_trains_its_replicas_common_weights(trained):
    # CO2 changes the math, so it is held to learning, not to a trajectory. Against DiLoCo at the
    # same H (bench/README.md, overlap.py's CO2 row): H = 8, 80 steps: CO2 3.393, DiLoCo 3.213
    # (+5.6%, the 2% goal missed); H = 4: CO2 3.362, DiLoCo 3.686. The eval loss after ten
    # rounds must be well below the first step's (~5.6): 0.65 x leaves room for BLAS / thread
    # differences and fails a CO2 whose outer steps never reach the common weights (they would
    # stay at the initial ~5.6).
    records = trained["co2"]
    assert records[-1]["eval_loss"] < 0.65 * records[0]["loss"]


def test_co2_all_reduces_only_at_round_ends_the_same_bytes_each_round(trained):
    booked = {r["step"]: r["comm_bytes"].get("dp_replicate/all_reduce", 0) for r in trained["co2"]}
    ends = [s for s in booked if s % ROUND == 0]
    assert all(booked[s] == 0 for s in booked if s % ROUND)
    assert len({booked[s] for s in ends}) == 1 and booked[ends[0]] > 0


STOP_IN_FLIGHT = 5  # H = 4: round 0's all-reduce launched at step 4 is in flight at step 5


def test_co2_resume_with_a_round_in_flight_continues_the_uninterrupted_run(tmp_path):
    args = [*REPLICAS, *co2_args(4)]
    whole = losses(train_run(tmp_path / "whole", 2, *args, steps=12))
    run = tmp_path / "stopped"
    train_run(run, 2, *args, "--checkpoint.save_final=true", f"--train.stop_at_step={STOP_IN_FLIGHT}", steps=12)
    (run / "metrics.jsonl").unlink()
    resumed = losses(train_run(run, 2, *args, "--checkpoint.resume=auto", steps=12))
    # the in-flight round is resolved into the checkpoint and applied at step 8 as it would have
    # been: the same fp32 operations in the same order (DiLoCo's resume test uses the same bound)
    assert_losses_match(whole[STOP_IN_FLIGHT:], resumed, rtol=1e-6)
