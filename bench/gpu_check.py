"""``make gpu-check``: does the GPU path work, and how fast is it — one command, a few minutes.

On a machine without CUDA it prints one line saying so and exits 0. With CUDA it runs:

- (a) single GPU: tests/gpu (bf16 flash attention forward/backward vs the fp32 twin, model forward
  and backward vs the CPU, compiled vs eager training, fused AdamW, NVML telemetry in metrics,
  the comm stream's event ordering without host syncs);
- (b) NCCL: the parity tests (replicate, FSDP, TP, CP ring, EP, PP on 2 GPUs against one) and an
  async all-reduce beside compute that never syncs the host, when there are at least 2 GPUs;
- (c) bench/mfu.py: tokens/s and MFU of a ~0.9B Llama (bf16, compiled, flash, seq 4096).

It installs nothing (``make venv`` does, with the GPU extras when ``nvidia-smi`` exists) and ends
with one summary line per part, ``gpu-check (<part>) <what>: PASS|FAIL|SKIP <details>``; the exit
code is 0 only when no part failed.
"""

from __future__ import annotations

import re
import subprocess
import sys

from bench._common import ROOT, cli_env


def _pytest(select: str) -> tuple[str, str]:
    """``(PASS|FAIL|SKIP, counts)`` of ``pytest tests/gpu -k select``."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu", "-k", select],
        cwd=ROOT,
        env=cli_env(),
        text=True,
        capture_output=True,
    )
    print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n", flush=True)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary))
    if proc.returncode not in (0, 5) or counts.get("failed") or counts.get("error"):
        return "FAIL", summary
    return ("PASS" if counts.get("passed") else "SKIP"), summary


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU found (torch.cuda.is_available() is False); nothing to check on this machine")
        return 0
    gpus = torch.cuda.device_count()
    lines = []
    status, detail = _pytest("not nccl")
    lines.append(f"gpu-check (a) single GPU on {torch.cuda.get_device_name(0)}: {status} {detail}")
    if gpus >= 2:
        status, detail = _pytest("nccl")
        lines.append(f"gpu-check (b) NCCL parity on {gpus} GPUs: {status} {detail}")
    else:
        lines.append("gpu-check (b) NCCL parity: SKIP one GPU (needs 2)")
    mfu = subprocess.run([sys.executable, "-m", "bench.mfu"], cwd=ROOT, env=cli_env(), text=True, capture_output=True)
    print(mfu.stdout[-3000:], mfu.stderr[-2000:], sep="\n", flush=True)
    last = next((ln for ln in reversed(mfu.stdout.splitlines()) if ln.startswith("mfu:")), "mfu: no result")
    lines.append(f"gpu-check (c) MFU: {'PASS' if mfu.returncode == 0 else 'FAIL'} {last.removeprefix('mfu: ')}")
    print("\n".join(lines))
    return 1 if any(": FAIL" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
