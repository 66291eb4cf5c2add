"""Specification of streaming `meshweave data prepare`: every input format gives the tokens of the
plain .jsonl, the output does not depend on --workers, malformed records are one-line errors or
(--skip-bad) counted, and the output appears atomically: a failed or killed run leaves --out as it
was. Corpora and the tokenizer are made here; nothing is downloaded."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import zstandard
from tokenizers import models, pre_tokenizers, trainers

from meshweave import cli
from meshweave.data.datasets import TokenCorpus
from meshweave.data.indexed import read_sidecar, resolve_prefix
from meshweave.data.prepare import Progress, prepare
from meshweave.data.tokenizers import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MESHWEAVE = str(Path(sys.executable).with_name("meshweave"))
TEXTS = [
    "The first document.",
    "Zweites Dokument — mit Umlauten: äöü.",
    "a third\nspanning two lines",
    "",
    "x" * 300,
    "emoji 🙂 and tabs\tinside",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE trained on TEXTS, saved as a model directory's tokenizer.json."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"]))
    root = tmp_path_factory.mktemp("tok")
    tok.save(str(root / "tokenizer.json"))
    return root


def write_jsonl(path: Path, rows: list[dict], *, blank_every: int = 0) -> Path:
    lines = []
    for i, row in enumerate(rows):
        lines.append(json.dumps(row, ensure_ascii=False))
        if blank_every and i % blank_every == 0:
            lines.append("   ")  # blank lines are skipped, as they always were
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def documents(out: Path) -> list[list[int]]:
    corpus = TokenCorpus.open(out)
    return [corpus.document(d).tolist() for d in range(corpus.num_documents)]


def dataset_bytes(out: Path) -> tuple[bytes, bytes]:
    return (out / "text_document.bin").read_bytes(), (out / "text_document.idx").read_bytes()


def visible(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


# --------------------------------------------------------------------------------------------
# formats


@pytest.mark.parametrize("name", ["corpus.jsonl.gz", "corpus.jsonl.zst", "corpus.parquet"])
def test_every_compressed_or_columnar_format_gives_the_tokens_of_the_plain_jsonl(tmp_path, tokenizer_dir, name):
    rows = [{"id": i, "text": t} for i, t in enumerate(TEXTS)]
    plain = write_jsonl(tmp_path / "corpus.jsonl", rows, blank_every=2)
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / name, row_group_size=2)
    else:
        write_jsonl(tmp_path / name, rows, blank_every=2)
    prepare([str(plain)], str(tokenizer_dir), str(tmp_path / "plain"))
    prepare([str(tmp_path / name)], str(tokenizer_dir), str(tmp_path / "other"))
    tok = load_tokenizer(str(tokenizer_dir))
    assert documents(tmp_path / "plain") == [tok.encode(t) + [tok.eos_id] for t in TEXTS]
    assert dataset_bytes(tmp_path / "other") == dataset_bytes(tmp_path / "plain")


def test_a_text_file_is_one_document_with_its_newlines_and_an_empty_one_is_eos_alone(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("", encoding="utf-8")
    prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.md")], "bytes", str(tmp_path / "out"))
    assert documents(tmp_path / "out") == [[*b"line one\nline two\n", 256], [256]]


def test_text_key_names_the_jsonl_field_and_the_parquet_column(tmp_path):
    rows = [{"text": "not this", "body": t} for t in TEXTS[:3]]
    write_jsonl(tmp_path / "c.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.parquet"):
        prepare([str(tmp_path / name)], "bytes", str(tmp_path / name.replace(".", "_")), text_key="body")
        assert documents(tmp_path / name.replace(".", "_")) == [[*t.encode(), 256] for t in TEXTS[:3]]


def test_a_parquet_file_without_the_text_column_is_one_line_naming_file_and_text_key(tmp_path, capsys):
    pq.write_table(pa.Table.from_pylist([{"body": "a"}]), tmp_path / "c.parquet")
    code = cli.main(["data", "prepare", "--input", str(tmp_path / "c.parquet"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{tmp_path / 'c.parquet'}: no column 'text' (columns: body)" in err and "--text-key" in err
    assert visible(tmp_path / "out") == []


@pytest.mark.procs
def test_the_output_is_the_same_with_one_and_two_workers(tmp_path, tokenizer_dir):
    # 41 batches of 3 records: the two workers finish out of order, the writer must not.
    rows = [{"text": f"{TEXTS[i % len(TEXTS)]} #{i}" * (1 + i % 7)} for i in range(123)]
    write_jsonl(tmp_path / "c.jsonl", rows)
    for workers in (1, 2):
        prepare([str(tmp_path / "c.jsonl")], str(tokenizer_dir), str(tmp_path / f"w{workers}"), workers=workers,
                batch_size=3)  # fmt: skip
    assert dataset_bytes(tmp_path / "w1") == dataset_bytes(tmp_path / "w2")
    assert read_sidecar(str(tmp_path / "w1" / "text_document")) == read_sidecar(str(tmp_path / "w2" / "text_document"))


# --------------------------------------------------------------------------------------------
# malformed records

BAD_LINES = {
    "bad_json": b'{"text": "unterminated',
    "not_object": b'["text"]',
    "missing_key": b'{"body": "no text field"}',
    "not_string": b'{"text": 42}',
    "not_utf8": b'{"text": "caf\xe9"}',
}


def corpus_with(tmp_path: Path, bad: dict[str, bytes]) -> Path:
    """good, each bad line after one good line, good: the bad ones on lines 3, 5, 7, ..."""
    lines = [b'{"text": "good 0"}', b""]
    for i, line in enumerate(bad.values(), 1):
        lines += [line, f'{{"text": "good {i}"}}'.encode()]
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("bad_json", ":3: not JSON (Unterminated string starting at: column 10)"),
        ("not_object", ':3: expected a JSON object with a string "text" field'),
        ("missing_key", ':3: no "text" field (name the text field with --text-key)'),
        ("not_string", ':3: "text" is int, not a string'),
        ("not_utf8", ":3: not UTF-8 line (invalid continuation byte at byte 13)"),
    ],
)
def test_a_malformed_record_is_one_line_naming_file_and_line_exit_2_and_nothing_written(
    tmp_path, capsys, reason, message
):
    path = corpus_with(tmp_path, {reason: BAD_LINES[reason]})
    code = cli.main(["data", "prepare", "--input", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"meshweave: error: {path}{message}\n"
    assert visible(tmp_path) == ["c.jsonl"]  # no out, no temporary directory


def test_a_text_file_that_is_not_utf8_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"ok \xff")
    with pytest.raises(ValueError, match=r"a\.txt: not UTF-8 text \(invalid start byte at byte 3\)$"):
        prepare([str(tmp_path / "a.txt")], "bytes", str(tmp_path / "out"))


def test_skip_bad_counts_each_reason_in_the_sidecar_and_the_summary_line(tmp_path):
    bad = dict(BAD_LINES) | {"not_string_2": b'{"text": null}'}
    path = corpus_with(tmp_path, bad)
    report = io.StringIO()
    sidecar = prepare([str(path)], "bytes", str(tmp_path / "out"), skip_bad=True, progress=report)
    expected = {"not_utf8": 1, "bad_json": 1, "not_object": 1, "missing_key": 1, "not_string": 2}
    assert sidecar["skipped"] == expected == read_sidecar(str(tmp_path / "out" / "text_document"))["skipped"]
    assert documents(tmp_path / "out") == [[*f"good {i}".encode(), 256] for i in range(len(bad) + 1)]
    summary = report.getvalue().splitlines()[-1]
    assert f"{len(bad) + 1} documents" in summary and "skipped 6 malformed record(s)" in summary
    assert f'not_string 2 (first: {path}:9: "text" is int, not a string)' in summary


def test_without_bad_records_the_sidecar_says_none_were_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("fine")
    assert prepare([str(tmp_path / "a.txt")], "bytes", str(tmp_path / "out"), skip_bad=True)["skipped"] == {}


# --------------------------------------------------------------------------------------------
# atomic output and progress


def test_a_failed_run_leaves_the_previous_dataset_at_out_intact(tmp_path):
    (tmp_path / "a.txt").write_text("the old dataset")
    prepare([str(tmp_path / "a.txt")], "bytes", str(tmp_path / "out"))
    before = dataset_bytes(tmp_path / "out"), visible(tmp_path / "out")
    path = corpus_with(tmp_path, {"bad_json": BAD_LINES["bad_json"]})
    with pytest.raises(ValueError, match="not JSON"):
        prepare([str(path)], "bytes", str(tmp_path / "out"))
    assert (dataset_bytes(tmp_path / "out"), visible(tmp_path / "out")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "c.jsonl", "out"]


def test_a_successful_run_replaces_the_dataset_at_out(tmp_path):
    for text in ("old", "new"):
        (tmp_path / "a.txt").write_text(text)
        prepare([str(tmp_path / "a.txt")], "bytes", str(tmp_path / "out"))
    assert documents(tmp_path / "out") == [[*b"new", 256]]
    assert visible(tmp_path / "out") == ["text_document.bin", "text_document.idx", "text_document.meshweave.json"]


def test_progress_reports_documents_tokens_rate_share_and_eta():
    report = io.StringIO()
    meter = Progress(report, total_bytes=4_000_000, interval=0.0)
    meter.update(docs=1_234, tokens=567_890, bytes_read=1_000_000)
    line = report.getvalue()
    assert line.startswith("prepare: 1,234 documents, 567,890 tokens, ") and "tokens/s" in line
    assert ", 25.0% of 4.00MB, ETA " in line and line.endswith("\n")


def test_progress_is_throttled_to_its_interval():
    report = io.StringIO()
    meter = Progress(report, total_bytes=None, interval=3600.0)
    for i in range(100):
        meter.update(docs=i, tokens=i, bytes_read=i)
    assert report.getvalue().count("\n") == 1  # the first report only; no ETA without a total
    assert "ETA" not in report.getvalue()


@pytest.mark.procs
def test_a_prepare_killed_with_sigkill_midway_leaves_no_dataset_at_out(tmp_path):
    # The input is a FIFO this test feeds: the CLI has written batches into its temporary dataset
    # and printed progress, and is blocked on more input when it is killed — midway by
    # construction, whatever the machine's speed.
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    # Opened read-write, the FIFO does not wait for the CLI to open it; the CLI never sees its end.
    feed = os.open(fifo, os.O_RDWR)
    os.write(feed, "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(100)).encode())
    cmd = [MESHWEAVE, "data", "prepare", "--input", str(fifo), "--out", str(out), "--batch-size=16"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    try:
        first = proc.stderr.readline()
        assert first.startswith("prepare: 16 documents, "), first
        (partial,) = (p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-"))
        assert [p.name for p in partial.glob("*.bin*")] == [f".text_document.bin.tmp-{proc.pid}"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        os.close(feed)
    assert not out.exists()
    with pytest.raises(ValueError, match="not found"):
        resolve_prefix(out)
    # The next run removes the dead run's temporary directory and writes the dataset.
    write_jsonl(tmp_path / "c.jsonl", [{"text": "after"}])
    prepare([str(tmp_path / "c.jsonl")], "bytes", str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out", "stream.jsonl"]
    assert documents(out) == [[*b"after", 256]]
