#!/usr/bin/env python
"""Data-pipeline throughput, side by side in one run on this machine.

1. Tokenization: `data prepare` with 1 and 2 workers vs a plain single-process loop over the
   same tokenizer (json.loads + encode per line, no output) on the same corpus.
2. Loader: samples/s of the training dataset (megatron-core packing + our labels/masks) with
   and without pause insertion.

  python benchmarks/bench_data.py [--mb 8] [--seq-len 2048] [--samples 3000]
Prints the markdown tables of benchmarks/README.md and writes them with the measurements to
benchmarks/results/cpu/bench_data.json (`--record`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per process, for fairness

from cpu_record import add_record_arg, draft, environment, write_record  # noqa: E402
from ponder_pt.data.corpus import stdlib_docstrings  # noqa: E402
from ponder_pt.data.prepare import prepare  # noqa: E402
from ponder_pt.data.samples import build_datasets  # noqa: E402
from ponder_pt.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402


def make_corpus(path: str, mb: float) -> int:
    docs = [r["text"] for r in stdlib_docstrings(min_chars=50)]
    written = n = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < mb * 1e6:
            for text in docs:
                fh.write(json.dumps({"text": text}) + "\n")
                written += len(text)
                n += 1
    return n


def plain_loop(path: str, tok_dir: str) -> float:
    tok = load_tokenizer(tok_dir)
    start, tokens = time.perf_counter(), 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            tokens += len(tok.encode(json.loads(line)["text"])) + 1
    return tokens / (time.perf_counter() - start)


def loader_rate(prefix: str, cache: str, seq_len: int, samples: int, rate: float) -> float:
    ds, _, _ = build_datasets([(prefix, 1.0)], seq_len=seq_len, seed=1, num_samples=(samples, 0, 0),
                              eod_id=0, vocab_size=8192, split="1,0,0", pause_id=8192,
                              pause_rate=rate, cache_dir=cache)
    ds[0]
    start = time.perf_counter()
    for i in range(samples):
        ds[i]
    return samples / (time.perf_counter() - start)


def render_table(doc: dict) -> str:
    """The table of a record (cpu_record.draft / the saved json) from its measurements."""
    args, m, mach = doc["args"], doc["measurements"], doc["machine"]
    rows = list(m["tokenization_tokens_per_s"].items())
    plain = rows[0][1]
    loader = list(m["loader_samples_per_s"].items())
    no_pause = loader[0][1]
    lines = [f"machine: {mach['processor'] or mach['arch']}, {mach['cpus']} cores; "
             f"corpus {args['mb']:g} MB, {m['documents']} documents, BPE vocab 8192", "",
             "| tokenization | tokens/s | vs plain loop |", "|---|---:|---:|"]
    lines += [f"| {name} | {value:,.0f} | {value / plain:.2f}x |" for name, value in rows]
    lines += ["", f"| loader (seq_len {args['seq_len']}) | samples/s | tokens/s | vs no pauses |",
              "|---|---:|---:|---:|"]
    lines += [f"| {name} | {value:,.0f} | {value * args['seq_len']:,.0f} | "
              f"{value / no_pause:.2f}x |" for name, value in loader]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=8.0, help="corpus size in MB of text")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=3000)
    add_record_arg(ap, "bench_data")
    args = ap.parse_args()
    started = environment()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        docs = make_corpus(corpus, args.mb)
        tok_dir = os.path.join(tmp, "tok")
        train_tokenizer([corpus], 8192, tok_dir, show_progress=False)
        plain = plain_loop(corpus, tok_dir)
        rows = [("plain loop (json.loads + encode), 1 process", plain)]
        for workers in (1, 2):
            stats = prepare([corpus], tok_dir, os.path.join(tmp, f"w{workers}"), workers=workers,
                            progress=False)
            rows.append((f"`data prepare --workers {workers}` (writes .bin/.idx)", stats.tokens_per_s))
        prefix = os.path.join(tmp, "w1")
        no_pause = loader_rate(prefix, os.path.join(tmp, "c0"), args.seq_len, args.samples, 0.0)
        paused = loader_rate(prefix, os.path.join(tmp, "c1"), args.seq_len, args.samples, 0.1)

    measured = {"documents": docs, "tokenization_tokens_per_s": dict(rows),
                "loader_samples_per_s": {"no pauses": no_pause, "pause.rate 0.1": paused}}
    table = render_table(draft(args, measured))
    print(table)
    write_record(args.record, "bench_data.py", args, measured, table, started)

if __name__ == "__main__":
    main()
