"""Specification of the MoE wiring that needs no process group: the ``[moe]`` section and its
validation, the presets, the model built from it, initial values, and how the aux loss enters
the gradient (meshweave.models.moe's auto-scaler, meshweave.parallel.parallelize's scale)."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch

from meshweave.config import Config, ConfigError
from meshweave.models.llama import FeedForward, build_model, init_value, num_params
from meshweave.models.moe import MoEFeedForward, aux_loss, moe_layers, set_aux_loss_scale
from meshweave.options import load_toml, to_toml
from meshweave.parallel.dims import resolve_degrees
from meshweave.parallel.parallelize import aux_loss_scale
from meshweave.validation import validate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def moe_config(**moe) -> Config:
    cfg = Config()
    cfg.model.dim, cfg.model.n_layers = 64, 4
    cfg.moe.num_experts, cfg.moe.expert_ffn_dim = 8, 32
    for key, value in moe.items():
        setattr(cfg.moe, key, value)
    return cfg


# --------------------------------------------------------------------------------------------
# config and validation


def test_moe_section_defaults_to_a_dense_model():
    assert Config().moe.num_experts == 0
    assert not Config().moe.enabled
    model = build_model(Config().model, moe=Config().moe)
    assert not moe_layers(model)


def test_moe_layers_take_the_moe_section_itself():
    cfg = moe_config(top_k=1, low_dim=16, score="sigmoid")
    settings = next(iter(moe_layers(build_model(cfg.model, moe=cfg.moe)))).settings
    assert settings is cfg.moe
    assert (settings.num_experts, settings.top_k, settings.low_dim, settings.score) == (8, 1, 16, "sigmoid")


def test_moe_section_round_trips_through_toml(tmp_path):
    cfg = moe_config(capacity_factor=1.25, bias_balancing=True, renormalize=True)
    (tmp_path / "run.toml").write_text(to_toml(cfg))
    assert load_toml(tmp_path / "run.toml") == cfg


@pytest.mark.parametrize(
    "field,value",
    [
        ("top_k", 9),
        ("low_dim", 64),
        ("every", 0),
        ("capacity_factor", -1.0),
        ("num_experts", -1),
        ("score", "relu"),
        ("dispatch_chunks", 0),
    ],
)
def test_invalid_moe_value_names_its_moe_key(field, value):
    cfg = moe_config(**{field: value})
    with pytest.raises(ConfigError, match=re.escape(f"moe.{field}")):
        validate(cfg, world_size=1)


@pytest.mark.parametrize(
    "world,parallel,message",
    [
        (4, {"ep": 2}, None),
        (4, {"ep": 4}, None),
        (4, {"ep": 3}, "does not divide moe.num_experts=8"),
        (8, {"tp": 2, "ep": 8}, "does not divide dp_shard*cp=4"),
        (4, {"dp_shard": 1, "cp": 4, "ep": 2}, "needs FSDP"),
        (16, {"ep": 2}, "dp_shard*cp=16 must divide moe.num_experts=8"),
        (4, {"pp": 2, "ep": 2, "pp_schedule": "zbv", "pp_microbatches": 4}, "zero-bubble"),
    ],
)
def test_expert_parallel_degree_is_checked_against_experts_and_the_fsdp_dim(world, parallel, message):
    cfg = moe_config()
    cfg.train.global_batch = 16
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    if message is None:
        assert resolve_degrees(cfg, world).ep == parallel["ep"]
    else:
        with pytest.raises(ConfigError, match=re.escape(message)):
            resolve_degrees(cfg, world)


def test_presets_validate_and_mixtral_has_mixtrals_parameter_count():
    tiny = load_toml(CONFIGS / "tiny-moe.toml")
    validate(copy.deepcopy(tiny), world_size=1)
    tiny.parallel.ep = 2
    validate(tiny, world_size=4)
    mixtral = load_toml(CONFIGS / "mixtral-8x7b.toml")
    validate(mixtral, world_size=64)
    assert (mixtral.parallel.pp, mixtral.parallel.dp_shard, mixtral.parallel.ep) == (8, 8, 8)
    # 46.7B total (Mistral AI's figure), counted on the meta model
    assert num_params(build_model(mixtral.model, moe=mixtral.moe)) / 1e9 == pytest.approx(46.70, abs=0.01)


# --------------------------------------------------------------------------------------------
# the model


def test_every_kth_layer_is_moe_and_the_rest_stay_dense():
    cfg = moe_config(every=2)
    model = build_model(cfg.model, moe=cfg.moe)
    kinds = [type(layer.mlp) for layer in model.layers.values()]
    assert kinds == [FeedForward, MoEFeedForward, FeedForward, MoEFeedForward]


def test_moe_parameter_names_follow_hugging_face_moe_with_stacked_experts():
    cfg = moe_config(shared_experts=1, low_dim=16)
    model = build_model(cfg.model, moe=cfg.moe)
    names = {n for n, _ in model.named_parameters() if n.startswith("layers.0.")}
    assert {n for n in names if ".mlp." in n} == {
        "layers.0.mlp.gate.weight",
        *(f"layers.0.mlp.experts.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")),
        *(f"layers.0.mlp.shared_experts.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")),
        "layers.0.mlp.descend.weight",
        "layers.0.mlp.ascend.weight",
    }


@pytest.mark.parametrize(
    "name",
    [
        "layers.0.mlp.experts.down_proj.weight",
        "layers.0.mlp.shared_experts.down_proj.weight",
        "layers.0.mlp.ascend.weight",
    ],
)
def test_residual_writing_moe_weights_get_the_residual_init_scaling(name):
    cfg = moe_config().model
    shape = torch.Size((64, 512))
    # 32k samples: the sample std is within 1% of the true one; the scaling is sqrt(8) = 2.8x
    unscaled = init_value("layers.0.mlp.experts.up_proj.weight", shape, cfg, 0)
    ratio = unscaled.std() / init_value(name, shape, cfg, 0).std()
    assert float(ratio) == pytest.approx(math.sqrt(2 * cfg.n_layers), rel=0.03)


# --------------------------------------------------------------------------------------------
# the aux loss in the gradient


def test_aux_loss_scale_is_one_over_ranks_times_micro_batches():
    cfg = moe_config()
    cfg.train.global_batch = 16
    assert aux_loss_scale(resolve_degrees(copy.deepcopy(cfg), 1), cfg) == 1.0  # one micro-batch of 16
    cfg.train.micro_batch = 2
    assert aux_loss_scale(resolve_degrees(copy.deepcopy(cfg), 4), cfg) == 1 / (4 * 2)  # 4 ranks x 2 micro-steps
    cfg.train.micro_batch, cfg.parallel.cp = 0, 2
    assert aux_loss_scale(resolve_degrees(copy.deepcopy(cfg), 4), cfg) == 1 / (2 * 2)  # dp 2 x cp 2


def test_scaled_aux_loss_in_the_gradient_equals_adding_it_to_the_loss():
    # float64, same ops in a different association: agreement to 1e-12 (values O(1))
    torch.manual_seed(0)
    model = torch.nn.Sequential(MoEFeedForward(16, moe_config(expert_ffn_dim=8).moe)).double()
    x, probe = torch.randn(2, 6, 16, dtype=torch.float64), torch.randn(2, 6, 16, dtype=torch.float64)
    reference = copy.deepcopy(model)
    ((reference(x) * probe).sum() + 0.25 * aux_loss(reference)).backward()
    set_aux_loss_scale(model, 0.25)
    (model(x) * probe).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_the_aux_loss_leaves_evaluation_and_the_forward_value_alone():
    torch.manual_seed(0)
    moe = MoEFeedForward(16, moe_config(expert_ffn_dim=8).moe).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    plain = moe(x)
    set_aux_loss_scale(moe, 0.5)
    assert torch.equal(moe(x), plain)
    with torch.no_grad():
        assert moe(x).grad_fn is None
