"""Learning-rate schedule: linear warmup, then cosine (Pythia), linear or constant to min_lr."""

from __future__ import annotations

import math

import torch

from ..config.schema import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    warmup, total, peak, floor = cfg.warmup_iters, cfg.iters, cfg.lr, cfg.min_lr_value
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if cfg.lr_decay == "constant" or total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if cfg.lr_decay == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """A LambdaLR that DeepSpeed steps and checkpoints with the engine."""
    base = cfg.lr
    for group in optimizer.param_groups:
        group["lr"] = base
        group["initial_lr"] = base
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / base)
