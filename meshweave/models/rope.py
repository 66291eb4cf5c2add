"""Rotary position embeddings: the frequency table of each family's scaling rule, and the rotation.

Layout is Hugging Face's half-split one: the pair rotated together is ``(i, i + head_dim/2)``, so
q/k projection weights move between meshweave and HF without a permutation.

Scaling rules (``model.rope_scaling``), each a function of the config only, so every layout and
pipeline stage builds the same table:

- ``none``: ``inv_freq_i = theta^(-2i/d)``;
- ``linear``: every frequency divided by ``rope_factor`` (position interpolation);
- ``llama3``: Llama 3.1's rule: wavelengths longer than ``original / low_freq_factor`` divided by
  the factor, shorter than ``original / high_freq_factor`` kept, a smooth blend between;
- ``yarn``: YaRN's ramp between interpolated and extrapolated frequencies over the dims whose
  rotation count at ``original`` lies between ``beta_slow`` and ``beta_fast``, and cos/sin scaled
  by the attention factor ``0.1 ln(factor) + 1`` unless one is given.

Frequencies are computed in fp32 from the same expressions transformers uses, so imported models
reproduce its logits to rounding.
"""

from __future__ import annotations

import math

import torch

from meshweave.config import ModelConfig

Tensor = torch.Tensor


def _base_frequencies(theta: float, head_dim: int) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _llama3(inv_freq: Tensor, m: ModelConfig, original: int) -> Tensor:
    low_wavelen = original / m.rope_low_freq_factor
    high_wavelen = original / m.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / m.rope_factor, inv_freq)
    smooth = (original / wavelen - m.rope_low_freq_factor) / (m.rope_high_freq_factor - m.rope_low_freq_factor)
    blended = (1 - smooth) * scaled / m.rope_factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(m: ModelConfig, head_dim: int, original: int) -> Tensor:
    def dim_of(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(m.rope_theta))

    low = float(max(math.floor(dim_of(m.rope_beta_fast)), 0))
    high = float(min(math.ceil(dim_of(m.rope_beta_slow)), head_dim - 1))
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = m.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return (1.0 / (m.rope_factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_frequencies(m: ModelConfig) -> tuple[Tensor, float]:
    """``(inv_freq [head_dim/2] fp32 on the CPU, cos/sin scale)`` of the model's scaling rule."""
    head_dim = m.attention_head_dim()
    original = m.rope_original_max_len or m.max_seq_len
    if m.rope_scaling == "yarn":
        scale = m.rope_attention_factor or (0.1 * math.log(m.rope_factor) + 1.0 if m.rope_factor > 1 else 1.0)
        return _yarn(m, head_dim, original), scale
    inv_freq = _base_frequencies(m.rope_theta, head_dim)
    if m.rope_scaling == "linear":
        return inv_freq / m.rope_factor, 1.0
    if m.rope_scaling == "llama3":
        return _llama3(inv_freq, m, original), 1.0
    return inv_freq, 1.0


def rotary_tables(positions: Tensor, inv_freq: Tensor, scale: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[..., seq, head_dim]`` for integer ``positions`` ``[seq]`` (shared by the
    batch) or ``[b, seq]`` (per row: packed documents), in the half-split layout, multiplied by
    ``scale`` (YaRN's attention factor; 1 otherwise)."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[b, s, h, d]`` by the tables ``[s, d]`` or ``[b, s, d]``; pairs are
    (i, i + d/2) as in HF."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    # In x's dtype: under autocast q/k come out of the projections in bf16 while the tables are
    # built from fp32 activations, and attention needs q, k, v in one dtype.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads (and the batch if [s, d])
    return x * cos + rotated * sin
