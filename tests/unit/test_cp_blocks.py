"""Specification of the block plan of ring / TokenRing attention (meshweave.parallel.context.blockwise).

Pure index arithmetic on one process. On P zigzag ranks the block (query rank, key rank) is empty
exactly when no query of the one shares a document with a key of the other that the causal mask
lets it see; the plan's query / key rows hold every visible pair of a block and, off the diagonal,
only rows that take part in one, all of whose pairs are visible by position (so those blocks run
unmasked but for documents). Checked against a brute-force mask over global
positions, for random packings and the edge cases (one document, one-token documents).
"""

from __future__ import annotations

import pytest
import torch

from meshweave.parallel.context.blockwise import BlockPlan, block_plan, block_visible, chunk_sharing
from meshweave.parallel.context.layout import SequenceLayout


def ids_of(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])


def random_rows(seq: int, batch: int, max_len: int, seed: int) -> torch.Tensor:
    """``batch`` rows of document ids with lengths drawn uniformly from 1..max_len."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths, total = [], 0
        while total < seq:
            n = min(int(torch.randint(1, max_len + 1, (1,), generator=gen)), seq - total)
            lengths.append(n)
            total += n
        rows.append(ids_of(lengths))
    return torch.stack(rows)


def visible_pairs(documents: torch.Tensor, size: int, causal: bool, q_rank: int, k_rank: int) -> torch.Tensor:
    """``bool [b, s, s]``: which (local query, local key) pairs of the two ranks' shards may attend,
    from global positions: same document and, when causal, key not after query."""
    layout = SequenceLayout(ring=size, ulysses=1, zigzag=True)
    qi, ki = layout.indices(documents.shape[1], q_rank), layout.indices(documents.shape[1], k_rank)
    same = documents[:, qi, None] == documents[:, None, ki]
    return same & (ki[None, :] <= qi[:, None]) if causal else same


# 64 tokens: chunks of 8 (P=4) or 16 (P=2); documents shorter than, around and longer than a chunk.
CASES = [
    pytest.param(random_rows(64, 2, max_len, seed), id=f"lengths1-{max_len}-seed{seed}")
    for seed, max_len in [(0, 3), (1, 3), (2, 9), (3, 20), (4, 40)]
] + [
    pytest.param(ids_of([64]).expand(2, 64), id="one-document"),
    pytest.param(torch.arange(64).expand(2, 64), id="one-token-documents"),
]


@pytest.mark.parametrize("documents", CASES)
@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_a_block_is_empty_exactly_when_no_pair_in_it_may_attend(documents, size, causal):
    sharing = chunk_sharing(documents, size)
    for qr in range(size):
        for kr in range(size):
            want = bool(visible_pairs(documents, size, causal, qr, kr).any())
            assert block_visible(sharing, size, qr, kr, causal) == want, (qr, kr)


def selected(rows, seq: int) -> torch.Tensor:
    """``bool [seq]``: the rows a plan's slice or index tensor picks."""
    mask = torch.zeros(seq, dtype=torch.bool)
    mask[rows] = True
    return mask


@pytest.mark.parametrize("documents", CASES)
@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_block_rows_hold_every_visible_pair_and_off_the_diagonal_nothing_else(documents, size, causal):
    seq = documents.shape[1] // size
    plan = BlockPlan(documents, size, causal, seq)
    for qr in range(size):
        for kr in range(size):
            if not plan.visible(qr, kr):
                continue
            pairs = visible_pairs(documents, size, causal, qr, kr)
            rows, cols = selected(plan.rows(qr, kr), seq), selected(plan.cols(qr, kr), seq)
            inside = rows[:, None] & cols[None, :]
            assert not (pairs & ~inside).any(), (qr, kr)
            if not plan.masked(qr, kr):
                # Run unmasked but for documents: position alone hides nothing inside, and every
                # row and key kept takes part in a visible pair (the rest would be sent for nothing).
                position = visible_pairs(torch.zeros_like(documents), size, causal, qr, kr)
                assert position[:, inside].all(), (qr, kr)
                assert torch.equal(pairs.any(0).any(1), rows) and torch.equal(pairs.any(0).any(0), cols), (qr, kr)
            layout = SequenceLayout(ring=size, ulysses=1, zigzag=True)
            q_pos = layout.indices(documents.shape[1], qr)[plan.rows(qr, kr)]
            k_pos = layout.indices(documents.shape[1], kr)[plan.cols(qr, kr)]
            ids = plan.kernel_args(qr, kr)
            if ids:
                assert torch.equal(ids["q_docs"], documents[:, q_pos])
                assert torch.equal(ids["k_docs"], documents[:, k_pos])
            else:  # no ids only where each batch row of the block is one document: masking is a no-op
                block = torch.cat([documents[:, q_pos], documents[:, k_pos]], dim=1)
                assert (block == block[:, :1]).all()


def test_one_document_leaves_every_block_visible():
    plan = BlockPlan(ids_of([64]).expand(2, 64), 4, True, 16)
    assert all(plan.visible(qr, kr) for qr in range(4) for kr in range(4))


def test_without_documents_every_block_is_visible_and_takes_the_dense_kernel():
    plan = BlockPlan(None, 4, True, 16)
    assert all(plan.visible(qr, kr) for qr in range(4) for kr in range(4))
    assert plan.kernel_args(1, 2) == {}


def test_one_token_documents_leave_only_the_diagonal():
    plan = BlockPlan(torch.arange(64).expand(2, 64), 4, False, 16)
    assert [[plan.visible(qr, kr) for kr in range(4)] for qr in range(4)] == [
        [qr == kr for kr in range(4)] for qr in range(4)
    ]


def test_a_document_crossing_a_chunk_boundary_joins_exactly_its_two_ranks():
    # 4 ranks, chunks of 8: chunk 1 (rank 1) and chunk 2 (rank 2) share the document at 14..17;
    # every other chunk boundary is a document boundary.
    documents = ids_of([8, 6, 4, 6, 8, 8, 8, 8, 8]).unsqueeze(0)
    plan = BlockPlan(documents, 4, True, 16)
    off_diagonal = {(qr, kr) for qr in range(4) for kr in range(4) if qr != kr and plan.visible(qr, kr)}
    assert off_diagonal == {(2, 1)}  # rank 2's queries see rank 1's earlier keys, not the reverse


def test_ids_are_compared_by_equality_only():
    documents = random_rows(64, 2, 5, seed=7)
    relabelled = 10**12 - 1_000_003 * documents  # another injective labelling: negative, huge, descending
    assert torch.equal(chunk_sharing(documents, 4), chunk_sharing(relabelled, 4))


@pytest.mark.parametrize("documents", CASES)
@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_own_block_pieces_cover_every_visible_pair_once(documents, size, causal):
    seq = documents.shape[1] // size
    plan = BlockPlan(documents, size, causal, seq)
    for rank in range(size):
        pairs = visible_pairs(documents, size, causal, rank, rank)
        cover = torch.zeros(seq, seq, dtype=torch.int64)
        for rows, cols, masked in plan.own_parts(rank):
            cover[rows, cols] += 1
            if not masked:  # a piece run without the causal mask holds no pair hidden by position
                position = visible_pairs(torch.zeros_like(documents), size, causal, rank, rank)
                assert position[:, rows, cols].all()
        assert (cover <= 1).all() and not (pairs.any(0) & (cover == 0)).any(), rank


def test_block_plan_is_reused_for_the_same_ids_tensor_and_rebuilt_for_any_other():
    # Every layer of a microbatch (and its backward) passes the same ids tensor: one plan for all.
    documents = torch.arange(64).div(8, rounding_mode="floor").expand(2, 64)
    plan = block_plan(documents, 4, True, 16)
    assert block_plan(documents, 4, True, 16) is plan
    assert block_plan(documents.clone(), 4, True, 16) is not plan  # equal values, another tensor
    assert block_plan(documents, 2, True, 32) is not plan  # another layout
    changed = documents.clone()
    plan = block_plan(changed, 4, True, 16)
    changed[:, 8:16] = 99  # modified in place: its plan would be stale
    assert block_plan(changed, 4, True, 16) is not plan
