"""The ``meshweave`` command: train | run | data prepare | plot | ckpt | generate | slurm.

Configuration errors are one line on stderr and exit code 2, before any process group exists.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from meshweave.config import ConfigError
from meshweave.options import options_help
from meshweave.validation import preflight, resolve

TRAIN_USAGE = """usage: meshweave train [--config FILE] [--out DIR] [--dry-run] [--section.key=value ...]
       meshweave run --nproc N [--config FILE] [--out DIR] [--dry-run] [--section.key=value ...]

Train a model. `train` runs in this process, or in each worker under torchrun
(`torchrun --nproc-per-node N -m meshweave train ...`); `run` starts torchrun itself on a free
loopback port. Options are read from --config (TOML, [section] tables), then overridden by
--section.key=value (or --section.key value) on the command line.

options (--key=default):
  --config FILE                          TOML file of [section] tables
  --dry-run                              print each rank's estimated memory (parameters, gradients,
                                         optimizer state, activations, peak) for the layout and exit
                                         without training; `run --nproc N --dry-run` for N ranks
"""


def _fail(msg: str) -> int:
    print(f"meshweave: error: {msg}", file=sys.stderr)
    return 2


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
    """Pull ``--config FILE`` / ``--config=FILE`` out of the override list."""
    path, rest, i = None, [], 0
    while i < len(args):
        if args[i] == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file: --config configs/tiny.toml")
            path, i = args[i + 1], i + 2
            continue
        if args[i].startswith("--config="):
            path = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return path, rest


def _wants_help(args: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in args)


def _exit_without_finalizers(code: int) -> None:
    """Leave now that the process group is destroyed and every file is closed.

    Process-group objects still referenced (meshes, comm groups) own gloo threads; destroying
    them during interpreter shutdown occasionally aborts the process ("terminate called without
    an active exception", ~1 run in 40 here) after a run that finished cleanly.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _timed_out(error: BaseException) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


def _split_dry_run(args: list[str]) -> tuple[bool, list[str]]:
    """Pull ``--dry-run`` out of the training arguments."""
    rest = [a for a in args if a != "--dry-run"]
    return len(rest) != len(args), rest


def _dry_run(args: list[str], world_size: int) -> int:
    """Print the layout's per-rank memory estimate (parallel/memory.py) for ``world_size`` ranks;
    no process group, no data, nothing written. Config errors as for training (exit 2)."""
    try:
        cfg = resolve(*_split_config(args), world_size=world_size)
    except ConfigError as e:
        return _fail(str(e))
    from meshweave.parallel.dims import resolve_degrees
    from meshweave.parallel.memory import estimate, microbatch_shape, precision, table

    dims = resolve_degrees(cfg, world_size)
    kinds = estimate(cfg, dims)
    n_micro, seqs, tokens = microbatch_shape(cfg, dims)
    degrees = " ".join(f"{d}={getattr(dims, d)}" for d in ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep"))
    print(
        f"memory estimate for {world_size} rank(s), {degrees}: {n_micro} microbatch(es) per step of {seqs} "
        f"sequence(s), {tokens} tokens per rank; {precision(cfg)} activations, activation checkpointing "
        f"{'on' if cfg.parallel.activation_checkpointing else 'off'}, {cfg.optim.name}\n"
    )
    print(table(kinds))
    for kind in kinds:
        print(f"{kind.name}: {'; '.join(kind.notes)}")
    print(
        "\nLive tensor bytes (what log.tensor_memory measures); add the CUDA context and allocator "
        "slack on a GPU. The peak is the step's high-water mark, not the sum of the rows."
    )
    return 0


def cmd_train(args: list[str]) -> int:
    if _wants_help(args):
        print(TRAIN_USAGE + options_help())
        return 0
    dry_run, args = _split_dry_run(args)
    from meshweave.launch.env import LaunchError, rank_info

    try:
        info = rank_info()
    except LaunchError as e:
        return _fail(f"launch environment: {e}")
    if dry_run:
        return _dry_run(args, info.world_size)
    try:
        cfg = resolve(*_split_config(args))
        preflight(cfg)
    except ConfigError as e:
        return _fail(str(e))
    from meshweave.trainer.loop import NonFiniteLossError, train

    try:
        train(cfg)
        if info.world_size > 1:
            _exit_without_finalizers(0)
    except NonFiniteLossError as e:
        print(f"meshweave: training aborted: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not _timed_out(e):
            raise
        from meshweave.comm.ops import LAST_LAUNCHED

        first = str(e).strip().splitlines()[0][:300]
        print(
            f"meshweave: rank {info.rank}: {LAST_LAUNCHED['op']} on mesh dim {LAST_LAUNCHED['dim']} did not "
            f"complete within comm.timeout_s={cfg.comm.timeout_s:g}s: another rank is hung or gone "
            f"(backend: {first})",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_run(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshweave run", add_help=False)
    parser.add_argument("--nproc", type=int, default=1)
    known, rest = parser.parse_known_args(args)
    if _wants_help(args):
        print("meshweave run --nproc N [train options]: torchrun on a free loopback port\n")
        print(TRAIN_USAGE + options_help())
        return 0
    if known.nproc < 1:
        return _fail(f"--nproc={known.nproc}: must be >= 1")
    dry_run, rest = _split_dry_run(rest)
    if dry_run:
        return _dry_run(rest, known.nproc)
    try:
        config_path, overrides = _split_config(rest)
        cfg = resolve(config_path, overrides, world_size=known.nproc)
        preflight(cfg)
    except ConfigError as e:
        return _fail(str(e))
    from meshweave.launch.local import run_local

    return run_local(known.nproc, rest)


def cmd_data(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshweave data", description="Prepare token shards.")
    sub = parser.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="tokenize text files into a Megatron dataset OUT/text_document.{bin,idx}")
    prep.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="input files, streamed: .jsonl / .jsonl.gz / .jsonl.zst (one JSON object per line), .parquet, "
        "else a text file (one document each)",
    )
    prep.add_argument(
        "--tokenizer",
        default="bytes",
        help="'bytes', a Hugging Face model directory (its tokenizer.json, with the bos/eos/pad ids of "
        "generation_config.json and tokenizer_config.json) or a tokenizer.json path; train with the same "
        "--data.tokenizer",
    )
    prep.add_argument(
        "--out",
        required=True,
        help="output directory: OUT/text_document.{bin,idx} (Megatron-LM's --data-path OUT/text_document) and "
        "text_document.meshweave.json; train with --data.source=OUT",
    )
    prep.add_argument("--text-key", default="text", help="the field of a .jsonl object / parquet column with the text")
    prep.add_argument(
        "--workers", type=int, default=1, help="processes encoding batches (the output does not depend on it)"
    )
    prep.add_argument("--batch-size", type=int, default=512, help="records per batch (memory ~ 2 x workers batches)")
    prep.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out malformed records (not UTF-8, not JSON, no or non-string text field), counted by reason "
        "on stderr and in the sidecar, instead of stopping at the first",
    )
    prep.add_argument(
        "--format",
        choices=("text", "chat"),
        default="text",
        help="chat: each .jsonl line is a conversation ({messages: [{role, content}]} or {prompt, completion}) "
        "rendered with --tokenizer's chat template; only assistant tokens are trained (text_document.loss_mask)",
    )
    prep.add_argument("--train-on-prompt", action="store_true", help="chat: train on every token, not only replies")
    prep.add_argument(
        "--max-tokens", type=int, default=0, help="chat: longest conversation kept, e.g. train.seq_len (0: no limit)"
    )
    prep.add_argument(
        "--overlong",
        choices=("truncate", "drop"),
        default="truncate",
        help="chat: a conversation over --max-tokens is cut to its first tokens or left out (counted either way)",
    )
    conv = sub.add_parser("convert", help="rewrite an old tokens.bin + index.json directory as a Megatron dataset")
    conv.add_argument("old_dir", help="directory holding tokens.bin and index.json")
    conv.add_argument("out_prefix", help="dataset prefix to write: OUT_PREFIX.bin, .idx and .meshweave.json")
    ns = parser.parse_args(args)
    from meshweave.data.prepare import convert, prepare

    try:
        if ns.action == "convert":
            index, where = convert(ns.old_dir, ns.out_prefix), ns.out_prefix
        else:
            opts = dict(
                text_key=ns.text_key,
                workers=ns.workers,
                skip_bad=ns.skip_bad,
                batch_size=ns.batch_size,
                format=ns.format,
                train_on_prompt=ns.train_on_prompt,
                max_tokens=ns.max_tokens,
                overlong=ns.overlong,
            )
            index, where = prepare(ns.input, ns.tokenizer, ns.out, progress=sys.stderr, **opts), ns.out
    except (OSError, ValueError) as e:
        return _fail(" ".join(str(e).split()))
    print(
        f"wrote {index['num_tokens']:,} tokens in {index['num_documents']:,} documents "
        f"(vocab {index['vocab_size']:,}, {index['dtype']}) to {where}"
    )
    return 0


def cmd_plot(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshweave plot", description="PNG plots of a run's metrics.")
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    ns = parser.parse_args(args)
    from meshweave.metrics.plots import plot_run

    try:
        paths = plot_run(ns.run_dir, ns.out)
    except (OSError, ValueError) as e:
        return _fail(str(e))
    for p in paths:
        print(p)
    return 0


def _byte_size(text: str) -> int:
    """``5GB`` / ``500MB`` / ``1024`` -> bytes (decimal units, as Hugging Face's max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    value = text.strip().upper()
    unit = next((u for u in units if value.endswith(u)), "")
    try:
        size = int(float(value.removesuffix(unit)) * units.get(unit, 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 5GB, 500MB)") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return size


def cmd_ckpt(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshweave ckpt", description="Inspect and convert checkpoints.")
    sub = parser.add_subparsers(dest="action", required=True)
    inspect = sub.add_parser("inspect", help="step, layout, tensors, sizes and validity of a step-N dir")
    inspect.add_argument("path")
    imp = sub.add_parser("import-hf", help="a Hugging Face model directory -> OUT/checkpoints/step-0")
    imp.add_argument("hf_dir")
    imp.add_argument("out")
    exp = sub.add_parser("export-hf", help="a step-N checkpoint -> a Hugging Face directory")
    exp.add_argument("ckpt")
    exp.add_argument("out")
    exp.add_argument(
        "--max-shard-size",
        type=_byte_size,
        default=5 * 10**9,
        help="largest safetensors file, e.g. 5GB (default), 500MB; larger models get an index",
    )
    exp.add_argument(
        "--merge-lora", action="store_true", help="write a LoRA checkpoint's weights merged: W + (alpha/rank) B A"
    )
    peft = sub.add_parser(
        "export-peft", help="a LoRA checkpoint (or a run's newest) -> a peft adapter directory for transformers"
    )
    peft.add_argument("ckpt", help="a step-N checkpoint or a run directory")
    peft.add_argument("out")
    ns = parser.parse_args(args)
    from meshweave.checkpoint import adapters, hf
    from meshweave.checkpoint.manager import CheckpointError, describe

    try:
        if ns.action == "inspect":
            print(describe(ns.path))
        elif ns.action == "import-hf":
            ckpt = hf.import_hf(ns.hf_dir, ns.out)
            print(
                f"wrote {ckpt} and {Path(ns.out) / 'config.toml'}; train from it with "
                f"--config {Path(ns.out) / 'config.toml'} --checkpoint.init_from={ckpt}"
            )
        elif ns.action == "export-peft":
            out = adapters.export_peft(ns.ckpt, ns.out)
            print(f"wrote {out}: {adapters.ADAPTER_CONFIG} + {adapters.ADAPTER_WEIGHTS}")
        else:
            merge = adapters.merge_plan(Path(ns.ckpt)) if ns.merge_lora else None
            if merge is None and adapters.is_lora_checkpoint(Path(ns.ckpt)):
                print("note: LoRA checkpoint: writing the base weights only (--merge-lora merges the adapters in)")
            out = hf.export_hf(ns.ckpt, ns.out, max_shard_bytes=ns.max_shard_size, lora_merge=merge)
            files = sorted(p.name for p in out.glob("*.safetensors"))
            print(f"wrote {out}: config.json + {len(files)} safetensors file(s)")
    except (ConfigError, CheckpointError, OSError, ValueError) as e:
        return _fail(str(e))
    return 0


def cmd_generate(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="meshweave generate", description="Continue a prompt with a model, in this process (KV cache)."
    )
    parser.add_argument("model", help="a Hugging Face model directory or a meshweave step-N checkpoint")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, encoded with --tokenizer")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,450,3681")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="'bytes' or a HF directory / tokenizer.json (default: the model's own)")
    parser.add_argument("--device", default="cpu")
    ns = parser.parse_args(args)
    spec = ns.tokenizer or (ns.model if (Path(ns.model) / "tokenizer.json").is_file() else "bytes")
    try:
        ids = [int(i) for i in ns.prompt_ids.split(",")] if ns.prompt_ids else None
    except ValueError:
        return _fail(f"--prompt-ids={ns.prompt_ids!r}: expected comma-separated integers")
    from meshweave.checkpoint.manager import CheckpointError
    from meshweave.data.tokenizers import load_tokenizer
    from meshweave.models import from_pretrained
    from meshweave.models.generate import generate

    try:
        tok = load_tokenizer(spec)
        model = from_pretrained(ns.model, ns.device)
        prompt_ids = ids if ids is not None else tok.encode(ns.prompt)
        out = generate(
            model,
            prompt_ids,
            ns.max_new_tokens,
            temperature=ns.temperature,
            top_p=ns.top_p,
            eos_ids=getattr(tok, "eos_ids", [tok.eos_id]),
            seed=ns.seed,
        )
    except (ConfigError, CheckpointError, OSError, ValueError) as e:
        return _fail(" ".join(str(e).split()))
    print(tok.decode(prompt_ids) + tok.decode(out))
    print(f"ids: {','.join(map(str, out))}", file=sys.stderr)
    return 0


def cmd_slurm(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshweave slurm", description="Render or submit the sbatch script.")
    sub = parser.add_subparsers(dest="action", required=True)
    for name, help_text in (("render", "print the sbatch script"), ("submit", "sbatch it with the training options")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--nodes", type=int, default=2)
        p.add_argument("--nproc-per-node", type=int, default=1)
        p.add_argument("--time", default="01:00:00")
        p.add_argument("--job-name", default="meshweave")
        p.add_argument("--warning-s", type=int, default=120, help="seconds before the limit to checkpoint")
        p.add_argument("--partition", default="")
        p.add_argument("--account", default="")
        if name == "submit":
            p.add_argument("--dry-run", action="store_true")
    ns, train_args = parser.parse_known_args(args)
    from meshweave.launch.slurm import SbatchOptions, render_sbatch, submit

    opts = SbatchOptions(
        nodes=ns.nodes,
        nproc_per_node=ns.nproc_per_node,
        time=ns.time,
        job_name=ns.job_name,
        warning_s=ns.warning_s,
        partition=ns.partition,
        account=ns.account,
    )
    if ns.action == "render":
        print(render_sbatch(opts), end="")
        return 0
    try:
        config_path, overrides = _split_config(train_args)
        resolve(config_path, overrides, world_size=ns.nodes * ns.nproc_per_node)
        print(submit(opts, train_args, dry_run=ns.dry_run))
    except ConfigError as e:
        return _fail(str(e))
    except (OSError, RuntimeError) as e:
        return _fail(f"slurm submit: {e}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "run": cmd_run,
    "data": cmd_data,
    "plot": cmd_plot,
    "ckpt": cmd_ckpt,
    "generate": cmd_generate,
    "slurm": cmd_slurm,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(
            "usage: meshweave {train,run,data,plot,ckpt,generate,slurm} ...\n"
            "  train   train in this process (or per torchrun worker)\n"
            "  run     train with N local processes (starts torchrun)\n"
            "  data    prepare token shards (Megatron .bin/.idx): meshweave data prepare --input FILES --out DIR;\n"
            "          data convert OLD_DIR OUT_PREFIX rewrites the old tokens.bin + index.json format\n"
            "  plot    write PNGs of a run's loss, throughput and comm bytes\n"
            "  ckpt    inspect a checkpoint; import-hf / export-hf Hugging Face weights\n"
            "  generate  continue a prompt with a HF directory or a checkpoint (greedy or top-p)\n"
            "  slurm   render / submit the sbatch script (one torchrun per node, requeue on preemption)",
            file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])
