"""Training starts from an imported Hugging Face model the same way on every layout.

For each family, ``--checkpoint.init_from=HF_DIR`` onto tp2 x dp_shard2 (x ep2 for the MoE
families; and, for Qwen3, whose per-head q/k norms and independent head_dim are the most
layout-sensitive, onto pp2) follows one process's first 5 losses within 1e-4 relative (fp32;
the layouts differ by summation order only). A weight loaded onto the wrong shard, an expert
loaded onto the wrong rank, a q/k norm whose gradient is not summed over tp, or a bias sharded off
its heads shows within the first steps at > 1e-3. The router's aux loss is a per-micro-batch
objective, so an MoE family's one-process reference cuts the batch like the two data-parallel
ranks do (``micro_batch=4`` of 8): otherwise OLMoE's 0.01 aux coefficient alone moves step 2 by 1e-4.
"""

import pytest

from tests.hf_models import model_overrides, save_tiny
from tests.parity import assert_losses_match, losses, train_run

pytest.importorskip("transformers")
STEPS = 5
# The tiny model of tests/parity.py, so the family's weights fit its data and batch settings.
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=260,
    max_position_embeddings=256,
)


MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@pytest.fixture(scope="module", params=["llama3.1-rope", "mistral", "qwen2", "qwen3", *MOE])
def family(request, tmp_path_factory):
    """(case, the run options that start from its HF directory, one process's losses)."""
    root = tmp_path_factory.mktemp(request.param)
    save_tiny(request.param, root / "hf", **TINY_SHAPE)
    start = [*model_overrides(root / "hf"), f"--checkpoint.init_from={root / 'hf'}"]
    same_micro_batches = ["--train.micro_batch=4"] if request.param in MOE else []
    return request.param, start, losses(train_run(root / "one", 1, *start, *same_micro_batches, steps=STEPS))


def test_init_from_onto_tp2_fsdp2_follows_one_process(tmp_path, family):
    case, start, one = family
    layout = ["--parallel.tp=2", "--parallel.dp_shard=2", *(["--parallel.ep=2"] if case in MOE else [])]
    four = losses(train_run(tmp_path, 4, *start, *layout, steps=STEPS))
    assert_losses_match(one, four, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen3"], indirect=True)
def test_init_from_onto_pp2_follows_one_process(tmp_path, family):
    _, start, one = family
    two = losses(train_run(tmp_path, 2, *start, "--parallel.pp=2", steps=STEPS))
    assert_losses_match(one, two, rtol=1e-4)
