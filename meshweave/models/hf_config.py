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

from meshweave.config import ConfigError, ModelConfig, MoEConfig
from meshweave.models.llama import Transformer

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
    """One Hugging Face architecture meshweave reads and writes.

    ``renames`` is the family's weight-name table inside a decoder block, meshweave name -> HF
    name, for the names that differ; ``{e}`` marks a per-expert HF tensor that meshweave stacks on
    dim 0 (``mlp.experts.gate_proj.weight [E, ffn, dim]`` <- ``...experts.{e}.w1.weight``).
    Names not in the table are the same on both sides (HF adds ``model.`` outside ``lm_head``).
    """

    name: str  # model.hf_family
    model_type: str
    architecture: str
    fixed: dict[str, Any] = field(default_factory=dict)  # ModelConfig features always on
    bias_key: str | None = None  # q/k/v/o biases: the family can express only their absence
    qkv_bias_key: str | None = None  # the key that turns q/k/v biases on (Qwen2-MoE's qkv_bias)
    head_dim_key: bool = True  # whether config.json carries head_dim
    # the family's sliding-window keys: None, "window" (sliding_window) or "qwen" (+ use_sliding_window)
    sliding_window: str | None = "window"
    moe: str | None = None  # "mixtral", "qwen" or "olmoe": which MoE config keys the family uses
    renames: tuple[tuple[str, str], ...] = ()
    # What transformers' config class assumes for a key config.json leaves out, where the family
    # differs from _DEFAULTS (tests/unit/test_hf_families.py checks both against transformers).
    defaults: dict[str, Any] = field(default_factory=dict)

    def default(self, key: str) -> Any:
        """The value transformers gives ``key`` when this family's config.json omits it."""
        return self.defaults.get(key, _DEFAULTS[key])


# transformers' defaults shared by most families; a family's own ``defaults`` win.
_DEFAULTS: dict[str, Any] = {
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "sliding_window": None,
    "use_sliding_window": False,
    "router_aux_loss_coef": 0.001,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
}


_EXPERTS = ("gate_proj", "up_proj", "down_proj")
_QWEN_MOE_NAMES = tuple((f"mlp.experts.{p}.weight", f"mlp.experts.{{e}}.{p}.weight") for p in _EXPERTS)
_MIXTRAL_NAMES = (
    ("mlp.gate.weight", "block_sparse_moe.gate.weight"),
    *(
        (f"mlp.experts.{p}.weight", f"block_sparse_moe.experts.{{e}}.{w}.weight")
        for p, w in zip(_EXPERTS, "w1 w3 w2".split())
    ),
)
_SHARED_NAMES = tuple((f"mlp.shared_experts.{p}.weight", f"mlp.shared_expert.{p}.weight") for p in _EXPERTS)

FAMILIES = {
    f.name: f
    for f in (
        HFFamily("llama", "llama", "LlamaForCausalLM", bias_key="attention_bias", sliding_window=None),
        HFFamily(
            "mistral",
            "mistral",
            "MistralForCausalLM",
            defaults={"max_position_embeddings": 131072, "sliding_window": 4096},
        ),
        HFFamily(
            "qwen2",
            "qwen2",
            "Qwen2ForCausalLM",
            fixed={"qkv_bias": True},
            head_dim_key=False,
            sliding_window="qwen",
            defaults={"max_position_embeddings": 32768},
        ),
        HFFamily(
            "qwen3",
            "qwen3",
            "Qwen3ForCausalLM",
            fixed={"qk_norm": "head"},
            bias_key="attention_bias",
            sliding_window="qwen",
            defaults={"max_position_embeddings": 32768},
        ),
        HFFamily(
            "mixtral",
            "mixtral",
            "MixtralForCausalLM",
            moe="mixtral",
            renames=_MIXTRAL_NAMES,
            defaults={"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072},
        ),
        HFFamily(
            "qwen2_moe",
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            qkv_bias_key="qkv_bias",
            head_dim_key=False,
            sliding_window="qwen",
            moe="qwen",
            renames=_QWEN_MOE_NAMES + _SHARED_NAMES,
            defaults={"max_position_embeddings": 32768, "sliding_window": 0},
        ),
        HFFamily(
            "qwen3_moe",
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            fixed={"qk_norm": "head"},
            bias_key="attention_bias",
            sliding_window="qwen",
            moe="qwen",
            renames=_QWEN_MOE_NAMES,
            defaults={"max_position_embeddings": 32768},
        ),
        HFFamily(
            "olmoe",
            "olmoe",
            "OlmoeForCausalLM",
            fixed={"qk_norm": "full"},
            bias_key="attention_bias",
            head_dim_key=False,
            sliding_window=None,
            moe="olmoe",
            renames=_QWEN_MOE_NAMES,
            defaults={"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "router_aux_loss_coef": 0.01},
        ),
    )
}

# Features of other architectures, named in the error when their key shows up.
_KNOWN_UNSUPPORTED = {
    "attn_logit_softcapping": "attention soft-capping",
    "final_logit_softcapping": "final logit soft-capping",
    "kv_lora_rank": "multi-head latent attention (MLA)",
    "q_lora_rank": "multi-head latent attention (MLA)",
    "query_pre_attn_scalar": "a custom attention scale",
    "embedding_multiplier": "scaled embeddings",
    "logits_scaling": "scaled logits",
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
            key = min(self.left, key=lambda k: (k not in _KNOWN_UNSUPPORTED, k))
            if key in _KNOWN_UNSUPPORTED:
                raise ConfigError(f"{self.where}: {_KNOWN_UNSUPPORTED[key]} ({key}={self.hf[key]!r}) is not supported")
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


def _read_rope(r: _Reader, out: dict[str, Any], default_theta: float) -> None:
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
    out["rope_theta"] = float(sub.take("rope_theta", default_theta))
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


def model_config_from_hf(hf: dict[str, Any]) -> tuple[ModelConfig, MoEConfig]:
    """meshweave's model and MoE sections for a HF ``config.json`` dict (the MoE section is dense,
    ``num_experts = 0``, for dense families); ConfigError for anything that would change the
    forward pass and that meshweave does not implement."""
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
        norm_eps=float(r.take("rms_norm_eps", family.default("rms_norm_eps"))),
        max_seq_len=int(r.take("max_position_embeddings", family.default("max_position_embeddings"))),
        tie_embeddings=bool(r.take("tie_word_embeddings", family.default("tie_word_embeddings"))),
        init_std=float(hf.get("initializer_range") or 0.02),
        hf_family=family.name,
        **family.fixed,
    )
    head_dim = int(r.take("head_dim", 0)) if family.head_dim_key else 0
    out["head_dim"] = 0 if head_dim in (0, dim // heads) and dim % heads == 0 else head_dim
    if family.bias_key:
        r.expect(family.bias_key, lambda v: v is False, "no attention biases in this family")
    if family.qkv_bias_key:
        out["qkv_bias"] = bool(r.take(family.qkv_bias_key, True))
    r.expect("mlp_bias", lambda v: v is False, "bias-free MLPs")
    r.expect("hidden_act", lambda v: v == "silu", "SwiGLU with silu")
    r.expect("attention_dropout", lambda v: v == 0.0, "attention without dropout")
    r.expect(
        "layer_types",
        lambda v: set(v) <= {"full_attention", "sliding_attention"},
        "full and sliding-window attention layers",
    )
    _read_rope(r, out, family.default("rope_theta"))
    if family.sliding_window:
        window = r.take("sliding_window", family.default("sliding_window"))
        asked = r.take("use_sliding_window", family.default("use_sliding_window"))
        enabled = asked if family.sliding_window == "qwen" else True  # only Qwen's switch is read by HF
        out["sliding_window"] = int(window) if window and enabled else 0
    moe = _read_moe(r, family, out["ffn_dim"]) if family.moe else MoEConfig()
    r.finish()
    return ModelConfig(**out), moe


def _read_moe(r: _Reader, family: HFFamily, ffn_dim: int) -> MoEConfig:
    """The MoE section of a Mixtral, Qwen-MoE or OLMoE config. Routing is softmax over all experts,
    top-k, dropless; HF trains with a load-balancing loss and no z-loss, so the import does too."""
    r.expect("output_router_logits", lambda v: True, "")  # whether HF returns router logits
    moe: dict[str, Any] = dict(
        top_k=int(r.require("num_experts_per_tok")),
        score="softmax",
        aux_loss_coeff=float(r.take("router_aux_loss_coef", family.default("router_aux_loss_coef"))),
        z_loss_coeff=0.0,
    )
    if family.moe == "mixtral":
        r.expect("router_jitter_noise", lambda v: v == 0.0, "routing without jitter noise")
        return MoEConfig(
            num_experts=int(r.require("num_local_experts")), expert_ffn_dim=ffn_dim, renormalize=True, **moe
        )
    experts = r.take("num_experts") or r.require("num_local_experts")
    if family.moe == "olmoe":  # every layer is MoE, its experts as wide as intermediate_size
        r.expect("clip_qkv", lambda v: False, "attention without q/k/v clipping")
        renormalize = bool(r.take("norm_topk_prob", family.default("norm_topk_prob")))
        return MoEConfig(num_experts=int(experts), expert_ffn_dim=ffn_dim, renormalize=renormalize, **moe)
    r.expect("mlp_only_layers", lambda v: not v, "MoE layers chosen by decoder_sparse_step only")
    expert_ffn = int(r.require("moe_intermediate_size"))
    shared = 0
    if family.name == "qwen2_moe":
        width = int(r.take("shared_expert_intermediate_size", 0))
        if width % expert_ffn:
            raise ConfigError(
                f"{r.where}: shared_expert_intermediate_size={width} is not a multiple of "
                f"moe_intermediate_size={expert_ffn} (meshweave's shared experts are whole experts)"
            )
        shared = width // expert_ffn
    return MoEConfig(
        num_experts=int(experts),
        expert_ffn_dim=expert_ffn,
        every=int(r.take("decoder_sparse_step", family.default("decoder_sparse_step"))),
        renormalize=bool(r.take("norm_topk_prob", family.default("norm_topk_prob"))),
        shared_experts=shared,
        shared_expert_gate=shared > 0,
        **moe,
    )


def hf_config_from_model(cfg: ModelConfig, moe: MoEConfig | None = None) -> dict[str, Any]:
    """The ``config.json`` dict of ``cfg.hf_family``; ConfigError for a feature it cannot express."""
    family = FAMILIES[cfg.hf_family]
    moe = moe or MoEConfig()
    for key, value in family.fixed.items():
        if getattr(cfg, key) != value:
            raise ConfigError(f"model.{key}={getattr(cfg, key)}: {family.architecture} always has {key}={value}")
    for key, off in (("qkv_bias", False), ("qk_norm", "none")):
        expressible = key in family.fixed or (key == "qkv_bias" and family.qkv_bias_key)
        if getattr(cfg, key) != off and not expressible:
            raise ConfigError(f"model.{key}: {family.architecture} cannot express it; export with another hf_family")
    if cfg.head_dim and not family.head_dim_key:
        raise ConfigError(f"model.head_dim={cfg.head_dim}: {family.architecture} has no head_dim setting")
    if cfg.ladder_residual:
        raise ConfigError(f"model.ladder_residual: {family.architecture} has no ladder residual stream")
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
    if family.qkv_bias_key:
        hf[family.qkv_bias_key] = cfg.qkv_bias
    if family.name == "llama":
        hf["mlp_bias"] = False
    if family.sliding_window:
        hf["sliding_window"] = cfg.sliding_window or None
    if family.sliding_window == "qwen":
        hf["use_sliding_window"] = bool(cfg.sliding_window)
    return hf | _moe_keys(family, cfg, moe)


def _moe_keys(family: HFFamily, cfg: ModelConfig, moe: MoEConfig) -> dict[str, Any]:
    """The MoE keys of ``family``'s config.json; ConfigError for a MoE feature it cannot express."""
    if not family.moe:
        if moe.num_experts:
            raise ConfigError(
                f"moe.num_experts={moe.num_experts}: {family.architecture} is dense; export as an MoE family"
            )
        return {}
    if not moe.num_experts:
        raise ConfigError(f"model.hf_family={family.name} is an MoE family but moe.num_experts=0")
    unsupported = {
        "score": moe.score != "softmax",
        "bias_balancing": moe.bias_balancing,
        "low_dim": moe.low_dim > 0,
        "shared_experts": bool(moe.shared_experts) != (family.name == "qwen2_moe"),
        "shared_expert_gate": moe.shared_expert_gate != (family.name == "qwen2_moe"),
        "renormalize": family.moe == "mixtral" and not moe.renormalize,
        "every": family.moe in ("mixtral", "olmoe") and moe.every != 1,
        "expert_ffn_dim": family.moe in ("mixtral", "olmoe") and moe.expert_ffn_dim != cfg.ffn_dim,
    }
    for key, bad in unsupported.items():
        if bad:
            raise ConfigError(f"moe.{key}={getattr(moe, key)!r}: {family.architecture} cannot express it")
    keys: dict[str, Any] = {"num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_coeff}
    if family.moe == "mixtral":
        return keys | {"num_local_experts": moe.num_experts, "router_jitter_noise": 0.0}
    if family.moe == "olmoe":
        return keys | {"num_experts": moe.num_experts, "norm_topk_prob": moe.renormalize, "clip_qkv": None}
    keys |= {
        "num_experts": moe.num_experts,
        "moe_intermediate_size": moe.expert_ffn_dim,
        "decoder_sparse_step": moe.every,
        "norm_topk_prob": moe.renormalize,
        "mlp_only_layers": [],
    }
    if family.name == "qwen2_moe":
        keys["shared_expert_intermediate_size"] = moe.shared_experts * moe.expert_ffn_dim
    return keys


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


def read_hf_config(hf_dir: str | Path) -> tuple[ModelConfig, MoEConfig]:
    """The model and MoE sections of a HF model directory's ``config.json``."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    return model_config_from_hf(json.loads(path.read_text()))


def hf_names(family: HFFamily, name: str, num_experts: int) -> tuple[list[str], bool]:
    """The HF tensor names meshweave parameter ``name`` is made of, and whether they are experts
    stacked on dim 0 in expert order: the family's ``renames`` inside a block, then the model
    family's ``hf_name`` (models/family.py) for the prefix."""
    renamed = name
    if name.startswith("layers."):  # layers.<i>.<block-relative name>
        index, _, rest = name.removeprefix("layers.").partition(".")
        renamed = f"layers.{index}.{dict(family.renames).get(rest, rest)}"
    base = Transformer.family.hf_name(renamed)
    if "{e}" in base:
        return [base.format(e=e) for e in range(num_experts)], True
    return [base], False
