"""The CUDA path: kernels, model, compile, fused AdamW, NVML and NCCL parity (``make gpu-check``).

Collected everywhere, run only where CUDA is: on a CPU machine every test here is skipped (the
module still imports, so a broken import fails CI). Single-GPU checks are part (a) of
``make gpu-check``, the multi-GPU NCCL parity part (b) (``-k nccl``).

Tolerances: bf16 attention against the fp32 twin 3e-2 relative to the largest value (bf16 keeps
8 bits of mantissa, ~4e-3 per op, summed over a 128-long softmax row); fp32 model and compiled
blocks 1e-4 against the CPU / eager run (TF32 is off for these); NCCL parity 1e-4 per step, the
CPU suite's bound.
"""

from __future__ import annotations

import pytest
import torch

from tests.parity import assert_losses_match, losses, train_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
CUDA = ["--train.device=cuda"]


@pytest.fixture(autouse=True)
def _no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_bf16_flash_attention_forward_and_backward_follow_the_fp32_twin():
    from meshweave.kernels.attention import _reference, _reference_backward, attention, attention_backward

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 128, h, 64, device="cuda", generator=gen) for h in (8, 2, 2))
    dout = torch.randn_like(q)
    out, lse = attention(*(t.bfloat16() for t in (q, k, v)), True)
    grads = attention_backward(dout.bfloat16(), *(t.bfloat16() for t in (q, k, v)), out, lse, True)
    qh, kh, vh, doh = (t.transpose(1, 2) for t in (q, k, v, dout))
    ref_out, ref_lse = _reference(qh, kh, vh, True)
    ref_grads = _reference_backward(doh, qh, kh, vh, ref_out, ref_lse, True)
    assert _rel(out, ref_out.transpose(1, 2)) <= 3e-2
    for got, want in zip(grads, ref_grads):
        assert _rel(got, want.transpose(1, 2)) <= 3e-2


def test_model_forward_and_backward_on_cuda_match_the_cpu():
    from meshweave.config import ModelConfig
    from meshweave.models.llama import build_model
    from meshweave.parallel.parallelize import materialize

    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=512)
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    outs = []
    for device in ("cpu", "cuda"):
        model = build_model(cfg)
        materialize(model, torch.device(device), seed=0)
        logits = model(tokens.to(device))
        logits.float().square().mean().backward()
        outs.append((logits.cpu(), model.layers["0"].self_attn.q_proj.weight.grad.cpu()))
    assert _rel(outs[1][0], outs[0][0]) <= 1e-4 and _rel(outs[1][1], outs[0][1]) <= 1e-4


def test_compiled_training_follows_eager_on_cuda(tmp_path):
    eager = losses(train_run(tmp_path / "eager", 1, *CUDA, steps=10))
    compiled = losses(train_run(tmp_path / "compiled", 1, *CUDA, "--train.compile=true", steps=10))
    assert_losses_match(eager, compiled, rtol=1e-4)


def test_fused_adamw_steps_like_the_cpu_adamw():
    params = [torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))]
    twins = [torch.nn.Parameter(params[0].detach().cuda())]
    fused = torch.optim.AdamW(twins, lr=1e-2, fused=True)
    plain = torch.optim.AdamW(params, lr=1e-2)
    for step in range(3):
        grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(step + 1))
        params[0].grad, twins[0].grad = grad, grad.cuda()
        plain.step()
        fused.step()
    assert _rel(twins[0].detach().cpu(), params[0].detach()) <= 1e-5


def test_nvml_telemetry_reaches_metrics(tmp_path):
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed (make venv installs it with a GPU)")
    record = train_run(tmp_path, 1, *CUDA, "--log.interval=1", steps=3)[-1]
    assert record["gpu_util"] is not None and record["gpu_mem_bytes"] > 0 and record["gpu_power_w"] > 0


NCCL_LAYOUTS = [
    pytest.param(["--parallel.dp_replicate=2", "--parallel.dp_shard=1"], id="replicate2"),
    pytest.param(["--parallel.dp_shard=2"], id="fsdp2"),
    pytest.param(["--parallel.tp=2", "--parallel.dp_shard=1"], id="tp2"),
    pytest.param(["--parallel.cp=2", "--parallel.dp_shard=1", "--parallel.cp_method=ring"], id="cp2-ring"),
    pytest.param(["--parallel.pp=2", "--parallel.dp_shard=1"], id="pp2"),
    pytest.param(
        ["--moe.num_experts=4", "--moe.expert_ffn_dim=64", "--parallel.dp_shard=2", "--parallel.ep=2"], id="ep2"
    ),
]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL parity needs 2 GPUs")
@pytest.mark.parametrize("layout", NCCL_LAYOUTS)
def test_nccl_layout_follows_one_gpu(tmp_path, layout):
    moe = [a for a in layout if a.startswith("--moe")]
    # the aux loss is per micro-batch: one GPU cuts the batch like the 2 data-parallel ranks
    same_micro = ["--train.micro_batch=4"] if moe and "--parallel.dp_shard=2" in layout else []
    one = losses(train_run(tmp_path / "one", 1, *CUDA, *moe, *same_micro, steps=10))
    two = losses(train_run(tmp_path / "two", 2, *CUDA, *layout, steps=10))
    assert_losses_match(one, two, rtol=1e-4)
