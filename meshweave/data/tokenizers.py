"""Tokenizers: bytes (the embedded corpus) or a Hugging Face tokenizer.json, behind one protocol."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import tokenizers

# Candidates for end-of-document in a tokenizer.json vocabulary, in order of preference.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")


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
