"""Hugging Face ``config.json`` <-> meshweave's model section, one declared family at a time.

A family (:class:`HFFamily`) names its HF ``model_type`` and architecture, the features it always
has (Qwen2's q/k/v biases, Qwen3's q/k norms) and which of meshweave's features its config can
express. Reading is strict: every key of ``config.json`` is either translated, checked against the
one value meshweave implements (``hidden_act = silu``), or known to leave the forward pass alone
(token ids, dtype, version stamps). Anything else is a :class:`ConfigError` naming the key: a key
that changes the math and is not understood must never fall back to a default.

RoPE settings are read from ``rope_parameters`` (transformers 5) or from the top-level
``rope_theta`` / ``rope_scaling`` of older configs, never both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshweave.config import ConfigError, ModelConfig

# Keys that never change the forward pass: bookkeeping, generation defaults, output switches.
_METADATA = {
    "_name_or_path",
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "pretraining_tp",  # only reorders the same matmuls in old transformers; ignored by 5.x
    "initializer_range",  # read as init_std: meshweave's own initialisation, not the forward
    "max_window_layers",  # which layers a Qwen sliding window covers; checked via sliding_window
}


@dataclass(frozen=True)
class HFFamily:
    """One Hugging Face architecture meshweave reads and writes."""

    name: str  # model.hf_family
    model_type: str
    architecture: str
    fixed: dict[str, Any] = field(default_factory=dict)  # ModelConfig features always on
    bias_key: str | None = None  # the config key of q/k/v(/o) biases, when the family has one
    head_dim_key: bool = True  # whether config.json carries head_dim
    sliding_window: bool = True  # whether the family has a sliding-window setting
    rope_key: str = "rope_parameters"


FAMILIES = {
    f.name: f
    for f in (
        HFFamily("llama", "llama", "LlamaForCausalLM", bias_key="attention_bias", sliding_window=False),
        HFFamily("mistral", "mistral", "MistralForCausalLM"),
        HFFamily("qwen2", "qwen2", "Qwen2ForCausalLM", fixed={"qkv_bias": True}, head_dim_key=False),
        HFFamily("qwen3", "qwen3", "Qwen3ForCausalLM", fixed={"qk_norm": True}, bias_key="attention_bias"),
    )
}

_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}


class _Reader:
    """A config dict whose keys are taken one by one; :meth:`finish` rejects what was left."""

    def __init__(self, hf: dict[str, Any], where: str, ignored: set[str] = _METADATA) -> None:
        self.hf, self.where, self.left = hf, where, set(hf) - ignored

    def take(self, key: str, default: Any = None) -> Any:
        self.left.discard(key)
        value = self.hf.get(key)
        return default if value is None else value

    def require(self, key: str) -> Any:
        if self.hf.get(key) is None:
            raise ConfigError(f"{self.where}: {key} is missing")
        return self.take(key)

    def expect(self, key: str, allowed: Callable[[Any], bool], what: str) -> None:
        """Consume ``key``, which must be absent or satisfy ``allowed`` (``what`` says how)."""
        value = self.take(key)
        if value is not None and not allowed(value):
            raise ConfigError(f"{self.where}: {key}={value!r} is not supported (meshweave implements {what})")

    def finish(self) -> None:
        if self.left:
            key = sorted(self.left)[0]
            raise ConfigError(
                f"{self.where}: {key}={self.hf[key]!r} is not understood by meshweave and may change the "
                f"model's math, so it is not ignored (unknown keys: {', '.join(sorted(self.left))})"
            )


def family_of_hf(hf: dict[str, Any]) -> HFFamily:
    """The family of a HF config dict, by ``model_type`` (and ``architectures``, when given)."""
    model_type = hf.get("model_type")
    family = next((f for f in FAMILIES.values() if f.model_type == model_type), None)
    supported = ", ".join(f"{f.architecture} ({f.model_type})" for f in FAMILIES.values())
    if family is None:
        raise ConfigError(f"config.json: model_type {model_type!r} is not supported (supported: {supported})")
    archs = hf.get("architectures") or [family.architecture]
    if archs != [family.architecture]:
        raise ConfigError(f"config.json: architectures {archs} is not supported (supported: {supported})")
    return family


def _read_rope(r: _Reader, out: dict[str, Any]) -> None:
    """Fill the rope_* fields from ``rope_parameters`` or the older top-level keys. The original
    context of llama3 / yarn is always made explicit, so it never follows max_seq_len."""
    params, legacy = r.take("rope_parameters"), r.take("rope_scaling")
    top_theta = r.take("rope_theta")
    if params is not None and legacy is not None:
        raise ConfigError(f"{r.where}: both rope_parameters and rope_scaling are set; keep one")
    rope = dict(params if params is not None else legacy or {})
    if top_theta is not None:
        if "rope_theta" in rope and rope["rope_theta"] != top_theta:
            raise ConfigError(f"{r.where}: rope_theta={top_theta} contradicts rope_parameters {rope}")
        rope.setdefault("rope_theta", top_theta)
    sub = _Reader(rope, f"{r.where}: rope_parameters", ignored=set())
    kind = sub.take("rope_type", sub.take("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ConfigError(f"{r.where}: rope_type={kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    out["rope_scaling"] = _ROPE_TYPES[kind]
    out["rope_theta"] = float(sub.take("rope_theta", 10000.0))
    sub.expect("partial_rotary_factor", lambda v: v == 1.0, "rotary embeddings over the whole head")
    if kind != "default":
        out["rope_factor"] = float(sub.require("factor"))
    if kind in ("llama3", "yarn"):
        out["rope_original_max_len"] = int(sub.take("original_max_position_embeddings", out["max_seq_len"]))
    if kind == "llama3":
        out["rope_low_freq_factor"] = float(sub.require("low_freq_factor"))
        out["rope_high_freq_factor"] = float(sub.require("high_freq_factor"))
    if kind == "yarn":
        out["rope_beta_fast"] = float(sub.take("beta_fast", 32.0))
        out["rope_beta_slow"] = float(sub.take("beta_slow", 1.0))
        out["rope_attention_factor"] = float(sub.take("attention_factor", 0.0))
        sub.expect("truncate", lambda v: v is True, "YaRN with truncate=true")
    sub.finish()


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """meshweave's model section for a HF ``config.json`` dict; ConfigError for anything that
    would change the forward pass and that meshweave does not implement."""
    family = family_of_hf(hf)
    r = _Reader(hf, f"config.json ({family.architecture})")
    dim, heads = int(r.require("hidden_size")), int(r.require("num_attention_heads"))
    out: dict[str, Any] = dict(
        dim=dim,
        n_layers=int(r.require("num_hidden_layers")),
        n_heads=heads,
        n_kv_heads=int(r.take("num_key_value_heads", heads)),
        ffn_dim=int(r.require("intermediate_size")),
        vocab_size=int(r.require("vocab_size")),
        norm_eps=float(r.take("rms_norm_eps", 1e-6)),
        max_seq_len=int(r.take("max_position_embeddings", 2048)),
        tie_embeddings=bool(r.take("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range") or 0.02),
        hf_family=family.name,
        **family.fixed,
    )
    head_dim = int(r.take("head_dim", 0)) if family.head_dim_key else 0
    out["head_dim"] = 0 if head_dim in (0, dim // heads) and dim % heads == 0 else head_dim
    if family.bias_key:
        r.expect(family.bias_key, lambda v: v is False, "no attention biases in this family")
    r.expect("mlp_bias", lambda v: v is False, "bias-free MLPs")
    r.expect("hidden_act", lambda v: v == "silu", "SwiGLU with silu")
    r.expect("attention_dropout", lambda v: v == 0.0, "attention without dropout")
    r.expect(
        "layer_types",
        lambda v: set(v) <= {"full_attention", "sliding_attention"},
        "full and sliding-window attention layers",
    )
    _read_rope(r, out)
    if family.sliding_window:
        window = r.take("sliding_window")
        enabled = r.take("use_sliding_window", True)
        out["sliding_window"] = int(window) if window and enabled else 0
    r.finish()
    return ModelConfig(**out)


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` dict of ``cfg.hf_family``; ConfigError for a feature it cannot express."""
    family = FAMILIES[cfg.hf_family]
    for key, value in family.fixed.items():
        if getattr(cfg, key) != value:
            raise ConfigError(f"model.{key}={getattr(cfg, key)}: {family.architecture} always has {key}={value}")
    for key in ("qkv_bias", "qk_norm"):
        if getattr(cfg, key) and key not in family.fixed:
            raise ConfigError(f"model.{key}: {family.architecture} cannot express it; export with another hf_family")
    if cfg.head_dim and not family.head_dim_key:
        raise ConfigError(f"model.head_dim={cfg.head_dim}: {family.architecture} has no head_dim setting")
    if cfg.sliding_window and not family.sliding_window:
        raise ConfigError(f"model.sliding_window={cfg.sliding_window}: {family.architecture} has no sliding window")
    hf: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.ffn_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "rope_parameters": _rope_parameters(cfg),
        "torch_dtype": "float32",
    }
    if family.head_dim_key:
        hf["head_dim"] = cfg.attention_head_dim()
    if family.bias_key:
        hf[family.bias_key] = False
    if family.name == "llama":
        hf["mlp_bias"] = False
    if family.sliding_window:
        hf["sliding_window"] = cfg.sliding_window or None
        if family.name != "mistral":
            hf["use_sliding_window"] = bool(cfg.sliding_window)
    return hf


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    kind = next(k for k, v in _ROPE_TYPES.items() if v == cfg.rope_scaling)
    rope: dict[str, Any] = {"rope_type": kind, "rope_theta": cfg.rope_theta}
    if kind != "default":
        rope["factor"] = cfg.rope_factor
    if kind in ("llama3", "yarn"):
        rope["original_max_position_embeddings"] = cfg.rope_original_max_len or cfg.max_seq_len
    if kind == "llama3":
        rope |= {"low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor}
    if kind == "yarn":
        rope |= {"beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow}
        if cfg.rope_attention_factor:
            rope["attention_factor"] = cfg.rope_attention_factor
    return rope


def read_hf_config(hf_dir: str | Path) -> ModelConfig:
    """The model section of a HF model directory's ``config.json``."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    return model_config_from_hf(json.loads(path.read_text()))
