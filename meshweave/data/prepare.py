"""`meshweave data prepare`: documents -> a Megatron indexed dataset, ``OUT/text_document.{bin,idx}``.

The format is Megatron-LM's (see :mod:`meshweave.data.indexed`): one sequence per document, each
ending in eos (as ``preprocess_data.py --append-eod`` writes), the token dtype uint16 below 65,500
ids and int32 above. Beside it, ``text_document.meshweave.json`` records the vocabulary size, the
eos id, which tokenizer wrote the tokens (:func:`meshweave.data.tokenizers.tokenizer_record`) and
how many malformed records ``--skip-bad`` left out. ``data.source`` names the prefix
``OUT/text_document`` or just ``OUT``; Megatron-LM's ``--data-path OUT/text_document`` reads the same
files. ``meshweave data convert`` rewrites a directory of the previous format (``tokens.bin`` +
``index.json``) as such a prefix.

The pipeline is reader -> encoder -> writer. :class:`meshweave.data.readers.InputStream` streams
records; they are cut into batches (``batch_size`` records, at most :data:`BATCH_BYTES` of input),
each batch is encoded by an encoder (:class:`TextEncoder`: record batch -> token ids + lengths +
the malformed records), in ``workers`` processes when more than one, and the writer takes the
encoded batches in input order, so the output does not depend on ``workers``. At most
``2 * workers`` batches are in flight, which bounds memory whatever the corpus size.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from meshweave.data.indexed import (
    SIDECAR_SUFFIX,
    EmptyDatasetError,
    megatron_indexed,
    sidecar_path,
    token_dtype,
    write_dataset,
)
from meshweave.data.readers import ROW, TEXT, InputStream, Record
from meshweave.data.tokenizers import load_tokenizer, tokenizer_record

PREFIX_NAME = "text_document"  # Megatron's preprocess_data.py names its outputs PREFIX_text_document
LEGACY_INDEX_FORMAT = 1  # tokens.bin + index.json, read only by convert
BATCH_BYTES = 8 << 20  # a batch also ends at this much input, so huge documents do not pile up
# Why a record is malformed: the sidecar's "skipped" keys.
BAD_REASONS = ("not_utf8", "bad_json", "not_object", "missing_key", "not_string")


@dataclass
class Encoded:
    """One encoded batch: its documents' tokens end to end (eos included) and their lengths, in
    input order, and the records left out as ``(reason, "file:line: why")``, also in input order."""

    tokens: np.ndarray
    lengths: np.ndarray
    bad: list[tuple[str, str]] = field(default_factory=list)


class TextEncoder:
    """Record batch -> :class:`Encoded`: the string at ``text_key`` (a text file: its whole content),
    tokenized with the tokenizer's batch encoding, followed by eos.

    The encoder is what a record means; a later one (chat: token ids plus a loss mask) plugs into
    :func:`prepare` in its place. Built once per worker process from a picklable factory. The
    tokenizer's batch encoding (``encode_batch``) does the work.
    """

    def __init__(self, tokenizer: str, text_key: str = "text") -> None:
        self.tok = load_tokenizer(tokenizer)
        self.text_key = text_key
        self.dtype = token_dtype(self.tok.vocab_size)

    @property
    def columns(self) -> list[str]:
        """The fields a columnar reader must load."""
        return [self.text_key]

    def _text(self, rec: Record) -> str | tuple[str, str]:
        """The document of ``rec``, or ``(reason, message)`` when it is malformed."""
        key = self.text_key
        if rec.kind == ROW:
            value = rec.data[key]
        else:
            try:
                text = rec.data.decode("utf-8")
            except UnicodeDecodeError as e:
                what = "text" if rec.kind == TEXT else "line"
                return "not_utf8", f"{rec.where()}: not UTF-8 {what} ({e.reason} at byte {e.start})"
            if rec.kind == TEXT:
                return text
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                return "bad_json", f"{rec.where()}: not JSON ({e.msg}: column {e.colno})"
            if not isinstance(value, dict):
                return "not_object", f'{rec.where()}: expected a JSON object with a string "{key}" field'
            if key not in value:
                return "missing_key", f'{rec.where()}: no "{key}" field (name the text field with --text-key)'
            value = value[key]
        if not isinstance(value, str):
            return "not_string", f'{rec.where()}: "{key}" is {type(value).__name__}, not a string'
        return value

    def __call__(self, records: list[Record]) -> Encoded:
        texts, bad = [], []
        for rec in records:
            text = self._text(rec)
            if isinstance(text, str):
                texts.append(text)
            else:
                bad.append(text)
        ids = self.tok.encode_batch(texts)
        lengths = np.fromiter((len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
        tokens = np.empty(int(lengths.sum()), dtype=self.dtype)
        ends = np.cumsum(lengths)
        for d, end in zip(ids, ends):
            tokens[end - len(d) - 1 : end - 1] = d
        tokens[ends - 1] = self.tok.eos_id
        return Encoded(tokens, lengths, bad)


# --------------------------------------------------------------------------------------------
# batches in, encoded batches out (in order)


def _batches(records: Iterable[Record], batch_size: int) -> Iterator[list[Record]]:
    """``records`` cut into lists of ``batch_size`` records or :data:`BATCH_BYTES` of input."""
    batch: list[Record] = []
    size = 0
    for rec in records:
        batch.append(rec)
        size += len(rec.data) if rec.kind != ROW else sum(len(str(v)) for v in rec.data.values())
        if len(batch) >= batch_size or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_WORKER_ENCODER: Callable[[list[Record]], Encoded] | None = None


def _exit_with_parent(parent: int) -> None:
    """Poll the parent's pid and end this worker once it is gone (a SIGKILLed prepare cannot shut
    its pool down, and the workers would otherwise wait on their queue for ever)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _init_worker(factory: Callable[[], Callable[[list[Record]], Encoded]], parent: int) -> None:
    global _WORKER_ENCODER
    # One core per worker: --workers is the parallelism, the tokenizer's own thread pool must not add to it.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    _WORKER_ENCODER = factory()


def _encode_in_worker(batch: list[Record]) -> Encoded:
    assert _WORKER_ENCODER is not None, "_init_worker runs first"
    return _WORKER_ENCODER(batch)


def encoded_batches(
    batches: Iterable[list[Record]],
    factory: Callable[[], Callable[[list[Record]], Encoded]],
    workers: int,
    local: Callable[[list[Record]], Encoded] | None = None,
) -> Iterator[Encoded]:
    """The encoding of each batch, in input order, by ``workers`` processes (spawned, each building
    its encoder with ``factory``; 1 encodes in this process, with ``local`` when given, else one
    from ``factory``). At most ``2 * workers`` batches are submitted ahead of the one yielded."""
    if workers == 1:
        encoder = local if local is not None else factory()
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker is one core, as in the pool
        try:
            for batch in batches:
                yield encoder(batch)
        finally:
            if before is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch and tokenizer threads
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(factory, os.getpid()))
    pending: deque[Future[Encoded]] = deque()
    try:
        for batch in batches:
            pending.append(pool.submit(_encode_in_worker, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# progress


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _hms(secs: float) -> str:
    minutes, s = divmod(round(secs), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


class Progress:
    """Documents, tokens, tokens/s and (when the input size is known) percent and ETA on
    ``stream``: redrawn in place at most every 0.25 s on a terminal, else one line every
    ``interval`` s; the first report comes after the first batch, the summary line at the end."""

    def __init__(self, stream: TextIO | None, total_bytes: int | None, interval: float | None = None) -> None:
        self.stream = stream
        self.tty = bool(stream is not None and stream.isatty())
        self.interval = interval if interval is not None else (0.25 if self.tty else 10.0)
        self.total_bytes = total_bytes
        self.start = time.perf_counter()
        self.last: float | None = None

    def update(self, docs: int, tokens: int, bytes_read: int) -> None:
        now = time.perf_counter()
        if self.stream is None or (self.last is not None and now - self.last < self.interval):
            return
        self.last = now
        secs = max(now - self.start, 1e-9)
        line = f"prepare: {docs:,} documents, {tokens:,} tokens, {_si(tokens / secs)} tokens/s"
        if self.total_bytes:
            frac = min(bytes_read / self.total_bytes, 1.0)
            eta = secs * (1 - frac) / frac if frac > 0 else math.inf
            line += f", {100 * frac:.1f}% of {_si(self.total_bytes)}B"
            line += f", ETA {_hms(eta)}" if math.isfinite(eta) else ""
        self._emit(line, final=False)

    def finish(self, line: str) -> None:
        if self.stream is not None:
            self._emit(line, final=True)

    def _emit(self, line: str, final: bool) -> None:
        assert self.stream is not None
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# --------------------------------------------------------------------------------------------
# atomic output


def _partial_name(out: Path) -> str:
    return f".{out.name}.partial-"


def _remove_stale_partials(out: Path) -> None:
    """Remove the temporary directories that prepare runs of this host, now dead (SIGKILL, power
    loss), left beside ``out``; a live run's is kept."""
    host = socket.gethostname()
    for tmp in out.parent.glob(_partial_name(out) + "*"):
        owner, _, pid = tmp.name[len(_partial_name(out)) :].rpartition("-")
        if owner != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _move_into_place(tmp: Path, out: Path) -> None:
    """Make the dataset written in ``tmp`` the one at ``out``: rename the directory when ``out``
    does not exist; else rename its files into ``out``, the old ``.idx`` removed first and the new
    ``.idx`` last, so ``out`` never holds an ``.idx`` next to a ``.bin`` it does not describe."""
    if not out.exists():
        try:
            os.rename(tmp, out)
            return
        except OSError:  # created meanwhile: fall through and move the files
            pass
    target = out / PREFIX_NAME
    Path(f"{target}.idx").unlink(missing_ok=True)
    os.replace(tmp / f"{PREFIX_NAME}.bin", f"{target}.bin")
    os.replace(tmp / f"{PREFIX_NAME}{SIDECAR_SUFFIX}", sidecar_path(target))
    os.replace(tmp / f"{PREFIX_NAME}.idx", f"{target}.idx")


def prepare(
    inputs: list[str],
    tokenizer: str,
    out_dir: str,
    *,
    text_key: str = "text",
    workers: int = 1,
    skip_bad: bool = False,
    batch_size: int = 512,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into the Megatron dataset ``out_dir/text_document``; return its sidecar.

    Each document (a text file, a ``.jsonl`` line's or parquet row's ``text_key``) is one sequence
    and one document of the ``.idx``, followed by eos; documents keep input order for any
    ``workers``. A malformed record is a ValueError naming its file and line, or with ``skip_bad``
    is left out and counted by reason in the sidecar's ``skipped``. Everything is written in a
    temporary directory beside ``out_dir`` and renamed into place at the end: a run that fails or
    is killed leaves ``out_dir`` as it was (a previous dataset there intact, or no dataset).
    """
    if not inputs:
        raise ValueError("prepare: no input files given")
    if workers < 1 or batch_size < 1:
        raise ValueError(f"prepare: --workers ({workers}) and --batch-size ({batch_size}) must be at least 1")
    if not text_key:
        raise ValueError("prepare: --text-key must name a field")
    factory = partial(TextEncoder, tokenizer, text_key)
    encoder = factory()  # here too: a bad tokenizer fails before any worker starts
    stream = InputStream(inputs, encoder.columns)
    record = {"vocab_size": encoder.tok.vocab_size, "eos_id": encoder.tok.eos_id}
    record |= tokenizer_record(tokenizer, encoder.tok)
    megatron_indexed()  # imported before the clock starts: seconds that are not throughput
    meter = Progress(progress, stream.total_bytes)
    skipped: Counter[str] = Counter()
    first_bad: dict[str, str] = {}
    totals = {"documents": 0, "tokens": 0}

    def documents() -> Iterator[np.ndarray]:
        for enc in encoded_batches(_batches(stream, batch_size), factory, workers, local=encoder):
            if enc.bad and not skip_bad:
                raise ValueError(enc.bad[0][1])
            for reason, message in enc.bad:
                skipped[reason] += 1
                first_bad.setdefault(reason, message)
            ends = np.cumsum(enc.lengths)
            for start, end in zip(ends - enc.lengths, ends):
                yield enc.tokens[start:end]
            totals["documents"] += len(enc.lengths)
            totals["tokens"] += int(ends[-1]) if len(ends) else 0
            meter.update(totals["documents"], totals["tokens"], stream.bytes_read)

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f"{_partial_name(out)}{socket.gethostname()}-{os.getpid()}"
    tmp.mkdir()
    try:
        try:
            sidecar = write_dataset(tmp / PREFIX_NAME, documents(), record)
        except EmptyDatasetError:
            why = f"; {sum(skipped.values())} malformed record(s) skipped" if skipped else ""
            raise ValueError(f"prepare: {len(inputs)} input file(s) hold no documents{why}") from None
        sidecar["skipped"] = {r: skipped[r] for r in BAD_REASONS if skipped[r]}
        side = sidecar_path(tmp / PREFIX_NAME)
        with open(side, "w", encoding="utf-8") as f:
            f.write(json.dumps(sidecar))
            f.flush()
            os.fsync(f.fileno())
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    secs = time.perf_counter() - meter.start
    line = (
        f"prepare: {sidecar['num_documents']:,} documents, {sidecar['num_tokens']:,} tokens in {secs:.1f} s "
        f"({_si(sidecar['num_tokens'] / max(secs, 1e-9))} tokens/s)"
    )
    if skipped:
        kinds = ", ".join(f"{r} {n:,} (first: {first_bad[r]})" for r, n in sidecar["skipped"].items())
        line += f"; skipped {sum(skipped.values()):,} malformed record(s): {kinds}"
    meter.finish(line)
    return sidecar


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
