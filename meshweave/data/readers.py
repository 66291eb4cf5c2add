"""Input readers of ``meshweave data prepare``: files in, records out, as streams.

A :class:`Record` is one document's raw input and where it came from (file and line or row), so a
malformed one can be named in one line. Readers only split and decompress; decoding and parsing
(UTF-8, JSON, the text key) happen in the encoder, which runs in the worker processes. Formats, by
file name:

- ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: one JSON object per line (blank lines skipped), read
  line by line through the decompressor;
- ``.parquet``: rows of the requested columns, read by record batches (pyarrow, the optional
  ``parquet`` extra: a 55 MB wheel that only this format needs);
- anything else: a text file, the whole file one document.

A record holds at most one line, row or text file, so memory is bounded by the caller's batch, not
by the file. :class:`InputStream` also counts the input bytes consumed (compressed bytes for
``.gz`` / ``.zst``) against their total, for the ETA.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, cast

TEXT = "text"  # data: the bytes of a whole text file
JSON = "json"  # data: the bytes of one non-blank .jsonl line, without its line end
ROW = "row"  # data: {column: value} of one parquet row

FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "text")
_PARQUET_BATCH_ROWS = 1024  # rows per pyarrow record batch: memory per batch, not per file
_PROGRESS_LINES = 64  # .jsonl lines between updates of bytes_read (tell() is a syscall on some streams)


class Record(NamedTuple):
    """One document's raw input: ``data`` of ``kind`` (:data:`TEXT`, :data:`JSON` or :data:`ROW`)
    from ``source`` at 1-based ``line`` (the row of a parquet file; 0 for a whole text file)."""

    source: str
    line: int
    kind: str
    data: Any

    def where(self) -> str:
        """``file:line`` (``file:row N`` for parquet, ``file`` for a text file) for error messages."""
        if self.kind == ROW:
            return f"{self.source}: row {self.line}"
        return f"{self.source}:{self.line}" if self.line else self.source


def input_format(path: str | os.PathLike[str]) -> str:
    """The format :class:`InputStream` reads ``path`` as, one of :data:`FORMATS`, by its name."""
    name = Path(path).name.lower()
    for fmt in FORMATS[:-1]:
        if name.endswith(f".{fmt}"):
            return fmt
    return "text"


def _missing(module: str, fmt: str, path: str, install: str) -> ValueError:
    return ValueError(f"{path}: reading .{fmt} needs the {module} package: pip install {install}")


class InputStream:
    """The records of ``paths`` in order (see the module docstring).

    ``columns`` are the fields a parquet reader loads (the rest of a row is never read); a parquet
    file without one of them is a ValueError naming the file. ``bytes_read`` rises to
    ``total_bytes`` as the files are consumed; ``total_bytes`` is None when an input's size is
    unknown (a pipe). Missing formats' libraries are one-line ValueErrors naming the extra.
    """

    def __init__(self, paths: Sequence[str], columns: Sequence[str]) -> None:
        self.paths = list(paths)
        self.columns = list(columns)
        sizes = []
        for p in self.paths:
            st = os.stat(p)  # FileNotFoundError names the path before anything is read
            sizes.append(st.st_size if stat.S_ISREG(st.st_mode) else None)
        self.total_bytes: int | None = None if None in sizes else sum(s for s in sizes if s is not None)
        self.bytes_read = 0

    def __iter__(self) -> Iterator[Record]:
        for path in self.paths:
            start = self.bytes_read
            fmt = input_format(path)
            if fmt == "text":
                with open(path, "rb") as f:
                    data = f.read()
                self.bytes_read = start + len(data)
                yield Record(path, 0, TEXT, data)
            elif fmt == "parquet":
                yield from self._parquet(path, start)
            else:
                yield from self._jsonl(path, fmt, start)

    def _jsonl(self, path: str, fmt: str, start: int) -> Iterator[Record]:
        with open(path, "rb") as raw:
            lines: BinaryIO
            if fmt == "jsonl.gz":
                lines = cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="rb"))
            elif fmt == "jsonl.zst":
                try:
                    import zstandard
                except ImportError:
                    raise _missing("zstandard", fmt, path, "zstandard") from None
                # read_across_frames: pzstd and `zstd -T` write several frames.
                reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
                lines = cast(BinaryIO, io.BufferedReader(reader, buffer_size=1 << 20))
            else:
                lines = raw
            for lineno, line in enumerate(lines, 1):
                if lineno % _PROGRESS_LINES == 0:
                    self.bytes_read = start + raw.tell()
                if line.strip():
                    yield Record(path, lineno, JSON, line.rstrip(b"\r\n"))
            self.bytes_read = start + raw.tell()

    def _parquet(self, path: str, start: int) -> Iterator[Record]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise _missing("pyarrow", "parquet", path, "'meshweave[parquet]'") from None
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid (not a ValueError subclass) for a bad file
            raise ValueError(f"{path}: not a parquet file ({' '.join(str(e).split())})") from None
        names = pf.schema_arrow.names
        absent = [c for c in self.columns if c not in names]
        if absent:
            raise ValueError(
                f"{path}: no column {absent[0]!r} (columns: {', '.join(names)}); choose one with --text-key"
            )
        size, rows, done = os.path.getsize(path), max(pf.metadata.num_rows, 1), 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=self.columns):
            cols = {c: batch.column(c).to_pylist() for c in self.columns}
            for i in range(batch.num_rows):
                yield Record(path, done + i + 1, ROW, {c: v[i] for c, v in cols.items()})
            done += batch.num_rows
            self.bytes_read = start + size * done // rows
        self.bytes_read = start + size
