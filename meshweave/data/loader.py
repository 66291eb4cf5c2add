"""The sharded, resumable loader: each data-parallel rank's microbatches of every global batch.

The loader's only state is how many samples of the global stream have been consumed, so a run
resumes on exactly the next sample whatever its new data-parallel degree.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from meshweave.data.blend import BlendedSequences
from meshweave.data.datasets import PackedSequences


class Microbatch(NamedTuple):
    """One microbatch: ``inputs`` and ``labels`` ``[b, s]`` (int64) and the document ids of the
    inputs ``[b, s]`` (kernels/documents.py), or ``None`` when the loader was asked for none."""

    inputs: torch.Tensor
    labels: torch.Tensor
    documents: torch.Tensor | None = None


class ShardedLoader:
    """Deterministic per-rank batches from one global sample stream, positioned by a sample count.

    Sample ``p`` of the stream is ``perm_e[p % n]`` with ``e = p // n``, ``n = len(dataset)`` and
    ``perm_e`` the permutation of ``range(n)`` drawn from a generator seeded ``seed + e``. A step's
    global batch is samples ``[consumed, consumed + global_batch)``; rank ``r`` takes the ``r``-th
    of ``dp_size`` equal contiguous slices. The stream never depends on ``dp_size``, so the state
    ``consumed_samples`` resumes exactly under any data-parallel degree that divides the batch.
    A :class:`BlendedSequences` is read in its own order instead: sample ``p`` is its global sample
    ``p`` (blend.py), which is as independent of ``dp_size``.
    """

    def __init__(
        self,
        dataset: PackedSequences | BlendedSequences,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        consumed_samples: int = 0,
        documents: bool = False,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("ShardedLoader: the dataset has no sequences")
        if global_batch < 1 or dp_size < 1:
            raise ValueError(f"global_batch={global_batch} and dp_size={dp_size} must be >= 1")
        if global_batch % dp_size:
            raise ValueError(f"global_batch={global_batch} is not divisible by dp_size={dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        per_rank = global_batch // dp_size
        if micro_batch < 0 or (micro_batch and per_rank % micro_batch):
            raise ValueError(
                f"micro_batch={micro_batch} does not divide the per-rank batch "
                f"{per_rank} (global_batch={global_batch} / dp_size={dp_size})"
            )
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.dataset = dataset
        self.global_batch = global_batch
        self.micro_batch = micro_batch or per_rank
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self._consumed = consumed_samples
        self.documents = documents
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    @property
    def consumed_samples(self) -> int:
        """Samples of the global stream taken by all ranks together so far."""
        return self._consumed

    @property
    def epoch(self) -> int:
        """The epoch the next sample comes from."""
        return self._consumed // len(self.dataset)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(len(self.dataset), generator=g)
            self._perm_epoch = epoch
        return self._perm

    def _stream(self, start: int, count: int) -> list[int]:
        """Dataset indices of global samples ``[start, start + count)``, across epoch ends."""
        if isinstance(self.dataset, BlendedSequences):
            return list(range(start, start + count))
        n, out = len(self.dataset), list[int]()
        while len(out) < count:
            pos = start + len(out)
            epoch, offset = divmod(pos, n)
            take = min(count - len(out), n - offset)
            out.extend(self._permutation(epoch)[offset : offset + take].tolist())
        return out

    def next_batch(self) -> list[Microbatch]:
        """This rank's microbatches of ``[micro_batch, seq_len]`` for one step, with document ids
        when the loader was built with ``documents=True``; advances ``consumed_samples`` by
        ``global_batch``."""
        per_rank = self.global_batch // self.dp_size
        rows = self._stream(self._consumed + self.dp_rank * per_rank, per_rank)
        batches = []
        dataset = self.dataset
        for m in range(0, per_rank, self.micro_batch):
            chunk = rows[m : m + self.micro_batch]
            if isinstance(dataset, BlendedSequences):
                pairs = [dataset.sample(i, self.seed) for i in chunk]
                docs = [dataset.documents(i, self.seed) for i in chunk] if self.documents else None
            else:
                pairs = [dataset[i] for i in chunk]
                docs = [dataset.documents(i) for i in chunk] if self.documents else None
            batches.append(
                Microbatch(
                    torch.stack([x for x, _ in pairs]),
                    torch.stack([y for _, y in pairs]),
                    torch.stack(docs) if docs is not None else None,
                )
            )
        self._consumed += self.global_batch
        return batches

    def metrics(self) -> dict[str, dict[str, int]]:
        """``{"source_tokens": {path: tokens}}`` consumed from each source of a blend so far (all
        ranks together); empty for a single source."""
        if isinstance(self.dataset, BlendedSequences):
            return {"source_tokens": self.dataset.source_tokens(self._consumed)}
        return {}

    def state_dict(self) -> dict[str, int]:
        """The loader's position: everything needed to continue the same stream."""
        return {"consumed_samples": self._consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``. Its seed wins over the constructor's: it defines the stream."""
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed}")
        self._consumed = consumed
        self.seed = int(state["seed"])
        self._perm_epoch = -1
