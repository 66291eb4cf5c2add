"""Pipeline stage split and its validation: which layers each pipeline stage holds.

Pure arithmetic on the config (no torch), so config validation can reject a pipeline that
cannot run before any process group exists. ``parallel/pipeline.py`` builds the stages.

Stage boundaries minimise the most expensive stage, counting each decoder layer's FLOPs and the
embedding / final norm + head + loss on the first / last stage (:func:`split_layers`), or come
from ``parallel.pp_layers`` (``"0-3,4-7,..."``). Interleaved schedules give rank ``r`` stages
``r, r + pp, ...`` (loop order); ZBV gives it ``r`` and ``2 pp - 1 - r`` (a V).
"""

from __future__ import annotations

import math

from meshweave.config import Config, ConfigError, ModelConfig, require

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv")
MULTI_STAGE = ("interleaved_1f1b", "interleaved_zb", "zbv")


def stages_per_rank(cfg: Config) -> int:
    """Virtual stages each rank holds: ``parallel.pp_virtual_stages`` or the schedule's need."""
    p = cfg.parallel
    if p.pp_schedule in MULTI_STAGE:
        return p.pp_virtual_stages or 2
    return 1


def layer_cost(m: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one decoder layer: projections, SwiGLU, attention scores."""
    head_dim = m.attention_head_dim()
    projections = m.dim * (2 * m.n_heads + 2 * m.n_kv_heads) * head_dim
    return 2 * (projections + 3 * m.dim * m.ffn_dim) + 4 * seq_len * m.dim


def split_layers(m: ModelConfig, seq_len: int, n_stages: int) -> list[list[int]]:
    """Contiguous layer ranges for ``n_stages`` stages minimising the costliest stage.

    The first stage also pays for the embedding (a lookup: ~``dim`` FLOPs per token), the last
    for the final norm, the head (``2 dim vocab``) and the loss. Exact by dynamic programming
    over the boundaries (``n_layers x n_stages`` is small). Every stage gets at least one layer.
    """
    layer = layer_cost(m, seq_len)
    head = 2 * m.dim * m.vocab_size + 4 * m.vocab_size
    embed = 2 * m.dim
    n = m.n_layers
    if n_stages > n:
        raise ValueError(f"{n} layers cannot fill {n_stages} stages")

    def cost(start: int, end: int, stage: int) -> float:
        extra = (embed if stage == 0 else 0.0) + (head if stage == n_stages - 1 else 0.0)
        return (end - start) * layer + extra

    # best[s][i]: the lowest possible max-cost of putting layers [0, i) into stages [0, s).
    best = [[math.inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(s, n - (n_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], cost(j, i, s - 1))
                if value < best[s][i] - 1e-9:
                    best[s][i], cut[s][i] = value, j
    bounds, i = [], n
    for s in range(n_stages, 0, -1):
        bounds.append((cut[s][i], i))
        i = cut[s][i]
    return [list(range(a, b)) for a, b in reversed(bounds)]


def parse_layers(spec: str, n_layers: int, n_stages: int) -> list[list[int]]:
    """``"0-3,4-5,6-7"`` -> ``[[0..3], [4, 5], [6, 7]]``; ConfigError unless the ranges are
    contiguous, in order, cover every layer once and number ``n_stages``."""
    stages = []
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise ConfigError(f"parallel.pp_layers: {part!r} is not a layer range like 0-3") from None
        stages.append(list(range(lo, hi + 1)))
    flat = [i for s in stages for i in s]
    require(
        len(stages) == n_stages,
        "parallel.pp_layers",
        f"lists {len(stages)} stages but pp x virtual stages = {n_stages}",
    )
    require(
        flat == list(range(n_layers)) and all(stages),
        "parallel.pp_layers",
        f"{spec!r} must cover layers 0..{n_layers - 1} in order, each stage non-empty",
    )
    return stages


def check_pipeline(cfg: Config, per_rank_batch: int) -> None:
    """ConfigError for a pipeline that cannot run: too few layers, a microbatch count the
    schedule rejects or the batch does not split into. Pure."""
    p, m = cfg.parallel, cfg.model
    if p.pp == 1:
        return
    n_stages = p.pp * stages_per_rank(cfg)
    require(
        p.pp_schedule != "zbv" or stages_per_rank(cfg) == 2,
        "parallel.pp_virtual_stages",
        "zbv runs exactly 2 stages per rank (a V); set parallel.pp_virtual_stages=2",
    )
    require(
        p.pp_schedule in MULTI_STAGE or p.pp_virtual_stages in (0, 1),
        "parallel.pp_virtual_stages",
        f"{p.pp_schedule} runs one stage per rank; use interleaved_1f1b, interleaved_zb or zbv for virtual stages",
    )
    require(
        m.n_layers >= n_stages,
        "model.n_layers",
        f"{m.n_layers} layers do not split into {n_stages} pipeline stages (pp={p.pp} x "
        f"{stages_per_rank(cfg)} per rank): every stage needs at least one layer",
    )
    if p.pp_layers:
        parse_layers(p.pp_layers, m.n_layers, n_stages)
    require(
        not m.tie_embeddings,
        "model.tie_embeddings",
        "tied embeddings put one weight on the first and the last stage; untie them for pp > 1",
    )
    mb = microbatches(cfg)
    require(
        per_rank_batch % mb == 0,
        "parallel.pp_microbatches",
        f"{mb} does not divide the per-rank batch of {per_rank_batch} sequences (choose a divisor)",
    )
    if p.pp_schedule != "gpipe":
        require(
            mb >= n_stages if p.pp_schedule == "zbv" else mb >= p.pp,
            "parallel.pp_microbatches",
            f"{p.pp_schedule} needs at least {n_stages if p.pp_schedule == 'zbv' else p.pp} microbatches "
            f"to fill the pipeline, got {mb}",
        )
    if p.pp_schedule in ("interleaved_1f1b", "interleaved_zb"):
        require(
            mb % p.pp == 0,
            "parallel.pp_microbatches",
            f"{p.pp_schedule} runs microbatches in rounds of pp={p.pp}: use a multiple of {p.pp}, got {mb}",
        )
    require(
        not cfg.train.micro_batch or cfg.train.micro_batch * mb == per_rank_batch,
        "train.micro_batch",
        f"with pp > 1 the pipeline cuts the per-rank batch of {per_rank_batch} into parallel.pp_microbatches="
        f"{mb} microbatches of {per_rank_batch // mb}; set train.micro_batch to that or leave it 0",
    )
    require(
        p.pp_schedule not in ("interleaved_zb", "zbv") or p.dp_shard == 1,
        "parallel.pp_schedule",
        f"the zero-bubble schedule {p.pp_schedule} splits backward into input and weight gradients, and "
        f"FSDP (dp_shard={p.dp_shard}) "
        "reduce-scatters before the weight half has run (losses drift by ~1e-3); use interleaved_1f1b "
        "with dp_shard > 1, or dp_replicate for data parallelism",
    )
    require(
        p.pp_schedule != "zbv" or not cfg.train.eval_interval,
        "train.eval_interval",
        "zbv cannot evaluate in torch 2.13 (its eval still runs the V's backward hand-offs); "
        "use interleaved_zb, or train.eval_interval=0",
    )


def microbatches(cfg: Config) -> int:
    """The pipeline's microbatch count (``parallel.pp_microbatches``, default: the stage count)."""
    return cfg.parallel.pp_microbatches or cfg.parallel.pp * stages_per_rank(cfg)


def stage_ids(pp_rank: int, pp: int, per_rank: int, schedule: str) -> list[int]:
    """Global stage indices rank ``pp_rank`` runs: loop order, or a V for zbv."""
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(per_rank)]
