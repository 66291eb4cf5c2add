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

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshweave.config import Config, ConfigError, check_moe, check_sections, require
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
    if t.compile:
        # Compiled blocks are proven with data parallelism (FSDP / HSDP / replicas), activation
        # checkpointing and the pipeline; with TP's DTensor hooks inside a block, CP's attention
        # collectives and MoE dispatch they are not yet, so those are refused, not run unproven.
        untested = {"parallel.tp > 1": dims.tp > 1, "parallel.cp > 1": dims.cp > 1, "moe": cfg.moe.num_experts > 0}
        for what, present in untested.items():
            require(not present, "train.compile", f"compiled blocks are not supported with {what} yet; drop one")
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
    require(not cfg.train.compile, "lora.rank", "compiled blocks are not supported with LoRA yet; drop train.compile")
    require(not cfg.model.ladder_residual, "lora.rank", "LoRA on a ladder-residual model is not supported; drop one")


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
