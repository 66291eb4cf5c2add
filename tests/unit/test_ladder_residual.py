"""Specification of Ladder Residual (model.ladder_residual, models/llama.py).

Each module (attention, MLP, in order) reads the residual stream without the previous module's
output, which is added right after the module: ``y_m = f_m(h_{m-1})``, ``h_m = h_{m-1} + y_{m-1}``,
and the head sees ``h_M + y_M``. Checked against that formula written out by hand (fp32, same
ops in the same order: exact up to 1e-6 of the logits' scale), and as a different model from
the standard block (same weights, other logits).
"""

from __future__ import annotations

import dataclasses

import torch

from tests.unit.test_documents import tiny_model


def ladder_by_hand(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    h = model.embed_tokens(tokens)
    positions = torch.arange(tokens.shape[1])
    from meshweave.models.rope import rotary_tables

    cos, sin = rotary_tables(positions, *model.rope_table(positions.device), h.dtype)
    pending = torch.zeros_like(h)
    for layer in model.layers.values():
        out = layer.self_attn(layer.input_layernorm(h), cos=cos, sin=sin)
        h, pending = h + pending, out
        out = layer.mlp(layer.post_attention_layernorm(h))
        h, pending = h + pending, out
    return model.lm_head(model.norm(h + pending))


def ladder(model: torch.nn.Module) -> torch.nn.Module:
    model.cfg = dataclasses.replace(model.cfg, ladder_residual=True)
    return model


def test_each_module_reads_the_stream_without_the_previous_output():
    model = ladder(tiny_model(n_layers=3))
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(tokens), ladder_by_hand(model, tokens)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_the_ladder_is_another_model_than_the_standard_block():
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        standard = tiny_model()(tokens)
        laddered = ladder(tiny_model())(tokens)
    assert (standard - laddered).abs().max() > 1e-3 * standard.abs().max()


def test_a_pipeline_stage_hands_on_the_stream_and_the_pending_output():
    """Stage 1 of 2 (embedding + layer 0) returns [2, b, s, dim]; stage 2 finishes to the same logits."""
    model = ladder(tiny_model())
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model(tokens)
        first, second = ladder(tiny_model()), ladder(tiny_model())
        first.norm, first.lm_head = None, None
        del first.layers["1"]
        second.embed_tokens = None
        del second.layers["0"]
        second.rope_positions = torch.arange(16)
        between = first(tokens)
        assert between.shape == (2, 2, 16, 64)
        staged = second(between)
    assert (staged - whole).abs().max() <= 1e-6 * whole.abs().max()
