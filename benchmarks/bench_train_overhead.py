#!/usr/bin/env python
"""Framework overhead on CPU: `ponder-pt`'s training step (DeepSpeed engine, megatron-core
layers, our data pipeline, metrics, LR schedule) vs a plain PyTorch loop (torch AdamW, same
model, same batch size, gradient clipping) in one process, side by side in one run.

  python benchmarks/bench_train_overhead.py [--steps 30] [--ponder 0] [--hidden 256]

Prints a markdown row per setting with the median step times and their ratio (target <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def plain_loop(cfg, steps: int) -> float:
    """Median step time of a bare PyTorch loop over the same model and batch shape."""
    import torch

    from ponder_pt.models import build_model

    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.01,
                            betas=(0.9, 0.95))
    tr, seq = cfg.train, cfg.data.seq_len
    ga = tr.global_batch // tr.micro_batch
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(ga):
            tokens = torch.randint(0, cfg.model.vocab_size - 128, (tr.micro_batch, seq + 1), generator=g)
            loss = model(tokens[:, :-1], labels=tokens[:, 1:]) / ga
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:])


def ours(cfg, tok) -> float:
    from ponder_pt.engine import distributed as D
    from ponder_pt.engine.metrics import read_metrics
    from ponder_pt.engine.trainer import Trainer

    world = D.init(1, 1)
    Trainer(cfg, tok, world, log=lambda *a, **k: None).train()
    rows = [r for r in read_metrics(os.path.join(cfg.log.dir, "metrics.jsonl")) if "loss" in r]
    return statistics.median(r["step_time"] for r in rows[3:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ponder", type=int, nargs="+", default=[0, 3])
    args = ap.parse_args()

    import torch

    from ponder_pt.data.corpus import write_corpus
    from ponder_pt.data.prepare import prepare
    from ponder_pt.models import init_single_process
    from ponder_pt.tokenizer import train_tokenizer
    from ponder_pt.train import resolve

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "c.jsonl")
        write_corpus(corpus, max_bytes=1_500_000)
        train_tokenizer([corpus], 4096, os.path.join(tmp, "tok"), show_progress=False)
        prepare([corpus], os.path.join(tmp, "tok"), os.path.join(tmp, "d"), progress=False)
        for k in args.ponder:
            overrides = [
                f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
                "model.num_heads=4", f"model.ffn_hidden_size={4 * args.hidden}",
                f"data.seq_len={args.seq_len}", "data.num_workers=0",
                f"data.train=[{os.path.join(tmp, 'd')}]", f"data.tokenizer={os.path.join(tmp, 'tok')}",
                f"ponder.steps={k}", "pause.rate=0", "train.global_batch=8", "train.micro_batch=4",
                f"train.iters={args.steps}", "train.warmup=1", "train.eval_iters=0",
                "train.precision=fp32", "parallel.zero_stage=0", f"log.dir={tmp}/run{k}",
            ]
            cfg, tok = resolve("demo", overrides, 1)
            t_ours = ours(cfg, tok)
            init_single_process()
            t_plain = plain_loop(cfg, args.steps)
            rows.append((k, t_plain, t_ours))
    print(f"CPU, {os.cpu_count()} cores, fp32; model {args.layers} layers x {args.hidden} hidden, "
          f"seq {args.seq_len}, global batch 8 (2 x micro 4)\n")
    print("| pondering K | plain PyTorch step (s) | ponder-pt step (s) | ratio |\n|---|---:|---:|---:|")
    for k, plain, our in rows:
        print(f"| {k} | {plain:.3f} | {our:.3f} | {our / plain:.2f} |")
    print(json.dumps([{"ponder": k, "plain_s": p, "ponder_pt_s": o} for k, p, o in rows]))


if __name__ == "__main__":
    main()
