"""LoRA vs full finetuning of a tiny imported chat model: what is trained, stored and exchanged.

The model and data are examples/tiny_chat_model.py's, built locally (random weights, nothing
downloaded): a Llama of :data:`SHAPE` (~3M parameters) with a byte-level BPE and a ChatML template,
and 237 conversations about Python's doc topics, prepared with ``data prepare --format chat
--max-tokens 128`` (only assistant tokens are trained; 10% of the conversations held out for eval).
It is imported with ``--checkpoint.init_from`` and finetuned fully and with LoRA rank 8 on every
projection (``lora.targets`` default), each under two data-parallel modes on 2 gloo ranks:
replicated (``dp_replicate=2``: the gradient all-reduce is the whole exchange) and FSDP
(``dp_shard=2``: gradients are reduce-scattered, and the base's all-gathers remain). Per run:

- trainable / total parameters (the run's manifest);
- optimizer-state bytes: the saved checkpoint's ``optim.state.*`` entries (full tensors);
- data-parallel bytes per step from the ledger (metrics.jsonl ``comm_bytes``, median of steps
  2..N), gradient traffic and FSDP's all-gathers in separate columns, and LoRA / full;
- peak live tensor bytes per rank (``log.tensor_memory`` in a separate short run, since tracking
  slows the steps) and the process's peak RSS;
- median step time (steps 2..N) and the final eval loss on the held-out conversations (mean over
  their assistant tokens).

The base has random weights, so eval loss compares what each run learns in N steps, not how well
an adapter adapts a pretrained model.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench._common import ROOT, CliRun, Report, options, run_cli
from examples.tiny_chat_model import build
from meshweave.checkpoint.adapters import resolve_checkpoint
from meshweave.checkpoint.hf import import_hf
from meshweave.checkpoint.manager import read_manifest
from meshweave.checkpoint.safe_load import SafeFileSystemReader
from meshweave.data.prepare import prepare

SHAPE = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    initializer_range=0.1,
)
MODES = {
    "full": ["--optim.lr=1e-3"],
    "lora r8": ["--lora.rank=8", "--lora.alpha=16", "--optim.lr=5e-3"],
}
LAYOUTS = {
    "dp_replicate=2": ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"],
    "dp_shard=2": ["--parallel.dp_shard=2"],
}


def optimizer_state_bytes(run: Path) -> int:
    """Bytes of the ``optim.state.*`` tensors of the run's newest checkpoint (full, unsharded)."""
    ckpt = resolve_checkpoint(run)
    meta = SafeFileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    total = 0
    for key, entry in meta.items():
        if key.startswith("optim.state.") and hasattr(entry, "size") and len(entry.size) > 0:
            total += entry.properties.dtype.itemsize * int(torch.Size(entry.size).numel())
    return total


def dp_bytes(run: CliRun) -> tuple[float, float]:
    """(gradient bytes, FSDP all-gather bytes) per step on the data-parallel dims, per rank."""
    steady = run.steady_comm_bytes(skip=1)
    dp = {k: v for k, v in steady.items() if k.split("/")[0] in ("dp_replicate", "dp_shard", "dp")}
    gathers = sum(v for k, v in dp.items() if k.endswith("/all_gather"))
    return sum(dp.values()) - gathers, gathers


def main(argv: list[str] | None = None) -> int:
    ap = options(__doc__ or "", "8 steps instead of 30")
    args = ap.parse_args(argv)
    steps = 8 if args.quick else 30
    report = Report(args.out, "lora", "meshweave bench: LoRA rank 8 vs full finetuning (tiny imported Llama)")
    report.raw["args"] = {k: str(v) for k, v in vars(args).items()}
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    hf, chat = build(work, **SHAPE)
    import_hf(hf, work / "imported")
    prepare([str(chat)], str(hf), str(work / "data"), format="chat", max_tokens=128)
    common = [
        f"--config={work / 'imported' / 'config.toml'}",
        f"--checkpoint.init_from={hf}",
        f"--data.source={work / 'data'}",
        f"--data.tokenizer={hf}",
        "--data.eval_fraction=0.1",
        "--train.seq_len=128",
        "--train.global_batch=8",
        "--optim.warmup_steps=2",
        "--train.eval_batches=4",
    ]
    rows, raw = [], {}
    for mode, mode_args in MODES.items():
        for layout, layout_args in LAYOUTS.items():
            name = f"{mode.replace(' ', '-')}-{layout.replace('=', '')}"
            timed = run_cli(
                work / name,
                2,
                [
                    *common,
                    *mode_args,
                    *layout_args,
                    f"--train.steps={steps}",
                    f"--train.eval_interval={steps}",
                    "--checkpoint.save_final=true",
                ],
                timeout=1800,
            )
            memory = run_cli(
                work / f"{name}-mem",
                2,
                [*common, *mode_args, *layout_args, "--train.steps=3", "--log.tensor_memory=true"],
                timeout=900,
            )
            if not (timed.ok and memory.ok):
                report.add(f"{name}: failed: {timed.error() if not timed.ok else memory.error()}")
                continue
            params = read_manifest(resolve_checkpoint(timed.out))["parameters"]
            grad_bytes, gather_bytes = dp_bytes(timed)
            step_s = statistics.median(r["step_time_s"] for r in timed.records[1:])
            eval_loss = next(r["eval_loss"] for r in reversed(timed.records) if "eval_loss" in r)
            raw[name] = {
                "mode": mode,
                "layout": layout,
                "trainable": params["trainable"],
                "total": params["total"],
                "optimizer_state_bytes": optimizer_state_bytes(timed.out),
                "dp_grad_bytes_per_step": grad_bytes,
                "dp_all_gather_bytes_per_step": gather_bytes,
                "tensor_peak_bytes": max(max(r.get("mem_tensor_peak_bytes", [0])) for r in memory.records),
                "rss_peak_bytes": max(r["mem_peak_bytes"] for r in timed.records),
                "step_time_s": step_s,
                "eval_loss": eval_loss,
                "losses": [r["loss"] for r in timed.records],
            }
            report.raw["runs"] = raw
    for layout in LAYOUTS:
        full = raw.get(f"full-{layout.replace('=', '')}")
        for mode in MODES:
            r = raw.get(f"{mode.replace(' ', '-')}-{layout.replace('=', '')}")
            if r is None:
                continue
            ratio = f"{r['dp_grad_bytes_per_step'] / full['dp_grad_bytes_per_step']:.4f}" if full else "-"
            rows.append(
                f"| {layout} | {mode} | {r['trainable']:,} / {r['total']:,} ({100 * r['trainable'] / r['total']:.2f}%) "
                f"| {r['optimizer_state_bytes'] / 2**20:.3f} | {r['dp_grad_bytes_per_step'] / 2**20:.3f} | {ratio} "
                f"| {r['dp_all_gather_bytes_per_step'] / 2**20:.2f} | {r['tensor_peak_bytes'] / 2**20:.1f} "
                f"| {r['rss_peak_bytes'] / 2**20:.0f} | {1000 * r['step_time_s']:.0f} | {r['eval_loss']:.4f} |"
            )
    report.add(
        f"{report.environment('torch')}; {steps} steps, 2 gloo ranks, global batch 8 x 128 tokens, "
        "tiny chat Llama (4 layers, width 256, examples/tiny_chat_model.py) imported from a transformers directory, "
        "chat data (assistant tokens trained, 10% of conversations held out); full lr 1e-3, LoRA lr 5e-3 "
        "(alpha 16, all seven projections)"
    )
    report.add(
        "| dp mode | run | trainable / total params | optimizer state MiB | dp gradient MiB/step/rank "
        "| / full | FSDP all-gather MiB/step/rank | peak live tensors MiB/rank | peak RSS MiB | step ms | eval loss |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    report.add(
        "dp gradient bytes: the ledger's all-reduce (dp_replicate) or reduce-scatter (dp_shard) bytes sent per "
        "rank per step; FSDP's parameter all-gathers are listed apart: LoRA leaves the frozen base sharded, so "
        "each step still gathers it (forward, and backward for the layers resharded after forward)."
    )
    report.write()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
