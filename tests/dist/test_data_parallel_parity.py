"""Every data-parallel layout reproduces the one-process loss trajectory (fp32, 20 steps).

Tolerance 1e-4 relative per step: the layouts sum the same per-token gradients in a different
order (all-reduce, reduce-scatter), so fp32 rounding differs by a few ulps per step and grows
slowly through 20 AdamW updates; a real bug (wrong normalisation, a missed bucket) shows as >1e-2.
"""

import pytest

from tests.parity import assert_losses_match, losses, train_run

pytestmark = pytest.mark.dist
STEPS = 20


@pytest.fixture(scope="module")
def reference(reference_run):
    return losses(reference_run(1, steps=STEPS))


def test_reference_loss_falls(reference):
    assert reference[-1] < reference[0] - 0.5


@pytest.mark.parametrize("layout", [
    pytest.param(["--parallel.dp_replicate=4", "--parallel.dp_shard=1"], id="replicate4"),
    pytest.param(["--parallel.dp_shard=4"], id="fsdp4"),
    pytest.param(["--parallel.dp_replicate=2", "--parallel.dp_shard=2"], id="hsdp2x2"),
    pytest.param(["--parallel.dp_replicate=4", "--parallel.dp_shard=1", "--train.micro_batch=1"],
                 id="replicate4-accumulate2"),
    pytest.param(["--parallel.dp_replicate=4", "--parallel.dp_shard=1", "--comm.overlap=false"],
                 id="replicate4-no-overlap"),
])
def test_four_process_layout_matches_one_process(tmp_path, reference, layout):
    assert_losses_match(reference, losses(train_run(tmp_path, 4, *layout, steps=STEPS)), rtol=1e-4)


def test_tied_embeddings_stay_tied_under_fsdp(tmp_path_factory):
    tied = ["--model.tie_embeddings=true"]
    reference = losses(train_run(tmp_path_factory.mktemp("tied1"), 1, *tied, steps=STEPS))
    sharded = losses(train_run(tmp_path_factory.mktemp("tied4"), 4, *tied, "--parallel.dp_shard=4", steps=STEPS))
    assert_losses_match(reference, sharded, rtol=1e-4)


def test_gradient_accumulation_in_one_process_matches(tmp_path, reference):
    assert_losses_match(reference, losses(train_run(tmp_path, 1, "--train.micro_batch=2", steps=STEPS)),
                        rtol=1e-4)
