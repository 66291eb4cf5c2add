"""``--train.compile=true`` (each decoder block compiled in place by inductor) trains like eager.

10 fp32 steps, 1e-5 relative per step: compiled blocks fuse the same ops, so only the rounding of
fused pointwise chains differs (observed <= 1e-7; a block that missed its compiled gradient or ran
twice would be off by far more). Checked where compile meets the rest of the stack: one process,
dp_shard2 with activation checkpointing (compiled blocks inside FSDP units, recomputation in
backward), HSDP 2x2, the pipeline (pp2), tp2 x dp_shard2 (TP's DTensor hooks and their
collectives traced into each block's forward and backward graphs), ring context parallelism and
expert-parallel MoE (both run eagerly between the compiled parts of a block: CP's attention
exchange and the token dispatch). With tp_overlap a compiled run is refused before launch: see
tests/unit/test_config.py.
"""

import pytest

from tests.parity import assert_losses_match, losses

pytestmark = pytest.mark.dist
STEPS = 10
COMPILE = "--train.compile=true"
TP_FSDP = ["--parallel.tp=2", "--parallel.dp_shard=2"]
MOE = ["--moe.num_experts=4", "--moe.top_k=2", "--moe.expert_ffn_dim=64", "--moe.shared_experts=1"]


@pytest.mark.parametrize(
    "nproc, layout, extra",
    [
        pytest.param(1, [], [], id="one-process"),
        pytest.param(2, ["--parallel.dp_shard=2"], ["--parallel.activation_checkpointing=true"], id="fsdp2-ac"),
        pytest.param(
            4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"], [], id="hsdp2x2"
        ),
        pytest.param(2, ["--parallel.pp=2"], [], id="pp2"),
        pytest.param(4, TP_FSDP, [], id="tp2-fsdp2"),
        pytest.param(2, ["--parallel.cp=2", "--parallel.cp_method=ring"], [], id="cp2-ring"),
        pytest.param(2, [*MOE, "--parallel.ep=2", "--parallel.dp_shard=2"], [], id="moe-ep2-fsdp2"),
    ],
)
def test_compiled_blocks_train_like_eager(reference_run, nproc, layout, extra):
    eager = losses(reference_run(nproc, *layout, steps=STEPS))
    compiled = losses(reference_run(nproc, *layout, *extra, COMPILE, steps=STEPS))
    assert_losses_match(eager, compiled, rtol=1e-5)


def test_the_ledger_counts_the_collectives_inside_compiled_blocks(reference_run):
    # The same runs as the tp2-fsdp2 case above. TP's gathers and reduce-scatters run inside the
    # compiled graphs, where no Python wrapper executes: each is booked by an op traced beside it,
    # so every step's bytes per <dim>/<op> equal eager's exactly.
    eager = reference_run(4, *TP_FSDP, steps=STEPS)
    compiled = reference_run(4, *TP_FSDP, COMPILE, steps=STEPS)
    assert [r["comm_bytes"] for r in compiled] == [r["comm_bytes"] for r in eager]
    assert compiled[-1]["comm_bytes"]["tp/all_gather"] > 0
