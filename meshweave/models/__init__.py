"""Model families (dense and MoE decoders), their parallel seam and their Hugging Face configs.

:func:`from_pretrained` is the public one-process entry: a model with its weights from a Hugging
Face directory or a meshweave checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing the package must stay free of torch: validation reads models' neighbours
    import torch
    from torch import nn


def from_pretrained(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model stored at ``path`` (a HF directory with config.json + safetensors, or a meshweave
    checkpoint directory) with its weights, in eval mode on ``device``; single process, MoE
    models included. Reading checkpoints is checkpoint/'s work: this is its public front door."""
    from meshweave.checkpoint.hf import load_pretrained

    return load_pretrained(path, device)
