"""The optimizer and the learning-rate schedule of a training run, for every stage.

The schedule is a pure function of the step, as nanoGPT's get_lr: lr_multiplier(step) scales
each parameter group's own peak ("initial_lr"), so groups with different peaks share one
shape and a resumed run needs no scheduler state.

Two recipes (pretrain.recipe; fine-tuning always uses the first):
  gpt2    AdamW over everything, warmup then cosine decay to min_lr (nanoGPT, GPT-3 paper).
  modern  torch.optim.Muon on the blocks' 2-D matrices, AdamW with a learning rate of its own
          for the token embeddings, the head and the gains; warmup, a constant stretch, then
          a linear decay to zero over the last cooldown_frac of the steps (warmup-stable-decay,
          as modded-nanogpt's records and nanochat's base_train.py).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch


class OptimizerConfig(Protocol):
    """The fields of a stage config (pretrain or finetune) that the optimizer reads; the
    modern recipe's own fields (matrix_lr, ...) are read only when recipe is "modern"."""

    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    betas: tuple[float, float]


class Optimizers:
    """Several optimizers stepped as one: one list of param_groups (the schedule sets each
    group's lr), one state_dict (so the checkpoint holds Muon's momentum too)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every optimizer's groups (read anew: load_state_dict replaces them)."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("optimizers")
        names = [type(opt).__name__ for opt in self.optimizers]
        if saved is None or len(saved) != len(self.optimizers):
            raise ValueError(f"the saved optimizer state is not the state of {' + '.join(names)}")
        for opt, opt_state in zip(self.optimizers, saved, strict=True):
            opt.load_state_dict(opt_state)


def recipe(cfg: Any) -> str:
    return getattr(cfg, "recipe", "gpt2")


def build_optimizer(
    model: torch.nn.Module, cfg: OptimizerConfig, device: torch.device
) -> torch.optim.Optimizer | Optimizers:
    """The recipe's optimizer over the trainable parameters, each group's peak lr kept as
    "initial_lr" for the schedule."""
    if recipe(cfg) == "modern":
        optimizer: torch.optim.Optimizer | Optimizers = muon_adamw(model, cfg, device)
    else:  # AdamW (GPT.configure_optimizer)
        optimizer = model.configure_optimizer(
            cfg.weight_decay, cfg.lr, tuple(cfg.betas), device.type
        )
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def muon_adamw(model: torch.nn.Module, cfg: Any, device: torch.device) -> Optimizers:
    """Muon for the blocks' 2-D matrices; AdamW for the embeddings, the head and the gains.

    A tied embedding is the head too, so it takes the head's rate. No weight decay, as the
    speedrun records. Muon's update keeps torch's default scale (adjust_lr_fn "original",
    max(1, rows/cols)^0.5, Keller Jordan's), the one the published matrix_lr 0.02 is for.
    """
    tied = getattr(model.config, "tie_embeddings", True)
    groups: dict[str, list[torch.nn.Parameter]] = {
        "matrix": [], "embedding": [], "head": [], "gain": []
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("transformer.h.") and p.dim() == 2:
            groups["matrix"].append(p)
        elif name == "lm_head.weight" or (name == "transformer.wte.weight" and tied):
            groups["head"].append(p)
        elif name in ("transformer.wte.weight", "transformer.wpe.weight"):
            groups["embedding"].append(p)
        else:  # norm gains and biases
            groups["gain"].append(p)
    if not groups["matrix"]:
        raise ValueError(
            "pretrain.recipe modern trains the blocks' 2-D matrices with Muon, and this model "
            "has none that are trainable; use pretrain.recipe: gpt2"
        )
    muon = torch.optim.Muon(
        groups["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum, weight_decay=0.0
    )
    lrs = {"embedding": cfg.embedding_lr, "head": cfg.head_lr, "gain": cfg.gain_lr}
    adam_groups = [
        {"params": groups[kind], "lr": lr, "name": kind} for kind, lr in lrs.items() if groups[kind]
    ]
    # eps 1e-10 as modded-nanogpt and nanochat: the embedding's gradients are tiny per row
    adamw = torch.optim.AdamW(
        adam_groups, betas=tuple(cfg.betas), eps=1e-10, weight_decay=0.0,
        fused=device.type in ("cpu", "cuda"),
    )
    muon.param_groups[0]["name"] = "matrix"
    return Optimizers(muon, adamw)


def lr_multiplier(step: int, cfg: OptimizerConfig, max_steps: int) -> float:
    """Linear warmup to 1 over warmup_steps; then for the gpt2 recipe cosine decay to
    min_lr/lr at max_steps, for the modern one 1 until the last cooldown_frac of the steps
    and a linear decay to 0 at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if recipe(cfg) == "modern":
        cooldown = max(1.0, cfg.cooldown_frac * max_steps)  # type: ignore[attr-defined]
        return min(1.0, max(0.0, (max_steps - step) / cooldown))
    floor = cfg.min_lr / cfg.lr
    if step >= max_steps:
        return floor
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)
