"""How the ``dp_replicate`` replicas share what they learn, as the training loop sees it.

Four modes, chosen by the config:

- ``dp`` (default): gradients are summed over every data-parallel rank each step (HSDP or the
  bucketed reducer); the loss is normalised by the global token count.
- ``onebit`` (``optim.name=onebit_adam``): the same for ``optim.freeze_step`` warm-up steps; then
  gradients stay inside each replica and the optimizer all-reduces its 1-bit momentum instead
  (meshweave.lowcomm.onebit). Its error-feedback buffers differ per rank and are checkpointed per rank.
- ``diloco`` (``comm.diloco.enabled``): replicas train apart and sync fragments of the weights
  every ``inner_steps`` (meshweave.lowcomm.diloco). Replicas hold different weights between syncs,
  so each saves its own model and optimizer; evaluation runs on the global weights. After the
  run's last step every fragment syncs once more and all replicas adopt the global weights.
- ``co2`` (``comm.co2.enabled``): replicas train apart for rounds of ``inner_steps``; each round's
  pseudo-gradient all-reduce runs during the next round and is applied one round stale
  (meshweave.lowcomm.co2). Checkpoints, evaluation and the end of the run as for DiLoCo.

While replicas are apart, a replica's loss is normalised by *its* token count (the gradient is
the replica's own mean gradient, which the outer exchange then averages) and the reported loss is
the mean over replicas. Inside a replica, FSDP / TP / PP / CP work as usual.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch

from meshweave.comm.ops import CommGroup
from meshweave.config import Config
from meshweave.lowcomm.co2 import CO2
from meshweave.lowcomm.diloco import StreamingDiLoCo

ReplicaMode = Literal["dp", "onebit", "diloco", "co2"]


def replica_mode(cfg: Config) -> ReplicaMode:
    """How the ``dp_replicate`` replicas share what they learn: the one place that decides it
    (validation rejects any two of DiLoCo, CO2 and 1-bit Adam together)."""
    if cfg.comm.diloco.enabled:
        return "diloco"
    if cfg.comm.co2.enabled:
        return "co2"
    return "onebit" if cfg.optim.name == "onebit_adam" else "dp"


class ReplicaExchange:
    """The replica mode of a run, and what the loop must do differently in it (one per rank).

    ``replicas``: the dp_replicate group; ``everyone``: all ranks that see different tokens (dp x
    cp); ``inside``: those of them in this rank's replica; ``diloco``: the outer loop in DiLoCo
    or CO2 mode (:class:`StreamingDiLoCo` or :class:`CO2`, which share that interface). 1-bit
    Adam's phase is read from the optimizer, bound with :meth:`bind_optimizer`.
    """

    def __init__(
        self,
        mode: ReplicaMode,
        replicas: CommGroup,
        replica_index: int,
        everyone: CommGroup,
        inside: CommGroup,
        diloco: StreamingDiLoCo | CO2 | None = None,
    ) -> None:
        self.mode = mode
        self.replicas = replicas.size
        self.replica_index = replica_index
        self.everyone = everyone
        self.inside = inside
        self.diloco = diloco
        self.optimizer: Any = None

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The run's optimizer (1-bit Adam's compressing phase and error feedback live there)."""
        self.optimizer = optimizer

    @property
    def apart(self) -> bool:
        """Whether this step's gradients stay inside each replica."""
        return self.mode in ("diloco", "co2") or (self.mode == "onebit" and self.optimizer.compressing)

    def token_group(self) -> CommGroup:
        """The ranks whose valid tokens normalise this step's loss."""
        return self.inside if self.apart else self.everyone

    def reported_loss(self, loss_sum_over_everyone: float) -> float:
        """The step's loss from the sum of every rank's normalised loss: replicas' mean when apart."""
        return loss_sum_over_everyone / (self.replicas if self.apart else 1)

    def after_step(self, step: int, last: bool = False) -> str | None:
        """Run the outer loop after optimizer step ``step`` (1-based); ``last``: the run's final
        step, after which DiLoCo replicas finish with one model. Returns an event to log."""
        if self.diloco is None:
            return None
        failed = self.diloco.failed_syncs
        self.diloco.after_inner_step(step)
        event = self.diloco.last_event if self.diloco.failed_syncs != failed else None
        if last:
            event = "; ".join(e for e in (event, self.diloco.finish(step)) if e)
        return event

    def eval_weights(self) -> contextlib.AbstractContextManager:
        """Evaluate on the global weights (DiLoCo), else on the model as it is."""
        return self.diloco.global_weights() if self.diloco is not None else contextlib.nullcontext()

    def checkpoint_replica(self) -> int | None:
        """The replica index checkpoints key the weights by, when replicas hold different weights."""
        return self.replica_index if self.mode in ("diloco", "co2") else None

    def checkpoint_extra(self) -> dict[str, Any]:
        """State beside model and optimizer that every rank saves and loads collectively."""
        return {self.mode: self.diloco.state_dict()} if self.diloco is not None else {}

    def rank_local(self) -> dict[str, torch.Tensor]:
        """State that differs per rank (1-bit Adam's error feedback)."""
        return self.optimizer.rank_local_state() if self.mode == "onebit" else {}

    def restore(self, extra: dict[str, Any], rank_local: dict[str, torch.Tensor] | None) -> str | None:
        """Apply loaded state; returns a warning to log when rank-local state could not be restored."""
        if self.diloco is not None:
            self.diloco.load_state_dict(extra[self.mode])
        if self.mode == "onebit":
            if rank_local is None:
                return (
                    "warning: 1-bit Adam error-feedback buffers were saved on another world size; "
                    "they restart from zero"
                )
            self.optimizer.load_rank_local_state(rank_local)
        return None

    def metrics(self) -> dict[str, Any]:
        """Per-step keys for metrics.jsonl."""
        if self.mode == "onebit":
            return {"onebit_compressing": self.optimizer.compressing}
        if self.diloco is not None:
            return {f"{self.mode}_failed_syncs": self.diloco.failed_syncs}
        return {}
