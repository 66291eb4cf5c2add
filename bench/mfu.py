"""Model FLOPs utilisation on one GPU: a ~0.9B-parameter Llama, bf16, compiled blocks, flash attention.

Part (c) of ``make gpu-check``. The model (dim 2048, 16 layers, 16 heads over 8 KV heads, SwiGLU
5632, vocabulary 32,000, untied: 0.89B parameters) trains through the real CLI on one GPU at
``seq_len`` 4096 with ``--train.dtype=bf16 --train.compile=true``; the micro-batch is the largest
of 8, 4, 2, 1 sequences whose run does not fail (out of memory ends a run with a non-zero exit).
Reported from metrics.jsonl, medians over the steps after the first ``--warmup`` (compilation):
tokens/s, MFU (the trainer's model-FLOPs count against the device's peak from its table), the
peak of allocated memory, and the ``--dry-run`` memory estimate (parallel/memory.py) beside it
(on the CPU smoke run the peak is the process RSS, so that ratio means nothing there).

    .venv/bin/python -m bench.mfu            # one GPU, about 4-6 minutes on an H100
    .venv/bin/python -m bench.mfu --smoke    # a tiny model on the CPU: checks the bench itself (~1 min)

Ends with one summary line: ``mfu: <tokens/s> tok/s, MFU <x>%, micro-batch <m>, peak <GB> GB``.
"""

from __future__ import annotations

import statistics
import sys

from bench._common import Report, md_table, options, run_cli

MODEL = dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=5632, vocab_size=32000)
SMOKE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=260)


def model_args(shape: dict[str, int], seq_len: int) -> list[str]:
    return [f"--model.{k}={v}" for k, v in shape.items()] + [f"--model.max_seq_len={seq_len}"]


def memory_estimate(train_args: list[str]) -> tuple[int, int]:
    """(peak bytes ``meshweave train --dry-run`` estimates for one rank, parameter count) of a run."""
    from meshweave.models.llama import build_model, num_params
    from meshweave.parallel.dims import resolve_degrees
    from meshweave.parallel.memory import estimate
    from meshweave.validation import resolve

    cfg = resolve(None, train_args, world_size=1)
    (rank,) = estimate(cfg, resolve_degrees(cfg, 1))
    return rank.peak, num_params(build_model(cfg.model, moe=cfg.moe))


def main(argv: list[str] | None = None) -> int:
    """Find the largest micro-batch that runs, report its throughput and memory; exit 1 if none ran."""
    ap = options(__doc__, "fewer steps (6 instead of 12)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, to check the bench itself")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the medians (compilation)")
    args = ap.parse_args(argv)
    shape, seq_len, device = (SMOKE, 128, "cpu") if args.smoke else (MODEL, 4096, "cuda")
    steps = 6 if args.quick or args.smoke else 12
    report = Report(args.out, "mfu", "meshweave bench: MFU of a ~0.9B Llama on one GPU")
    report.add(f"{report.environment('torch')}; model {shape}, seq_len {seq_len}, bf16, compiled, {device}.")
    run = None

    def trial_args(micro: int) -> list[str]:
        return [
            *model_args(shape, seq_len),
            f"--train.device={device}",
            "--train.dtype=bf16",
            "--train.compile=true",
            f"--train.seq_len={seq_len}",
            f"--train.global_batch={micro}",
            f"--train.steps={steps}",
            "--optim.warmup_steps=1",
            "--log.interval=1",
        ]

    for micro in (8, 4, 2, 1):
        trial = run_cli(args.out / "logs" / "mfu" / f"mb{micro}", 1, trial_args(micro), timeout=900)
        if trial.ok and len(trial.records) > args.warmup:
            run, best = trial, micro
            break
        report.add(f"micro-batch {micro}: did not run ({trial.error()})")
    if run is None:
        print("mfu: FAILED (no micro-batch ran; see the logs under bench results logs/mfu)")
        return 1
    steady = run.records[args.warmup :]
    tok_s = statistics.median(r["tokens_per_s"] for r in steady)
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    mfu = statistics.median(mfus) if mfus else None
    peak = max((r.get("mem_peak_bytes") or 0) for r in run.records)
    estimate, n_params = memory_estimate(trial_args(best))
    report.raw.update(micro_batch=best, tokens_per_s=tok_s, mfu=mfu, peak_bytes=peak, estimate_bytes=estimate)
    report.add(
        md_table(
            ["micro-batch", "tokens/s", "MFU", "peak allocated GB", "--dry-run estimate GB", "peak / est.", "params"],
            [
                [
                    best,
                    f"{tok_s:,.0f}",
                    f"{100 * mfu:.1f}%" if mfu is not None else "n/a (device peak unknown)",
                    f"{peak / 1e9:.1f}",
                    f"{estimate / 1e9:.1f}",
                    f"{peak / estimate:.2f}",
                    f"{n_params / 1e9:.2f}B",
                ]
            ],
            right=[0, 1, 2, 3, 4, 5],
        )
    )
    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
    print(f"mfu: {tok_s:,.0f} tok/s, MFU {mfu_text}, micro-batch {best}, peak {peak / 1e9:.1f} GB", flush=True)
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
