"""`meshweave data prepare`: documents -> a Megatron indexed dataset, ``OUT/text_document.{bin,idx}``.

The format is Megatron-LM's (see :mod:`meshweave.data.indexed`): one sequence per document, each
ending in eos (as ``preprocess_data.py --append-eod`` writes), the token dtype uint16 below 65,500
ids and int32 above. Beside it, ``text_document.meshweave.json`` records the vocabulary size, the
eos id, which tokenizer wrote the tokens (:func:`meshweave.data.tokenizers.tokenizer_record`) and
how many malformed records ``--skip-bad`` left out. ``data.source`` names the prefix
``OUT/text_document`` or just ``OUT``; Megatron-LM's ``--data-path OUT/text_document`` reads the same
files. ``meshweave data convert`` rewrites a directory of the previous format (``tokens.bin`` +
``index.json``) as such a prefix.

``--format chat`` reads ``.jsonl`` / parquet conversations instead (:mod:`meshweave.data.chat`:
rendered with the model directory's chat template) and writes ``text_document.loss_mask`` beside
the ``.bin``: one byte per token, 1 on the tokens that are trained (the assistant's).

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from meshweave.data.chat import ChatError, ChatTemplate, chat_messages, target_mask
from meshweave.data.indexed import (
    LOSS_MASK_SUFFIX,
    SIDECAR_SUFFIX,
    EmptyDatasetError,
    loss_mask_path,
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
BAD_REASONS = ("not_utf8", "bad_json", "not_object", "missing_key", "not_string", "not_a_conversation")
FORMATS = ("text", "chat")
OVERLONG = ("truncate", "drop")


@dataclass
class Encoded:
    """One encoded batch: its documents' tokens end to end (eos included) and their lengths, in
    input order, and the records left out as ``(reason, "file:line: why")``, also in input order."""

    tokens: np.ndarray
    lengths: np.ndarray
    bad: list[tuple[str, str]] = field(default_factory=list)
    loss_mask: np.ndarray | None = None  # chat: uint8 beside ``tokens``, 1 on trained tokens
    cut: Counter[str] = field(default_factory=Counter)  # chat: conversations "truncated" / "dropped"


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
        if rec.kind == TEXT:
            return _decoded(rec)
        value = _decoded(rec)
        if isinstance(value, tuple):
            return value
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


def _decoded(rec: Record) -> Any:
    """A text file's text, a ``.jsonl`` line's JSON value or a parquet row's ``{column: value}``;
    ``(reason, message)`` when the bytes are not UTF-8 or the line not JSON."""
    if rec.kind == ROW:
        return rec.data
    try:
        text = rec.data.decode("utf-8")
    except UnicodeDecodeError as e:
        what = "text" if rec.kind == TEXT else "line"
        return "not_utf8", f"{rec.where()}: not UTF-8 {what} ({e.reason} at byte {e.start})"
    if rec.kind == TEXT:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return "bad_json", f"{rec.where()}: not JSON ({e.msg}: column {e.colno})"


class ChatEncoder:
    """Record batch -> :class:`Encoded` for chat data: each conversation rendered with the model
    directory's chat template and tokenized as transformers' ``apply_chat_template`` does
    (meshweave/data/chat.py), with its loss mask (1 on the assistant tokens; on every token with
    ``train_on_prompt``). No eos is appended: the template ends each turn, and the ``.idx``
    document boundary ends the conversation. A conversation longer than ``max_tokens`` (0: no
    limit) is truncated to its first ``max_tokens`` tokens or dropped (``overlong``); one left with
    no trained token is dropped; both are counted.
    """

    columns = ["messages", "prompt", "completion"]

    def __init__(self, tokenizer: str, train_on_prompt: bool = False, max_tokens: int = 0, overlong: str = "truncate"):
        self.tok = load_tokenizer(tokenizer)
        if not hasattr(self.tok, "encode_batch_offsets"):
            raise ValueError("--format chat needs --tokenizer= a Hugging Face model directory with a chat template")
        self.template = ChatTemplate.from_model_dir(tokenizer)
        self.train_on_prompt, self.max_tokens, self.overlong = train_on_prompt, max_tokens, overlong
        self.dtype = token_dtype(self.tok.vocab_size)

    def __call__(self, records: list[Record]) -> Encoded:
        rendered, bad = [], []
        for rec in records:
            value = _decoded(rec)
            if isinstance(value, tuple):
                bad.append(value)
                continue
            if rec.kind == ROW:  # parquet: the columns a record has
                value = {k: v for k, v in value.items() if v is not None}
            try:
                rendered.append(self.template.target_spans(chat_messages(value)))
            except ChatError as e:
                bad.append(("not_a_conversation", f"{rec.where()}: {e}"))
        docs, masks, cut = [], [], Counter[str]()
        encode = self.tok.encode_batch_offsets  # type: ignore[attr-defined]
        for (_, spans), (ids, offsets) in zip(rendered, encode([t for t, _ in rendered]), strict=True):
            mask = [1] * len(ids) if self.train_on_prompt else target_mask(offsets, spans)
            if self.max_tokens and len(ids) > self.max_tokens:
                cut[self.overlong] += 1
                if self.overlong == "drop":
                    continue
                ids, mask = ids[: self.max_tokens], mask[: self.max_tokens]
            if not any(mask):
                cut["no_target"] += 1
                continue
            docs.append(ids)
            masks.append(mask)
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        tokens = np.empty(int(lengths.sum()), dtype=self.dtype)
        loss_mask = np.empty(len(tokens), dtype=np.uint8)
        for d, m, end in zip(docs, masks, np.cumsum(lengths)):  # one slice copy per conversation
            tokens[end - len(d) : end] = d
            loss_mask[end - len(m) : end] = m
        return Encoded(tokens, lengths, bad, loss_mask, cut)


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
    mask = tmp / f"{PREFIX_NAME}{LOSS_MASK_SUFFIX}"
    if mask.exists():
        os.replace(mask, loss_mask_path(target))
    else:  # an old dataset's mask must not outlive it
        loss_mask_path(target).unlink(missing_ok=True)
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
    format: str = "text",
    train_on_prompt: bool = False,
    max_tokens: int = 0,
    overlong: str = "truncate",
) -> dict[str, Any]:
    """Tokenize ``inputs`` into the Megatron dataset ``out_dir/text_document``; return its sidecar.

    Each document (a text file, a ``.jsonl`` line's or parquet row's ``text_key``) is one sequence
    and one document of the ``.idx``, followed by eos; documents keep input order for any
    ``workers``. A malformed record is a ValueError naming its file and line, or with ``skip_bad``
    is left out and counted by reason in the sidecar's ``skipped``. ``format="chat"``: each
    ``.jsonl`` line is a conversation (:class:`ChatEncoder`), and ``text_document.loss_mask`` is
    written beside the tokens; the sidecar's ``chat`` says how. Everything is written in a
    temporary directory beside ``out_dir`` and renamed into place at the end: a run that fails or
    is killed leaves ``out_dir`` as it was (a previous dataset there intact, or no dataset).
    """
    if not inputs:
        raise ValueError("prepare: no input files given")
    if workers < 1 or batch_size < 1:
        raise ValueError(f"prepare: --workers ({workers}) and --batch-size ({batch_size}) must be at least 1")
    if not text_key:
        raise ValueError("prepare: --text-key must name a field")
    if format not in FORMATS or overlong not in OVERLONG or max_tokens < 0:
        raise ValueError(
            f"prepare: --format {format!r} / --overlong {overlong!r} / --max-tokens {max_tokens}: choose a format "
            f"of {', '.join(FORMATS)}, overlong of {', '.join(OVERLONG)}, max-tokens >= 0"
        )
    chat = format == "chat"
    if chat:
        plain = [p for p in inputs if not any(p.endswith(f".{f}") for f in ("jsonl", "jsonl.gz", "jsonl.zst"))]
        if plain:
            raise ValueError(f"prepare --format chat reads conversations from .jsonl(.gz/.zst) files, not {plain[0]}")
    factory: Callable[[], TextEncoder | ChatEncoder] = (
        partial(ChatEncoder, tokenizer, train_on_prompt, max_tokens, overlong)
        if chat
        else partial(TextEncoder, tokenizer, text_key)
    )
    encoder = factory()  # here too: a bad tokenizer fails before any worker starts
    stream = InputStream(inputs, encoder.columns)
    record: dict[str, Any] = {"vocab_size": encoder.tok.vocab_size, "eos_id": encoder.tok.eos_id}
    record |= tokenizer_record(tokenizer, encoder.tok)
    megatron_indexed()  # imported before the clock starts: seconds that are not throughput
    meter = Progress(progress, stream.total_bytes)
    skipped: Counter[str] = Counter()
    cut: Counter[str] = Counter()
    first_bad: dict[str, str] = {}
    totals = {"documents": 0, "tokens": 0}
    mask_file: list[Any] = []  # the open loss-mask file of a chat run

    def documents() -> Iterator[np.ndarray]:
        for enc in encoded_batches(_batches(stream, batch_size), factory, workers, local=encoder):
            if enc.bad and not skip_bad:
                raise ValueError(enc.bad[0][1])
            for reason, message in enc.bad:
                skipped[reason] += 1
                first_bad.setdefault(reason, message)
            cut.update(enc.cut)
            if enc.loss_mask is not None:
                mask_file[0].write(enc.loss_mask.tobytes())
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
            with open(tmp / f"{PREFIX_NAME}{LOSS_MASK_SUFFIX}", "wb") if chat else _no_file() as mask_out:
                mask_file.append(mask_out)
                sidecar = write_dataset(tmp / PREFIX_NAME, documents(), record)
                if mask_out is not None:
                    mask_out.flush()
                    os.fsync(mask_out.fileno())
        except EmptyDatasetError:
            why = f"; {sum(skipped.values())} malformed record(s) skipped" if skipped else ""
            why += f"; conversations cut: {dict(cut)}" if cut else ""
            raise ValueError(f"prepare: {len(inputs)} input file(s) hold no documents{why}") from None
        sidecar["skipped"] = {r: skipped[r] for r in BAD_REASONS if skipped[r]}
        if chat:
            sidecar["chat"] = {
                "loss_mask": f"{PREFIX_NAME}{LOSS_MASK_SUFFIX}",
                "train_on_prompt": train_on_prompt,
                "max_tokens": max_tokens,
                "overlong": overlong,
                "cut": dict(cut),
            }
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
    if cut:
        line += "; conversations " + ", ".join(f"{why.replace('_', ' ')}: {n:,}" for why, n in sorted(cut.items()))
    meter.finish(line)
    return sidecar


@contextmanager
def _no_file() -> Iterator[None]:
    yield None


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
