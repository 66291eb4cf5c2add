"""Each Hugging Face family in and out: tiny models built here by transformers (random init,
``save_pretrained``, nothing downloaded), imported, compared against transformers' own forward.

Tolerance: logits within 1e-5 relative to their largest magnitude (fp32). Both sides run the same
ops on the same weights, so what is left is kernel-order rounding (~1e-6 here); ``init_std`` 0.1
makes attention far from uniform, so a wrong rotary table, a swapped head or a dropped bias
shows at 1e-2 or more. Import -> export is bit-exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from meshweave.checkpoint.hf import export_hf, import_hf
from meshweave.config import ConfigError, ModelConfig, MoEConfig
from meshweave.models import from_pretrained
from meshweave.models.hf_config import hf_config_from_model, model_config_from_hf, read_hf_config
from tests.hf_models import CASES, save_tiny

transformers = pytest.importorskip("transformers")

# Odd widths on purpose: 6 heads of 10 over 2 KV heads, an FFN of 84, a vocabulary of 97.
SHAPE = dict(
    hidden_size=60,
    intermediate_size=84,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    vocab_size=97,
    max_position_embeddings=128,
)


def _save_tiny(case: str, path: Path) -> torch.nn.Module:
    return save_tiny(case, path, **SHAPE)


def _tokens(seq: int = 40) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=sorted(CASES))
def imported(request, tmp_path_factory):
    """(case, transformers model, its directory, the meshweave checkpoint imported from it)."""
    root = tmp_path_factory.mktemp(request.param)
    hf = _save_tiny(request.param, root / "hf")
    return request.param, hf, root, import_hf(root / "hf", root / "imported")


def test_imported_logits_equal_transformers(imported):
    _, hf, _, ckpt = imported
    tokens = _tokens()
    with torch.no_grad():
        assert _rel(from_pretrained(ckpt)(tokens), hf(tokens).logits) <= 1e-5


def test_export_loads_in_transformers_with_equal_logits(imported):
    case, _, root, ckpt = imported
    exported = export_hf(ckpt, root / f"exported-{case}")
    reloaded = getattr(transformers, CASES[case][1]).from_pretrained(exported).eval()
    tokens = _tokens(24)
    with torch.no_grad():
        assert _rel(from_pretrained(ckpt)(tokens), reloaded(tokens).logits) <= 1e-5


def test_import_then_export_is_bit_exact(imported):
    case, _, root, ckpt = imported
    from safetensors.torch import load_file

    exported = export_hf(ckpt, root / f"roundtrip-{case}")
    original, again = load_file(root / "hf" / "model.safetensors"), load_file(exported / "model.safetensors")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    assert read_hf_config(exported) == read_hf_config(root / "hf")


def test_the_feature_under_test_reaches_the_config(imported):
    case, _, root, _ = imported
    model, moe = read_hf_config(root / "hf")
    expected = {
        "llama": {"model.hf_family": "llama"},
        "llama-tied": {"model.tie_embeddings": True},
        "llama3.1-rope": {"model.rope_scaling": "llama3", "model.rope_theta": 500000.0, "model.rope_factor": 8.0},
        "llama-linear-rope": {"model.rope_scaling": "linear", "model.rope_factor": 4.0},
        "llama-yarn-rope": {"model.rope_scaling": "yarn", "model.rope_original_max_len": 32},
        "mistral": {"model.hf_family": "mistral", "model.sliding_window": 4096},
        "qwen2": {"model.qkv_bias": True, "model.hf_family": "qwen2"},
        "qwen2-tied": {"model.qkv_bias": True, "model.tie_embeddings": True},
        "qwen3": {"model.qk_norm": "head", "model.head_dim": 24, "model.hf_family": "qwen3"},
        "qwen3-tied": {"model.qk_norm": "head", "model.tie_embeddings": True},
        "llama3.2": {"model.rope_scaling": "llama3", "model.tie_embeddings": True},
        "mixtral": {"moe.num_experts": 4, "moe.top_k": 2, "moe.renormalize": True, "moe.expert_ffn_dim": 84},
        "qwen2_moe": {
            "model.qkv_bias": True,
            "moe.every": 2,
            "moe.shared_experts": 2,
            "moe.shared_expert_gate": True,
            "moe.renormalize": False,
        },
        "qwen3_moe": {"model.qk_norm": "head", "moe.renormalize": True, "moe.expert_ffn_dim": 32},
        "olmoe": {"model.qk_norm": "full", "moe.num_experts": 4, "moe.renormalize": False, "moe.expert_ffn_dim": 84},
    }[case]
    sections = {"model": model, "moe": moe}
    assert {k: getattr(sections[k.split(".")[0]], k.split(".")[1]) for k in expected} == expected


def test_a_dense_family_imports_a_dense_model(imported):
    case, _, root, _ = imported
    if case in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        assert read_hf_config(root / "hf")[1].num_experts == 4
    else:
        assert read_hf_config(root / "hf")[1] == MoEConfig()


# ------------------------------------------------------------------------------------------------
# config translation: what is not understood is an error


def _llama_json(**changes) -> dict:
    hf = json.loads(transformers.LlamaConfig(**SHAPE).to_json_string())
    return {**hf, **changes}


def test_rope_theta_under_rope_parameters_is_read():
    hf = _llama_json(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert model_config_from_hf(hf)[0].rope_theta == 500000.0


def test_legacy_top_level_rope_theta_and_rope_scaling_are_read():
    hf = _llama_json(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    hf.pop("rope_parameters")
    cfg, _ = model_config_from_hf(hf)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor) == (500000.0, "linear", 2.0)


HF_CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "olmoe": "OlmoeConfig",
}


@pytest.mark.parametrize("family", sorted(HF_CONFIG_CLASSES))
def test_a_key_left_out_of_config_json_takes_the_value_transformers_assumes(family):
    """Saved configs usually carry every key, but a hand-written or trimmed one must not import
    with another family's default (Mixtral's rope_theta is 1e6, OLMoE's rms_norm_eps 1e-5, ...)."""
    from meshweave.models.hf_config import _DEFAULTS, FAMILIES

    hf = getattr(transformers, HF_CONFIG_CLASSES[family])()
    for key in _DEFAULTS:
        want = hf.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(hf, key, None)
        if want is None and not hasattr(hf, key):
            continue  # not a key of this family
        assert FAMILIES[family].default(key) == want, key


def test_a_mixtral_config_without_rope_theta_imports_theta_1e6():
    hf = json.loads(transformers.MixtralConfig(**SHAPE, num_local_experts=4).to_json_string())
    hf.pop("rope_parameters", None)
    hf.pop("rope_theta", None)
    assert model_config_from_hf(hf)[0].rope_theta == 1e6


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"some_new_switch": True}, "some_new_switch"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"attn_logit_softcapping": 50.0}, "attention soft-capping"),
        ({"kv_lora_rank": 512}, "latent attention"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope": [1]}}, "mrope"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial"),
        ({"model_type": "gemma2"}, "gemma2"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_key_that_changes_the_math_and_is_not_understood_is_a_one_line_error(changes, key):
    with pytest.raises(ConfigError, match=key) as err:
        model_config_from_hf(_llama_json(**changes))
    assert "\n" not in str(err.value)


def test_export_refuses_a_feature_the_family_cannot_express():
    with pytest.raises(ConfigError, match="qk_norm"):
        hf_config_from_model(ModelConfig(qk_norm="head", hf_family="llama"))


def test_sliding_window_shorter_than_seq_len_is_rejected_before_launch():
    from meshweave.config import Config
    from meshweave.validation import validate

    cfg = Config()
    cfg.model.sliding_window = cfg.train.seq_len - 1
    with pytest.raises(ConfigError, match="sliding-window"):
        validate(cfg, world_size=1)


# ------------------------------------------------------------------------------------------------
# sharded checkpoints


def test_export_in_shards_writes_an_index_that_transformers_and_the_import_read(tmp_path):
    from safetensors.torch import load_file

    hf = _save_tiny("qwen2_moe", tmp_path / "hf")
    ckpt = import_hf(tmp_path / "hf", tmp_path / "imported")
    out = export_hf(ckpt, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert all(load_file(out / f).keys() == {k for k, v in index["weight_map"].items() if v == f} for f in files)
    reloaded = transformers.Qwen2MoeForCausalLM.from_pretrained(out).eval()
    again = import_hf(out, tmp_path / "reimported")
    tokens = _tokens(24)
    with torch.no_grad():
        assert _rel(reloaded(tokens).logits, hf(tokens).logits) <= 1e-5
        assert torch.equal(from_pretrained(again)(tokens), from_pretrained(ckpt)(tokens))


def test_max_shard_size_reads_decimal_units():
    from meshweave.cli import _byte_size

    assert [_byte_size(s) for s in ("5GB", "500MB", "1.5kb", "1024")] == [5 * 10**9, 5 * 10**8, 1500, 1024]


def test_fill_from_hf_gives_a_rank_holding_some_experts_exactly_those(tmp_path):
    from meshweave.checkpoint.hf import fill_from_hf, load_hf_weights
    from meshweave.models.llama import build_model
    from meshweave.models.moe import Experts

    _save_tiny("qwen3_moe", tmp_path / "hf")
    model_cfg, moe = read_hf_config(tmp_path / "hf")
    model = build_model(model_cfg, "cpu", moe=moe)
    for m in model.modules():
        if isinstance(m, Experts):
            m.keep(2, 2)  # what expert parallelism leaves the second of two ranks
    fill_from_hf(model, tmp_path / "hf")
    full = load_hf_weights(tmp_path / "hf")
    for name, p in model.named_parameters():
        expected = full[name][2:4] if ".experts." in name else full[name]
        assert torch.equal(p, expected), name


def test_the_streaming_writer_writes_what_safetensors_reads_back(tmp_path):
    from safetensors.torch import load_file

    from meshweave.checkpoint.safetensors_stream import SafetensorsWriter

    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7, dtype=torch.int64), "c": torch.ones(2, 2, 2)}
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(tmp_path / "x.safetensors", layout, {"format": "pt"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())


def test_the_streaming_writer_refuses_a_tensor_out_of_its_declared_layout(tmp_path):
    from meshweave.checkpoint.safetensors_stream import SafetensorsWriter

    with pytest.raises(ValueError, match="expected"):
        with SafetensorsWriter(tmp_path / "x.safetensors", [("a", torch.float32, (2,))], {}) as w:
            w.write("a", torch.ones(3))
