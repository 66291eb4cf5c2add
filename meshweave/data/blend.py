"""Weighted blends of prepared sources (``data.blend``, Megatron-LM's ``"W1 PATH1 W2 PATH2 ..."`` syntax).

The blended stream is built as Megatron's ``BlendedDataset`` builds it: global sample ``i`` goes to
the source whose count so far is furthest below its normalised weight times ``max(i, 1)`` (ties to
the first source), and is that source's next sample. So over any prefix of ``N`` samples each
source's share is within about ``1/N`` of its weight. Within a source, sample ``k`` is window
``perm_e[k % n]`` of its packed split, ``e = k // n`` its epoch and ``perm_e`` a permutation drawn
from ``(seed, source, e)``: a source that runs out wraps around into a new order. Global sample
index -> (source, window) is a pure function, so the loader resumes a blend by sample count exactly
as it resumes one source, under any data-parallel degree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from meshweave.data.datasets import PackedSequences

# Blend positions computed per extension of the cached greedy order.
_CHUNK = 1 << 16


def parse_blend(spec: str) -> list[tuple[float, str]]:
    """``(weight, path)`` pairs of ``spec``, weights normalised to sum 1. ValueError naming
    ``data.blend`` and the fix for an odd number of items, a weight that is not a finite number
    or one that is not positive."""
    items = spec.split()
    fix = 'write weight and dataset prefix pairs, e.g. --data.blend="0.7 path/a 0.3 path/b"'
    if not items or len(items) % 2:
        raise ValueError(f"data.blend={spec!r}: {len(items)} items, not weight and path pairs; {fix}")
    pairs = []
    for w, path in zip(items[::2], items[1::2], strict=True):
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"data.blend: weight {w!r} (before {path}) is not a number; {fix}") from None
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"data.blend: weight {w} of {path} is not a positive number; {fix}")
        pairs.append((weight, path))
    total = sum(w for w, _ in pairs)
    return [(w / total, path) for w, path in pairs]


class BlendOrder:
    """The greedy blend order of ``weights`` (normalised): which source each global sample comes
    from and its index within that source. Computed from sample 0 and cached in chunks, so every
    lookup is the same pure function of the global index (about 1.4 s per million samples the first
    time a run reaches them, e.g. when it resumes)."""

    def __init__(self, weights: Sequence[float]) -> None:
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        self._source = np.zeros(0, dtype=np.int16)  # 10 bytes a sample with _within: 100 MB per 10M
        self._within = np.zeros(0, dtype=np.int64)
        self._counts = [0] * len(self.weights)

    def _extend(self, upto: int) -> None:
        start = len(self._source)
        stop = max(upto, start + _CHUNK)
        source, within = np.empty(stop - start, np.int16), np.empty(stop - start, np.int64)
        counts, weights, ids = self._counts, self.weights, range(len(self.weights))
        for j, i in enumerate(range(start, stop)):
            scale = float(max(i, 1))
            s = max(ids, key=lambda t: weights[t] * scale - counts[t])  # first maximum, as Megatron
            source[j], within[j] = s, counts[s]
            counts[s] += 1
        self._source = np.concatenate([self._source, source])
        self._within = np.concatenate([self._within, within])

    def lookup(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within source) of global samples ``[start, start + count)``."""
        if start < 0 or count < 0:
            raise ValueError(f"blend positions must be >= 0, got start={start} count={count}")
        if start + count > len(self._source):
            self._extend(start + count)
        return self._source[start : start + count], self._within[start : start + count]

    def counts(self, n: int) -> list[int]:
        """Samples each source contributed to the first ``n`` global samples."""
        source, _ = self.lookup(0, n)
        return np.bincount(source, minlength=len(self.weights)).tolist()


class BlendedSequences:
    """An endless stream of samples mixing several sources' packed splits by weight (see module doc).

    The loader reads it by global sample index (:meth:`sample`), not through its own permutation.
    ``len`` is the sources' windows together: one nominal epoch of the blend.
    """

    def __init__(self, sources: Sequence[PackedSequences], weights: Sequence[float], names: Sequence[str]) -> None:
        if not 0 < len(sources) < 2**15 or len(sources) != len(weights) or len(sources) != len(names):
            raise ValueError("BlendedSequences needs one weight and one name per source, and a source")
        self.sources = list(sources)
        self.names = list(names)
        self.order = BlendOrder(weights)
        self.seq_len = sources[0].seq_len
        self._perms: dict[int, tuple[int, int, np.ndarray]] = {}

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def _window(self, s: int, k: int, seed: int) -> int:
        n = len(self.sources[s])
        epoch, offset = divmod(k, n)
        cached = self._perms.get(s)
        if cached is None or cached[:2] != (seed, epoch):
            perm = np.random.default_rng([seed & 0xFFFFFFFF, s, epoch]).permutation(n)
            cached = self._perms[s] = (seed, epoch, perm)
        return int(cached[2][offset])

    def locate(self, i: int, seed: int) -> tuple[int, int]:
        """``(source, window)`` of global sample ``i`` for the loader seed ``seed``."""
        source, within = self.order.lookup(i, 1)
        s = int(source[0])
        return s, self._window(s, int(within[0]), seed)

    def sample(self, i: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` of global sample ``i``, as :meth:`PackedSequences.__getitem__`."""
        s, w = self.locate(i, seed)
        return self.sources[s][w]

    def documents(self, i: int, seed: int) -> torch.Tensor:
        """Document ids of global sample ``i``, as :meth:`PackedSequences.documents`."""
        s, w = self.locate(i, seed)
        return self.sources[s].documents(w)

    def source_tokens(self, consumed: int) -> dict[str, int]:
        """Input tokens each source contributed to the first ``consumed`` global samples."""
        return {name: c * self.seq_len for name, c in zip(self.names, self.order.counts(consumed), strict=True)}


def build_blend(
    spec: str, tokenizer: str, eval_fraction: float, seq_len: int
) -> tuple[BlendedSequences, BlendedSequences]:
    """``(train, eval)`` blends of the sources ``spec`` names: each source is split and packed as a
    lone ``data.source`` is, and both splits mix the sources with the same weights. ValueError
    naming ``data.blend`` when a source's split holds no sequence."""
    from meshweave.data.datasets import TokenCorpus, split_documents

    pairs = parse_blend(spec)
    trains, evals = [], []
    for _, path in pairs:
        corpus = TokenCorpus.open(path, tokenizer)
        train_ids, eval_ids = split_documents(corpus.num_documents, eval_fraction)
        train, held = PackedSequences(corpus, train_ids, seq_len), PackedSequences(corpus, eval_ids, seq_len)
        if len(train) == 0:
            raise ValueError(
                f"data.blend: source {path}'s train split has {train.num_tokens} tokens, fewer than "
                f"train.seq_len+1={seq_len + 1}; use more data or a shorter seq_len"
            )
        if eval_fraction > 0 and len(held) == 0:
            raise ValueError(
                f"data.blend: source {path}'s {len(eval_ids)} held-out documents hold {held.num_tokens} tokens, "
                f"fewer than train.seq_len+1={seq_len + 1}; raise data.eval_fraction or shorten train.seq_len"
            )
        trains.append(train)
        evals.append(held)
    weights, names = [w for w, _ in pairs], [p for _, p in pairs]
    train_blend = BlendedSequences(trains, weights, names)
    eval_blend = BlendedSequences(evals, weights, names)
    return train_blend, eval_blend
