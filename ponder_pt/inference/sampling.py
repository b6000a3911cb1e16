"""Drawing the next token from last-position logits: the ordinary sampler of every decoding
loop, and speculative sampling's distribution, acceptance test and residual draw."""

from __future__ import annotations

from typing import Optional

import torch


def pick_token(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int,
               gen: Optional[torch.Generator]) -> int:
    """Next token from last-position logits [V] (already masked)."""
    if greedy:
        return int(logits.argmax())
    z = logits.float() / max(temperature, 1e-6)
    if top_k > 0:
        vals, idx = z.topk(min(top_k, z.shape[-1]))
        return int(idx[torch.multinomial(torch.softmax(vals, -1), 1, generator=gen)])
    return int(torch.multinomial(torch.softmax(z, -1), 1, generator=gen))


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """The distribution fixed-K sampling draws from: softmax(z / T), restricted to the top_k
    logits (0 = all) and renormalised; logits [..., V] (masked rows -inf) -> float32 probs."""
    z = logits.float() / max(temperature, 1e-6)
    if top_k > 0 and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    return torch.softmax(z, dim=-1)


def accept_draft(p: torch.Tensor, q: torch.Tensor, token: int,
                 gen: Optional[torch.Generator]) -> bool:
    """Speculative sampling's test: keep the drafted `token` (drawn from q) with probability
    min(1, p(token) / q(token))."""
    u = float(torch.rand((), generator=gen, device=p.device))
    return u * float(q[token]) < float(p[token])


def residual_sample(p: torch.Tensor, q: torch.Tensor, gen: Optional[torch.Generator]) -> int:
    """A draw from the normalised (p - q)+ after a rejection (from p where it vanishes,
    which only rounding can cause: a rejection needs p(y) < q(y))."""
    rest = (p - q).clamp(min=0)
    total = float(rest.sum())
    return int(torch.multinomial(rest / total if total > 0 else p, 1, generator=gen))
