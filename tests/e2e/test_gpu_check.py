"""``make gpu-check`` on a machine without CUDA: one line saying so, exit 0 (with CUDA it runs the
GPU suite and the MFU bench; tests/gpu is collected and skipped here)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, gpu-check runs the real checks")
def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout.strip().count("\n") == 0 and "no CUDA GPU" in proc.stdout
