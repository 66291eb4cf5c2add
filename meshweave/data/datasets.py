"""Datasets: the token corpus (embedded or prepared), the train/eval split and packing into samples.

The pipeline is ``documents -> PREFIX.bin + PREFIX.idx (Megatron's indexed dataset, indexed.py) ->
TokenCorpus -> PackedSequences -> ShardedLoader`` (loader.py). Every step is deterministic: the
split is a hash of the document index, packing a pure function of the corpus and the sequence
length.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from meshweave.data.indexed import open_loss_mask, open_tokens, read_index, read_sidecar, resolve_prefix, token_dtype
from meshweave.data.tokenizers import ByteTokenizer, load_tokenizer

IGNORE_INDEX = -100  # the label of a position that has no target (the loss skips it)
# Fixed salt for the split hash: the held-out set must not move when the training seed does.
_SPLIT_SALT = 0x6D657368776561FE


def embedded_documents() -> list[str]:
    """Python's own pydoc topic texts, one document per topic, in sorted-key order.

    Ships with every CPython, so a run needs no download and is identical on every machine.
    """
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


class TokenCorpus:
    """A flat token array and where each document (with its trailing eos) starts and ends.

    ``doc_offsets`` has ``num_documents + 1`` non-decreasing entries from 0 to ``len(tokens)``.
    ``loss_mask`` (chat data), aligned with ``tokens``: 1 where a token is a training target, 0
    where it is only context (a prompt); None trains on every token.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        doc_offsets: np.ndarray,
        vocab_size: int,
        eos_id: int,
        loss_mask: np.ndarray | None = None,
    ) -> None:
        offsets = np.asarray(doc_offsets, dtype=np.int64)
        if (
            offsets.ndim != 1
            or len(offsets) < 2
            or offsets[0] != 0
            or offsets[-1] != len(tokens)
            or np.any(np.diff(offsets) < 0)
        ):
            raise ValueError(
                f"doc_offsets must rise from 0 to the token count {len(tokens)} with at least one document"
            )
        if loss_mask is not None and len(loss_mask) != len(tokens):
            raise ValueError(f"loss_mask has {len(loss_mask)} entries for {len(tokens)} tokens")
        self.tokens = tokens
        self.loss_mask = loss_mask
        self.doc_offsets = offsets
        self.vocab_size = int(vocab_size)
        self.eos_id = int(eos_id)

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def document(self, d: int) -> np.ndarray:
        """Tokens of document ``d``, ending in eos."""
        return self.tokens[self.doc_offsets[d] : self.doc_offsets[d + 1]]

    @classmethod
    def embedded(cls, tokenizer: str = "bytes") -> TokenCorpus:
        """The pydoc topics tokenized in memory by ``tokenizer`` (see :func:`load_tokenizer`), eos
        after each. The same ids :func:`prepare` would write for the topics as documents."""
        tok = load_tokenizer(tokenizer)
        texts = embedded_documents()
        if isinstance(tok, ByteTokenizer):  # the bytes themselves, without a Python list per byte
            docs = [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]
        else:
            docs = [np.asarray(tok.encode(text), dtype=np.int64) for text in texts]
        return cls.from_documents(docs, tok.vocab_size, tok.eos_id)

    @classmethod
    def from_documents(cls, docs: Sequence[np.ndarray], vocab_size: int, eos_id: int) -> TokenCorpus:
        """A corpus of the token arrays ``docs`` in order, eos appended to each, stored in the
        narrowest dtype that holds ``vocab_size`` ids."""
        offsets = np.cumsum([0] + [len(d) + 1 for d in docs])
        tokens = np.empty(offsets[-1], dtype=token_dtype(vocab_size))
        for d, ids in enumerate(docs):
            tokens[offsets[d] : offsets[d + 1] - 1] = ids
            tokens[offsets[d + 1] - 1] = eos_id
        return cls(tokens, offsets, vocab_size, eos_id)

    @classmethod
    def open(cls, source: str | os.PathLike[str], tokenizer: str = "bytes") -> TokenCorpus:
        """Memory-map the Megatron dataset ``source`` names (a prefix, or a directory holding exactly
        one), read-only; no token is read yet. Documents are the ``.idx``'s document indices. The
        vocabulary size and eos id come from the meshweave sidecar, or, for a prefix written
        elsewhere (Megatron-LM's preprocess_data.py), from ``tokenizer``."""
        prefix = resolve_prefix(source)
        summary = read_index(prefix)
        record = read_sidecar(prefix)
        if record is None:
            tok = load_tokenizer(tokenizer)
            vocab_size, eos_id = tok.vocab_size, tok.eos_id
        else:
            vocab_size, eos_id = int(record["vocab_size"]), int(record["eos_id"])
        mask = open_loss_mask(prefix, summary.num_tokens)
        return cls(open_tokens(summary), summary.doc_offsets, vocab_size, eos_id, mask)


def corpus_from_source(source: str, tokenizer: str = "bytes") -> TokenCorpus:
    """``"embedded"`` -> the in-memory pydoc corpus tokenized by ``tokenizer``; anything else -> the
    Megatron dataset prefix (or directory), whose tokens are already ids (preflight checks
    ``tokenizer`` wrote them)."""
    return TokenCorpus.embedded(tokenizer) if source == "embedded" else TokenCorpus.open(source, tokenizer)


# --------------------------------------------------------------------------------------------
# train / eval split


def _unit_hash(indices: np.ndarray) -> np.ndarray:
    """A salted splitmix64 of each index, as a float uniform in [0, 1). Same on every machine."""
    with np.errstate(over="ignore"):
        z = indices.astype(np.uint64) + np.uint64(_SPLIT_SALT)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def split_documents(num_documents: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Ascending (train, eval) document ids: disjoint, together all of ``range(num_documents)``.

    Document ``d`` is held out iff its hash is below ``eval_fraction``, except that eval gets the
    lowest-hashing document if it would otherwise be empty (for ``eval_fraction > 0``) and train
    keeps the highest-hashing one if it would be.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction > 0 and num_documents < 2:
        raise ValueError(f"eval_fraction={eval_fraction} needs at least 2 documents, the corpus has {num_documents}")
    ids = np.arange(num_documents, dtype=np.int64)
    h = _unit_hash(ids)
    held = h < eval_fraction
    if eval_fraction > 0 and not held.any():
        held[np.argmin(h)] = True
    if held.all():
        held[np.argmax(h)] = False
    return ids[~held], ids[held]


# --------------------------------------------------------------------------------------------
# packing


def _spans(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of maximal runs of adjacent ``[start, end)`` ranges, in order."""
    if len(starts) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # Neighbouring documents become one span: fewer spans, fewer slices per window.
    breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1
    first = np.concatenate([[0], breaks]).astype(np.int64)
    last = np.concatenate([breaks - 1, [len(starts) - 1]]).astype(np.int64)
    return starts[first], ends[last] - starts[first]


class PackedSequences:
    """Fixed-length training windows over a split's documents, packed end to end.

    The stream is the chosen documents in ascending order, each ending in eos. Window ``i`` is
    ``stream[i*seq_len : (i+1)*seq_len + 1]``: inputs are its first ``seq_len`` tokens, labels its
    last ``seq_len``, with the label after an eos input, and after each document's last token, set
    to ``IGNORE_INDEX`` so no document is trained to predict the next one (the document ends
    matter for Megatron data tokenized without ``--append-eod``, whose documents end in no eos).
    With a corpus ``loss_mask`` (chat data) the mask decides instead of eos (templates end turns
    with the eos token inside a conversation): a label whose token is not a target is ignored.
    Windows are gathered from spans on demand, so a memory-mapped corpus is read only where a
    window lands.
    """

    def __init__(self, corpus: TokenCorpus, doc_ids: Sequence[int] | np.ndarray, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        docs = np.unique(np.asarray(doc_ids, dtype=np.int64))
        if len(docs) and (docs[0] < 0 or docs[-1] >= corpus.num_documents):
            raise ValueError(f"doc_ids must lie in [0, {corpus.num_documents})")
        self._span_starts, span_lens = _spans(corpus.doc_offsets[docs], corpus.doc_offsets[docs + 1])
        self._cum = np.concatenate([[0], np.cumsum(span_lens)]).astype(np.int64)
        # Stream position just past each chosen document (ascending): where a document ends.
        self._doc_ends = np.cumsum(corpus.doc_offsets[docs + 1] - corpus.doc_offsets[docs]).astype(np.int64)
        self.corpus = corpus
        self.doc_ids = docs
        self.seq_len = seq_len
        self.eos_id = corpus.eos_id

    @property
    def num_tokens(self) -> int:
        """Length of the packed stream, eos tokens included."""
        return int(self._cum[-1])

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def window(self, i: int) -> np.ndarray:
        """The ``seq_len + 1`` stream tokens of window ``i`` as int64."""
        return self._gather(self.corpus.tokens, i).astype(np.int64)

    def _gather(self, values: np.ndarray, i: int) -> np.ndarray:
        """Window ``i``'s ``seq_len + 1`` entries of ``values``, an array aligned with the corpus tokens."""
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} sequences")
        pos, stop = i * self.seq_len, (i + 1) * self.seq_len + 1
        k = int(np.searchsorted(self._cum, pos, side="right")) - 1
        pieces = []
        while pos < stop:
            begin = int(self._span_starts[k] + pos - self._cum[k])
            take = min(stop, int(self._cum[k + 1])) - pos
            pieces.append(values[begin : begin + take])
            pos += take
            k += 1
        return np.concatenate(pieces)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)``, both ``torch.long`` of shape ``[seq_len]``."""
        w = self.window(i)
        inputs, labels = w[:-1], w[1:].copy()
        if self.corpus.loss_mask is None:  # chat templates use the eos token inside conversations
            labels[inputs == self.eos_id] = IGNORE_INDEX
        pos = i * self.seq_len
        lo, hi = np.searchsorted(self._doc_ends, [pos, pos + self.seq_len], side="right")
        labels[self._doc_ends[lo:hi] - 1 - pos] = IGNORE_INDEX
        if self.corpus.loss_mask is not None:  # chat data: only the targets' tokens are predicted
            labels[self._gather(self.corpus.loss_mask, i)[1:] == 0] = IGNORE_INDEX
        return torch.from_numpy(inputs), torch.from_numpy(labels)

    def documents(self, i: int) -> torch.Tensor:
        """Document ids ``[seq_len]`` (int64) of window ``i``'s input tokens: 0 for the document the
        window starts in, +1 at each document start after it (a document's eos is its own)."""
        pos = i * self.seq_len
        first = np.searchsorted(self._doc_ends, pos, side="right")
        ids = np.searchsorted(self._doc_ends, np.arange(pos, pos + self.seq_len), side="right") - first
        return torch.from_numpy(ids.astype(np.int64))
