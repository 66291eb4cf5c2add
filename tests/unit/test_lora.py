"""LoRA in one process: the adapter's math, init and names are peft's; only adapters train;
``[lora]`` mistakes fail as one-line ConfigErrors."""

import math

import pytest
import torch
from torch import nn

from meshweave.checkpoint.adapters import peft_config, peft_name
from meshweave.config import Config, ConfigError, LoRAConfig, ModelConfig, MoEConfig
from meshweave.models.llama import build_model
from meshweave.models.lora import (
    LoRALinear,
    apply_lora,
    count_parameters,
    freeze_base,
    is_adapter,
    lora_init_value,
    merged_weight,
)
from meshweave.parallel.parallelize import materialize
from meshweave.validation import validate

SMALL = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=50)


def _lora_model(lora: LoRAConfig, seed: int = 0) -> nn.Module:
    model = build_model(SMALL)
    apply_lora(model.layers.values(), lora)
    freeze_base(model)
    materialize(model, torch.device("cpu"), seed)
    return model


def _trained_like(layer: LoRALinear) -> None:
    """Give B nonzero values, as training would (it starts at zero)."""
    with torch.no_grad():
        layer.lora_B.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))


def test_forward_is_base_plus_scaled_low_rank_update():
    layer = LoRALinear(8, 6, bias=True, rank=2, alpha=5.0, dropout=0.0)
    _trained_like(layer)
    x = torch.randn(3, 8)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ layer.weight.T + layer.bias + (x @ a.T @ b.T) * (5.0 / 2)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_forward_equals_peft_lora_linear_on_the_same_weights():
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import Linear as PeftLinear

    layer = LoRALinear(8, 6, bias=False, rank=4, alpha=16.0, dropout=0.0)
    _trained_like(layer)
    base = nn.Linear(8, 6, bias=False)
    base.weight.data.copy_(layer.weight.data)
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0)
    theirs = PeftLinear(base, "default", config, r=4, lora_alpha=16, lora_dropout=0.0)
    theirs.lora_A["default"].weight.data.copy_(layer.lora_A.weight.data)
    theirs.lora_B["default"].weight.data.copy_(layer.lora_B.weight.data)
    x = torch.randn(5, 8)
    assert torch.equal(layer(x), theirs(x))  # same ops in the same order: bit-equal


def test_adapted_model_starts_equal_to_the_base():
    lora = _lora_model(LoRAConfig(rank=4, alpha=8))
    base = build_model(SMALL)
    materialize(base, torch.device("cpu"), 0)
    tokens = torch.randint(0, 50, (2, 10))
    assert torch.equal(lora(tokens), base(tokens))  # B = 0: the update is exactly zero


def test_init_of_a_is_peft_kaiming_bound_and_deterministic():
    shape = torch.Size([8, 400])
    a = lora_init_value("layers.0.self_attn.q_proj.lora_A.weight", shape, seed=3)
    # kaiming_uniform_(a=sqrt(5)) on [r, in]: bound = gain * sqrt(3 / in) = 1 / sqrt(in)
    assert a.abs().max() <= 1 / math.sqrt(400) and a.abs().max() > 0.9 / math.sqrt(400)
    assert torch.equal(a, lora_init_value("layers.0.self_attn.q_proj.lora_A.weight", shape, seed=3))
    assert not torch.equal(a, lora_init_value("layers.1.self_attn.q_proj.lora_A.weight", shape, seed=3))
    assert not lora_init_value("layers.0.self_attn.q_proj.lora_B.weight", shape, seed=3).any()


def test_targets_choose_the_projections_and_only_adapters_require_grad():
    model = _lora_model(LoRAConfig(rank=2, targets="q,down"))
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert adapted == [
        "layers.0.mlp.down_proj",
        "layers.0.self_attn.q_proj",
        "layers.1.mlp.down_proj",
        "layers.1.self_attn.q_proj",
    ]
    assert all(p.requires_grad == is_adapter(n) for n, p in model.named_parameters())
    trainable, total = count_parameters(model)
    # per layer: q (32 -> 32) and down (64 -> 32), each r x in + out x r
    assert trainable == 2 * (2 * 32 + 32 * 2 + 2 * 64 + 32 * 2)
    assert total == sum(p.numel() for p in build_model(SMALL).parameters()) + trainable


def test_backward_leaves_gradients_on_adapters_only():
    model = _lora_model(LoRAConfig(rank=2, alpha=4))
    for m in model.modules():
        if isinstance(m, LoRALinear):
            _trained_like(m)
    model(torch.randint(0, 50, (2, 10))).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == is_adapter(name), name
        if ".lora_A." in name:
            assert p.grad.abs().max() > 0, name


def test_bf16_base_keeps_adapters_fp32_and_computes_in_the_input_dtype():
    model = _lora_model(LoRAConfig(rank=2, base_dtype="bf16"))
    q = model.layers["0"].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.weight.dtype == torch.float32
    assert model(torch.randint(0, 50, (1, 6))).dtype == torch.float32


def test_merged_weight_computes_the_adapted_linear():
    layer = LoRALinear(8, 6, bias=False, rank=2, alpha=3.0, dropout=0.0)
    _trained_like(layer)
    x = torch.randn(4, 8)
    merged = merged_weight(layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    torch.testing.assert_close(x @ merged.T, layer(x), rtol=1e-6, atol=1e-6)


def test_names_map_onto_peft_saved_names():
    assert (
        peft_name("layers.3.self_attn.q_proj.lora_A.weight", "llama")
        == "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    )
    assert peft_name("layers.0.mlp.down_proj.lora_B.weight", "qwen2").endswith(
        "model.layers.0.mlp.down_proj.lora_B.weight"
    )
    config = peft_config(LoRAConfig(rank=8, alpha=16, targets="q,v,gate"), "hf/tiny")
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 16, False)
    assert config["target_modules"] == ["q_proj", "v_proj", "gate_proj"]


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"rank": -1}, "lora.rank"),
        ({"rank": 4, "alpha": 0.0}, "lora.alpha"),
        ({"rank": 4, "dropout": 1.0}, "lora.dropout"),
        ({"rank": 4, "targets": "q,lm_head"}, "lora.targets"),
        ({"rank": 4, "targets": ""}, "lora.targets"),
    ],
)
def test_invalid_lora_settings_name_the_key(overrides, key):
    cfg = Config(lora=LoRAConfig(**overrides))
    with pytest.raises(ConfigError, match=key) as err:
        validate(cfg, world_size=1)
    assert "\n" not in str(err.value)


def test_adapters_on_experts_are_refused():
    cfg = Config(lora=LoRAConfig(rank=4, targets="q,gate"), moe=MoEConfig(num_experts=4))
    with pytest.raises(ConfigError, match="lora.targets.*experts"):
        validate(cfg, world_size=1)
    validate(Config(lora=LoRAConfig(rank=4, targets="q,k,v,o"), moe=MoEConfig(num_experts=4)), world_size=1)


def test_lora_base_dtype_choices_are_checked():
    with pytest.raises(ConfigError, match="lora.base_dtype"):
        validate(Config(lora=LoRAConfig(rank=4, base_dtype="fp16")), world_size=1)


def test_init_from_a_checkpoint_with_trained_adapters_is_refused_not_silently_dropped(tmp_path):
    """init_from loads a base only: a LoRA checkpoint's adapters would vanish; resume or merge instead."""
    import json

    from meshweave.checkpoint.hf import check_init_from
    from meshweave.checkpoint.manager import MANIFEST
    from meshweave.config import ConfigError
    from meshweave.validation import resolve

    ckpt = tmp_path / "step-3"
    ckpt.mkdir()
    (ckpt / MANIFEST).write_text(json.dumps({"lora": {"rank": 8, "alpha": 16.0, "base": "hf/model"}}))
    for rank in (0, 8):
        cfg = resolve(None, [f"--out={tmp_path}", f"--checkpoint.init_from={ckpt}", f"--lora.rank={rank}"], 1)
        with pytest.raises(ConfigError, match="holds trained LoRA adapters.*--merge-lora"):
            check_init_from(cfg)
