"""Pause tokens at inference (Goyal et al.): append M `<pause>` ids to the prompt and ignore
every output up to the last pause; generation and scoring start after it."""

from __future__ import annotations

from typing import Optional, Sequence


def resolve_pauses(requested: Optional[int], default: int, pause_id: Optional[int]) -> int:
    """M: `requested` if given, else the model's recorded default (0 for non-pause models)."""
    m = default if requested is None else int(requested)
    if m < 0:
        raise ValueError(f"--pauses must be >= 0, got {m}")
    if m > 0 and pause_id is None:
        raise ValueError("this model records no pause_token_id (not pause-trained); "
                         "use --pauses 0")
    return m


def append_pauses(ids: Sequence[int], m: int, pause_id: Optional[int]) -> list[int]:
    """ids followed by exactly m pause ids."""
    if m and pause_id is None:
        raise ValueError("pauses requested but no pause token id")
    return list(ids) + [int(pause_id)] * m if m else list(ids)
