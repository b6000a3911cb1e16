"""The early-exit losses of DESIGN.md ("Early exit with pondering heads").

Conventions: N layers, lambdas[:, i] = λ_{i+1} (0-based columns), per-layer task losses
`task[:, i]` = CE (or MSE for regression) of the shared head on layer i+1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import halting_math as hm


def exit_distribution(lambdas: torch.Tensor) -> torch.Tensor:
    """p_i = λ_i ∏_{j<i} (1 - λ_j) [B, N], with λ_N := 1 (the column given for layer N is not
    used) so that p sums to one over the N layers: the mass left after layer N-1 exits at the
    last layer, as in PonderNet. `halting_math.exit_distribution`, shared with adaptive
    pondering."""
    return hm.exit_distribution(lambdas[:, :-1], dim=1)


def geometric_prior(num_layers: int, prior_lambda: float) -> torch.Tensor:
    """Truncated Geometric(λ_p) over N layers; the tail mass goes to the last layer (as in
    PALBERT's code), so the prior is a proper distribution like p. Adaptive pondering
    renormalises its prior instead, as DESIGN.md defines it there (`halting_math`)."""
    return hm.truncated_geometric(prior_lambda, num_layers, tail="last")


def truncate(p: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PALBERT's ε: once the CDF before a layer exceeds 1-ε, that layer's p becomes ε/N.
    Returns (p for the KL, mask of layers still in the task loss)."""
    if epsilon <= 0:
        return p, torch.ones_like(p, dtype=torch.bool)
    cdf_before = torch.cumsum(p, dim=1) - p
    live = cdf_before <= 1 - epsilon
    floor = torch.full_like(p, epsilon / p.shape[1])
    return torch.where(live, p, floor), live


def kl_to_prior(p: torch.Tensor, prior: torch.Tensor, direction: str = "p_prior") -> torch.Tensor:
    """Batch-mean KL. p_prior = KL(p ‖ prior) = Σ p log(p/prior) (the papers' formula: mode
    seeking, lets p concentrate on few layers); prior_p = KL(prior ‖ p) (what PALBERT's and
    the PonderNet reference code compute via KLDivLoss(log p, prior): mass covering)."""
    prior = prior.to(p)[None, :].expand_as(p)
    tiny = torch.finfo(p.dtype).tiny
    if direction == "p_prior":
        kl = torch.xlogy(p, p) - p * prior.log()
    elif direction == "prior_p":
        kl = prior * (prior.log() - p.clamp_min(tiny).log())
    else:
        raise ValueError(f"unknown KL direction {direction!r}")
    return kl.sum(dim=1).mean()


def per_layer_task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, N, C] logits (C = 1: regression) -> [B, N] losses."""
    b, n, c = logits.shape
    if c == 1:
        return (logits.squeeze(-1) - labels.to(logits.dtype)[:, None]) ** 2
    flat = F.cross_entropy(logits.reshape(b * n, c), labels.repeat_interleave(n),
                           reduction="none")
    return flat.view(b, n)


def pondering_loss(logits: torch.Tensor, lambdas: torch.Tensor, labels: torch.Tensor, *,
                   beta: float, prior_lambda: float, epsilon: float,
                   kl_direction: str) -> tuple[torch.Tensor, dict]:
    """Σ_i p_i·L_i + β·KL (PALBERT / PonderNet). Layers past the 1-ε point of a sample's
    CDF are not in its task loss; logits/lambdas may cover fewer than N layers (unrolling
    stopped early) — those missing layers are then past every sample's 1-ε point."""
    n_run = logits.shape[1]
    p_full = exit_distribution(lambdas)
    p_kl, live = truncate(p_full, epsilon)
    task = per_layer_task_loss(logits, labels)
    weighted = (p_full[:, :n_run] * live[:, :n_run] * task).sum(dim=1).mean()
    prior = geometric_prior(p_full.shape[1], prior_lambda)
    kl = kl_to_prior(p_kl, prior, kl_direction)
    return weighted + beta * kl, {"task_loss": weighted.detach(), "kl": kl.detach(),
                                  "expected_layer": (p_full * torch.arange(
                                      1, p_full.shape[1] + 1, device=p_full.device)).sum(1)
                                  .mean().detach()}


def pabee_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_j j·L_j / Σ_j j: deeper layers' heads weigh more (PABEE; also used for DeeBERT-style
    entropy exit, trained jointly rather than in DeeBERT's two stages)."""
    task = per_layer_task_loss(logits, labels).mean(dim=0)
    j = torch.arange(1, task.shape[0] + 1, device=task.device, dtype=task.dtype)
    return (j * task).sum() / j.sum()
