"""Pause tokens in pretraining samples (Goyal et al., "Think before you speak").

A packed sample has L+1 tokens (L inputs, shifted by one for labels). We place
n = round(rate * L) pauses at uniformly random distinct positions of the L+1 output slots and
fill the remaining slots, in order, with the sample's tokens: this is "insert n pauses at
uniformly random positions, then trim back to L+1", conditioned on every inserted pause
landing inside the kept window, so each sample carries exactly n pauses. The positions come
from a generator seeded by (seed, split, sample index) alone: the same sample gets the same
pauses on any world size, in any worker, and after a resume.
"""

from __future__ import annotations

import math

import numpy as np

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


def num_pauses(rate: float, seq_len: int) -> int:
    """round(rate * L), rounding halves up (Python's round() would round halves to even)."""
    return int(math.floor(rate * seq_len + 0.5))


def pause_positions(seed: int, index: int, seq_len: int, rate: float, split: str = "train"
                    ) -> np.ndarray:
    """Sorted positions in [0, L] that hold a pause in sample `index`."""
    n = num_pauses(rate, seq_len)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, SPLIT_CODES.get(split, 3), index])
    return np.sort(rng.choice(seq_len + 1, size=n, replace=False))


def insert_pauses(text: np.ndarray, pause_id: int, positions: np.ndarray) -> np.ndarray:
    """Put `pause_id` at `positions` and the first len(text) - len(positions) tokens elsewhere."""
    out = np.empty_like(text)
    is_pause = np.zeros(len(text), dtype=bool)
    is_pause[positions] = True
    out[is_pause] = pause_id
    out[~is_pause] = text[: len(text) - len(positions)]
    return out


def make_sample(text: np.ndarray, *, pause_id: int | None, pause_rate: float, seed: int,
                index: int, split: str = "train", eod_id: int | None = None,
                eod_mask_loss: bool = False) -> dict[str, np.ndarray]:
    """L+1 packed tokens -> tokens, labels, loss_mask, position_ids (each of length L).

    The loss is masked where the target is a pause and, when `eod_mask_loss`, where the input
    is an EOD (predicting the next document's first token).
    """
    text = np.asarray(text, dtype=np.int64)
    seq_len = len(text) - 1
    if pause_rate > 0:
        if pause_id is None:
            raise ValueError("pause.rate > 0 needs a pause token id")
        text = insert_pauses(text, pause_id, pause_positions(seed, index, seq_len, pause_rate, split))
    tokens, labels = text[:-1], text[1:]
    loss_mask = np.ones(seq_len, dtype=np.float32)
    if pause_rate > 0:
        loss_mask[labels == pause_id] = 0.0
    if eod_mask_loss and eod_id is not None:
        loss_mask[tokens == eod_id] = 0.0
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": np.arange(seq_len, dtype=np.int64)}
