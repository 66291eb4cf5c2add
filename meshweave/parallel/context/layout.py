"""How a sequence is laid out over context-parallel ranks, and the divisibility each method needs.

Two layouts:

- **contiguous** (Ulysses): rank ``i`` of ``P`` owns tokens ``[i N/P, (i+1) N/P)``; the
  all-to-all gathers the full sequence back in rank order.
- **zigzag** (ring, TokenRing): the sequence is cut into ``2P`` chunks and rank ``i`` owns chunks
  ``i`` and ``2P-1-i``, concatenated. Under a causal mask every rank then has the same amount
  of work (an early chunk with little to attend to paired with a late one with much), and every
  off-diagonal block is either fully visible or fully hidden for one of the two halves — the
  block schedule of ``ring.py`` / ``tokenring.py`` relies on exactly that.
- **hybrid** (Ulysses inside, ring across): ring rank ``j`` owns zigzag shard ``j`` of ``R``;
  within its Ulysses group of ``U`` consecutive ranks that shard is cut contiguously, so the
  Ulysses all-to-all reassembles exactly the ring rank's zigzag shard.

Everything here is index arithmetic on one process; :class:`SequenceLayout` is what
``ContextParallel.shard`` / ``unshard`` / ``positions`` use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


class LayoutError(ValueError):
    """A sequence length the chosen context-parallel method cannot split; the message says why."""


@dataclass(frozen=True)
class SequenceLayout:
    """Which global token positions each of ``ring * ulysses`` ranks owns.

    ``zigzag`` applies across the ``ring`` ranks; the ``ulysses`` ranks of one ring rank split
    its tokens contiguously. Rank ``i`` of the CP group has ring index ``i // ulysses`` and
    Ulysses index ``i % ulysses`` (Ulysses over consecutive ranks).
    """

    ring: int
    ulysses: int
    zigzag: bool
    method: str = "context parallelism"

    @property
    def size(self) -> int:
        return self.ring * self.ulysses

    def chunks(self) -> int:
        """How many equal pieces the sequence is cut into: what its length must divide by."""
        return (2 * self.ring if self.zigzag else self.ring) * self.ulysses

    def check(self, seq_len: int) -> None:
        """Raise :class:`LayoutError` unless ``seq_len`` splits evenly for this layout."""
        if seq_len % self.chunks():
            shape = f"{2 * self.ring} zigzag chunks" if self.zigzag else f"{self.ring} pieces"
            if self.ulysses > 1 and self.ring > 1:
                shape += f" x {self.ulysses} Ulysses pieces"
            raise LayoutError(
                f"{self.method} over {self.size} ranks cuts the sequence into {shape}: "
                f"sequence length {seq_len} is not a multiple of {self.chunks()}"
            )

    def indices(self, seq_len: int, rank: int) -> Tensor:
        """Global positions (``int64 [seq_len / size]``) owned by CP rank ``rank``, in local order."""
        self.check(seq_len)
        ring_rank, ulysses_rank = divmod(rank, self.ulysses)
        if self.zigzag:
            chunk = seq_len // (2 * self.ring)
            first = torch.arange(ring_rank * chunk, (ring_rank + 1) * chunk)
            mirror = 2 * self.ring - 1 - ring_rank
            owned = torch.cat([first, torch.arange(mirror * chunk, (mirror + 1) * chunk)])
        else:
            chunk = seq_len // self.ring
            owned = torch.arange(ring_rank * chunk, (ring_rank + 1) * chunk)
        return owned.chunk(self.ulysses)[ulysses_rank]

    def gather_order(self, seq_len: int) -> Tensor:
        """Positions of every rank's shard concatenated in rank order (the inverse of sharding)."""
        return torch.cat([self.indices(seq_len, r) for r in range(self.size)])
