"""`meshweave data prepare`: documents -> a Megatron indexed dataset, ``OUT/text_document.{bin,idx}``.

The format is Megatron-LM's (see :mod:`meshweave.data.indexed`): one sequence per document, each
ending in eos (as ``preprocess_data.py --append-eod`` writes), the token dtype uint16 below 65,500
ids and int32 above. Beside it, ``text_document.meshweave.json`` records the vocabulary size, the
eos id and which tokenizer wrote the tokens (:func:`meshweave.data.tokenizers.tokenizer_record`).
``data.source`` names the prefix ``OUT/text_document`` or just ``OUT``; Megatron-LM's
``--data-path OUT/text_document`` reads the same files. ``meshweave data convert`` rewrites a
directory of the previous format (``tokens.bin`` + ``index.json``) as such a prefix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from meshweave.data.indexed import EmptyDatasetError, token_dtype, write_dataset
from meshweave.data.tokenizers import load_tokenizer, tokenizer_record

PREFIX_NAME = "text_document"  # Megatron's preprocess_data.py names its outputs PREFIX_text_document
LEGACY_INDEX_FORMAT = 1  # tokens.bin + index.json, read only by convert


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
    """Tokenize ``inputs`` into the Megatron dataset ``out_dir/text_document``; return its sidecar.

    Each document is one sequence and one document of the ``.idx``, followed by eos. The files are
    written under temporary names and renamed, ``.idx`` last, so ``out_dir`` either holds a complete
    dataset or none at all.
    """
    if not inputs:
        raise ValueError("prepare: no input files given")
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)

    def documents() -> Iterator[np.ndarray]:
        for name in inputs:
            for doc in _read_documents(Path(name)):
                yield np.asarray(tok.encode(doc) + [tok.eos_id], dtype=dtype)

    record = {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, **tokenizer_record(tokenizer, tok)}
    try:
        return write_dataset(Path(out_dir) / PREFIX_NAME, documents(), record)
    except EmptyDatasetError:
        raise ValueError(f"prepare: {len(inputs)} input file(s) hold no documents") from None


def convert(old_dir: str, out_prefix: str) -> dict[str, Any]:
    """Rewrite a directory of the previous prepared format (``tokens.bin`` + ``index.json``) as the
    Megatron dataset ``out_prefix``; return its sidecar. Tokens, document boundaries and the
    tokenizer record are kept, so the data trains exactly as before."""
    root = Path(old_dir)
    try:
        index = json.loads((root / "index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{root}: not a directory of the old format (index.json: {e})") from None
    if not isinstance(index, dict) or index.get("format") != LEGACY_INDEX_FORMAT:
        raise ValueError(f"{root / 'index.json'}: not an index.json of format {LEGACY_INDEX_FORMAT}")
    offsets = np.asarray(index["doc_offsets"], dtype=np.int64)
    tokens = np.memmap(root / "tokens.bin", dtype=np.dtype(index["dtype"]), mode="r", shape=(int(index["num_tokens"]),))
    keep = ("vocab_size", "eos_id", "tokenizer", "tokenizer_sha256", "eos_ids", "bos_id", "pad_id")
    record = {k: index[k] for k in keep if k in index}
    docs = (tokens[offsets[d] : offsets[d + 1]] for d in range(len(offsets) - 1))
    return write_dataset(out_prefix, docs, record)
