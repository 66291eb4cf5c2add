"""Training data: tokenizers, prepared token files, the train/eval split, packing and sharded loading.

The pipeline is ``documents -> tokens.bin + index.json -> TokenCorpus -> PackedSequences ->
ShardedLoader``. Every step is deterministic, and the loader's only state is how many samples of
the global stream have been consumed, so a run resumes on exactly the next sample whatever its new
data-parallel degree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tokenizers
import torch

IGNORE_INDEX = -100
INDEX_FORMAT = 1
# Candidates for end-of-document in a tokenizer.json vocabulary, in order of preference.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
# Fixed salt for the split hash: the held-out set must not move when the training seed does.
_SPLIT_SALT = 0x6D657368776561FE


class Tokenizer(Protocol):
    """What the pipeline needs of a tokenizer. ``eos_id < vocab_size`` and no id reaches it."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus ``eos_id = 256``; needs no vocabulary file."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``; no eos is appended."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids in ``ids``; eos is dropped and invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers`` tokenizer.json behind the :class:`Tokenizer` interface.

    ``eos_id`` is the id of the first of :data:`EOS_CANDIDATES` in the vocabulary. A vocabulary
    without any of them gets one extra id appended for eos, so ``eos_id == vocab_size - 1`` and the
    tokenizer itself never emits it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._tok = tokenizers.Tokenizer.from_file(str(path))
        base = self._tok.get_vocab_size(with_added_tokens=True)
        found = (self._tok.token_to_id(t) for t in EOS_CANDIDATES)
        eos = next((i for i in found if i is not None), None)
        self.eos_id = base if eos is None else eos
        self.vocab_size = base + 1 if eos is None else base
        self._base = base

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the tokenizer's own special tokens (no bos/eos)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with eos (and any id outside the vocabulary) dropped."""
        keep = [int(i) for i in ids if int(i) != self.eos_id and 0 <= int(i) < self._base]
        return self._tok.decode(keep, skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"`` -> :class:`ByteTokenizer`; a tokenizer.json (or a directory holding one) ->
    :class:`HFTokenizer`."""
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer {spec!r}: expected 'bytes' or the path of a tokenizer.json")
    return HFTokenizer(path)


def embedded_documents() -> list[str]:
    """Python's own pydoc topic texts, one document per topic, in sorted-key order.

    Ships with every CPython, so a run needs no download and is identical on every machine.
    """
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


# --------------------------------------------------------------------------------------------
# prepared token files


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size - 1 <= np.iinfo(np.uint16).max else np.uint32)


def _read_documents(path: Path) -> list[str]:
    """The documents of one input file: the whole file, or each non-blank line's "text" of a .jsonl."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix != ".jsonl":
        return [text]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{lineno}: expected an object with a string "text" field')
        docs.append(record["text"])
    return docs


def prepare(inputs: list[str], tokenizer: str, out_dir: str) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``out_dir/tokens.bin`` + ``out_dir/index.json``; return the index.

    Each document is followed by eos, and ``doc_offsets[d]:doc_offsets[d + 1]`` is document ``d``
    including that eos. Both files are written under temporary names and renamed, index last, so
    ``out_dir`` either holds a complete index or none at all.
    """
    if not inputs:
        raise ValueError("prepare: no input files given")
    tok = load_tokenizer(tokenizer)
    dtype = _token_dtype(tok.vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp_tokens = out / f".tokens.bin.tmp-{os.getpid()}"
    tmp_index = out / f".index.json.tmp-{os.getpid()}"
    offsets = [0]
    try:
        with open(tmp_tokens, "wb") as f:
            for name in inputs:
                for doc in _read_documents(Path(name)):
                    ids = np.asarray(tok.encode(doc) + [tok.eos_id], dtype=dtype)
                    ids.tofile(f)
                    offsets.append(offsets[-1] + len(ids))
            f.flush()
            os.fsync(f.fileno())
        if len(offsets) == 1:
            raise ValueError(f"prepare: {len(inputs)} input file(s) hold no documents")
        index = {
            "format": INDEX_FORMAT, "dtype": dtype.name, "num_tokens": offsets[-1],
            "num_documents": len(offsets) - 1, "doc_offsets": offsets,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "tokenizer": tokenizer,
        }
        with open(tmp_index, "w", encoding="utf-8") as f:
            json.dump(index, f)
            f.flush()
            os.fsync(f.fileno())
        # An old index must not outlive the old tokens it describes.
        (out / "index.json").unlink(missing_ok=True)
        os.replace(tmp_tokens, out / "tokens.bin")
        os.replace(tmp_index, out / "index.json")
    finally:
        tmp_tokens.unlink(missing_ok=True)
        tmp_index.unlink(missing_ok=True)
    return index


class TokenCorpus:
    """A flat token array and where each document (with its trailing eos) starts and ends.

    ``doc_offsets`` has ``num_documents + 1`` non-decreasing entries from 0 to ``len(tokens)``.
    """

    def __init__(self, tokens: np.ndarray, doc_offsets: np.ndarray, vocab_size: int, eos_id: int) -> None:
        offsets = np.asarray(doc_offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(tokens) \
                or np.any(np.diff(offsets) < 0):
            raise ValueError(f"doc_offsets must rise from 0 to the token count {len(tokens)} "
                             "with at least one document")
        self.tokens = tokens
        self.doc_offsets = offsets
        self.vocab_size = int(vocab_size)
        self.eos_id = int(eos_id)

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def document(self, d: int) -> np.ndarray:
        """Tokens of document ``d``, ending in eos."""
        return self.tokens[self.doc_offsets[d]:self.doc_offsets[d + 1]]

    @classmethod
    def embedded(cls) -> TokenCorpus:
        """The pydoc topics, byte-tokenized in memory, eos after each."""
        tok = ByteTokenizer()
        docs = [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in embedded_documents()]
        offsets = np.cumsum([0] + [len(d) + 1 for d in docs])
        tokens = np.empty(offsets[-1], dtype=np.uint16)
        for d, ids in enumerate(docs):
            tokens[offsets[d]:offsets[d + 1] - 1] = ids
            tokens[offsets[d + 1] - 1] = tok.eos_id
        return cls(tokens, offsets, tok.vocab_size, tok.eos_id)

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> TokenCorpus:
        """Memory-map a directory written by :func:`prepare`, read-only; no token is read yet."""
        root = Path(directory)
        index = json.loads((root / "index.json").read_text(encoding="utf-8"))
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(f"{root / 'index.json'}: format {index.get('format')!r}, "
                             f"this version reads format {INDEX_FORMAT}")
        num_tokens = int(index["num_tokens"])
        tokens = np.memmap(root / "tokens.bin", dtype=np.dtype(index["dtype"]), mode="r", shape=(num_tokens,))
        return cls(tokens, np.asarray(index["doc_offsets"]), index["vocab_size"], index["eos_id"])


def corpus_from_source(source: str) -> TokenCorpus:
    """``"embedded"`` -> the in-memory pydoc corpus; anything else -> the prepared directory."""
    return TokenCorpus.embedded() if source == "embedded" else TokenCorpus.open(source)


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
        raise ValueError(f"eval_fraction={eval_fraction} needs at least 2 documents, "
                         f"the corpus has {num_documents}")
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
    last ``seq_len``, with the label after an eos input set to ``IGNORE_INDEX`` so no document is
    trained to predict the next one. Windows are gathered from spans on demand, so a memory-mapped
    corpus is read only where a window lands.
    """

    def __init__(self, corpus: TokenCorpus, doc_ids: Sequence[int] | np.ndarray, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        docs = np.unique(np.asarray(doc_ids, dtype=np.int64))
        if len(docs) and (docs[0] < 0 or docs[-1] >= corpus.num_documents):
            raise ValueError(f"doc_ids must lie in [0, {corpus.num_documents})")
        self._span_starts, span_lens = _spans(corpus.doc_offsets[docs], corpus.doc_offsets[docs + 1])
        self._cum = np.concatenate([[0], np.cumsum(span_lens)]).astype(np.int64)
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
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} sequences")
        pos, stop = i * self.seq_len, (i + 1) * self.seq_len + 1
        k = int(np.searchsorted(self._cum, pos, side="right")) - 1
        pieces = []
        while pos < stop:
            begin = int(self._span_starts[k] + pos - self._cum[k])
            take = min(stop, int(self._cum[k + 1])) - pos
            pieces.append(self.corpus.tokens[begin:begin + take])
            pos += take
            k += 1
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)``, both ``torch.long`` of shape ``[seq_len]``."""
        w = self.window(i)
        inputs, labels = w[:-1], w[1:].copy()
        labels[inputs == self.eos_id] = IGNORE_INDEX
        return torch.from_numpy(inputs), torch.from_numpy(labels)


def build_datasets(data_cfg: Any, seq_len: int,
                   seed: int) -> tuple[PackedSequences, PackedSequences, TokenCorpus]:
    """``(train, eval, corpus)`` for ``data_cfg.source`` split by ``data_cfg.eval_fraction``.

    ``seed`` does not enter the split: held-out documents are a property of the corpus, so runs
    with different seeds are evaluated on the same text. Train always has at least one sequence,
    and eval does whenever ``eval_fraction > 0``; otherwise this raises ValueError.
    """
    del seed
    corpus = corpus_from_source(data_cfg.source)
    train_ids, eval_ids = split_documents(corpus.num_documents, data_cfg.eval_fraction)
    train = PackedSequences(corpus, train_ids, seq_len)
    evals = PackedSequences(corpus, eval_ids, seq_len)
    need = seq_len + 1
    if len(train) == 0:
        raise ValueError(f"data.source={data_cfg.source!r}: the train split has {train.num_tokens} "
                         f"tokens, fewer than train.seq_len+1={need}; use more data or a shorter seq_len")
    if data_cfg.eval_fraction > 0 and len(evals) == 0:
        raise ValueError(f"data.eval_fraction={data_cfg.eval_fraction}: the {len(eval_ids)} held-out "
                         f"documents hold {evals.num_tokens} tokens, fewer than train.seq_len+1={need}; "
                         "raise data.eval_fraction or shorten train.seq_len")
    return train, evals, corpus


# --------------------------------------------------------------------------------------------
# sharded loading


class ShardedLoader:
    """Deterministic per-rank batches from one global sample stream, positioned by a sample count.

    Sample ``p`` of the stream is ``perm_e[p % n]`` with ``e = p // n``, ``n = len(dataset)`` and
    ``perm_e`` the permutation of ``range(n)`` drawn from a generator seeded ``seed + e``. A step's
    global batch is samples ``[consumed, consumed + global_batch)``; rank ``r`` takes the ``r``-th
    of ``dp_size`` equal contiguous slices. The stream never depends on ``dp_size``, so the state
    ``consumed_samples`` resumes exactly under any data-parallel degree that divides the batch.
    """

    def __init__(self, dataset: PackedSequences, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int, seed: int, consumed_samples: int = 0) -> None:
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
            raise ValueError(f"micro_batch={micro_batch} does not divide the per-rank batch "
                             f"{per_rank} (global_batch={global_batch} / dp_size={dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.dataset = dataset
        self.global_batch = global_batch
        self.micro_batch = micro_batch or per_rank
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self._consumed = consumed_samples
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
        n, out = len(self.dataset), []
        while len(out) < count:
            pos = start + len(out)
            epoch, offset = divmod(pos, n)
            take = min(count - len(out), n - offset)
            out.extend(self._permutation(epoch)[offset:offset + take].tolist())
        return out

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's microbatches ``(input_ids, labels)`` of ``[micro_batch, seq_len]`` for one
        step; advances ``consumed_samples`` by ``global_batch``."""
        per_rank = self.global_batch // self.dp_size
        rows = self._stream(self._consumed + self.dp_rank * per_rank, per_rank)
        batches = []
        for m in range(0, per_rank, self.micro_batch):
            pairs = [self.dataset[i] for i in rows[m:m + self.micro_batch]]
            batches.append((torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])))
        self._consumed += self.global_batch
        return batches

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
