#!/usr/bin/env python
"""Framework overhead on CPU: `ponder-pt`'s training step (DeepSpeed engine, megatron-core
layers, our data pipeline, metrics, LR schedule) vs a plain PyTorch loop (torch AdamW, same
model, same batch size, gradient clipping) in one process, side by side in one run.

  python benchmarks/bench_train_overhead.py [--steps 30] [--ponder 0] [--hidden 256]

Prints a markdown row per setting with the median step times and their ratio (target <= 1.10),
and writes them with the machine, versions and arguments to
benchmarks/results/cpu/bench_train_overhead.json (`--record`; with --compile
bench_train_overhead_compile.json).

  python benchmarks/bench_train_overhead.py --compile [--ponder 0 3]

instead times ponder-pt's training step eager vs `train.compile=true` (torch.compile per
block, Inductor) side by side, alternated `--rounds` times: the fastest median step time of
each (the first 3 steps, which compile, left out), their ratio compiled / eager, and the first
compiled step of the first K (compile time; later Ks reuse the same block graphs; Inductor's
cache goes under the run's temporary folder unless TORCHINDUCTOR_CACHE_DIR is set, but other
on-disk caches can still shorten a rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from cpu_record import add_record_arg, default_path, draft, environment, write_record

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


def ours(cfg, tok, first: bool = False):
    from ponder_pt.engine import distributed as D
    from ponder_pt.engine.metrics import read_metrics
    from ponder_pt.engine.trainer import Trainer

    world = D.init(1, 1)
    Trainer(cfg, tok, world, log=lambda *a, **k: None).train()
    rows = [r for r in read_metrics(os.path.join(cfg.log.dir, "metrics.jsonl")) if "loss" in r]
    median = statistics.median(r["step_time"] for r in rows[3:])
    return (median, rows[0]["step_time"]) if first else median


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ponder", type=int, nargs="+", default=[0, 3])
    ap.add_argument("--compile", action="store_true",
                    help="time eager vs train.compile=true instead of plain PyTorch vs ours")
    ap.add_argument("--checkpointing", default="none", choices=["none", "full", "selective"])
    ap.add_argument("--rounds", type=int, default=2,
                    help="--compile: eager/compiled runs alternated this many times; the "
                         "fastest median of each is reported (robust to other load)")
    add_record_arg(ap, "bench_train_overhead")
    args = ap.parse_args()
    if args.compile and args.record == default_path("bench_train_overhead"):
        args.record = default_path("bench_train_overhead_compile")
    started = environment()

    import torch

    from ponder_pt.data.corpus import write_corpus
    from ponder_pt.data.prepare import prepare
    from ponder_pt.models import init_single_process
    from ponder_pt.tokenizer import train_tokenizer
    from ponder_pt.train import resolve

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tmp, "inductor"))
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
                f"model.activation_checkpointing={args.checkpointing}",
            ]
            cfg, tok = resolve("demo", overrides, 1)
            if args.compile:
                eager, comp, first = [], [], []
                for r in range(args.rounds):
                    cfg, tok = resolve("demo", overrides[:-2] + [
                        f"log.dir={tmp}/run{k}e{r}", overrides[-1]], 1)
                    eager.append(ours(cfg, tok))
                    cfg, tok = resolve("demo", overrides[:-2] + [
                        f"log.dir={tmp}/run{k}c{r}", overrides[-1], "train.compile=true"], 1)
                    median, first_step = ours(cfg, tok, first=True)
                    comp.append(median)
                    first.append(first_step)
                rows.append((k, min(eager), min(comp), first[0]))
                continue
            t_ours = ours(cfg, tok)
            init_single_process()
            t_plain = plain_loop(cfg, args.steps)
            rows.append((k, t_plain, t_ours))
    if args.compile:
        measured = [{"ponder": k, "eager_s": e, "compiled_s": c, "compiled_first_step_s": f}
                    for k, e, c, f in rows]
    else:
        measured = [{"ponder": k, "plain_s": p, "ponder_pt_s": o} for k, p, o in rows]
    table = render_table(draft(args, measured))
    print(table)
    print(json.dumps(measured))
    write_record(args.record, "bench_train_overhead.py", args, measured, table, started)


def render_table(doc: dict) -> str:
    """The table of a record (cpu_record.draft / the saved json) from its measurements."""
    args, rows = doc["args"], doc["measurements"]
    lines = [f"CPU, {doc['machine']['cpus']} cores, fp32; model {args['layers']} layers x "
             f"{args['hidden']} hidden, seq {args['seq_len']}, global batch 8 (2 x micro 4), "
             f"activation checkpointing {args['checkpointing']}; torch "
             f"{doc['versions']['torch']}", ""]
    if args["compile"]:
        lines += ["| pondering K | eager step (s) | compiled step (s) | compiled / eager | "
                  "compiled first step (s) |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['ponder']} | {r['eager_s']:.3f} | {r['compiled_s']:.3f} | "
                  f"{r['compiled_s'] / r['eager_s']:.2f} | {r['compiled_first_step_s']:.1f} |"
                  for r in rows]
    else:
        lines += ["| pondering K | plain PyTorch step (s) | ponder-pt step (s) | ratio |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['ponder']} | {r['plain_s']:.3f} | {r['ponder_pt_s']:.3f} | "
                  f"{r['ponder_pt_s'] / r['plain_s']:.2f} |" for r in rows]
    return "\n".join(lines)

if __name__ == "__main__":
    main()
