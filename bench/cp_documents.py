"""Document-masked context-parallel attention: time and bytes per rank against document length.

Ring and TokenRing attention (``meshweave.parallel.context.ContextParallel``) on P=4 gloo ranks, one
causal attention layer forward + backward on packed sequences (batch 2, fp32), with document
masking at mean document lengths 64 and 512 tokens and with one document per row (the whole
sequence), beside the same layer without documents (``unmasked``). Each row's document lengths are
drawn from an exponential distribution with that mean (at least one token; the last document cut
to fit the row), seeded, so every row packs differently.

With documents a block (query rank, key rank) in which no query shares a document with a key it
may see is skipped on both ends — no compute, nothing sent (blockwise.BlockPlan). Short documents
leave few such blocks, so both time and bytes fall; one document per row leaves them all, and the
masked kernels then cost a little more than the unmasked ones. Reported per (method, documents):

- **blocks computed** of the P x P (query rank, key rank) blocks, from the pure skip rule;
- **bytes per rank**: what meshweave's ledger booked in forward and backward (mean over ranks,
  and the largest rank's fwd+bwd), and the ratio to the unmasked run;
- **time**: forward, backward and their sum — medians over timed rounds of the slowest rank's time,
  each iteration started from a barrier; variants take turns round by round (order rotated), and
  the ratio to the unmasked run is taken per round, then the median;
- **CPU time**: the CPU seconds of all ranks together over the layer (``time.process_time``), the
  work done — on a loaded machine wall time also counts waiting for a core, CPU time much less;
- **max err**: unsharded output and dq/dk/dv against single-process masked attention
  (``kernels.attention`` with ``q_docs = k_docs = documents`` on the whole sequence).

    .venv/bin/python -m bench.cp_documents            # ~1 min on 2 cores (90 s on a busy machine)
    .venv/bin/python -m bench.cp_documents --quick    # ~20 s: 1024 tokens, 2 rounds

Output: markdown on stdout and in bench/results/cp_documents.md, raw numbers in
bench/results/cp_documents.json, worker logs under runs/bench/cp_documents/logs.
"""

from __future__ import annotations

import statistics
import time

from bench._common import ROOT, Report, md_table, options, run_ranks

P = 4
BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 4, 64
MEANS = (64, 512, None)  # None: one document per row
METHODS = ("ring", "tokenring")
SEED = 1234
MIB = 2**20
LOG_ROOT = ROOT / "runs" / "bench" / "cp_documents" / "logs"


def document_ids(seq: int, mean: int | None, seed: int):
    """``int64 [BATCH, seq]`` document ids: per row, lengths ~ max(1, round(Exponential(mean))), the
    last cut to fit (``mean`` None: one document per row)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(BATCH):
        if mean is None:
            lengths = [seq]
        else:
            lengths, total = [], 0
            while total < seq:
                draw = -mean * torch.log1p(-torch.rand((), generator=gen, dtype=torch.float64)).item()
                lengths.append(min(max(1, round(draw)), seq - total))
                total += lengths[-1]
        rows.append(torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)]))
    return torch.stack(rows)


def settings(seq: int) -> dict:
    """name -> document ids (None: unmasked), in table order."""
    out: dict = {"unmasked": None}
    for mean in MEANS:
        out[f"mean {mean}" if mean else "one per row"] = document_ids(seq, mean, SEED + (mean or 0))
    return out


def worker(rank: int, world: int, spec: dict) -> dict:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from meshweave.comm import ops
    from meshweave.comm.ops import LEDGER, CommGroup
    from meshweave.kernels.attention import attention
    from meshweave.parallel.context import ContextParallel
    from meshweave.parallel.context.ring import RingAttention
    from meshweave.parallel.context.tokenring import TokenRingAttention

    pg = dist.new_group(list(range(world)))
    ops.register_group(pg, "cp")
    group = CommGroup(pg, "cp")
    seq = spec["seq"]
    gen = torch.Generator().manual_seed(SEED)
    q, dout = (torch.randn(BATCH, seq, HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    k, v = (torch.randn(BATCH, seq, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    docs = settings(seq)

    functions = {"ring": RingAttention, "tokenring": TokenRingAttention}
    variants = []
    for method in METHODS:
        cp = ContextParallel(group, method)  # its zigzag shard / unshard
        for name, ids in docs.items():
            leaves = [cp.shard(t, 1).requires_grad_() for t in (q, k, v)]
            variants.append((method, name, cp, ids, leaves, cp.shard(dout, 1)))

    def layer(method, cp, ids, leaves):
        """What ``cp.attention(*leaves, causal=True, documents=ids)`` runs for ring / TokenRing."""
        return functions[method].apply(*leaves, True, cp.group, ids)[0]

    def step(method, cp, ids, leaves, local_dout) -> tuple[float, float, float]:
        """(forward s, backward s, CPU s of this process) of one layer."""
        for t in leaves:
            t.grad = None
        dist.barrier(group=pg)
        cpu, t0 = time.process_time(), time.perf_counter()
        out = layer(method, cp, ids, leaves)
        t1 = time.perf_counter()
        out.backward(local_dout)
        return t1 - t0, time.perf_counter() - t1, time.process_time() - cpu

    rows: dict = {}
    for method, name, cp, ids, leaves, local_dout in variants:  # one measured pass each
        LEDGER.reset()
        out = layer(method, cp, ids, leaves)
        fwd = sum(LEDGER.total_bytes.values())
        LEDGER.reset()
        out.backward(local_dout)
        bwd = sum(LEDGER.total_bytes.values())
        full = [cp.unshard(t, 1) for t in (out.detach(), *(x.grad for x in leaves))]
        err = None
        if rank == 0:
            ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            ref, _ = attention(*ref_leaves, True, q_docs=ids, k_docs=ids)
            ref.backward(dout)
            want = [ref.detach(), *(x.grad for x in ref_leaves)]
            err = max((a - b).abs().max().item() for a, b in zip(full, want))
        rows[(method, name)] = {"fwd_bytes": fwd, "bwd_bytes": bwd, "max_err": err, "times": [], "cpu": []}

    for rnd in range(spec["warmup"] + spec["iters"]):
        order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
        for method, name, cp, ids, leaves, local_dout in order:
            t = step(method, cp, ids, leaves, local_dout)
            if rnd >= spec["warmup"]:
                rows[(method, name)]["times"].append(t[:2])
                rows[(method, name)]["cpu"].append(t[2])
    for row in rows.values():  # an iteration lasts as long as its slowest rank
        t = torch.tensor(row["times"], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=pg)
        row["times"] = t.tolist()
        cpu = torch.tensor(row["cpu"], dtype=torch.float64)  # CPU seconds of all ranks together
        dist.all_reduce(cpu, group=pg)
        row["cpu"] = cpu.tolist()
    return {f"{m}|{n}": r for (m, n), r in rows.items()}


def blocks_computed(ids, seq: int) -> int:
    """How many of the P x P blocks the skip rule leaves (all of them without documents)."""
    from meshweave.parallel.context.blockwise import BlockPlan

    plan = BlockPlan(ids, P, True, seq // P)
    return sum(plan.visible(qr, kr) for qr in range(P) for kr in range(P))


def mean_length(ids) -> float | None:
    if ids is None:
        return None
    starts = (ids[:, 1:] != ids[:, :-1]).sum().item() + ids.shape[0]
    return ids.numel() / starts


def table(per_rank: list[dict], seq: int) -> tuple[str, list[dict]]:
    docs = settings(seq)
    recs, lines = [], []
    for method in METHODS:
        base = None
        for name, ids in docs.items():
            key = f"{method}|{name}"
            ranks = [r[key] for r in per_rank]
            times, cpu = ranks[0]["times"], ranks[0]["cpu"]
            fwd_t = statistics.median(t[0] for t in times)
            bwd_t = statistics.median(t[1] for t in times)
            total_t = statistics.median(t[0] + t[1] for t in times)
            fwd_b = statistics.mean(r["fwd_bytes"] for r in ranks)
            bwd_b = statistics.mean(r["bwd_bytes"] for r in ranks)
            rec = {
                "method": method,
                "documents": name,
                "mean_length": mean_length(ids),
                "blocks": blocks_computed(ids, seq),
                "fwd_bytes": [r["fwd_bytes"] for r in ranks],
                "bwd_bytes": [r["bwd_bytes"] for r in ranks],
                "times": times,
                "cpu_s": cpu,
                "max_err": ranks[0]["max_err"],
            }
            recs.append(rec)
            if base is None:
                base = (fwd_b + bwd_b, [a + b for a, b in times], cpu)
            # per round against the unmasked run of the same round (rounds interleave the
            # variants, so a load change over the run cancels)
            ratio = statistics.median((a + b) / u for (a, b), u in zip(times, base[1]))
            cpu_ratio = statistics.median(c / u for c, u in zip(cpu, base[2]))
            lines.append(
                [
                    method,
                    name,
                    "-" if rec["mean_length"] is None else f"{rec['mean_length']:.0f}",
                    f"{rec['blocks']} / {P * P}",
                    f"{fwd_b / MIB:.2f}",
                    f"{bwd_b / MIB:.2f}",
                    f"{max(a + b for a, b in zip(rec['fwd_bytes'], rec['bwd_bytes'])) / MIB:.2f}",
                    f"{(fwd_b + bwd_b) / base[0]:.3f}",
                    f"{fwd_t * 1e3:.0f}",
                    f"{bwd_t * 1e3:.0f}",
                    f"{total_t * 1e3:.0f}",
                    f"{min(a + b for a, b in times) * 1e3:.0f}-{max(a + b for a, b in times) * 1e3:.0f}",
                    f"{ratio:.2f}",
                    f"{statistics.median(cpu) * 1e3:.0f}",
                    f"{cpu_ratio:.2f}",
                    f"{rec['max_err']:.1e}",
                ]
            )
    headers = [
        "method",
        "documents",
        "mean length",
        "blocks computed",
        "fwd MiB/rank",
        "bwd MiB/rank",
        "fwd+bwd MiB, max rank",
        "bytes vs unmasked",
        "fwd ms",
        "bwd ms",
        "fwd+bwd ms",
        "min-max",
        "time vs unmasked",
        "CPU ms, all ranks",
        "CPU vs unmasked",
        "max err",
    ]
    return md_table(headers, lines, right=tuple(range(2, 16))), recs


def main(argv: list[str] | None = None) -> int:
    ap = options(__doc__, "a 1024-token sequence and 2 timed rounds (~20 s)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; 1024 with --quick)")
    ap.add_argument("--iters", type=int, default=None, help="timed rounds (default 5; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds after the measured pass")
    args = ap.parse_args(argv)
    args.seq = args.seq or (1024 if args.quick else 2048)
    args.iters = args.iters or (2 if args.quick else 5)
    report = Report(args.out, "cp_documents", "meshweave bench: document-masked ring and TokenRing attention")
    report.raw.update(args={k: str(v) for k, v in vars(args).items()})
    setting = (
        f"P={P} gloo ranks, 1 thread each; one causal attention layer forward + backward, batch {BATCH}, "
        f"sequence {args.seq} ({args.seq // P} tokens per rank, zigzag chunks of {args.seq // (2 * P)}), "
        f"{HEADS} query heads, {KV_HEADS} KV heads, head_dim {HEAD_DIM}, fp32; document lengths per row "
        f"~ Exponential(mean), seed {SEED}. {args.iters} timed rounds after {args.warmup} warm-up round(s) "
        f"and one measured pass; times are medians of the slowest rank."
    )
    report.add(f"{report.environment('torch')}; {'--quick; ' if args.quick else ''}{setting}")
    spec = {"seq": args.seq, "iters": args.iters, "warmup": args.warmup}
    t0 = time.perf_counter()
    res = run_ranks(worker, P, spec, log_dir=LOG_ROOT, timeout=1200)
    if isinstance(res, str):
        report.add(res)
        return 1
    text, recs = table(res, args.seq)
    report.raw["records"] = recs
    report.add(
        "## Time and bytes per rank against document length\n\n"
        "`blocks computed`: (query rank, key rank) blocks left by the skip rule, of P x P. Bytes: the "
        "ledger's, mean over ranks (`max rank`: the largest rank's fwd+bwd); `bytes vs unmasked` divides by "
        "the same method's unmasked row; `time vs unmasked`: median over rounds of fwd+bwd / the same "
        "method's unmasked fwd+bwd in the same round. `CPU ms, all ranks`: CPU time of the 4 rank processes "
        "together over the layer (median over rounds; the work done, which other load on the machine "
        "inflates far less than wall time), and its ratio per round to the unmasked run. `max err`: max abs "
        "difference of the unsharded output and gradients from single-process masked attention (fp32).\n\n"
        + text
        + f"\n\nRanks ran {time.perf_counter() - t0:.0f} s."
    )
    return report.finish()


if __name__ == "__main__":
    raise SystemExit(main())
