"""Context-parallel attention: bytes per rank and time per layer, meshweave's methods vs DeepSpeed-Ulysses.

For P in {2, 4} gloo ranks and several sequence lengths N (batch 1, 8 query heads, 8 or 2 KV heads,
head_dim 64, bf16 by default), one attention layer forward + backward through
``meshweave.parallel.context.ContextParallel`` with each method — ``ulysses``, ``ring``,
``tokenring``, ``hybrid`` (Ulysses 2 x ring 2, P=4 only) — and through DeepSpeed's
``deepspeed.sequence.layer.DistributedAttention`` (its Ulysses) on the same shards, with the same
local kernel (``meshweave.kernels.attention.attention``, returning only ``out``), in the same
processes, taking turns round by round (the order rotated every round). Reported:

- **bytes per rank per layer**, forward and backward, from meshweave's ledger (measured;
  ``meshweave.comm.capture.install()`` books DeepSpeed's ``torch.distributed`` all-to-alls too),
  beside these formulas (``s = N/P`` local rows, ``e`` element size, ``|x|`` the bytes of this
  rank's shard of x, K/V counted with the KV heads they travel with):

  ==============  ==========================================  ==========================================
  method          forward                                     backward
  ==============  ==========================================  ==========================================
  Ulysses (U=P)   (U-1)/U x (|q| + |k'| + |v'| + |out|)        the same (dout; dq, dk', dv')
  ring            K/V straight to each reader, rows it needs  the K/V again + each block's dK/dV home
  TokenRing       sum of Q hops + (out, lse) returns          (q, dout, out, lse) hops + dQ returns
  hybrid U x R    Ulysses over U + ring over R on head shards  the same two, backward
  DeepSpeed       as Ulysses (three all-to-alls for q, k, v    as Ulysses
                  and one for out instead of two in all)
  ==============  ==========================================  ==========================================

  ``k'`` = K with its heads repeated up to U when U > h_kv (Ulysses never splits a KV group; DeepSpeed
  asserts h_kv >= P instead, so for that case the bench repeats K/V before calling it). Ring, per rank
  r: its K/V to each of the P-1 others, in backward again plus the dK/dV (working dtype) of its block
  of each other rank's K/V; causal, a rank above r reads only the first half of r's K/V, so r sends
  (r + (P-1-r)/2) |K+V| forward ((P-1) non-causal; 3(P-1)/4 on average) and returns
  (P-1-r + r/2) |dK+dV|. TokenRing, per rank: its queries to the P-1 others and P-1 result returns;
  causal, a block whose K/V rank is above the query owner needs only the second half of the queries,
  so on average over ranks 3(P-1)/4 |Q| are sent and 3(P-1)/4 x (|out| + |lse|) returned
  (non-causal: (P-1) each); the exact per-rank sums are computed below. With grouped-query attention
  |Q| = g |K|, so TokenRing moves about g times what the ring moves.
  Ulysses' bytes depend on N/P only (and on (P-1)/P): constant when N and P grow together; the ring's
  grow with N.
- **time** per layer forward + backward: median over timed rounds of the slowest rank's time, each
  iteration started from a barrier; "vs ulysses" divides by meshweave's Ulysses in the same config.
- **correctness**: max |out - ref| and max over dq/dk/dv of |grad - ref| of the unsharded results,
  ref = single-process fp32 attention on the same (dtype-rounded) inputs; DeepSpeed's output and
  gradients are also compared with meshweave's Ulysses directly.
- **overlap** (selected configs): the same layer with the attention kernels replaced by zero-fill
  stubs (``no-kernel``: every exchange and merge still runs — the communication schedule alone) and
  with every exchange replaced by a local copy / zero-fill (``no-comm``: the compute alone). ``hidden``
  = (no-comm + no-kernel - full) / no-kernel: the share of the communication time that ran under
  compute (about 0 for Ulysses, whose exchanges are blocking; negative = contention).

Then the overlap configs again with every rank in a network namespace of its own behind a bridge,
each rank's link shaped to ``--shaped-mbit`` (bench/_netns.py; root only, else "skipped: <reason>").
On 2 shared cores compute and gloo compete for the CPU, so only there can overlap show.

    .venv/bin/python -m bench.cp_attention              # ~7-10 min on 2 cores (7 min measured, busy machine)
    .venv/bin/python -m bench.cp_attention --quick      # ~1-1.5 min
    .venv/bin/python -m bench.cp_attention --shaped-mbit 200 --no-shaped

Output: markdown tables on stdout and in bench/results/cp_attention.md, raw numbers in
bench/results/cp_attention.json, worker logs under runs/bench/cp_attention/logs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any

from bench._common import ROOT, Report, md_table, options, run_ranks
from bench._netns import available
from bench._peers import deepspeed_env, start_peer

BATCH, HEADS, HEAD_DIM = 1, 8, 64
DTYPES = {"bf16": 2, "fp32": 4}  # element sizes
ACC = 4  # fp32 accumulators and lse
MIB = 2**20
SEED = 1234
MODES = ("full", "nocomm", "nokernel")
DS_NAME = "deepspeed ulysses"
ALL_METHODS = ("ulysses", "ring", "tokenring", "hybrid", "deepspeed")
LOG_ROOT = ROOT / "runs" / "bench" / "cp_attention" / "logs"


# ================================================================================================
# formulas (bytes one rank sends per layer)


def formula(
    method: str, P: int, N: int, kv: int, esize: int, causal: bool, rank: int, ulysses: int = 2
) -> tuple[int, int]:
    """(forward, backward) bytes rank ``rank`` of ``P`` sends for one attention layer (module docstring)."""
    s = N // P
    if method == "ulysses" or method.startswith(DS_NAME):
        return (_ulysses_bytes(P, s, kv, esize),) * 2
    if method == "ring":
        return _ring_bytes(P, s, kv, esize, rank, causal)
    if method == "tokenring":
        return _tokenring_bytes(P, s, rank, causal, esize)
    if method.startswith("hybrid"):
        u, r = ulysses, P // ulysses
        a2a = _ulysses_bytes(u, s, kv, esize)
        # After the all-to-all each rank holds N/R rows of h/U heads: the ring moves |K'+V'| of that.
        ring_fwd, ring_bwd = _ring_bytes(r, s * u, max(kv, u) // u, esize, rank // u, causal)
        return a2a + ring_fwd, a2a + ring_bwd
    raise ValueError(method)


def _ulysses_bytes(u: int, s: int, kv: int, esize: int) -> int:
    per_head = BATCH * s * HEAD_DIM * esize
    return (u - 1) * (2 * HEADS + 2 * max(kv, u)) * per_head // u


def _ring_bytes(p: int, rows: int, kv: int, esize: int, rank: int, causal: bool) -> tuple[int, int]:
    kv_block = 2 * BATCH * rows * kv * HEAD_DIM * esize
    fwd = ret = 0
    for other in range(p):
        if other != rank:
            fwd += kv_block // 2 if causal and other > rank else kv_block  # our K/V to ``other``
            ret += kv_block // 2 if causal and other < rank else kv_block  # dK/dV of ``other``'s K/V home
    return fwd, fwd + ret


def _tokenring_bytes(p: int, s: int, rank: int, causal: bool, esize: int) -> tuple[int, int]:
    q_row, lse_row = BATCH * HEADS * HEAD_DIM * esize, BATCH * HEADS * ACC
    fwd = bwd = 0
    for other in range(p):
        if other == rank:
            continue
        rows = s // 2 if causal and other > rank else s  # our queries (package, backward) to ``other``
        fwd += rows * q_row
        bwd += rows * (3 * q_row + lse_row)
        rows = s // 2 if causal and rank > other else s  # (out, lse) / dq of ``other``'s queries home
        fwd += rows * (q_row + lse_row)
        bwd += rows * q_row
    return fwd, bwd


# ================================================================================================
# the worker (one per rank; plain gloo on loopback or inside a shaped namespace)


def _stub_attention(q, k, v, causal=True, q_docs=None, k_docs=None):
    """Zero output of q's shape and lse 0. The output stays connected to q, k and v, so backward
    still runs every exchange that carries their gradients (DeepSpeed's dk / dv all-to-alls too)."""
    import torch

    from meshweave.kernels.attention import accumulation_dtype

    lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1], dtype=accumulation_dtype(q.dtype))
    return q * 0 + (k.sum() + v.sum()) * 0, lse


def _stub_attention_backward(dout, q, k, v, out, lse, causal, q_docs=None, k_docs=None):
    import torch

    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _local_a2a(out, t, group, out_splits=None, in_splits=None, async_op=False):
    from meshweave.comm import ops

    out.copy_(t)
    return ops._DONE


def _local_exchange(sends, recvs, group):
    from meshweave.comm import ops

    for t, _ in recvs:
        t.zero_()
    return ops._DONE


def _ds_local_a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
    output.copy_(input)


@contextlib.contextmanager
def _mode(mode: str):
    """Run one layer as is ("full"), without the attention kernels ("nokernel": the communication
    schedule, merges included) or without communication ("nocomm": exchanges become local copies /
    zero-fills of the right shapes; the kernels' cost does not depend on the values)."""
    import torch.distributed as dist

    import meshweave.parallel.context as context
    from meshweave.comm import ops
    from meshweave.parallel.context import ring, tokenring, ulysses

    if mode == "nokernel":
        patches = [(m, "attention", _stub_attention) for m in (ring, tokenring, ulysses)]
        patches += [(m, "attention_backward", _stub_attention_backward) for m in (ring, tokenring)]
        patches.append((context, "local_attention", _stub_attention))
    elif mode == "nocomm":
        patches = [
            (ops, "all_to_all_single", _local_a2a),
            (ops, "exchange", _local_exchange),
            (dist, "all_to_all_single", _ds_local_a2a),
        ]
    else:
        patches = []
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    try:
        for m, name, fn in patches:
            setattr(m, name, fn)
        yield
    finally:
        for m, name, fn in saved:
            setattr(m, name, fn)


class _Variant:
    def __init__(self, name, fn, leaves, dout, layout):
        self.name, self.fn, self.leaves, self.dout, self.layout = name, fn, leaves, dout, layout
        self.times = {m: [] for m in MODES}  # mode -> [(fwd, bwd, total)]

    def step(self):
        out = self.fn()
        t1 = time.perf_counter()
        out.backward(self.dout)
        return out, t1

    def clear(self):
        for t in self.leaves:
            t.grad = None


def _link_check(rank: int, nbytes: int = 32 * MIB) -> float | None:
    """Mbit/s of one rank-0 -> rank-1 send of ``nbytes`` (what the link between two ranks carries)."""
    import torch
    import torch.distributed as dist

    buf = torch.zeros(nbytes // 4)
    dist.barrier()
    t0 = time.perf_counter()
    if rank == 0:
        dist.send(buf, 1)
    elif rank == 1:
        dist.recv(buf, 0)
    dist.barrier()
    return nbytes * 8 / (time.perf_counter() - t0) / 1e6


def worker(rank: int, world: int, spec: dict) -> dict:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from meshweave.comm import capture, ops
    from meshweave.comm.ops import LEDGER, CommGroup
    from meshweave.parallel.context import ContextParallel
    from meshweave.parallel.context import ulysses as ulysses_module

    capture.install()  # DeepSpeed's torch.distributed all-to-alls land in the ledger too
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    mw_pg, ds_pg = dist.new_group(list(range(world))), dist.new_group(list(range(world)))
    ops.register_group(mw_pg, "cp")
    ops.register_group(ds_pg, "ds_sp")
    group = CommGroup(mw_pg, "cp")
    cps = {m: ContextParallel(group, m) for m in ("ulysses", "ring", "tokenring")}
    if world >= 4 and world % 2 == 0:
        cps[f"hybrid {2}x{world // 2}"] = ContextParallel(group, "hybrid", ulysses_degree=2)

    def distributed_attention(deepspeed: Any) -> Any:
        from deepspeed.sequence.layer import DistributedAttention

        return DistributedAttention

    DistributedAttention, ds_error = start_peer(distributed_attention, limit=200)  # error: a "skipped" row

    result = {"link_mbit": _link_check(rank) if spec.get("link_check") else None, "configs": []}
    for cfg in spec["configs"]:
        N, kv, causal, modes = cfg["N"], cfg["kv"], cfg["causal"], cfg["modes"]
        gen = torch.Generator().manual_seed(SEED + N + kv)
        q, dout = (torch.randn(BATCH, N, HEADS, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
        k, v = (torch.randn(BATCH, N, kv, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
        ref = _reference(q, k, v, dout, causal, dtype) if rank == 0 and spec["check"] else None

        variants, skipped = [], {}
        wanted = spec.get("methods") or ALL_METHODS
        for name, cp in cps.items():
            if name.split()[0] in wanted:
                variants.append(_make_variant(name, cp, cp, q, k, v, dout, causal))
        if "deepspeed" in wanted and ds_error:
            skipped[DS_NAME] = ds_error
        elif "deepspeed" in wanted:
            repeat = world // kv if kv < world else 1  # DeepSpeed asserts kv heads >= P: repeat for it
            name = DS_NAME if repeat == 1 else f"{DS_NAME} (K/V repeated x{repeat} by caller)"

            # The same kernel object meshweave's Ulysses calls (looked up at call time, so the
            # no-kernel stub replaces it for both).
            def local(qh: Any, kh: Any, vh: Any, c: bool = causal) -> Any:
                return ulysses_module.attention(qh, kh, vh, c)[0]

            ds_attn = DistributedAttention(local, ds_pg, scatter_idx=2, gather_idx=1)

            def call(ql: Any, kl: Any, vl: Any, r: int = repeat, a: Any = ds_attn) -> Any:
                if r > 1:  # DeepSpeed asserts kv heads >= P
                    kl, vl = kl.repeat_interleave(r, dim=2), vl.repeat_interleave(r, dim=2)
                return a(ql, kl, vl, 0)

            variants.append(_make_variant(name, None, cps["ulysses"], q, k, v, dout, causal, call=call))

        rows = {}
        gathered = {}
        for var in variants:  # one measured pass each (also the first warm-up)
            LEDGER.reset()
            out = var.fn()
            fwd_keys, fwd_calls = dict(LEDGER.total_bytes), sum(LEDGER.calls.values())
            LEDGER.reset()
            out.backward(var.dout)
            bwd_keys, bwd_calls = dict(LEDGER.total_bytes), sum(LEDGER.calls.values())
            rows[var.name] = {
                "fwd_bytes": sum(fwd_keys.values()),
                "bwd_bytes": sum(bwd_keys.values()),
                "fwd_keys": fwd_keys,
                "bwd_keys": bwd_keys,
                "fwd_calls": fwd_calls,
                "bwd_calls": bwd_calls,
            }
            if spec["check"]:
                full = [var.layout.unshard(t, 1) for t in (out.detach(), *(x.grad for x in var.leaves))]
                if rank == 0:
                    gathered[var.name] = full
            var.clear()
        if rank == 0 and spec["check"]:
            for name, full in gathered.items():
                rows[name]["max_out_err"] = (full[0].float() - ref["out"]).abs().max().item()
                rows[name]["max_grad_err"] = max(
                    (g.float() - r).abs().max().item() for g, r in zip(full[1:], ref["grads"])
                )
            mw = gathered.get("ulysses")
            for name, full in gathered.items():
                if name.startswith(DS_NAME) and mw is not None:
                    rows[name]["vs_ulysses_out"] = (full[0].float() - mw[0].float()).abs().max().item()
                    rows[name]["vs_ulysses_grad"] = max(
                        (a.float() - b.float()).abs().max().item() for a, b in zip(full[1:], mw[1:])
                    )
            del gathered

        for rnd in range(spec["warmup"] + spec["iters"]):
            # Variants in rotated order; a variant's modes back to back (also rotated), so the three
            # times that make one overlap estimate see the same machine load.
            order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
            for var, mode in [(v, modes[(rnd + i) % len(modes)]) for v in order for i in range(len(modes))]:
                with _mode(mode):
                    dist.barrier()
                    t0 = time.perf_counter()
                    _, t1 = var.step()
                    t2 = time.perf_counter()
                var.clear()
                if rnd >= spec["warmup"]:
                    var.times[mode].append((t1 - t0, t2 - t1, t2 - t0))
        for var in variants:  # an iteration lasts as long as its slowest rank
            for mode in modes:
                t = torch.tensor(var.times[mode], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                rows[var.name].setdefault("times", {})[mode] = t.tolist()
        result["configs"].append(
            {
                "N": N,
                "kv": kv,
                "causal": causal,
                "modes": modes,
                "variants": rows,
                "skipped": skipped,
                "ref_kernel_err": ref["kernel_err"] if ref else None,
            }
        )
    return result


def _make_variant(name, cp, layout, q, k, v, dout, causal, call=None) -> _Variant:
    """Leaves holding this rank's shards in ``layout``'s order, and the layer call on them."""
    ql, kl, vl = (layout.shard(t.detach(), 1).requires_grad_() for t in (q, k, v))
    fn = (lambda: cp.attention(ql, kl, vl, causal)) if call is None else (lambda: call(ql, kl, vl))
    return _Variant(name, fn, (ql, kl, vl), layout.shard(dout, 1), layout)


def _reference(q, k, v, dout, causal, dtype) -> dict:
    """Single-process attention in fp32 on the dtype-rounded inputs, and the error of the same
    kernel run in ``dtype`` on one process (what rounding alone costs)."""
    import torch

    from meshweave.kernels.attention import attention

    def run(dt):
        leaves = [t.to(dt, copy=True).requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, causal)[0]
        out.backward(dout.to(dt))
        return out.detach().float(), [t.grad.float() for t in leaves]

    out, grads = run(torch.float32)
    kernel_err = None
    if dtype != torch.float32:
        o, g = run(dtype)
        kernel_err = {
            "out": (o - out).abs().max().item(),
            "grad": max((a - b).abs().max().item() for a, b in zip(g, grads)),
        }
    return {"out": out, "grads": grads, "kernel_err": kernel_err}


# ================================================================================================
# the plan


def plan(args: argparse.Namespace) -> dict:
    """{"plain": {P: configs}, "shaped": {P: configs}} for this run."""
    overlap = ["full", "nocomm", "nokernel"]

    def cfg(N, kv, causal=True, modes=("full",)):
        return {"N": N, "kv": kv, "causal": causal, "modes": list(modes)}

    if args.quick:
        plain = [cfg(1024, 8), cfg(1024, 2), cfg(2048, 8, modes=overlap)]
        shaped = [cfg(2048, 8, modes=overlap)]
    else:
        plain = [
            cfg(N, kv, modes=overlap if kv == 8 and N >= 2048 else ("full",))
            for N in (1024, 2048, 4096)
            for kv in (8, 2)
        ]
        plain.append(cfg(2048, 8, causal=False))
        shaped = [cfg(N, 8, modes=overlap) for N in (2048, 4096)]
    return {"plain": {P: plain for P in (2, 4)}, "shaped": {P: shaped for P in (2, 4)}}


# ================================================================================================
# tables


def _mib(x: float) -> str:
    return f"{x / MIB:.3f}"


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def _med(times: list, col: int) -> float:
    return statistics.median(t[col] for t in times)


def _collect(per_rank: list[dict], P: int, args) -> list[dict]:
    """One record per (config, method): bytes per rank (mean, and against the formula per rank),
    times, errors."""
    esize = DTYPES[args.dtype]
    out = []
    for ci, cfg in enumerate(per_rank[0]["configs"]):
        for name, row0 in cfg["variants"].items():
            ranks = [r["configs"][ci]["variants"][name] for r in per_rank]
            expect = [formula(name, P, cfg["N"], cfg["kv"], esize, cfg["causal"], r) for r in range(P)]
            rec = {
                "P": P,
                "N": cfg["N"],
                "kv": cfg["kv"],
                "causal": cfg["causal"],
                "method": name,
                "fwd_bytes": [x["fwd_bytes"] for x in ranks],
                "bwd_bytes": [x["bwd_bytes"] for x in ranks],
                "fwd_formula": [e[0] for e in expect],
                "bwd_formula": [e[1] for e in expect],
                "fwd_keys": row0["fwd_keys"],
                "bwd_keys": row0["bwd_keys"],
                "calls": (row0["fwd_calls"], row0["bwd_calls"]),
                "times": row0["times"],
                "ref_kernel_err": cfg["ref_kernel_err"],
                **{
                    k: row0[k]
                    for k in ("max_out_err", "max_grad_err", "vs_ulysses_out", "vs_ulysses_grad")
                    if k in row0
                },
            }
            out.append(rec)
        for name, why in cfg["skipped"].items():
            out.append(
                {"P": P, "N": cfg["N"], "kv": cfg["kv"], "causal": cfg["causal"], "method": name, "skipped": why}
            )
    return out


def _key(rec):
    return rec["P"], rec["N"], rec["kv"], rec["causal"]


def _mean(xs):
    return sum(xs) / len(xs)


def _cfg_label(rec) -> list:
    return [rec["P"], rec["N"], f"{rec['kv']}" + ("" if rec["causal"] else " (non-causal)")]


def bytes_table(recs: list[dict]) -> str:
    ring = {_key(r): _mean(r["fwd_bytes"]) + _mean(r["bwd_bytes"]) for r in recs if r["method"] == "ring"}
    rows = []
    for r in recs:
        if "skipped" in r:
            rows.append([*_cfg_label(r), r["method"], f"skipped: {r['skipped']}", *[""] * 6])
            continue
        exact = r["fwd_bytes"] == r["fwd_formula"] and r["bwd_bytes"] == r["bwd_formula"]
        meas = _mean(r["fwd_bytes"]) + _mean(r["bwd_bytes"])
        match = "exact" if exact else f"{meas / (_mean(r['fwd_formula']) + _mean(r['bwd_formula'])):.3f}"
        spread = "" if len(set(r["fwd_bytes"])) == 1 else f" ({_mib(min(r['fwd_bytes']))}-{_mib(max(r['fwd_bytes']))})"
        rows.append(
            [
                *_cfg_label(r),
                r["method"],
                _mib(_mean(r["fwd_bytes"])) + spread,
                _mib(_mean(r["fwd_formula"])),
                _mib(_mean(r["bwd_bytes"])),
                _mib(_mean(r["bwd_formula"])),
                match,
                f"{meas / ring[_key(r)]:.2f}" if _key(r) in ring else "-",
                f"{r['calls'][0]} / {r['calls'][1]}",
            ]
        )
    return md_table(
        [
            "P",
            "N",
            "kv heads",
            "method",
            "fwd MiB/rank (ledger)",
            "fwd formula",
            "bwd MiB/rank (ledger)",
            "bwd formula",
            "ledger vs formula",
            "fwd+bwd / ring",
            "collectives fwd / bwd",
        ],
        rows,
        right=(0, 1, 4, 5, 6, 7, 8, 9),
    )


def time_table(recs: list[dict], correctness: bool = True) -> str:
    base = {_key(r): r["times"]["full"] for r in recs if r["method"] == "ulysses"}
    rows = []
    for r in recs:
        if "skipped" in r:
            rows.append([*_cfg_label(r), r["method"], f"skipped: {r['skipped']}"] + [""] * (6 if correctness else 4))
            continue
        t = r["times"]["full"]
        ratio = f"{statistics.median(a[2] / b[2] for a, b in zip(t, base[_key(r)])):.2f}" if _key(r) in base else "-"
        row = [
            *_cfg_label(r),
            r["method"],
            _ms(_med(t, 0)),
            _ms(_med(t, 1)),
            _ms(_med(t, 2)),
            f"{_ms(min(x[2] for x in t))}-{_ms(max(x[2] for x in t))}",
            ratio,
        ]
        if correctness:
            row += [
                f"{r['max_out_err']:.1e}" if "max_out_err" in r else "-",
                f"{r['max_grad_err']:.1e}" if "max_grad_err" in r else "-",
            ]
        rows.append(row)
    headers = ["P", "N", "kv heads", "method", "fwd ms", "bwd ms", "fwd+bwd ms", "min-max ms", "vs ulysses"]
    if correctness:
        headers += ["max abs out err", "max abs grad err"]
    return md_table(headers, rows, right=tuple(range(4, len(headers))) + (0, 1))


def overlap_table(recs: list[dict]) -> str:
    rows = []
    for r in recs:
        if "skipped" in r or "nokernel" not in r["times"]:
            continue
        full, nocomm, nokernel = (_med(r["times"][m], 2) for m in MODES)
        # Per round (the three times were taken back to back), then the median over rounds.
        per_round = [(c + k - f) / k for f, c, k in zip(*([t[2] for t in r["times"][m]] for m in MODES)) if k > 0]
        hidden = statistics.median(per_round) if per_round else float("nan")
        small = nokernel < 0.1 * full  # communication too small a part to tell from noise
        rows.append(
            [
                *_cfg_label(r),
                r["method"],
                _ms(full),
                _ms(nocomm),
                _ms(nokernel),
                _ms(full - nocomm),
                "(comm < 10%)" if small else f"{100 * hidden:.0f}%",
            ]
        )
    return md_table(
        ["P", "N", "kv heads", "method", "fwd+bwd ms", "no-comm ms", "no-kernel ms", "exposed comm ms", "hidden comm"],
        rows,
        right=(0, 1, 4, 5, 6, 7, 8),
    )


def constant_table(recs: list[dict], args) -> str:
    """Ulysses bytes when N and P grow together, beside the ring's and TokenRing's."""
    esize = DTYPES[args.dtype]
    by = {(r["P"], r["N"], r["method"]): r for r in recs if r["kv"] == 8 and r["causal"] and "skipped" not in r}
    rows = []
    for N, P in ((1024, 2), (2048, 4), (4096, 8)):
        row = [N, P]
        for m in ("ulysses", "ring", "tokenring"):
            r = by.get((P, N, m))
            if r:
                row.append(_mib(_mean(r["fwd_bytes"]) + _mean(r["bwd_bytes"])))
            else:  # not run (P=8 on 2 cores): the formula, marked
                f = [formula(m, P, N, 8, esize, True, rank) for rank in range(P)]
                row.append(_mib(_mean([a + b for a, b in f])) + " (formula)")
        rows.append(row)
    return md_table(
        ["N", "P", "ulysses fwd+bwd MiB/rank", "ring fwd+bwd MiB/rank", "tokenring fwd+bwd MiB/rank"],
        rows,
        right=(0, 1, 2, 3, 4),
    )


def ds_table(recs: list[dict]) -> str:
    mw = {_key(r): r for r in recs if r["method"] == "ulysses"}
    rows = []
    for r in recs:
        if not r["method"].startswith(DS_NAME) or _key(r) not in mw:
            continue
        if "skipped" in r:
            rows.append([*_cfg_label(r), f"skipped: {r['skipped']}", *[""] * 6])
            continue
        m = mw[_key(r)]
        paired = [a[2] / b[2] for a, b in zip(m["times"]["full"], r["times"]["full"])]
        same_bytes = m["fwd_bytes"] == r["fwd_bytes"] and m["bwd_bytes"] == r["bwd_bytes"]
        rows.append(
            [
                *_cfg_label(r),
                _ms(_med(m["times"]["full"], 2)),
                _ms(_med(r["times"]["full"], 2)),
                f"{statistics.median(paired):.3f}",
                f"{min(paired):.2f}-{max(paired):.2f}",
                f"{sum(m['calls'])} / {sum(r['calls'])}",
                "yes" if same_bytes else "NO",
                f"{r.get('vs_ulysses_out', float('nan')):.1e} / {r.get('vs_ulysses_grad', float('nan')):.1e}",
            ]
        )
    return md_table(
        [
            "P",
            "N",
            "kv heads",
            "meshweave ulysses ms",
            "deepspeed ms",
            "meshweave / deepspeed (median)",
            "min-max per round",
            "collectives mw / ds",
            "same bytes",
            "max abs diff out / grads",
        ],
        rows,
        right=(0, 1, 3, 4, 5, 6),
    )


# ================================================================================================


def measure(where: str, configs: dict[int, list[dict]], args: argparse.Namespace, raw: dict) -> tuple[list, list]:
    """Every P's configs on loopback gloo (``where`` = "plain", with the correctness check) or with
    each rank in a shaped namespace ("shaped"); the records per (config, method) and a note per P.
    ``raw`` gets the records and each run's link check."""
    env = deepspeed_env()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    recs, notes = [], []
    for P, todo in configs.items():
        spec = {
            "configs": todo,
            "dtype": args.dtype,
            "warmup": args.warmup,
            "iters": args.iters,
            "methods": methods,
            "check": where == "plain",
            "link_check": True,
        }
        t0 = time.perf_counter()
        res = run_ranks(
            worker,
            P,
            spec,
            timeout=1800,
            env=env,
            log_dir=LOG_ROOT / f"{where}-P{P}",
            rate_mbit=args.shaped_mbit if where == "shaped" else None,
        )
        if isinstance(res, str):
            notes.append(f"P={P}: {res}")
            continue
        notes.append(
            f"P={P}: {time.perf_counter() - t0:.0f} s, link check rank 0 -> 1 {res[0]['link_mbit']:.0f} Mbit/s"
        )
        raw["link_mbit"][f"{where}-P{P}"] = res[0]["link_mbit"]
        recs += _collect(res, P, args)
    raw[where] = recs
    return recs, notes


def _setting(args: argparse.Namespace) -> str:
    return (
        f"batch {BATCH}, {HEADS} query heads, head_dim {HEAD_DIM}, {args.dtype}; kv heads 8 (MHA) or 2 (GQA); "
        f"causal unless marked. Every method and DeepSpeed take turns in the same processes, round by round "
        f"(order rotated), {args.iters} timed rounds after {args.warmup} warm-up round(s) plus one measured "
        f"pass; each iteration starts at a barrier and counts as long as its slowest rank; 1 thread per rank."
    )


def main(argv: list[str] | None = None) -> int:
    ap = options(__doc__, "fewer and shorter sequences, fewer rounds (~2 min)")
    ap.add_argument("--shaped-mbit", type=float, default=1000, help="link rate of each rank in the shaped run")
    ap.add_argument("--no-shaped", action="store_true", help="skip the network-namespace run")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--iters", type=int, default=None, help="timed rounds per config (default 9; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds per config after the measured pass")
    ap.add_argument(
        "--methods",
        default=",".join(ALL_METHODS),
        help="comma-separated subset of " + ", ".join(ALL_METHODS) + " (ratios need ulysses)",
    )
    args = ap.parse_args(argv)
    args.iters = args.iters or (3 if args.quick else 9)
    report = Report(args.out, "cp_attention", "meshweave bench: context-parallel attention")
    report.raw.update(args={k: str(v) for k, v in vars(args).items()}, plain=[], shaped=[], link_mbit={})
    report.add(
        f"{report.environment('torch', 'deepspeed')}; {'--quick; ' if args.quick else ''}{args.dtype}. {_setting(args)}"
    )
    todo = plan(args)

    # ---- plain gloo on loopback
    recs, notes = measure("plain", todo["plain"], args, report.raw)
    report.add(
        "## 1. Bytes per rank per attention layer (plain gloo, loopback)\n\n"
        "Measured by meshweave's ledger (mean over ranks; the range when ranks differ) beside the formulas of "
        "the module docstring; `exact` = every rank's ledger equals its formula to the byte. `fwd+bwd / ring` "
        "compares with the ring in the same config. Collectives = ledger entries (a batched P2P counts once).\n\n"
        + (bytes_table(recs) if recs else "no results")
        + "\n\n"
        + "; ".join(notes)
    )
    if recs:
        report.add(
            "## 2. Ulysses bytes per rank constant when N and P grow together\n\n"
            "MHA, causal, fwd+bwd per rank per layer (ledger; P=8 from the formula — 8 ranks on 2 cores "
            "were not run). Ulysses moves (P-1)/P x 4 x N/P x h x d elements per direction: the N/P part is "
            "constant, only (P-1)/P grows (1/2 -> 3/4 -> 7/8) toward a bound; the ring's bytes grow with N.\n\n"
            + constant_table(recs, args)
        )
        report.add(
            "## 3. Time per attention layer, forward + backward (plain gloo, loopback)\n\n"
            + _setting(args)
            + " Errors: unsharded output and gradients vs single-process fp32 attention on the same inputs"
            + _kernel_err_note(recs)
            + ".\n\n"
            + time_table(recs)
        )
        report.add(
            "## 4. meshweave Ulysses vs DeepSpeed Ulysses (same shapes, same kernel, same run)\n\n"
            "DeepSpeed `DistributedAttention(local, group, scatter_idx=2, gather_idx=1)` called with "
            "`batch_dim_idx=0` on the `[b, s, h, d]` shards meshweave's Ulysses uses; the ratio is the median "
            "over rounds of meshweave's time / DeepSpeed's in the same round (< 1: meshweave faster). Bytes "
            "from the ledger (DeepSpeed's all-to-alls captured from torch.distributed). Max abs diff of "
            "DeepSpeed's output / gradients against meshweave's Ulysses.\n\n" + ds_table(recs)
        )
        if any("nokernel" in r.get("times", {}) for r in recs):
            report.add(
                "## 5. Overlap on loopback (no wire bottleneck)\n\n" + _overlap_note() + "\n\n" + overlap_table(recs)
            )

    # ---- shaped links in network namespaces
    title = (
        f"## 6. The same with every rank in its own network namespace, links shaped to {args.shaped_mbit:g} Mbit/s\n\n"
    )
    reason = "--no-shaped" if args.no_shaped else available()
    if reason:
        report.add(title + f"skipped: {reason}")
    else:
        srecs, snotes = measure("shaped", todo["shaped"], args, report.raw)
        report.add(
            title + f"bench/_netns.py: one namespace per rank, veths on one bridge, `tc tbf rate "
            f"{args.shaped_mbit:g}mbit` on each rank's egress (so a rank sends at most that in total, "
            f"like a node NIC behind a switch). {_setting(args)} Ledger bytes: {_same_bytes(recs, srecs)}.\n\n"
            + (time_table(srecs, correctness=False) if srecs else "no results")
            + "\n\n"
            + _overlap_note()
            + "\n\n"
            + (overlap_table(srecs) if srecs else "")
            + "\n\n"
            + "; ".join(snotes)
        )
    return report.finish()


def _kernel_err_note(recs: list[dict]) -> str:
    errs = [r["ref_kernel_err"] for r in recs if r.get("ref_kernel_err")]
    if not errs:
        return ""
    return (
        f" (for scale: the same kernel run in the working dtype on one process is off by up to "
        f"{max(e['out'] for e in errs):.1e} (out) / {max(e['grad'] for e in errs):.1e} (grads) — rounding alone)"
    )


def _overlap_note() -> str:
    return (
        "`no-comm`: every exchange replaced by a local copy / zero-fill of the same shape (the compute alone); "
        "`no-kernel`: the attention kernels replaced by zero-fill stubs, every exchange and merge kept (the "
        "communication schedule alone); `exposed comm` = fwd+bwd - no-comm, what communication added to the "
        "layer (medians); `hidden comm` = 1 - exposed / no-kernel, the share of the communication time that ran "
        "under compute (computed per round from the three back-to-back times, median over rounds). Ulysses' "
        "and DeepSpeed's exchanges block, so about 0 is expected there; negative values mean "
        "the two parts slowed each other (2 shared cores). All are medians of noisy times; `hidden` is left out "
        "where no-kernel is under 10% of fwd+bwd."
    )


def _same_bytes(plain: list[dict], shaped: list[dict]) -> str:
    idx = {(_key(r), r["method"]): r for r in plain if "skipped" not in r}
    diffs = [
        r["method"]
        for r in shaped
        if "skipped" not in r
        and (_key(r), r["method"]) in idx
        and (idx[(_key(r), r["method"])]["fwd_bytes"], idx[(_key(r), r["method"])]["bwd_bytes"])
        != (r["fwd_bytes"], r["bwd_bytes"])
    ]
    return "identical to the plain run's for the same configs" if not diffs else f"DIFFER for {diffs}"


if __name__ == "__main__":
    raise SystemExit(main())
