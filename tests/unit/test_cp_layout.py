"""Specification of context-parallel sequence layouts (meshweave.parallel.context.layout).

Pure index arithmetic: every position is owned by exactly one rank, zigzag pairs chunk ``r`` with
chunk ``2P-1-r``, the hybrid's Ulysses ranks split their ring rank's shard contiguously, and a
length that does not split raises one LayoutError naming the multiple it needs.
"""

from __future__ import annotations

import pytest
import torch

from meshweave.parallel.context.layout import LayoutError, SequenceLayout

LAYOUTS = [
    pytest.param(SequenceLayout(ring=1, ulysses=4, zigzag=False), id="ulysses4"),
    pytest.param(SequenceLayout(ring=4, ulysses=1, zigzag=True), id="zigzag4"),
    pytest.param(SequenceLayout(ring=2, ulysses=2, zigzag=True), id="hybrid2x2"),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_position_is_owned_by_exactly_one_rank(layout):
    owned = layout.gather_order(48)
    assert sorted(owned.tolist()) == list(range(48))


def test_zigzag_rank_owns_chunk_r_and_its_mirror():
    layout = SequenceLayout(ring=4, ulysses=1, zigzag=True)
    assert layout.indices(16, 1).tolist() == [2, 3, 12, 13]
    assert layout.indices(16, 3).tolist() == [6, 7, 8, 9]


def test_hybrid_ulysses_ranks_split_their_ring_ranks_zigzag_shard_contiguously():
    hybrid = SequenceLayout(ring=2, ulysses=2, zigzag=True)
    ring_shard = SequenceLayout(ring=2, ulysses=1, zigzag=True).indices(16, 1)
    assert torch.equal(torch.cat([hybrid.indices(16, 2), hybrid.indices(16, 3)]), ring_shard)


def test_contiguous_layout_is_rank_ordered():
    layout = SequenceLayout(ring=1, ulysses=4, zigzag=False)
    assert torch.equal(layout.gather_order(12), torch.arange(12))


@pytest.mark.parametrize(
    "layout,seq_len,multiple",
    [
        (SequenceLayout(ring=4, ulysses=1, zigzag=True), 36, 8),
        (SequenceLayout(ring=1, ulysses=4, zigzag=False), 30, 4),
        (SequenceLayout(ring=2, ulysses=2, zigzag=True), 20, 8),
    ],
)
def test_a_length_that_does_not_split_names_the_multiple_needed(layout, seq_len, multiple):
    with pytest.raises(LayoutError, match=f"not a multiple of {multiple}"):
        layout.indices(seq_len, 0)
