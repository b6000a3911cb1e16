"""Where each parameter's values live: the tensor-parallel split of a full tensor, the names a
pipeline engine gives our parameters, and vocabulary rows added for padding.

`shard` / `unshard` cut and join exactly as megatron's CPU init splits a master weight, so a
full tensor in our naming and the TP shards of a checkpoint convert both ways at any TP size.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

_PIPELINE_BLOCK = re.compile(r"tied_modules\.block(\d+)\.block\.(.+)$")
_PIPELINE_SHARED = "tied_modules.shared."


def tp_spec(name: str, cfg) -> Optional[tuple[int, int]]:
    """(dim, stride) of the TP split of parameter `name` (our naming) of a model with
    `cfg.arch`; None = replicated."""
    if name in ("embed.weight", "output.weight"):
        return 0, 1
    if re.search(r"attn\.qkv\.(weight|bias)$", name):
        return 0, 1
    if re.search(r"mlp\.fc1\.(weight|bias)$", name):
        return 0, 2 if cfg.arch == "llama" else 1
    if re.search(r"(attn\.dense|mlp\.fc2)\.weight$", name):
        return 1, 1
    return None


def shard(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s piece of a full tensor split over `world` TP ranks."""
    if world == 1:
        return full
    per_partition = full.shape[dim] // world
    chunks = torch.split(full, per_partition // stride, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


def unshard(parts: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from every rank's piece (in rank order)."""
    if len(parts) == 1:
        return parts[0]
    pieces = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(parts))], dim=dim)


def merge_tp(parts: list[dict], cfg) -> dict:
    """Per-TP-rank state dicts (rank order) -> full tensors."""
    full = {}
    for name in parts[0]:
        spec = tp_spec(name, cfg)
        tensors = [p[name] for p in parts]
        full[name] = unshard(tensors, *spec) if spec and len(parts) > 1 else tensors[0]
    return full


def full_name(name: str) -> str:
    """Our unsharded parameter name for a name in the training module (the pipeline's
    `tied_modules.block<i>.block.X` is `layers.<i>.X`, `tied_modules.shared.X` is `X`)."""
    m = _PIPELINE_BLOCK.match(name)
    if m:
        return f"layers.{m.group(1)}.{m.group(2)}"
    if name.startswith(_PIPELINE_SHARED):
        return name[len(_PIPELINE_SHARED):]
    return name


def pad_rows(t: torch.Tensor, rows: int, name: str, source: str = "source") -> torch.Tensor:
    """`t` with zero rows appended up to `rows` (TP padding, a new <pause> row)."""
    if t.shape[0] > rows:
        raise ValueError(f"{name}: {source} has {t.shape[0]} vocabulary rows, the model {rows}")
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


def pad_vocab(full: dict, rows: int) -> dict:
    """The embedding and output head of a full state dict padded to `rows` (in place)."""
    for name in ("embed.weight", "output.weight"):
        if name in full:
            full[name] = pad_rows(full[name], rows, name)
    return full
