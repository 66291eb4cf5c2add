"""Per-rank memory of a layout, before launch: parameters, gradients, optimizer state, activations.

``meshweave train --dry-run`` prints :func:`estimate` as a table. It is a pure function of the
config and the parallel degrees: the model is built on ``meta`` (no storage) to count its
parameters, the pipeline split is the one ``parallel/pipeline.py`` uses, and each parameter's
shard is what the tensor-parallel plan (the family's abstract styles) and FSDP's dim-0 sharding
leave on a rank. Ranks differ only by pipeline stage, so there is one :class:`RankMemory` per
pipeline rank (one in all without a pipeline); every other dim splits evenly.

What is stored in which dtype (meshweave's choices, read off the code):

- parameters, gradients and optimizer state are fp32 under every setting (``train.dtype=bf16``
  is autocast; ``parallel.mixed_precision=bf16`` makes FSDP's *gathered* copies bf16);
- AdamW keeps ``exp_avg`` and ``exp_avg_sq`` (2 x parameters; fused, so no step temporaries;
  ``optim.fused=false`` runs the foreach path, ~1 x parameters of temporaries), SGD one momentum,
  1-bit Adam those two plus its error feedback (worker: 1 x, server: 1/dp_replicate x);
- DiLoCo keeps the replicas' global weights and the outer momentum (2 x parameters, fp32) and,
  at a sync, one fragment's pseudo-gradient; 1-bit Adam caches its exchange layout, three int64
  indices per parameter element (6 x the parameter bytes); the replicated all-reduce keeps its
  flat buckets (1 x the gradients);
- with LoRA only the adapters have gradients and optimizer state (they are split by TP like
  their projection), and ``lora.base_dtype=bf16`` stores the adapted projections in bf16; the
  activations are counted as for full finetuning (measured ~10% above LoRA's at fsdp2).

Activations are what autograd saves for backward, per decoder layer, in bytes (``T`` tokens of
one microbatch on this rank, ``d`` the width, ``q``/``kv`` the query / key-value projection
widths, ``f`` the SwiGLU width, ``t`` = tp; checked tensor by tensor in tests/unit/test_memory.py):

- fp32: ``4 T (2 d + (4 d + 2q + 2kv + 4f)/t)`` — the two norms' inputs (the layer's input and
  the residual after attention) and normalised inputs, the attention/MLP inputs gathered from
  sequence shards (full ``d`` under sequence parallelism), q, rotated k, v and the attention
  output, the SwiGLU gate, its SiLU, up and their product;
- bf16 autocast: the residual stream and the norms stay fp32; each linear saves its own bf16
  cast of its input (three for q/k/v, two for gate/up) and of its weight (autocast's copies, live
  until backward); q/k/v/out and the MLP tensors are bf16;
- bf16 parameters (FSDP ``mixed_precision=bf16``): everything bf16 but each norm's fp32 upcast
  of its input, which it saves instead of the input;
- q/k RMSNorm (Qwen3 per head, OLMoE over the projection): each saves its input and output;
- activation checkpointing: a layer saves only its input; its activations come back, one layer
  at a time, when backward recomputes it;
- MoE layers (balanced routing assumed under EP): the router's fp32 input and scores, each
  routed copy of a token sorted in, out of the experts and unsorted, the experts' SwiGLU tensors
  for ``top_k`` (or the capacity) copies of every token, the shared experts' SwiGLU on every
  token; under TP the MoE block runs on the full sequence.

Context parallelism divides the tokens, sequence parallelism the tensors between blocks, TP the
heads and the SwiGLU width. A pipeline rank holds the activations of as many microbatches as its
schedule has in flight (GPipe all of them, 1F1B ``pp - rank``, interleaved schedules their warm-up
depth in stage chunks) and the schedule's receive buffers (one per microbatch, activations from
the previous stage and gradients from the next). The head's loss is the usual peak on the last
stage: its fp32 log-softmax, saved per microbatch in flight (with the logits under a pipeline,
whose schedule keeps the stage's output), and in backward the gradient arriving and the one
leaving it, ``3 x 4 T vocab/t`` bytes for one microbatch.

The peak assembles these over a step's phases: parameters, optimizer and replica state always;
during forward/backward the saved activations, plus the larger of the loss's buffers and one
recomputed layer with its backward working set, plus FSDP's gathered copies (the root's
embedding/norm/head stay gathered from forward to backward; the block computing and those
prefetched), plus the gradients once they exist (from the first microbatch's backward on, under
accumulation or a pipeline); during the optimizer step the gradients and any step temporaries
(or a DiLoCo sync's pseudo-gradient). Allocator rounding and fragmentation are not modelled:
this is live tensor bytes, what ``log.tensor_memory`` measures. Checked against that
measurement (tests/dist/test_memory_estimate.py) at one process, FSDP with checkpointing, TP,
1F1B, MoE with EP and bf16 parameters; by hand also GPipe, interleaved 1F1B, CP, replicated DP,
accumulation, DiLoCo and 1-bit Adam (all within 4%, EP 8% at a step with unlucky routing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from meshweave.config import Config
from meshweave.lowcomm.replicas import replica_mode
from meshweave.models.family import ModelFamily, family_of
from meshweave.models.llama import build_model
from meshweave.models.lora import apply_lora, freeze_base
from meshweave.models.moe import capacity, is_moe_layer
from meshweave.parallel.dims import ParallelDims
from meshweave.parallel.stages import MULTI_STAGE, microbatches, parse_layers, split_layers, stage_ids, stages_per_rank

FP32, BF16 = 4, 2
# The rows of the table, in order. "gathered" is FSDP's unsharded copies (transient).
COMPONENTS = (
    "parameters",
    "gradients",
    "optimizer state",
    "activations",
    "recomputed layer",
    "logits + loss",
    "gathered weights",
)
TP_SHARDED_DIM = {"colwise": 0, "vocab_head": 0, "vocab_embedding": 0, "feature_norm": 0, "rowwise": 1}


@dataclass(frozen=True)
class RankMemory:
    """The estimated bytes of one kind of rank: ``rows`` per component (:data:`COMPONENTS`, plus
    ``replica state`` / ``gradient buckets`` when the layout has them) and ``peak``, the
    high-water mark of a step. ``ranks``: how many ranks of the job are of this kind."""

    name: str
    ranks: int
    rows: dict[str, int]
    peak: int
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# parameters


def _tp_local(shape: tuple[int, ...], style: str | None, tp: int) -> tuple[int, ...]:
    """``shape`` after the tensor-parallel style ``style`` (models/family.py) over ``tp`` ranks."""
    dim = TP_SHARDED_DIM.get(style or "")
    if dim is None or tp == 1 or len(shape) <= dim:
        return shape
    if style == "rowwise" and len(shape) == 1:  # a row-parallel bias is replicated
        return shape
    return tuple(s // tp if i == dim else s for i, s in enumerate(shape))


def _style_of(plan: dict[str, str], module_path: str) -> str | None:
    """The plan entry governing a parameter of module ``module_path`` (exact module match)."""
    return plan.get(module_path)


def _fsdp_local(shape: tuple[int, ...], shards: int) -> int:
    """Elements a rank stores of a tensor FSDP2 shards on dim 0 over ``shards`` ranks (padded)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / shards) * math.prod(shape[1:])


@dataclass
class _Held:
    """Parameter elements a rank holds, after TP, before FSDP (``full``) and after (``local``)."""

    full: int = 0
    local: int = 0
    matrices: int = 0  # TP-local elements of >= 2-D weights (autocast casts these)
    gathered: int = 0  # elements FSDP gathers on this rank (experts: only its own under EP)
    trainable: int = 0  # of ``local``: what has gradients and optimizer state (LoRA: the adapters)
    half: int = 0  # of ``local``: stored in bf16 (LoRA's base_dtype=bf16 frozen projections)

    def add(self, shape: tuple[int, ...], shards: int, trainable: bool = True, half: bool = False) -> None:
        self.full += math.prod(shape)
        local = _fsdp_local(shape, shards)
        self.local += local
        self.trainable += local if trainable else 0
        self.half += local if half else 0
        if len(shape) >= 2:
            self.matrices += math.prod(shape)


def _module_params(module: nn.Module, plan: dict[str, str], tp: int, shards: int, into: _Held, ep: int = 1) -> None:
    for name, p in module.named_parameters():
        path = name.rpartition(".")[0]
        style = _style_of(plan, path)
        owner, _, adapter = path.rpartition(".")
        if adapter in ("lora_A", "lora_B"):  # split like the adapted projection (models/lora.py)
            base = _style_of(plan, owner)
            style = {("colwise", "lora_B"): "colwise", ("rowwise", "lora_A"): "rowwise"}.get((base or "", adapter))
        shape = _tp_local(tuple(p.shape), style, tp)
        into.add(shape, shards, trainable=p.requires_grad, half=p.dtype == torch.bfloat16)
        # FSDP gathers a block's dense weights whole, but only this rank's E/ep experts
        routed = ".experts." in f".{name}" and "shared_experts" not in name
        into.gathered += math.prod(shape) // (ep if routed else 1)


def _fsdp_shards(cfg: Config, dims: ParallelDims) -> int:
    """Ranks FSDP shards a parameter over (dp_shard x cp; 1 without FSDP). As parallel/data.py's
    ``fsdp_inside_replicas``, without importing FSDP."""
    fsdp = dims.dp_shard > 1 or (replica_mode(cfg) != "dp" and dims.cp > 1)
    return dims.dp_shard * dims.cp if fsdp else 1


def _fsdp_gathered(cfg: Config, shards: int, root: int, block: int, n_blocks: int) -> int:
    """Bytes of FSDP's unsharded copies at the step's peak (0 without FSDP), bf16 under mixed
    precision. The root (embedding / norm / head) stays gathered from forward to backward; of the
    blocks, the one computing and those prefetched (FSDP2 prefetches one implicitly; measured:
    ``fsdp_*_prefetch`` 0 and 1 peak alike, 2 holds one block more); with
    ``fsdp_reshard_after_forward=false`` every block stays gathered until its backward (N: a copy
    sharded over N ranks). ``root`` / ``block``: elements (TP-local) of the root and the largest block."""
    if shards == 1:
        return 0
    p = cfg.parallel
    width = BF16 if p.mixed_precision == "bf16" else FP32
    live = 1 + max(1, p.fsdp_forward_prefetch, p.fsdp_backward_prefetch)
    kept = 0
    if p.fsdp_reshard_after_forward == "false":
        kept = (n_blocks - 1) * block
    elif p.fsdp_reshard_after_forward.isdigit():
        kept = (n_blocks - 1) * block // int(p.fsdp_reshard_after_forward)
    return width * (root + live * block + kept)


# --------------------------------------------------------------------------------------------
# activations


def precision(cfg: Config) -> str:
    """How a layer computes: ``fp32``; ``autocast`` (train.dtype=bf16: fp32 weights and residual
    stream, bf16 casts into each matmul); ``bf16`` (FSDP mixed precision: bf16 gathered weights,
    so activations are bf16 but the norms' fp32 internals)."""
    if cfg.parallel.mixed_precision == "bf16":
        return "bf16"
    return "autocast" if cfg.train.dtype == "bf16" else "fp32"


def _attention_half(cfg: Config, tokens: int, tp: int) -> int:
    """Bytes a decoder layer saves outside its feed-forward: its input (which the first norm
    saves; an fp32 upcast of it under bf16) and the first norm's normalised input, the attention
    input gathered from sequence shards (a bf16 cast per q/k/v projection under autocast), q,
    rotated k, v, the attention output and its lse, the residual after attention (the second
    norm's input, likewise) and its normalised input (see the module docstring)."""
    m = cfg.model
    hd = m.attention_head_dim()
    q, kv, d = m.n_heads * hd, m.n_kv_heads * hd, m.dim
    small = tokens * (m.n_heads // tp) * FP32 + 2 * (tokens // tp) * FP32  # lse, the norms' rsqrt
    mode = precision(cfg)
    if m.qk_norm != "none":  # q/k RMSNorm: each saves its input (bf16: an fp32 upcast) and output
        per_row = (m.n_heads + m.n_kv_heads) // tp if m.qk_norm == "head" else 2
        small += (FP32 + BF16 if mode == "bf16" else 2 * FP32) * tokens * (q + kv) // tp
        small += FP32 * tokens * per_row
    if mode == "autocast":  # norms, residual and output fp32; three casts of the gathered input
        return FP32 * tokens * 4 * d // tp + BF16 * tokens * (3 * d + (2 * q + 2 * kv) // tp) + small
    if mode == "bf16":  # each norm saves its fp32 upcast of its input instead of the input
        return FP32 * tokens * 2 * d // tp + BF16 * tokens * (d + (2 * d + 2 * q + 2 * kv) // tp) + small
    return FP32 * tokens * (d + (4 * d + 2 * q + 2 * kv) // tp) + small


def dense_layer_activations(cfg: Config, tokens: int, tp: int) -> int:
    """Bytes one dense decoder layer saves for backward over ``tokens`` tokens (this rank's tokens
    of one microbatch, after CP): the attention half, the MLP's gathered input (a bf16 cast each
    for gate and up under autocast) and its gate, SiLU, up and product. Autocast's weight copies
    are counted apart."""
    d, f = cfg.model.dim, cfg.model.ffn_dim // tp
    mlp = {
        "fp32": FP32 * tokens * (d + 4 * f),
        "autocast": BF16 * tokens * (2 * d + 4 * f),
        "bf16": BF16 * tokens * (d + 4 * f),
    }[precision(cfg)]
    return _attention_half(cfg, tokens, tp) + mlp


def moe_layer_activations(cfg: Config, tokens: int, tp: int) -> int:
    """Bytes an MoE decoder layer saves: the attention half as a dense layer's, and the MoE
    block's on the full sequence (it runs replicated over tp) — balanced routing assumed (exact
    for one process up to the router's small index tensors): the router's fp32 input and scores,
    every routed copy of a token into and out of the experts and the experts' SwiGLU tensors,
    the shared experts' on every token."""
    m, moe = cfg.model, cfg.moe
    act = FP32 if precision(cfg) == "fp32" else BF16
    d, ef, width = m.dim, moe.expert_ffn_dim, moe.low_dim or m.dim
    slots = tokens * moe.top_k
    if moe.capacity_factor > 0:
        slots = min(slots, moe.num_experts * capacity(tokens, moe))
    router = FP32 * tokens * (d + 3 * moe.num_experts)  # fp32 input, logits, scores, probabilities
    # each routed copy: sorted in, expert out, unsorted out (``width``), the expert's SwiGLU
    # tensors, and three int64 indices of its sort
    routed = act * slots * (3 * width + 4 * ef) + 24 * slots
    if moe.low_dim:
        routed += act * tokens * (width + d)  # BigMac's projections down and back up
    shared = act * moe.shared_experts * tokens * (d + 4 * ef)
    return _attention_half(cfg, tokens, tp) + router + routed + shared


def _in_flight(cfg: Config, pp_rank: int, n_micro: int) -> float:
    """Microbatches whose activations a pipeline rank holds at once, in microbatches of the
    whole rank (a stage chunk of an interleaved schedule counts 1 / stages per rank)."""
    p = cfg.parallel
    if p.pp == 1:
        return 1.0
    if p.pp_schedule == "gpipe":
        return float(n_micro)
    if p.pp_schedule not in MULTI_STAGE:
        return float(min(n_micro, p.pp - pp_rank))
    v = stages_per_rank(cfg)
    # torch's interleaved warm-up: (v - 1) rounds of pp microbatches plus 2 (pp - 1 - rank).
    chunks = (v - 1) * p.pp + 2 * (p.pp - 1 - pp_rank) + 1
    return min(chunks, n_micro * v) / v


# --------------------------------------------------------------------------------------------
# the estimate


def _stage_layers(cfg: Config) -> list[list[int]]:
    p = cfg.parallel
    n_stages = p.pp * stages_per_rank(cfg)
    if p.pp_layers:
        return parse_layers(p.pp_layers, cfg.model.n_layers, n_stages)
    return split_layers(cfg.model, cfg.train.seq_len, n_stages)


def microbatch_shape(cfg: Config, dims: ParallelDims) -> tuple[int, int, int]:
    """``(microbatches per step, sequences per microbatch, tokens per microbatch on a rank)``
    as the runtime cuts a data-parallel rank's batch (pipeline or accumulation; CP splits tokens)."""
    per_rank = cfg.train.global_batch // dims.dp
    n_micro = microbatches(cfg) if dims.pp > 1 else per_rank // (cfg.train.micro_batch or per_rank)
    seqs = per_rank // n_micro
    return n_micro, seqs, seqs * cfg.train.seq_len // dims.cp


def estimate(cfg: Config, dims: ParallelDims) -> list[RankMemory]:
    """The estimated memory of every kind of rank of ``cfg`` laid out as ``dims`` (as
    :func:`~meshweave.parallel.dims.resolve_degrees` returns them). Pure: builds the model on meta."""
    model = build_model(cfg.model, moe=cfg.moe)
    family = family_of(model)
    blocks = family.block_dict(model)
    if cfg.lora.rank:
        apply_lora(blocks.values(), cfg.lora)
        freeze_base(model)
    layers = _stage_layers(cfg) if dims.pp > 1 else [list(range(cfg.model.n_layers))]
    n_stages = len(layers)
    n_micro, _, tokens = microbatch_shape(cfg, dims)
    kinds = []
    for pp_rank in range(dims.pp):
        ids = stage_ids(pp_rank, dims.pp, stages_per_rank(cfg), cfg.parallel.pp_schedule) if dims.pp > 1 else [0]
        first, last = 0 in ids, n_stages - 1 in ids
        held = [i for s in ids for i in layers[s]]
        name, holds = _kind_name(dims, pp_rank, held, first, last)
        kind = _rank(cfg, dims, model, family, blocks, held, ids, first, last, tokens, n_micro, pp_rank, name)
        kind.notes.insert(0, f"holds {holds}")
        kinds.append(kind)
    return kinds


def _kind_name(dims: ParallelDims, pp_rank: int, held: list[int], first: bool, last: bool) -> tuple[str, str]:
    """A short column label and what the rank holds."""
    parts = (["embedding"] if first else []) + [f"layers {_ranges(held)}"] + (["head"] if last else [])
    return ("every rank" if dims.pp == 1 else f"pp {pp_rank}"), " + ".join(parts)


def _ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out: list[str] = []
    start = ids[0] if ids else 0
    for i, a in enumerate(ids):
        if i + 1 == len(ids) or ids[i + 1] != a + 1:
            out.append(f"{start}-{a}" if a != start else str(a))
            start = ids[i + 1] if i + 1 < len(ids) else a
    return ",".join(out)


def _rank(
    cfg: Config,
    dims: ParallelDims,
    model: nn.Module,
    family: ModelFamily,
    blocks: nn.ModuleDict,
    held: list[int],
    ids: list[int],
    first: bool,
    last: bool,
    tokens: int,
    n_micro: int,
    pp_rank: int,
    name: str,
) -> RankMemory:
    tp, shards = dims.tp, _fsdp_shards(cfg, dims)
    mode = precision(cfg)
    act = FP32 if mode == "fp32" else BF16
    m = cfg.model

    # parameters: the root's (embedding / final norm / head on the first / last stage) and each
    # held block's, TP-local, then FSDP-sharded
    root, largest_block = _Held(), 0
    root_plan = dict(family.root_tp_plan)
    for part in (family.first_stage if first else ()) + (family.last_stage if last else ()):
        module = getattr(model, part, None)
        if module is not None:
            _module_params(module, {"": root_plan.get(part, "")}, tp, shards, root)
    seen_tied = m.tie_embeddings and first and last  # the head is the embedding: counted once
    if seen_tied:
        root.full -= m.vocab_size * m.dim // tp
        root.local -= _fsdp_local((m.vocab_size // tp, m.dim), shards)
        root.matrices -= m.vocab_size * m.dim // tp
    block_total = _Held()
    for i in held:
        block = blocks[str(i)]
        one = _Held()
        _module_params(block, dict(family.block_tp_plan(block)), tp, shards, one, dims.ep)
        largest_block = max(largest_block, one.gathered)
        block_total.full += one.full
        block_total.local += one.local
        block_total.matrices += one.matrices
        block_total.trainable += one.trainable
        block_total.half += one.half
    params = FP32 * (root.local + block_total.local) - (FP32 - BF16) * (root.half + block_total.half)
    trainable = FP32 * (root.trainable + block_total.trainable)  # LoRA: only the adapters
    grads = trainable

    # optimizer and replica state
    optimizer = {"adamw": 2, "sgd": 1 if cfg.optim.beta1 > 0 else 0, "onebit_adam": 3}[cfg.optim.name] * trainable
    if cfg.optim.name == "onebit_adam":
        optimizer += params // max(dims.dp_replicate, 1)  # server error feedback
    step_temporaries = trainable if cfg.optim.name == "adamw" and cfg.optim.fused == "false" else 0
    extra: dict[str, int] = {}
    replicas = replica_mode(cfg)
    sync = 0  # what an outer exchange holds besides the weights, after the optimizer step
    if replicas == "diloco":
        extra["replica state"] = 2 * params  # the global weights and the outer momentum, fp32
        sync = params // cfg.comm.diloco.fragments  # one fragment's pseudo-gradient
    if replicas == "onebit":
        # the cached exchange layout (lowcomm/global_chunks.py): three int64 per parameter element
        extra["replica state"] = 6 * params
    if replicas == "co2":
        extra["replica state"] = 3 * params  # anchor, momentum, the round in flight
    if shards == 1 and (
        (replicas == "dp" and dims.dp_replicate * dims.cp > 1) or (replicas == "onebit" and dims.dp_replicate > 1)
    ):
        extra["gradient buckets"] = grads

    # activations of one microbatch on this rank, then as many as the schedule holds
    layer_bytes = []
    for i in held:
        moe_layer = cfg.moe.enabled and is_moe_layer(i, cfg.moe)
        layer_bytes.append(
            moe_layer_activations(cfg, tokens, tp) if moe_layer else dense_layer_activations(cfg, tokens, tp)
        )
    # autocast's bf16 weight copies (saved by each linear, per microbatch; the head's too)
    head = m.vocab_size // tp * m.dim if last else 0
    casts = BF16 * (block_total.matrices + head) if mode == "autocast" else 0
    stream = BF16 if mode == "bf16" else FP32  # the residual stream between layers
    local = tokens * m.dim // tp  # one [tokens, dim] tensor on its sequence shard
    if cfg.parallel.activation_checkpointing:
        saved = stream * local * len(held)  # each layer's input
        recompute = max(layer_bytes, default=0) + casts // max(len(held), 1)
        casts = 0
    else:
        saved = sum(layer_bytes)
        recompute = 0
    if last:
        # the final norm's input (its fp32 upcast under bf16) and normalised input, and the head's
        # input gathered from sequence shards (cast to bf16 under autocast)
        saved += FP32 * local + stream * local + act * tokens * m.dim
    else:
        saved += stream * local  # the stage's output, kept by the schedule for backward
    in_flight = _in_flight(cfg, pp_rank, n_micro)
    activations = int(in_flight * (saved + casts))
    # the head's loss: its fp32 log-softmax, saved per microbatch in flight (with the logits,
    # which a pipeline schedule keeps as the stage's output), and in backward the gradient
    # arriving and the one leaving it
    vocab = m.vocab_size // tp
    loss_saved = (FP32 + (act if dims.pp > 1 else 0)) * tokens * vocab if last else 0
    loss_grads = 2 * FP32 * tokens * vocab if last else 0
    loss = int(in_flight * loss_saved) + loss_grads

    gathered = _fsdp_gathered(cfg, shards, root.full, largest_block, len(held))

    if dims.pp > 1:
        # the schedule's receive buffers, one per microbatch, kept across steps: activations
        # from the previous stage (all but the first stage) and gradients from the next (all but
        # the last), per stage this rank runs
        n_ids = len(ids)
        receives = (n_ids - (1 if first else 0)) + (n_ids - (1 if last else 0))
        extra["pipeline buffers"] = n_micro * receives * stream * local

    # backward of one layer: the gradients of its SwiGLU hidden tensors and of its input/residual
    working = act * tokens * (2 * m.ffn_dim // tp + 2 * m.dim) if held else 0
    # backward starts with the loss (every microbatch's saved tensors live); a recomputed layer
    # comes after the loss's buffers are gone (but for the other microbatches' log-softmax)
    in_backward = max(loss, int((in_flight - 1) * loss_saved) + recompute + working)
    forward_backward = activations + in_backward + gathered
    if dims.pp > 1 or n_micro > 1:
        # gradients exist from the first microbatch's backward on; a forward after it brings the
        # rank back to its full count in flight unless every forward came before (GPipe, or
        # 1F1B ranks with as many microbatches as their warm-up)
        fewer = 0.0 if n_micro > in_flight else 1.0
        after_first = int((in_flight - fewer) / in_flight * activations)
        later = max(int((in_flight - fewer) * loss_saved) + loss_grads, recompute + working)
        forward_backward = max(forward_backward, after_first + later + gathered + grads)
    optimizer_step = max(grads + step_temporaries, sync)
    peak = params + optimizer + sum(extra.values()) + max(forward_backward, optimizer_step)
    rows = {
        "parameters": params,
        "gradients": grads,
        "optimizer state": optimizer,
        "activations": activations,
        "recomputed layer": recompute,
        "logits + loss": loss,
        "gathered weights": gathered,
        **extra,
    }
    notes = []
    if in_flight != 1:
        notes.append(f"activations of {in_flight:g} microbatches in flight")
    return RankMemory(name, dims.world_size // dims.pp, rows, peak, notes)


# --------------------------------------------------------------------------------------------
# the table


def human(n: float) -> str:
    """Bytes in binary units: ``1.50 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(kinds: list[RankMemory]) -> str:
    """One column per kind of rank, one row per component, the estimated peak last."""
    names = list(COMPONENTS) + [k for kind in kinds for k in kind.rows if k not in COMPONENTS]
    names = list(dict.fromkeys(names))
    head = ["per rank"] + [f"{k.name} ({k.ranks} rank{'s' if k.ranks > 1 else ''})" for k in kinds]
    body = [[row] + [human(k.rows.get(row, 0)) for k in kinds] for row in names]
    body.append(["peak (estimate)"] + [human(k.peak) for k in kinds])
    widths = [max(len(r[c]) for r in [head, *body]) for c in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule, *map(line, body[:-1]), rule, line(body[-1])])
