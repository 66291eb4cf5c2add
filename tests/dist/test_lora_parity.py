"""LoRA trains the same on every layout, and only the adapters train.

One process is the reference; tensor parallelism x FSDP, the pipeline, context parallelism and
activation checkpointing must reproduce its losses within 1e-4 per step (fp32; the project's
parity bound). The lr is
high enough (1e-2) that the adapters move the loss visibly within the 8 steps.
"""

import pytest
import torch

from meshweave.config import Config
from meshweave.models.llama import build_model
from meshweave.models.lora import apply_lora, freeze_base, is_adapter
from meshweave.options import parse_overrides
from meshweave.parallel.parallelize import materialize
from tests.parity import TINY, assert_losses_match, final_weights, losses, train_run

pytestmark = pytest.mark.dist
STEPS = 8
LORA = ("--lora.rank=4", "--lora.alpha=8", "--optim.lr=1e-2", "--checkpoint.save_final=true")
LAYOUTS = {
    "tp2-fsdp2": (4, ["--parallel.tp=2", "--parallel.dp_shard=2"]),
    "pp2": (2, ["--parallel.pp=2", "--parallel.pp_microbatches=4"]),
    "cp2": (2, ["--parallel.cp=2"]),
    "activation-checkpointing": (1, ["--parallel.activation_checkpointing=true"]),
}


def _initial_model() -> dict[str, torch.Tensor]:
    """The tiny LoRA model's initial weights (what every layout materialises), in this process."""
    cfg = parse_overrides([a for a in [*TINY, *LORA] if a.startswith(("--model.", "--lora."))], Config())
    model = build_model(cfg.model)
    apply_lora(model.layers.values(), cfg.lora)
    freeze_base(model)
    materialize(model, torch.device("cpu"), cfg.train.seed)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(reference_run):
    return losses(reference_run(1, *LORA, steps=STEPS))


def test_lora_training_lowers_the_loss(reference):
    assert reference[-1] < reference[0] - 1e-3


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_layout_matches_one_process(reference_run, reference, layout):
    nproc, args = LAYOUTS[layout]
    assert_losses_match(reference, losses(reference_run(nproc, *LORA, *args, steps=STEPS)), rtol=1e-4)


def test_lora_on_moe_attention_under_tp2_ep2_fsdp2_matches_one_process(reference_run):
    # Adapters on the attention projections of an MoE model (experts take none: refused by
    # validation); the frozen experts are split over ep and their all-to-alls still run.
    moe = ("--lora.targets=q,k,v,o", "--moe.num_experts=4", "--moe.top_k=2", "--train.micro_batch=4")
    one = losses(reference_run(1, *LORA, *moe, steps=STEPS))
    layout = ("--parallel.tp=2", "--parallel.dp_shard=2", "--parallel.ep=2")
    assert_losses_match(one, losses(reference_run(4, *LORA, *moe, *layout, steps=STEPS)), rtol=1e-4)


def test_bf16_base_under_fsdp2_and_tp2_matches_one_process(reference_run):
    # The adapted projections' frozen weights stored in bf16 (cast up per call, adapters fp32):
    # FSDP2 then all-gathers a group of mixed dtypes; every layout computes the same fp32 math.
    bf16 = "--lora.base_dtype=bf16"
    one = losses(reference_run(1, *LORA, bf16, steps=STEPS))
    for nproc, layout in [(2, ["--parallel.dp_shard=2"]), (2, ["--parallel.tp=2"])]:
        assert_losses_match(one, losses(reference_run(nproc, *LORA, bf16, *layout, steps=STEPS)), rtol=1e-4)


# One process: compiled blocks under TP / FSDP are tests/dist/test_compile.py's; a 4-rank compiled
# LoRA run (4e-8 from eager when measured) would cost the suite ~50 s of inductor on 2 cores.
COMPILED = (1, ["--train.compile=true"])


def test_compiled_lora_blocks_train_like_eager(reference_run, reference):
    # 1e-5: compiled blocks fuse the same ops (tests/dist/test_compile.py); adapters add none that
    # inductor could reorder differently. Dropout is 0 here: compiled code draws its own masks.
    assert_losses_match(reference, losses(reference_run(COMPILED[0], *LORA, *COMPILED[1], steps=STEPS)), rtol=1e-5)


@pytest.mark.parametrize("layout", ["one-process", "tp2-fsdp2", "compiled"])
def test_base_weights_are_bit_identical_after_training(reference_run, layout):
    nproc, args = {"one-process": (1, []), "compiled": COMPILED}.get(layout) or LAYOUTS[layout]
    trained = final_weights(reference_run.dir(nproc, *LORA, *args, steps=STEPS))
    initial = _initial_model()
    assert trained.keys() == initial.keys()
    for name, value in initial.items():
        if is_adapter(name):
            continue
        assert torch.equal(trained[name], value), name
    moved = [n for n in initial if ".lora_B." in n and trained[n].abs().max() > 0]
    assert len(moved) == sum(".lora_B." in n for n in initial)  # every adapter trained (B starts at 0)


@pytest.mark.parametrize("layout", ["one-process", "tp2-fsdp2"])
def test_optimizer_state_exists_only_for_adapters(reference_run, layout):
    from meshweave.checkpoint.hf import read_checkpoint

    nproc, args = (1, []) if layout == "one-process" else LAYOUTS[layout]
    run = reference_run.dir(nproc, *LORA, *args, steps=STEPS)
    ckpt = sorted((run / "checkpoints").glob("step-*[0-9]"))[-1]
    state = read_checkpoint(ckpt, prefix="optim.state.")
    params = {k.removeprefix("optim.state.").rsplit(".", 1)[0] for k in state}
    adapters = {n for n in _initial_model() if is_adapter(n)}
    assert params == adapters


def test_data_parallel_gradient_bytes_are_the_adapters(tmp_path):
    # Replicated data parallelism: each of n ranks sends 2(n-1)/n x the gradient bytes per
    # all-reduce (tests/dist/test_ledger_bytes.py); with LoRA the gradients are the adapters' alone.
    n = 2
    records = train_run(tmp_path, n, *LORA, "--parallel.dp_replicate=2", "--parallel.dp_shard=1", steps=2)
    adapter_elements = sum(v.numel() for k, v in _initial_model().items() if is_adapter(k))
    expected = 2 * (n - 1) / n * 4 * adapter_elements
    for record in records:
        assert record["comm_bytes"]["dp_replicate/all_reduce"] == expected


def test_lora_run_resumes_onto_another_layout(reference_run, tmp_path):
    # Saved at step 3 by one process (optimizer state: adapters only, one param group), resumed
    # at tp=2: steps 4..6 follow the uninterrupted run within 1e-5 (the resharded-resume bound of
    # tests/e2e; DCP reshards model and optimizer, the layouts differ by summation order only).
    every = ("--checkpoint.interval=3",)
    uninterrupted = losses(reference_run(1, *LORA, *every, steps=6))
    train_run(tmp_path, 1, *LORA, *every, "--train.stop_at_step=3", steps=6)
    resumed = train_run(tmp_path, 2, *LORA, *every, "--parallel.tp=2", "--checkpoint.resume=auto", steps=6)
    assert [r["step"] for r in resumed][-3:] == [4, 5, 6]
    assert_losses_match(uninterrupted[3:], losses(resumed)[-3:], rtol=1e-5)
