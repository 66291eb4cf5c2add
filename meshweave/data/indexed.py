"""Megatron-LM's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``) as meshweave's prepared format.

Both files are written and read with megatron-core's ``megatron.core.datasets.indexed_dataset``, so a
prefix that Megatron-LM's ``tools/preprocess_data.py`` wrote trains here and ours trains there. The
``.idx`` holds the token dtype, each sequence's length and byte offset into the ``.bin``, and the
document indices (the sequence index where each document starts). A prefix meshweave wrote also has
``PREFIX.meshweave.json`` beside it (:func:`sidecar_path`): the vocabulary size, the eos id and
which tokenizer wrote the tokens, which the preflight checks compare with ``data.tokenizer``.

megatron-core is imported lazily (:func:`megatron_indexed`): importing it pulls in most of
megatron.core (seconds, and a warning that Transformer Engine / Apex are absent on CPU), which
``validate`` and the embedded corpus should not pay.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

SIDECAR_SUFFIX = ".meshweave.json"
LOSS_MASK_SUFFIX = ".loss_mask"
SIDECAR_FORMAT = 2  # format 1 was the tokens.bin + index.json directory
# Megatron's DType.optimal_dtype: uint16 below this vocabulary size, int32 from it on.
_UINT16_VOCAB_LIMIT = 65500
# The .idx header (megatron-core's _IndexWriter): magic, version 1, dtype code, sequence and document counts.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")
_IDX_DTYPE_CODES = range(1, 9)


class EmptyDatasetError(ValueError):
    """:func:`write_dataset` was given no document (the caller names the inputs that held none)."""


def megatron_indexed() -> ModuleType:
    """``megatron.core.datasets.indexed_dataset``, imported on first use with megatron-core's CPU
    warnings (no Transformer Engine / Apex, which this module never needs) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron stores for ``vocab_size`` ids: uint16 below 65,500, else int32."""
    return np.dtype(np.uint16 if vocab_size < _UINT16_VOCAB_LIMIT else np.int32)


def sidecar_path(prefix: str | os.PathLike[str]) -> Path:
    """Where meshweave's record of a prefix lives: ``PREFIX.meshweave.json``."""
    return Path(f"{os.fspath(prefix)}{SIDECAR_SUFFIX}")


def loss_mask_path(prefix: str | os.PathLike[str]) -> Path:
    """Where a prefix's per-token loss mask lives (chat data): ``PREFIX.loss_mask``, one byte per
    token of ``PREFIX.bin`` (1: the token is a training target). Megatron-LM does not read it."""
    return Path(f"{os.fspath(prefix)}{LOSS_MASK_SUFFIX}")


def open_loss_mask(prefix: str, num_tokens: int) -> np.ndarray | None:
    """``PREFIX.loss_mask`` memory-mapped read-only (uint8, ``num_tokens`` entries), or None when
    the dataset has none. ValueError when its length is not the token count."""
    path = loss_mask_path(prefix)
    if not path.is_file():
        return None
    size = path.stat().st_size
    if size != num_tokens:
        raise ValueError(f"{path} has {size:,} entries, the dataset {num_tokens:,} tokens; prepare it again")
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(num_tokens,))


def resolve_prefix(source: str | os.PathLike[str]) -> str:
    """The dataset prefix ``source`` names: itself when ``source.idx`` and ``source.bin`` exist, or the
    one prefix in the directory ``source``. ValueError (naming ``data.source`` and the fix) otherwise;
    reads no file, so :func:`meshweave.validation.validate` can call it."""
    path = Path(source)
    if path.is_dir():
        prefixes = sorted(str(p)[: -len(".idx")] for p in path.glob("*.idx") if not p.name.startswith("."))
        if len(prefixes) != 1:
            found = "no .idx file" if not prefixes else f"{len(prefixes)} prefixes ({', '.join(prefixes)})"
            raise ValueError(
                f"data.source={source}: the directory holds {found}; name one dataset prefix (PATH without "
                ".bin/.idx) or a directory holding exactly one, e.g. written by `meshweave data prepare`"
            )
        prefix = prefixes[0]
    else:
        prefix = os.fspath(source)
    missing = [p for p in (f"{prefix}.idx", f"{prefix}.bin") if not Path(p).is_file()]
    if missing:
        raise ValueError(
            f"data.source={source}: {' and '.join(missing)} not found; name a dataset prefix (PATH without "
            ".bin/.idx, as written by `meshweave data prepare` or Megatron-LM's preprocess_data.py) or 'embedded'"
        )
    return prefix


def read_sidecar(prefix: str) -> dict[str, Any] | None:
    """The record :func:`write_dataset` left beside ``prefix``, or None for a prefix written elsewhere
    (e.g. by Megatron-LM). ValueError when the file exists but is not such a record."""
    path = sidecar_path(prefix)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{path}: not a meshweave record of format {SIDECAR_FORMAT}")
    return record


@dataclass(frozen=True)
class IndexSummary:
    """What training needs of a ``.idx``: the token dtype, each document's token offsets (rising
    from 0 to ``num_tokens``, ``num_documents + 1`` entries) and the ``.bin`` path."""

    bin_path: str
    dtype: np.dtype
    doc_offsets: np.ndarray
    num_tokens: int

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1


def read_index(prefix: str) -> IndexSummary:
    """Read ``prefix.idx`` with megatron-core's ``IndexedDataset`` and check it against ``prefix.bin``.

    ValueError, one line saying what is wrong, when the ``.idx`` cannot be read, its sequences are
    not laid end to end, the ``.bin`` is shorter (truncated) or longer than the ``.idx`` describes,
    or there is no document. The ``.bin`` itself is not read.
    """
    idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
    _check_idx_header(idx_path)
    try:
        # mmap=False: the .bin is opened only on a read, so an empty or short .bin cannot fail here.
        ds = megatron_indexed().IndexedDataset(prefix, mmap=False)
        dtype = np.dtype(ds.index.dtype)
        lengths = np.array(ds.sequence_lengths, dtype=np.int64)
        pointers = np.array(ds.index.sequence_pointers, dtype=np.int64)
        documents = np.array(ds.document_indices, dtype=np.int64)
        del ds
    except (AssertionError, ValueError) as e:
        # megatron-core asserts that the sequence count and the last document index agree.
        why = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{idx_path} is not a readable Megatron .idx file ({why})") from None
    token_starts = np.concatenate([[0], np.cumsum(lengths)])
    if not np.array_equal(pointers, token_starts[:-1] * dtype.itemsize) or np.any(lengths < 0):
        raise ValueError(f"{idx_path} does not describe sequences laid end to end in {bin_path}")
    if len(documents) < 2 or documents[0] != 0 or np.any(np.diff(documents) < 0) or documents[-1] != len(lengths):
        if len(documents) == 1 and documents[0] == 0 and len(lengths) == 0:
            raise ValueError(f"{idx_path} holds no documents")
        raise ValueError(f"{idx_path}: its document indices do not rise from 0 to its {len(lengths)} sequences")
    num_tokens = int(token_starts[-1])
    if num_tokens == 0:
        raise ValueError(f"{idx_path} holds no documents with tokens")
    expected, actual = num_tokens * dtype.itemsize, os.path.getsize(bin_path)
    if actual < expected:
        raise ValueError(f"{bin_path} is truncated: {actual:,} bytes, its .idx describes {expected:,}")
    if actual > expected:
        raise ValueError(
            f"{idx_path} does not match {bin_path}: the .bin has {actual:,} bytes, the .idx describes {expected:,}"
        )
    return IndexSummary(bin_path, dtype, token_starts[documents], num_tokens)


def _check_idx_header(idx_path: str) -> None:
    """ValueError unless ``idx_path`` has a Megatron header and is as long as its counts say.

    Checked before megatron-core reads it because a failed ``IndexedDataset()`` leaves a half-built
    object whose ``__del__`` prints a traceback to stderr, which a one-line error must not carry.
    """
    with open(idx_path, "rb") as f:
        head = f.read(_IDX_HEADER.size)
    size = os.path.getsize(idx_path)
    if len(head) < _IDX_HEADER.size:
        raise ValueError(f"{idx_path} is not a readable Megatron .idx file ({size} bytes, shorter than its header)")
    magic, version, code, sequences, documents = _IDX_HEADER.unpack(head)
    if magic != _IDX_MAGIC or version != 1 or code not in _IDX_DTYPE_CODES:
        raise ValueError(f"{idx_path} is not a readable Megatron .idx file (bad header)")
    # int32 lengths and int64 pointers per sequence, int64 per document index; multimodal adds modes.
    need = _IDX_HEADER.size + 12 * sequences + 8 * documents
    if size < need:
        raise ValueError(
            f"{idx_path} is not a readable Megatron .idx file ({size:,} bytes, its counts need {need:,}: truncated)"
        )


def open_tokens(summary: IndexSummary) -> np.ndarray:
    """The ``.bin`` memory-mapped read-only as one flat token array; no token is read yet.

    The same view megatron-core's ``_MMapBinReader`` takes, without one reader object per dataset.
    """
    return np.memmap(summary.bin_path, dtype=summary.dtype, mode="r", shape=(summary.num_tokens,))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dataset(
    prefix: str | os.PathLike[str], documents: Iterable[np.ndarray], record: dict[str, Any]
) -> dict[str, Any]:
    """Write ``documents`` (token arrays, one sequence each) with megatron-core's
    ``IndexedDatasetBuilder`` as ``prefix.bin`` / ``prefix.idx``, and ``record`` plus the counts and
    dtype as ``prefix.meshweave.json``; return that sidecar.

    ``record`` must hold ``vocab_size`` (it picks the dtype: :func:`token_dtype`). Everything is
    written under temporary names and renamed with the ``.idx`` last, so the prefix either is a
    complete dataset or (no ``.idx``) not a dataset at all. :class:`EmptyDatasetError` for no document.
    """
    target = Path(prefix)
    target.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(int(record["vocab_size"]))
    tmp = {ext: target.with_name(f".{target.name}{ext}.tmp-{os.getpid()}") for ext in (".bin", ".idx", SIDECAR_SUFFIX)}
    import torch

    try:
        builder = megatron_indexed().IndexedDatasetBuilder(str(tmp[".bin"]), dtype=dtype.type)
        # The index stays in memory until finalize writes the .idx; as machine ints it costs 12 bytes
        # a document instead of two Python ints (~70), which keeps `data prepare`'s memory flat.
        builder.sequence_lengths, builder.document_indices = array("i"), array("q", [0])
        num_tokens = num_documents = 0
        try:
            for ids in documents:
                # A copy: the builder copies anyway, and torch rejects read-only (memory-mapped) arrays.
                builder.add_item(torch.from_numpy(np.array(ids, dtype=dtype)))
                builder.end_document()
                num_tokens, num_documents = num_tokens + len(ids), num_documents + 1
        finally:
            builder.finalize(str(tmp[".idx"]))  # also closes the .bin, even on an error
        if num_documents == 0:
            raise EmptyDatasetError(f"{target}: no documents to write")
        sidecar = {
            "format": SIDECAR_FORMAT,
            "dtype": dtype.name,
            "num_tokens": num_tokens,
            "num_documents": num_documents,
            **record,
        }
        tmp[SIDECAR_SUFFIX].write_text(json.dumps(sidecar), encoding="utf-8")
        for path in tmp.values():
            _fsync(path)
        # An old .idx must not outlive the old .bin it describes.
        Path(f"{target}.idx").unlink(missing_ok=True)
        os.replace(tmp[".bin"], f"{target}.bin")
        os.replace(tmp[SIDECAR_SUFFIX], sidecar_path(target))
        os.replace(tmp[".idx"], f"{target}.idx")
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return sidecar
