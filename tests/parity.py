"""The parity harness: train a layout through the real CLI and compare its losses with another.

``train_run`` runs ``meshweave train`` as N gloo ranks with the variables ``meshweave run`` gives
its torchrun workers (or as one process, like a plain ``meshweave train``) and returns the per-step
records of metrics.jsonl. The ranks are forked from the harness's warm server, so a run costs its
steps, not N interpreters importing torch; the launchers themselves (``meshweave run``, torchrun,
sbatch) are exercised by tests/e2e and tests/slurm. Every parallel layout is proven against the
one-process trajectory with :func:`assert_losses_match`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from meshweave.cli import main
from meshweave.launch.harness import launch, read_metrics

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


def _meshweave_train(args: list[str]) -> None:
    """What a torchrun worker of ``meshweave run`` executes: ``meshweave train <args>``."""
    raise SystemExit(main(["train", *args]))


def train_run(out: Path, nproc: int, *overrides: str, steps: int = 20, timeout: float = 600) -> list[dict]:
    """Train ``steps`` steps of the tiny model under ``nproc`` ranks; returns metrics records.

    Raises AssertionError with the tail of each failed rank's output when a rank exits non-zero.
    """
    args = [*TINY, f"--train.steps={steps}", f"--out={out}", *overrides]
    with tempfile.TemporaryDirectory(prefix="meshweave-ranks-") as logs:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        codes = launch(_meshweave_train, nproc, args, log_dir=logs, env=env, timeout=timeout)
        if any(codes):
            tails = "".join(
                f"--- rank {r} (exit {c}) ---\n{_tail(Path(logs) / f'rank{r}.log')}\n" for r, c in enumerate(codes) if c
            )
            raise AssertionError(f"meshweave train {' '.join(args)} on {nproc} ranks exited {codes}\n{tails}")
    return read_metrics(out)


def _tail(log: Path) -> str:
    """The end of a rank's output (a rank that died before starting left none)."""
    return log.read_text()[-4000:] if log.exists() else "(no output: the rank died before it started)"


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
