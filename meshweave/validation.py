"""A run's configuration checked as a whole, before any process group exists.

:mod:`meshweave.config` checks each section on its own; this module adds what spans sections, the
world size or the file system: the parallel degrees against the world size and the model
(parallel/dims.py), the pipeline split (parallel/stages.py), MoE against the model and expert
parallelism, DiLoCo against 1-bit Adam and the layer count, the sequence against the model's
maximum, and that named data / initial weights exist. The CLI calls :func:`resolve` in the
launching process, so a bad value costs one line on stderr naming the key and the fix, exit code 2,
never a traceback from eight ranks. No torch is imported here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshweave.config import (
    SECTIONS,
    Config,
    ConfigError,
    ModelConfig,
    check_moe,
    divisors,
    field_choices,
    leaves,
    require,
)
from meshweave.options import load
from meshweave.parallel.dims import ParallelDims, resolve_degrees

if TYPE_CHECKING:
    from meshweave.data.tokenizers import Tokenizer


def validate(cfg: Config, world_size: int | None = None) -> ParallelDims:
    """Raise ConfigError for the first impossible value; returns the parallel degrees (and fills
    ``parallel.dp_shard = -1``). ``world_size`` defaults to ``$WORLD_SIZE`` (1 outside torchrun)."""
    check_sections(cfg)
    m, t = cfg.model, cfg.train
    if cfg.moe.num_experts:
        check_moe(cfg.moe, m.dim)
    require(t.seq_len <= m.max_seq_len, "train.seq_len", f"{t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    require(
        not m.sliding_window or m.sliding_window >= t.seq_len,
        "model.sliding_window",
        f"sliding-window attention shorter than train.seq_len={t.seq_len} is not supported (window "
        f"{m.sliding_window}); train with --train.seq_len<={m.sliding_window}",
    )
    if cfg.comm.diloco.enabled:
        require(
            cfg.optim.name != "onebit_adam",
            "comm.diloco.enabled",
            "DiLoCo and optim.name=onebit_adam both replace the replicas' gradient exchange: choose one",
        )
        cfg.comm.diloco.validate(m.n_layers)
    if cfg.comm.co2.enabled:
        require(
            not cfg.comm.diloco.enabled and cfg.optim.name != "onebit_adam",
            "comm.co2.enabled",
            "CO2, DiLoCo and optim.name=onebit_adam each replace the replicas' gradient exchange: choose one",
        )
        cfg.comm.co2.validate()
    if cfg.lora.rank:
        check_lora(cfg)
    if cfg.data.source != "embedded":
        from meshweave.data.indexed import resolve_prefix

        require(not cfg.data.blend, "data.blend", "set together with data.source; give one of them")
        try:
            resolve_prefix(cfg.data.source)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _blend_sources(cfg.data.blend)
    if cfg.checkpoint.init_from:
        source = Path(cfg.checkpoint.init_from)
        require(
            (source / "config.json").is_file() or (source / "manifest.json").is_file(),
            "checkpoint.init_from",
            f"{source} is neither a Hugging Face model directory (config.json) "
            "nor a meshweave checkpoint (manifest.json)",
        )
    dims = resolve_degrees(cfg, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    reshard = cfg.parallel.fsdp_reshard_after_forward
    if reshard.isdigit():  # FSDP2 reshards to a sub-group of the shard group: its size must divide it
        shard_ranks = dims.dp_shard * dims.cp
        require(
            shard_ranks % int(reshard) == 0,
            "parallel.fsdp_reshard_after_forward",
            f"{reshard} does not divide the FSDP shard group (dp_shard x cp = {shard_ranks}); "
            f"choose one of {[d for d in range(1, shard_ranks + 1) if shard_ranks % d == 0]}, true or false",
        )
    require(
        not cfg.comm.tp_overlap or dims.tp > 1,
        "comm.tp_overlap",
        "overlaps tensor-parallel communication: set parallel.tp > 1 or drop it",
    )
    require(
        not (t.compile and cfg.comm.tp_overlap),
        "train.compile",
        "compiled blocks are not supported with comm.tp_overlap yet (its ring's autograd Functions "
        "post P2P inside the block); drop one",
    )
    return dims


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # models/lora.py TARGETS (no torch here)


def check_lora(cfg: Config) -> None:
    """ConfigError for ``[lora]`` values that cannot train: ranges, target names, experts."""
    lo = cfg.lora
    require(lo.rank > 0, "lora.rank", f"must be >= 0 (0: off), got {lo.rank}")
    require(lo.alpha > 0, "lora.alpha", f"must be > 0 (updates are scaled by alpha / rank), got {lo.alpha}")
    require(0.0 <= lo.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    targets = [t.strip() for t in lo.targets.split(",") if t.strip()]
    require(bool(targets), "lora.targets", f"names no projection; choose from {','.join(LORA_TARGETS)}")
    unknown = [t for t in targets if t not in LORA_TARGETS]
    require(not unknown, "lora.targets", f"unknown {','.join(unknown)}; choose from {','.join(LORA_TARGETS)}")
    mlp = [t for t in targets if t in ("gate", "up", "down")]
    require(
        not (cfg.moe.num_experts and mlp),
        "lora.targets",
        f"{','.join(mlp)} on an MoE model: adapters on experts are not supported; target q,k,v,o",
    )
    require(
        cfg.optim.name != "onebit_adam" and not cfg.comm.diloco.enabled and not cfg.comm.co2.enabled,
        "lora.rank",
        "LoRA trains with the plain data-parallel exchange; drop optim.name=onebit_adam / comm.diloco / comm.co2",
    )
    require(not cfg.model.ladder_residual, "lora.rank", "LoRA on a ladder-residual model is not supported; drop one")


def check_rope(m: ModelConfig) -> None:
    """ConfigError for rotary scaling settings that would not give a well-defined frequency table."""
    require(m.rope_theta > 1, "model.rope_theta", f"must be > 1, got {m.rope_theta}")
    if m.rope_scaling == "none":
        return
    require(m.rope_factor >= 1, "model.rope_factor", f"must be >= 1 with rope_scaling={m.rope_scaling}")
    require(m.rope_original_max_len >= 0, "model.rope_original_max_len", "must be >= 0 (0: max_seq_len)")
    if m.rope_scaling == "llama3":
        require(
            0 < m.rope_low_freq_factor < m.rope_high_freq_factor,
            "model.rope_low_freq_factor",
            f"must be > 0 and < rope_high_freq_factor={m.rope_high_freq_factor}",
        )
    if m.rope_scaling == "yarn":
        require(m.rope_beta_fast > m.rope_beta_slow > 0, "model.rope_beta_fast", "must be > rope_beta_slow > 0")
        require(m.rope_attention_factor >= 0, "model.rope_attention_factor", "must be >= 0 (0: from rope_factor)")


def check_sections(cfg: Config) -> None:
    """Raise ConfigError for the first value its own section rules out (types were checked on load):
    ranges, choices, finiteness. Checks between sections, against the world size or the file system
    live in meshweave.validation."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    for section in SECTIONS:
        for key, owner, name in leaves(getattr(cfg, section), section):
            value = getattr(owner, name)
            if isinstance(value, float):
                require(math.isfinite(value), key, f"must be a finite number, got {value}")
            allowed = field_choices(type(owner), name)
            if allowed and value not in allowed:
                raise ConfigError(f"{key}={value!r}: choose one of {', '.join(allowed)}")
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
        require(getattr(m, key) > 0, f"model.{key}", f"must be > 0, got {getattr(m, key)}")
    require(m.head_dim >= 0, "model.head_dim", f"must be >= 0 (0: dim / n_heads), got {m.head_dim}")
    require(
        m.head_dim > 0 or m.dim % m.n_heads == 0,
        "model.dim",
        f"{m.dim} is not divisible by model.n_heads={m.n_heads} (head_dim must be whole; or set model.head_dim)",
    )
    require(
        m.n_heads % m.n_kv_heads == 0,
        "model.n_kv_heads",
        f"{m.n_kv_heads} does not divide n_heads={m.n_heads} (choose one of {divisors(m.n_heads)})",
    )
    require(
        m.attention_head_dim() % 2 == 0,
        "model.head_dim",
        f"head_dim={m.attention_head_dim()} must be even for rotary embeddings",
    )
    check_rope(m)
    require(m.sliding_window >= 0, "model.sliding_window", "must be >= 0 (0: no window)")
    require(m.norm_eps > 0, "model.norm_eps", "must be > 0")
    require(m.init_std > 0, "model.init_std", "must be > 0")
    require(cfg.moe.num_experts >= 0, "moe.num_experts", f"must be >= 0 (0: dense model), got {cfg.moe.num_experts}")

    require(0.0 <= cfg.data.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")

    require(t.steps > 0, "train.steps", f"must be > 0, got {t.steps}")
    require(t.global_batch > 0, "train.global_batch", f"must be > 0, got {t.global_batch}")
    require(t.micro_batch >= 0, "train.micro_batch", "must be >= 0 (0: no accumulation)")
    require(t.seq_len > 1, "train.seq_len", f"must be > 1, got {t.seq_len}")
    require(t.eval_interval >= 0, "train.eval_interval", "must be >= 0")
    require(t.eval_batches > 0, "train.eval_batches", "must be > 0")
    require(t.max_bad_steps > 0, "train.max_bad_steps", "must be > 0")
    require(t.stop_at_step >= 0, "train.stop_at_step", "must be >= 0 (0: run to train.steps)")

    require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
    require(o.eps > 0, "optim.eps", "must be > 0")
    require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    require(
        o.freeze_step >= 1,
        "optim.freeze_step",
        "must be >= 1 (1-bit Adam needs exact Adam steps to freeze its variance)",
    )

    p = cfg.parallel
    for key in ("fsdp_forward_prefetch", "fsdp_backward_prefetch"):
        require(getattr(p, key) >= 0, f"parallel.{key}", f"must be >= 0 (layers to prefetch), got {getattr(p, key)}")
    reshard = p.fsdp_reshard_after_forward
    require(
        reshard in ("auto", "true", "false") or (reshard.isdigit() and int(reshard) >= 1),
        "parallel.fsdp_reshard_after_forward",
        f"{reshard!r} is not auto, true, false or a positive number of ranks",
    )
    require(cfg.comm.bucket_mb > 0, "comm.bucket_mb", "must be > 0")
    require(cfg.comm.timeout_s > 0, "comm.timeout_s", "must be > 0")
    require(cfg.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0 (0: only at the end)")
    require(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    require(cfg.log.interval >= 1, "log.interval", "must be >= 1")
    require(cfg.log.peak_tflops >= 0, "log.peak_tflops", "must be >= 0")
    require(bool(cfg.out), "out", "must name a directory")


def preflight(cfg: Config) -> None:
    """Checks that read files but need no process group: ``data.tokenizer`` loads and (for a
    prepared ``data.source``) is the tokenizer that wrote its tokens, the data's vocabulary fits the model,
    a dataset's .idx matches its .bin and holds documents, ``checkpoint.init_from`` has the model's
    shape, an explicit ``checkpoint.resume`` path verifies. ConfigError otherwise. Imports the
    checkpoint code (and torch) only when a run names one, megatron-core only for a dataset source."""
    if cfg.checkpoint.init_from:
        from meshweave.checkpoint.hf import check_init_from

        check_init_from(cfg)
    if cfg.checkpoint.resume not in ("auto", "none"):
        from meshweave.checkpoint.manager import CheckpointError, verify

        try:
            verify(Path(cfg.checkpoint.resume))
        except CheckpointError as e:
            raise ConfigError(f"checkpoint.resume: {e} (use auto to fall back to the newest valid one)") from None
    from meshweave.data.tokenizers import load_tokenizer, tokenizer_mismatch

    spec = cfg.data.tokenizer
    try:
        tok = load_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: {' '.join(str(e).split())}") from None
    vocab, where = tok.vocab_size, f"tokenizer {spec}"
    blended = _blend_sources(cfg.data.blend)
    for source in blended or ([cfg.data.source] if cfg.data.source != "embedded" else []):
        label = f"data.blend: source {source}" if blended else f"data.source={source}"
        record, documents = _check_dataset(source, spec, tok, label)
        if record is not None:
            why = tokenizer_mismatch(record, spec, tok)
            if why:
                raise ConfigError(f"data.tokenizer={spec} did not write the tokens of {label}: {why}")
            if record["vocab_size"] > vocab or where == f"tokenizer {spec}":
                vocab, where = record["vocab_size"], source
        if cfg.data.eval_fraction > 0 and documents < 2:
            raise ConfigError(
                f"{label} holds {documents} document and data.eval_fraction={cfg.data.eval_fraction} holds "
                "documents out for eval; use --data.eval_fraction=0 or prepare more than one document"
            )
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
            f"({vocab} token ids from {where}); use --model.vocab_size={vocab} or larger"
        )


# Tokens of a Megatron dataset without a meshweave sidecar that preflight compares with data.tokenizer:
# a bounded prefix, so the check costs milliseconds on a corpus of any size.
_CHECKED_TOKENS = 1 << 20


def _blend_sources(spec: str) -> list[str]:
    """The dataset prefixes of ``data.blend`` (none when it is empty); ConfigError naming
    ``data.blend`` for a malformed blend or a source that does not name a dataset."""
    if not spec:
        return []
    from meshweave.data.blend import parse_blend
    from meshweave.data.indexed import resolve_prefix

    try:
        sources = [path for _, path in parse_blend(spec)]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for source in sources:
        try:
            resolve_prefix(source)
        except ValueError as e:
            why = str(e).split(": ", 1)[-1].removesuffix(" or 'embedded'")  # a blend takes datasets only
            raise ConfigError(f"data.blend: source {source}: {why}") from None
    return sources


def _check_dataset(source: str, spec: str, tok: Tokenizer, label: str = "") -> tuple[dict[str, Any] | None, int]:
    """ConfigError unless ``source`` is a readable Megatron dataset whose .idx matches its .bin and
    holds documents; returns its meshweave sidecar (None for a prefix written elsewhere, whose
    first tokens must then be ids of ``tok``, the tokenizer trusted to have written it) and its
    document count. ``label`` names the source in errors (default ``data.source=SOURCE``)."""
    from meshweave.data.indexed import open_loss_mask, open_tokens, read_index, read_sidecar, resolve_prefix

    label = label or f"data.source={source}"
    try:
        prefix = resolve_prefix(source)
        summary = read_index(prefix)
        record = read_sidecar(prefix)
        open_loss_mask(prefix, summary.num_tokens)
    except (OSError, ValueError) as e:
        text = " ".join(str(e).split())
        if text.startswith("data.source="):
            raise ConfigError(f"{label}: {text.split(': ', 1)[-1]}") from None
        raise ConfigError(
            f"{label}: {text}; write the dataset again (`meshweave data prepare` from inputs that "
            "hold text, or copy PREFIX.bin together with its PREFIX.idx)"
        ) from None
    if record is not None:
        counts = (int(record.get("num_tokens", -1)), int(record.get("num_documents", -1)))
        if counts != (summary.num_tokens, summary.num_documents):
            raise ConfigError(
                f"{label}: {prefix}.meshweave.json describes {counts[0]} tokens in {counts[1]} "
                f"documents, the .idx {summary.num_tokens} in {summary.num_documents}; the record belongs to "
                "another dataset: write the dataset again with `meshweave data prepare`"
            )
        return record, summary.num_documents
    head = open_tokens(summary)[:_CHECKED_TOKENS]
    top = int(head.max())
    if top >= tok.vocab_size or int(head.min()) < 0:
        raise ConfigError(
            f"data.tokenizer={spec} did not write the tokens of {label}: they hold id {top}, "
            f"the tokenizer has {tok.vocab_size} ids; use --data.tokenizer= the tokenizer that prepared them"
        )
    return None, summary.num_documents


def resolve(config_path: str | None, overrides: list[str], world_size: int | None = None) -> Config:
    """The run's config: defaults, then the TOML file, then the overrides, then :func:`validate`."""
    cfg = load(config_path, overrides)
    validate(cfg, world_size)
    return cfg
