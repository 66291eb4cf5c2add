"""The documents of a packed sequence, as attention and RoPE see them.

A training sequence packs several documents end to end. With document masking a token attends
only to the tokens of its own document and its rotary position counts from its document's first
token (Megatron's ``reset_attention_mask`` / ``reset_position_ids``). Both follow from one integer
tensor of **document ids** ``[b, S]``: equal for the tokens of one document, different across a
boundary. The first document of a row starts at position 0 even when it began in an earlier
sequence.

:class:`Documents` carries the ids of the *whole* sequence together with which of its positions
this model holds (a context-parallel shard, or all of them), so the local kernel and every
context-parallel method find their query and key documents in one place. :func:`attend` is the
model's default attention op with that argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meshweave.kernels.attention import attention

Tensor = torch.Tensor


def document_positions(ids: Tensor) -> Tensor:
    """Position of every token within its document, ``[b, S] -> [b, S]`` (int64): 0 where the id
    differs from the previous token's (and at position 0), counting up from there."""
    index = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
    starts = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def single_document_rows(ids: Tensor) -> bool:
    """True when every row holds one document: masking then changes nothing, so callers may pass
    no documents at all and keep the dense kernels."""
    return bool((ids == ids[:, :1]).all())


@dataclass(frozen=True)
class Documents:
    """Document ids ``ids [b, S]`` of the full sequence and ``index`` ``[s]``, the global positions
    of the tokens this model holds in local order (``None``: all ``S`` of them, in order).

    Every rank of a context-parallel group holds the same ``ids``; ``index`` is its shard.
    """

    ids: Tensor
    index: Tensor | None = None

    def local_ids(self) -> Tensor:
        """Document ids ``[b, s]`` of this model's own tokens."""
        return self.ids if self.index is None else self.ids.index_select(1, self.index.to(self.ids.device))

    def rope_positions(self) -> Tensor:
        """Rotary positions ``[b, s]`` of this model's own tokens: restart at each document."""
        positions = document_positions(self.ids)
        return positions if self.index is None else positions.index_select(1, self.index.to(positions.device))


def attend(q: Tensor, k: Tensor, v: Tensor, causal: bool, documents: Documents | None = None) -> tuple[Tensor, Tensor]:
    """The single-device attention op of the model seam: :func:`~meshweave.kernels.attention.attention`
    with queries and keys both from this model's tokens, within documents when given."""
    if documents is None:
        return attention(q, k, v, causal)
    ids = documents.local_ids()
    return attention(q, k, v, causal, q_docs=ids, k_docs=ids)
