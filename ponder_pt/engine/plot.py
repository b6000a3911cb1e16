"""Loss curves from metrics.jsonl files to a PNG (`ponder-pt plot`, and the end of training)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from .metrics import read_metrics


def plot_runs(run_dirs: Sequence[str], out: str, labels: Optional[Sequence[str]] = None,
              x: str = "step") -> str:
    """Training loss (thin) and validation loss (markers) of each run against `x`
    (step or tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, run in enumerate(run_dirs):
        path = run if run.endswith(".jsonl") else os.path.join(run, "metrics.jsonl")
        rows = read_metrics(path)
        label = labels[i] if labels else os.path.basename(os.path.normpath(run))
        train = [r for r in rows if isinstance(r.get("loss"), (int, float))]
        valid = [r for r in rows if isinstance(r.get("valid_loss"), (int, float))]
        tokens_at = {r["step"]: r.get("tokens", r["step"]) for r in train}
        key = (lambda r: tokens_at.get(r["step"], r["step"])) if x == "tokens" else (lambda r: r["step"])
        line, = ax.plot([key(r) for r in train], [r["loss"] for r in train], lw=1, alpha=0.8,
                        label=f"{label} train")
        if valid:
            ax.plot([key(r) for r in valid], [r["valid_loss"] for r in valid], "o-", ms=4,
                    color=line.get_color(), label=f"{label} valid")
    ax.set_xlabel("tokens" if x == "tokens" else "step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
