"""Specification of the metrics layer: FLOPs/MFU, telemetry, the run-directory logs, and plots."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from meshweave.config import LogConfig
from meshweave.metrics.accounting import (
    PEAK_TFLOPS,
    device_peak_tflops,
    lookup_peak_tflops,
    mfu,
    model_flops_per_token,
    peak_memory_bytes,
)
from meshweave.metrics.plots import plot_run
from meshweave.metrics.sinks import METRIC_KEYS, MetricsLogger, format_console_line, read_metrics, to_json_value
from meshweave.metrics.telemetry import GpuTelemetry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def quiet_cfg(**kw: object) -> LogConfig:
    cfg = LogConfig(progress=False)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def full_record(step: int, **extra: object) -> dict:
    return {
        "step": step,
        "loss": 3.0 - 0.01 * step,
        "lr": 3e-3,
        "grad_norm": 0.8,
        "tokens": 4096 * step,
        "tokens_per_s": 12345.6,
        "step_time_s": 0.33,
        "mfu": 0.012,
        "mem_peak_bytes": 1 << 20,
        "comm_bytes": {"dp_shard/all_gather": 1_000_000, "dp_shard/reduce_scatter": 230_000},
        "comm_bytes_total": 1_230_000 * step,
        **extra,
    }


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# FLOPs, peak table, MFU, memory


def test_flops_per_token_matches_hand_computation() -> None:
    # 6 * 10M + 12 * 4 layers * 256 dim * 128 tokens = 60,000,000 + 1,572,864
    assert model_flops_per_token(10_000_000, 4, 256, 128) == 61_572_864.0


def test_frozen_weights_need_no_weight_gradient_flops() -> None:
    # a LoRA base of 9M frozen parameters: 2 FLOPs per parameter fewer (no weight-gradient matmul)
    assert model_flops_per_token(10_000_000, 4, 256, 128, n_frozen=9_000_000) == 61_572_864.0 - 18_000_000


def test_params_per_token_counts_routed_experts_at_their_share_and_a_lora_base_as_frozen() -> None:
    from meshweave.config import LoRAConfig, ModelConfig, MoEConfig
    from meshweave.models.llama import build_model, num_params, params_per_token
    from meshweave.models.lora import apply_lora, freeze_base

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=260)
    dense = build_model(cfg)
    assert params_per_token(dense) == (num_params(dense, exclude_embedding=True), 0.0)

    moe = build_model(cfg, moe=MoEConfig(num_experts=8, top_k=2, expert_ffn_dim=32))
    experts = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
    assert experts == 2 * 8 * 3 * 64 * 32  # 2 layers x 8 experts x gate/up/down
    assert params_per_token(moe) == (num_params(moe, exclude_embedding=True) - experts * (1 - 2 / 8), 0.0)

    lora = build_model(cfg)
    apply_lora(lora.layers.values(), LoRAConfig(rank=4))
    freeze_base(lora)
    used, frozen = params_per_token(lora)
    adapters = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert (used, frozen) == (num_params(lora, exclude_embedding=True), used - adapters)


def test_mfu_none_without_peak_and_exact_with_one() -> None:
    assert mfu(1000.0, 1e9, None) is None
    assert mfu(1000.0, 1e9, 0.0) is None
    # 1000 tok/s * 1e9 FLOP/tok = 1e12 FLOP/s = 1 TFLOP/s on a 100 TFLOP/s device -> 1 %
    assert mfu(1000.0, 1e9, 100.0) == pytest.approx(0.01)


def test_device_peak_override_wins_and_cpu_is_unknown() -> None:
    assert device_peak_tflops(123.0) == 123.0
    if not torch.cuda.is_available():
        assert device_peak_tflops(0.0) is None


@pytest.mark.parametrize(
    "name, key",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("AMD Instinct MI300X", "MI300X"),
    ],
)
def test_peak_lookup_prefers_the_specific_part(name: str, key: str) -> None:
    assert lookup_peak_tflops(name) == PEAK_TFLOPS[key]


def test_peak_lookup_unknown_device() -> None:
    assert lookup_peak_tflops("Some Future Accelerator") is None


def test_peak_memory_on_cpu_is_process_rss() -> None:
    # Any live Python process with torch loaded has well over 10 MB resident.
    assert peak_memory_bytes(torch.device("cpu")) > 10 * 2**20


def test_gpu_telemetry_is_all_none_without_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("machine has a GPU")
    tel = GpuTelemetry()
    assert not tel.available
    assert tel.read() == {"gpu_util": None, "gpu_mem_bytes": None, "gpu_power_w": None}
    tel.close()
    tel.close()


# --------------------------------------------------------------------------------------------
# serialisation and console line


def test_to_json_value_converts_tensors_numpy_and_non_finite() -> None:
    value = {
        "t": torch.tensor(2.5),
        "v": torch.tensor([1, 2]),
        "n": np.float32(0.5),
        "i": np.int64(7),
        "nan": float("nan"),
        "inf": torch.tensor(float("inf")),
        "nested": [float("-inf"), 1],
    }
    assert to_json_value(value) == {
        "t": 2.5,
        "v": [1, 2],
        "n": 0.5,
        "i": 7,
        "nan": None,
        "inf": None,
        "nested": [None, 1],
    }


def test_console_line_formats_and_omits_missing_fields() -> None:
    rec = {
        "step": 12,
        "loss": math.pi,
        "lr": 3e-3,
        "grad_norm": 0.8123,
        "tokens_per_s": 12345.4,
        "mfu": 0.012,
        "comm_bytes": {"a/all_reduce": 1_000_000, "b/all_gather": 230_000},
    }
    assert format_console_line(rec, 100) == (
        "step 12/100 | loss 3.1416 | lr 3.0e-03 | gnorm 0.812 | 12,345 tok/s | mfu 1.2% | comm 1.23 MB"
    )
    assert format_console_line({"step": 1, "loss": 2.0, "mfu": None, "comm_bytes": {}}, 5) == "step 1/5 | loss 2.0000"


# --------------------------------------------------------------------------------------------
# MetricsLogger


def test_logger_writes_one_json_line_per_step_with_required_keys(tmp_path: Path, capsys) -> None:
    with MetricsLogger(str(tmp_path), quiet_cfg(), total_steps=10, is_rank0=True) as log:
        log.log(full_record(1))
        log.log(
            full_record(
                2,
                loss=float("nan"),
                grad_norm=torch.tensor(float("inf")),
                eval_loss=torch.tensor(2.75),
                skipped_steps=1,
            )
        )
    lines = read_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        assert set(METRIC_KEYS) <= set(r)
        assert r["gpu_util"] is None and r["gpu_mem_bytes"] is None and r["gpu_power_w"] is None
    assert lines[0]["comm_bytes"] == {"dp_shard/all_gather": 1_000_000, "dp_shard/reduce_scatter": 230_000}
    assert lines[1]["loss"] is None and lines[1]["grad_norm"] is None
    assert lines[1]["eval_loss"] == 2.75 and lines[1]["skipped_steps"] == 1
    assert "null" in (tmp_path / "metrics.jsonl").read_text().splitlines()[1]
    out = capsys.readouterr().out
    assert "step 1/10 | loss 2.9900" in out and "step 2/10 | eval 2.7500" in out


def test_logger_fills_missing_required_keys_and_needs_step(tmp_path: Path) -> None:
    with MetricsLogger(str(tmp_path), quiet_cfg(), total_steps=3, is_rank0=True) as log:
        log.log({"step": 1, "loss": 1.5})
        with pytest.raises(ValueError, match="step"):
            log.log({"loss": 1.0})
    (rec,) = read_lines(tmp_path / "metrics.jsonl")
    assert list(rec)[: len(METRIC_KEYS)] == list(METRIC_KEYS)
    assert rec["loss"] == 1.5 and rec["lr"] is None and rec["comm_bytes"] == {}


def test_non_rank0_logger_writes_nothing(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    log = MetricsLogger(str(run), quiet_cfg(wandb=True), total_steps=10, is_rank0=False)
    log.log(full_record(1))
    log.event("hello")
    log.close()
    assert not run.exists()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_event_appends_timestamped_line_and_prints(tmp_path: Path, capsys) -> None:
    with MetricsLogger(str(tmp_path), quiet_cfg(), total_steps=1, is_rank0=True) as log:
        log.event("resumed from step 40")
        log.event("done")
    lines = (tmp_path / "events.log").read_text().splitlines()
    assert len(lines) == 2
    stamp, _, msg = lines[0].partition(" ")
    assert msg == "resumed from step 40" and stamp[:4].isdigit() and "T" in stamp
    assert "[meshweave] resumed from step 40" in capsys.readouterr().out


def test_resume_appends_and_isolates_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(full_record(1)) + "\n" + '{"step": 2, "lo')
    with MetricsLogger(str(tmp_path), quiet_cfg(), total_steps=5, is_rank0=True, start_step=1) as log:
        log.log(full_record(2))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines[1] == '{"step": 2, "lo'
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_progress_bar_goes_to_stderr_and_lines_to_stdout(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with MetricsLogger(str(tmp_path), quiet_cfg(progress=True), total_steps=4, is_rank0=True) as log:
        log.log(full_record(2))
    captured = capsys.readouterr()
    assert "step 2/4 | loss" in captured.out
    assert "2/4" in captured.err and "tok/s" in captured.err


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with MetricsLogger(str(tmp_path), quiet_cfg(progress=True), total_steps=4, is_rank0=True) as log:
        log.log(full_record(2))
    captured = capsys.readouterr()
    assert "step 2/4 | loss" in captured.out
    assert "2/4" not in captured.err


def test_wandb_requested_but_missing_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'meshweave\[wandb\]'"):
        MetricsLogger(str(tmp_path), quiet_cfg(wandb=True), total_steps=1, is_rank0=True)


class FakeWandb(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("wandb")
        self.init_kwargs: dict = {}
        self.logged: list[tuple[dict, int]] = []
        self.finished = False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        fake = self

        class Run:
            def log(self, data: dict, step: int) -> None:
                fake.logged.append((data, step))

            def finish(self) -> None:
                fake.finished = True

        return Run()


def test_wandb_sink_goes_offline_without_credentials_and_flattens_comm(tmp_path: Path, monkeypatch) -> None:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for var in (
        "WANDB_API_KEY",
        "WANDB_MODE",
        "WANDB_IDENTITY_TOKEN_FILE",
        "NETRC",
        "WANDB_CONFIG_DIR",
        "WANDB_BASE_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = quiet_cfg(wandb=True, wandb_project="proj", wandb_run_name="r1")
    run = tmp_path / "run"
    with MetricsLogger(str(run), cfg, total_steps=3, is_rank0=True, config_dict={"a": 1}) as log:
        log.log(full_record(1, mfu=None))
    kw = fake.init_kwargs
    assert kw["mode"] == "offline" and kw["project"] == "proj" and kw["name"] == "r1"
    assert kw["config"] == {"a": 1} and kw["dir"] == str(run)
    ((data, step),) = fake.logged
    assert step == 1 and data["comm/dp_shard/all_gather"] == 1_000_000
    assert "comm_bytes" not in data and "mfu" not in data and data["loss"] == pytest.approx(2.99)
    assert fake.finished

    # A resumed run continues the same wandb run id.
    first_id = kw["id"]
    with MetricsLogger(str(run), cfg, total_steps=3, is_rank0=True, start_step=1):
        pass
    assert fake.init_kwargs["id"] == first_id


def test_wandb_sink_goes_online_with_a_netrc_login(tmp_path: Path, monkeypatch) -> None:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_CONFIG_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    rc = tmp_path / "netrc"
    rc.write_text("machine api.wandb.ai\n  login user\n  password not-a-real-key\n")
    monkeypatch.setenv("NETRC", str(rc))
    with MetricsLogger(str(tmp_path / "run"), quiet_cfg(wandb=True), total_steps=1, is_rank0=True):
        pass
    assert fake.init_kwargs["mode"] is None and fake.init_kwargs["name"] is None


# --------------------------------------------------------------------------------------------
# plots


def test_plot_run_writes_three_pngs_and_last_duplicate_wins(tmp_path: Path) -> None:
    records = [full_record(s) for s in range(1, 11)]
    records[4]["eval_loss"] = 2.5
    records.append(full_record(5, loss=0.123))  # the step rerun after a resume
    text = (
        "\n".join(json.dumps(r) for r in records[:6])
        + "\nnot json\n[1, 2]\n"
        + "\n".join(json.dumps(r) for r in records[6:])
        + "\n"
    )
    (tmp_path / "metrics.jsonl").write_text(text)

    by_step = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert sorted(by_step) == list(range(1, 11)) and by_step[5]["loss"] == 0.123

    paths = plot_run(str(tmp_path))
    assert [Path(p).name for p in paths] == ["loss.png", "throughput.png", "comm_bytes.png"]
    for p in paths:
        assert Path(p).parent == tmp_path / "plots"
        data = Path(p).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_plot_run_custom_out_dir_and_absent_series(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    paths = plot_run(str(tmp_path), str(tmp_path / "figs"))
    assert all(Path(p).parent == tmp_path / "figs" and Path(p).stat().st_size > 0 for p in paths)


def test_plot_run_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metrics.jsonl"):
        plot_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="metrics.jsonl.*empty"):
        plot_run(str(tmp_path))
