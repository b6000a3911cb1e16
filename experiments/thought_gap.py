"""Latent thoughts: a checkpoint's validation loss under training's Jacobi iterations and
computed exactly, on the same windows.

Training computes the thoughts with n Jacobi iterations (exact only for the first ~n
positions); decoding computes them slot after slot (exact). The gap between the two losses
says how far training's approximation is from what the model does at inference:

    python -m experiments.thought_gap --model runs/thoughts [--iters 0 1 2 3 4] \\
        [--windows 32] [--out gap.json]

It reads the run's own validation split (`data.*` of its run_config.yaml, as the trainer
builds it; `--valid PREFIX` names another prepared dataset, e.g. held-out text) and scores
the same `--windows` windows every way: Jacobi at each of `--iters` (cache-free, training's
forward in eval mode) and exact (through a KV cache, one slot after another). Prints a
table; `--out` writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def window_batches(cfg, tok, windows: int, batch: int):
    """The first `windows` samples of the run's validation split, `batch` at a time."""
    from ponder_pt.data.samples import datasets_for_config

    _, valid, _ = datasets_for_config(cfg, tok, (1, windows, 1))
    if valid is None or len(valid) < windows:
        raise ValueError(f"the run's validation split has {0 if valid is None else len(valid)} "
                         f"samples; --windows {windows} asks for more")
    for start in range(0, windows, batch):
        items = [valid[i] for i in range(start, min(windows, start + batch))]
        yield {k: torch.stack([it[k] for it in items]) for k in items[0]}


@torch.no_grad()
def gap(model_dir: str, iters: list[int], windows: int = 32, batch: int = 8,
        device: str = "cpu", valid: str | None = None) -> dict:
    """{"rows": [{"mode", "iters", "loss", "seconds"}], "tokens", ...} for a checkpoint
    (valid: a prepared dataset prefix scored instead of the run's validation split)."""
    from ponder_pt.inference.model import NativeModel

    lm = NativeModel(model_dir, device=device)
    model, cfg = lm.model, lm.cfg
    if valid:
        cfg.data.valid, cfg.data.cache_dir = [valid], None
    if not model.thoughts_cfg.count:
        raise ValueError(f"{model_dir} has no latent thoughts (thoughts.count = 0)")
    batches = [{k: v.to(lm.device) for k, v in b.items()}
               for b in window_batches(cfg, lm.tok, windows, batch)]
    tokens = sum(float(b["loss_mask"].sum()) for b in batches)

    def score(**kw) -> tuple[float, float]:
        t, total = time.perf_counter(), 0.0
        for b in batches:
            caches = model.new_caches() if kw.get("exact") else None
            loss = model(b["tokens"], b["position_ids"], b["labels"], b["loss_mask"],
                         caches=caches, thought_iters=kw.get("iters"))
            total += float(loss) * float(b["loss_mask"].sum())
        return total / tokens, time.perf_counter() - t

    rows = []
    for n in iters:
        loss, secs = score(iters=n)
        rows.append({"mode": "jacobi", "iters": n, "loss": loss, "seconds": secs})
    loss, secs = score(exact=True)
    rows.append({"mode": "exact", "iters": None, "loss": loss, "seconds": secs})
    return {"model": model_dir, "thoughts": model.thoughts_cfg.count,
            "train_iters": list(model.thoughts_cfg.train_iters), "windows": windows,
            "seq_len": cfg.data.seq_len, "valid": cfg.data.valid or "the run's split",
            "tokens": tokens, "rows": rows}


def table(res: dict) -> str:
    exact = next(r["loss"] for r in res["rows"] if r["mode"] == "exact")
    lines = [f"M = {res['thoughts']}, trained with n from {res['train_iters']}; "
             f"{res['windows']} validation windows of {res['seq_len']} tokens",
             "", "| thoughts computed by | loss | minus exact | seconds |", "|---|---:|---:|---:|"]
    for r in res["rows"]:
        what = f"Jacobi, n = {r['iters']}" if r["mode"] == "jacobi" else "exactly (decoding)"
        lines.append(f"| {what} | {r['loss']:.4f} | {r['loss'] - exact:+.4f} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a latent-thoughts run or checkpoint.dir")
    ap.add_argument("--iters", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                    help="Jacobi iterations to score")
    ap.add_argument("--windows", type=int, default=32, help="validation windows scored")
    ap.add_argument("--valid", metavar="PREFIX",
                    help="score this prepared dataset instead of the run's validation split")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write the numbers here (JSON)")
    args = ap.parse_args(argv)
    res = gap(args.model, args.iters, args.windows, args.batch, args.device, args.valid)
    print(table(res))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
