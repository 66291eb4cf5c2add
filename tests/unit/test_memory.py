"""The memory estimate of ``meshweave train --dry-run`` (parallel/memory.py), process-free.

Its arithmetic against layout invariants (FSDP divides parameters, gradients and optimizer state
by dp_shard; TP halves everything but the replicated norms; pipeline stages partition the
model; checkpointing and bf16 shrink activations), and its per-layer activation formulas
against the tensors autograd actually saves for backward, counted storage by storage; and the
live-tensor accounting (metrics/tensor_memory.py) the estimate is measured against, which
tests/dist/test_memory_estimate.py does over real training steps.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from meshweave.cli import main
from meshweave.config import Config, ModelConfig
from meshweave.metrics.tensor_memory import TensorMemoryPeak
from meshweave.models.llama import DecoderLayer, build_model, num_params
from meshweave.models.rope import rope_frequencies, rotary_tables
from meshweave.parallel.dims import resolve_degrees
from meshweave.parallel.memory import dense_layer_activations, estimate, moe_layer_activations
from meshweave.validation import resolve

SMALL = [
    "--model.dim=64",
    "--model.n_layers=4",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--model.ffn_dim=160",
    "--model.vocab_size=256",
    "--train.seq_len=64",
    "--train.global_batch=8",
]


def kinds(world: int, *overrides: str):
    cfg = resolve(None, [*SMALL, *overrides], world_size=world)
    return estimate(cfg, resolve_degrees(cfg, world))


def rows(world: int, *overrides: str) -> dict[str, int]:
    (kind,) = kinds(world, *overrides)
    return kind.rows


def test_fsdp_divides_parameters_gradients_and_optimizer_state_by_dp_shard():
    one = rows(1)
    sharded = rows(4, "--parallel.dp_shard=4")
    # every weight's dim 0 (64, 128, 160, 256) divides by 4: no padding, so exactly a quarter
    for key in ("parameters", "gradients", "optimizer state"):
        assert sharded[key] * 4 == one[key], key
    assert one["parameters"] == 4 * num_params(build_model(_model()))


def _model() -> ModelConfig:
    cfg = resolve(None, SMALL, world_size=1)
    return cfg.model


def test_adamw_keeps_two_fp32_states_per_parameter_and_sgd_one():
    adam, sgd = rows(1), rows(1, "--optim.name=sgd")
    assert adam["optimizer state"] == 2 * adam["parameters"]
    assert sgd["optimizer state"] == adam["parameters"]


def test_tensor_parallel_halves_all_but_the_replicated_norm_weights():
    one, tp = rows(1), rows(2, "--parallel.tp=2", "--parallel.dp_shard=1")
    m = _model()
    norms = 4 * m.dim * (2 * m.n_layers + 1)  # two RMSNorms per layer and the final one, fp32
    assert 2 * tp["parameters"] - one["parameters"] == norms


def test_pipeline_stages_partition_the_model_and_the_first_holds_more_microbatches():
    one = rows(1)
    first, last = kinds(2, "--parallel.pp=2", "--parallel.dp_shard=1")
    assert first.rows["parameters"] + last.rows["parameters"] == one["parameters"]
    assert last.rows["logits + loss"] > 0 == first.rows["logits + loss"]
    # 1F1B with 2 microbatches: the first stage holds both in flight, the last one
    assert "2 microbatches in flight" in "; ".join(first.notes)


@pytest.mark.parametrize(
    "schedule, micro, expected",
    [
        ("gpipe", 4, [4, 4]),  # every forward before any backward
        ("1f1b", 4, [2, 1]),  # pp - rank
        # interleaved, 2 stages per rank: torch's warm-up of (v-1) pp + 2 (pp-1-rank) chunks, +1
        ("interleaved_1f1b", 4, [2.5, 1.5]),
    ],
)
def test_microbatches_in_flight_follow_the_schedule(schedule, micro, expected):
    stages = kinds(
        2,
        "--parallel.pp=2",
        "--parallel.dp_shard=1",
        f"--parallel.pp_schedule={schedule}",
        f"--parallel.pp_microbatches={micro}",
    )
    for kind, count in zip(stages, expected):
        notes = "; ".join(kind.notes)
        if count == 1:  # the ordinary case is not noted
            assert "in flight" not in notes
        else:
            assert f"activations of {count:g} microbatches in flight" in notes


def test_replica_modes_add_their_state():
    ddp = rows(2, "--parallel.dp_replicate=2", "--parallel.dp_shard=1")
    diloco = rows(2, "--parallel.dp_replicate=2", "--parallel.dp_shard=1", "--comm.diloco.enabled=true")
    onebit = rows(2, "--parallel.dp_replicate=2", "--parallel.dp_shard=1", "--optim.name=onebit_adam")
    params = ddp["parameters"]
    assert ddp["gradient buckets"] == params  # the replicated all-reduce's flat buckets
    assert diloco["replica state"] == 2 * params and "gradient buckets" not in diloco  # global + momentum
    # exp_avg, exp_avg_sq, worker error, and the server error of the half this rank serves
    assert onebit["optimizer state"] == 3 * params + params // 2
    assert onebit["replica state"] == 6 * params  # three int64 indices per element


def test_tied_embeddings_are_counted_once():
    untied, tied = rows(1), rows(1, "--model.tie_embeddings=true")
    m = _model()
    assert untied["parameters"] - tied["parameters"] == 4 * m.vocab_size * m.dim


def test_activation_checkpointing_keeps_one_input_per_layer():
    plain, ac = rows(1), rows(1, "--parallel.activation_checkpointing=true")
    m = _model()
    tokens = 8 * 64
    # what stays saved: each layer's input, the last layer's output and the final norm's two
    # tensors (normalised input and output), fp32
    assert ac["activations"] == 4 * tokens * m.dim * (m.n_layers + 1 + 2)
    assert ac["activations"] < plain["activations"] / 4
    assert ac["recomputed layer"] > 0 == plain["recomputed layer"]


def test_bf16_parameters_roughly_halve_activations():
    fp32, bf16 = rows(2, "--parallel.dp_shard=2"), rows(2, "--parallel.dp_shard=2", "--parallel.mixed_precision=bf16")
    # half, but for the norms' fp32 upcasts of their inputs
    assert 0.5 < bf16["activations"] / fp32["activations"] < 0.65


def test_context_parallel_divides_activations():
    one, cp = rows(1), rows(2, "--parallel.cp=2", "--parallel.dp_shard=1")
    assert cp["activations"] * 2 == one["activations"]


def test_accumulation_keeps_gradients_through_forward():
    whole, accumulated = kinds(1)[0], kinds(1, "--train.micro_batch=4")[0]
    # half the tokens per forward, but the gradients of the first microbatch are held meanwhile
    assert accumulated.rows["activations"] * 2 == whole.rows["activations"]
    assert accumulated.peak > whole.peak - whole.rows["activations"] / 2 - whole.rows["logits + loss"] / 2


# --------------------------------------------------------------------------------------------
# the per-layer formulas against autograd's saved tensors


def saved_bytes(mode: str, *overrides: str, b: int = 3, s: int = 32) -> tuple[int, Config]:
    """Bytes of the distinct storages one decoder layer saves for backward (its input included
    when it saves it), its parameters and the shared rotary tables excluded; and the config."""
    cfg = resolve(None, [*SMALL, "--model.n_kv_heads=1", *overrides], world_size=1)
    if mode == "autocast":
        cfg.train.dtype = "bf16"
    if mode == "bf16":  # FSDP mixed precision: the layer computes with bf16 weights and inputs
        cfg.parallel.mixed_precision = "bf16"
    torch.manual_seed(0)
    layer = DecoderLayer(cfg.model, 0)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    layer.to(dtype)
    x = torch.randn(b, s, cfg.model.dim, dtype=dtype, requires_grad=True)
    inv_freq, scale = rope_frequencies(cfg.model)
    cos, sin = rotary_tables(torch.arange(s), inv_freq, scale, dtype)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    skip = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), cos, sin]}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        layer(x, cos, sin)
    total = sum(n for ptr, n in seen.items() if ptr not in skip)
    return total, cfg


@pytest.mark.parametrize(
    "mode, overrides",
    [
        ("fp32", []),
        ("autocast", []),
        ("bf16", []),
        ("fp32", ["--model.qk_norm=head", "--model.qkv_bias=true"]),  # Qwen3-style (biases save nothing)
        ("bf16", ["--model.qk_norm=head"]),
        ("fp32", ["--model.qk_norm=full"]),  # OLMoE-style
        ("bf16", ["--model.qk_norm=full"]),
    ],
)
def test_dense_layer_formula_is_what_autograd_saves(mode, overrides):
    saved, cfg = saved_bytes(mode, *overrides)
    expected = dense_layer_activations(cfg, 3 * 32, tp=1)
    if mode == "autocast":
        # autocast's bf16 weight copies, which the estimate counts apart (per layer, from the
        # parameter count), and the rotary tables' bf16 casts (q and k each, [s, 1, head_dim])
        matrices = sum(p.numel() for p in DecoderLayer(cfg.model, 0).parameters() if p.dim() >= 2)
        tables = 4 * 2 * 32 * cfg.model.attention_head_dim()
        saved -= 2 * matrices + tables
    assert saved == expected


def test_moe_layer_formula_is_what_autograd_saves_in_one_process():
    cfg = resolve(None, [*SMALL, "--moe.num_experts=4", "--moe.top_k=2", "--moe.expert_ffn_dim=96"], world_size=1)
    torch.manual_seed(0)
    layer = DecoderLayer(cfg.model, 0, cfg.moe)
    b, s = 4, 32
    x = torch.randn(b, s, cfg.model.dim, requires_grad=True)
    inv_freq, scale = rope_frequencies(cfg.model)
    cos, sin = rotary_tables(torch.arange(s), inv_freq, scale, torch.float32)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    skip = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), cos, sin]}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin)
    saved = sum(n for ptr, n in seen.items() if ptr not in skip)
    # dropless in one process: the expert tensors hold top_k rows per token however the router
    # splits them; what the formula rounds is the router's small per-token index / weight tensors
    assert abs(saved - moe_layer_activations(cfg, b * s, tp=1)) <= 16 * b * s


def test_dry_run_prints_the_table_and_exits_without_training(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--nproc", "4", "--dry-run", *SMALL, "--parallel.pp=2", f"--out={out}"]) == 0
    text = capsys.readouterr().out
    for row in ("parameters", "gradients", "optimizer state", "activations", "peak (estimate)"):
        assert row in text
    assert "pp 0 (2 ranks)" in text and "pp 1 (2 ranks)" in text
    assert not out.exists()  # nothing trained, nothing written


def test_dry_run_refuses_an_invalid_layout_like_training(capsys):
    assert main(["run", "--nproc", "4", "--dry-run", *SMALL, "--parallel.tp=3"]) == 2
    assert "parallel.tp" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# the measurement the estimate is checked against (metrics/tensor_memory.py)


def test_tensor_memory_peak_counts_each_live_storage_once():
    model = torch.nn.Linear(256, 256, bias=False)  # 256 KiB of weight, there before tracking
    weight = 256 * 256 * 4
    with TensorMemoryPeak(model) as tracker:
        a = torch.ones(1024, 256)  # 1 MiB
        view = a[:10]  # a view: the same storage, not counted again
        b = a * 2  # another 1 MiB
        del a, view, b
        c = torch.zeros(256, 256)
        assert tracker.current == 2 * weight  # the weight and c; a and b are freed
    assert tracker.peak_bytes() == weight + 2 * 1024 * 256 * 4
    del c


def test_tensor_memory_peak_follows_storage_resize():
    with TensorMemoryPeak() as tracker:
        t = torch.empty(1000)
        t.untyped_storage().resize_(0)  # FSDP2 frees unsharded parameters this way
        assert tracker.current == 0
        t.untyped_storage().resize_(4 * 500)
        assert tracker.current == 2000
    assert tracker.peak_bytes() == 4000


def test_lora_keeps_gradients_and_optimizer_state_for_the_adapters_only():
    from meshweave.models.lora import apply_lora, freeze_base

    full, lora = rows(1), rows(1, "--lora.rank=8")
    model = build_model(_model())
    apply_lora(model.layers.values(), resolve(None, [*SMALL, "--lora.rank=8"], world_size=1).lora)
    freeze_base(model)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora["gradients"] == 4 * adapters and lora["optimizer state"] == 8 * adapters
    assert lora["parameters"] == full["parameters"] + 4 * adapters
