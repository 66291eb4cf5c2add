"""The gloo workers of bench/overlap.py's chunked-expert-dispatch and CO2 rows (kept apart so
overlap.py stays one readable file). Each returns, per configuration, the three phases' least
seconds over the repetitions — comm alone, compute alone, both — and the comm ledger's exposed
seconds per ``<dim>/<op>`` during "both" (median over repetitions): what compute waited for.

**ep_worker** (``moe.dispatch_chunks`` C): 2 ranks, ep=2, a stack of MoE layers (8 experts,
top-2, one shared expert, the residual around each) bound to
:class:`~meshweave.parallel.expert.ExpertParallel`, one forward + backward per repetition.

- comm alone: the all-to-alls forward + backward issue (``1 + 4 C`` per layer), replayed with the
  same split sizes in the step's own order of launches and waits (several in flight where the
  pipeline has them), nothing else running;
- compute alone: the same forward + backward with ``ops.all_to_all_single`` replaced by a local
  fill of the output buffer (same shapes, so the experts see the same rows per expert; the count
  exchange returns what the real run received);
- both: the real forward + backward.

**co2_worker**: 2 replicas (dp_replicate=2) of an MLP trained by AdamW, CO2 over a group of its
own. compute alone: H inner steps; comm alone: the all-reduce of the pseudo-gradient (its size,
fp32) with nothing beside it; both: one CO2 round in steady state — H inner steps whose last one
waits for the previous round's all-reduce and launches this round's. H is sized from a
calibration so a round's compute takes ~3x the all-reduce alone (beside the compute, gloo's
thread gets a share of the 2 cores, so the all-reduce runs slower than alone).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EPShape:
    """Each rank: ``layers`` x (MoE -> residual) on ``tokens`` tokens of width ``dim``."""

    dim: int = 256
    tokens: int = 2048
    experts: int = 8
    top_k: int = 2
    expert_ffn: int = 64
    layers: int = 2

    def label(self) -> str:
        return (
            f"{self.layers} MoE layers, {self.experts} experts top-{self.top_k} width {self.expert_ffn} + 1 shared, "
            f"{self.tokens} tokens x dim {self.dim} per rank"
        )


def _phases(
    cases: dict[Any, dict[str, Callable[[], None]]], reps: int, barrier: Callable[[], None], exposed_of: str
) -> dict[Any, dict[str, Any]]:
    """Per case and phase the least seconds over ``reps`` (after one warm-up of each); every
    repetition runs every (case, phase) once in a rotating order, so load from elsewhere falls on
    all alike. The ledger's exposed seconds are taken around each run of phase ``exposed_of``."""
    from meshweave.comm.ops import LEDGER

    order = [(c, p) for c, phases in cases.items() for p in phases]
    for case, phase in order:
        cases[case][phase]()
    times: dict[tuple[Any, str], list[float]] = {k: [] for k in order}
    exposed: dict[Any, list[dict[str, float]]] = {c: [] for c in cases}
    for i in range(reps):
        for case, phase in order[i % len(order) :] + order[: i % len(order)]:
            barrier()
            LEDGER.take_exposed()
            started = time.perf_counter()
            cases[case][phase]()
            times[(case, phase)].append(time.perf_counter() - started)
            if phase == exposed_of:
                exposed[case].append(LEDGER.take_exposed())
    out: dict[Any, dict[str, Any]] = {}
    for case, phases in cases.items():
        runs = exposed[case]
        keys = {k for run in runs for k in run}
        out[case] = {f"{p}_s": min(times[(case, p)]) for p in phases}
        out[case]["exposed"] = {k: statistics.median(run.get(k, 0.0) for run in runs) for k in keys}
    return out


def ep_worker(rank: int, world: int, shape: EPShape, chunks_list: list[int], reps: int) -> dict[int, dict[str, Any]]:
    import torch

    from meshweave.comm import ops
    from meshweave.comm.ops import CommGroup
    from meshweave.config import MoEConfig
    from meshweave.models.moe import MoEFeedForward
    from meshweave.parallel.expert import bind

    torch.set_num_threads(1)
    group = CommGroup(CommGroup.world().pg, "ep")
    settings = MoEConfig(
        num_experts=shape.experts, top_k=shape.top_k, expert_ffn_dim=shape.expert_ffn, shared_experts=1
    )
    real_a2a = ops.all_to_all_single
    x0 = torch.randn(1, shape.tokens, shape.dim, generator=torch.Generator().manual_seed(1 + rank))

    def step(layers: torch.nn.ModuleList) -> None:
        h = x0.clone().requires_grad_()
        for layer in layers:
            h = h + layer(h)
        h.square().mean().backward()
        layers.zero_grad(set_to_none=True)

    def prepare(chunks: int) -> dict[str, Callable[[], None]]:
        torch.manual_seed(0)  # same weights on both ranks and for every C: the same routing
        layers = torch.nn.ModuleList(MoEFeedForward(shape.dim, settings) for _ in range(shape.layers))
        bind(layers, group, chunks=chunks)
        trace: list[tuple[torch.Tensor, list[int] | None, list[int] | None, torch.Tensor | None]] = []
        schedule: list[tuple[str, int, bool]] = []  # ("launch", call, async) / ("wait", call, _)

        class Traced:
            def __init__(self, handle: ops.Handle, call: int) -> None:
                self.handle, self.call = handle, call

            def wait(self) -> None:
                schedule.append(("wait", self.call, True))
                self.handle.wait()

        def recording(o, t, g, out_splits=None, in_splits=None, async_op=False):
            call = len(trace)
            h = real_a2a(o, t, g, out_splits, in_splits, async_op)
            schedule.append(("launch", call, async_op))
            counts = None
            if t.dtype == torch.int64:  # the count exchange: synchronous, keep what it received
                counts = o.clone()
            trace.append((t.new_empty(t.shape), out_splits, in_splits, counts))
            return Traced(h, call) if async_op else h

        ops.all_to_all_single = recording
        try:
            step(layers)
        finally:
            ops.all_to_all_single = real_a2a
        replay = [(t.new_empty((sum(o) if o else t.shape[0], *t.shape[1:])), t, o, i) for t, o, i, _ in trace]
        received_counts = [c for *_, c in trace if c is not None]
        fills = iter(())

        def comm() -> None:
            handles = {}
            for what, call, async_op in schedule:
                if what == "launch":
                    buf, t, o, i = replay[call]
                    handles[call] = real_a2a(buf, t, group, o, i, async_op=async_op)
                else:
                    handles[call].wait()

        def local_fill(o, t, g, out_splits=None, in_splits=None, async_op=False):
            o.copy_(next(fills)) if t.dtype == torch.int64 else o.zero_()
            return ops.Handle(None, group.dim, "all_to_all", 0.0)

        def compute() -> None:
            nonlocal fills
            fills = iter(received_counts)
            ops.all_to_all_single = local_fill
            try:
                step(layers)
            finally:
                ops.all_to_all_single = real_a2a

        return {"comm": comm, "compute": compute, "both": lambda: step(layers)}

    sync = lambda: ops.barrier(CommGroup.world())  # noqa: E731
    return _phases({c: prepare(c) for c in chunks_list}, reps, sync, "both")


MLP_WIDTH, MLP_DEPTH, MLP_BATCH = 1024, 4, 32  # 4.2 M parameters: 16.8 MB of fp32 pseudo-gradient


def co2_worker(rank: int, world: int, reps: int) -> dict[str, Any]:
    import math

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from meshweave.comm import ops
    from meshweave.comm.ops import LEDGER, CommGroup
    from meshweave.config import CO2Config
    from meshweave.lowcomm.co2 import CO2

    torch.set_num_threads(1)
    replicas = CommGroup(dist.new_group(list(range(world))), "dp_replicate")  # its own sockets
    sync = lambda: ops.barrier(CommGroup.world())  # noqa: E731
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(MLP_WIDTH, MLP_WIDTH) for _ in range(MLP_DEPTH)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(MLP_BATCH, MLP_WIDTH, generator=gen), torch.randn(MLP_BATCH, MLP_WIDTH, generator=gen)
    numel = sum(p.numel() for p in model.parameters())

    def inner() -> None:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()

    def comm() -> None:
        ops.all_reduce(torch.zeros(numel), replicas)

    def timed(fn: Callable[[], None]) -> float:
        sync()
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    for fn in (inner, comm):  # warm-up, then calibrate H: a round's compute ~3x the all-reduce
        fn()
    step_s = min(timed(inner) for _ in range(3))
    comm_s = min(timed(comm) for _ in range(3))
    agreed = torch.tensor([max(4, math.ceil(3 * comm_s / step_s))], dtype=torch.int64)
    ops.broadcast(agreed, CommGroup.world())  # the same H on both ranks: rank 0's
    h = int(agreed)

    def compute() -> None:
        for _ in range(h):
            inner()

    # blocks, not turns: a round leaves its all-reduce in flight, which must not share the link
    # with the other phases
    compute_s = min(timed(compute) for _ in range(reps))
    comm_s = min(timed(comm) for _ in range(reps))
    co2 = CO2(model, replicas, CO2Config(enabled=True, inner_steps=h))
    step = 0

    def round_() -> None:
        nonlocal step
        for _ in range(h):
            inner()
            step += 1
            co2.after_inner_step(step)

    round_()  # round 0: launches the first all-reduce, nothing to wait for yet
    both, exposed = [], []
    for _ in range(reps):
        LEDGER.take_exposed()
        started = time.perf_counter()  # no barrier: it would wait behind the all-reduce in flight
        round_()
        both.append(time.perf_counter() - started)
        exposed.append(LEDGER.take_exposed())
    co2.finish(step)
    keys = {k for run in exposed for k in run}
    return {
        "inner_steps": h,
        "numel": numel,
        "comm_s": comm_s,
        "compute_s": compute_s,
        "both_s": min(both),
        "exposed": {k: statistics.median(run.get(k, 0.0) for run in exposed) for k in keys},
    }
