"""Fine-tune one backbone with several exit strategies on one task and compare them: the
metric against the average exit layer and the measured wall-clock speed-up, at each
strategy's default threshold and over its threshold sweep (a table and a figure).

Used by benchmarks/bench_early_exit.py and the miniature study (experiments/); each strategy
runs as its own `ponder-pt finetune` process, so a distributed setup starts clean each time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Iterable, Optional, Sequence

STRATEGIES = ("none", "palbert", "pondernet", "pabee", "entropy")


def run_strategies(backbone: str, task: str, out_dir: str,
                   strategies: Sequence[str] = STRATEGIES, overrides: Iterable[str] = (),
                   per_strategy: Optional[dict] = None, nproc: int = 1,
                   skip_existing: bool = True, reevaluate: bool = False) -> dict:
    """strategy -> eval.json contents. `per_strategy` maps a strategy to extra overrides.
    reevaluate: keep the trained models (OUT/best) and redo only their final evaluation
    (e.g. to re-time them on a quiet machine)."""
    from .heads import heads_file

    results = {}
    for strategy in strategies:
        run_dir = os.path.join(out_dir, strategy)
        eval_path = os.path.join(run_dir, "eval.json")
        best = os.path.join(run_dir, "best")
        again = reevaluate and heads_file(best) is not None
        if again or not (skip_existing and os.path.exists(eval_path)):
            source = ["--eval-only", best] if again else ["--backbone", backbone]
            cmd = [sys.executable, "-m", "ponder_pt", "finetune", *source,
                   "--task", task, "--exit", strategy, "--out", run_dir, "--nproc", str(nproc)]
            for item in [*overrides, *(per_strategy or {}).get(strategy, [])]:
                cmd += ["--set", item]
            print(f"[early-exit] {strategy}: {' '.join(cmd[2:])}", flush=True)
            env = dict(os.environ)
            env.pop("WORLD_SIZE", None)
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"finetune --exit {strategy} failed ({proc.returncode}):\n"
                                   f"{proc.stdout[-4000:]}")
        with open(eval_path, encoding="utf-8") as fh:
            results[strategy] = json.load(fh)
    return results


def rows_of(results: dict) -> list[dict]:
    """One row per (strategy, threshold): the default-threshold point first, then the sweep."""
    rows = []
    for strategy, doc in results.items():
        metric = doc["metric_name"]
        rows.append({"strategy": strategy, "threshold": "default", "metric": doc["metric"],
                     "avg_exit_layer": doc["avg_exit_layer"], "num_layers": doc["num_layers"],
                     "wall_speedup": doc["wall_speedup"],
                     "wall_speedup_bs1": doc.get("batch_size_1", {}).get("wall_speedup"),
                     "full_metric": doc["full_model"]["metrics"][metric]})
        for s in doc["sweep"]:
            rows.append({"strategy": strategy, "threshold": s["threshold"],
                         "metric": s["metrics"][metric], "avg_exit_layer": s["avg_exit_layer"],
                         "num_layers": doc["num_layers"], "wall_speedup": s["wall_speedup"],
                         "wall_speedup_bs1": None,
                         "full_metric": doc["full_model"]["metrics"][metric]})
    return rows


def _fmt(value, digits=3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(results: dict) -> str:
    any_doc = next(iter(results.values()))
    metric = any_doc["metric_name"]
    lines = [f"task `{any_doc['task']}`, {any_doc['num_layers']} layers, "
             f"{any_doc['num_samples']} validation samples, metric {metric}; speed-ups are "
             f"wall-clock against the same model run through all layers",
             "",
             "| strategy | threshold | " + metric + " | full-model " + metric +
             " | avg exit layer | layer speed-up | wall speed-up (batched) | wall speed-up (bs 1) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    names = {"palbert": "q", "pondernet": "q", "pabee": "patience", "entropy": "S"}
    for r in rows_of(results):
        th = r["threshold"]
        if th == "default":
            ex = results[r["strategy"]].get("exit", {})
            value = {"palbert": ex.get("q"), "pabee": ex.get("patience"),
                     "entropy": ex.get("entropy")}.get(r["strategy"])
            th = "default" + (f" ({names[r['strategy']]}={value})" if value is not None else "")
            if r["strategy"] == "pondernet":
                th = "sampled exit"
        else:
            th = f"{names.get(r['strategy'], 'threshold')}={_fmt(th, 2)}"
        lines.append(f"| {r['strategy']} | {th} | {_fmt(r['metric'])} | {_fmt(r['full_metric'])}"
                     f" | {_fmt(r['avg_exit_layer'], 2)} / {r['num_layers']} | "
                     f"{_fmt(r['num_layers'] / r['avg_exit_layer'], 2)}x | "
                     f"{_fmt(r['wall_speedup'], 2)}x | "
                     f"{_fmt(r['wall_speedup_bs1'], 2) + 'x' if r['wall_speedup_bs1'] else '–'} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    metric = next(iter(results.values()))["metric_name"]
    for strategy, doc in results.items():
        pts = [(s["avg_exit_layer"], s["wall_speedup"], s["metrics"][metric])
               for s in doc["sweep"]]
        pts.append((doc["avg_exit_layer"], doc["wall_speedup"], doc["metric"]))
        style = "*" if not doc["sweep"] else "o-"
        by_layer, by_speed = sorted(pts), sorted(pts, key=lambda p: p[1])
        ax1.plot([p[0] for p in by_layer], [p[2] for p in by_layer], style, label=strategy, ms=6)
        ax2.plot([p[1] for p in by_speed], [p[2] for p in by_speed], style, label=strategy, ms=6)
    ax1.set_xlabel("average exit layer")
    ax2.set_xlabel("wall-clock speed-up vs full model (batched)")
    for ax in (ax1, ax2):
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    ax1.legend()
    fig.suptitle("early exit: metric vs compute, one trained model per strategy, "
                 "thresholds swept")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out_dir: str, title: str = "Early exit") -> dict:
    os.makedirs(out_dir, exist_ok=True)
    table = markdown(results)
    with open(os.path.join(out_dir, "early_exit.md"), "w", encoding="utf-8") as fh:
        fh.write(f"# {title}\n\n{table}")
    with open(os.path.join(out_dir, "early_exit.json"), "w", encoding="utf-8") as fh:
        json.dump(rows_of(results), fh, indent=1)
    plot(results, os.path.join(out_dir, "early_exit.png"))
    return {"table": table, "figure": os.path.join(out_dir, "early_exit.png")}
