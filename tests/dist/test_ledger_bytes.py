"""The ledger's data-parallel bytes per step equal the analytical ring all-reduce volume.

Analytical: each of n ranks sends 2(n-1)/n x the gradient bytes per all-reduce. The ledger must
match within 5% (the issue's bound); in fact it is exact, because every gradient byte goes
through the bucketed reducer once per step — a missed bucket or a double launch would be off by
a whole bucket.
"""

import pytest

from tests.parity import TINY, train_run
from meshweave.config import Config
from meshweave.options import parse_overrides
from meshweave.models.llama import build_model, num_params

pytestmark = pytest.mark.dist


def _tiny_param_count() -> int:
    cfg = parse_overrides([a for a in TINY if a.startswith("--model.")], Config())
    return num_params(build_model(cfg.model))


@pytest.mark.parametrize("bucket_mb", [25.0, 0.05])
def test_replicated_gradient_bytes_match_ring_all_reduce_volume(tmp_path, bucket_mb):
    n = 4
    records = train_run(tmp_path, n, "--parallel.dp_replicate=4", "--parallel.dp_shard=1",
                        f"--comm.bucket_mb={bucket_mb}", steps=3)
    expected = 2 * (n - 1) / n * 4 * _tiny_param_count()
    for record in records:
        measured = record["comm_bytes"]["dp_replicate/all_reduce"]
        assert abs(measured - expected) / expected <= 0.05, (measured, expected)


def test_single_process_run_records_no_gradient_traffic(tmp_path):
    records = train_run(tmp_path, 1, steps=2)
    assert all(sum(r["comm_bytes"].values()) == 0 for r in records)
    assert records[-1]["comm_bytes_total"] == 0


def _padded_param_bytes(shards: int) -> int:
    """fp32 bytes of all parameters with dim 0 padded to a multiple of ``shards`` (FSDP2's layout)."""
    cfg = parse_overrides([a for a in TINY if a.startswith("--model.")], Config())
    total = 0
    for p in build_model(cfg.model).parameters():
        rows = -(-p.shape[0] // shards) * shards
        total += rows * (p.numel() // p.shape[0]) * 4
    return total


def test_fsdp_reduce_scatter_bytes_are_recorded_from_torch(tmp_path):
    # FSDP2 issues these itself; the ledger sees them through comm/capture.py. Each gradient is
    # reduce-scattered once per step: (n-1)/n of the padded gradient bytes. Rounding is per call
    # (one call per FSDP unit), hence the few-byte slack.
    n = 4
    records = train_run(tmp_path, n, "--parallel.dp_shard=4", steps=3)
    expected = (n - 1) * _padded_param_bytes(n) / n
    for record in records:
        assert abs(record["comm_bytes"]["dp_shard/reduce_scatter"] - expected) <= 16
        # forward gathers every unit once, backward again all but the last layer's and the root's
        assert record["comm_bytes"]["dp_shard/all_gather"] > (n - 1) * _padded_param_bytes(n) / n


def test_sequence_parallel_activation_bytes_match_the_plan(tmp_path):
    # Per microbatch forward: an all-gather of the [b, s/tp, d] activations before attention, before
    # the MLP (each layer) and before the head; a reduce-scatter after o_proj and down_proj (each
    # layer) and after the vocab-parallel embedding. Backward mirrors each (gather <-> scatter).
    tp, layers, b, s, d = 2, 2, 8, 64, 64
    records = train_run(tmp_path, tp, "--parallel.tp=2", steps=2)
    shard_bytes = b * (s // tp) * d * 4
    per_direction = (2 * layers + 1) * 2  # forward + backward
    for record in records:
        assert record["comm_bytes"]["tp/all_gather"] == per_direction * (tp - 1) * shard_bytes
        assert record["comm_bytes"]["tp/reduce_scatter"] == per_direction * (tp - 1) * shard_bytes
