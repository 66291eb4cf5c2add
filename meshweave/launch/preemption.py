"""Preemption: a signal asks the job to stop; every rank agrees at the next step boundary.

SLURM's warning signal (``--signal=B:USR1@120``, turned into a stop file by slurm/train.sbatch), a
SIGUSR1 / SIGTERM sent to a worker, or a scheduler's notice reaches ranks at different moments —
some mid-step, some not at all. The handler only
sets a flag; :meth:`StopRequest.agreed` MAX-reduces it over the whole job once per step, so every
rank checkpoints the same step and exits together, and the requeued job resumes with
``--checkpoint.resume=auto``.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

from meshweave.comm.ops import CommGroup, all_reduce

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# The sbatch script's warning trap creates this file: signals to srun tasks would reach torchrun's
# agent, not the workers, so the batch shell asks through the (shared) filesystem instead.
STOP_FILE_VAR = "MESHWEAVE_STOP_FILE"


class StopRequest:
    """Remembers the last stop signal this process received (handlers need the main thread)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.received = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def requested(self) -> int:
        """This process's stop request: a received signal, or the stop file (as SIGUSR1)."""
        stop_file = os.environ.get(STOP_FILE_VAR)
        if not self.received and stop_file and os.path.exists(stop_file):
            return int(signal.SIGUSR1)
        return self.received

    def agreed(self, group: CommGroup, device: torch.device) -> int:
        """The stop request any rank of ``group`` has so far, or 0 (collective, 8 bytes)."""
        flag = torch.tensor([self.requested()], dtype=torch.int64, device=device)
        all_reduce(flag, group, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
