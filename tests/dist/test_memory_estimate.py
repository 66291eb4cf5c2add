"""``meshweave train --dry-run``'s memory estimate against what a real training step holds.

Each layout trains two steps through the real CLI with ``log.tensor_memory=true``, which records
every rank's peak of live tensor bytes (metrics/tensor_memory.py; the CPU's RSS would add a
300-450 MB interpreter baseline). The second step is the first with optimizer state, so the
run's peak is a steady-state step's. The model is sized so that activations (~150 MB at one
process) and parameters plus AdamW state (~40 MB) dwarf everything else.

Tolerance: the issue asks for 25%; the estimate itemises the step's tensors (per-layer saved
tensors checked exactly in tests/unit/test_memory.py), and lands within 6% of these measurements,
so 15% holds it to that while leaving room for what it does not itemise (backward working sets,
pipeline, FSDP and expert all-to-all buffers, routing imbalance under EP), which moves with torch's
kernels and the router.
"""

import pytest

from meshweave.parallel.dims import resolve_degrees
from meshweave.parallel.memory import estimate
from meshweave.validation import resolve
from tests.parity import TINY, train_run

pytestmark = pytest.mark.dist
TOLERANCE = 0.15
MODEL = [
    "--model.dim=256",
    "--model.n_layers=4",
    "--model.n_heads=8",
    "--model.n_kv_heads=4",
    "--model.ffn_dim=640",
    "--model.vocab_size=1024",
    "--train.seq_len=256",
    "--train.global_batch=8",
]


@pytest.mark.parametrize(
    "nproc, layout",
    [
        pytest.param(1, [], id="one-process"),
        pytest.param(2, ["--parallel.dp_shard=2", "--parallel.activation_checkpointing=true"], id="fsdp2-ac"),
        pytest.param(2, ["--parallel.tp=2", "--parallel.dp_shard=1"], id="tp2"),
        pytest.param(2, ["--parallel.pp=2", "--parallel.dp_shard=1"], id="pp2"),
        pytest.param(
            2,
            ["--parallel.dp_shard=2", "--parallel.ep=2", "--moe.num_experts=4", "--moe.expert_ffn_dim=320"],
            id="moe-ep2",
        ),
        # bf16 parameters: bf16 matmuls are slow on CPU, so one sequence per rank
        pytest.param(
            2,
            ["--parallel.dp_shard=2", "--parallel.mixed_precision=bf16", "--train.global_batch=2"],
            id="fsdp2-bf16",
        ),
        # LoRA: gradients and AdamW state for the adapters only
        pytest.param(2, ["--parallel.dp_shard=2", "--lora.rank=8"], id="fsdp2-lora"),
    ],
)
def test_estimated_peak_is_within_tolerance_of_the_measured_tensor_peak(tmp_path, nproc, layout):
    args = [*TINY, *MODEL, *layout]
    records = train_run(tmp_path / "run", nproc, *args, "--log.tensor_memory=true", steps=2)
    measured = records[-1]["mem_tensor_peak_bytes"]

    cfg = resolve(None, args, world_size=nproc)
    dims = resolve_degrees(cfg, nproc)
    kinds = estimate(cfg, dims)
    per_stage = nproc // dims.pp  # pp is the slowest mesh dim: ranks [i * per_stage, ...) are stage i
    for rank, peak in enumerate(measured):
        estimated = kinds[rank // per_stage].peak
        assert abs(estimated - peak) <= TOLERANCE * peak, (
            f"rank {rank}: estimated {estimated / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB"
        )
