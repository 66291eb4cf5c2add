"""Big Hugging Face checkpoints without big memory: peak RSS while loading and exporting.

A Llama-shaped model of about 2 GB in fp32 (``--dim``/``--layers``/``--vocab`` set it) is written as
a sharded HF directory (500 MB safetensors files + ``model.safetensors.index.json``), then:

1. **Loading at dp_shard=4.** 4 gloo ranks each build the model as the trainer does (meta, FSDP2
   over 4 ranks, materialised), reset their peak-RSS counter, and load the HF weights two ways,
   each in fresh ranks: ``fill_from_hf`` (what ``--checkpoint.init_from`` does: every rank reads
   only the regions of its own shards with ``safe_open(...).get_slice``) and the full read it
   replaced (every rank reads the whole model, ``set_model_state_dict`` keeps its shard). Per rank:
   RSS before the load, the peak during it (``VmHWM`` after ``clear_refs``), both as a fraction of
   the model's size. The issue's bound: peak <= 0.5 x model size per rank.
2. **Exporting.** The model imported as a meshweave checkpoint is exported by ``meshweave ckpt
   export-hf --max-shard-size 500MB`` in a fresh process; its peak RSS (``ru_maxrss``) minus the
   peak of a process that only imports the same modules, against the shard size. The issue's
   bound: about 1.5 x the shard size.

    .venv/bin/python -m bench.hf_memory            # ~3-5 min on 2 cores, ~12 GB of RAM at peak
    .venv/bin/python -m bench.hf_memory --quick    # a ~0.5 GB model (~1 min)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import Report, cli_env, md_table, options, run_ranks

MB = 10**6


def _rss_kb(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_hf_model(out: Path, shape: dict[str, int], shard_bytes: int) -> int:
    """A random Llama of ``shape`` as a sharded HF directory, written tensor by tensor (one shard in
    memory at a time); returns the model's size in bytes."""
    import torch
    from safetensors.torch import save_file

    from meshweave.checkpoint.hf import hf_sources
    from meshweave.config import ModelConfig, MoEConfig
    from meshweave.models.hf_config import hf_config_from_model
    from meshweave.models.llama import build_model

    cfg = ModelConfig(**shape)
    sources = hf_sources(cfg, MoEConfig())
    meta = build_model(cfg).state_dict()
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, Any] = {}
    files: list[dict[str, Any]] = []
    used = total = 0

    def flush() -> None:
        nonlocal used
        if shard:
            files.append(dict(shard))
            name = f"part-{len(files)}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            shard.clear()
            used = 0

    for name, (hf, _) in sources.items():
        size = meta[name].numel() * 4
        if used and used + size > shard_bytes:
            flush()
        shard[hf[0]] = torch.randn(meta[name].shape, generator=gen) * 0.02
        used += size
        total += size
    flush()
    n = len(files)
    weight_map = {}
    for i, tensors in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        (out / f"part-{i}.safetensors").rename(out / final)
        weight_map |= dict.fromkeys(tensors, final)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(hf_config_from_model(cfg)))
    return total


def load_worker(rank: int, world: int, hf_dir: str, method: str) -> dict[str, float]:
    """Build the trainer's dp_shard=``world`` model, then load ``hf_dir`` by ``method``; RSS in MB."""
    import torch

    from meshweave.checkpoint.hf import fill_from_hf, load_hf_weights
    from meshweave.config import Config
    from meshweave.models.hf_config import read_hf_config
    from meshweave.models.llama import build_model
    from meshweave.parallel.dims import resolve_degrees
    from meshweave.parallel.parallelize import parallelize

    model_cfg, moe = read_hf_config(hf_dir)
    cfg = Config(model=model_cfg, moe=moe)
    cfg.parallel.dp_shard = world
    cfg.train.seq_len = 64
    dims = resolve_degrees(cfg, world)
    mesh = dims.build_mesh("cpu")
    runtime = parallelize(build_model(model_cfg, moe=moe), dims, mesh, cfg, torch.device("cpu"), lambda *a: None)
    model = runtime.model
    before = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak counter (VmHWM) restarts at VmRSS
    started = time.perf_counter()
    if method == "slices":
        fill_from_hf(model, hf_dir)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, load_hf_weights(hf_dir), options=StateDictOptions(full_state_dict=True))
    seconds = time.perf_counter() - started
    return {"before_mb": before * 1024 / MB, "peak_mb": _rss_kb("VmHWM") * 1024 / MB, "seconds": seconds}


def child_peak_mb(cmd: list[str]) -> tuple[float, int]:
    """Peak RSS (MB) of ``cmd`` run as a fresh process, and its exit code."""
    script = (
        "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
    )
    proc = subprocess.run([sys.executable, "-c", script, *cmd], capture_output=True, text=True, env=cli_env())
    return int(proc.stdout.strip().splitlines()[-1]) * 1024 / MB, proc.returncode


def main(argv: list[str] | None = None) -> int:
    """Write the model, run both loads and the export; print and write the tables."""
    ap = options(__doc__, "a ~0.5 GB model instead of ~2 GB (~1 min)")
    ap.add_argument("--shard-mb", type=int, default=500, help="safetensors shard size, MB (written and exported)")
    args = ap.parse_args(argv)
    shape = dict(dim=1024, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=2816, vocab_size=32000, max_seq_len=2048)
    if not args.quick:
        shape |= dict(dim=2048, n_layers=8, n_heads=16, n_kv_heads=8, ffn_dim=5632)
    report = Report(args.out, "hf_memory", "meshweave bench: Hugging Face checkpoints without big memory")
    work = args.out / "logs" / "hf_memory"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    size = write_hf_model(work / "hf", shape, args.shard_mb * MB)
    files = sorted((work / "hf").glob("*.safetensors"))
    report.raw.update(shape=shape, model_bytes=size, shards=len(files))
    report.add(
        f"{report.environment('torch', 'safetensors')}; model {shape}, {size / MB:,.0f} MB in fp32 as "
        f"{len(files)} safetensors shards of <= {args.shard_mb} MB."
    )

    rows = []
    for method, label in (("slices", "per-rank regions (init_from)"), ("full", "full read per rank (before)")):
        res = run_ranks(load_worker, 4, str(work / "hf"), method, log_dir=work / "logs" / method, timeout=1800)
        if isinstance(res, str):
            rows.append([label, res, "", "", "", ""])
            continue
        report.raw[method] = res
        worst = max(r["peak_mb"] for r in res)
        rows.append(
            [
                label,
                f"{max(r['before_mb'] for r in res):,.0f}",
                f"{worst:,.0f}",
                f"{worst * MB / size:.2f}",
                f"{max(r['peak_mb'] - r['before_mb'] for r in res) * MB / size:.2f}",
                f"{max(r['seconds'] for r in res):.1f}",
            ]
        )
    report.add(
        "## 1. Loading at dp_shard=4 (worst rank)\n\n"
        + md_table(
            ["load", "RSS before MB", "peak RSS MB", "peak / model", "(peak - before) / model", "load s"],
            rows,
            right=[1, 2, 3, 4, 5],
        )
    )

    from meshweave.checkpoint.hf import import_hf

    ckpt = import_hf(work / "hf", work / "imported")
    base, _ = child_peak_mb([sys.executable, "-c", "import meshweave.checkpoint.hf, meshweave.cli"])
    cmd = [sys.executable, "-m", "meshweave", "ckpt", "export-hf", str(ckpt), str(work / "exported")]
    peak, code = child_peak_mb([*cmd, f"--max-shard-size={args.shard_mb}MB"])
    report.raw["export"] = {"peak_mb": peak, "baseline_mb": base, "exit": code}
    report.add(
        "## 2. Export (one process)\n\n"
        + md_table(
            ["process", "peak RSS MB", "above baseline MB", "above baseline / shard"],
            [
                ["imports only (baseline)", f"{base:,.0f}", "", ""],
                [
                    f"export-hf, {args.shard_mb} MB shards (exit {code})",
                    f"{peak:,.0f}",
                    f"{peak - base:,.0f}",
                    f"{(peak - base) / args.shard_mb:.2f}",
                ],
            ],
            right=[1, 2, 3],
        )
    )
    subprocess.run(["rm", "-rf", str(work / "hf"), str(work / "imported"), str(work / "exported")], check=True)
    return report.finish()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
