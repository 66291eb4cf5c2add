"""The local attention op every attention path calls: ``attn(q, k, v, causal) -> (out, lse)``,
its explicit backward, and the fp32 merge of partial results that context parallelism builds on.

Contract (docs/architecture.md): q ``[batch, seq, heads, head_dim]``, k/v ``[batch, seq, kv_heads, head_dim]``
with ``heads % kv_heads == 0`` (grouped-query attention without materialising repeated K/V);
``out`` has q's shape and dtype; ``lse`` is the log-sum-exp of the scaled scores,
``[batch, heads, seq]``, in fp32 whatever the input dtype (fp64 for fp64 inputs, so
double-precision tests stay exact). Context-parallel methods merge partial results with ``lse``,
so it must be exact. Autograd flows through ``out``.

Context-parallel methods compute attention block by block and need two more pieces:

- :func:`attention_backward` — gradients of one block given the *final* (merged) ``out`` and
  ``lse`` of its query rows, so blocks can be differentiated independently and summed;
- :func:`merge_partial` — fold a block's ``(out, lse)`` into running fp32 accumulators
  (the formula in docs/architecture.md). A block whose rows are all masked has ``lse = -inf`` and leaves the
  accumulator untouched; merging into an empty accumulator takes the block as it is. Neither
  produces NaN, which is where naive ``-inf - -inf`` merges break.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = True, q_docs: Tensor | None = None, k_docs: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention returning ``(out, lse_fp32)``; see the module contract.

    With document ids ``q_docs [b, s_q]`` / ``k_docs [b, s_k]`` (both or neither) a query sees
    only keys of its own document (packed sequences); a row that sees no key in this block gets a
    zero output and ``lse = -inf``, which :func:`merge_partial` skips.
    """
    _check_shapes(q, k, v)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # the kernels want [b, h, s, d]
    docs = _documents(q, k, q_docs, k_docs)
    if docs is not None:
        keep = _keep(qh, kh, causal, docs)
        assert keep is not None and q_docs is not None and k_docs is not None
        kernel = kernel_for(q.device.type, q.dtype, q.shape[-1], True, documents=True)
        if kernel == "flex":
            out, lse = flex_documents(qh, kh, vh, causal, q_docs, k_docs)
        elif kernel == "cpu_flash":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qh, kh, vh, attn_mask=_additive(keep, q.dtype)
            )
            # The kernel reports lse = 0 for a row that sees no key; the merge contract wants -inf.
            lse = lse.masked_fill(~keep.any(-1), float("-inf"))
        else:
            out, lse = _reference(qh, kh, vh, False, keep)
        return out.transpose(1, 2), lse.to(accumulation_dtype(q.dtype))
    kernel = kernel_for(q.device.type, q.dtype, q.shape[-1], not causal or q.shape[1] == k.shape[1])
    if kernel == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, is_causal=causal)
    elif kernel == "cuda_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            qh, _expand_kv(kh, qh), _expand_kv(vh, qh), is_causal=causal
        )[:2]
    else:
        out, lse = _reference(qh, kh, vh, causal)
    return out.transpose(1, 2), lse.to(accumulation_dtype(q.dtype))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64: the dtype of ``lse`` and of merges."""
    return torch.promote_types(dtype, torch.float32)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention expects q [b, s, h, d] and k/v [b, s, h_kv, d]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")


def kernel_for(device_type: str, dtype: torch.dtype, head_dim: int, aligned: bool, documents: bool = False) -> str:
    """The kernel that runs an attention block: ``cpu_flash``, ``cuda_flash`` (fp16 / bf16,
    head_dim <= 256), ``flex`` or ``reference`` (the plain twin).

    ``aligned``: not causal, or as many keys as queries. Causal masks align bottom-right (query i
    sees keys up to i + s_k - s_q); the fused kernels align top-left, so unequal lengths take the
    reference path. With ``documents`` the mask is explicit, so alignment does not matter: the
    CPU flash kernel takes it as an additive mask, CUDA runs flex_attention with a block mask
    forward (its backward from a given lse is not exposed: block backward stays the reference).
    """
    if documents:
        return {"cpu": "cpu_flash", "cuda": "flex"}.get(device_type, "reference")
    if not aligned:
        return "reference"
    if device_type == "cpu":
        return "cpu_flash"
    if device_type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim <= 256:
        return "cuda_flash"
    return "reference"


def _documents(q: Tensor, k: Tensor, q_docs: Tensor | None, k_docs: Tensor | None) -> Tensor | None:
    """``[b, 1, s_q, s_k]`` True where query and key share a document, or None without ids."""
    if (q_docs is None) != (k_docs is None):
        raise ValueError("attention: give document ids for both queries and keys, or for neither")
    if q_docs is None or k_docs is None:
        return None
    if q_docs.shape != q.shape[:2] or k_docs.shape != k.shape[:2]:
        raise ValueError(
            f"attention: document ids {tuple(q_docs.shape)} / {tuple(k_docs.shape)} do not match "
            f"q {tuple(q.shape[:2])} / k {tuple(k.shape[:2])} ([batch, seq])"
        )
    return (q_docs[:, :, None] == k_docs[:, None, :]).unsqueeze(1)


def _keep(q: Tensor, k: Tensor, causal: bool, docs: Tensor | None) -> Tensor | None:
    """The mask of visible (query, key) pairs in ``[b, h, s, d]`` layout (None: all visible):
    causal aligned bottom-right, and within a document when ``docs`` is given."""
    keep = docs
    if causal:
        s_q, s_k = q.shape[-2], k.shape[-2]
        tri = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(diagonal=s_k - s_q)
        keep = tri if keep is None else keep & tri
    return keep


def flex_documents(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, q_docs: Tensor, k_docs: Tensor
) -> tuple[Tensor, Tensor]:
    """Document-masked attention in ``[b, h, s, d]`` through ``flex_attention`` with a block mask
    built from the ids: blocks with no visible pair are never computed. Compiled on CUDA (the
    fused kernel); eager elsewhere (forward only: torch has no CPU flex backward). Rows that see
    nothing get a zero output and ``lse = -inf``, as :func:`_reference`."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    offset = k.shape[-2] - q.shape[-2]  # causal aligns bottom-right

    def visible(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        same = q_docs[b, qi] == k_docs[b, ki]
        return same & (qi + offset >= ki) if causal else same

    fused = q.device.type == "cuda"
    mask = create_block_mask(visible, q.shape[0], None, q.shape[-2], k.shape[-2], device=q.device, _compile=fused)
    run = _compiled_flex() if fused else flex_attention
    out, lse = run(q, k, v, block_mask=mask, enable_gqa=k.shape[1] != q.shape[1], return_lse=True)
    return out, lse


_FLEX: list = []


def _compiled_flex():
    """flex_attention compiled once per process (eager flex materialises every score)."""
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


def _additive(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """``keep`` as the additive float mask the CPU flash kernel takes (0 visible, -inf hidden)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))


def _expand_kv(kv: Tensor, q: Tensor) -> Tensor:
    """Repeat KV heads to the query head count for kernels without native GQA support."""
    groups = q.shape[1] // kv.shape[1]
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def _reference(q: Tensor, k: Tensor, v: Tensor, causal: bool, docs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Plain-torch attention in ``[b, h, s, d]`` with an fp32 lse; the path any device can run.

    Rows with every key masked (``s_k < s_q`` under causal masking, or no key of the row's
    document in this block) get ``lse = -inf`` and a zero output, never NaN, so mergers skip them.
    """
    k, v = _expand_kv(k, q), _expand_kv(v, q)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    keep = _keep(q, k, causal, docs)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(acc).min))
    out = torch.matmul(probs.nan_to_num(0.0), v.to(acc)).to(q.dtype)
    return out, lse.to(acc)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> tuple[Tensor, Tensor]:
    """The plain-torch twin of :func:`attention` (same contract), for tests and odd devices."""
    _check_shapes(q, k, v)
    out, lse = _reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal)
    return out.transpose(1, 2), lse


def attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    q_docs: Tensor | None = None,
    k_docs: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` of one attention block, in the layout and dtype of q/k/v.

    ``out`` ``[b, s_q, h, d]`` and ``lse`` ``[b, h, s_q]`` are the final values of these query
    rows (after merging every block), so the block's softmax is recovered as
    ``exp(scores - lse)`` and the per-block gradients of all blocks of a row sum to the full ones.
    """
    _check_shapes(q, k, v)
    qh, kh, vh, doh, oh = (t.transpose(1, 2) for t in (q, k, v, dout, out))
    docs = _documents(q, k, q_docs, k_docs)
    if docs is not None:
        keep = _keep(qh, kh, causal, docs)
        assert keep is not None
        if kernel_for(q.device.type, q.dtype, q.shape[-1], True, documents=True) == "cpu_flash":
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                doh.to(q.dtype),
                qh,
                kh,
                vh,
                oh.to(q.dtype),
                # A row that sees nothing has lse = -inf; its masked scores make any finite lse exact.
                lse.to(accumulation_dtype(q.dtype)).masked_fill(torch.isneginf(lse), 0.0),
                0.0,
                False,
                attn_mask=_additive(keep, q.dtype),
            )
        else:
            dq, dk, dv = _reference_backward(doh, qh, kh, vh, oh, lse, False, keep)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    kernel = kernel_for(q.device.type, q.dtype, q.shape[-1], not causal or q.shape[1] == k.shape[1])
    if kernel == "cuda_flash":
        dq, dk, dv = _cuda_flash_backward(doh, qh, kh, vh, oh, lse, causal)
    elif kernel == "cpu_flash":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            doh.to(q.dtype),
            qh,
            kh,
            vh,
            oh.to(q.dtype),
            lse.to(torch.promote_types(q.dtype, torch.float32)),
            0.0,
            causal,
        )
    else:
        dq, dk, dv = _reference_backward(doh, qh, kh, vh, oh, lse, causal)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _cuda_flash_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The CUDA flash kernel's backward in ``[b, h, s, d]`` from the final ``out`` / ``lse``; KV
    heads are expanded for the kernel and their gradients summed back per group."""
    ke, ve = _expand_kv(k, q), _expand_kv(v, q)
    no_dropout = torch.zeros((), dtype=torch.int64, device=q.device)  # the RNG state it would replay
    empty = torch.empty(0, dtype=torch.int32, device=q.device)  # cumulative lengths: not varlen
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.to(q.dtype).contiguous(),
        q,
        ke,
        ve,
        out.to(q.dtype).contiguous(),
        lse.float().contiguous(),
        empty,
        empty,
        q.shape[-2],
        k.shape[-2],
        0.0,
        causal,
        no_dropout,
        no_dropout,
    )
    return dq, _sum_kv_groups(dk, k), _sum_kv_groups(dv, v)


def _sum_kv_groups(grad: Tensor, kv: Tensor) -> Tensor:
    """Gradients of expanded KV heads ``[b, h, s, d]`` summed back onto ``kv``'s heads."""
    b, h, s, d = grad.shape
    groups = h // kv.shape[1]
    return grad if groups == 1 else grad.view(b, h // groups, groups, s, d).sum(2).to(kv.dtype)


def _reference_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, docs: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Plain-torch block backward in ``[b, h, s, d]`` (fp32 math), GQA gradients summed per group."""
    acc = accumulation_dtype(q.dtype)
    ke, ve = _expand_kv(k, q).to(acc), _expand_kv(v, q).to(acc)
    qf, dof = q.to(acc), dout.to(acc)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(qf, ke.transpose(-1, -2)) * scale
    keep = _keep(q, k, causal, docs)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.exp(scores - lse.to(acc).unsqueeze(-1)).nan_to_num(0.0)
    dv = torch.matmul(probs.transpose(-1, -2), dof)
    dprobs = torch.matmul(dof, ve.transpose(-1, -2))
    delta = (dof * out.to(acc)).sum(-1, keepdim=True)
    dscores = probs * (dprobs - delta) * scale
    dq = torch.matmul(dscores, ke)
    dk = torch.matmul(dscores.transpose(-1, -2), qf)
    return dq.to(q.dtype), _sum_kv_groups(dk, k).to(k.dtype), _sum_kv_groups(dv, v).to(v.dtype)


def merge_partial(
    out: Tensor | None, lse: Tensor | None, block_out: Tensor, block_lse: Tensor
) -> tuple[Tensor, Tensor]:
    """Fold one block's ``(block_out [b, s, h, d], block_lse [b, h, s])`` into fp32 accumulators.

    Returns the new ``(out, lse)`` in :func:`accumulation_dtype`; ``out=None`` starts from the block. Implements
    ``out -= sigmoid(blse - lse) * (out - bout)``, ``lse -= logsigmoid(lse - blse)`` row by row;
    rows where the block is empty (``blse = -inf``) keep the accumulator, rows where the
    accumulator is empty take the block.
    """
    acc = accumulation_dtype(block_out.dtype)
    block_out, block_lse = block_out.to(acc), block_lse.to(acc)
    if out is None or lse is None:
        return block_out.clone(), block_lse.clone()
    acc_empty, block_empty = torch.isneginf(lse), torch.isneginf(block_lse)
    # Substitute finite values where a side is empty so no -inf - -inf reaches the formula.
    safe_lse = torch.where(acc_empty, block_lse, lse)
    safe_blse = torch.where(block_empty, safe_lse, block_lse)
    weight = torch.sigmoid(safe_blse - safe_lse)
    weight = torch.where(block_empty, 0.0, torch.where(acc_empty, 1.0, weight))
    new_out = out - weight.transpose(1, 2).unsqueeze(-1) * (out - block_out)
    new_lse = torch.where(
        block_empty, lse, torch.where(acc_empty, block_lse, safe_lse - F.logsigmoid(safe_lse - safe_blse))
    )
    return new_out, new_lse
