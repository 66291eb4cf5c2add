"""bench/overlap.py's tensor-parallel rows: ``comm.tp_overlap`` off, on with 1 and 4 pieces per
shard, and Ladder Residual (``model.ladder_residual=true``, tp_overlap off) for comparison.

2 ranks, tp=2 (sequence parallelism), the decoder blocks of bench/overlap.py's model (with 2 KV
heads, not 3: tp=2 must split them) run alone on
a ``[batch, seq/2, dim]`` sequence shard: one forward + backward per repetition. The embedding,
head and loss are left out — their TP collectives are not what ``tp_overlap`` decomposes — so
every ``tp`` byte measured is a block's all-gather or reduce-scatter (forward and backward).

- both: the real forward + backward of the blocks (plain: DTensor's collectives; overlap: the
  ring steps of parallel/tp_overlap.py);
- compute alone: the overlapped blocks with ``ops.exchange`` replaced by a no-op (the same
  matmuls, chunk by chunk, on whatever the receive buffers hold); the plain and Ladder rows take
  the one-piece run's (the same matmuls, unchunked / reordered);
- comm alone: the step's own collectives replayed with nothing beside them — plain: as many
  all-gathers and reduce-scatters of the same sizes as the step booked (``ops.all_gather_into`` /
  ``ops.reduce_scatter_into``); overlap: the step's ring exchanges, the same sizes in order, as
  many in flight as the ring has.
"""

from __future__ import annotations

from typing import Any

TP_KV_HEADS = 2  # bench/overlap.py's model has 3 KV heads, which tp=2 cannot split
PIECES = (1, 4)  # pieces per shard measured (parallel/tp_overlap.py PIECES; 1 is the default)
TP_BATCH = 4  # sequences per tp pair: a chunk's matmuls of the order of its transfer at 1 Gbit/s


def tensor_parallel(ctx: Any) -> list[Any]:
    """tp=2 decoder blocks with ``comm.tp_overlap`` off, then on with each of :data:`PIECES` pieces
    per shard (worker: :func:`tp_worker`); compute alone is each overlapped run's blocks with the
    ring's transfers not sent (the plain row takes the one-piece run's: the same matmuls). Goal
    (overlap rows): >= 50% hidden and >= 2x less exposed than without."""
    from bench.overlap import MODEL, SEQ, Row, _ranks

    r = _ranks(tp_worker, ctx, f"tp-{ctx.rate:g}", TP_BATCH, ctx.reps)[0]
    ctx.notes["tp"] = r
    r["plain"]["compute"] = r[f"overlap{PIECES[0]}"]["compute"]
    r["ladder"]["compute"] = r["plain"]["compute"]  # the same matmuls, reordered
    exposed = {k: max(v["both"] - v["compute"], 1e-9) for k, v in r.items()}
    mib = sum(r["plain"]["tp_bytes"].values()) / 2**20
    shape = f"{MODEL['n_layers']} blocks, {TP_BATCH}x{SEQ} tokens, {mib:.1f} MiB per step"
    plain_why = "DTensor's collectives are waited at first use, right after launch: nothing runs beside them"
    rows = [
        Row("tensor parallel (no overlap)", f"{shape}; reference, no goal", ctx.rate, r["plain"]["comm"],
            r["plain"]["compute"], r["plain"]["both"], 0.0, exposed=r["plain"]["exposed"],
            why={"all_gather": plain_why, "reduce_scatter": plain_why}),
    ]  # fmt: skip
    lad = r["ladder"]
    rows.append(
        Row("ladder residual (no tp_overlap)", f"model.ladder_residual=true; {shape}; changes the model", ctx.rate,
            lad["comm"], lad["compute"], lad["both"], 0.80, exposed=lad["exposed"],
            why={"all_gather": "the gathers before attention / MLP are needed at once: Ladder defers only "
                 "the reduce-scatters", "reduce_scatter": "the next module's compute is shorter than the transfer"}),
    )  # fmt: skip
    for pieces in PIECES:
        o = r[f"overlap{pieces}"]
        ratio = exposed["plain"] / exposed[f"overlap{pieces}"]
        why = (
            f"the wire: compute/comm = {o['compute'] / o['comm']:.2f}; only the TP matmuls run beside the "
            "ring (attention, norms, activations wait for their input), and beside them gloo's thread "
            "shares the 2 cores"
        )
        rows.append(
            Row("tensor parallel (tp_overlap)",
                f"{pieces} piece(s) per shard; {shape}; exposed {exposed[f'overlap{pieces}']:.3f} s vs "
                f"{exposed['plain']:.3f} s without: {ratio:.1f}x less (>= 2x: {'met' if ratio >= 2 else 'MISSED'})",
                ctx.rate, o["comm"], o["compute"], o["both"], 0.50, exposed=o["exposed"], why={"send": why})
        )  # fmt: skip
    return rows


def tp_worker(rank: int, world: int, batch: int, reps: int) -> dict[str, Any]:
    import torch

    from bench.overlap import MODEL, SEQ, _config, _exposed_during, _runtime, _timed
    from meshweave.comm import ops
    from meshweave.comm.ops import LEDGER, CommGroup, barrier
    from meshweave.models.family import family_of
    from meshweave.models.llama import rotary_tables
    from meshweave.parallel import tp_overlap

    torch.set_num_threads(1)
    world_group = CommGroup.world()
    sync = lambda: barrier(world_group)  # noqa: E731
    g = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(batch, SEQ // world, MODEL["dim"], generator=g).requires_grad_()
    out: dict[str, Any] = {}
    real_exchange = ops.exchange
    for pieces in (0, *PIECES, -1):  # 0: no overlap; -1: Ladder Residual, no tp_overlap
        overlap, ladder = pieces > 0, pieces < 0
        tp_overlap.PIECES = max(pieces, 1)
        cfg = _config({"tp": world, "dp_shard": 1}, batch, world)
        cfg.comm.tp_overlap = overlap
        cfg.model.n_kv_heads = TP_KV_HEADS
        cfg.model.ladder_residual = ladder
        model = _runtime(cfg, world).model
        blocks = list(family_of(model).block_dict(model).values())
        cos, sin = rotary_tables(torch.arange(SEQ), *model.rope_table(torch.device("cpu")), x.dtype)

        def step(
            blocks: list = blocks, model: Any = model, cos: Any = cos, sin: Any = sin, ladder: bool = ladder
        ) -> None:
            h, pending = x, (torch.zeros_like(x) if ladder else None)
            for block in blocks:  # Ladder: each block returns (stream, its MLP output still to add)
                h, pending = block(h, cos, sin, pending=pending) if ladder else (block(h, cos, sin), None)
            h = h + pending if pending is not None else h
            h.float().pow(2).mean().backward()
            model.zero_grad(set_to_none=False)
            x.grad = None

        step()
        LEDGER.take_step()
        sends: list[tuple[torch.Size, torch.dtype]] = []

        def recording(sends_: Any, recvs: Any, group: CommGroup, sends: list = sends) -> Any:
            sends.extend((t.shape, t.dtype) for t, _ in sends_)
            return real_exchange(sends_, recvs, group)

        before = dict(LEDGER.calls)
        ops.exchange = recording  # type: ignore[assignment]
        step()
        ops.exchange = real_exchange  # type: ignore[assignment]
        booked, _ = LEDGER.take_step()
        calls = {k: v - before.get(k, 0) for k, v in LEDGER.calls.items() if k.startswith("tp/")}
        tp_group = CommGroup(model.layers["0"].self_attn.q_proj.weight.device_mesh.get_group(), "tp")
        phases = {"both": step, "comm": _replay(booked, calls, sends, tp_group, overlap, tp_overlap.PIECES)}
        if overlap:
            phases["compute"] = _without_exchange(step)
        t = _timed(phases, reps, sync)
        key = f"overlap{pieces}" if overlap else "ladder" if ladder else "plain"
        out[key] = {
            **t,
            "exposed": _exposed_during(step, reps, sync),
            "tp_bytes": {k: v for k, v in booked.items() if k.startswith("tp/")},
        }
    return out


def _without_exchange(step: Any) -> Any:
    """``step`` with the ring's exchanges not sent: the compute alone."""
    from meshweave.comm import ops

    def run() -> None:
        real = ops.exchange
        ops.exchange = lambda sends, recvs, group: ops._DONE  # type: ignore[assignment]
        try:
            step()
        finally:
            ops.exchange = real  # type: ignore[assignment]

    return run


def _replay(booked: dict[str, int], calls: dict[str, int], sends: list, group: Any, overlap: bool, window: int) -> Any:
    """The step's tp communication with nothing beside it (see the module docstring): ``booked``
    bytes and ``calls`` per ``tp/<op>`` during one step, ``sends`` the ring exchanges' tensors,
    replayed in order with up to ``window`` (the pieces per shard) in flight, as the ring has them."""
    import torch

    from meshweave.comm import ops

    n = group.size
    nxt, prv = (group.rank + 1) % n, (group.rank - 1) % n
    ring = [(torch.zeros(shape, dtype=dtype), torch.empty(shape, dtype=dtype)) for shape, dtype in sends]
    plain: list[tuple[str, Any, Any]] = []
    for op in ("all_gather", "reduce_scatter"):
        count = calls.get(f"tp/{op}", 0)
        if overlap or not count:
            continue
        sent = booked[f"tp/{op}"] // count  # fp32 bytes one rank sends per call (the plan's ops are equal-sized)
        if op == "all_gather":  # sends (n-1) x its input
            plain += [(op, torch.zeros(sent // 4 // (n - 1)), torch.empty(sent // 4 // (n - 1) * n))] * count
        else:  # sends (n-1)/n x its input
            whole = sent * n // (n - 1) // 4
            plain += [(op, torch.zeros(whole), torch.empty(whole // n))] * count

    def run() -> None:
        flying: list[Any] = []
        for send, recv in ring:
            flying.append(ops.exchange([(send, nxt)], [(recv, prv)], group))
            if len(flying) > window - 1:
                flying.pop(0).wait()
        for handle in flying:
            handle.wait()
        for op, t, o in plain:
            if op == "all_gather":
                ops.all_gather_into(o, t, group)
            else:
                ops.reduce_scatter_into(o, t, group)

    return run
