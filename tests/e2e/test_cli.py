"""The command line as a user meets it: prepare data, train on it, read the run directory, plot."""

import subprocess
import sys

from meshweave.options import load_toml
from tests.parity import MESHWEAVE, train_run

REQUIRED_KEYS = {
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "step_time_s",
    "mfu",
    "mem_peak_bytes",
    "comm_bytes",
    "comm_bytes_total",
}


def _meshweave(*args, check=True):
    proc = subprocess.run([*MESHWEAVE, *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_run_directory_holds_config_metrics_events_and_checkpoint(tmp_path):
    records = train_run(tmp_path, 1, "--checkpoint.save_final=true", "--train.eval_interval=2", steps=4)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(REQUIRED_KEYS <= set(r) for r in records)
    assert records[-1]["tokens"] == 4 * 8 * 64
    assert "eval_loss" in records[1] and records[1]["eval_loss"] > 0
    saved = load_toml(tmp_path / "config.toml")
    assert saved.train.steps == 4 and saved.out == str(tmp_path)
    assert "saved checkpoint" in (tmp_path / "events.log").read_text()
    assert (tmp_path / "checkpoints" / "step-4" / ".metadata").is_file()


def test_prepared_text_files_train_end_to_end(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps. " * 200)
    out = _meshweave(
        "data",
        "prepare",
        "--input",
        *[str(tmp_path / f"doc{i}.txt") for i in range(3)],
        "--tokenizer",
        "bytes",
        "--out",
        str(tmp_path / "data"),
    )
    assert "3 documents" in out.stdout
    records = train_run(tmp_path / "run", 1, f"--data.source={tmp_path / 'data'}", "--data.eval_fraction=0", steps=3)
    assert len(records) == 3 and all(r["loss"] > 0 for r in records)


def test_plot_writes_loss_throughput_and_comm_pngs(tmp_path):
    train_run(tmp_path, 1, steps=3)
    out = _meshweave("plot", str(tmp_path))
    written = out.stdout.split()
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["comm_bytes.png", "loss.png", "throughput.png"]
    assert all((tmp_path / "plots" / name).stat().st_size > 1000 for name in ("loss.png", "throughput.png"))


def test_plot_of_a_missing_run_is_a_one_line_error(tmp_path):
    proc = _meshweave("plot", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 2 and "metrics.jsonl" in proc.stderr and "Traceback" not in proc.stderr


def test_console_script_is_installed():
    bindir = sys.executable.rsplit("/", 1)[0]
    proc = subprocess.run([f"{bindir}/meshweave", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "train" in proc.stdout and "run" in proc.stdout
