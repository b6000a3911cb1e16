"""Weights that do not match the config describing them, as one error that names the files,
the first keys of each kind (the rest counted) and what to change.

    check_weights(expected, found, weights="ckpt/step_00000002/mp_rank_00_model_states.pt",
                  config="ckpt/run_config.yaml", layer_key="model.num_layers",
                  sizes={"model.hidden_size": 32, ...}, fix="...")

`expected` and `found` map tensor names to shapes (what the config builds, what the files
hold). Loading such weights anyway would leave the missing tensors at their random
initialisation and drop the unexpected ones, so every difference is an error. (The exported
model's own from_pretrained does the same from transformers' loading info:
`ponder_pt.export.templates.modeling_ponder.check_loading_info`.)
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

SHOWN = 3  # keys named per kind of problem
_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


class WeightsMismatchError(ValueError):
    """Weights (a checkpoint, an HF directory) do not match the config that describes them."""


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _some(items: Sequence[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _dims(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _tensors(n: int) -> str:
    return f"{n} tensor{'s' if n != 1 else ''}"


def compare(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]]
            ) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """(missing, unexpected, [(name, found shape, expected shape)]), in natural key order."""
    missing = sorted(set(expected) - set(found), key=_natural)
    unexpected = sorted(set(found) - set(expected), key=_natural)
    wrong = [(k, tuple(found[k]), tuple(expected[k])) for k in sorted(expected, key=_natural)
             if k in found and tuple(found[k]) != tuple(expected[k])]
    return missing, unexpected, wrong


def _layers(names) -> int:
    return len({int(m.group(1)) for m in map(_LAYER.search, names) if m})


def _hint(expected, found, wrong, config: str, layer_key: Optional[str],
          sizes: Mapping[str, int]) -> Optional[str]:
    """Which config key is off, when the difference says so: the layer count, or a size that
    equals the expected shape where the weights differ."""
    name = config.replace("\\", "/").rsplit("/", 1)[-1]
    if layer_key and not wrong and _layers(expected) != _layers(found):
        return (f"{name}'s {layer_key} is {_layers(expected)} but the weights hold "
                f"{_layers(found)} layers: set {layer_key} to {_layers(found)} in {name}")
    for key, have, want in wrong:
        if len(have) != len(want):
            continue
        for a, b in zip(have, want):
            keys = [k for k, v in sizes.items() if a != b and v == b]
            if keys:
                return (f"{name}'s {keys[0]} is {b} but the weights have {a} there ({key}): "
                        f"fix {keys[0]} in {name}")
    return None


def check_weights(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], *,
                  weights: str, config: str, fix: str, layer_key: Optional[str] = None,
                  sizes: Optional[Mapping[str, int]] = None) -> None:
    """Raise WeightsMismatchError when `found` differs from `expected` in names or shapes.
    weights / config: the files (as the user knows them); fix: what to do when no config key
    is to blame (or besides fixing it), e.g. "re-export with `ponder-pt convert to-hf`"."""
    missing, unexpected, wrong = compare(expected, found)
    if not (missing or unexpected or wrong):
        return
    name = config.replace("\\", "/").rsplit("/", 1)[-1]
    parts = []
    if missing:
        parts.append(f"{_tensors(len(missing))} that {name} describes "
                     f"{'are' if len(missing) > 1 else 'is'} missing from the weights "
                     f"({_some(missing)})")
    if unexpected:
        parts.append(f"{_tensors(len(unexpected))} in the weights "
                     f"{'have' if len(unexpected) > 1 else 'has'} no place in the model {name} "
                     f"describes ({_some(unexpected)})")
    if wrong:
        shapes = [f"{k} {_dims(a)} vs {_dims(b)}" for k, a, b in wrong]
        parts.append(f"{_tensors(len(wrong))} of the wrong shape (the weights' vs {name}'s: "
                     f"{_some(shapes)})")
    hint = _hint(expected, found, wrong, config, layer_key, sizes or {})
    todo = f"{hint}, or {fix}" if hint else f"Fix {name} to describe these weights, or {fix}"
    raise WeightsMismatchError(f"{weights} does not match {config}: {'; '.join(parts)}. "
                               f"{todo}.")
