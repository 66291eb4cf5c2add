"""Pipeline bubble per schedule vs theory, and meshweave 1F1B vs DeepSpeed's PipelineEngine.

Two tables (three views of the first), printed and written to ``--out`` (``pipeline.md`` and the
raw numbers in ``pipeline.json``):

1. **Bubble per schedule.** For gpipe, 1f1b, interleaved_1f1b (v=2), interleaved_zb (v=2) and zbv
   at pp=2 and pp=4 (one gloo process per stage, one intra-op thread each) and m = pp, 2pp, 4pp
   microbatches, the stages are built exactly as the trainer builds them (a meta
   ``Transformer`` -> ``parallelize`` -> ``split_model`` + ``materialize`` -> ``build_schedule``
   with the trainer's token-sum / global-token loss) and stepped like ``Trainer.train_step``
   (``schedule.step``, loss all-reduce, ``clip_pipeline_gradients``, AdamW). Each
   ``PipelineStage``'s ``forward_one_chunk`` / ``backward_one_chunk`` /
   ``backward_weight_one_chunk`` and the schedule's loss call are wrapped to add up their
   ``perf_counter`` time (and the thread's CPU time). For every timed step, after a barrier,

       idle(rank) = 1 - busy(rank) / T,    T = max over ranks of the schedule.step wall time,

   averaged over the timed steps; the *measured bubble* is the mean over ranks. Beside it:

   - **closed form** — (p-1)/(m+p-1) for gpipe and 1f1b, (p-1)/(v m+p-1) for interleaved_1f1b
     (Narayanan et al. 2021); the zero-bubble schedules have no closed form here, they tend to 0 as
     m grows when F = B_input = B_weight, so "->0" is printed;
   - **ideal sim** — the exact action lists torch builds for this (schedule, p, m), replayed with
     F = 1, full backward B = 2, input-grad I = 1, weight-grad W = 1 and free communication (equals
     the closed form for gpipe / 1f1b; for the zero-bubble schedules it *is* their theory);
   - **sim @ measured costs** — the same replay with each stage's measured mean CPU time per F / B /
     I / W (+ loss on the last stage): the bubble the schedule would have on dedicated cores with
     free communication. measured minus this = communication, Python/schedule overhead, contention.

   "busy wall/CPU" is wall-clock busy time over thread CPU time of the same calls: 1.0 means the
   rank had a core to itself while computing. Busy time is wall time, so a slowdown that hits all
   compute alike (other users' load) cancels out of busy / T. pp=4 runs 4 processes on 2 cores:
   whenever more than two ranks compute at once they are time-sliced, which stretches their busy
   time (idle looks smaller) while ranks that wait for a descheduled neighbour idle longer (idle
   looks larger); at pp=4 the measured column mostly describes CPU oversubscription, and "sim @
   measured costs" is the estimate for one core per stage.

2. **DeepSpeed PipelineEngine vs meshweave 1F1B.** The same model (meshweave's ``DecoderLayer``
   modules with fixed RoPE tables, the same init) as a ``deepspeed.pipe.PipelineModule`` split by
   decoder layers like meshweave's cost split, ``deepspeed.initialize`` with a plain torch AdamW,
   ``gradient_accumulation_steps = m``, clip 1.0, fp32, gloo; ``engine.train_batch``. meshweave 1F1B
   and DeepSpeed live in the same processes and take turns step by step (order alternating), so
   machine noise lands on both alike. Step time = barrier to end of the optimizer step on the
   slowest rank, median over the timed steps; ratio = meshweave / DeepSpeed (< 1: meshweave faster),
   with the min-max of the per-step ratios of back-to-back steps as the noise band.

On a shared 2-core CPU box absolute times mean little; compare columns measured in the same run.

    .venv/bin/python -m bench.pipeline            # ~7-10 min on 2 cores
    .venv/bin/python -m bench.pipeline --quick    # ~1.5-2 min: seq_len 128, m = 2pp only, 2 timed steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench._common import Report, fmt_ratio, int_list, md_table, options, package_version, run_ranks
from bench._peers import deepspeed_env, deepspeed_missing, start_peer

# (schedule, virtual stages per rank)
SCHEDULES: list[tuple[str, int]] = [
    ("gpipe", 1),
    ("1f1b", 1),
    ("interleaved_1f1b", 2),
    ("interleaved_zb", 2),
    ("zbv", 2),
]
MODEL = dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=688, vocab_size=512)
SEED = 1234
UNIT_COST = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}


@dataclass
class Spec:
    """Everything a worker needs (picklable)."""

    model: dict
    seq_len: int
    batch: int
    ms: list[int]  # microbatch counts for this pp
    schedules: list[tuple[str, int]]
    warmup: int
    steps: int
    ds_ms: list[int]
    ds_warmup: int
    ds_steps: int
    ds: bool
    ds_skip: str = ""  # why DeepSpeed is not run, when ds is False


# ================================================================================================
# theory


def closed_form(schedule: str, p: int, m: int, v: int) -> float | None:
    """(p-1)/(m+p-1) for gpipe / 1f1b, (p-1)/(v m+p-1) for interleaved 1F1B; None for zero-bubble."""
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved_1f1b":
        return (p - 1) / (v * m + p - 1)
    return None


Action = tuple[int, str, int]  # (stage, "F" | "B" | "I" | "W", microbatch)


def simulate(order: dict[int, list[Action]], cost: Callable[[int, str], float]) -> tuple[list[float], float]:
    """Replay each rank's compute actions in order with free communication; returns the per-rank
    idle fractions and the makespan.

    An action starts when its rank is free and its inputs exist: F(s, mb) after F(s-1, mb);
    B / I(s, mb) after F(s, mb) and B / I(s+1, mb); W(s, mb) after I(s, mb).
    """
    n_stages = 1 + max(s for acts in order.values() for s, _, _ in acts)
    finished: dict[tuple, float] = {}
    pos = {r: 0 for r in order}
    clock = {r: 0.0 for r in order}
    busy = {r: 0.0 for r in order}
    while any(pos[r] < len(order[r]) for r in order):
        progressed = False
        for r, acts in order.items():
            while pos[r] < len(acts):
                s, kind, mb = acts[pos[r]]
                deps = []
                if kind == "F" and s > 0:
                    deps.append((s - 1, "F", mb))
                if kind in ("B", "I"):
                    deps.append((s, "F", mb))
                    if s < n_stages - 1:
                        deps.append((s + 1, "grad", mb))
                if kind == "W":
                    deps.append((s, "I", mb))
                if any(d not in finished for d in deps):
                    break
                start = max([clock[r], *(finished[d] for d in deps)])
                clock[r] = start + cost(s, kind)
                busy[r] += cost(s, kind)
                finished[(s, kind, mb)] = clock[r]
                if kind in ("B", "I"):
                    finished[(s, "grad", mb)] = clock[r]
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(
                f"schedule deadlocks in simulation at {[order[r][pos[r]] for r in order if pos[r] < len(order[r])]}"
            )
    span = max(clock.values())
    return [1.0 - busy[r] / span for r in sorted(order)], span


# ================================================================================================
# workers


def _quiet() -> None:
    """Silence torch's deprecation chatter and the pipelining INFO logs in worker logs."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("torch.distributed.pipelining").setLevel(logging.ERROR)


def _config(spec: Spec, pp: int, schedule: str, v: int, m: int) -> Any:
    """The run's Config: meshweave's model, pp only, the schedule, m microbatches, no warm-up LR."""
    from meshweave.config import Config, ModelConfig, OptimConfig, ParallelConfig, TrainConfig

    return Config(
        model=ModelConfig(**spec.model),
        parallel=ParallelConfig(
            pp=pp, dp_shard=1, pp_schedule=schedule, pp_microbatches=m, pp_virtual_stages=v if v > 1 else 0
        ),
        optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant", grad_clip=1.0),
        train=TrainConfig(global_batch=spec.batch, seq_len=spec.seq_len, seed=SEED, device="cpu"),
    )


class Meter:
    """Adds up wall (perf_counter) and thread-CPU time of wrapped calls per (stage, kind)."""

    def __init__(self) -> None:
        self.wall: dict[tuple[int, str], float] = {}
        self.cpu: dict[tuple[int, str], float] = {}
        self.calls: dict[tuple[int, str], int] = {}
        self.sequence: list[tuple[int, str]] = []  # (stage, kind) in call order, to check the replayed order

    def _add(self, key: tuple[int, str], wall: float, cpu: float) -> None:
        self.wall[key] = self.wall.get(key, 0.0) + wall
        self.cpu[key] = self.cpu.get(key, 0.0) + cpu
        self.calls[key] = self.calls.get(key, 0) + 1
        self.sequence.append(key)

    def wrap(self, obj: Any, method: str, key: Callable[[tuple, dict], tuple[int, str]]) -> None:
        """Replace ``obj.method`` by a timed call (an instance attribute shadows the class's)."""
        original = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self._add(key(args, kwargs), time.perf_counter() - w0, time.thread_time() - c0)

        setattr(obj, method, timed)

    def take(self) -> dict:
        """This step's totals ({"stage/kind": seconds}), then reset."""
        out = {
            "wall": {f"{s}/{k}": t for (s, k), t in self.wall.items()},
            "cpu": {f"{s}/{k}": t for (s, k), t in self.cpu.items()},
            "calls": {f"{s}/{k}": n for (s, k), n in self.calls.items()},
            "sequence": [f"{s}/{k}" for s, k in self.sequence if k != "L"],
        }
        self.wall, self.cpu, self.calls, self.sequence = {}, {}, {}, []
        return out


def _instrument(schedule: Any, meter: Meter) -> list[Any]:
    """Wrap the schedule's stages' compute calls and its loss call; returns the stages.

    Private torch attributes: ``_stages`` (multi-stage schedules) / ``_stage`` and ``_compute_loss``.
    """
    stages = list(getattr(schedule, "_stages", None) or [schedule._stage])
    for st in stages:
        i = st.stage_index
        meter.wrap(st, "forward_one_chunk", lambda a, k, i=i: (i, "F"))
        meter.wrap(
            st,
            "backward_one_chunk",
            lambda a, k, i=i: (i, "B" if k.get("full_backward", a[2] if len(a) > 2 else True) else "I"),
        )
        meter.wrap(st, "backward_weight_one_chunk", lambda a, k, i=i: (i, "W"))
    last = next((st.stage_index for st in stages if st.is_last), None)
    if last is not None:
        meter.wrap(schedule, "_compute_loss", lambda a, k, i=last: (i, "L"))
    return stages


def single_stage_order(schedule: str, pp: int, m: int) -> dict[int, list[Action]]:
    """The compute order torch's ScheduleGPipe / Schedule1F1B ``_step_microbatches`` run on each rank.

    Rebuilt here because their ``_get_pipeline_order()`` IR is informational only, and for 1F1B
    wrong on the last rank (its first forward is microbatch 1: ``forward_mb`` is incremented
    before use when there are no warm-up forwards).
    """
    order = {}
    for r in range(pp):
        if schedule == "gpipe":
            order[r] = [(r, "F", i) for i in range(m)] + [(r, "B", i) for i in range(m)]
            continue
        warmup = min(m, pp - r)  # torch's 1F1B: stage s runs num_stages - s forwards first
        acts: list[Action] = [(r, "F", i) for i in range(warmup)]
        f, b = warmup, 0
        while True:
            acts.append((r, "B", b))
            b += 1
            if f == m:
                break
            acts.append((r, "F", f))
            f += 1
        acts += [(r, "B", i) for i in range(b, m)]
        order[r] = acts
    return order


def _compute_order(schedule: Any) -> dict[int, list[Action]]:
    """The per-rank compute actions a multi-stage schedule executes (its lowered action lists,
    ``pipeline_order_with_comms``, with the comm / reduce actions dropped)."""
    order = schedule.pipeline_order_with_comms
    out = {}
    for rank, acts in order.items():
        out[int(rank)] = [
            (a.stage_index, str(a.computation_type.value), a.microbatch_index)
            for a in acts
            if a is not None and str(a.computation_type.value) in UNIT_COST
        ]
    return out


class MeshweavePipeline:
    """One trainer-equivalent pipeline: ``parallelize``'s runtime (stages, schedule), the optimizer
    and a ``step`` as ``Trainer.train_step`` takes it."""

    def __init__(self, cfg: Any, dims: Any, mesh: Any, meter: Meter | None) -> None:
        import torch
        import torch.nn.functional as F

        from meshweave.data.datasets import IGNORE_INDEX
        from meshweave.models.llama import build_model
        from meshweave.parallel.parallelize import parallelize
        from meshweave.trainer.optim import build_optimizer

        def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # the trainer's loss
            flat = logits.flatten(0, 1).float()
            return F.cross_entropy(flat, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

        self.cfg, self.ignore_index = cfg, IGNORE_INDEX
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
        self.runtime = parallelize(model, dims, mesh, cfg, torch.device("cpu"), token_loss_sum)
        self.parts, self.schedule = self.runtime.pipeline, self.runtime.schedule
        self.stages = _instrument(self.schedule, meter) if meter is not None else []
        self.pipe_s = 0.0
        step = self.schedule.step

        def timed_step(*args: Any, **kwargs: Any) -> Any:  # the schedule's share of the step
            t0 = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self.pipe_s = time.perf_counter() - t0

        self.schedule.step = timed_step
        self.optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
        self.model = model

    def step(self, inputs: Any, labels: Any) -> tuple[float, float]:
        """One optimizer step as Trainer.train_step takes it (dp = 1: this rank's tokens are the
        step's); returns (schedule.step seconds, loss)."""
        tokens = float((labels != self.ignore_index).sum())
        loss = self.runtime.forward_backward([(inputs, labels)], tokens)
        self.runtime.clip_gradients(self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.runtime.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.pipe_s, loss


def _loader(spec: Spec) -> Any:
    """A fresh ShardedLoader over the embedded corpus: one (inputs, labels) of ``batch`` per step."""
    from meshweave.config import DataConfig
    from meshweave.data.build import build_datasets
    from meshweave.data.loader import ShardedLoader

    train, _, _ = build_datasets(DataConfig(), spec.seq_len, SEED)
    return ShardedLoader(train, spec.batch, 0, 0, 1, SEED)  # every stage sees the whole batch (dp = 1)


def _sweep_one(spec: Spec, pp: int, schedule: str, v: int, m: int, dims: Any, mesh: Any) -> dict:
    """Warm up and time one (schedule, m) on this rank; per-step records plus the action lists."""
    import torch.distributed as dist

    meter = Meter()
    pipe = MeshweavePipeline(_config(spec, pp, schedule, v, m), dims, mesh, meter)
    loader = _loader(spec)
    steps = []
    for i in range(spec.warmup + spec.steps):
        ((inputs, labels, _),) = loader.next_batch()
        dist.barrier()
        meter.take()
        t0 = time.perf_counter()
        pipe_s, loss = pipe.step(inputs, labels)
        step_s = time.perf_counter() - t0
        busy = meter.take()
        if i >= spec.warmup:
            steps.append({"pipe_s": pipe_s, "step_s": step_s, "loss": loss, **busy})
    out = {
        "stage_ids": list(pipe.parts.stage_ids),
        "steps": steps,
        "order": _compute_order(pipe.schedule) if v > 1 else single_stage_order(schedule, pp, m),
    }
    mine = [f"{s}/{k}" for s, k, _ in out["order"][dist.get_rank()]]
    out["order_matches"] = all(step["sequence"] == mine for step in steps)
    for step in steps:
        del step["sequence"]
    del pipe
    return out


def pipeline_worker(rank: int, world: int, spec: Spec) -> dict:
    """Table 1 sweep, then Table 2 (DeepSpeed vs meshweave 1F1B), on ``world`` = pp ranks."""
    _quiet()
    import gc

    from meshweave.config import ConfigError
    from meshweave.parallel.dims import ParallelDims
    from meshweave.validation import validate

    dims = ParallelDims(pp=world, dp_replicate=1, dp_shard=1, cp=1, tp=1)
    mesh = dims.build_mesh("cpu")
    sweep = {}
    for schedule, v in spec.schedules:
        for m in spec.ms:
            key = f"{schedule}/m={m}"
            cfg = _config(spec, world, schedule, v, m)
            try:
                validate(cfg, world)
            except ConfigError as e:  # deterministic: every rank skips it alike
                sweep[key] = {"rejected": str(e)}
                continue
            t0 = time.perf_counter()
            sweep[key] = _sweep_one(spec, world, schedule, v, m, dims, mesh)
            sweep[key]["elapsed_s"] = time.perf_counter() - t0
            gc.collect()
    ds = deepspeed_vs_meshweave(spec, world, dims, mesh) if spec.ds_ms else {"error": "not run"}
    return {"sweep": sweep, "ds": ds}


# ------------------------------------------------------------------------------------------------
# DeepSpeed


def _ds_pipe_module(spec: Spec, pp: int) -> Any:
    """meshweave's model (same init) as a DeepSpeed PipelineModule: embedding, N decoder layers
    with fixed RoPE tables, final norm + head; split so each stage gets the same decoder layers."""
    import torch
    import torch.nn.functional as F
    from deepspeed.pipe import PipelineModule
    from torch import nn

    from meshweave.config import ModelConfig
    from meshweave.models.llama import build_model
    from meshweave.models.rope import rotary_tables
    from meshweave.parallel.parallelize import materialize

    mcfg = ModelConfig(**spec.model)
    model = build_model(mcfg)
    materialize(model, torch.device("cpu"), SEED)
    cos, sin = rotary_tables(torch.arange(spec.seq_len), *model.rope_table(torch.device("cpu")), torch.float32)

    class EmbedPipe(nn.Module):
        def __init__(self, embed: nn.Module) -> None:
            super().__init__()
            self.embed = embed

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.embed(tokens)

    class DecoderPipe(nn.Module):
        def __init__(self, layer: nn.Module) -> None:
            super().__init__()
            self.layer = layer
            self.register_buffer("cos", cos.clone(), persistent=False)
            self.register_buffer("sin", sin.clone(), persistent=False)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.layer(h, self.cos, self.sin)

    class HeadPipe(nn.Module):
        def __init__(self, norm: nn.Module, head: nn.Module) -> None:
            super().__init__()
            self.norm, self.head = norm, head

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(h))

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    layers = [
        EmbedPipe(model.embed_tokens),
        *(DecoderPipe(model.layers[str(i)]) for i in range(mcfg.n_layers)),
        HeadPipe(model.norm, model.lm_head),
    ]
    return PipelineModule(
        layers=layers,
        num_stages=pp,
        loss_fn=loss_fn,
        partition_method="type:DecoderPipe",
        activation_checkpoint_interval=0,
    )


def deepspeed_vs_meshweave(spec: Spec, pp: int, dims: Any, mesh: Any) -> dict:
    """Per m: meshweave 1F1B and DeepSpeed's PipelineEngine in the same processes, alternating steps.
    Returns this rank's step times (or the reason DeepSpeed was skipped)."""
    import torch
    import torch.distributed as dist

    from meshweave.trainer.optim import build_optimizer

    out: dict = {"error": "", "runs": {}}

    def engines_per_m(deepspeed: Any) -> dict[int, Any]:
        engines = {}
        for m in spec.ds_ms:
            module = _ds_pipe_module(spec, pp)
            opt = build_optimizer(module, _config(spec, pp, "1f1b", 1, m).optim, torch.device("cpu"))
            config = {
                "train_batch_size": spec.batch,
                "train_micro_batch_size_per_gpu": spec.batch // m,
                "gradient_accumulation_steps": m,
                "gradient_clipping": 1.0,
                "steps_per_print": 10**9,
                "fp16": {"enabled": False},
                "bf16": {"enabled": False},
                "wall_clock_breakdown": False,
                "pipeline": {"activation_checkpoint_interval": 0},
            }
            engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=config)
            engines[m] = engine
        return engines

    t0 = time.perf_counter()
    engines, error = start_peer(engines_per_m, "" if spec.ds else spec.ds_skip)
    out["error"] = error
    if engines is not None:
        out["init_s"] = time.perf_counter() - t0
        out["parts"] = [int(x) for x in engines[spec.ds_ms[0]].module.parts]
    for m in spec.ds_ms:
        mw = MeshweavePipeline(_config(spec, pp, "1f1b", 1, m), dims, mesh, None)
        mw_loader, ds_loader = _loader(spec), _loader(spec)
        variants: list[tuple[str, Callable[[], float]]] = []

        def mw_step(mw: MeshweavePipeline = mw, mw_loader: Any = mw_loader) -> float:
            ((inputs, labels, _),) = mw_loader.next_batch()
            return mw.step(inputs, labels)[1]

        variants.append(("meshweave 1f1b", mw_step))
        if not error:
            engine = engines[m]

            def ds_step(engine: Any = engine, m: int = m, ds_loader: Any = ds_loader) -> float:
                ((inputs, labels, _),) = ds_loader.next_batch()
                mb = spec.batch // m
                it = iter([(inputs[i * mb : (i + 1) * mb], labels[i * mb : (i + 1) * mb]) for i in range(m)])
                return float(engine.train_batch(it))

            variants.append(("DeepSpeed PipelineEngine", ds_step))
        times: dict[str, list[float]] = {name: [] for name, _ in variants}
        losses: dict[str, list[float]] = {name: [] for name, _ in variants}
        for i in range(spec.ds_warmup + spec.ds_steps):
            for name, fn in variants if i % 2 == 0 else variants[::-1]:
                dist.barrier()
                t0 = time.perf_counter()
                loss = fn()
                dt = time.perf_counter() - t0
                if i >= spec.ds_warmup:
                    times[name].append(dt)
                losses[name].append(loss)
        out["runs"][m] = {"times": times, "losses": losses}
        del mw
    return out


# ================================================================================================
# analysis and tables


def analyse_sweep(pp: int, results: list[dict], spec: Spec) -> list[dict]:
    """Per (schedule, m): measured idle per rank (wall and CPU), theory, simulations, step times."""
    rows = []
    for schedule, v in spec.schedules:
        for m in spec.ms:
            key = f"{schedule}/m={m}"
            r0 = results[0]["sweep"][key]
            row: dict[str, Any] = {
                "schedule": schedule,
                "pp": pp,
                "m": m,
                "v": v,
                "closed_form": closed_form(schedule, pp, m, v),
            }
            if "rejected" in r0:
                rows.append({**row, "rejected": r0["rejected"]})
                continue
            per_rank = [res["sweep"][key]["steps"] for res in results]
            n = len(per_rank[0])
            t_pipe = [max(per_rank[r][k]["pipe_s"] for r in range(pp)) for k in range(n)]
            t_step = [max(per_rank[r][k]["step_s"] for r in range(pp)) for k in range(n)]
            idle_wall = [
                statistics.mean(1 - sum(per_rank[r][k]["wall"].values()) / t_pipe[k] for k in range(n))
                for r in range(pp)
            ]
            idle_cpu = [
                statistics.mean(1 - sum(per_rank[r][k]["cpu"].values()) / t_pipe[k] for k in range(n))
                for r in range(pp)
            ]
            wall_busy = sum(sum(s["wall"].values()) for steps in per_rank for s in steps)
            cpu_busy = sum(sum(s["cpu"].values()) for steps in per_rank for s in steps)
            # mean CPU seconds per call of each (stage, kind), over ranks and timed steps
            tot: dict[str, float] = {}
            calls: dict[str, int] = {}
            for steps in per_rank:
                for s in steps:
                    for k, t in s["cpu"].items():
                        tot[k] = tot.get(k, 0.0) + t
                        calls[k] = calls.get(k, 0) + s["calls"][k]
            mean = {k: tot[k] / calls[k] for k in tot}
            n_stages = pp * v

            def measured_cost(stage: int, kind: str, mean: dict = mean, n_stages: int = n_stages) -> float:
                extra = mean.get(f"{stage}/L", 0.0) if kind == "F" and stage == n_stages - 1 else 0.0
                return mean.get(f"{stage}/{kind}", 0.0) + extra

            order = {int(k): [tuple(a) for a in acts] for k, acts in r0["order"].items()}
            ideal, _ = simulate(order, lambda s, k: UNIT_COST[k])
            sim, sim_span = simulate(order, measured_cost)
            rows.append(
                {
                    **row,
                    "order_matches": all(res["sweep"][key]["order_matches"] for res in results),
                    "idle_wall": idle_wall,
                    "idle_cpu": idle_cpu,
                    "bubble_wall": statistics.mean(idle_wall),
                    "bubble_cpu": statistics.mean(idle_cpu),
                    "ideal_sim": statistics.mean(ideal),
                    "ideal_sim_per_rank": ideal,
                    "sim_measured": statistics.mean(sim),
                    "sim_measured_per_rank": sim,
                    "sim_measured_span_s": sim_span,
                    "contention": wall_busy / max(cpu_busy, 1e-12),
                    "pipe_s": statistics.median(t_pipe),
                    "step_s": statistics.median(t_step),
                    "op_cpu_ms": {k: 1e3 * t for k, t in sorted(mean.items())},
                    "stage_ids": [res["sweep"][key]["stage_ids"] for res in results],
                    "elapsed_s": r0["elapsed_s"],
                }
            )
    return rows


def _pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal, "-" for None."""
    return "-" if x is None else f"{100 * x:.1f}%"


def bubble_table(rows: list[dict]) -> str:
    """Measured vs theoretical bubble per (schedule, m), with step times; rejected configs footnoted."""
    out = []
    for r in rows:
        cf = _pct(r["closed_form"]) if r["closed_form"] is not None else "->0"
        if "rejected" in r:
            out.append([r["schedule"], r["pp"], r["m"], r["v"], cf, "rejected*", "", "", "", "", ""])
            continue
        out.append(
            [
                r["schedule"],
                r["pp"],
                r["m"],
                r["v"],
                cf,
                _pct(r["ideal_sim"]),
                _pct(r["sim_measured"]),
                _pct(r["bubble_wall"]),
                f"{r['contention']:.2f}",
                f"{1e3 * r['pipe_s']:.0f}",
                f"{1e3 * r['step_s']:.0f}",
            ]
        )
    return md_table(
        [
            "schedule",
            "pp",
            "m",
            "v",
            "closed form",
            "ideal sim",
            "sim @ measured costs",
            "measured bubble",
            "busy wall/CPU",
            "schedule.step ms",
            "full step ms",
        ],
        out,
        right=tuple(range(1, 11)),
    ) + "".join(
        f"\n\n\\* {r['schedule']} m={r['m']}: meshweave's config check says: {r['rejected']}"
        for r in rows
        if "rejected" in r
    )


def per_stage_table(rows: list[dict], pp: int) -> str:
    """Per-rank measured idle / simulated idle, and the mean CPU cost of each stage's ops."""
    out = []
    for r in rows:
        if "rejected" in r or r["pp"] != pp:
            continue
        out.append(
            [
                r["schedule"],
                r["m"],
                *(f"{_pct(w)} / {_pct(i)}" for w, i in zip(r["idle_wall"], r["sim_measured_per_rank"])),
                ", ".join(f"{k} {v:.0f}" for k, v in r["op_cpu_ms"].items()),
            ]
        )
    heads = [f"rank {i}" for i in range(pp)]
    return md_table(["schedule", "m", *heads, "mean CPU ms per call (stage/kind)"], out, right=tuple(range(1, pp + 2)))


def ds_table(pp: int, res: list[dict], spec: Spec) -> tuple[str, list[dict]]:
    """meshweave 1F1B vs DeepSpeed step times per m (slowest rank per step); the table and raw rows."""
    ds0 = res[0]["ds"]
    rows, raw = [], []
    for m in spec.ds_ms:
        run = ds0["runs"].get(m) or ds0["runs"].get(str(m))
        if run is None:
            continue
        names = list(run["times"])
        # a step lasts as long as its slowest rank
        med = {}
        for name in names:
            per_step = [max(r["ds"]["runs"][m]["times"][name][k] for r in res) for k in range(len(run["times"][name]))]
            med[name] = (statistics.median(per_step), per_step)
        mw, mw_all = med["meshweave 1f1b"]
        theory = closed_form("1f1b", pp, m, 1)
        if ds0["error"]:
            rows.append([pp, m, f"{mw * 1e3:.0f}", f"skipped: {ds0['error']}", "", "", _pct(theory), ""])
            raw.append({"pp": pp, "m": m, "meshweave_s": mw_all, "deepspeed": None, "error": ds0["error"]})
            continue
        ds, ds_all = med["DeepSpeed PipelineEngine"]
        losses = run["losses"]
        paired = [a / b for a, b in zip(mw_all, ds_all)]  # step k of each ran back to back
        rows.append(
            [
                pp,
                m,
                f"{mw * 1e3:.0f}",
                f"{ds * 1e3:.0f}",
                fmt_ratio(mw / ds),
                f"{min(paired):.2f}-{max(paired):.2f}",
                _pct(theory),
                f"{losses['meshweave 1f1b'][0]:.4f} / {losses['DeepSpeed PipelineEngine'][0]:.4f}",
            ]
        )
        raw.append(
            {
                "pp": pp,
                "m": m,
                "meshweave_s": mw_all,
                "deepspeed_s": ds_all,
                "ratio": mw / ds,
                "paired_ratios": paired,
                "losses": losses,
            }
        )
    table = md_table(
        [
            "pp",
            "m",
            "meshweave 1F1B ms",
            "DeepSpeed ms",
            "meshweave / DeepSpeed",
            "paired per-step ratios min-max",
            "1F1B theory bubble",
            "step-1 loss mw / DS",
        ],
        rows,
        right=(0, 1, 2, 3, 4, 5, 6),
    )
    return table, raw


def _order_note(rows: list[dict]) -> str:
    """Whether the simulated action order is the one each rank actually ran (checked per call)."""
    bad = [f"{r['schedule']} m={r['m']}" for r in rows if "rejected" not in r and not r["order_matches"]]
    if not bad:
        return (
            "Check: on every rank the sequence of wrapped compute calls equals the replayed action list "
            "(so the simulations replay the schedule that ran)."
        )
    return f"**Warning**: the executed call sequence differs from the replayed action list for {', '.join(bad)}."


def bubble_section(pp: int, rows: list[dict], args: argparse.Namespace, elapsed: float) -> str:
    """Table 1 for one pp: bubble per schedule, per rank, and whether the replayed order ran."""
    note = (
        f"{pp} processes share {os.cpu_count()} cores: when more ranks compute at once than there are "
        "cores they are time-sliced ('busy wall/CPU' > 1), stretching busy time, while ranks waiting for a "
        "descheduled neighbour idle longer; the measured bubble here mostly describes CPU oversubscription, "
        "'sim @ measured costs' estimates one core per stage."
        if pp > (os.cpu_count() or 1)
        else "One core per rank if the machine is otherwise idle ('busy wall/CPU' near 1); other users' load "
        "slows all compute alike and largely cancels out of busy / T."
    )

    def stage_ids(pick: Callable[[dict], bool]) -> Any:
        return next((r["stage_ids"] for r in rows if "stage_ids" in r and pick(r)), "-")

    return (
        f"## pp={pp}: bubble per schedule ({elapsed:.0f} s incl. Table 2 for this pp)\n\n"
        f"Idle fraction = 1 - busy / T per rank, mean over ranks and {args.steps} timed steps; T = slowest "
        f"rank's schedule.step. {note}\n\n"
        + bubble_table(rows)
        + "\n\nPer rank: measured idle / sim @ measured costs; stage ids per "
        f"rank: {stage_ids(lambda r: r['v'] == 1)} (single-stage), "
        f"{stage_ids(lambda r: r['schedule'] == 'interleaved_1f1b')} (interleaved), "
        f"{stage_ids(lambda r: r['schedule'] == 'zbv')} "
        "(zbv). CPU ms per call: F forward, B full backward, I input-grad, W weight-grad, L loss.\n\n"
        + per_stage_table(rows, pp)
        + "\n\n"
        + _order_note(rows)
    )


def ds_section(pp: int, ds: dict, table: str, args: argparse.Namespace, cache: str) -> str:
    """Table 2 for one pp: DeepSpeed's PipelineEngine against meshweave's 1F1B."""
    init = ds.get("init_s")
    return (
        f"## pp={pp}: DeepSpeed PipelineEngine vs meshweave 1F1B\n\n"
        f"Same model, init and data; DeepSpeed {package_version('deepspeed')} PipelineModule "
        f"(layer boundaries {ds.get('parts')}: embedding, decoder layers, norm + head), train_batch with "
        f"gradient_accumulation_steps = m, torch AdamW (meshweave's build_optimizer), clip 1.0. "
        f"Median over {args.ds_steps} alternating steps (slowest rank, barrier to optimizer step done)"
        + (f"; DeepSpeed init {init:.1f} s (incl. any JIT op build, cached in {cache})." if init is not None else ".")
        + " DeepSpeed's loss is the mean over microbatches of per-microbatch mean cross entropy; "
        "meshweave's the token sum over the step's tokens (equal here: no ignored labels).\n\n" + table
    )


# ================================================================================================


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and the DeepSpeed comparison per pp; print and write the tables and the JSON."""
    ap = options(__doc__, "seq_len 128, m = 2pp only, 2 timed steps (~1.5-2 min)", deepspeed=True)
    ap.add_argument("--pp", default="2,4", help="pipeline degrees to run, e.g. 2 or 2,4")
    ap.add_argument("--schedules", default=",".join(s for s, _ in SCHEDULES), help="subset, e.g. 1f1b,zbv")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per (schedule, m)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per (schedule, m)")
    ap.add_argument("--ds-steps", type=int, default=None, help="timed steps per variant in Table 2")
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.ds_steps = args.ds_steps or (2 if args.quick else 4)
    seq_len = 128 if args.quick else 256
    ds_skip = deepspeed_missing(args.no_deepspeed)
    env = deepspeed_env(args.out / ".cache" / "torch_extensions")

    report = Report(
        args.out, "pipeline", "meshweave bench: pipeline bubble and DeepSpeed PipelineEngine", json_indent=None
    )
    report.raw.update(args={k: str(v) for k, v in vars(args).items()}, model=MODEL, seq_len=seq_len, batch=16, pp={})
    report.add(
        f"{report.environment('torch', 'deepspeed')}; "
        f"{'--quick, ' if args.quick else ''}model {MODEL}, seq_len {seq_len}, {16} sequences per step, fp32, "
        f"{args.warmup} warm-up + {args.steps} timed steps per (schedule, m); Table 2: {args.warmup} warm-up + "
        f"{args.ds_steps} timed steps per variant, alternating. One gloo process per stage, 1 intra-op "
        "thread each."
    )
    for pp in int_list(args.pp):
        ms = [2 * pp] if args.quick else [pp, 2 * pp, 4 * pp]
        spec = Spec(
            model=MODEL,
            seq_len=seq_len,
            batch=16,
            ms=ms,
            schedules=[(s, v) for s, v in SCHEDULES if s in args.schedules.split(",")],
            warmup=args.warmup,
            steps=args.steps,
            ds_ms=[2 * pp] if args.quick else ms,
            ds_warmup=args.warmup,
            ds_steps=args.ds_steps,
            ds=not ds_skip,
            ds_skip=ds_skip,
        )
        t0 = time.perf_counter()
        res = run_ranks(pipeline_worker, pp, spec, timeout=1500, env=env, log_dir=args.out / "logs" / f"pp{pp}")
        if isinstance(res, str):
            report.add(f"## pp={pp}\n\n{res}")
            continue
        elapsed = time.perf_counter() - t0
        rows = analyse_sweep(pp, res, spec)
        dtab, draw = ds_table(pp, res, spec)
        for later in res[1:]:  # every rank holds every rank's action list: keep rank 0's
            for one in later["sweep"].values():
                one.pop("order", None)
        ds = res[0]["ds"]
        report.raw["pp"][pp] = {
            "spec": asdict(spec),
            "rows": rows,
            "deepspeed": draw,
            "ds_error": ds["error"],
            "ds_init_s": ds.get("init_s"),
            "ds_parts": ds.get("parts"),
            "raw": res,
            "elapsed_s": elapsed,
        }
        report.add(bubble_section(pp, rows, args, elapsed))
        report.add(ds_section(pp, ds, dtab, args, env["TORCH_EXTENSIONS_DIR"]))
    return report.finish()


if __name__ == "__main__":
    raise SystemExit(main())
