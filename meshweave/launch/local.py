"""``meshweave run --nproc N``: start torchrun on this machine with a free loopback port."""

from __future__ import annotations

import os
import subprocess
import sys

from meshweave.launch.harness import free_port


def torchrun_command(nproc: int, train_args: list[str], port: int) -> list[str]:
    """The torchrun command line that runs ``meshweave train <train_args>`` in ``nproc`` workers."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--nnodes=1",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "-m",
        "meshweave",
        "train",
        *train_args,
    ]


def run_local(nproc: int, train_args: list[str]) -> int:
    """Run torchrun in the foreground; returns its exit code (workers' output passes through)."""
    env = dict(os.environ)
    # N workers on few cores: one intra-op thread each avoids oversubscription (torchrun's default too).
    cores = os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    cmd = torchrun_command(nproc, train_args, free_port())
    return subprocess.call(cmd, env=env)
