"""The parity harness: train a layout through the real CLI and compare its losses with another.

``train_run`` launches ``meshweave run --nproc N`` (torchrun, gloo, spawned workers) or a plain
``meshweave train`` for one process, and returns the per-step records of metrics.jsonl. Every
parallel layout is proven against the one-process trajectory with :func:`assert_losses_match`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from meshweave.launch.harness import read_metrics

MESHWEAVE = [sys.executable, "-m", "meshweave"]

# A model small enough that a 20-step 4-process run takes seconds on 2 cores, with every feature
# of the real one (GQA, SwiGLU, RoPE, untied head). Same data and seed for every layout.
TINY = [
    "--model.dim=64",
    "--model.n_layers=2",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--model.ffn_dim=160",
    "--model.vocab_size=260",
    "--train.seq_len=64",
    "--train.global_batch=8",
    "--optim.warmup_steps=2",
    "--log.progress=false",
    "--train.eval_interval=0",
    "--checkpoint.save_final=false",
    "--checkpoint.resume=none",
]


def train_run(
    out: Path, nproc: int, *overrides: str, steps: int = 20, check: bool = True, timeout: float = 600
) -> list[dict]:
    """Train ``steps`` steps of the tiny model under ``nproc`` processes; returns metrics records."""
    args = [*TINY, f"--train.steps={steps}", f"--out={out}", *overrides]
    cmd = [*MESHWEAVE, "run", f"--nproc={nproc}", *args] if nproc > 1 else [*MESHWEAVE, "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return read_metrics(out)


def final_weights(out: Path) -> dict:
    """The newest checkpoint's model weights as full tensors, whatever layout saved them."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    steps = sorted((Path(out) / "checkpoints").glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(steps[-1], f"{tmp}/full.pt")
        state = torch.load(f"{tmp}/full.pt", weights_only=True)
    return state["model"]


def assert_weights_match(reference: dict, other: dict, rtol: float) -> float:
    """Every parameter's max |diff| / max |reference| <= rtol; returns the largest seen."""
    assert reference.keys() == other.keys()
    worst = 0.0
    for name, ref in reference.items():
        rel = float((other[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        worst = max(worst, rel)
        assert rel <= rtol, f"{name}: relative difference {rel:.2e} > {rtol:.0e}"
    return worst


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


def assert_losses_match(reference: list[float], other: list[float], rtol: float) -> float:
    """Per-step relative difference <= rtol at every step; returns the largest seen."""
    assert len(reference) == len(other) > 0, f"step counts differ: {len(reference)} vs {len(other)}"
    worst = 0.0
    for step, (a, b) in enumerate(zip(reference, other), start=1):
        rel = abs(a - b) / max(abs(a), 1e-12)
        worst = max(worst, rel)
        assert rel <= rtol, f"step {step}: loss {b!r} vs reference {a!r} (rel diff {rel:.2e} > {rtol:.0e})"
    return worst


def worker_pids(out: Path) -> list[int]:
    """PIDs of the training processes (not torchrun's agent, not `meshweave run`) writing to ``out``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "train" in args and f"--out={out}" in args and "torch.distributed.run" not in args and "meshweave" in args:
            pids.append(int(proc.name))
    return sorted(pids)


def kill_workers(out: Path) -> None:
    """SIGKILL any training process still writing to ``out`` (torchrun puts workers in their own
    session, so killing the launcher alone can leave them running)."""
    import signal

    for pid in worker_pids(out):
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
