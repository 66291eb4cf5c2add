"""Training over slow links: bytes on the wire, final eval loss and wall-clock of AdamW data parallel,
1-bit Adam, DiLoCo and Streaming DiLoCo (fp32 and 4-bit), on the same token budget.

Every run trains configs/tiny.toml's model (~0.82M parameters: dim 128, 4 layers, byte vocabulary)
on the embedded corpus through the real CLI (``python -m meshweave run --nproc 2``): two processes,
``--parallel.dp_replicate=2 --parallel.dp_shard=1`` -- two replicas of one process each -- global
batch 16 x seq 128, lr 3e-3 with 20 warm-up steps and cosine decay to 3e-4, the same number of steps
(hence tokens), the same seeds and the same starting weights for every method. The start is the DiLoCo
paper's protocol: ``--warm-start`` (default 200) steps of data-parallel AdamW (seed 0, its bytes in no
row), whose checkpoint every run loads with ``--checkpoint.init_from``; ``--warm-start 0`` trains
from scratch (bench/results/lowcomm_from_scratch.md: 200 steps that way). The methods differ only in
their flags:

- ``adamw``: data parallel, gradients all-reduced (fp32) every step;
- ``onebit``: ``--optim.name=onebit_adam --optim.freeze_step=F``: AdamW + all-reduce for F steps
  (default 30% of the run), then local momentum averaged by the 1-bit compressed all-reduce
  (meshweave/lowcomm/onebit.py);
- ``diloco``: vanilla DiLoCo, ``--comm.diloco.enabled=true`` with ``fragments=1, delay=0,
  alpha=0``: replicas take H inner AdamW steps (default 20) on their half of the batch, then one
  fp32 all-reduce of the outer gradient and an outer SGD step (Nesterov when momentum > 0);
- ``streaming``: Streaming DiLoCo, P strided fragments synced in turn H/P steps apart, each outer
  gradient sent tau steps before it is applied, fp32 on the wire;
- ``streaming-<fp4|int4>``: the same with 4-bit outer gradients (fp32 accumulation).

Table 1 (loopback, 3 seeds) reads metrics.jsonl, where every step is logged (``--log.interval=1``):

- ``replica MB``: the sum over steps of the ledger's ``comm_bytes`` keys starting with
  ``dp_replicate/`` -- what one rank sent to the other replica (meshweave/comm/ops.py books the
  bytes one rank puts on the wire: an fp32 all-reduce of B bytes over 2 ranks books B);
  ``all MB``: ``comm_bytes_total`` at the last step (also the per-step scalar all-reduces of the
  loss and token count, which cross between the replicas too: with dp_shard=1 every byte does);
- ``x fewer``: AdamW's replica bytes / the method's; ``peak KB/step``: the most any single step
  sent between replicas (for DiLoCo the step that launches a sync; 1-bit Adam's is a warm-up step);
  ``median KB/step``: the steady rate (bench/_common.CliRun.steady_comm_bytes);
- ``eval loss``: the held-out loss at the last step (DiLoCo: on the global weights, as meshweave
  evaluates), mean over seeds, min-max and std; ``gap``: mean over seeds of the per-seed relative
  gap to AdamW with the same seed (same data order and init), and the worst seed;
- ``wall s``: the whole CLI run, start-up (~10 s of torchrun and imports) and evals included
  (median over seeds); ``train tok/s``: global tokens / the sum of rank 0's ``step_time_s``.

Table 2 checks the issue's targets from those numbers. Table 3 repeats one seed of every method
with each rank in a network namespace of its own (bench/_netns.ShapedNetwork: veths on a bridge,
``tc tbf rate <--mbit>mbit`` on each rank's egress) and gloo on that veth (``GLOO_SOCKET_IFNAME``),
launched as RECIPES.md does: ``torchrun --nnodes 2 --nproc-per-node 1 -m meshweave train`` inside
each namespace. It needs root (skipped with the reason otherwise). Training is deterministic, so
the shaped run must reproduce the loopback losses of the same seed exactly; the table says whether
it did. ``slowdown`` = shaped train time / loopback train time of that seed.

How to read it: bytes and losses are exact and machine-independent; times are from 2 shared cores
(other jobs run too), so compare rows within a table, never absolute speeds. On loopback the link
is nearly free and DiLoCo's saving is invisible; on the shaped link AdamW pays ~3.3 MB per step.
A seed's eval loss is over 10 global batches (160 sequences, ~20k tokens) of the corpus's held-out
documents; which 160 depends on the seed, never on the method. Plot: bench/results/lowcomm.png, eval
loss (seed mean) against cumulative ``comm_bytes_total`` (log x), and against training time on the
shaped link when it ran (DiLoCo's eval points before its first sync show the initial weights: the
global weights have not moved yet).

Defaults and why (``--sweep`` reruns the one-seed grid they come from, bench/results/lowcomm_sweep.md,
from scratch): DiLoCo's published outer lr 0.7 with Nesterov 0.9 (tuned for H = 100-500 and long runs)
is the worst setting here; plain averaging (outer lr 1, momentum 0) is the best, so it is the default.
1-bit Adam's freeze_step needs ~25-30% of the run: at 15% its loss ends ~10% above AdamW's. Why a
warm start: from random weights the first few hundred steps of this model are where replicas that
see different data drift apart fastest, and averaging them recovers little of the second replica's
data -- from scratch, 200 steps end ~10% above data parallel (lowcomm_from_scratch.md); DiLoCo's own
paper starts its replicas from a pretrained checkpoint.

    .venv/bin/python -m bench.lowcomm             # ~20-30 min on 2 shared cores, shaped link as root
    .venv/bin/python -m bench.lowcomm --quick     # ~1.5-3 min: 1 seed, 60 steps, no shaped link
    .venv/bin/python -m bench.lowcomm --sweep     # ~7-13 min: the tuning grid, one seed
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import CliRun, Report, int_list, md_table, options, run_cli, run_nodes
from bench._netns import ShapedNetwork, available

GLOBAL_BATCH = 16
SEQ_LEN = 128
REPLICA_PREFIX = "dp_replicate/"
ISSUE_ONEBIT_GAP = 0.02  # 1-bit Adam: final eval loss within 2% of AdamW
ISSUE_STREAMING_GAP = 0.05  # Streaming DiLoCo: within 5% of data parallel
ISSUE_FEWER = 100  # Streaming DiLoCo: >= 100x fewer bytes than data-parallel AdamW
RUN_TIMEOUT_S = 900
EVAL_BATCHES = 10  # global batches of held-out text per eval: 160 sequences, ~20k tokens


# ================================================================================================
# what runs


@dataclass(frozen=True)
class Method:
    """One row of the tables: a name, a description for the caption, and its CLI flags."""

    name: str
    label: str
    flags: tuple[str, ...]
    fragments: int = 1
    quantize: str = "none"


def base_flags(steps: int, seed: int, eval_interval: int, init_from: Path | None = None) -> list[str]:
    """Flags every run shares: tiny.toml's model, 2 replicas, the token budget, every step logged,
    and the warm-start checkpoint every method starts from (None: from scratch)."""
    return [
        "--config=configs/tiny.toml",
        *([f"--checkpoint.init_from={init_from}"] if init_from else []),
        "--parallel.dp_replicate=2",
        "--parallel.dp_shard=1",
        f"--train.steps={steps}",
        f"--train.global_batch={GLOBAL_BATCH}",
        f"--train.seq_len={SEQ_LEN}",
        f"--train.seed={seed}",
        f"--train.eval_interval={eval_interval}",
        f"--train.eval_batches={EVAL_BATCHES}",
        "--log.interval=1",
        "--checkpoint.interval=0",
    ]


def methods(args: argparse.Namespace) -> list[Method]:
    """The five methods with this invocation's hyper-parameters, filtered by ``--methods``."""
    h, p, tau = args.inner_steps, args.fragments, args.delay
    outer = (f"--comm.diloco.outer_lr={args.outer_lr:g}", f"--comm.diloco.outer_momentum={args.outer_momentum:g}")
    diloco = ("--comm.diloco.enabled=true", f"--comm.diloco.inner_steps={h}", *outer)
    streaming = (*diloco, f"--comm.diloco.fragments={p}", f"--comm.diloco.delay={tau}", "--comm.diloco.alpha=0")
    every = [
        Method("adamw", "AdamW, data parallel (fp32 gradient all-reduce every step)", ()),
        Method(
            "onebit",
            f"1-bit Adam, freeze_step={args.freeze_step}",
            ("--optim.name=onebit_adam", f"--optim.freeze_step={args.freeze_step}"),
        ),
        Method(
            "diloco",
            f"DiLoCo H={h}, P=1, tau=0, alpha=0, fp32",
            (
                *diloco,
                "--comm.diloco.fragments=1",
                "--comm.diloco.delay=0",
                "--comm.diloco.alpha=0",
                "--comm.diloco.quantize=none",
            ),
        ),
        Method(
            "streaming",
            f"Streaming DiLoCo H={h}, P={p}, tau={tau}, alpha=0, fp32",
            (*streaming, "--comm.diloco.quantize=none"),
            fragments=p,
        ),
        Method(
            f"streaming-{args.quantize}",
            f"Streaming DiLoCo H={h}, P={p}, tau={tau}, alpha=0, {args.quantize}",
            (*streaming, f"--comm.diloco.quantize={args.quantize}"),
            fragments=p,
            quantize=args.quantize,
        ),
    ]
    wanted = [w.strip() for w in args.methods.split(",")] if args.methods else None
    if wanted:
        every = [m for m in every if m.name in wanted or m.name.split("-")[0] in wanted]
    return every


# ================================================================================================
# running the CLI


def run_loopback(out: Path, flags: Sequence[str]) -> dict[str, Any]:
    """One CLI run on loopback; returns its summary (see :func:`summarise`) or ``{"error": ...}``."""
    return summarise(run_cli(out, 2, flags, RUN_TIMEOUT_S))


def pretrain(args: argparse.Namespace, run_root: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The warm start: ``--warm-start`` steps of data-parallel AdamW (seed 0, not one of the
    measured seeds); returns its final checkpoint and summary, or (None, None) for from scratch."""
    if not args.warm_start:
        return None, None
    out = run_root / "pretrain"
    flags = [*base_flags(args.warm_start, 0, args.warm_start), "--checkpoint.save_final=true"]
    res = run_loopback(out, flags)
    ckpt = out / "checkpoints" / f"step-{args.warm_start}"
    if "error" in res or not ckpt.is_dir():
        raise SystemExit(
            f"lowcomm: the warm-start run failed ({res.get('error', 'no final checkpoint')}); "
            f"see {out}, or pass --warm-start 0 to train from scratch"
        )
    return ckpt, res


def run_shaped(out: Path, flags: Sequence[str], net: ShapedNetwork, port: int) -> dict[str, Any]:
    """One run with rank i in namespace ``net.ns[i]``: ``torchrun --nnodes 2 --node-rank i
    --nproc-per-node 1 -m meshweave train`` per namespace, gloo on the shaped veth."""
    prefixes = [net.command(rank, []) for rank in range(2)]
    envs = [{"GLOO_SOCKET_IFNAME": dev} for dev in net.dev]
    return summarise(run_nodes(out, flags, RUN_TIMEOUT_S, net.addr[0], port, prefixes, envs))


def replica_bytes(record: dict) -> int:
    """Bytes this step sent between the replicas (the ledger's dp_replicate dim)."""
    return sum(v for k, v in record.get("comm_bytes", {}).items() if k.startswith(REPLICA_PREFIX))


def summarise(run: CliRun) -> dict[str, Any]:
    """What the tables need from one run's metrics.jsonl, or its error and the logs' last lines."""
    records, wall = run.records, run.wall_s
    if not run.ok or not records:
        return {"error": run.error(("stderr.log", "node0.log", "node1.log")), "wall_s": wall}
    per_step = [replica_bytes(r) for r in records]
    total = sum(per_step)
    steady = run.steady_comm_bytes()
    train_s = sum(r["step_time_s"] for r in records)
    tokens = records[-1]["tokens"]
    evals = [(r["step"], r["comm_bytes_total"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    return {
        "steps_logged": len(records),
        "final_step": records[-1]["step"],
        "replica_bytes": total,
        "all_bytes": records[-1]["comm_bytes_total"],
        "peak_step_bytes": max(per_step),
        "peak_step": per_step.index(max(per_step)) + 1,
        "median_step_bytes": sum(v for k, v in steady.items() if k.startswith(REPLICA_PREFIX)),
        "sync_steps": [
            r["step"]
            for r, b in zip(records, per_step)
            if b and r.get("replicas_apart", True) and "diloco_failed_syncs" in r
        ],
        "failed_syncs": records[-1].get("diloco_failed_syncs", 0),
        "final_eval_loss": evals[-1][2] if evals else None,
        "evals": evals,
        "loss": [r["loss"] for r in records],
        "comm_bytes_total": [r["comm_bytes_total"] for r in records],
        "step_time_s": [r["step_time_s"] for r in records],
        "replica_comm_s": sum(
            v for r in records for k, v in r.get("comm_seconds", {}).items() if k.startswith(REPLICA_PREFIX)
        ),
        "train_s": train_s,
        "tokens": tokens,
        "train_tok_s": tokens / train_s if train_s else None,
        "wall_s": wall,
        "wall_tok_s": tokens / wall,
        "skipped_steps": records[-1].get("skipped_steps", 0),
    }


# ================================================================================================
# tables


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:,.2f}"


def _kb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e3:,.1f}"


def _ok(runs: list[dict]) -> list[dict]:
    return [r for r in runs if "error" not in r]


def gaps(results: dict[str, dict[int, dict]], name: str) -> list[float]:
    """Per-seed relative eval-loss gap of ``name`` to AdamW with the same seed (seeds both have)."""
    base, mine = results.get("adamw", {}), results.get(name, {})
    return [
        mine[s]["final_eval_loss"] / base[s]["final_eval_loss"] - 1
        for s in sorted(mine)
        if s in base
        and "error" not in mine[s]
        and "error" not in base[s]
        and mine[s]["final_eval_loss"] is not None
        and base[s]["final_eval_loss"] is not None
    ]


def main_table(ms: list[Method], results: dict[str, dict[int, dict]]) -> str:
    """Table 1: bytes, peak, ratio to AdamW, eval loss over seeds, wall-clock (loopback)."""
    adamw = _ok(list(results.get("adamw", {}).values()))
    base_bytes = adamw[0]["replica_bytes"] if adamw else None
    rows = []
    for m in ms:
        runs = _ok(list(results.get(m.name, {}).values()))
        errors = [f"seed {s}: {r['error']}" for s, r in results.get(m.name, {}).items() if "error" in r]
        if not runs:
            rows.append([m.name, "failed: " + "; ".join(errors)] + [""] * 10)
            continue
        r0 = runs[0]  # bytes do not depend on the seed (checked below)
        losses = [r["final_eval_loss"] for r in runs if r["final_eval_loss"] is not None]
        g = gaps(results, m.name)
        rows.append(
            [
                m.name,
                _mb(r0["replica_bytes"]),
                _mb(r0["all_bytes"]),
                "1"
                if m.name == "adamw"
                else (f"{base_bytes / r0['replica_bytes']:,.1f}" if base_bytes and r0["replica_bytes"] else "-"),
                _kb(r0["peak_step_bytes"]),
                _kb(r0["median_step_bytes"]),
                f"{statistics.mean(losses):.4f}" if losses else "-",
                f"{min(losses):.4f}-{max(losses):.4f}" if len(losses) > 1 else "-",
                f"{statistics.stdev(losses):.4f}" if len(losses) > 1 else "-",
                "-" if m.name == "adamw" or not g else f"{100 * statistics.mean(g):+.2f}% (worst {100 * max(g):+.2f}%)",
                f"{statistics.median(r['wall_s'] for r in runs):.0f}",
                f"{statistics.median(r['train_tok_s'] for r in runs):,.0f}",
            ]
        )
        if errors:
            rows[-1][0] += f" ({len(errors)} failed: {'; '.join(errors)})"
    return md_table(
        [
            "method",
            "replica MB",
            "all MB",
            "x fewer",
            "peak KB/step",
            "median KB/step",
            "eval loss (mean)",
            "min-max",
            "std",
            "gap to AdamW (mean over seeds)",
            "wall s",
            "train tok/s",
        ],
        rows,
        right=range(1, 12),
    )


def bytes_consistency(ms: list[Method], results: dict[str, dict[int, dict]]) -> str:
    """One sentence: do the byte counts agree across seeds (they should, exactly)?"""
    odd = []
    for m in ms:
        runs = _ok(list(results.get(m.name, {}).values()))
        if len({(r["replica_bytes"], r["peak_step_bytes"]) for r in runs}) > 1:
            odd.append(m.name)
    gaps_in_log = [
        m.name for m in ms for r in _ok(list(results.get(m.name, {}).values())) if r["steps_logged"] != r["final_step"]
    ]
    missing = (
        f" Some steps are missing from metrics.jsonl for {sorted(set(gaps_in_log))}: their per-step sums undercount."
        if gaps_in_log
        else " Every step is in metrics.jsonl."
    )
    if odd:
        return f"Replica bytes DIFFER across seeds for {', '.join(odd)} (the first seed's are shown)." + missing
    return "Replica bytes and peaks are identical across seeds for every method." + missing


def targets_table(ms: list[Method], results: dict[str, dict[int, dict]]) -> tuple[str, dict[str, Any]]:
    """Table 2: the issue's targets, measured; returns the table and a machine-readable verdict."""

    def first(name: str) -> dict | None:
        runs = _ok(list(results.get(name, {}).values()))
        return runs[0] if runs else None

    rows, verdict = [], {}
    adamw, vanilla = first("adamw"), first("diloco")
    onebit_gap = gaps(results, "onebit")
    if onebit_gap:
        mean = statistics.mean(onebit_gap)
        ok = mean <= ISSUE_ONEBIT_GAP
        verdict["onebit_gap"] = {"mean": mean, "worst": max(onebit_gap), "met": ok}
        rows.append(
            [
                "1-bit Adam eval loss within 2% of AdamW",
                f"{100 * mean:+.2f}% mean over {len(onebit_gap)} seed(s), worst {100 * max(onebit_gap):+.2f}%",
                "<= +2%",
                "yes" if ok else "NO",
            ]
        )
    ob = first("onebit")
    if ob and adamw and ob["median_step_bytes"]:
        fraction = ob["median_step_bytes"] / adamw["median_step_bytes"]
        verdict["onebit_compressed_fraction"] = fraction
        rows.append(
            [
                "1-bit Adam compressed-phase bytes/step vs AdamW's",
                f"1/{1 / fraction:.1f}",
                "<= 1/20",
                "yes" if fraction <= 1 / 20 else "NO",
            ]
        )
    for m in ms:
        if not m.name.startswith("streaming"):
            continue
        g, run = gaps(results, m.name), first(m.name)
        if g:
            mean = statistics.mean(g)
            ok = mean <= ISSUE_STREAMING_GAP
            verdict[f"{m.name}_gap"] = {"mean": mean, "worst": max(g), "met": ok}
            rows.append(
                [
                    f"{m.name}: eval loss within 5% of AdamW",
                    f"{100 * mean:+.2f}% mean over {len(g)} seed(s), worst {100 * max(g):+.2f}%",
                    "<= +5%",
                    "yes" if ok else "NO",
                ]
            )
        if run and adamw and run["replica_bytes"]:
            fewer = adamw["replica_bytes"] / run["replica_bytes"]
            verdict[f"{m.name}_fewer"] = {"x": fewer, "met": fewer >= ISSUE_FEWER}
            rows.append(
                [
                    f"{m.name}: total replica bytes vs AdamW",
                    f"{fewer:,.1f}x fewer",
                    f">= {ISSUE_FEWER}x",
                    "yes" if fewer >= ISSUE_FEWER else "NO",
                ]
            )
        if run and vanilla and vanilla["peak_step_bytes"]:
            ratio = run["peak_step_bytes"] / vanilla["peak_step_bytes"]
            note = (
                ""
                if m.quantize == "none"
                else f" (vanilla sends fp32: x8 for the 4-bit codec -> {ratio * 8:.3f} per element sent)"
            )
            verdict[f"{m.name}_peak"] = {"ratio": ratio, "fragments": m.fragments}
            rows.append(
                [
                    f"{m.name}: peak bytes in a step vs vanilla DiLoCo",
                    f"{ratio:.3f}{note}",
                    f"~1/P = {1 / m.fragments:.3f}",
                    "yes" if ratio <= 1.1 / m.fragments else "NO",
                ]
            )
    return md_table(["target (issue 7)", "measured", "target", "met"], rows), verdict


def shaped_table(
    ms: list[Method], shaped: dict[str, dict], loop: dict[str, dict[int, dict]], seed: int, mbit: float
) -> str:
    """Table 3: wall-clock and tokens/s over the shaped link, with the loopback run beside it."""
    adamw = shaped.get("adamw")
    rows = []
    for m in ms:
        r = shaped.get(m.name)
        if r is None:
            continue
        if "error" in r:
            rows.append([m.name, "failed: " + r["error"]] + [""] * 8)
            continue
        ref = loop.get(m.name, {}).get(seed)
        same = "-"
        if ref and "error" not in ref:
            diff = max((abs(a - b) for a, b in zip(ref["loss"], r["loss"])), default=float("nan"))
            same = "identical" if diff == 0 and len(ref["loss"]) == len(r["loss"]) else f"max diff {diff:.1e}"
        link_s = r["replica_bytes"] * 8 / (mbit * 1e6)
        rows.append(
            [
                m.name,
                f"{r['wall_s']:.0f}",
                f"{r['train_s']:.1f}",
                f"{r['train_tok_s']:,.0f}",
                f"{r['wall_tok_s']:,.0f}",
                f"{link_s:.1f}",
                f"{r['train_s'] / ref['train_s']:.2f}" if ref and "error" not in ref else "-",
                "-" if not adamw or "error" in adamw or m.name == "adamw" else f"{adamw['train_s'] / r['train_s']:.2f}",
                same,
            ]
        )
    return md_table(
        [
            "method",
            "wall s",
            "train s",
            "train tok/s",
            "wall tok/s",
            "replica bytes / link rate, s",
            "slowdown vs loopback",
            "speed-up vs AdamW",
            "losses vs loopback seed",
        ],
        rows,
        right=range(1, 8),
    )


# ================================================================================================
# plot


def plot(ms: list[Method], results: dict[str, dict[int, dict]], shaped: dict[str, dict], report: Report) -> Path | None:
    """Eval loss (mean over seeds) against cumulative bytes on the wire, log x; and against
    wall-clock on the shaped link when it ran."""
    have_shaped = any("error" not in r for r in shaped.values())
    figure = report.figure(1, 2 if have_shaped else 1, figsize=(13 if have_shaped else 7, 4.8), squeeze=False)
    if figure is None:
        return None
    fig, axes = figure
    ax = axes[0][0]
    for m in ms:
        runs = _ok(list(results.get(m.name, {}).values()))
        if not runs:
            continue
        steps = [e[0] for e in runs[0]["evals"]]
        x = [e[1] for e in runs[0]["evals"]]
        y = [statistics.mean(r["evals"][i][2] for r in runs if len(r["evals"]) > i) for i in range(len(steps))]
        (line,) = ax.plot(x, y, marker="o", ms=3, label=m.label)
        if len(runs) > 1:
            lo = [min(r["evals"][i][2] for r in runs) for i in range(len(steps))]
            hi = [max(r["evals"][i][2] for r in runs) for i in range(len(steps))]
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes on the wire per rank (ledger comm_bytes_total)")
    ax.set_ylabel("eval loss (mean over seeds; band: min-max)")
    ax.set_title("loss vs bytes, 2 replicas, tiny LM")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if have_shaped:
        ax = axes[0][1]
        for m in ms:
            r = shaped.get(m.name)
            if not r or "error" in r:
                continue
            times, t = [], 0.0
            for dt in r["step_time_s"]:
                t += dt
                times.append(t)
            x = [times[step - 1] for step, _, _ in r["evals"]]
            ax.plot(x, [e[2] for e in r["evals"]], marker="o", ms=3, label=m.name)
        ax.set_xlabel("training time on the shaped link, s (sum of step times)")
        ax.set_ylabel("eval loss (one seed)")
        ax.set_title("loss vs time over the shaped veth link")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return report.save_figure(fig)


# ================================================================================================
# main


def _settings(args: argparse.Namespace, sweep: bool = False) -> str:
    tokens = args.steps * GLOBAL_BATCH * SEQ_LEN
    if sweep:
        return (
            f"{args.steps} steps x global batch {GLOBAL_BATCH} x seq {SEQ_LEN} = {tokens:,} tokens per run unless the "
            f"row says otherwise, configs/tiny.toml's model and optimizer, seed {args.seed_list[0]}, final eval on "
            f"{EVAL_BATCHES} held-out global batches."
        )
    start = (
        "from scratch"
        if not args.warm_start
        else f"every method starting from the same checkpoint of {args.warm_start} data-parallel AdamW steps (seed 0, "
        "not a measured seed; its bytes are in no row: the DiLoCo paper's protocol)"
    )
    return (
        f"{args.steps} steps x global batch {GLOBAL_BATCH} x seq {SEQ_LEN} = {tokens:,} tokens per run, {start} "
        f"(each DiLoCo replica: {GLOBAL_BATCH // 2} sequences per inner step), configs/tiny.toml's model and "
        f"optimizer (AdamW lr 3e-3, betas 0.9/0.95, wd 0.1, 20 warm-up steps, cosine to 3e-4, clip 1.0), "
        f"seeds {args.seed_list}, eval every {args.eval_interval} steps on {EVAL_BATCHES} held-out global batches. "
        f"DiLoCo outer SGD lr {args.outer_lr:g}, Nesterov momentum {args.outer_momentum:g}"
        f"{' (= averaging the replicas)' if args.outer_lr == 1 and args.outer_momentum == 0 else ''}; inner = the same "
        f"AdamW and schedule."
    )


def loopback(args: argparse.Namespace, ms: list[Method], init_from: Path | None, report: Report) -> dict:
    """Every method x seed on loopback, methods interleaved within a seed (load drifts hit all alike);
    ``{method: {seed: summary}}``, each run kept in ``report.raw`` as it ends."""
    results: dict[str, dict[int, dict]] = {m.name: {} for m in ms}
    for seed in args.seed_list:
        for m in ms:
            flags = [*base_flags(args.steps, seed, args.eval_interval, init_from), *m.flags]
            res = run_loopback(args.out / "logs" / "lowcomm" / f"{m.name}-seed{seed}", flags)
            results[m.name][seed] = res
            report.raw["loopback"].setdefault(m.name, {})[str(seed)] = res
            report.write()
            done = res.get("error") or f"eval loss {res['final_eval_loss']:.4f}, replica bytes {res['replica_bytes']:,}"
            print(f"  {m.name} seed {seed}: {done}", flush=True)
    return results


def over_shaped_link(args: argparse.Namespace, ms: list[Method], init_from: Path | None, report: Report) -> dict:
    """The first seed of every method again, each rank in its own shaped namespace; ``{method: summary}``."""
    shaped: dict[str, dict] = {}
    seed = args.seed_list[0]
    with ShapedNetwork(2, args.mbit) as net:
        for i, m in enumerate(ms):
            flags = [*base_flags(args.steps, seed, args.eval_interval, init_from), *m.flags]
            res = run_shaped(args.out / "logs" / "lowcomm" / f"shaped-{m.name}-seed{seed}", flags, net, 29600 + i)
            shaped[m.name] = report.raw["shaped"][m.name] = res
            report.write()
            done = res.get("error") or f"train {res['train_s']:.1f} s, wall {res['wall_s']:.0f} s"
            print(f"  shaped {m.name}: {done}", flush=True)
    return shaped


def main(argv: list[str] | None = None) -> int:
    ap = options(__doc__, "1 seed, 60 steps, no shaped link (~2-3 min)")
    ap.add_argument("--no-shaped", action="store_true", help="skip the network-namespace table")
    ap.add_argument("--shaped", action="store_true", help="run the shaped table even with --quick")
    ap.add_argument("--mbit", type=float, default=100, help="egress rate of each rank's veth in the shaped run")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 400; 60 with --quick)")
    ap.add_argument(
        "--warm-start",
        type=int,
        default=None,
        help="data-parallel AdamW steps every method starts from (default 200; 0 with --quick): 0 = from scratch",
    )
    ap.add_argument("--seeds", default=None, help="comma-separated --train.seed values (default 1,2,3; 1 with --quick)")
    ap.add_argument("--freeze-step", type=int, default=None, help="1-bit Adam warm-up steps (default 30%% of steps)")
    ap.add_argument("--inner-steps", type=int, default=None, help="DiLoCo H (default 20)")
    ap.add_argument("--fragments", type=int, default=2, help="Streaming DiLoCo P")
    ap.add_argument("--delay", type=int, default=1, help="Streaming DiLoCo tau")
    ap.add_argument("--quantize", choices=("fp4", "int4"), default="fp4", help="the 4-bit Streaming DiLoCo's codec")
    ap.add_argument("--outer-lr", type=float, default=1.0, help="DiLoCo outer SGD lr (published: 0.7; see --sweep)")
    ap.add_argument("--outer-momentum", type=float, default=0.0, help="DiLoCo outer Nesterov momentum (published: 0.9)")
    ap.add_argument("--methods", default="", help="comma-separated subset of adamw,onebit,diloco,streaming")
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="instead: the one-seed tuning grid behind the defaults (~13 runs) -> lowcomm_sweep.md",
    )
    args = ap.parse_args(argv)
    args.steps = args.steps or (60 if args.quick else 400)
    args.warm_start = (0 if args.quick else 200) if args.warm_start is None else args.warm_start
    args.seed_list = int_list(args.seeds or ("1" if args.quick else "1,2,3"))
    args.freeze_step = args.freeze_step or max(1, round(0.3 * args.steps))
    args.inner_steps = args.inner_steps or 20
    args.eval_interval = max(5, round(args.steps / 40) * 5)  # ~8 evals: every 25 steps of 200
    if args.sweep:
        return sweep(args)
    ms = methods(args)
    run_root = args.out / "logs" / "lowcomm"
    report = Report(args.out, "lowcomm", "meshweave bench: training over slow links (1-bit Adam, Streaming DiLoCo)")
    report.raw.update(
        args=raw_args(args),
        methods={m.name: {"label": m.label, "flags": list(m.flags)} for m in ms},
        loopback={},
        shaped={},
    )
    report.add(
        f"{report.environment('torch')}{'; --quick' if args.quick else ''}. {_settings(args)}\n\n"
        + "\n".join(f"- `{m.name}`: {m.label}" for m in ms)
    )

    init_from, warm = pretrain(args, run_root)
    if warm is not None:
        report.raw["warm_start"] = warm
        report.add(
            f"Warm start: {args.warm_start} steps of data-parallel AdamW, eval loss "
            f"{warm['final_eval_loss']:.4f}, {warm['replica_bytes'] / 1e6:,.2f} MB between the replicas "
            f"(common to every method, counted in no row); checkpoint {init_from}."
        )

    results = loopback(args, ms, init_from, report)
    report.add(
        "## 1. Bytes between the replicas, final eval loss, wall-clock (gloo on loopback)\n\n"
        "Per rank, from the ledger (metrics.jsonl, every step). `replica MB`: sum over steps of the "
        "`dp_replicate/*` keys; `all MB`: `comm_bytes_total` at the end (adds the per-step loss / token-count "
        "scalars); `x fewer`: AdamW's replica bytes / this method's; `peak KB/step`: the largest single step; "
        "`median KB/step`: the steady rate. Eval loss at the last step (DiLoCo: global weights), over seeds "
        f"{args.seed_list}; `gap`: per-seed (loss / AdamW's - 1), mean and worst. `wall s`: the whole CLI run "
        "(~10 s start-up, evals), median over seeds; `train tok/s`: tokens / sum of step times.\n\n"
        + main_table(ms, results)
        + "\n\n"
        + bytes_consistency(ms, results)
        + " "
        + _sync_note(ms, results)
    )
    table, report.raw["verdict"] = targets_table(ms, results)
    report.add("## 2. The issue's targets\n\n" + table + "\n\n" + _targets_note(args))

    shaped: dict[str, dict] = {}
    title = (
        f"## 3. Wall-clock over a {args.mbit:g} Mbit/s link: each rank in its own network namespace "
        f"(seed {args.seed_list[0]})\n\n"
    )
    if args.no_shaped:
        reason = "--no-shaped"
    elif args.quick and not args.shaped:
        reason = "--quick (add --shaped to run it, or run without --quick)"
    else:
        reason = available()
    if reason:
        report.add(title + f"skipped: {reason}")
    else:
        shaped = over_shaped_link(args, ms, init_from, report)
        report.add(
            title + f"bench/_netns.ShapedNetwork: two namespaces, veths on one bridge, `tc tbf rate "
            f"{args.mbit:g}mbit` on each rank's egress; per namespace `torchrun --nnodes 2 --node-rank i "
            "--nproc-per-node 1 --master-addr <namespace 0's veth> -m meshweave train` with "
            "`GLOO_SOCKET_IFNAME` = its veth. `train s`: sum of step times (rank 0); `wall tok/s`: tokens / "
            "the whole run incl. start-up and evals; `replica bytes / link rate`: the least time the "
            "replica traffic needs on this link; `slowdown vs loopback`: train s / the loopback run's "
            "(same seed); `speed-up vs AdamW`: AdamW's train s / this method's; `losses vs loopback "
            "seed`: every step's training loss compared with the loopback run of the same seed.\n\n"
            + shaped_table(ms, shaped, results, args.seed_list[0], args.mbit)
        )
    png = plot(ms, results, shaped, report)
    return report.finish(f"Plot: {png if png else 'not written (matplotlib missing)'}. Run directories: {run_root}. ")


# ================================================================================================
# --sweep: how the defaults were chosen


def sweep_variants(steps: int) -> list[tuple[str, list[str], int]]:
    """One-seed grid behind the defaults, as ``(name, flags, steps)``: 1-bit Adam's freeze_step,
    DiLoCo's outer lr / momentum at H=20 (published 0.7 / Nesterov 0.9 first), H at plain averaging
    (outer lr 1, momentum 0), and AdamW vs averaging DiLoCo on a 3x longer run."""
    diloco = ["--comm.diloco.enabled=true", "--comm.diloco.fragments=1", "--comm.diloco.delay=0"]
    average = ["--comm.diloco.outer_lr=1", "--comm.diloco.outer_momentum=0"]
    out: list[tuple[str, list[str], int]] = [("adamw", [], steps)]
    for share in (0.15, 0.2, 0.25, 0.3):
        f = max(1, round(share * steps))
        out.append(
            (f"onebit freeze_step={f} ({share:.0%})", ["--optim.name=onebit_adam", f"--optim.freeze_step={f}"], steps)
        )
    for lr, mu in ((0.7, 0.9), (0.4, 0.9), (0.7, 0.5), (1.0, 0.3), (1.4, 0.0), (1.0, 0.0)):
        out.append(
            (
                f"diloco H=20 outer lr {lr:g} momentum {mu:g}",
                [
                    *diloco,
                    "--comm.diloco.inner_steps=20",
                    f"--comm.diloco.outer_lr={lr:g}",
                    f"--comm.diloco.outer_momentum={mu:g}",
                ],
                steps,
            )
        )
    for h in (1, 5):
        out.append(
            (f"diloco H={h} outer lr 1 momentum 0", [*diloco, f"--comm.diloco.inner_steps={h}", *average], steps)
        )
    out.append((f"adamw, {3 * steps} steps", [], 3 * steps))
    out.append(
        (
            f"diloco H=20 outer lr 1 momentum 0, {3 * steps} steps",
            [*diloco, "--comm.diloco.inner_steps=20", *average],
            3 * steps,
        )
    )
    return out


def sweep(args: argparse.Namespace) -> int:
    """Run :func:`sweep_variants` on one seed; table and JSON as ``lowcomm_sweep``."""
    seed = args.seed_list[0]
    report = Report(args.out, "lowcomm_sweep", "meshweave bench: low-communication tuning sweep (one seed)")
    report.raw.update(args=raw_args(args), runs={})
    report.add(
        f"load average {report.load_start[0]:.1f} at start. {_settings(args, sweep=True)} One seed: a guide "
        "for the defaults of bench/lowcomm.py, not a result. Gaps are to the AdamW run of the same length."
    )
    runs: dict[str, dict] = report.raw["runs"]
    for name, flags, steps in sweep_variants(args.steps):
        slug = "".join(c if c.isalnum() else "-" for c in name)
        interval = max(5, round(steps / 40) * 5)
        r = runs[name] = run_loopback(
            args.out / "logs" / "lowcomm_sweep" / slug, [*base_flags(steps, seed, interval), *flags]
        )
        r["steps"] = steps
        report.write()
        print(f"  {name}: " + (f"eval loss {r['final_eval_loss']:.4f}" if "error" not in r else r["error"]), flush=True)
    base = {r["steps"]: r for name, r in runs.items() if name.startswith("adamw") and "error" not in r}
    rows = []
    for name, r in runs.items():
        if "error" in r:
            rows.append([name, "failed: " + r["error"], "", "", "", ""])
            continue
        ref = base.get(r["steps"])
        rows.append(
            [
                name,
                str(r["steps"]),
                f"{r['final_eval_loss']:.4f}",
                f"{100 * (r['final_eval_loss'] / ref['final_eval_loss'] - 1):+.2f}%" if ref and ref is not r else "-",
                _mb(r["replica_bytes"]),
                f"{ref['replica_bytes'] / r['replica_bytes']:,.1f}" if ref and r["replica_bytes"] else "-",
            ]
        )
    report.add(
        md_table(
            ["variant", "steps", "final eval loss", "gap to AdamW", "replica MB", "x fewer"], rows, right=range(1, 6)
        )
    )
    return report.finish()


def raw_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _sync_note(ms: list[Method], results: dict[str, dict[int, dict]]) -> str:
    parts = []
    for m in ms:
        runs = _ok(list(results.get(m.name, {}).values()))
        if runs and runs[0]["sync_steps"]:
            steps = runs[0]["sync_steps"]
            shown = ", ".join(map(str, steps[:6])) + (", ..." if len(steps) > 6 else "")
            failed = sum(r["failed_syncs"] for r in runs)
            parts.append(
                f"`{m.name}` launched {len(steps)} syncs (steps {shown}){f', {failed} FAILED' if failed else ''}"
            )
    return ("Sync launches: " + "; ".join(parts) + ".") if parts else ""


def _targets_note(args: argparse.Namespace) -> str:
    return (
        "Gaps are per-seed paired (same init and data order as AdamW), averaged over seeds; a target is met when "
        "the mean is within the bound (the worst seed is shown beside it). The compressed-phase rate compares "
        "median bytes per step (1-bit Adam's median step is a compressed one when freeze_step < steps / 2). "
        "`x fewer` uses replica bytes over the whole run, warm-up or first sync included. The peak ratio of a "
        "4-bit variant mixes two effects (1/P from the fragments, ~1/8 from the codec); the note gives both. "
        f"{args.steps} steps is a short run: DiLoCo gets {args.steps // args.inner_steps} outer rounds."
    )


if __name__ == "__main__":
    raise SystemExit(main())
