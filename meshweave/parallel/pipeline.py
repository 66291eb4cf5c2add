"""Pipeline parallelism: split the model into stages and run them with torch.distributed.pipelining.

What meshweave adds to torch's schedules:

- **A cost-balanced split** (stages.py): boundaries minimise the most expensive stage, with the
  embedding and the head + loss counted on the first and last stage; validated before any
  process group exists.
- **One model per rank with layout-free names.** A rank's stages are views of one pruned
  :class:`Transformer` (``rank_model``): layers keep their global index in the ``ModuleDict``,
  so parameter names — and hence checkpoint keys and optimizer state — are the same under any
  pipeline layout. A run saved at pp=2 loads at pp=1 or pp=4 unchanged.
- **Virtual stages.** Interleaved schedules hold several stages per rank (loop order), ZBV two
  in a V, all sharing the one rank model.
- **Loss normalisation.** Schedules are built with ``scale_grads=False``: the trainer's loss is
  already divided by the global token count, so microbatch gradients simply add up.

The trainer runs ``schedule.step`` on every rank of a pipeline with the rank's per-step batch; the
last stage computes the loss per microbatch, and :func:`clip_pipeline_gradients` combines grad
norms across stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from meshweave.comm.ops import CommGroup, all_reduce
from meshweave.config import Config
from meshweave.parallel.stages import MULTI_STAGE, microbatches, parse_layers, split_layers, stage_ids, stages_per_rank


# --------------------------------------------------------------------------------------------
# building this rank's stages


@dataclass
class PipelineParts:
    """This rank's pruned model (all its stages' parameters, global names) and stage modules."""

    rank_model: nn.Module
    stages: list[nn.Module]
    stage_ids: list[int]
    n_stages: int

    @property
    def has_last_stage(self) -> bool:
        return self.n_stages - 1 in self.stage_ids


def split_model(model: nn.Module, cfg: Config, pp_rank: int) -> PipelineParts:
    """Prune ``model`` (on meta) to this rank's stages; each stage is a view sharing its modules.

    The returned ``rank_model`` is ``model`` itself with foreign layers removed, so its
    ``state_dict`` keys are the one-process keys restricted to what this rank holds.
    """
    p = cfg.parallel
    per_rank = stages_per_rank(cfg)
    n_stages = p.pp * per_rank
    layers = (parse_layers(p.pp_layers, cfg.model.n_layers, n_stages) if p.pp_layers
              else split_layers(cfg.model, cfg.train.seq_len, n_stages))
    ids = stage_ids(pp_rank, p.pp, per_rank, p.pp_schedule)
    stages = [_stage_view(model, layers[i], first=i == 0, last=i == n_stages - 1) for i in ids]
    held = {str(i) for s in ids for i in layers[s]}
    for name in [n for n in model.layers if n not in held]:
        del model.layers[name]
    if 0 not in ids:
        model.embed_tokens = None
    if n_stages - 1 not in ids:
        model.norm, model.lm_head = None, None
    return PipelineParts(model, stages, ids, n_stages)


def _stage_view(model: nn.Module, layer_ids: list[int], first: bool, last: bool) -> nn.Module:
    """A model object of the same class holding only these parts — the same module objects."""
    stage = object.__new__(type(model))
    nn.Module.__init__(stage)
    stage.cfg = model.cfg
    stage.checkpoint_layers = False
    stage.rope_positions = None
    stage.embed_tokens = model.embed_tokens if first else None
    stage.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
    stage.norm = model.norm if last else None
    stage.lm_head = model.lm_head if last else None
    return stage


def build_schedule(parts: PipelineParts, cfg: Config, pp_group: torch.distributed.ProcessGroup,
                   device: torch.device, loss_fn: Callable) -> object:
    """torch's schedule for ``parallel.pp_schedule`` over this rank's (materialised) stages."""
    from torch.distributed import pipelining as pl

    stages = [pl.PipelineStage(module, i, parts.n_stages, device, group=pp_group)
              for module, i in zip(parts.stages, parts.stage_ids)]
    kind = {"gpipe": pl.ScheduleGPipe, "1f1b": pl.Schedule1F1B, "interleaved_1f1b": pl.ScheduleInterleaved1F1B,
            "interleaved_zb": pl.ScheduleInterleavedZeroBubble, "zbv": pl.ScheduleZBVZeroBubble}[cfg.parallel.pp_schedule]
    first = stages if cfg.parallel.pp_schedule in MULTI_STAGE else stages[0]
    return kind(first, n_microbatches=microbatches(cfg), loss_fn=loss_fn, scale_grads=False)


def clip_pipeline_gradients(params: list[nn.Parameter], max_norm: float, pp_group: CommGroup) -> float:
    """Clip this rank's gradients by the global L2 norm over every stage and shard; returns it.

    Each rank takes its stages' norm the way the one-stage path does (torch's foreach norm, one
    reduction for DTensor shards), the pipeline group adds the squares, and every rank scales by
    the same factor. Collective over the job.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = (torch.nn.utils.get_total_norm(grads, foreach=True) if grads
            else torch.zeros((), device=params[0].device if params else None))  # a stage may hold no grads
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    squared = norm.float().pow(2).reshape(1)
    all_reduce(squared, pp_group)
    norm = squared.sqrt()[0]
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return float(norm)
