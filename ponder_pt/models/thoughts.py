"""Latent thoughts (PonderLM-2; DESIGN.md "Latent thoughts"): the slot layout and the passes.

After every token x_t the model writes M thoughts, in the interleaved layout
[x_t, z_t^1..z_t^M] (every slot at position id t, plain causal attention over the slots).
A thought slot's input is the final-norm hidden state of the slot before it. Exactly, the
slots are computed one after another (`sequential`, what decoding does through the KV
cache); training approximates that with parallel Jacobi iterations (`jacobi`): M growing
passes give initial thoughts, then each iteration recomputes every thought at once from the
previous ones. Both return the final-norm hidden state of each position's last slot, whose
logits predict x_{t+1}.

Jacobi is exact after enough iterations because attention is causal: a thought's new value
depends only on the slots before it, so each iteration makes at least the earliest inexact
thought exact, and L tokens need at most L x M iterations (M = 1: after iteration i the
thoughts of positions <= i are exact; the tests check both against `sequential`).

`pass_fn(x, position_ids, rope=None)` is the model's transformer pass (blocks + final norm;
with a cache it continues after the cached slots). Tensors are sequence-first [slots, b, h];
under sequence parallelism each rank holds whole positions (all their slots), so the layout
works on the local shard and only the position ids are global.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import torch


def interleave(e: torch.Tensor, thoughts: Sequence[torch.Tensor]) -> torch.Tensor:
    """e [L, b, h] and k thought tensors [L, b, h] -> [L * (k + 1), b, h], per position
    [x_t, z_t^1..z_t^k]."""
    if not thoughts:
        return e
    return torch.stack([e, *thoughts], dim=1).flatten(0, 1)


def per_position(x: torch.Tensor, slots: int) -> torch.Tensor:
    """[L * slots, b, h] -> [L, slots, b, h]."""
    return x.unflatten(0, (-1, slots))


def slot_positions(position_ids: torch.Tensor, slots: int) -> torch.Tensor:
    """Token position ids [b, L] -> the slots' [b, L * slots] (each slot at its token's)."""
    return position_ids.repeat_interleave(slots, dim=1)


def draw_iters(choices: Sequence[int], seed: int, step: int) -> int:
    """n for training step `step`: the same on every rank and on a resume."""
    return random.Random(seed * 1_000_003 + step).choice(list(choices))


def jacobi(pass_fn: Callable, e: torch.Tensor, position_ids: torch.Tensor, count: int,
           iters: int, rotary: Callable, final_fn: Optional[Callable] = None) -> torch.Tensor:
    """M growing passes, `iters` Jacobi iterations, and the final pass (gradients through
    all): the last slots' hidden states [L, b, h]. rotary(position_ids) -> the rope of the
    full layout, computed once for the M+1-slot passes. final_fn: the final pass, when it
    differs from the others (default pass_fn)."""
    thoughts: list = []
    for k in range(count):  # pass k over [x, z^1..z^k] sets z^{k+1}
        h = pass_fn(interleave(e, thoughts), slot_positions(position_ids, k + 1))
        thoughts.append(per_position(h, k + 1)[:, k])
    positions = slot_positions(position_ids, count + 1)
    rope = rotary(positions)
    for _ in range(iters):  # every thought at once from the previous iteration's
        h = pass_fn(interleave(e, thoughts), positions, rope=rope)
        thoughts = list(per_position(h, count + 1)[:, :count].unbind(1))
    h = (final_fn or pass_fn)(interleave(e, thoughts), positions, rope=rope)
    return per_position(h, count + 1)[:, count]


def sequential(pass_fn: Callable, e: torch.Tensor, position_ids: torch.Tensor, count: int,
               rotary: Callable, cache) -> torch.Tensor:
    """The exact computation through `cache`: per position, M+1 one-slot passes, each
    appending its keys/values (the slot's input: the token's embedding, then the previous
    slot's output). The last slots' hidden states [L, b, h]."""
    outs = []
    for t in range(e.shape[0]):
        pos = position_ids[:, t:t + 1]
        rope = rotary(pos)
        x = e[t:t + 1]
        for _ in range(count + 1):
            x = pass_fn(x, pos, rope=rope)
            cache.advance(1)
        outs.append(x)
    return torch.cat(outs)


@contextmanager
def trial(cache):
    """Passes run inside leave `cache` as it was (its length, contents and padding mask):
    the passes of a cached Jacobi prefill before the final one, which alone appends."""
    saved = cache.snapshot()
    try:
        yield
    finally:
        cache.restore(saved)


def cached_jacobi(pass_fn: Callable, e: torch.Tensor, position_ids: torch.Tensor, count: int,
                  iters: int, rotary: Callable, cache) -> torch.Tensor:
    """`jacobi` over a chunk continuing after `cache` (a prompt's `prefill: jacobi`): the
    passes before the last attend to the cache without appending; the final pass appends the
    chunk's M+1 slots per position. A preallocated cache's padding mask (set for the M+1-slot
    layout) is re-laid for each pass's slot count."""
    n = e.shape[0]
    valid = cache.position_valid(n, count + 1)  # [b, n] or None

    def relay(slots: int) -> None:
        if valid is not None:
            cache.set_valid(valid.repeat_interleave(slots, dim=1))

    def trial_pass(x, positions, rope=None):
        relay(x.shape[0] // n)
        with trial(cache):
            return pass_fn(x, positions, rope=rope)

    def final_pass(x, positions, rope=None):
        relay(count + 1)
        h = pass_fn(x, positions, rope=rope)
        cache.advance(n * (count + 1))
        return h

    return jacobi(trial_pass, e, position_ids, count, iters, rotary, final_pass)
