"""The arithmetic of halting, shared by adaptive pondering (`models.halting`, halting over the
K+1 pondering passes) and early exit (`early_exit.losses` / `early_exit.exits`, halting over a
classifier's N layers): the exit distribution, the truncated geometric prior and the Q-exit
rule. torch only, so the fine-tuning side does not import the model stack to use it.

DESIGN.md defines the two methods with two deliberate differences, kept here as explicit
arguments (and tested side by side in tests/test_halting_math.py):

* the prior's tail: adaptive pondering renormalises the geometric prior truncated to 0..K
  ("truncated to 0..K and renormalised"); early exit gives the tail mass to the last layer,
  as PALBERT's code does (`tail="renormalise"` / `tail="last"`);
* the Q-exit comparison: adaptive pondering exits at the first pass whose CDF reaches q
  ("Σ_{j≤k} p_j ≥ q"), PALBERT at the first layer whose CDF exceeds q ("exceeds q")
  (`q_exit_step(..., strict=False)` / `strict=True`). At a CDF exactly equal to q they part:
  adaptive pondering exits at that step, PALBERT one step later.
"""

from __future__ import annotations

from typing import Optional

import torch

TAILS = ("renormalise", "last")


def exit_distribution(lambdas: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """p_i = λ_i ∏_{j<i} (1 - λ_j) over n steps, from the halting probabilities λ of the first
    n-1 steps laid out along `dim`; the last step takes the mass left (λ = 1), so p sums to
    one along `dim`. Returns one more entry along `dim` than `lambdas` has."""
    shape = list(lambdas.shape)
    shape[dim] = 1
    lam = torch.cat([lambdas, lambdas.new_ones(shape)], dim=dim)
    survive = torch.cumprod(1.0 - lam, dim=dim)
    before = torch.cat([lambdas.new_ones(shape), survive.narrow(dim, 0, lam.shape[dim] - 1)],
                       dim=dim)
    return lam * before


def truncated_geometric(lambda_p: float, n: int, tail: str, device=None) -> torch.Tensor:
    """Geometric(λ_p) over steps 0..n-1 as a proper distribution [n] (float32).

    tail "renormalise": divided by its sum (adaptive pondering; computed in float32, the
    values its loss has always used). tail "last": the mass beyond the last step is added to
    it (early exit, PALBERT's code; computed in float64)."""
    if tail == "renormalise":
        k = torch.arange(n, dtype=torch.float32, device=device)
        prior = lambda_p * (1.0 - lambda_p) ** k
        return prior / prior.sum()
    if tail == "last":
        k = torch.arange(n, dtype=torch.float64)
        prior = lambda_p * (1 - lambda_p) ** k
        prior[-1] = 1 - prior[:-1].sum()
        return prior.float().to(device)
    raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")


def q_exit_step(survive: Optional[torch.Tensor], lam: torch.Tensor, q: float,
                strict: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of deterministic Q-exit, taken as the λ of each step arrive.

    survive: ∏_{j<i} (1 - λ_j) before this step (None before the first); lam: λ_i.
    Returns (the survival after this step, whether the CDF Σ_{j≤i} p_j = 1 - survival has
    reached q: ≥ q, or > q with `strict`). The CDF is compared as `survival ≤ 1 - q` (strict:
    `<`), the very arithmetic of the exported model's remote code, so ours and an export exit
    at the same pass. q ≥ 1 never exits (the last step takes every token): fixed-K pondering
    exactly, even when λ rounds to 1. The last step is the caller's: it exits everything left.
    """
    survive = (1.0 - lam) * (1.0 if survive is None else survive)
    if q >= 1.0:
        return survive, torch.zeros_like(survive, dtype=torch.bool)
    return survive, (survive < 1.0 - q) if strict else (survive <= 1.0 - q)


def q_exit(lambdas: torch.Tensor, q: float, strict: bool = False, dim: int = 0) -> torch.Tensor:
    """Exit step (long) of each item from the λ of the first n-1 steps along `dim`: the first
    step at which `q_exit_step` reaches q, else the last step (n-1). For tests and offline
    analysis; the forward passes take `q_exit_step` step by step."""
    steps = lambdas.shape[dim]
    survive, exits = None, None
    for i in range(steps):
        survive, now = q_exit_step(survive, lambdas.select(dim, i), q, strict)
        if exits is None:
            exits = torch.full(now.shape, steps, dtype=torch.long, device=now.device)
        exits = torch.where(now & (exits == steps), i, exits)
    if exits is None:  # one step only: it is the last
        shape = list(lambdas.shape)
        del shape[dim]
        return torch.zeros(shape, dtype=torch.long, device=lambdas.device)
    return exits
