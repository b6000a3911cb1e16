"""Exit rules and batched early-exit inference.

A rule sees, layer after layer, the logits (and λ for pondering models) of the samples still
running and says which of them exit now. `predict` drops exited samples from the batch
between layers (`LayerwiseBackbone.select`), so they stop costing compute; every rule keeps
its per-sample state in tensors indexed like the running batch, so batched exit makes the
same decisions as batch-size-1 exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import halting_math as hm
from .heads import ExitModel


class ExitRule:
    """Base: exit at the last layer (the full model: no intermediate heads are run)."""

    needs_lambdas = False
    final_only = True

    def reset(self, sample_ids: torch.Tensor) -> None:
        self.n = len(sample_ids)

    def step(self, i: int, logits: torch.Tensor, lam: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)

    def select(self, keep: torch.Tensor) -> None:
        """Keep the state rows of the samples that go on."""


class QExit(ExitRule):
    """PALBERT: exit at the first layer whose CDF Σ_{j<=i} p_j exceeds q (strictly, as
    DESIGN.md defines it for early exit; adaptive pondering's Q-exit exits when the CDF
    reaches q). The step is `halting_math.q_exit_step`, shared with adaptive pondering,
    on a float64 survival."""

    needs_lambdas = True
    final_only = False

    def __init__(self, q: float):
        self.q = q

    def reset(self, sample_ids):
        self.survive = torch.ones(len(sample_ids), dtype=torch.float64)

    def step(self, i, logits, lam):
        self.survive, reached = hm.q_exit_step(self.survive, lam.double().cpu(), self.q,
                                               strict=True)
        return reached.to(logits.device)

    def select(self, keep):
        self.survive = self.survive[keep.cpu()]


class SampledExit(ExitRule):
    """PonderNet: exit at layer i with probability λ_i. The uniform draws are a function of
    (seed, sample id, layer), so batching and order do not change them."""

    needs_lambdas = True
    final_only = False

    def __init__(self, seed: int, num_layers: int):
        self.seed, self.num_layers = seed, num_layers

    def reset(self, sample_ids):
        rows = []
        for sid in sample_ids.tolist():
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(sid))
            rows.append(torch.rand(self.num_layers, generator=g, dtype=torch.float64))
        self.draws = torch.stack(rows) if rows else torch.zeros(0, self.num_layers)

    def step(self, i, logits, lam):
        return (self.draws[:, i] < lam.double().cpu()).to(logits.device)

    def select(self, keep):
        self.draws = self.draws[keep.cpu()]


class PatienceExit(ExitRule):
    """PABEE: a counter of consecutive layers whose prediction agrees with the previous
    layer's (argmax equal; |Δ| < τ for regression), reset on disagreement; exit when it
    reaches t — i.e. after t agreements, at layer t+1 at the earliest."""

    final_only = False

    def __init__(self, patience: int, regression_threshold: float, regression: bool):
        self.t, self.tau, self.regression = patience, regression_threshold, regression

    def reset(self, sample_ids):
        self.counter = torch.zeros(len(sample_ids), dtype=torch.long)
        self.previous = None

    def step(self, i, logits, lam):
        current = logits.detach().float().cpu()
        current = current.squeeze(-1) if self.regression else current.argmax(-1)
        if self.previous is not None:
            same = ((current - self.previous).abs() < self.tau if self.regression
                    else current == self.previous)
            self.counter = torch.where(same, self.counter + 1, torch.zeros_like(self.counter))
        self.previous = current
        return (self.counter >= self.t).to(logits.device)

    def select(self, keep):
        keep = keep.cpu()
        self.counter = self.counter[keep]
        self.previous = self.previous[keep] if self.previous is not None else None


class EntropyExit(ExitRule):
    """DeeBERT: exit at the first layer whose prediction entropy (nats) is below S."""

    final_only = False

    def __init__(self, threshold: float):
        self.threshold = threshold

    def step(self, i, logits, lam):
        logp = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return entropy < self.threshold


def make_rule(model: ExitModel, threshold: Optional[float] = None) -> ExitRule:
    """The model's strategy with its configured threshold, or `threshold` (q, patience, S)."""
    cfg, strategy = model.cfg, model.strategy
    if strategy == "palbert":
        return QExit(cfg.q if threshold is None else float(threshold))
    if strategy == "pondernet":
        if threshold is not None:  # a PonderNet model evaluated with deterministic Q-exit
            return QExit(float(threshold))
        return SampledExit(cfg.seed, model.num_layers)
    if strategy == "pabee":
        t = cfg.patience if threshold is None else int(threshold)
        return PatienceExit(t, cfg.regression_threshold, model.is_regression)
    if strategy == "entropy":
        return EntropyExit(cfg.entropy if threshold is None else float(threshold))
    return ExitRule()


def default_sweep(model: ExitModel) -> list[float]:
    """Thresholds for the metric-vs-threshold curve of a trained model."""
    n = model.num_layers
    if model.strategy in ("palbert", "pondernet"):
        return [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    if model.strategy == "pabee":
        return [float(t) for t in range(1, n)]
    if model.strategy == "entropy":
        return [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    return []


@dataclass
class ExitResult:
    predictions: torch.Tensor  # [B] class ids, or [B] floats for regression
    logits: torch.Tensor       # [B, C] logits at the exit layer
    exit_layers: torch.Tensor  # [B] 1-based layer at which each sample exited


@torch.no_grad()
def predict(model: ExitModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            rule: ExitRule, sample_ids: Optional[torch.Tensor] = None,
            token_type_ids: Optional[torch.Tensor] = None,
            drop_exited: bool = True) -> ExitResult:
    """Per-sample early exit for one batch. With drop_exited the backbone runs each layer on
    the samples still running only; without, every sample runs every layer and only the
    first exit is recorded (the reference the dropping path must equal)."""
    bb = model.backbone
    b = input_ids.shape[0]
    n = model.num_layers
    device = input_ids.device
    ids = sample_ids if sample_ids is not None else torch.arange(b)
    rule.reset(ids)
    state = bb.start(input_ids, attention_mask, token_type_ids)
    running = torch.arange(b, device=device)         # original rows still running
    done = torch.zeros(b, dtype=torch.bool, device=device)
    exit_logits: Optional[torch.Tensor] = None
    exit_layers = torch.full((b,), n, dtype=torch.long)
    previous: Optional[torch.Tensor] = None
    for i in range(n):
        state = bb.layer(i, state)
        if rule.final_only and i < n - 1:
            continue
        pooled = bb.pooled(state)
        logits = model.head(i, pooled)
        lam = None
        if rule.needs_lambdas:
            if model.halting is None:
                raise ValueError(f"exit rule {type(rule).__name__} needs a halting network; "
                                 f"this model was trained with exit.strategy={model.strategy}")
            lam = model.halt(pooled, torch.zeros_like(pooled) if previous is None else previous)
        previous = pooled
        exits = rule.step(i, logits, lam)
        if i == n - 1:
            exits = torch.ones_like(exits)
        if exit_logits is None:
            exit_logits = logits.new_zeros(b, logits.shape[-1])
        new = exits & ~done[running]
        rows = running[new]
        exit_logits[rows] = logits[new].to(exit_logits.dtype)
        exit_layers[rows.cpu()] = i + 1
        done[rows] = True
        if drop_exited:
            keep = (~exits).nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            if keep.numel() < running.numel():
                state = bb.select(state, keep)
                previous = previous[keep]
                rule.select(keep)
                running = running[keep]
    preds = (exit_logits.squeeze(-1) if model.is_regression else exit_logits.argmax(-1))
    return ExitResult(predictions=preds.cpu(), logits=exit_logits.cpu(), exit_layers=exit_layers)
