"""Run configuration: dataclasses, TOML loading, ``--section.key=value`` overrides, validation.

Everything a run needs is one :class:`Config`. It is resolved (TOML file, then command-line
overrides) and validated in the launching process before any process group exists, so a bad value
costs one line on stderr and exit code 2, never a traceback from eight ranks.
"""

from __future__ import annotations

import dataclasses
import json
import keyword
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value. The message names the key and what is allowed."""


# --------------------------------------------------------------------------------------------
# sections


@dataclass
class ModelConfig:
    """Llama-style decoder shape. Parameter names follow Hugging Face Llama one-to-one."""

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 384
    vocab_size: int = 320
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forward layers (meshweave.models.moe.MoESettings, field for field).

    ``num_experts = 0`` keeps the model dense. Layer ``i`` is MoE iff ``i % every == every - 1``.
    """

    num_experts: int = 0
    top_k: int = 2
    every: int = 1
    expert_ffn_dim: int = 128
    shared_experts: int = 0
    score: str = "softmax"
    renormalize: bool = False
    capacity_factor: float = 0.0
    min_capacity: int = 4
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 1e-3
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    low_dim: int = 0


@dataclass
class DataConfig:
    """Where tokens come from. ``embedded`` is Python's own pydoc topics, byte-tokenized."""

    source: str = "embedded"
    eval_fraction: float = 0.05


@dataclass
class ParallelConfig:
    """Degrees of the device mesh, slowest to fastest: pp, dp_replicate, dp_shard, cp, tp.

    ``dp_shard = -1`` fills whatever the other degrees leave of the world size.
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    cp: int = 1
    pp: int = 1
    ep: int = 1
    cp_method: str = "ring"
    ulysses: int = 0
    cp_inner: str = "ring"
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 0
    pp_virtual_stages: int = 0
    pp_layers: str = ""
    mixed_precision: str = "none"
    activation_checkpointing: bool = False


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    schedule: str = "cosine"
    grad_clip: float = 1.0
    fused: str = "auto"
    freeze_step: int = 100


@dataclass
class DiLoCoConfig:
    """Streaming DiLoCo across the dp_replicate replicas (meshweave.lowcomm.diloco)."""

    enabled: bool = False
    inner_steps: int = 100
    fragments: int = 1
    delay: int = 0
    alpha: float = 0.0
    quantize: str = "none"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9


@dataclass
class CommConfig:
    bucket_mb: float = 25.0
    overlap: bool = True
    timeout_s: float = 600.0
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)


@dataclass
class CheckpointConfig:
    interval: int = 0
    keep: int = 2
    resume: str = "auto"
    save_final: bool = True
    async_: bool = False  # `--checkpoint.async`: a Python keyword, hence the underscore
    init_from: str = ""


@dataclass
class LogConfig:
    interval: int = 1
    progress: bool = True
    peak_tflops: float = 0.0
    wandb: bool = False
    wandb_project: str = "meshweave"
    wandb_run_name: str = ""


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 1234
    global_batch: int = 32
    micro_batch: int = 0
    seq_len: int = 128
    dtype: str = "fp32"
    eval_interval: int = 0
    eval_batches: int = 4
    max_bad_steps: int = 5
    stop_at_step: int = 0
    device: str = "auto"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/default"


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config) if f.name != "out")

# Allowed values for string options; one table so --help and validation agree.
CHOICES: dict[str, tuple[str, ...]] = {
    "parallel.mixed_precision": ("none", "bf16"),
    "parallel.cp_method": ("ulysses", "ring", "tokenring", "hybrid"),
    "parallel.cp_inner": ("ring", "tokenring"),
    "parallel.pp_schedule": ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv"),
    "optim.name": ("adamw", "sgd", "onebit_adam"),
    "comm.diloco.quantize": ("none", "fp4", "int4"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "optim.fused": ("auto", "true", "false"),
    "moe.score": ("softmax", "sigmoid"),
    "train.dtype": ("fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
}

HELP: dict[str, str] = {
    "model.ffn_dim": "SwiGLU hidden width",
    "model.vocab_size": "embedding rows; must cover the tokenizer's vocabulary",
    "moe.num_experts": "routed experts per MoE layer; 0 = dense model (no MoE layers)",
    "moe.top_k": "experts each token is routed to",
    "moe.every": "every k-th layer is MoE (the last of each k); 1 = every layer",
    "moe.expert_ffn_dim": "SwiGLU hidden width of one expert (and of each shared expert)",
    "moe.shared_experts": "always-on experts per MoE layer (DeepSeekMoE), overlapping the dispatch",
    "moe.score": "router scores: softmax | sigmoid (weights renormalised over the top-k)",
    "moe.renormalize": "softmax only: rescale the top-k weights to sum 1 (Mixtral)",
    "moe.capacity_factor": "expert capacity ceil(k*T/E * cf), tokens over it dropped; 0 = dropless",
    "moe.min_capacity": "capacity floor when capacity_factor > 0",
    "moe.aux_loss_coeff": "load-balancing loss coeff * E * sum_i f_i P_i",
    "moe.z_loss_coeff": "router z-loss coeff * mean logsumexp(logits)^2",
    "moe.bias_balancing": "aux-loss-free balancing: per-expert selection bias nudged each step",
    "moe.bias_update_rate": "bias step per optimizer step (sign of the load deviation)",
    "moe.low_dim": "BigMac: routed experts run at this width, so the all-to-alls move it (0 = off)",
    "parallel.ep": "expert-parallel degree: experts split over ep ranks carved from dp_shard x cp",
    "data.source": "'embedded' or a directory written by `meshweave data prepare`",
    "data.eval_fraction": "share of documents held out for eval",
    "parallel.dp_shard": "FSDP degree; -1 fills the rest of the world size",
    "parallel.dp_replicate": "replicated data-parallel degree (HSDP when dp_shard > 1)",
    "parallel.mixed_precision": "FSDP param dtype policy: none | bf16 (fp32 reduce)",
    "parallel.cp": "context-parallel degree: each sequence is split over this many ranks",
    "parallel.cp_method": "ulysses (all-to-all heads) | ring (K/V travel) | tokenring (Q travels) | hybrid",
    "parallel.ulysses": "hybrid only: Ulysses degree inside each ring rank (0: largest power of 2 <= sqrt(cp))",
    "parallel.cp_inner": "hybrid only: ring or tokenring across the Ulysses groups",
    "parallel.pp": "pipeline-parallel degree: the layers are split into this many stages (x virtual stages)",
    "parallel.pp_schedule": "gpipe | 1f1b | interleaved_1f1b | interleaved_zb (zero bubble) | zbv (zero bubble, V)",
    "parallel.pp_microbatches": "microbatches per step per pipeline (0: the number of stages)",
    "parallel.pp_virtual_stages": "stages per rank for interleaved schedules (0: 2 for them, 1 otherwise)",
    "parallel.pp_layers": "explicit split, e.g. '0-3,4-7' (one range per stage); empty: balance by cost",
    "optim.min_lr_ratio": "final LR as a fraction of optim.lr",
    "optim.grad_clip": "max global grad norm; 0 disables clipping",
    "optim.fused": "fused AdamW: auto uses it where the device supports it",
    "optim.freeze_step": "onebit_adam: exact Adam steps before the variance freezes and momentum goes 1-bit",
    "comm.diloco.enabled": "Streaming DiLoCo: replicas (dp_replicate) sync every inner_steps, not every step",
    "comm.diloco.inner_steps": "H: inner steps between two syncs of the same fragment",
    "comm.diloco.fragments": "P: strided layer fragments, synced in turn H/P steps apart",
    "comm.diloco.delay": "tau: steps the fragment's all-reduce runs in the background before it is merged",
    "comm.diloco.alpha": "weight of the local weights when merging (0: take the global weights)",
    "comm.diloco.quantize": "outer-gradient wire format (fp32 accumulation either way)",
    "comm.bucket_mb": "gradient bucket size for the replicated all-reduce",
    "comm.overlap": "launch bucket all-reduces during backward",
    "comm.timeout_s": "a collective that does not complete in this time fails the run, naming the op",
    "checkpoint.interval": "save every N steps (0: only at the end)",
    "checkpoint.keep": "complete checkpoints kept",
    "checkpoint.resume": "auto (newest valid, if any) | none | PATH",
    "checkpoint.async": "stage to host memory and write in the background while training continues",
    "checkpoint.init_from": "start from these weights (Hugging Face dir or a meshweave step-N dir) when not resuming",
    "log.peak_tflops": "device peak for MFU; 0 looks the GPU up in a table",
    "train.global_batch": "sequences per optimizer step across all data-parallel ranks",
    "train.micro_batch": "sequences per forward per rank; 0 = no accumulation",
    "train.eval_interval": "eval every N steps (0: never)",
    "train.max_bad_steps": "abort after this many non-finite steps in a row",
    "train.stop_at_step": "exit (checkpointed) after this step without changing the schedule; 0: run to train.steps",
}


# --------------------------------------------------------------------------------------------
# loading and overrides


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _field_types(section_cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _coerce(key: str, value: Any, tp: type) -> Any:
    """Convert a TOML value or a command-line string to ``tp``, or raise ConfigError."""
    if isinstance(value, str) and tp is not str:
        text = value.strip()
        try:
            if tp is bool:
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            return tp(text)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
        return float(value)
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    return value


def option_name(field_name: str) -> str:
    """The command-line / TOML name of a field: ``async_`` is ``async`` (keywords can't be fields)."""
    return field_name[:-1] if field_name.endswith("_") else field_name


def _field_name(option: str) -> str:
    return option + "_" if keyword.iskeyword(option) else option


def _known(obj: Any) -> str:
    return ", ".join(option_name(f.name) for f in dataclasses.fields(obj))


def leaves(obj: Any, prefix: str) -> list[tuple[str, Any, str]]:
    """``(dotted option name, owning dataclass, field name)`` of every option under ``obj``;
    nested dataclasses (e.g. ``comm.diloco``) are sub-sections."""
    found = []
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{option_name(f.name)}"
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            found += leaves(value, key)
        else:
            found.append((key, obj, f.name))
    return found


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set ``section[.sub].key`` (or ``out``) on ``cfg`` from a TOML value or string, type-checked.
    A dict value (a TOML sub-table) sets each of its keys below ``key``."""
    if key == "out":
        cfg.out = _coerce("out", value, str)
        return
    section, *path = key.split(".")
    if section not in SECTIONS or not path:
        raise ConfigError(f"unknown option {key!r}: options are <section>.<key> with section in "
                          f"{', '.join(SECTIONS)} (see `meshweave train --help`)")
    obj, where = getattr(cfg, section), section
    for i, part in enumerate(path):
        name = _field_name(part)
        types = _field_types(type(obj))
        if name not in types:
            raise ConfigError(f"unknown option {key!r}: {where} has {_known(obj)}")
        if dataclasses.is_dataclass(types[name]):
            if i == len(path) - 1:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key} is a section: set its keys, e.g. --{key}.{_known(getattr(obj, name)).split(',')[0]}=...")
                for sub, v in value.items():
                    set_value(cfg, f"{key}.{sub}", v)
                return
            obj, where = getattr(obj, name), f"{where}.{part}"
            continue
        if i != len(path) - 1:
            raise ConfigError(f"unknown option {key!r}: {where}.{part} is not a section")
        setattr(obj, name, _coerce(key, value, types[name]))


def load_toml(path: str | os.PathLike[str], cfg: Config | None = None) -> Config:
    """Read a TOML file of ``[section]`` tables onto ``cfg`` (default: a fresh Config)."""
    cfg = cfg or Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    for section, table in data.items():
        if not isinstance(table, dict):
            set_value(cfg, section, table)
            continue
        for name, value in table.items():
            set_value(cfg, f"{section}.{name}", value)
    return cfg


def parse_overrides(args: list[str], cfg: Config) -> Config:
    """Apply ``--section.key=value`` / ``--section.key value`` / ``--out DIR`` to ``cfg``."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            value = args[i + 1]
            i += 1
        set_value(cfg, key, value)
        i += 1
    return cfg


def resolve(config_path: str | None, overrides: list[str], world_size: int | None = None) -> Config:
    """The run's config: defaults, then the TOML file, then the overrides, then validation."""
    cfg = load_toml(config_path) if config_path else Config()
    parse_overrides(overrides, cfg)
    validate(cfg, world_size)
    return cfg


# --------------------------------------------------------------------------------------------
# validation


def require(ok: bool, key: str, msg: str) -> None:
    """Raise ConfigError ``"<key>: <msg>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def divisors(n: int) -> str:
    """``"1, 2, 4"``: the divisors of ``n``, for error messages."""
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Raise ConfigError for the first impossible value. Pure: touches no process group.

    ``world_size`` defaults to ``$WORLD_SIZE`` (1 outside torchrun); the parallel degrees are
    checked against it so a bad layout fails before any rank connects.
    """
    m, t, o, p = cfg.model, cfg.train, cfg.optim, cfg.parallel
    for section in SECTIONS:
        for key, owner, name in leaves(getattr(cfg, section), section):
            value = getattr(owner, name)
            if isinstance(value, float):
                require(math.isfinite(value), key, f"must be a finite number, got {value}")
            allowed = CHOICES.get(key)
            if allowed and value not in allowed:
                raise ConfigError(f"{key}={value!r}: choose one of {', '.join(allowed)}")
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
        require(getattr(m, key) > 0, f"model.{key}", f"must be > 0, got {getattr(m, key)}")
    require(m.dim % m.n_heads == 0, "model.dim",
             f"{m.dim} is not divisible by model.n_heads={m.n_heads} (head_dim must be whole)")
    require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
             f"{m.n_kv_heads} does not divide n_heads={m.n_heads} (choose one of {divisors(m.n_heads)})")
    require((m.dim // m.n_heads) % 2 == 0, "model.dim",
             f"head_dim={m.dim // m.n_heads} must be even for rotary embeddings")
    require(m.norm_eps > 0, "model.norm_eps", "must be > 0")
    require(m.init_std > 0, "model.init_std", "must be > 0")

    require(0.0 <= cfg.data.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")
    if cfg.data.source != "embedded":
        require(Path(cfg.data.source, "index.json").is_file(), "data.source",
                 f"{cfg.data.source!r} is not a prepared data directory (no index.json); use "
                 "'embedded' or run `meshweave data prepare`")


    require(t.steps > 0, "train.steps", f"must be > 0, got {t.steps}")
    require(t.global_batch > 0, "train.global_batch", f"must be > 0, got {t.global_batch}")
    require(t.micro_batch >= 0, "train.micro_batch", "must be >= 0 (0: no accumulation)")
    require(t.seq_len > 1, "train.seq_len", f"must be > 1, got {t.seq_len}")
    require(t.seq_len <= m.max_seq_len, "train.seq_len",
             f"{t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
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
    require(o.freeze_step >= 1, "optim.freeze_step", "must be >= 1 (1-bit Adam needs exact Adam steps to freeze its variance)")
    if cfg.comm.diloco.enabled:
        require(o.name != "onebit_adam", "comm.diloco.enabled",
                "DiLoCo and optim.name=onebit_adam both replace the replicas' gradient exchange: choose one")
        try:
            diloco_settings(cfg).validate(m.n_layers)
        except ValueError as e:
            raise ConfigError(f"comm.{e}") from None

    require(cfg.comm.bucket_mb > 0, "comm.bucket_mb", "must be > 0")
    require(cfg.comm.timeout_s > 0, "comm.timeout_s", "must be > 0")
    require(cfg.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0 (0: only at the end)")
    require(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    if cfg.checkpoint.init_from:
        source = Path(cfg.checkpoint.init_from)
        require((source / "config.json").is_file() or (source / "manifest.json").is_file(),
                "checkpoint.init_from", f"{source} is neither a Hugging Face model directory (config.json) "
                "nor a meshweave checkpoint (manifest.json)")
    require(cfg.log.interval >= 1, "log.interval", "must be >= 1")
    require(cfg.log.peak_tflops >= 0, "log.peak_tflops", "must be >= 0")
    require(bool(cfg.out), "out", "must name a directory")

    from meshweave.parallel.dims import resolve_degrees  # layout rules live with the mesh

    resolve_degrees(cfg, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))


def diloco_settings(cfg: Config):
    """``comm.diloco`` as meshweave.lowcomm.diloco's DiLoCoSettings (imports torch: call lazily)."""
    from meshweave.lowcomm.diloco import DiLoCoSettings

    return DiLoCoSettings(**{k: v for k, v in dataclasses.asdict(cfg.comm.diloco).items() if k != "enabled"})


# --------------------------------------------------------------------------------------------
# rendering


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML text that :func:`load_toml` reads back to an equal Config."""
    lines = [f"out = {_toml_value(cfg.out)}", ""]
    for section in SECTIONS:
        tables: dict[str, list[str]] = {}
        for key, owner, name in leaves(getattr(cfg, section), section):
            table, _, option = key.rpartition(".")
            tables.setdefault(table, []).append(f"{option} = {_toml_value(getattr(owner, name))}")
        for table, rows in tables.items():  # the section first, then its sub-sections
            lines += [f"[{table}]", *rows, ""]
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf") if not math.isnan(v) else "nan"
    if isinstance(v, int):
        return str(v)
    return json.dumps(str(v), ensure_ascii=False)  # JSON string escapes are valid TOML escapes


def options_help() -> str:
    """Every option with its type, default and allowed values, for ``meshweave train --help``."""
    default = Config()
    rows = [f"  {'--out DIR':<38} run directory (default: runs/default)"]
    for section in SECTIONS:
        for key, owner, name in leaves(getattr(default, section), section):
            value = getattr(owner, name)
            extra = HELP.get(key, "")
            if key in CHOICES:
                extra = (extra + "; " if extra else "") + "one of " + "|".join(CHOICES[key])
            rows.append(f"  {'--' + key + '=' + _toml_value(value):<38} {extra}".rstrip())
    return "\n".join(rows)
