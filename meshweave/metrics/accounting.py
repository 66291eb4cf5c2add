"""Accounting: model FLOPs per token, MFU against a device's peak, and peak memory.

MFU follows the PaLM appendix: ``6 N + 12 L d s`` FLOPs per token for N non-embedding parameters
(forward + backward, attention scores included; MoE experts at their routed share, frozen weights
without their weight gradient), over the device's dense bf16 peak.
"""

from __future__ import annotations

import re
import resource
import sys

import torch


def model_flops_per_token(
    n_params_non_embedding: float, n_layers: int, dim: int, seq_len: int, n_frozen: float = 0.0
) -> float:
    """Training FLOPs per token: ``6 N - 2 F + 12 n_layers dim seq_len``.

    ``6 N`` is forward (2N) plus backward (4N: input gradients 2N, weight gradients 2N) for the
    matmuls over the ``N`` non-embedding parameters a token uses (an MoE layer's routed experts at
    ``top_k / num_experts``: models/llama.py ``params_per_token``); the ``F`` of them that are
    frozen (a LoRA base) need no weight gradient, hence ``- 2 F``. ``12 L d T`` is the attention
    score and value matmuls (QK^T and AV, forward and backward) that the parameter count misses.
    This is the PaLM appendix-B / nanoGPT estimate: it ignores causal masking savings and
    activation recomputation, so MFU stays comparable across runs that differ only in activation
    checkpointing.
    """
    return 6.0 * n_params_non_embedding - 2.0 * n_frozen + 12.0 * n_layers * dim * seq_len


# Dense (no structured sparsity) peak tensor-core TFLOPs per device for bf16 inputs with fp32
# accumulation, from the vendors' datasheets, as (device-name pattern, label, TFLOPs). Most
# specific first: "A10" must not claim an A100 or A10G, and an H100 that names no form factor
# (e.g. "NVIDIA H100 80GB HBM3") is the SXM part.
_DEVICES: tuple[tuple[str, str, float], ...] = (
    (r"\bB200\b", "B200", 2250.0),
    (r"\bH200\b", "H200", 989.0),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835.0),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756.0),
    (r"\bH100\b", "H100 SXM", 989.0),
    (r"\bA100\b", "A100", 312.0),
    (r"\bA10G\b", "A10G", 70.0),  # AWS's A10 variant: lower clocks and power than the A10
    (r"\bA10\b", "A10", 125.0),
    (r"\bL40S\b", "L40S", 362.0),
    (r"\bL40\b", "L40", 181.0),
    (r"\bL4\b", "L4", 121.0),
    (r"\bV100\b", "V100", 125.0),  # no bf16 on Volta: its fp16 figure stands in
    (r"\bRTX 4090\b", "RTX 4090", 165.0),
    (r"\bRTX 3090\b", "RTX 3090", 71.0),
    (r"\bMI300X\b", "MI300X", 1307.0),
)
PEAK_TFLOPS: dict[str, float] = {label: tflops for _, label, tflops in _DEVICES}


def lookup_peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOPs for a device name as CUDA/ROCm reports it, or None if unknown."""
    for pattern, _, tflops in _DEVICES:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops
    return None


def device_peak_tflops(override: float) -> float | None:
    """Per-device peak TFLOPs: ``override`` if > 0, else the table entry for the current GPU.

    None when neither is known (CPU runs, unlisted GPUs), which makes MFU None rather than wrong.
    """
    if override > 0:
        return float(override)
    if torch.cuda.is_available():
        return lookup_peak_tflops(torch.cuda.get_device_name())
    return None


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction in [0, 1]: achieved FLOP/s over the device peak.

    None when the peak is unknown or not positive.
    """
    if peak_tflops is None or peak_tflops <= 0:
        return None
    return tokens_per_s_per_device * flops_per_token / (peak_tflops * 1e12)


def peak_memory_bytes(device: torch.device) -> int:
    """High-water memory in bytes: CUDA allocator peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024
