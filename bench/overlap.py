"""Comm-compute overlap per mechanism on slow links: how much communication each one hides.

One table (issue 18), printed and written to ``--out`` (``overlap.md``, raw numbers in
``overlap.json``): for every mechanism and link rate, **communication alone**, **compute alone**,
**both** (the mechanism as training runs it) and the **hidden fraction** = (comm + compute - both)
/ comm, with the goal, whether it is met and — where it is not — what dominates the exposed rest
(from the comm ledger's per-op exposed time, ``comm_exposed_s``). The ranks run in network
namespaces joined by veths shaped with ``tc tbf`` (bench/_netns.py) at ``--rates`` Mbit/s
(default 1000 and 100): on a 2-core CPU overlap shows only when the wire, not the CPU, is the
bottleneck (ALGORITHMS.md, "Comm-compute overlap").

Rows so far:

- **dp** — replicated data parallelism: meshweave's bucketed reducer (comm/overlap.py), all-reduces
  launched from backward hooks. comm alone = ``GradientReducer.finish()`` after a backward under
  ``no_sync`` (every bucket launched at once, no compute beside it); compute alone = that
  backward; both = the overlapped backward + ``finish()``. Goal >= 90% hidden when backward takes at
  least as long as the all-reduce: the per-rank batch is sized from a calibration so it does
  (column "bwd / comm").
- **fsdp** — FSDP2 at dp_shard=2 with each prefetch schedule measured (``parallel.fsdp_*``).
  compute alone = the same model unsharded on one rank; comm alone = the FSDP step on one
  sequence of 8 tokens minus that plain model's time on it (FSDP's own collectives, sizes
  independent of the batch, with ~no compute to hide under); both = the FSDP step on the real batch.
  Goal >= 80%. These rows are what chose the ``parallel.fsdp_*`` defaults.
- **chunked expert dispatch** — ep=2, a stack of MoE layers, one row per ``moe.dispatch_chunks``
  C in :data:`EP_CHUNKS` (C = 1: today's dispatch, only the shared experts under the first
  all-to-all). Goal >= 50%. Worker and phases: bench/_overlap_workers.py.
- **co2** — CO2's outer all-reduce of the pseudo-gradient under the next round of H inner steps
  (H calibrated so the round's compute is ~3x the all-reduce). Goal: all of it (>= 95%). Its
  phases run in blocks, not turns (a round leaves its all-reduce in flight on the link), so its
  wall-clock "hidden" compares timings minutes apart; the ledger column is its reading.
- **tensor parallel** — tp=2 decoder blocks, ``comm.tp_overlap`` off (reference) and on. Goal
  >= 50% hidden and >= 2x less exposed than without. Rows and worker: bench/_overlap_tp.py.

After the table, the DP case is checked against a real training run: ``meshweave train`` with
``dp_replicate=2`` on the same shaped link and model, one sequence per rank (so that a good part
of the all-reduce stays exposed: a well-hidden one leaves a few ms, below the timer noise of a
shared machine); its metrics.jsonl ``comm_exposed_s["dp_replicate/all_reduce"]`` (median over
the steps after the first) against the bench's own stopwatch around the wait before the optimizer
step (``reducer.finish()``) in its workers at the same batch (the issue asks for agreement within
20%); both - compute and the workers' ledger are printed beside it.

**Adding a mechanism** (TP overlap, chunked expert dispatch, CO2 ...): write a function
``(ctx: Context) -> list[Row]`` that measures its comm alone / compute alone / both — usually one
:func:`bench._common.run_ranks` job with ``rate_mbit=ctx.rate`` whose worker times the three
phases the same way (:func:`_timed`: phases taking turns, each after a barrier, the least of
``ctx.reps`` repetitions) and
reads the exposed per op from ``LEDGER.take_exposed()`` — and append it to :data:`MECHANISMS`.
Rows say what dominates through :func:`dominant`.

    sudo .venv/bin/python -m bench.overlap             # ~6-10 min on 2 cores (root: namespaces)
    sudo .venv/bin/python -m bench.overlap --quick     # ~3 min: 1 Gbit/s only, fewer repetitions
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench._common import Report, md_table, options, run_nodes, run_ranks
from bench._netns import ShapedNetwork, available
from bench._overlap_tp import tensor_parallel

# The model: big enough that its gradients take a visible time on the wire, 12 layers so the
# reducer has many buckets (the last one, which backward fills last, is never hidden).
MODEL = {"dim": 192, "n_layers": 12, "n_heads": 6, "n_kv_heads": 3, "ffn_dim": 512, "vocab_size": 512}
SEQ = 128
BUCKET_MB = 1.0
# FSDP schedules measured: (forward prefetch, backward prefetch, reshard_after_forward).
FSDP_SCHEDULES = [(0, 0, "true"), (1, 1, "true"), (2, 2, "true"), (1, 1, "false")]
TIMEOUT_S = 900
# The DP check's per-rank batch: one sequence, so backward is shorter than the all-reduce and a
# good part of it stays exposed — a figure well above the timer noise of a shared machine.
CHECK_BATCH = 1


@dataclass
class Context:
    """What every mechanism gets: the link rate, repetitions, where to put logs, the per-rank
    batch the DP calibration chose (so every row at this rate computes on the same batch)."""

    rate: float
    reps: int
    out: Path
    batch: int = 0
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    mechanism: str
    config: str
    rate_mbit: float
    comm_s: float
    compute_s: float
    both_s: float
    goal: float
    bwd_s: float | None = None
    exposed: dict[str, float] = field(default_factory=dict)  # ledger, per <dim>/<op>, during "both"
    why: dict[str, str] = field(default_factory=dict)  # per op: why it stays exposed (the mechanism knows)

    @property
    def hidden(self) -> float:
        return (self.comm_s + self.compute_s - self.both_s) / self.comm_s if self.comm_s > 0 else math.nan

    @property
    def hidden_ledger(self) -> float:
        """1 - (the ledger's exposed time during "both") / comm alone: the same fraction measured
        at the waits, free of the noise two compute timings carry on a shared machine."""
        return 1 - sum(self.exposed.values()) / self.comm_s if self.comm_s > 0 else math.nan


# ================================================================================================
# shared worker pieces (they run inside the gloo ranks)


def _config(parallel: dict[str, Any], batch: int, world: int) -> Any:
    from meshweave.config import Config

    cfg = Config()
    for key, value in MODEL.items():
        setattr(cfg.model, key, value)
    cfg.train.seq_len, cfg.train.global_batch = SEQ, batch * world
    cfg.comm.bucket_mb = BUCKET_MB
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def _batch(batch: int, seq: int = SEQ) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, MODEL["vocab_size"], (batch, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _timed(phases: dict[str, Callable[[], Any]], reps: int, barrier: Callable[[], None]) -> dict[str, float]:
    """Per phase, the least seconds over ``reps`` runs (after one warm-up each), each run after a
    barrier. The phases take turns (a, b, c, a, b, c, ...) so a burst of load from elsewhere on the
    machine hits them alike, and the minimum is the run least disturbed by it."""
    for fn in phases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in phases}
    for _ in range(reps):
        for name, fn in phases.items():
            barrier()
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: min(ts) for name, ts in times.items()}


def _plain_model(cfg: Any) -> Any:
    """The model unsharded on this rank alone (no collectives), initialised like the trainer's."""
    import torch

    from meshweave.models.llama import build_model
    from meshweave.parallel.parallelize import materialize

    model = build_model(cfg.model)
    materialize(model, torch.device("cpu"), 0)
    return model


def _fwd_bwd(model: Any, inputs: Any, labels: Any) -> Callable[[], None]:
    from meshweave.trainer.loop import _token_loss_sum

    def step() -> None:
        loss = _token_loss_sum(model(inputs), labels) / labels.numel()
        loss.backward()
        model.zero_grad(set_to_none=False)

    return step


def _runtime(cfg: Any, world: int) -> Any:
    import torch

    from meshweave.comm import capture
    from meshweave.models.llama import build_model
    from meshweave.parallel.dims import resolve_degrees
    from meshweave.parallel.parallelize import parallelize
    from meshweave.trainer.loop import _token_loss_sum

    capture.install()
    dims = resolve_degrees(cfg, world)
    mesh = dims.build_mesh("cpu")
    return parallelize(build_model(cfg.model), dims, mesh, cfg, torch.device("cpu"), _token_loss_sum)


def _exposed_during(fn: Callable[[], None], reps: int, barrier: Callable[[], None]) -> dict[str, float]:
    """Median exposed seconds per ``<dim>/<op>`` over ``reps`` runs of ``fn`` (the ledger's), each
    after a barrier like the timed phases (a peer's lag from before the run is not the mechanism's)."""
    from meshweave.comm.ops import LEDGER

    runs = []
    for _ in range(reps):
        barrier()
        LEDGER.take_exposed()
        fn()
        runs.append(LEDGER.take_exposed())
    keys = {k for run in runs for k in run}
    return {k: statistics.median(run.get(k, 0.0) for run in runs) for k in keys}


# ================================================================================================
# dp: the replicated, bucketed reducer


def dp_worker(rank: int, world: int, batch: int, reps: int, calibrate: bool) -> dict[str, Any]:
    import torch

    from meshweave.comm.ops import CommGroup, barrier

    torch.set_num_threads(1)
    cfg = _config({"dp_replicate": world, "dp_shard": 1}, batch, world)
    runtime = _runtime(cfg, world)
    model, reducer = runtime.model, runtime.reducer
    assert reducer is not None, "dp_replicate=world must use the bucketed reducer"
    sync = lambda: barrier(CommGroup.world())  # noqa: E731
    inputs, labels = _batch(batch)
    from meshweave.trainer.loop import _token_loss_sum

    def forward() -> Any:
        return _token_loss_sum(model(inputs), labels) / labels.numel()

    def compute() -> None:
        with reducer.no_sync():
            forward().backward()
        model.zero_grad(set_to_none=False)

    def backward_only() -> float:
        with reducer.no_sync():
            loss = forward()
            started = time.perf_counter()
            loss.backward()
            took = time.perf_counter() - started
        model.zero_grad(set_to_none=False)
        return took

    def comm() -> None:
        reducer.finish()  # the backward above left gradients; every bucket launched at once

    def both() -> None:
        forward().backward()
        reducer.finish()
        model.zero_grad(set_to_none=False)

    def comm_after_compute() -> None:
        compute()  # untimed: leaves gradients for the reduction
        sync()
        started = time.perf_counter()
        comm()
        comm_times.append(time.perf_counter() - started)

    def both_timing_finish() -> None:
        forward().backward()
        started = time.perf_counter()
        reducer.finish()
        finish_times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=False)

    comm_times: list[float] = []
    finish_times: list[float] = []
    compute()
    bwd = min(backward_only() for _ in range(max(reps, 3)))
    for _ in range(max(reps, 3)):
        comm_after_compute()
    comm_s = min(comm_times)
    if calibrate:
        return {"bwd_s": bwd, "comm_s": comm_s}
    t = _timed({"compute": compute, "both": both}, reps, sync)
    exposed = _exposed_during(both_timing_finish, reps, sync)
    return {
        "bwd_s": bwd,
        "comm_s": comm_s,
        "compute_s": t["compute"],
        "both_s": t["both"],
        "finish_s": statistics.median(finish_times),
        "finish_times": finish_times,
        "comm_times": comm_times,
        "exposed": exposed,
        "buckets": reducer.num_buckets,
        "last_bucket_mb": reducer.buckets[-1].numel * 4 / 2**20,  # filled last by backward
        "grad_mb": sum(p.numel() * 4 for p in model.parameters()) / 2**20,
    }


def _ranks(fn: Callable, ctx: Context, name: str, *args: Any) -> list[Any]:
    res = run_ranks(fn, 2, *args, log_dir=ctx.out / "logs" / "overlap" / name, timeout=TIMEOUT_S, rate_mbit=ctx.rate)
    if isinstance(res, str):
        raise RuntimeError(f"{name}: {res}")
    return res


def dp(ctx: Context) -> list[Row]:
    """Replicated DP rows; sizes ``ctx.batch`` so backward takes ~1.3x the all-reduce."""
    probe = 2
    cal = _ranks(dp_worker, ctx, f"dp-calibrate-{ctx.rate:g}", probe, max(ctx.reps, 3), True)[0]
    ctx.batch = max(probe, math.ceil(probe * 1.3 * cal["comm_s"] / cal["bwd_s"]))
    r = _ranks(dp_worker, ctx, f"dp-{ctx.rate:g}", ctx.batch, ctx.reps, False)[0]
    for _ in range(2):  # load from elsewhere skews the calibration: enlarge until the condition holds
        if r["bwd_s"] >= r["comm_s"]:
            break
        ctx.batch = math.ceil(ctx.batch * 1.3 * r["comm_s"] / r["bwd_s"])
        r = _ranks(dp_worker, ctx, f"dp-{ctx.rate:g}", ctx.batch, ctx.reps, False)[0]
    ctx.notes["dp"] = r
    row = Row(
        "dp (replicated, bucketed)",
        f"{r['buckets']} buckets of <= {BUCKET_MB:g} MB, {r['grad_mb']:.1f} MB grads, batch {ctx.batch}x{SEQ}",
        ctx.rate,
        r["comm_s"],
        r["compute_s"],
        r["both_s"],
        0.90,
        bwd_s=r["bwd_s"],
        exposed=r["exposed"],
    )
    row.why["all_reduce"] = _dp_why(r)
    return [row]


def _dp_why(r: dict[str, Any]) -> str:
    """Whether the last bucket explains the exposed all-reduce, or the CPU it shares with backward."""
    tail = r["comm_s"] * r["last_bucket_mb"] / r["grad_mb"]  # the bucket backward fills last, alone
    exposed = sum(r["exposed"].values())
    if exposed <= 1.5 * tail + 0.01:
        return f"the last bucket, filled at the end of backward, ~{tail:.3f} s on the wire, cannot overlap"
    return (
        f"more than the last bucket (~{tail:.3f} s): beside backward the all-reduces ran slower than alone — "
        "gloo's thread shares the 2 cores with the compute and the machine's other load"
    )


# ================================================================================================
# fsdp: FSDP2 with each prefetch schedule


def fsdp_worker(rank: int, world: int, batch: int, reps: int, schedules: list[tuple[int, int, str]]) -> list[dict]:
    import torch

    from meshweave.comm.ops import CommGroup, barrier

    torch.set_num_threads(1)
    sync = lambda: barrier(CommGroup.world())  # noqa: E731
    real, tiny = _batch(batch), _batch(1, 8)
    cfg = _config({"dp_shard": world}, batch, world)
    plain = _plain_model(cfg)
    out = []
    for forward, backward, reshard in schedules:
        parallel = {
            "dp_shard": world,
            "fsdp_forward_prefetch": forward,
            "fsdp_backward_prefetch": backward,
            "fsdp_reshard_after_forward": reshard,
        }
        model = _runtime(_config(parallel, batch, world), world).model
        both = _fwd_bwd(model, *real)
        phases = {
            "compute": _fwd_bwd(plain, *real),
            "compute_tiny": _fwd_bwd(plain, *tiny),
            "both": both,
            "both_tiny": _fwd_bwd(model, *tiny),
        }
        t = _timed(phases, reps, sync)
        out.append(
            {
                "schedule": (forward, backward, reshard),
                "comm_s": max(t["both_tiny"] - t["compute_tiny"], 1e-9),
                "compute_s": t["compute"],
                "both_s": t["both"],
                "exposed": _exposed_during(both, reps, sync),
            }
        )
    return out


def fsdp(ctx: Context) -> list[Row]:
    """One row per FSDP prefetch schedule, on the batch the DP calibration chose."""
    batch = ctx.batch or 4
    res = _ranks(fsdp_worker, ctx, f"fsdp-{ctx.rate:g}", batch, ctx.reps, FSDP_SCHEDULES)[0]
    ctx.notes["fsdp"] = res
    rows = []
    for r in res:
        forward, backward, reshard = r["schedule"]
        why = {}
        if not (forward or backward):
            why["all_gather"] = "FSDP2's implicit schedule gathers each layer on entry, synchronously on CPU"
        rows.append(
            Row(
                "fsdp (FSDP2, dp_shard=2)",
                f"prefetch fwd {forward} / bwd {backward}, reshard_after_forward={reshard}",
                ctx.rate,
                r["comm_s"],
                r["compute_s"],
                r["both_s"],
                0.80,
                exposed=r["exposed"],
                why=why,
            )
        )
    return rows


# ================================================================================================
# chunked expert dispatch and CO2 (workers in bench/_overlap_workers.py)

EP_CHUNKS = [1, 2, 4, 8]


def chunked_experts(ctx: Context) -> list[Row]:
    """One row per ``moe.dispatch_chunks`` C (1 = the unchunked dispatch, shared experts under the
    first all-to-all only): forward + backward of a stack of MoE layers at ep=2. Goal >= 50%."""
    from bench._overlap_workers import EPShape, ep_worker

    shape = EPShape()
    res = _ranks(ep_worker, ctx, f"ep-{ctx.rate:g}", shape, EP_CHUNKS, ctx.reps)[0]
    ctx.notes["ep"] = res
    rows = []
    for chunks in EP_CHUNKS:
        r = res[chunks]
        why = {"all_to_all": _ep_why(chunks, r)}
        label = f"C={chunks}, " + ("unchunked" if chunks == 1 else f"{1 + 4 * chunks} a2a per layer")
        rows.append(
            Row(
                "chunked expert dispatch (ep=2)",
                f"{label}; {shape.label()}",
                ctx.rate,
                r["comm_s"],
                r["compute_s"],
                r["both_s"],
                0.50,
                exposed=r["exposed"],
                why=why,
            )
        )
    return rows


def _ep_why(chunks: int, r: dict[str, Any]) -> str:
    if r["compute_s"] < r["comm_s"]:
        return f"the wire: compute is {r['compute_s'] / r['comm_s']:.0%} of the all-to-alls, the rest cannot hide"
    if chunks == 1:
        return "no pipeline: the experts wait for the whole dispatch, the combine and both reverses are synchronous"
    return (
        f"pipeline fill and drain (first dispatch and last combine chunk each way, ~{2 / chunks:.0%} of the comm) "
        "and the synchronous count exchange"
    )


def co2(ctx: Context) -> list[Row]:
    """CO2's outer all-reduce under a round of H inner steps (H sized so the round's compute is
    ~3x the all-reduce alone). Goal: all of it hidden (>= 95%: the timers' resolution on a shared machine)."""
    from bench._overlap_workers import MLP_BATCH, MLP_DEPTH, MLP_WIDTH, co2_worker

    r = _ranks(co2_worker, ctx, f"co2-{ctx.rate:g}", ctx.reps)[0]
    ctx.notes["co2"] = r
    config = (
        f"H={r['inner_steps']} AdamW steps of an MLP {MLP_DEPTH}x{MLP_WIDTH} (batch {MLP_BATCH}), "
        f"{r['numel'] * 4 / 2**20:.1f} MB pseudo-gradient"
    )
    why = {"all_reduce": "a round's compute shorter than the all-reduce, or gloo's thread slowed by the compute"}
    return [
        Row(
            "co2 (outer all-reduce)",
            config,
            ctx.rate,
            r["comm_s"],
            r["compute_s"],
            r["both_s"],
            0.95,
            exposed=r["exposed"],
            why=why,
        )
    ]


MECHANISMS: list[Callable[[Context], list[Row]]] = [dp, fsdp, chunked_experts, co2, tensor_parallel]

# Why an op's exposed time is what it is, where the reason is known (for the "dominated by" column).
WHY = {
    "reduce_scatter": "FSDP2 issues its reduce-scatter synchronously on CPU (no side streams): never hidden",
    "all_gather": "an all-gather the prefetch did not start early enough",
}


def dominant(row: Row) -> str:
    """The op with the most exposed time during "both", its share of the exposed total, and why."""
    if not row.exposed:
        return "-"
    key, value = max(row.exposed.items(), key=lambda kv: kv[1])
    total = sum(row.exposed.values())
    why = row.why.get(key.rsplit("/", 1)[-1]) or WHY.get(key.rsplit("/", 1)[-1], "")
    return f"{key} {value:.3f} s of {total:.3f} s exposed" + (f" ({why})" if why else "")


# ================================================================================================
# the DP check against a training run's metrics.jsonl


def trainer_exposed(ctx: Context, batch: int, port: int) -> dict[str, Any]:
    """``meshweave train`` at dp_replicate=2 on the shaped link, ``batch`` sequences per rank; the
    median (steps after the first) of its ``comm_exposed_s["dp_replicate/all_reduce"]`` and of its
    step time."""
    flags = [f"--model.{k}={v}" for k, v in MODEL.items()] + [
        f"--train.seq_len={SEQ}",
        f"--train.global_batch={2 * batch}",
        "--train.steps=8",
        "--parallel.dp_replicate=2",
        "--parallel.dp_shard=1",
        f"--comm.bucket_mb={BUCKET_MB}",
    ]
    with ShapedNetwork(2, ctx.rate) as net:
        prefixes = [net.command(rank, []) for rank in range(2)]
        envs = [{"GLOO_SOCKET_IFNAME": dev} for dev in net.dev]
        run = run_nodes(
            ctx.out / "logs" / "overlap" / f"train-dp-{ctx.rate:g}", flags, TIMEOUT_S, net.addr[0], port, prefixes, envs
        )
    if not run.ok or len(run.records) < 2:
        return {"error": run.error(("node0.log", "node1.log"))}
    steady = run.records[1:]
    return {
        "exposed_s": statistics.median(r["comm_exposed_s"].get("dp_replicate/all_reduce", 0.0) for r in steady),
        "step_time_s": statistics.median(r["step_time_s"] for r in steady),
        "dp_exposed_wait_s": statistics.median(r["dp_exposed_wait_s"] for r in steady),
    }


# ================================================================================================
# report


def _s(x: float) -> str:
    return f"{x:.3f}"


def table(rows: list[Row]) -> str:
    headers = [
        "mechanism",
        "config",
        "link",
        "comm alone s",
        "compute alone s",
        "bwd / comm",
        "both s",
        "hidden",
        "hidden (ledger)",
        "goal",
        "dominated by",
    ]
    body = []
    for r in rows:
        met = r.hidden >= r.goal
        body.append(
            [
                r.mechanism,
                r.config,
                f"{r.rate_mbit:g} Mbit/s",
                _s(r.comm_s),
                _s(r.compute_s),
                f"{r.bwd_s / r.comm_s:.2f}" if r.bwd_s else "-",
                _s(r.both_s),
                f"{100 * r.hidden:.0f}%",
                f"{100 * r.hidden_ledger:.0f}%",
                f">= {100 * r.goal:.0f}% " + ("met" if met else "MISSED"),
                "-" if met else dominant(r),
            ]
        )
    return md_table(headers, body, right=(3, 4, 5, 6, 7, 8))


def dp_check(ctx: Context, r: dict[str, Any], train: dict[str, Any]) -> str:
    """The comparison line: the trainer's metrics.jsonl against the bench's own measurement."""
    if "error" in train:
        return f"DP check at {ctx.rate:g} Mbit/s: the training run failed ({train['error']})"
    bench_exposed = max(r["both_s"] - r["compute_s"], 0.0)
    ledger = r["exposed"].get("dp_replicate/all_reduce", 0.0)
    metrics = train["exposed_s"]

    def apart(x: float, ref: float) -> str:
        rel = abs(x - ref) / ref if ref > 0 else math.inf
        return f"{100 * rel:.0f}% apart " + ("(within 20%)" if rel <= 0.20 else "(NOT within 20%)")

    return (
        f"DP check at {ctx.rate:g} Mbit/s — `meshweave train` metrics.jsonl comm_exposed_s[dp_replicate/all_reduce] "
        f"{metrics:.3f} s (median over steps 2-8; its dp_exposed_wait_s {train['dp_exposed_wait_s']:.3f} s, step "
        f"{train['step_time_s']:.3f} s) against the bench's stopwatch around the wait before the optimizer step "
        f"(reducer.finish(), median) {r['finish_s']:.3f} s: {apart(metrics, r['finish_s'])}. For reference: "
        f"both - compute {bench_exposed:.3f} s ({apart(metrics, bench_exposed)}); the bench workers' own ledger "
        f"{ledger:.3f} s."
    )


def main(argv: list[str] | None = None) -> int:
    ap = options(__doc__ or "", "1 Gbit/s only, 3 repetitions")
    ap.add_argument("--rates", default="1000,100", help="link rates in Mbit/s, comma-separated")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per phase (median)")
    args = ap.parse_args(argv)
    rates = [1000.0] if args.quick else [float(x) for x in args.rates.split(",") if x.strip()]
    reps = 3 if args.quick else args.reps
    report = Report(args.out, "overlap", "Comm-compute overlap per mechanism (bench/overlap.py)")
    reason = available()
    if reason:
        report.add(f"skipped: {reason}")
        return report.finish()
    report.add(
        f"{report.environment('torch')}. Two gloo ranks, each in its own network namespace, veths on a bridge "
        f"shaped with `tc tbf` (bench/_netns.py). Model: {MODEL}, seq {SEQ}, fp32. Times: rank 0, the least of {reps} "
        "repetitions after a warm-up, phases taking turns, each after a barrier (the machine is shared). "
        "hidden = (comm + compute - both) / comm."
    )
    rows: list[Row] = []
    checks = []
    for i, rate in enumerate(rates):
        ctx = Context(rate, reps, args.out)
        for mechanism in MECHANISMS:
            try:
                new = mechanism(ctx)
            except RuntimeError as e:
                report.add(f"{mechanism.__name__} at {rate:g} Mbit/s failed: {e}")
                continue
            rows += new
            report.raw.setdefault("rows", []).extend({**asdict(r), "hidden": r.hidden} for r in new)
            print(table(new), flush=True)
        try:
            bench_side = _ranks(dp_worker, ctx, f"dp-check-{rate:g}", CHECK_BATCH, ctx.reps, False)[0]
        except RuntimeError as e:
            checks.append(f"DP check at {rate:g} Mbit/s failed: {e}")
            continue
        train = trainer_exposed(ctx, CHECK_BATCH, 29700 + i)
        report.raw.setdefault("dp_check", {})[f"{rate:g}"] = {"bench": bench_side, "train": train}
        checks.append(dp_check(ctx, bench_side, train))
        print(checks[-1], flush=True)
    report.add(table(rows))
    report.add("\n\n".join(checks))
    return report.finish()


if __name__ == "__main__":
    raise SystemExit(main())
