"""The paired bootstrap the study's reports put on a difference between two scorings of the same
items (pause_ft: test rows; adaptive: held-out windows), and what its interval says."""

from __future__ import annotations

BOOTSTRAP = {"resamples": 10000, "seed": 0, "level": 0.95}


def paired_bootstrap(a: list, b: list, resamples: int, seed: int, level: float) -> dict:
    """mean(a) - mean(b) over paired items and its percentile interval at `level`: the items
    are drawn with replacement `resamples` times (numpy's default_rng(seed)), the same draw for
    a and b."""
    import numpy as np

    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired_bootstrap: needs two equally long, non-empty lists of paired "
                         f"scores; got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.concatenate([d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
                            for n in [1000] * (resamples // 1000) + [resamples % 1000] if n])
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "rows": len(d)}


def interval_side(c: dict) -> str:
    """Where an interval {lo, hi} lies: "above 0", "below 0", or "includes 0" (an interval of
    exactly [0, 0], two identical scorings, includes 0)."""
    return "above 0" if c["lo"] > 0 else "below 0" if c["hi"] < 0 else "includes 0"
