"""The local attention op every attention path calls: ``attn(q, k, v, causal) -> (out, lse)``.

Contract (DESIGN.md): q ``[batch, seq, heads, head_dim]``, k/v ``[batch, seq, kv_heads, head_dim]``
with ``heads % kv_heads == 0`` (grouped-query attention without materialising repeated K/V);
``out`` has q's shape and dtype; ``lse`` is the fp32 log-sum-exp of the scaled scores,
``[batch, heads, seq]``. Context-parallel methods merge partial results with ``lse``, so it must be
exact and fp32 whatever the input dtype. Autograd flows through ``out``.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention returning ``(out, lse_fp32)``; see the module contract."""
    _check_shapes(q, k, v)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # the kernels want [b, h, s, d]
    # Causal masks align bottom-right (query i sees keys up to i + s_k - s_q); the fused kernels
    # align top-left, so unequal lengths take the reference path.
    aligned = not causal or q.shape[1] == k.shape[1]
    if q.device.type == "cpu" and aligned:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, is_causal=causal)
    elif q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and aligned and _flash_ok(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qh, _expand_kv(kh, qh), _expand_kv(vh, qh),
                                                                      is_causal=causal)[:2]
    else:
        out, lse = _reference(qh, kh, vh, causal)
    return out.transpose(1, 2), lse.float()


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention expects q [b, s, h, d] and k/v [b, s, h_kv, d]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")


def _flash_ok(q: Tensor) -> bool:
    return q.shape[-1] <= 256


def _expand_kv(kv: Tensor, q: Tensor) -> Tensor:
    """Repeat KV heads to the query head count for kernels without native GQA support."""
    groups = q.shape[1] // kv.shape[1]
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def _reference(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """Plain-torch attention in ``[b, h, s, d]`` with an fp32 lse; the path any device can run.

    Rows with every key masked (only possible when ``s_k < s_q`` under causal masking) get
    ``lse = -inf`` and a zero output, never NaN, so mergers can skip them.
    """
    k, v = _expand_kv(k, q), _expand_kv(v, q)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        s_q, s_k = q.shape[-2], k.shape[-2]
        keep = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(diagonal=s_k - s_q)
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(acc).min))
    out = torch.matmul(probs.nan_to_num(0.0), v.to(acc)).to(q.dtype)
    return out, lse.float()


def reference_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> tuple[Tensor, Tensor]:
    """The plain-torch twin of :func:`attention` (same contract), for tests and odd devices."""
    _check_shapes(q, k, v)
    out, lse = _reference(*(t.transpose(1, 2) for t in (q, k, v)), causal)
    return out.transpose(1, 2), lse

