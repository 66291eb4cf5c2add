"""`meshweave data prepare`: throughput vs the tokenizers ceiling, flat memory, loader speed.

Everything runs on a synthetic corpus generated here (seeded: Zipf-distributed pseudo-words,
log-normal document lengths, mean ~2.5 KB, one ``{"text": ...}`` per .jsonl line) with a byte-level
BPE (vocabulary 8,192) trained here on its first 4 MB with the ``tokenizers`` library; nothing is
downloaded. Printed and written to ``--out`` (``data_prepare.md`` and ``data_prepare.json``):

1. **Throughput.** On the small corpus (``--small-mb``, default 100 MB): the ``tokenizers``
   batch-encode ceiling — ``encode_batch_fast`` on batches of 512 texts already in memory, one
   thread (``TOKENIZERS_PARALLELISM=false``: one core, as each prepare worker), nothing else timed
   in a fresh process — against ``meshweave data prepare --workers 1`` and ``--workers 2``
   through the CLI. The
   prepare rate is the tokens over the time its summary line reports (from after the imports to
   the dataset renamed into place: reading, parsing, encoding, writing, worker start-up);
   wall-clock (with interpreter start and imports) is shown beside it, and tokens per CPU-second
   (less sensitive to other jobs on the machine). Goals: 2 workers >= 1.6x one worker, one worker
   >= 0.8x the ceiling.
2. **Peak memory.** The peak RSS (``wait4``'s ``ru_maxrss``) of ``data prepare --workers 1`` on
   the small corpus and on the large one (``--big-mb``, default 1000 MB: the small corpus repeated,
   in /tmp and deleted after). Goal: within 20% of each other.
3. **Loader vs trainer.** ``ShardedLoader`` serving batches (global batch 32 x seq 128, the
   demo's shapes) over the dataset table 1 prepared, in tokens/s, against the demo trainer's
   tokens/s (``configs/tiny.toml``, one process, median over logged steps after the first).
   Goal: >= 20x.

The machine is shared (2 cores, other jobs): the load average is printed with the report; the
parallel speedup is the number most sensitive to it.

    .venv/bin/python -m bench.data_prepare                 # ~25-45 min on 2 busy cores
    .venv/bin/python -m bench.data_prepare --big-mb 400    # if 1 GB takes too long
    .venv/bin/python -m bench.data_prepare --tables 1 --small-mb 20 --rounds 3   # throughput only, in turns
    .venv/bin/python -m bench.data_prepare --quick         # ~7 min: 20 MB and 80 MB corpora
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import ROOT, Report, cli_env, fmt_int, fmt_ratio, md_table, options, run_cli

SEED = 1234
WORDS = 30_000  # distinct pseudo-words
MEAN_DOC_BYTES = 2_500
BATCH = 512  # texts per encode_batch, as prepare's default --batch-size
HEADERS_1 = ["", "tokens/s", "x ceiling", "x 1 worker", "wall s", "tokens/CPU-s"]
SUMMARY = re.compile(r"prepare: ([\d,]+) documents, ([\d,]+) tokens in ([\d.]+) s")


def write_corpus(path: Path, megabytes: int, seed: int = SEED) -> int:
    """A synthetic .jsonl of about ``megabytes`` MB (see the module docstring); its size in bytes."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = 1.0 / np.arange(1, 27)
    lengths = rng.integers(2, 11, size=WORDS)
    chars = letters[np.searchsorted(np.cumsum(freq / freq.sum()), rng.random(lengths.sum()), side="right").clip(0, 25)]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    words = ["".join(chars[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    zipf = np.cumsum(1.0 / np.arange(1, WORDS + 1) ** 1.1)
    target, written = megabytes * 1_000_000, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            sizes = rng.lognormal(np.log(MEAN_DOC_BYTES / 6.5), 0.8, size=256).astype(int) + 4
            picks = np.searchsorted(zipf / zipf[-1], rng.random(sizes.sum()), side="right").clip(0, WORDS - 1).tolist()
            chunk, pos = [], 0
            for n in sizes.tolist():
                text = " ".join([words[i] for i in picks[pos : pos + n]]).capitalize() + "."
                chunk.append(json.dumps({"text": text}) + "\n")
                pos += n
            data = "".join(chunk)
            f.write(data)
            written += len(data)
    return path.stat().st_size


def repeat_corpus(source: Path, path: Path, megabytes: int) -> int:
    """``source`` written over and over (whole lines) until ``path`` holds about ``megabytes`` MB:
    prepare's memory depends on the input's size and document count, not on its content, and
    copying is minutes faster than generating on a shared 2-core machine."""
    target = megabytes * 1_000_000
    with open(path, "wb") as out:
        while out.tell() < target:
            with open(source, "rb") as f:
                for line in f:
                    out.write(line)
                    if out.tell() >= target:
                        break
    return path.stat().st_size


def train_tokenizer(corpus: Path, root: Path) -> Path:
    """A byte-level BPE (vocabulary 8,192, eos ``</s>``) trained on the first 4 MB of ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    with open(corpus, encoding="utf-8") as f:
        size = 0
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size > 4_000_000:
                break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8192, special_tokens=["</s>"]))
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    return root


def ceiling(corpus: Path, tokenizer: Path) -> dict[str, float]:
    """:func:`_ceiling` in a fresh process, as each prepare runs: in the process that trained the
    tokenizer the same encoding measured up to 2x slower."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_ceiling, corpus, tokenizer).result()


def _ceiling(corpus: Path, tokenizer: Path) -> dict[str, float]:
    """Tokens/s of ``encode_batch_fast`` alone, one thread, on every text of ``corpus``."""
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    fast = getattr(tok, "encode_batch_fast", tok.encode_batch)
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tokens, secs, cpu = 0, 0.0, 0.0
    for i in range(0, len(texts), BATCH):
        batch = texts[i : i + BATCH]
        t0, c0 = time.perf_counter(), time.process_time()
        out = fast(batch, add_special_tokens=False)
        secs, cpu = secs + time.perf_counter() - t0, cpu + time.process_time() - c0
        tokens += sum(len(e.ids) for e in out)
    tokens += len(texts)  # prepare's eos per document: the same token count
    return {"tokens": tokens, "documents": len(texts), "seconds": secs, "tokens_per_s": tokens / secs, "cpu_s": cpu}


def run_prepare(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict[str, Any]:
    """``meshweave data prepare`` in a subprocess; its summary, wall-clock and peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "meshweave", "data", "prepare", "--input", str(corpus), "--tokenizer", str(tokenizer)]
    cmd += ["--out", str(out), f"--workers={workers}"]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_log:
        proc = subprocess.Popen(cmd, stdout=out_log, stderr=subprocess.PIPE, env=cli_env(), cwd=ROOT, text=True)
        assert proc.stderr is not None
        stderr = proc.stderr.read()  # not communicate(): it would reap the process before wait4 sees its rusage
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_log.seek(0)
        stdout = out_log.read()
    match = SUMMARY.search(stderr)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"prepare failed ({proc.returncode}): {stderr.strip()[-400:]}")
    docs, tokens, secs = (float(g.replace(",", "")) for g in match.groups())
    print(f"  prepare workers={workers} {corpus.name}: {tokens / secs:,.0f} tokens/s, {stdout.strip()}", flush=True)
    return {
        "workers": workers,
        "documents": int(docs),
        "tokens": int(tokens),
        "seconds": secs,
        "tokens_per_s": tokens / secs,
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
        "cpu_s": usage.ru_utime + usage.ru_stime,  # with its workers (reaped by it); imports included
        "summary": stderr.strip().splitlines()[-1],
    }


def loader_rate(prefix: Path, batches: int) -> dict[str, float]:
    """Tokens/s of ``ShardedLoader.next_batch`` at the demo's shapes over the prepared dataset."""
    from meshweave.config import DataConfig
    from meshweave.data.build import build_datasets
    from meshweave.data.loader import ShardedLoader

    train, _, _ = build_datasets(DataConfig(source=str(prefix), eval_fraction=0.0), seq_len=128, seed=0)
    loader = ShardedLoader(train, global_batch=32, micro_batch=0, dp_rank=0, dp_size=1, seed=0)
    loader.next_batch()  # first touch of the memory map
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    secs = time.perf_counter() - t0
    return {"batches": batches, "seconds": secs, "tokens_per_s": batches * 32 * 128 / secs}


def trainer_rate(out: Path) -> dict[str, Any]:
    """The demo trainer's tokens/s: configs/tiny.toml on one process, median after the first step."""
    run = run_cli(out, 1, ["--config", str(ROOT / "configs" / "tiny.toml"), "--train.steps=8", "--log.interval=1"], 600)
    rates = [r["tokens_per_s"] for r in run.records[1:] if "tokens_per_s" in r]
    if not run.ok or not rates:
        raise RuntimeError(f"trainer run failed: {run.error()}")
    return {"steps": len(rates), "tokens_per_s": statistics.median(rates)}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median tokens/s among ``runs`` (all its fields, so the row is one real run)."""
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


def table_1(report: Report, work: Path, small: Path, tokenizer: Path, rounds: int) -> dict[str, Any]:
    """Ceiling, 1 worker and 2 workers, taking turns ``rounds`` times (a change in the machine's
    load hits all three alike); each row is the round of median tokens/s. The 1-worker run's."""
    results: dict[str, list[dict[str, Any]]] = {"ceiling": [], "w1": [], "w2": []}
    for r in range(rounds):
        results["ceiling"].append(ceiling(small, tokenizer))
        print(f"  round {r + 1}: ceiling {results['ceiling'][-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
        results["w1"].append(run_prepare(small, tokenizer, work / "out1", 1))
        results["w2"].append(run_prepare(small, tokenizer, work / "out2", 2))
    ceil, one, two = (median_run(results[k]) for k in ("ceiling", "w1", "w2"))
    same = (work / "out1" / "text_document.bin").read_bytes() == (work / "out2" / "text_document.bin").read_bytes()
    report.raw |= {"corpus_bytes": small.stat().st_size, "rounds": results, "same_output": same}
    rows = [["tokenizers encode_batch_fast, 1 thread", fmt_int(ceil["tokens_per_s"]), "1.00", "-", "-"]]
    rows[0].append(fmt_int(ceil["tokens"] / ceil["cpu_s"]))
    for run in (one, two):
        rows.append(
            [
                f"data prepare --workers {run['workers']}",
                fmt_int(run["tokens_per_s"]),
                fmt_ratio(run["tokens_per_s"] / ceil["tokens_per_s"], 2),
                fmt_ratio(run["tokens_per_s"] / one["tokens_per_s"], 2),
                f"{run['wall_s']:.0f}",
                fmt_int(run["tokens"] / run["cpu_s"]),
            ]
        )
    each = "; ".join(
        f"{k} " + ", ".join(fmt_int(x["tokens_per_s"]) for x in results[k]) for k in ("ceiling", "w1", "w2")
    )
    report.add(
        f"## 1. Throughput ({small.stat().st_size / 1e6:.0f} MB .jsonl, {one['documents']:,} documents, "
        f"{one['tokens']:,} tokens; median of {rounds} round(s))\n\n"
        + md_table(HEADERS_1, rows, right=[1, 2, 3, 4, 5])
        + f"\n\nGoals: 2 workers >= 1.6x one worker (measured {two['tokens_per_s'] / one['tokens_per_s']:.2f}x), "
        f"one worker >= 0.8x the ceiling (measured {one['tokens_per_s'] / ceil['tokens_per_s']:.2f}x). "
        f"Output of 1 and 2 workers byte-identical: {same}. Every round's tokens/s: {each}. tokens/CPU-s: all "
        "processes' CPU time, interpreter start and imports included."
    )
    return one


def table_3(report: Report, work: Path, prefix: Path, batches: int) -> None:
    loader = loader_rate(prefix, batches)
    trainer = trainer_rate(work / "trainer")
    report.raw |= {"loader": loader, "trainer": trainer}
    ratio = loader["tokens_per_s"] / trainer["tokens_per_s"]
    rows = [
        [f"ShardedLoader.next_batch, 32 x 128, {loader['batches']} batches", fmt_int(loader["tokens_per_s"])],
        [f"train configs/tiny.toml, 1 process, median of {trainer['steps']} steps", fmt_int(trainer["tokens_per_s"])],
    ]
    report.add(
        "## 3. Loader vs the demo trainer\n\n"
        + md_table(["", "tokens/s"], rows, right=[1])
        + f"\n\nGoal: loader >= 20x the trainer (measured {ratio:,.0f}x)."
    )


def table_2(report: Report, work: Path, small: Path, tokenizer: Path, one: dict[str, Any], big_mb: int) -> None:
    big = work / f"corpus_{big_mb}mb.jsonl"
    t0 = time.perf_counter()
    big_size = repeat_corpus(small, big, big_mb)
    print(f"  corpus {big.name}: {big_size:,} bytes in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        large = run_prepare(big, tokenizer, work / "out_big", 1)
    finally:
        big.unlink()
        shutil.rmtree(work / "out_big", ignore_errors=True)
    report.raw |= {"small": one, "big_corpus_bytes": big_size, "big": large}
    growth = large["peak_rss_mb"] / one["peak_rss_mb"] - 1
    rows = [
        [f"{n / 1e6:.0f} MB", fmt_int(r["documents"]), fmt_int(r["tokens"]), f"{r['peak_rss_mb']:.0f}"]
        for n, r in ((small.stat().st_size, one), (big_size, large))
    ]
    report.add(
        "## 2. Peak memory of data prepare --workers 1\n\n"
        + md_table(["corpus", "documents", "tokens", "peak RSS MB"], rows, right=[1, 2, 3])
        + f"\n\nGoal: within 20% (measured {100 * growth:+.1f}%)."
    )


def main() -> int:
    ap = options(__doc__ or "", "20 MB and 80 MB corpora, fewer loader batches", tables="1,2,3")
    ap.add_argument("--small-mb", type=int, default=100, help="corpus of tables 1 and 3 and the small of table 2")
    ap.add_argument("--big-mb", type=int, default=1000, help="the large corpus of table 2 (in /tmp, deleted after)")
    ap.add_argument("--rounds", type=int, default=1, help="table 1: turns of ceiling / 1 worker / 2 workers")
    args = ap.parse_args()
    small_mb, big_mb = (20, 80) if args.quick else (args.small_mb, args.big_mb)
    report = Report(args.out, "data_prepare", "data prepare: throughput, memory, loader")
    report.add(f"Environment: {report.environment('tokenizers', 'megatron-core')}. Synthetic corpus, seed {SEED}.")
    work = Path(tempfile.mkdtemp(prefix="bench-data-prepare-"))
    try:
        small = work / f"corpus_{small_mb}mb.jsonl"
        t0 = time.perf_counter()
        size = write_corpus(small, small_mb)
        print(f"  corpus {small.name}: {size:,} bytes in {time.perf_counter() - t0:.0f} s", flush=True)
        tokenizer = train_tokenizer(small, work / "tokenizer")
        if 1 in args.tables:
            one = table_1(report, work, small, tokenizer, args.rounds)
        elif {2, 3} & set(args.tables):
            one = run_prepare(small, tokenizer, work / "out1", 1)
        if 3 in args.tables:
            table_3(report, work, work / "out1" / "text_document", 100 if args.quick else 400)
        if 2 in args.tables:
            shutil.rmtree(work / "out2", ignore_errors=True)
            table_2(report, work, small, tokenizer, one, big_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
