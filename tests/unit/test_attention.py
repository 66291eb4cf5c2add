"""Specification of the local attention op: ``attention(q, k, v, causal) -> (out, lse_fp32)``.

``reference_attention`` is the plain-torch twin with the same contract; ``attention`` may use a
fused kernel, but must agree with it. Inputs are float64 where the comparison is numeric, so the
only differences left are summation order (~1e-15), far below the tolerances used here.
"""

from __future__ import annotations

import math

import pytest
import torch

from meshweave.kernels.attention import attention, reference_attention

# float64 attention on a handful of elements: the fused and plain paths differ only in summation
# order, i.e. a few ulp of 2.2e-16 times O(1) values; 1e-10 leaves five orders of headroom while a
# masking or GQA-grouping mistake would show up as O(1) differences.
TOL_OUT = 1e-10
# Gradients go through one more matmul chain (softmax backward), still O(1e-15) in float64.
TOL_GRAD = 1e-8


def qkv(
    heads: int,
    kv_heads: int,
    s_q: int = 7,
    s_k: int | None = None,
    *,
    batch: int = 2,
    head_dim: int = 8,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
):
    gen = torch.Generator().manual_seed(seed)
    s_k = s_q if s_k is None else s_k
    q = torch.randn(batch, s_q, heads, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(batch, s_k, kv_heads, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(batch, s_k, kv_heads, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


def naive_attention(q, k, v, causal):
    """Attention written out per (batch, head, query) with the bottom-right causal convention:
    query i of s_q sees key j of s_k iff j <= i + (s_k - s_q). An independent oracle."""
    b, s_q, h, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    lse = torch.full((b, h, s_q), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            g = hi // (h // h_kv)  # query head hi reads KV head hi // group_size
            for i in range(s_q):
                visible = [j for j in range(s_k) if not causal or j <= i + (s_k - s_q)]
                if not visible:
                    continue
                scores = torch.stack([q[bi, i, hi] @ k[bi, j, g] for j in visible]) / math.sqrt(d)
                lse[bi, hi, i] = torch.logsumexp(scores, 0)
                probs = torch.softmax(scores, 0)
                out[bi, i, hi] = sum(p * v[bi, j, g] for p, j in zip(probs, visible))
    return out, lse


GQA = [pytest.param(4, 4, id="mha"), pytest.param(4, 2, id="gqa-4v2"), pytest.param(4, 1, id="mqa-4v1")]
CAUSAL = [pytest.param(True, id="causal"), pytest.param(False, id="full")]


# --------------------------------------------------------------------------------------------
# agreement with the reference


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_attention_matches_reference_out_and_lse(heads, kv_heads, causal):
    q, k, v = qkv(heads, kv_heads)
    out, lse = attention(q, k, v, causal)
    ref_out, ref_lse = reference_attention(q, k, v, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], heads, q.shape[1])
    torch.testing.assert_close(out, ref_out, atol=TOL_OUT, rtol=0)
    # lse is fp32 by contract; both sides round the same float64 value, so they agree exactly
    # unless the two float64 results straddle an fp32 rounding boundary (~1e-9 odds per element).
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=TOL_OUT, rtol=0)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_reference_matches_a_per_query_oracle(heads, kv_heads, causal):
    q, k, v = qkv(heads, kv_heads, s_q=5, batch=1)
    out, lse = reference_attention(q, k, v, causal)
    want_out, want_lse = naive_attention(q, k, v, causal)
    torch.testing.assert_close(out, want_out, atol=TOL_OUT, rtol=0)
    # lse is rounded to fp32: compare with fp32 resolution (2^-23 relative, values O(1)).
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-6, rtol=1e-6)


def test_causal_masking_hides_future_keys():
    q, k, v = qkv(2, 2)
    out, _ = attention(q, k, v, True)
    v_changed = v.clone()
    v_changed[:, -1] += 100.0  # only the last query may see the last key
    out_changed, _ = attention(q, k, v_changed, True)
    torch.testing.assert_close(out_changed[:, :-1], out[:, :-1], atol=TOL_OUT, rtol=0)
    assert (out_changed[:, -1] - out[:, -1]).abs().max() > 1.0


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_attention_gradients_match_reference(heads, kv_heads, causal):
    q, k, v = qkv(heads, kv_heads)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, _ = fn(*leaves, causal)
        return torch.autograd.grad(out, leaves, grad_out)

    for got, want, name in zip(grads(attention), grads(reference_attention), "qkv"):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=TOL_GRAD, rtol=0, msg=lambda m, name=name: f"d{name}: {m}")


# --------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("fn", [attention, reference_attention], ids=["attention", "reference"])
def test_lse_is_float32_and_out_keeps_input_dtype_for_bf16(fn):
    q, k, v = qkv(4, 2, dtype=torch.bfloat16)
    out, lse = fn(q, k, v, True)
    assert out.dtype == torch.bfloat16
    assert lse.dtype == torch.float32


def test_bf16_lse_is_close_to_the_float64_lse():
    q, k, v = qkv(4, 2, dtype=torch.bfloat16)
    _, lse = attention(q, k, v, True)
    _, ref = reference_attention(q.double(), k.double(), v.double(), True)
    # bf16 has an 8-bit mantissa (relative step 2^-8 ~ 4e-3); scores are sums of 8 products of
    # O(1) values, so a few bf16 steps of error, 0.05 absolute, is the most the kernel should lose.
    torch.testing.assert_close(lse.double(), ref.double(), atol=5e-2, rtol=0)


# --------------------------------------------------------------------------------------------
# shape errors


BAD_SHAPES = [
    pytest.param((2, 7, 4, 8), (2, 7, 2, 8), (2, 7, 2, 4), id="k-and-v-differ"),
    pytest.param((7, 4, 8), (7, 2, 8), (7, 2, 8), id="three-dims"),
    pytest.param((2, 7, 4, 8), (3, 7, 2, 8), (3, 7, 2, 8), id="batch-differs"),
    pytest.param((2, 7, 4, 8), (2, 7, 2, 16), (2, 7, 2, 16), id="head-dim-differs"),
    pytest.param((2, 7, 4, 8), (2, 7, 3, 8), (2, 7, 3, 8), id="heads-not-multiple-of-kv-heads"),
]


@pytest.mark.parametrize("fn", [attention, reference_attention], ids=["attention", "reference"])
@pytest.mark.parametrize("q_shape,k_shape,v_shape", BAD_SHAPES)
def test_shape_errors_are_value_errors(fn, q_shape, k_shape, v_shape):
    q, k, v = (torch.randn(s, dtype=torch.float64) for s in (q_shape, k_shape, v_shape))
    with pytest.raises(ValueError, match="attention"):
        fn(q, k, v, True)


# --------------------------------------------------------------------------------------------
# fewer keys than queries (bottom-right aligned causal mask)


def test_reference_fully_masked_rows_have_lse_minus_inf_and_zero_output():
    # 5 queries, 3 keys: query i sees keys j <= i - 2, so queries 0 and 1 see nothing.
    q, k, v = qkv(4, 2, s_q=5, s_k=3)
    out, lse = reference_attention(q, k, v, True)
    masked = lse[:, :, :2]
    assert torch.isneginf(masked).all(), masked
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))


def test_reference_rows_that_see_keys_are_exact_when_some_rows_are_masked():
    q, k, v = qkv(4, 2, s_q=5, s_k=3, batch=1)
    out, lse = reference_attention(q, k, v, True)
    want_out, want_lse = naive_attention(q, k, v, True)
    torch.testing.assert_close(out, want_out, atol=TOL_OUT, rtol=0)
    assert torch.isfinite(lse[:, :, 2:]).all()
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-6, rtol=1e-6)  # fp32 lse, as above


def test_reference_masked_rows_give_finite_zero_gradients():
    q, k, v = (t.requires_grad_(True) for t in qkv(4, 2, s_q=5, s_k=3))
    out, _ = reference_attention(q, k, v, True)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :2], torch.zeros_like(q.grad[:, :2]))


@pytest.mark.parametrize("s_q,s_k", [(3, 5), (5, 3)], ids=["more-keys", "fewer-keys"])
def test_attention_matches_reference_for_causal_unequal_lengths(s_q, s_k):
    q, k, v = qkv(4, 2, s_q=s_q, s_k=s_k)
    out, lse = attention(q, k, v, True)
    ref_out, ref_lse = reference_attention(q, k, v, True)
    torch.testing.assert_close(out, ref_out, atol=TOL_OUT, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=TOL_OUT, rtol=0)


# --------------------------------------------------------------------------------------------
# the pieces context parallelism builds on: block backward and the partial-result merge


@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("causal", CAUSAL)
def test_attention_backward_matches_autograd(heads, kv_heads, causal):
    from meshweave.kernels.attention import attention_backward

    q, k, v = qkv(heads, kv_heads, s_q=9)
    dout = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*leaves, causal)
    out.backward(dout)
    grads = attention_backward(dout, q, k, v, out.detach(), lse, causal)
    for got, leaf in zip(grads, leaves):
        assert (got - leaf.grad).abs().max() < TOL_GRAD


@pytest.mark.parametrize("causal", CAUSAL)
def test_block_gradients_with_final_out_and_lse_sum_to_the_full_gradient(causal):
    """Split the keys in two blocks: each block's backward, given the merged out/lse, contributes
    its part, and the parts add up to the gradient of attention over all keys (ring attention's
    backward relies on exactly this)."""
    from meshweave.kernels.attention import attention_backward, merge_partial

    q, k, v = qkv(4, 2, s_q=8)
    dout = torch.randn_like(q)
    first = reference_attention(q, k[:, :4], v[:, :4], False)
    second = reference_attention(q, k[:, 4:], v[:, 4:], False)
    out, lse = merge_partial(*merge_partial(None, None, *first), *second)
    dq1, dk1, dv1 = attention_backward(dout, q, k[:, :4], v[:, :4], out, lse, False)
    dq2, dk2, dv2 = attention_backward(dout, q, k[:, 4:], v[:, 4:], out, lse, False)
    dq, dk, dv = attention_backward(dout, q, k, v, *reference_attention(q, k, v, False), False)
    assert (dq1 + dq2 - dq).abs().max() < TOL_GRAD
    assert (torch.cat([dk1, dk2], 1) - dk).abs().max() < TOL_GRAD
    assert (torch.cat([dv1, dv2], 1) - dv).abs().max() < TOL_GRAD


def test_merging_key_blocks_equals_attention_over_all_keys():
    from meshweave.kernels.attention import merge_partial

    q, k, v = qkv(4, 2, s_q=6, s_k=12)
    out, lse = None, None
    for block in range(3):
        cols = slice(4 * block, 4 * block + 4)
        out, lse = merge_partial(out, lse, *reference_attention(q, k[:, cols], v[:, cols], False))
    want_out, want_lse = reference_attention(q, k, v, False)
    assert (out - want_out).abs().max() < TOL_OUT
    assert (lse - want_lse).abs().max() < TOL_OUT


def test_merge_skips_empty_rows_without_nan():
    """An all-masked block (lse = -inf) leaves the accumulator as it is, and an empty accumulator
    takes the block as it is — no -inf - -inf = NaN on either side."""
    from meshweave.kernels.attention import merge_partial

    q, k, v = qkv(2, 2, s_q=5)
    out, lse = reference_attention(q, k, v, False)
    empty_lse = torch.full_like(lse, float("-inf"))
    kept = merge_partial(out, lse, torch.zeros_like(out), empty_lse)
    taken = merge_partial(torch.zeros_like(out), empty_lse, out, lse)
    both_empty = merge_partial(torch.zeros_like(out), empty_lse, torch.zeros_like(out), empty_lse)
    for got_out, got_lse in (kept, taken):
        assert torch.equal(got_out, out) and torch.equal(got_lse, lse)
    assert not both_empty[0].isnan().any() and torch.isneginf(both_empty[1]).all()


def test_lse_is_fp32_for_bf16_inputs():
    q, k, v = qkv(4, 2, dtype=torch.bfloat16)
    out, lse = attention(q, k, v, True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


@pytest.mark.parametrize(
    "device, dtype, head_dim, aligned, kernel",
    [
        ("cpu", torch.float32, 64, True, "cpu_flash"),
        ("cpu", torch.float32, 64, False, "reference"),
        ("cuda", torch.bfloat16, 128, True, "cuda_flash"),
        ("cuda", torch.float16, 256, True, "cuda_flash"),
        ("cuda", torch.float32, 64, True, "reference"),
        ("cuda", torch.bfloat16, 512, True, "reference"),
        ("cuda", torch.bfloat16, 64, False, "reference"),
    ],
)
def test_one_dispatch_picks_the_kernel_for_forward_and_backward(device, dtype, head_dim, aligned, kernel):
    from meshweave.kernels.attention import kernel_for

    assert kernel_for(device, dtype, head_dim, aligned) == kernel


@pytest.mark.parametrize("device, kernel", [("cpu", "cpu_flash"), ("cuda", "flex"), ("xpu", "reference")])
def test_document_masks_dispatch_whatever_the_alignment(device, kernel):
    from meshweave.kernels.attention import kernel_for

    assert kernel_for(device, torch.float32, 64, False, documents=True) == kernel


def test_forward_and_backward_both_follow_the_dispatch(monkeypatch):
    import meshweave.kernels.attention as attn

    q, k, v = (torch.randn(1, 12, h, 16, dtype=torch.float64) for h in (4, 2, 2))
    dout = torch.randn_like(q)
    fused = attn.attention(q, k, v, True)
    fused_grads = attn.attention_backward(dout, q, k, v, *fused, True)
    calls = []
    monkeypatch.setattr(attn, "kernel_for", lambda *a: calls.append(a) or "reference")
    plain = attn.attention(q, k, v, True)
    plain_grads = attn.attention_backward(dout, q, k, v, *plain, True)
    assert len(calls) == 2  # the forward and the backward asked the same question
    # fp64: the fused CPU kernel and the plain twin agree to rounding
    for a, b in zip((*fused, *fused_grads), (*plain, *plain_grads)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# documents: a packed sequence's queries see only their own document's keys (fp64, exact to rounding)

DOCS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])


def _packed(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 12, h, 8, dtype=torch.float64, generator=gen) for h in (4, 2, 2))
    return q, k, v, torch.randn(2, 12, 4, 8, dtype=torch.float64, generator=gen)


def test_document_masked_attention_equals_each_document_alone():
    from meshweave.kernels.attention import attention, attention_backward

    q, k, v, dout = _packed()
    out, lse = attention(q, k, v, True, DOCS, DOCS)
    grads = attention_backward(dout, q, k, v, out, lse, True, DOCS, DOCS)
    for b in range(2):
        for doc in DOCS[b].unique():
            rows = (DOCS[b] == doc).nonzero().squeeze(1)
            alone = [t[b : b + 1, rows] for t in (q, k, v, dout)]
            o, l_ = attention(*alone[:3], True)
            g = attention_backward(alone[3], *alone[:3], o, l_, True)
            torch.testing.assert_close(out[b : b + 1, rows], o, rtol=1e-12, atol=1e-12)
            for got, want in zip(grads, g):
                torch.testing.assert_close(got[b : b + 1, rows], want, rtol=1e-12, atol=1e-12)


def test_document_masked_blocks_merge_to_the_whole_including_rows_a_block_never_sees():
    from meshweave.kernels.attention import attention, attention_backward, merge_partial

    q, k, v, dout = _packed(1)
    out, lse = attention(q, k, v, True, DOCS, DOCS)
    full = attention_backward(dout, q, k, v, out, lse, True, DOCS, DOCS)
    halves = (slice(0, 6), slice(6, 12))
    # (query block, key block, causal): the pairs a causal ring computes; (0, 1) is never visible
    pairs = [(0, 0, True), (1, 0, False), (1, 1, True)]
    merged: dict[int, tuple] = {0: (None, None), 1: (None, None)}
    for qi, ki, causal in pairs:
        rows, keys = halves[qi], halves[ki]
        bo, bl = attention(q[:, rows], k[:, keys], v[:, keys], causal, DOCS[:, rows], DOCS[:, keys])
        merged[qi] = merge_partial(*merged[qi], bo, bl)
    # some rows of the second half have no document in the first half's keys: their lse is -inf there
    assert torch.isneginf(attention(q[:, 6:], k[:, :6], v[:, :6], False, DOCS[:, 6:], DOCS[:, :6])[1]).any()
    torch.testing.assert_close(torch.cat([merged[0][0], merged[1][0]], 1), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([merged[0][1], merged[1][1]], 2), lse, rtol=1e-12, atol=1e-12)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qi, ki, causal in pairs:  # per-block gradients from the final (out, lse) sum to the whole
        rows, keys = halves[qi], halves[ki]
        g = attention_backward(
            dout[:, rows],
            q[:, rows],
            k[:, keys],
            v[:, keys],
            out[:, rows],
            lse[:, :, rows],
            causal,
            DOCS[:, rows],
            DOCS[:, keys],
        )
        dq[:, rows] += g[0]
        dk[:, keys] += g[1]
        dv[:, keys] += g[2]
    for got, want in zip((dq, dk, dv), full):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_document_ids_for_one_side_only_are_refused():
    from meshweave.kernels.attention import attention

    q, k, v, _ = _packed()
    with pytest.raises(ValueError, match="both"):
        attention(q, k, v, True, DOCS, None)


def test_document_kernels_agree_with_the_plain_twin_including_rows_that_see_nothing(monkeypatch):
    """The CPU flash kernel with an additive mask and flex_attention (CUDA's path, run eagerly
    here, forward only) against the reference, on a block whose first rows see no key."""
    import meshweave.kernels.attention as attn

    q, k, v, dout = _packed(2)
    q_docs, k_docs = DOCS, DOCS + (torch.arange(12) < 6)  # keys of the first half: other documents
    fused = attn.attention(q, k, v, False, q_docs, k_docs)
    fused_grads = attn.attention_backward(dout, q, k, v, *fused, False, q_docs, k_docs)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    flex_out, flex_lse = attn.flex_documents(qh, kh, vh, False, q_docs, k_docs)
    monkeypatch.setattr(attn, "kernel_for", lambda *a, **kw: "reference")
    plain = attn.attention(q, k, v, False, q_docs, k_docs)
    plain_grads = attn.attention_backward(dout, q, k, v, *plain, False, q_docs, k_docs)
    assert torch.isneginf(plain[1]).any() and not torch.isneginf(plain[1]).all()
    for a, b in zip((*fused, *fused_grads, flex_out.transpose(1, 2), flex_lse), (*plain, *plain_grads, *plain)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # fp64: rounding only
