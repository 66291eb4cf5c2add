"""Optimizers and learning-rate schedules.

The schedule is a pure function of the step (:func:`lr_at`), so a checkpoint needs only the step
to restore it exactly, whatever the layout it resumes on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from meshweave.comm.ops import CommGroup
from meshweave.config import OptimConfig
from meshweave.lowcomm.onebit import OneBitAdam


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device, replicas: CommGroup | None = None
) -> torch.optim.Optimizer:
    """AdamW (fused where the device supports it), SGD, or 1-bit Adam over ``model``'s trainable
    parameters; 1-bit Adam compresses its momentum exchange over ``replicas`` (dp_replicate).

    Norm weights and other 1-D parameters get no weight decay.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # An empty group (LoRA trains 2-D adapters only) breaks DCP's optimizer state_dict on load.
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.beta1)
    if cfg.name == "onebit_adam":
        if replicas is None:
            raise ValueError("onebit_adam needs the replicas' group (dp_replicate) to exchange over")
        return OneBitAdam(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, freeze_step=cfg.freeze_step, group=replicas
        )
    fused = _use_fused(cfg.fused, device)
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


def _use_fused(setting: str, device: torch.device) -> bool:
    if setting == "false":
        return False
    supported = device.type in ("cuda", "cpu", "xpu", "mps")
    if setting == "true" and not supported:
        raise ValueError(f"optim.fused=true but fused AdamW does not support {device.type}")
    return supported


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant" or total_steps <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - min_lr) * progress
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
