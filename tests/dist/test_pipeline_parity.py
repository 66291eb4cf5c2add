"""Pipeline-parallel training reproduces one process, for each schedule and composed with TP / DP / CP,
and its checkpoints resume under another pipeline layout.

10 fp32 steps, 1e-4 relative per step (the issue's bound). Stages run the same layers on the same
microbatches; the loss is divided by the step's global token count and schedules do not rescale
gradients, so microbatch gradients add to the one-process gradient and the loss differs by fp32
summation order only (observed <= 1e-7). A missed microbatch, a double-counted gradient or a
grad norm taken over one stage only shows up as > 1e-3 within the first steps.

The model has 4 layers so that pp=4 and 2 virtual stages per rank each get a layer.
"""

import pytest

from tests.parity import assert_losses_match, losses, train_run

pytestmark = pytest.mark.dist
STEPS, STOP = 10, 5
LAYERS = ["--model.n_layers=4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return losses(train_run(tmp_path_factory.mktemp("single"), 1, *LAYERS, steps=STEPS))


def pp(degree: int, schedule: str = "1f1b", *extra: str) -> list[str]:
    return [*LAYERS, f"--parallel.pp={degree}", f"--parallel.pp_schedule={schedule}", *extra]


@pytest.mark.parametrize("nproc,layout", [
    pytest.param(2, pp(2), id="pp2-1f1b"),
    pytest.param(2, pp(2, "interleaved_1f1b", "--parallel.pp_virtual_stages=2"), id="pp2-interleaved-v2"),
    pytest.param(4, pp(4), id="pp4-1f1b"),
    pytest.param(2, pp(2, "gpipe"), id="pp2-gpipe"),
    pytest.param(2, pp(2, "zbv", "--parallel.pp_microbatches=4"), id="pp2-zero-bubble-v"),
    pytest.param(4, pp(2, "1f1b", "--parallel.tp=2"), id="pp2-tp2"),
    pytest.param(4, pp(2, "1f1b", "--parallel.dp_shard=2"), id="pp2-fsdp2"),
    pytest.param(4, pp(2, "1f1b", "--parallel.dp_replicate=2", "--parallel.dp_shard=1"), id="pp2-replicate2"),
    pytest.param(4, pp(2, "1f1b", "--parallel.cp=2"), id="pp2-cp2-ring"),
])
def test_pipeline_layout_matches_one_process(tmp_path, reference, nproc, layout):
    assert_losses_match(reference, losses(train_run(tmp_path, nproc, *layout, steps=STEPS)), rtol=1e-4)


def test_pipeline_reports_each_step_once_with_grad_norm_and_eval_over_all_stages(tmp_path, reference):
    evals = ["--train.eval_interval=3", "--train.eval_batches=2"]
    records = train_run(tmp_path, 2, *pp(2, "1f1b", "--parallel.pp_microbatches=4", "--train.micro_batch=2"),
                        *evals, steps=3)
    one = train_run(tmp_path / "one", 1, *LAYERS, *evals, steps=3)
    assert [r["step"] for r in records] == [1, 2, 3]
    for piped, single in zip(records, one):
        assert abs(piped["grad_norm"] - single["grad_norm"]) <= 1e-4 * single["grad_norm"]
    assert abs(records[-1]["eval_loss"] - one[-1]["eval_loss"]) <= 1e-4 * one[-1]["eval_loss"]


# 1e-5 relative after a resume: the restored state is bit-identical; the new layout only changes
# summation order (~1e-7 in the uninterrupted runs above).
@pytest.mark.parametrize("saved_nproc,saved,resumed_nproc,resumed", [
    pytest.param(2, pp(2), 1, LAYERS, id="pp2-to-pp1"),
    pytest.param(1, LAYERS, 2, pp(2), id="pp1-to-pp2"),
    pytest.param(2, pp(2), 4, pp(4), id="pp2-to-pp4"),
])
def test_checkpoint_resumes_under_another_pipeline_layout(tmp_path, reference, saved_nproc, saved, resumed_nproc,
                                                          resumed):
    run = tmp_path / "run"
    train_run(run, saved_nproc, *saved, "--checkpoint.save_final=true", f"--train.stop_at_step={STOP}", steps=STEPS)
    (run / "metrics.jsonl").unlink()
    records = train_run(run, resumed_nproc, *resumed, "--checkpoint.resume=auto", steps=STEPS)
    assert [r["step"] for r in records] == list(range(STOP + 1, STEPS + 1))
    assert_losses_match(reference[STOP:], losses(records), rtol=1e-5)
