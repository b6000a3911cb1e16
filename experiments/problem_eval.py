"""Scoring a checkpoint on problems mixed into text (`experiments/problems.py`).

    python -m experiments.problem_eval --model RUN_OR_CKPT --data heldout_mixed.jsonl \\
        --per-cell 50 --out scores.json [--halt-q Q]

For every family and level, up to --per-cell problems:

* `exact`: the share whose answer greedy decoding reproduces token for token, decoding from
  the statement;
* `answer_loss`: the mean next-token cross-entropy over the answer's tokens (teacher forced);
* for an adaptive model, `passes`: the mean passes that the answer's and the statement's
  tokens took to be predicted, at Q-exit threshold --halt-q (the model's own q by default).

Text documents (up to --text-docs, their first 128 tokens) give `text_loss`, and their mean
passes for an adaptive model. A problem is split at the space before its answer: the prompt
is the statement and the target is " ANSWER", tokenized apart. Byte-level BPE attaches the
space to the next word, so this is how the answer's tokens look in running text.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Optional

import torch

TEXT_TOKENS = 128


def split(record: dict, encode) -> tuple[list[int], list[int]]:
    """(statement ids, answer ids) of a problem record, the answer with its leading space."""
    cut = record["answer_start"] - 1
    text = record["text"].rstrip("\n")
    return encode(text[:cut]), encode(text[cut:])


@torch.no_grad()
def token_scores(lm, ids: list[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per position i >= 1: the CE of token i given the tokens before it, and for an adaptive
    model the passes the token at i-1 took to predict it, at `lm.halt_q` (None otherwise)."""
    x = torch.tensor([ids])
    if lm.adaptive:
        logits, exits = lm.model(x.to(lm.device), gather_logits=True, halt_q=lm.halt_q,
                                 return_exits=True)
        passes = (exits[0, :-1] + 1).float().cpu()
    else:
        logits, passes = lm.logits(x), None
    z = logits[0, :-1, :lm.vocab_rows].float().cpu()
    ce = torch.nn.functional.cross_entropy(z, x[0, 1:], reduction="none")
    return ce, passes


def score(lm, records: list[dict], per_cell: int = 50, text_docs: int = 50) -> dict:
    """{"cells": {"family/level": {...}}, "text": {...}} for `lm` (an `InferenceModel`)."""
    taken: dict = defaultdict(list)
    texts = []
    for rec in records:
        if rec.get("kind") == "problem":
            key = f"{rec['family']}/{rec['level']}"
            if len(taken[key]) < per_cell:
                taken[key].append(rec)
        elif len(texts) < text_docs:
            texts.append(rec)
    if not taken:
        raise ValueError("no problem records to score")
    cells = {}
    for key, recs in sorted(taken.items()):
        exact, losses, n_tok, ans_pass, stmt_pass = 0, 0.0, 0, [], []
        for rec in recs:
            prompt, answer = split(rec, lm.encode)
            got = lm.generate(prompt, len(answer), greedy=True, stop_at_eos=False)
            exact += got == answer
            ce, passes = token_scores(lm, prompt + answer)
            losses += float(ce[len(prompt) - 1:].sum())
            n_tok += len(answer)
            if passes is not None:
                ans_pass.append(passes[len(prompt) - 1:])
                stmt_pass.append(passes[:len(prompt) - 1])
        cells[key] = {"n": len(recs), "exact": exact / len(recs),
                      "answer_loss": losses / n_tok, "answer_tokens": n_tok}
        if ans_pass:
            cells[key]["passes"] = {"answer": float(torch.cat(ans_pass).mean()),
                                    "statement": float(torch.cat(stmt_pass).mean())}
    out = {"cells": cells}
    if texts:
        ces, passes = [], []
        for rec in texts:
            ids = lm.encode(rec["text"])[:TEXT_TOKENS]
            if len(ids) >= 2:
                ce, p = token_scores(lm, ids)
                ces.append(ce)
                if p is not None:
                    passes.append(p)
        all_ce = torch.cat(ces)
        out["text"] = {"documents": len(ces), "tokens": int(all_ce.numel()),
                       "text_loss": float(all_ce.mean())}
        if passes:
            out["text"]["passes"] = float(torch.cat(passes).mean())
    return out


def read_records(path: str) -> list[dict]:
    """The records of a jsonl from experiments.problems; a bad line is an error naming it (the
    file is what is scored, not a sample of it)."""
    from ponder_pt.data.rows import read_rows

    rejected: list = []
    rows = read_rows(path, rejected)
    for number, rec in rows:
        if not isinstance(rec.get("text"), str) or (
                rec.get("kind") == "problem" and not isinstance(rec.get("answer_start"), int)):
            rejected.append({"file": path, "line": number,
                             "reason": "not a record of experiments.problems"})
    if rejected:
        first = min(rejected, key=lambda r: r["line"])
        raise ValueError(f"{first['file']}:{first['line']}: {first['reason']} "
                         f"({len(rejected)} bad line(s))")
    return [rec for _, rec in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a run directory or checkpoint.dir")
    p.add_argument("--data", required=True, help="a jsonl from experiments.problems")
    p.add_argument("--per-cell", type=int, default=50, help="problems per family and level")
    p.add_argument("--text-docs", type=int, default=50, help="text documents for text_loss")
    p.add_argument("--halt-q", type=float, default=None, help="adaptive models' Q-exit q")
    p.add_argument("--out", help="write the scores here as json")
    args = p.parse_args(argv)
    from ponder_pt.inference.model import load_model

    records = read_records(args.data)  # before the model: a bad file fails fast
    lm = load_model(args.model, device="cpu")
    lm.set_halt_q(args.halt_q)
    res = score(lm, records, args.per_cell, args.text_docs)
    text = json.dumps(res, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
