"""`meshweave data prepare`: documents -> ``tokens.bin`` + ``index.json`` (the prepared format).

``index.json`` holds the format version, the token dtype (uint16 when the vocabulary fits, else
uint32), the document offsets into ``tokens.bin``, the vocabulary size, the eos id and which
tokenizer wrote the tokens (:func:`meshweave.data.tokenizers.tokenizer_record`: its path, the
tokenizer.json's sha256, every special id); the directory is what ``data.source`` names and
:class:`meshweave.data.datasets.TokenCorpus` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from meshweave.data.tokenizers import load_tokenizer, tokenizer_record

INDEX_FORMAT = 1


# --------------------------------------------------------------------------------------------
# prepared token files


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest stored dtype that holds every id below ``vocab_size``."""
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
    dtype = token_dtype(tok.vocab_size)
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
            "format": INDEX_FORMAT,
            "dtype": dtype.name,
            "num_tokens": offsets[-1],
            "num_documents": len(offsets) - 1,
            "doc_offsets": offsets,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            **tokenizer_record(tokenizer, tok),
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
