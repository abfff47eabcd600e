"""The optimizer and the learning-rate schedule of a training run, for every stage.

The schedule is a pure function of the step, as nanoGPT's get_lr: lr_multiplier(step) scales
each parameter group's own peak ("initial_lr"), so groups with different peaks share one
shape and a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


class OptimizerConfig(Protocol):
    """The fields of a stage config (pretrain or finetune) that the optimizer reads."""

    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    betas: tuple[float, float]


def build_optimizer(
    model: torch.nn.Module, cfg: OptimizerConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (GPT.configure_optimizer), each group's peak lr kept
    as "initial_lr" for the schedule."""
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.lr, tuple(cfg.betas), device.type)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def lr_multiplier(step: int, cfg: OptimizerConfig, max_steps: int) -> float:
    """Linear warmup to 1 over warmup_steps, then cosine decay to min_lr/lr at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr / cfg.lr
    if step >= max_steps:
        return floor
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)
