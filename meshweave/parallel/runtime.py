"""The runtime seam: everything a parallel layout needs while training, behind one small interface.

:func:`meshweave.parallel.parallelize.parallelize` returns a :class:`ParallelRuntime`. The training
loop knows it and :class:`~meshweave.parallel.dims.ParallelDims`, nothing else of ``parallel/``;
one step is the same code under every layout::

    batch = runtime.shard(loader.next_batch())      # this rank's CP shard of each microbatch
    tokens = runtime.count_tokens(batch)            # the step's normalising token count
    loss = runtime.forward_backward(batch, tokens)  # pipeline or not; gradients exchanged
    norm = runtime.clip_gradients(max_norm)
    optimizer.step(); runtime.after_optimizer_step()
    event = runtime.after_step(step, last)          # the replicas' outer exchange (DiLoCo)

What it owns: the rank's model (pruned to its pipeline stages), the pipeline schedule, the
replicated-gradient reducer, the context-parallel sharder and the replica exchange (dp, 1-bit
Adam, DiLoCo). Every method is collective over the job: all ranks call them in the same order.

Loss normalisation: the loss of a step is the token-loss sum divided by the step's *global* valid
token count (over the ranks that share gradients), so summing gradients over data-parallel and
context-parallel ranks — and over pipeline microbatches — gives the gradient of the global mean
loss, the same under every layout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from meshweave.comm.ops import CommGroup, all_reduce, all_reduce_scalars
from meshweave.comm.overlap import GradientReducer
from meshweave.config import Config
from meshweave.data.datasets import IGNORE_INDEX
from meshweave.data.loader import Microbatch
from meshweave.kernels.documents import single_document_rows
from meshweave.lowcomm.replicas import ReplicaExchange
from meshweave.parallel.context import ContextParallel
from meshweave.parallel.dims import ParallelDims, ParallelMesh
from meshweave.parallel.expert import balance_experts, expert_metrics
from meshweave.parallel.pipeline import PipelineParts
from meshweave.parallel.tensor import loss_context, settle_gradients

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> token-loss sum


class ParallelRuntime:
    """One rank's layout at run time (built by ``parallelize``; see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        dims: ParallelDims,
        mesh: ParallelMesh,
        device: torch.device,
        model: nn.Module,
        loss_fn: LossFn,
        cp: ContextParallel | None,
        pipeline: PipelineParts | None,
        schedule: Any,
        reducer: GradientReducer | None,
        replicas: ReplicaExchange,
    ) -> None:
        self.cfg, self.dims, self.mesh, self.device = cfg, dims, mesh, device
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.cp, self.pipeline, self.schedule = cp, pipeline, schedule
        self.reducer = reducer
        self.replicas = replicas
        self._loss_fn = loss_fn
        self._loss_scale = 1.0  # 1 / the step's global token count, for the pipeline's loss_fn
        self._apart = False  # whether the last step's gradients stayed inside each replica
        self.dp_group = mesh.group("dp")
        # Token counts, losses and gradients sum over data-parallel *and* context-parallel ranks.
        self.loss_group = mesh.group(dims.loss_dim)
        self.pp_group = mesh.group("pp") if pipeline is not None else None
        per_rank = cfg.train.global_batch // dims.dp
        # A pipeline cuts this rank's whole batch into its own microbatches (parallel.pp_microbatches).
        self.micro_batch = per_rank if pipeline is not None else cfg.train.micro_batch or per_rank

    # ---------------------------------------------------------------------------------------
    # one training step

    def shard(self, microbatches: list[Microbatch]) -> list[Microbatch]:
        """Each microbatch's inputs and labels cut to this CP rank's shard of the sequence; its
        document ids stay whole (every CP rank needs all of them) and become ``None`` when every
        row is one document, where masking changes nothing and the dense kernels run."""
        out = []
        for inputs, labels, documents in microbatches:
            if documents is not None and single_document_rows(documents):
                documents = None
            if self.cp is not None:
                inputs, labels = self.cp.shard(inputs, 1), self.cp.shard(labels, 1)
            out.append(Microbatch(inputs, labels, documents))
        return out

    def count_tokens(self, batch: list[Microbatch]) -> float:
        """The step's valid target tokens over the ranks whose gradients are summed (those of this
        rank's replica while replicas train apart). One tiny all-reduce."""
        local = sum(int((mb.labels != IGNORE_INDEX).sum()) for mb in batch)
        (total,) = all_reduce_scalars([local], self.replicas.token_group(), self.device)
        return total

    def forward_backward(self, batch: list[Microbatch], global_tokens: float) -> float:
        """Forward and backward over this rank's microbatches, then finish the gradient exchange;
        returns the step's loss (the mean token loss; the replicas' mean while they are apart)."""
        apart = self._apart = self.replicas.apart  # 1-bit Adam's step may flip it: report what this step did
        if self.schedule is not None:
            (microbatch,) = batch
            loss_sum = self._pipeline_pass(microbatch, train=True, scale=1.0 / max(global_tokens, 1.0))
        else:
            loss_sum = 0.0
            for i, microbatch in enumerate(batch):
                last = i == len(batch) - 1
                with self._gradient_sync(enabled=last, across_replicas=not apart), loss_context(self.dims.tp > 1):
                    loss = self._loss(microbatch) / max(global_tokens, 1.0)
                    loss.backward()
                loss_sum += _scalar(loss)
        if self.reducer is not None and not apart:
            self.reducer.finish()
        settle_gradients(self.params)
        (loss_value,) = all_reduce_scalars([loss_sum], self.loss_group, self.device)
        return self.replicas.reported_loss(loss_value)

    def clip_gradients(self, max_norm: float) -> float:
        """Clip to ``max_norm`` (``inf``: measure only) by the global L2 norm over every shard and
        pipeline stage; returns the norm."""
        return clip_gradients(self.params, max_norm, self.pp_group)

    def after_optimizer_step(self) -> None:
        """Bookkeeping that follows a taken optimizer step (MoE bias balancing)."""
        balance_experts(self.model, self.loss_group)

    def after_step(self, step: int, last: bool) -> str | None:
        """The replicas' outer exchange after step ``step`` (1-based; ``last``: the run's final
        step). Returns an event to log."""
        return self.replicas.after_step(step, last=last)

    def metrics(self) -> dict[str, Any]:
        """This step's layout-specific metrics.jsonl keys."""
        record: dict[str, Any] = {"dp_exposed_wait_s": self.reducer.exposed_wait_s if self.reducer else None}
        if moe := expert_metrics(self.model):
            record["moe"] = moe
        if self.replicas.mode != "dp":
            record.update(replicas_apart=self._apart, **self.replicas.metrics())
        return record

    # ---------------------------------------------------------------------------------------
    # evaluation

    @torch.no_grad()
    def evaluate(self, batches: Iterable[list[Microbatch]]) -> float:
        """Mean token loss over ``batches`` (each this rank's microbatches of one global batch),
        on DiLoCo's global weights when replicas train apart."""
        self.model.eval()
        loss_sum, tokens = 0.0, 0
        with self.replicas.eval_weights():
            for batch in batches:
                for microbatch in self.shard(batch):
                    if self.schedule is not None:
                        loss_sum += self._pipeline_pass(microbatch, train=False, scale=1.0)
                    else:
                        with loss_context(self.dims.tp > 1):
                            loss_sum += _scalar(self._loss(microbatch))
                    tokens += int((microbatch.labels != IGNORE_INDEX).sum())
        self.model.train()
        total_loss, total_tokens = all_reduce_scalars([loss_sum, tokens], self.loss_group, self.device)
        return total_loss / max(total_tokens, 1.0)

    # ---------------------------------------------------------------------------------------
    # internals

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss(self, microbatch: Microbatch) -> torch.Tensor:
        inputs, labels, documents = microbatch
        extra = {} if documents is None else {"documents": documents.to(self.device)}
        with self._autocast():
            logits = self.model(inputs.to(self.device), **extra)
        return self._loss_fn(logits, labels.to(self.device))

    def pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one pipeline microbatch: its token-loss sum times the step's
        scale, so microbatch gradients add up to the step's. Given to the schedule at build time."""
        return self._loss_fn(logits, labels) * self._loss_scale

    def _pipeline_pass(self, microbatch: Microbatch, train: bool, scale: float) -> float:
        """Run the schedule over this rank's batch (every stage of the pipeline calls it together);
        returns the pipeline's loss sum (its last stage's microbatch losses, summed over pp).
        Document ids go to every stage as a keyword the schedule splits like the inputs."""
        assert self.pipeline is not None and self.pp_group is not None
        inputs, labels, documents = microbatch
        self._loss_scale = scale
        args = (inputs.to(self.device),) if 0 in self.pipeline.stage_ids else ()
        target = labels.to(self.device) if self.pipeline.has_last_stage else None
        extra = {} if documents is None else {"documents": documents.to(self.device)}
        losses: list = []
        with self._autocast(), loss_context(self.dims.tp > 1):
            if train:
                self.schedule.step(*args, target=target, losses=losses, return_outputs=False, **extra)
            else:
                self.schedule.eval(*args, target=target, losses=losses, **extra)
        (total,) = all_reduce_scalars([sum(_scalar(loss) for loss in losses)], self.pp_group, self.device)
        return total

    def _gradient_sync(self, enabled: bool, across_replicas: bool) -> contextlib.AbstractContextManager:
        """One microbatch's context: sync gradients only on the last of an accumulation, and across
        replicas only when ``across_replicas`` (1-bit Adam's compressed phase and DiLoCo say no)."""
        if isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(enabled)
        if self.reducer is not None and not (enabled and across_replicas):
            return self.reducer.no_sync()
        return contextlib.nullcontext()


def clip_gradients(params: list[nn.Parameter], max_norm: float, pp_group: CommGroup | None = None) -> float:
    """Clip ``params``' gradients by their global L2 norm over every shard (and, with ``pp_group``,
    every pipeline stage); returns the norm. ``max_norm = inf`` only measures.

    Each rank takes its parameters' norm with torch's foreach norm (DTensor shards reduce over their
    mesh in one collective when the mesh has the flattened dim, see ParallelDims.build_mesh), the
    pipeline group adds the stages' squares, and every rank scales by the same factor. Collective
    over the job.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = (
        torch.nn.utils.get_total_norm(grads, foreach=True)
        if grads
        else torch.zeros((), device=params[0].device if params else None)
    )  # a stage may hold no grads
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if pp_group is not None:
        squared = norm.float().pow(2).reshape(1)
        all_reduce(squared, pp_group)
        norm = squared.sqrt()[0]
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return float(norm)


def _scalar(t: torch.Tensor) -> float:
    """A 0-d loss as a float; under loss parallelism it is a replicated DTensor."""
    return (t.to_local() if isinstance(t, DTensor) else t).item()
