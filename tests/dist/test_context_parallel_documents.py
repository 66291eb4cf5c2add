"""Specification of document-masked ring and TokenRing attention (``RingAttention`` / ``TokenRingAttention``
``.apply(q, k, v, causal, group, documents)``, what ``ContextParallel.attention(documents=...)`` runs).

With the document ids of the whole packed sequence, each method's local output and q/k/v gradient
shards equal single-device masked attention (kernels.attention with q_docs = k_docs = documents)
on the full sequence restricted to the rank's shard, at P in {2, 4}, causal or not, MHA and GQA,
for one document per row (which must also equal the unmasked run), many documents shorter than a
zigzag chunk, documents crossing chunk boundaries, and one-token documents. Blocks that hold no
visible pair in one document are skipped without a message, and the others carry only the rows
that take part in one: each rank's ledger bytes equal the count predicted from a brute-force mask
over global positions, and with short documents fall below the unmasked run's.

One spawned job per world size computes every case and returns the measured differences and
ledger entries; each test checks one behaviour of those results.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from meshweave.launch.harness import spawn
from meshweave.parallel.context.layout import SequenceLayout

pytestmark = pytest.mark.dist

BATCH, SEQ, HEADS, HEAD_DIM = 2, 64, 4, 8
HEAD_SHAPES = {"mha": 4, "gqa": 2}  # KV heads for HEADS query heads
METHODS = ("ring", "tokenring")
F64 = 8
# fp64 throughout: the shards do the reference's arithmetic blockwise with an fp64 merge, so they
# differ by rounding only (measured ~2e-15 absolute on values up to ~5); 1e-12 relative still
# catches a wrong mask, block or skip, which are O(1) errors.
TOL = 1e-12


def ids_of(lengths: list[int]) -> torch.Tensor:
    assert sum(lengths) == SEQ
    return torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])


def cycle(pattern: list[int]) -> list[int]:
    """Document lengths repeating ``pattern`` up to SEQ tokens (the last one cut to fit)."""
    lengths: list[int] = []
    for n in itertools.cycle(pattern):
        lengths.append(min(n, SEQ - sum(lengths)))
        if sum(lengths) == SEQ:
            return lengths
    raise AssertionError("unreachable")


# Zigzag chunks are 16 tokens at P=2 and 8 at P=4 (boundaries at multiples of 8).
DOCUMENTS = {
    # one document per row: nothing is masked beyond causality
    "one": [[SEQ], [SEQ]],
    # 2-3 tokens each, shorter than any chunk; row 0 ends a document on every chunk boundary,
    # row 1 crosses those at 8, 24, 40, 56 (P=4 only), so at P=4 neighbouring ranks still meet
    "short": [cycle([3, 2, 3]), cycle([3, 3, 3, 3, 2, 2])],
    # longer documents straddling chunk (and rank) boundaries
    "crossing": [[13, 22, 29], [5, 40, 19]],
    # one-token documents, in the middle and at both ends of a row
    "length-one": [[20, 1, 43], [1, 30, 1, 32]],
}


def documents_of(case: str) -> torch.Tensor:
    return torch.stack([ids_of(row) for row in DOCUMENTS[case]])


def full_inputs(kv_heads: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, SEQ, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
    k = torch.randn(BATCH, SEQ, kv_heads, HEAD_DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(BATCH, SEQ, kv_heads, HEAD_DIM, generator=gen, dtype=torch.float64)
    dout = torch.randn(BATCH, SEQ, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
    return q, k, v, dout


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from meshweave.comm.ops import LEDGER
    from meshweave.kernels.attention import attention
    from meshweave.parallel.context import ContextParallel
    from meshweave.parallel.context.ring import RingAttention
    from meshweave.parallel.context.tokenring import TokenRingAttention

    results: dict = {}
    for method in METHODS:
        cp = ContextParallel(dist.group.WORLD, method)  # its zigzag shard / unshard
        function = RingAttention if method == "ring" else TokenRingAttention
        for heads, kv_heads in HEAD_SHAPES.items():
            q, k, v, dout = full_inputs(kv_heads)
            for causal in (True, False):
                for case in [None, *DOCUMENTS]:
                    documents = None if case is None else documents_of(case)
                    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                    ref, _ = attention(*leaves, causal, q_docs=documents, k_docs=documents)
                    ref.backward(dout)
                    local = [cp.shard(t, 1).clone().requires_grad_() for t in (q, k, v)]
                    LEDGER.reset()
                    out = function.apply(*local, causal, cp.group, documents)[0]
                    forward_bytes = dict(LEDGER.total_bytes)
                    LEDGER.reset()
                    out.backward(cp.shard(dout, 1))
                    backward_bytes = dict(LEDGER.total_bytes)
                    got = [out.detach()] + [t.grad for t in local]
                    want = [cp.shard(t, 1) for t in [ref.detach()] + [leaf.grad for leaf in leaves]]
                    results[(method, heads, causal, case or "dense")] = {
                        "diffs": [relative_error(g, w) for g, w in zip(got, want)],
                        "tensors": got,
                        "forward": forward_bytes,
                        "backward": backward_bytes,
                    }
    return results


@functools.cache
def run(world: int) -> list[dict]:
    return spawn(worker, world, timeout=300)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("heads", list(HEAD_SHAPES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(DOCUMENTS))
def test_fp64_output_and_gradients_match_single_device_masked_attention(world, method, heads, causal, case):
    for rank_result in run(world):
        diffs = rank_result[(method, heads, causal, case)]["diffs"]
        assert max(diffs) < TOL, f"out/dq/dk/dv differences {diffs}"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_one_document_per_row_equals_the_unmasked_run(world, method, causal):
    for rank_result in run(world):
        masked = rank_result[(method, "gqa", causal, "one")]
        dense = rank_result[(method, "gqa", causal, "dense")]
        for got, want in zip(masked["tensors"], dense["tensors"]):
            assert relative_error(got, want) < TOL
        assert masked["forward"] == dense["forward"] and masked["backward"] == dense["backward"]


def involved(documents: torch.Tensor | None, world: int, causal: bool, q_rank: int, k_rank: int) -> tuple[int, int]:
    """Brute force: how many queries of ``q_rank`` and keys of ``k_rank`` take part in a pair that
    may attend (same document and, when causal, key not after query), from global positions.
    Without documents the positional mask alone: the zigzag halves."""
    ids = torch.zeros(BATCH, SEQ, dtype=torch.long) if documents is None else documents
    layout = SequenceLayout(ring=world, ulysses=1, zigzag=True)
    qi, ki = layout.indices(SEQ, q_rank), layout.indices(SEQ, k_rank)
    pairs = ids[:, qi, None] == ids[:, None, ki]
    if causal:
        pairs &= ki[None, :] <= qi[:, None]
    pairs = pairs.any(0)
    return int(pairs.any(1).sum()), int(pairs.any(0).sum())


def predicted_bytes(method: str, rank: int, world: int, causal: bool, kv_heads: int, case: str | None):
    """(forward, backward) bytes ``rank`` sends, restated from the design: for every other rank, the
    rows of each block between the two that take part in a visible pair (:func:`involved`), and
    nothing for a block with none. Ring: our K/V rows go to the query rank, in forward and again in
    backward, and the dK/dV rows of our block of its K/V go home. TokenRing: our query rows
    (backward: q, dout, out, lse) go to the key rank, and the (out, lse) (backward: dq) rows of its
    queries we computed go back."""
    documents = None if case is None else documents_of(case)
    kv_row, q_row, lse_row = 2 * BATCH * kv_heads * HEAD_DIM * F64, BATCH * HEADS * HEAD_DIM * F64, BATCH * HEADS * F64
    forward = backward = 0
    for other in range(world):
        if other == rank:
            continue
        if method == "ring":
            ours = involved(documents, world, causal, other, rank)[1]  # our keys ``other`` reads
            theirs = involved(documents, world, causal, rank, other)[1]  # its keys we read
            forward += ours * kv_row
            backward += (ours + theirs) * kv_row
        else:
            ours = involved(documents, world, causal, rank, other)[0]  # our queries ``other`` serves
            theirs = involved(documents, world, causal, other, rank)[0]  # its queries we serve
            forward += ours * q_row + theirs * (q_row + lse_row)
            backward += ours * (3 * q_row + lse_row) + theirs * q_row
    return forward, backward


def sent(ledger: dict) -> int:
    assert set(ledger) <= {"world/send"}, ledger
    return ledger.get("world/send", 0)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("heads", list(HEAD_SHAPES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", [None, *DOCUMENTS], ids=["dense", *DOCUMENTS])
def test_ledger_bytes_are_the_transfers_of_non_empty_blocks(world, method, heads, causal, case):
    for rank, rank_result in enumerate(run(world)):
        measured = rank_result[(method, heads, causal, case or "dense")]
        forward, backward = predicted_bytes(method, rank, world, causal, HEAD_SHAPES[heads], case)
        assert (sent(measured["forward"]), sent(measured["backward"])) == (forward, backward)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_short_documents_send_fewer_bytes_than_unmasked_on_every_rank(world, method, causal):
    for rank_result in run(world):
        short = rank_result[(method, "gqa", causal, "short")]
        dense = rank_result[(method, "gqa", causal, "dense")]
        total = lambda r: sent(r["forward"]) + sent(r["backward"])  # noqa: E731
        assert total(short) < total(dense)


# --------------------------------------------------------------------------------------------
# the public API, every method: ContextParallel.attention(q, k, v, causal, documents=...)

API_CASES = {
    2: [("ulysses", None, "ring"), ("ring", None, "ring"), ("tokenring", None, "ring")],
    4: [
        ("ulysses", None, "ring"),
        ("ring", None, "ring"),
        ("tokenring", None, "ring"),
        ("hybrid", 2, "ring"),
        ("hybrid", 2, "tokenring"),
    ],
}


def api_name(method: str, inner: str) -> str:
    return f"{method}-{inner}" if method == "hybrid" else method


def api_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from meshweave.kernels.attention import attention
    from meshweave.parallel.context import ContextParallel

    results: dict = {}
    q, k, v, dout = full_inputs(HEAD_SHAPES["gqa"], seed=1)
    for method, ulysses, inner in API_CASES[world]:
        cp = ContextParallel(dist.group.WORLD, method, ulysses_degree=ulysses, inner=inner)
        for causal in (True, False):
            for case in ("short", "crossing"):
                documents = documents_of(case)
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                ref, _ = attention(*leaves, causal, q_docs=documents, k_docs=documents)
                ref.backward(dout)
                local = [cp.shard(t, 1).clone().requires_grad_() for t in (q, k, v)]
                out = cp.attention(*local, causal=causal, documents=documents)
                out.backward(cp.shard(dout, 1))
                got = [out.detach()] + [t.grad for t in local]
                want = [cp.shard(t, 1) for t in [ref.detach()] + [leaf.grad for leaf in leaves]]
                results[(api_name(method, inner), causal, case)] = [relative_error(g, w) for g, w in zip(got, want)]
    try:
        shard = cp.shard(q, 1)
        cp.attention(shard, shard, shard, documents=cp.shard(documents_of("short"), 1))
    except ValueError as e:
        results["shard of the documents"] = str(e)
    return results


@functools.cache
def api_run(world: int) -> list[dict]:
    return spawn(api_worker, world, timeout=300)


@pytest.mark.parametrize(
    "world,method",
    [
        pytest.param(w, api_name(m, i), id=f"P{w}-{api_name(m, i)}")
        for w, cases in API_CASES.items()
        for m, _, i in cases
    ],
)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", ["short", "crossing"])
def test_every_method_through_the_public_api_matches_masked_attention_in_fp64(world, method, causal, case):
    for rank_result in api_run(world):
        diffs = rank_result[(method, causal, case)]
        assert max(diffs) < TOL, f"out/dq/dk/dv relative differences {diffs}"


def test_the_public_api_refuses_a_shard_of_the_documents():
    """Every rank must pass the whole sequence's ids (each needs all of them), not its own slice."""
    for rank_result in api_run(2):
        assert "whole sequence's ids" in rank_result["shard of the documents"]
