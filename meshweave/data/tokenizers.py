"""Tokenizers: bytes (the embedded corpus) or a Hugging Face tokenizer.json, behind one protocol.

A Hugging Face model directory supplies its special ids beside ``tokenizer.json``:
``generation_config.json`` (``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``, the ids
``generate`` stops and pads on) wins over ``tokenizer_config.json`` (``bos_token`` / ``eos_token`` /
``pad_token`` as token strings), which wins over the older ``special_tokens_map.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import tokenizers

# Candidates for end-of-document in a tokenizer.json vocabulary, in order of preference.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
# Files beside tokenizer.json that name special tokens by string, most authoritative first.
_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class Tokenizer(Protocol):
    """What the pipeline needs of a tokenizer. ``eos_id < vocab_size`` and no id reaches it."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus ``eos_id = 256``; needs no vocabulary file."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``; no eos is appended."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``."""
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids in ``ids``; eos is dropped and invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def _read_json(path: Path) -> dict[str, Any]:
    """``path`` as a JSON object, or ``{}`` when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_string(value: Any, where: str) -> str | None:
    """A special token as written in tokenizer_config.json: a string, ``{"content": ...}`` or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    raise ValueError(f'{where}: expected a token string or {{"content": ...}}, got {value!r}')


def _id_list(value: Any, where: str) -> list[int]:
    """A generation_config.json id: an int, a list of ints (several stop ids) or null."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{where}: expected a non-negative token id or a list of them, got {value!r}")
    return ids


class HFTokenizer:
    """A ``tokenizers`` tokenizer.json behind the :class:`Tokenizer` interface.

    ``eos_ids`` are the end-of-sequence ids of the model directory (see the module docstring) and
    ``eos_id``, the end-of-document id, is the first of them. Without any, ``eos_id`` is the first of
    :data:`EOS_CANDIDATES` in the vocabulary; a vocabulary without those gets one extra id appended
    for eos, so the tokenizer itself never emits it. ``bos_id`` / ``pad_id`` are None when no file
    names one. ``vocab_size`` is one more than the largest id the tokenizer can emit or any of these
    ids, so ``vocab_size <= model.vocab_size`` means every token has an embedding row.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        raw = self.path.read_bytes()
        try:
            self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{self.path}: not a Hugging Face tokenizer.json ({e})") from None
        self.sha256 = hashlib.sha256(raw).hexdigest()
        ids = self._special_ids(self.path.parent)
        self.bos_id: int | None = ids["bos"][0] if ids["bos"] else None
        self.pad_id: int | None = ids["pad"][0] if ids["pad"] else None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        top = max([*vocab.values(), *ids["bos"], *ids["eos"], *ids["pad"]], default=-1) + 1
        if not ids["eos"]:
            found = (vocab.get(t) for t in EOS_CANDIDATES)
            ids["eos"] = [next((i for i in found if i is not None), top)]
        self.eos_ids: tuple[int, ...] = tuple(ids["eos"])
        self.eos_id: int = self.eos_ids[0]
        self.vocab_size: int = max(top, self.eos_id + 1)
        self._emits = max(vocab.values(), default=-1) + 1

    def _special_ids(self, root: Path) -> dict[str, list[int]]:
        """bos / eos / pad ids from the files beside tokenizer.json, the first file naming one winning."""
        gen = _read_json(root / "generation_config.json")
        where = root / "generation_config.json"
        found = {k: _id_list(gen.get(f"{k}_token_id"), f"{where}: {k}_token_id") for k in ("bos", "eos", "pad")}
        for name in _TOKEN_FILES:
            conf = _read_json(root / name)
            for kind, ids in found.items():
                token = _token_string(conf.get(f"{kind}_token"), f"{root / name}: {kind}_token")
                if ids or token is None:
                    continue
                tid = self._tok.token_to_id(token)
                if tid is None:
                    raise ValueError(f"{root / name}: {kind}_token {token!r} is not in {root / 'tokenizer.json'}")
                found[kind] = [tid]
        return found

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the tokenizer's own special tokens (no bos/eos)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]`` in one call of the Rust batch encoder (on its thread pool
        unless ``TOKENIZERS_PARALLELISM=false``; ``encode_batch_fast``, tokenizers >= 0.21, skips
        the offsets)."""
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in batch(texts, add_special_tokens=False)]

    def encode_batch_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """``(ids, character offsets [start, end) of each token)`` of every text, no special tokens
        added (chat data: which tokens fall in a trained span)."""
        return [(e.ids, e.offsets) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with every eos id (and any id outside the vocabulary) dropped."""
        keep = [int(i) for i in ids if int(i) not in self.eos_ids and 0 <= int(i) < self._emits]
        return self._tok.decode(keep, skip_special_tokens=False)


def tokenizer_file(spec: str) -> Path:
    """The tokenizer.json that ``spec`` (a path to it or to the directory holding it) names."""
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer {spec!r}: expected 'bytes', a Hugging Face model directory or a tokenizer.json")
    return path


def load_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"`` -> :class:`ByteTokenizer`; a tokenizer.json (or a directory holding one) ->
    :class:`HFTokenizer` with the special ids of the files beside it. ValueError for anything else."""
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(tokenizer_file(spec))


def tokenizer_record(spec: str, tok: Tokenizer) -> dict[str, Any]:
    """The index.json fields that say which tokenizer wrote the tokens: ``tokenizer`` ('bytes' or
    the absolute path given), the tokenizer.json's sha256, and every special id."""
    if not isinstance(tok, HFTokenizer):
        return {"tokenizer": spec, "eos_ids": [tok.eos_id], "bos_id": None, "pad_id": None}
    return {
        "tokenizer": str(Path(spec).resolve()),
        "tokenizer_sha256": tok.sha256,
        "eos_ids": list(tok.eos_ids),
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
    }


def tokenizer_mismatch(index: dict[str, Any], spec: str, tok: Tokenizer) -> str | None:
    """Why the tokens described by ``index`` cannot have come from ``tok`` (named ``spec``) and the fix,
    or None if they can.

    The same tokenizer.json content with the same end-of-document id matches wherever it lives, so
    a copied model directory is accepted; an index from before the sha256 was recorded is
    compared by path.
    """
    recorded = str(index.get("tokenizer", "bytes"))
    if recorded == "bytes" or not isinstance(tok, HFTokenizer):
        same = recorded == "bytes" and not isinstance(tok, HFTokenizer)
    elif "tokenizer_sha256" in index:
        same = index["tokenizer_sha256"] == tok.sha256
    else:
        same = Path(recorded).resolve() in (tok.path.resolve(), tok.path.parent.resolve())
    again = f"prepare the data again with --tokenizer {spec}"
    if not same:
        return f"it was prepared with tokenizer {recorded}; use --data.tokenizer={recorded} or {again}"
    if int(index["eos_id"]) != tok.eos_id:
        return f"its documents end in id {index['eos_id']}, the tokenizer's eos is now {tok.eos_id}; {again}"
    return None
