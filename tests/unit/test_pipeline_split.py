"""Specification of the pipeline stage split (meshweave.parallel.stages): which layers each stage
holds and which stages each rank runs. Pure arithmetic on the config."""

from __future__ import annotations

import pytest

from meshweave.config import Config, ConfigError, ModelConfig
from meshweave.parallel.stages import check_pipeline, layer_cost, parse_layers, split_layers, stage_ids


def test_equal_layers_split_evenly_when_the_head_is_cheap():
    assert split_layers(ModelConfig(n_layers=8, vocab_size=320), 128, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_an_expensive_head_moves_layers_off_the_last_stage():
    model = ModelConfig(dim=64, n_layers=6, n_heads=4, n_kv_heads=4, ffn_dim=128, vocab_size=32000)
    assert 2 * model.dim * model.vocab_size > 2 * layer_cost(model, 64)  # the head costs > 2 layers
    stages = split_layers(model, 64, 2)
    assert len(stages[0]) > len(stages[1]) and sum(stages, []) == list(range(6))


def test_every_stage_gets_a_layer_and_the_split_is_contiguous():
    for n_stages in range(1, 8):
        stages = split_layers(ModelConfig(n_layers=7), 128, n_stages)
        assert all(stages) and sum(stages, []) == list(range(7))


def test_explicit_ranges_are_parsed_in_order():
    assert parse_layers("0-2,3,4-5", 6, 3) == [[0, 1, 2], [3], [4, 5]]


def test_loop_and_v_stage_orders():
    assert stage_ids(1, 4, 2, "interleaved_1f1b") == [1, 5]
    assert stage_ids(1, 4, 2, "zbv") == [1, 6]
    assert stage_ids(2, 4, 1, "1f1b") == [2]


def test_tied_embeddings_are_rejected_with_pipeline_parallelism():
    cfg = Config()
    cfg.parallel.pp, cfg.model.tie_embeddings = 2, True
    with pytest.raises(ConfigError, match="model.tie_embeddings"):
        check_pipeline(cfg, per_rank_batch=32)
