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

The runtime (parallel/runtime.py) runs ``schedule.step`` on every rank of a pipeline with the rank's
per-step batch; the last stage computes the loss per microbatch, and the grad norm adds the
stages' squares over the pipeline group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from meshweave.config import Config
from meshweave.models.family import ModelFamily, family_of
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
    layers = (
        parse_layers(p.pp_layers, cfg.model.n_layers, n_stages)
        if p.pp_layers
        else split_layers(cfg.model, cfg.train.seq_len, n_stages)
    )
    ids = stage_ids(pp_rank, p.pp, per_rank, p.pp_schedule)
    family = family_of(model)
    stages = [_stage_view(model, family, layers[i], first=i == 0, last=i == n_stages - 1) for i in ids]
    held = {str(i) for s in ids for i in layers[s]}
    blocks = family.block_dict(model)
    for name in [n for n in blocks if n not in held]:
        del blocks[name]
    for name in (family.first_stage if 0 not in ids else ()) + (family.last_stage if n_stages - 1 not in ids else ()):
        setattr(model, name, None)
    return PipelineParts(model, stages, ids, n_stages)


def _stage_view(model: nn.Module, family: ModelFamily, block_ids: list[int], first: bool, last: bool) -> nn.Module:
    """A model object of the same class holding only these parts — the same module objects.

    Its plain attributes (config, flags) are copied from ``model``; the parts outside the stage
    are ``None``, as the family's forward expects of a pipeline stage."""
    stage = object.__new__(type(model))
    stage.__dict__.update(model.__dict__)
    for registry in ("_parameters", "_buffers", "_modules"):
        setattr(stage, registry, dict(getattr(model, registry)))
    blocks = family.block_dict(model)
    setattr(stage, family.blocks, nn.ModuleDict({str(i): blocks[str(i)] for i in block_ids}))
    for name in (family.first_stage if not first else ()) + (family.last_stage if not last else ()):
        setattr(stage, name, None)
    return stage


def build_schedule(
    parts: PipelineParts, cfg: Config, pp_group: torch.distributed.ProcessGroup, device: torch.device, loss_fn: Callable
) -> object:
    """torch's schedule for ``parallel.pp_schedule`` over this rank's (materialised) stages."""
    from torch.distributed import pipelining as pl

    stages = [
        pl.PipelineStage(module, i, parts.n_stages, device, group=pp_group)
        for module, i in zip(parts.stages, parts.stage_ids)
    ]
    kind = {
        "gpipe": pl.ScheduleGPipe,
        "1f1b": pl.Schedule1F1B,
        "interleaved_1f1b": pl.ScheduleInterleaved1F1B,
        "interleaved_zb": pl.ScheduleInterleavedZeroBubble,
        "zbv": pl.ScheduleZBVZeroBubble,
    }[cfg.parallel.pp_schedule]
    first = stages if cfg.parallel.pp_schedule in MULTI_STAGE else stages[0]
    return kind(first, n_microbatches=microbatches(cfg), loss_fn=loss_fn, scale_grads=False)
