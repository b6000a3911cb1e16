"""Early-exit evaluation: per-sample records, the task metric, layers used, wall-clock
speed-up against the full model (batched and batch-size-1), and threshold sweeps."""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import torch

from .exits import ExitRule, default_sweep, make_rule, predict
from .heads import ExitModel
from .tasks import Encoded, TaskSpec, compute_metrics


def batches(data: Encoded, batch_size: int) -> list[dict]:
    """Collated batches in dataset order (built once, outside the timed region)."""
    return [data.collate([data[j] for j in range(i, min(i + batch_size, len(data)))])
            for i in range(0, len(data), batch_size)]


def _device(model: ExitModel) -> torch.device:
    return next(model.parameters()).device


def run_exit(model: ExitModel, data: Encoded, make: Callable[[], ExitRule], batch_size: int,
             drop_exited: bool = True, prepared: Optional[list] = None) -> dict:
    """Predictions and exit layers for every sample, and the wall time of the model calls."""
    model.eval()
    device = _device(model)
    prepared = prepared if prepared is not None else batches(data, batch_size)
    preds, layers, seconds = [], [], 0.0
    for batch in prepared:
        tt = batch.get("token_type_ids")
        start = time.perf_counter()
        out = predict(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                      make(), sample_ids=batch["sample_ids"],
                      token_type_ids=tt.to(device) if tt is not None else None,
                      drop_exited=drop_exited)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        preds.append(out.predictions)
        layers.append(out.exit_layers)
    return {"predictions": torch.cat(preds), "exit_layers": torch.cat(layers),
            "seconds": seconds}


def summarize(spec: TaskSpec, data: Encoded, out: dict, num_layers: int) -> dict:
    """Metric, average exit layer and the per-layer histogram, all from the records."""
    records = records_of(data, out)
    preds = [r["prediction"] for r in records]
    labels = [r["label"] for r in records]
    hist = [0] * num_layers
    for r in records:
        hist[r["exit_layer"] - 1] += 1
    avg = sum(r["exit_layer"] for r in records) / len(records)
    return {"metrics": compute_metrics(spec, preds, labels), "avg_exit_layer": avg,
            "layer_speedup": num_layers / avg, "exit_histogram": hist,
            "seconds": out["seconds"], "records": records}


def records_of(data: Encoded, out: dict) -> list[dict]:
    preds, layers = out["predictions"].tolist(), out["exit_layers"].tolist()
    return [{"idx": row["idx"], "label": row["label"], "prediction": p, "exit_layer": l}
            for row, p, l in zip(data.rows, preds, layers)]


def timed(model: ExitModel, data: Encoded, make: Callable[[], ExitRule], batch_size: int,
          repeats: int) -> dict:
    """One untimed pass, then `repeats` timed ones; the fastest is kept. The untimed pass
    matters: dropping exited samples creates batch shapes (rows, trimmed width) that the
    kernels meet for the first time, and first calls on a new shape are several times slower."""
    prepared = batches(data, batch_size)
    best = run_exit(model, data, make, batch_size, prepared=prepared)
    best["seconds"] = float("inf")
    for _ in range(max(1, repeats)):
        out = run_exit(model, data, make, batch_size, prepared=prepared)
        if best is None or out["seconds"] < best["seconds"]:
            best = out
    return best


def evaluate_model(model: ExitModel, spec: TaskSpec, data: Encoded, *, batch_size: int,
                   thresholds: Optional[list] = None, repeats: int = 1,
                   batch1: bool = True) -> dict:
    """Everything eval.json reports: the configured exit (batched and batch-size-1), the full
    model's time in both modes, and a sweep of the exit threshold."""
    n = model.num_layers
    full = {bs: timed(model, data, ExitRule, bs, repeats)
            for bs in ([batch_size, 1] if batch1 else [batch_size])}
    result: dict = {"strategy": model.strategy, "num_layers": n,
                    "full_model": summarize(spec, data, full[batch_size], n)}
    modes = {"batched": batch_size, **({"batch_size_1": 1} if batch1 else {})}
    for mode, bs in modes.items():
        out = timed(model, data, lambda: make_rule(model), bs, repeats)
        summary = summarize(spec, data, out, n)
        summary["batch_size"] = bs
        summary["full_seconds"] = full[bs]["seconds"]
        summary["wall_speedup"] = full[bs]["seconds"] / max(out["seconds"], 1e-9)
        result[mode] = summary
    sweep = []
    for value in (thresholds if thresholds else default_sweep(model)):
        out = timed(model, data, lambda v=value: make_rule(model, v), batch_size, repeats)
        s = summarize(spec, data, out, n)
        sweep.append({"threshold": value, "metrics": s["metrics"],
                      "avg_exit_layer": s["avg_exit_layer"],
                      "layer_speedup": s["layer_speedup"],
                      "wall_speedup": full[batch_size]["seconds"] / max(out["seconds"], 1e-9),
                      "exit_histogram": s["exit_histogram"]})
    result["sweep"] = sweep
    result["threshold_name"] = {"palbert": "q", "pondernet": "q", "pabee": "patience",
                                "entropy": "entropy"}.get(model.strategy)
    return result


def write_eval(result: dict, spec: TaskSpec, out_dir: str, extra: Optional[dict] = None) -> str:
    """eval.json (records moved to predictions.jsonl) and the metric-vs-threshold plot."""
    os.makedirs(out_dir, exist_ok=True)
    main = result["batched"]
    with open(os.path.join(out_dir, "predictions.jsonl"), "w", encoding="utf-8") as fh:
        for r in main["records"]:
            fh.write(json.dumps(r) + "\n")
    doc = {"task": spec.name, "metric_name": spec.metric,
           "metric": main["metrics"][spec.metric], "metrics": main["metrics"],
           "avg_exit_layer": main["avg_exit_layer"], "layer_speedup": main["layer_speedup"],
           "wall_speedup": main["wall_speedup"], "exit_histogram": main["exit_histogram"],
           "num_samples": len(main["records"]), "predictions_file": "predictions.jsonl",
           **{k: v for k, v in result.items() if k not in ("batched", "full_model")},
           "full_model": _without_records(result["full_model"]),
           "batched": _without_records(main), **(extra or {})}
    if "batch_size_1" in doc:
        doc["batch_size_1"] = _without_records(doc["batch_size_1"])
    path = os.path.join(out_dir, "eval.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
    if result["sweep"]:
        plot_sweep(result, spec, os.path.join(out_dir, "threshold_sweep.png"))
    return path


def _without_records(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "records"}


def plot_sweep(result: dict, spec: TaskSpec, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result["sweep"]
    xs = [s["threshold"] for s in sweep]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(xs, [s["metrics"][spec.metric] for s in sweep], "o-", label=spec.metric)
    ax1.axhline(result["full_model"]["metrics"][spec.metric], ls="--", c="gray",
                label="full model")
    ax1.set_xlabel(result.get("threshold_name") or "threshold")
    ax1.set_ylabel(spec.metric)
    ax1b = ax1.twinx()
    ax1b.plot(xs, [s["avg_exit_layer"] for s in sweep], "s:", c="tab:orange")
    ax1b.set_ylabel("average exit layer", color="tab:orange")
    ax1.legend(loc="lower right")
    ax2.plot([s["avg_exit_layer"] for s in sweep], [s["metrics"][spec.metric] for s in sweep],
             "o-")
    ax2.set_xlabel("average exit layer")
    ax2.set_ylabel(spec.metric)
    ax2.set_title(f"{result['strategy']} on {spec.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
