"""SLURM: the sbatch script meshweave runs under, and ``meshweave slurm render|submit``.

One srun task per node runs torchrun; node 0's address (from ``scontrol show node``, not
``hostname --ip-address``, which often answers with a loopback address) is the rendezvous point.
The warning signal before the time limit (``--signal=B:USR1@...``) reaches only the batch shell:
its trap creates the *stop file* named by ``$MESHWEAVE_STOP_FILE``; rank 0 sees it at the next
step boundary, every rank agrees (``launch/preemption.py``), checkpoints and exits; the script
then requeues the job, which resumes with ``--checkpoint.resume=auto``.

``slurm/train.sbatch`` in the repository is :func:`render_sbatch` with its defaults (a test keeps
them identical), so there is one source for the script.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from dataclasses import dataclass

_TEMPLATE = """#!/bin/bash
# meshweave on SLURM: one srun task per node runs torchrun; rendezvous at the first node.
#   sbatch slurm/train.sbatch --config configs/tiny.toml --out runs/x [--section.key=value ...]
# Environment: MESHWEAVE_PYTHON (python with meshweave installed; default python3),
#              NPROC_PER_NODE (processes per node; default {nproc_per_node}).
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --time={time}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@{warning_s}
#SBATCH --output={output}{extra}
set -uo pipefail

PYTHON=${{MESHWEAVE_PYTHON:-python3}}
NPROC=${{NPROC_PER_NODE:-{nproc_per_node}}}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
HEAD_ADDR=${{HEAD_ADDR:-$(getent hosts "$HEAD_NODE" | awk '{{print $1; exit}}')}}
PORT=${{MESHWEAVE_PORT:-$((20000 + SLURM_JOB_ID % 20000))}}
export MESHWEAVE_STOP_FILE=${{MESHWEAVE_STOP_FILE:-$SLURM_SUBMIT_DIR/.meshweave-stop-$SLURM_JOB_ID}}
rm -f "$MESHWEAVE_STOP_FILE"
echo "[meshweave] job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}}:" \
     "$SLURM_JOB_NUM_NODES nodes x $NPROC, rendezvous $HEAD_ADDR:$PORT"

STOPPING=0
on_warning() {{
    echo "[meshweave] time limit near: asking every rank to checkpoint and stop"
    STOPPING=1
    touch "$MESHWEAVE_STOP_FILE"
}}
trap on_warning USR1

# Single quotes: $SLURM_NODEID must expand in each task, not here.
srun --kill-on-bad-exit=1 bash -c 'exec "$0" -m torch.distributed.run --nnodes="$1" --nproc-per-node="$2" \\
    --node-rank="$SLURM_NODEID" --master-addr="$3" --master-port="$4" \\
    -m meshweave train --checkpoint.resume=auto "${{@:5}}"' \\
    "$PYTHON" "$SLURM_JOB_NUM_NODES" "$NPROC" "$HEAD_ADDR" "$PORT" "$@" &
SRUN=$!
STATUS=0
# A trapped signal interrupts `wait`; wait again until srun has really finished.
while true; do
    wait "$SRUN"; STATUS=$?
    kill -0 "$SRUN" 2>/dev/null || break
done
rm -f "$MESHWEAVE_STOP_FILE"
if [ "$STOPPING" = 1 ] && [ "$STATUS" = 0 ]; then
    echo "[meshweave] checkpointed; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
"""


@dataclass(frozen=True)
class SbatchOptions:
    nodes: int = 2
    nproc_per_node: int = 1
    time: str = "01:00:00"
    job_name: str = "meshweave"
    warning_s: int = 120
    output: str = "%x-%j.out"
    partition: str = ""
    account: str = ""


def render_sbatch(opts: SbatchOptions = SbatchOptions()) -> str:
    """The sbatch script for ``opts`` (training arguments are given to sbatch after the script)."""
    extra = "".join(
        f"\n#SBATCH --{key}={value}"
        for key, value in (("partition", opts.partition), ("account", opts.account))
        if value
    )
    return _TEMPLATE.format(
        nodes=opts.nodes,
        nproc_per_node=opts.nproc_per_node,
        time=opts.time,
        job_name=opts.job_name,
        warning_s=opts.warning_s,
        output=opts.output,
        extra=extra,
    )


def submit(opts: SbatchOptions, train_args: list[str], dry_run: bool = False) -> str:
    """Render the script and ``sbatch`` it with ``train_args``; returns sbatch's answer (job id).

    With ``dry_run`` returns the script and the command instead of submitting.
    """
    script = render_sbatch(opts)
    if dry_run:
        return script + "\n# " + shlex.join(["sbatch", "--parsable", "SCRIPT", *train_args]) + "\n"
    # sbatch copies the script at submission, so a temporary file is enough.
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", prefix="meshweave-") as f:
        f.write(script)
        f.flush()
        done = subprocess.run(
            ["sbatch", "--parsable", f.name, *train_args], capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"sbatch failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()
