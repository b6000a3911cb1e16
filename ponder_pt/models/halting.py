"""Adaptive pondering: per-token halting over the K+1 pondering passes (DESIGN.md).

After pass k (k = 0..K) a tiny head reads the final-norm hidden state h_k and gives
lambda_k = sigmoid(w . h_k + b) (`pondernet`), or sigmoid(w . [h_k ; lambda_{k-1}] + b)
(`palbert`, PALBERT's Lambda layer, lambda_{-1} = 0); lambda_K = 1. The exit distribution is
p_k = lambda_k prod_{j<k} (1 - lambda_j), and the per-token loss
sum_k p_k CE(z_k, y) + beta KL(p || truncated geometric prior).

Q-exit at inference: a token exits at the first pass whose cumulative p reaches q
(`halting_math.q_exit_step`: the forward's exits, which its metrics count; the exported
remote code repeats that arithmetic). Later
passes read an exited token's keys and values of its exit pass (`FrozenPass`, CALM's state
propagation), so decoding can skip those passes for it. The exit distribution and the prior
are `halting_math`'s, shared with early exit.

Everything here works on tensors laid out [s, b] (the model's sequence-first layout).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import halting_math as hm
from . import parallel as par

MODES = ("pondernet", "palbert")


class HaltingHead(nn.Module):
    """lambda_k from the final-norm hidden state [s, b, h] (this rank's sequence shard under
    SP) and, for `palbert`, the previous lambda [s, b]. Replicated over TP: its input is the
    full hidden on every rank (its gradient there is complete, like a norm's); under SP each
    rank sees its own tokens, so its parameters are marked `sequence_parallel` (their
    gradients are summed over TP)."""

    def __init__(self, hidden: int, mode: str, seed: int, sequence_parallel: bool,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"halting mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.proj = nn.Linear(hidden + (1 if mode == "palbert" else 0), 1)
        with torch.no_grad():  # seeded like every other weight: the same on any layout
            gen = torch.Generator().manual_seed(seed + 7919)
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=gen) * 0.02)
            self.proj.bias.zero_()
        self.to(dtype)
        par.mark_sequence_parallel(self.parameters(), sequence_parallel)

    def forward(self, hidden: torch.Tensor, previous: Optional[torch.Tensor]) -> torch.Tensor:
        """lambda [s, b] in float32."""
        x = hidden
        if self.mode == "palbert":
            prev = (torch.zeros(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
                    if previous is None else previous.to(hidden.dtype))
            x = torch.cat([hidden, prev.unsqueeze(-1)], dim=-1)
        return torch.sigmoid(self.proj(x).squeeze(-1).float())


def objective(ce: torch.Tensor, lambdas: torch.Tensor, mask: torch.Tensor,
              hcfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense halting objective (DESIGN.md) and the exit distribution it weighs with.
    ce [K+1, s, b] per pass; lambdas [K, s, b] of passes 0..K-1; mask [s, b] (float);
    hcfg: `ponder.halting` (beta, prior). Returns (loss, p [K+1, s, b])."""
    p = hm.exit_distribution(lambdas, dim=0)
    prior = hm.truncated_geometric(hcfg.prior, p.shape[0], "renormalise", device=p.device)
    return halting_loss(ce, p, mask, hcfg.beta, prior), p


def halting_loss(ce: torch.Tensor, p: torch.Tensor, mask: torch.Tensor, beta: float,
                 prior: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens of sum_k p_k CE_k + beta KL(p || prior).
    ce, p [K+1, s, b]; mask [s, b] (float); prior [K+1]."""
    prior = prior.view(-1, 1, 1)
    kl = (p * (torch.log(p.clamp(min=1e-12)) - torch.log(prior))).sum(0)
    per_token = (p * ce).sum(0) + beta * kl
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def stats(p: torch.Tensor, mask: torch.Tensor, exits: torch.Tensor) -> dict:
    """Detached summaries over the loss tokens: expected passes sum_k (k+1) p_k, and the
    histogram (fractions per pass) of `exits` [s, b], the exit passes the forward took (by
    `halting_math.q_exit_step`, or imposed), so the reported exits are the ones that ran."""
    with torch.no_grad():
        w = mask / mask.sum().clamp(min=1.0)
        passes = torch.arange(1, p.shape[0] + 1, dtype=p.dtype, device=p.device).view(-1, 1, 1)
        expected = ((p * passes).sum(0) * w).sum()
        hist = torch.stack([((exits == k).float() * w).sum() for k in range(p.shape[0])])
    return {"expected_passes": expected, "exit_hist": hist}


class FrozenPass:
    """The frozen-keys/values rule for one pass j: tokens that exited before j
    (`exited` [b, s] bool) attend -- and are attended to -- with their exit pass's keys and
    values (`keys` / `values`, per layer [b, kv_heads, s, d] before rotary, None before any
    exit). Each layer's fresh keys/values of this pass are recorded in `fresh` so the caller
    can freeze the tokens that exit at j. One object per pass: a recomputation under
    activation checkpointing sees the state of its own pass."""

    def __init__(self, exited: Optional[torch.Tensor], keys: list, values: list):
        self.exited, self.keys, self.values = exited, keys, values
        self.fresh: dict = {}

    def apply(self, index: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [b, kv, s, d] of layer `index` -> with exited tokens' rows replaced."""
        self.fresh[index] = (k, v)
        if self.exited is None or self.keys[index] is None:
            return k, v
        m = self.exited[:, None, :, None]
        return torch.where(m, self.keys[index], k), torch.where(m, self.values[index], v)

    def next(self, exiting: torch.Tensor) -> "FrozenPass":
        """The rule for pass j+1, once `exiting` [b, s] (the tokens exiting at j) is known."""
        exited = exiting if self.exited is None else self.exited | exiting
        m = exiting[:, None, :, None]
        keys, values = [], []
        for index in range(len(self.keys)):
            k, v = self.fresh[index]
            old_k, old_v = self.keys[index], self.values[index]
            keys.append(torch.where(m, k, k if old_k is None else old_k))
            values.append(torch.where(m, v, v if old_v is None else old_v))
        return FrozenPass(exited, keys, values)

    @staticmethod
    def first(num_layers: int) -> "FrozenPass":
        return FrozenPass(None, [None] * num_layers, [None] * num_layers)
