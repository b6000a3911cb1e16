"""`bench_generate.py --speculative`: speculative decoding over the pondering passes against
ordinary fixed-K decoding of the same trained checkpoints, and against a plain model.

Each checkpoint decodes the same prompts (the first --prompt tokens of documents from
--corpus, e.g. the study's held-out jsonl) greedily for --lengths[0] new tokens, batch 1, on
the eager decoder: ordinary fixed-K decoding, then speculative decoding for every d in 1..K
and every n in --draft-tokens. Timings are the least of --repeats interleaved rounds over all
prompts; every speculative run must give the ordinary run's tokens ("same tokens"), and the
acceptance rate and tokens per verify step come from `SpeculativeStats`. An adaptive
checkpoint decodes at q = 1 (every pass: fixed K) both ways. Each model's held-out loss
(--loss-docs documents of --corpus, 128 tokens each) says what a draft loss costs the final
pass.

    .venv/bin/python benchmarks/bench_generate.py --speculative \\
        --checkpoint k3=RUNS/ponder_k3/ckpt --checkpoint k3_draft=RUNS/ponder_k3_draft/ckpt \\
        --checkpoint adaptive=RUNS/adaptive_palbert_dense/ckpt --plain RUNS/plain/ckpt \\
        --corpus DATA/heldout.jsonl --lengths 64
"""

from __future__ import annotations

import json
import time

import torch


def leading_tokens(corpus: str, tokenizer, count: int, length: int, shortest: int) -> list:
    """The first `length` token ids of the first `count` documents with at least `shortest`
    tokens (fewer where the corpus has fewer)."""
    out = []
    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            ids = tokenizer.encode(json.loads(line)["text"])
            if len(ids) >= shortest:
                out.append(ids[:length])
            if len(out) == count:
                break
    return out


def prompts_from(corpus: str, tokenizer, count: int, length: int) -> list:
    """The first `length` token ids of the first `count` documents that have that many."""
    out = leading_tokens(corpus, tokenizer, count, length, shortest=length)
    if len(out) < count:
        raise ValueError(f"{corpus}: fewer than {count} documents of {length} tokens")
    return out


@torch.no_grad()
def heldout_loss(lm, docs: list) -> float:
    """Token-weighted next-token CE of the fixed-K model (q = 1 for an adaptive one) over
    `docs`: what the draft loss may cost the final pass."""
    total, count = 0.0, 0
    for ids in docs:
        x = torch.tensor([ids])
        z = (lm.model(x, gather_logits=True, halt_q=1.0) if lm.adaptive
             else lm.model(x, gather_logits=True)).float()[0, :-1, :lm.vocab_rows]
        total += float(torch.nn.functional.cross_entropy(z, x[0, 1:], reduction="sum"))
        count += len(ids) - 1
    return total / count


def _ordinary(model, prompts, n, halt_q):
    from ponder_pt.inference.model import generate_cached

    t = time.perf_counter()
    out = [generate_cached(model, p, n, cuda_graph=False, halt_q=halt_q) for p in prompts]
    return out, time.perf_counter() - t


def _speculative(model, prompts, n, d, k, halt_q):
    from ponder_pt.inference.speculative import SpeculativeStats, generate_speculative_batch

    stats = SpeculativeStats()
    t = time.perf_counter()
    out = [generate_speculative_batch(model, [p], n, d, k, halt_q=halt_q, stats=stats)[0]
           for p in prompts]
    return out, time.perf_counter() - t, stats.as_dict()


def speculative_table(args) -> list:
    """The measurements: one row per (checkpoint, decoding)."""
    from ponder_pt.inference.model import load_model

    torch.manual_seed(0)
    models = {name: load_model(path, device="cpu") for name, path in args.checkpoint}
    plain = load_model(args.plain, device="cpu") if args.plain else None
    tok = next(iter(models.values())).tok
    prompts = prompts_from(args.corpus, tok, args.prompts, args.prompt)
    n = args.lengths[0]
    configs = {}
    for name, lm in models.items():
        K = lm.ponder_steps
        configs[name] = [(d, k) for d in range(1, K + 1) for k in args.draft_tokens]
    best: dict = {}
    rows: dict = {}
    for lm in [*models.values(), *([plain] if plain else [])]:  # warm-up: lazy inits
        q = 1.0 if lm.adaptive else None
        _ordinary(lm.model, prompts[:1], 8, q)
        if lm is not plain:
            _speculative(lm.model, prompts[:1], 8, 1, 2, q)
    for repeat in range(args.repeats):
        if plain is not None:
            out, t = _ordinary(plain.model, prompts, n, None)
            best["plain"] = min(best.get("plain", float("inf")), t)
        for name, lm in models.items():
            q = 1.0 if lm.adaptive else None
            out, t = _ordinary(lm.model, prompts, n, q)
            best[(name, 0, 0)] = min(best.get((name, 0, 0), float("inf")), t)
            for d, k in configs[name]:
                got, t, stats = _speculative(lm.model, prompts, n, d, k, q)
                best[(name, d, k)] = min(best.get((name, d, k), float("inf")), t)
                rows[(name, d, k)] = {"same_tokens": got == out, **stats}
            print(f"repeat {repeat + 1}/{args.repeats}: {name} done", flush=True)
    total = n * len(prompts)
    docs = leading_tokens(args.corpus, tok, args.loss_docs, 128, shortest=2)
    measured = []
    if plain is not None:
        measured.append({"model": "plain", "decoding": "ordinary", "K": 0,
                         "s_per_token": best["plain"] / total,
                         "heldout_loss": heldout_loss(plain, docs)})
    for name, lm in models.items():
        measured.append({"model": name, "decoding": "ordinary", "K": lm.ponder_steps,
                         "adaptive": lm.adaptive, "s_per_token": best[(name, 0, 0)] / total,
                         "heldout_loss": heldout_loss(lm, docs)})
        for d, k in configs[name]:
            measured.append({"model": name, "decoding": "speculative", "K": lm.ponder_steps,
                             "d": d, "n": k, "s_per_token": best[(name, d, k)] / total,
                             **rows[(name, d, k)]})
    return measured


def speculative_rows(rows: list) -> list:
    """The markdown table of the measurements."""
    plain = next((r["s_per_token"] for r in rows if r["model"] == "plain"), None)
    ordinary = {r["model"]: r["s_per_token"] for r in rows if r["decoding"] == "ordinary"}
    lines = ["| model | held-out loss | decoding | d | n | ms/token | speed-up vs fixed K "
             "| vs plain | acceptance | tokens per verify | same tokens |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    losses = {r["model"]: r["heldout_loss"] for r in rows if "heldout_loss" in r}
    for r in rows:
        ms = 1e3 * r["s_per_token"]
        vs_plain = f"{r['s_per_token'] / plain:.2f}x" if plain else "-"
        if r["decoding"] == "ordinary":
            what = "plain" if r["model"] == "plain" else f"fixed K={r['K']}"
            lines.append(f"| {r['model']} | {losses[r['model']]:.4f} | {what} | - | - | "
                         f"{ms:.2f} | "
                         f"{'-' if r['model'] == 'plain' else '1.00x'} | {vs_plain} | - | - | - |")
            continue
        speed = ordinary[r["model"]] / r["s_per_token"]
        lines.append(f"| {r['model']} | | speculative | {r['d']} | {r['n']} | {ms:.2f} | "
                     f"{speed:.2f}x | {vs_plain} | {r['acceptance_rate']:.1%} | "
                     f"{r['tokens_per_verify']:.2f} | {'yes' if r['same_tokens'] else 'NO'} |")
    return lines
