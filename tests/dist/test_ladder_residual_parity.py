"""Ladder Residual trains the same on every layout: tensor parallelism (where its point is that each
module's reduce-scatter is first needed after the next module), the pipeline (stages hand on the
stream and the pending output) and FSDP reproduce one process, 10 fp32 steps within 1e-4."""

import pytest

from tests.parity import assert_losses_match, losses

pytestmark = pytest.mark.dist
STEPS = 10
LADDER = "--model.ladder_residual=true"


@pytest.fixture(scope="module")
def reference(reference_run):
    return losses(reference_run(1, LADDER, steps=STEPS))


def test_the_ladder_is_not_the_standard_block(reference, reference_run):
    standard = losses(reference_run(1, steps=STEPS))
    assert max(abs(a - b) / a for a, b in zip(reference, standard)) > 1e-3


@pytest.mark.parametrize(
    "nproc,layout",
    [
        pytest.param(2, ["--parallel.tp=2"], id="tp2"),
        pytest.param(2, ["--parallel.pp=2", "--parallel.pp_microbatches=4"], id="pp2"),
        pytest.param(4, ["--parallel.tp=2", "--parallel.dp_shard=2"], id="tp2-fsdp2"),
    ],
)
def test_ladder_residual_layout_matches_one_process(reference_run, reference, nproc, layout):
    assert_losses_match(reference, losses(reference_run(nproc, LADDER, *layout, steps=STEPS)), rtol=1e-4)
