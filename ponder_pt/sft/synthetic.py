"""Synthetic tasks where serial computation per answer should matter (`ponder-pt sft-task`).

    ponder-pt sft-task addition  --level 2 --out tasks/add2      # "347+589=" -> "936"
    ponder-pt sft-task variables --level 2 --out tasks/var2      # "a=3; b=a+4; c=b*2; c=?" -> "14"
    ponder-pt sft-task sort      --level 1 --out tasks/sort1     # "sort 5 2 9 =" -> "2 5 9"

Levels 1..5: addition adds two (level+1)-digit numbers; variables resolves a chain of level+1
assignments (+, -, *2) with level//2 distractor variables interleaved; sort orders level+2
numbers (0-9 up to level 2, then 0-99). Each writes a task directory (train/validation/
test.jsonl of {"prompt", "answer"} and task.json with the metric: numeric_match for addition
and variables, exact_match for sort) that `ponder-pt sft --task DIR` reads. Output is a pure
function of (kind, level, sizes, seed); validation and test prompts never occur in train.
"""

from __future__ import annotations

import json
import os
import random
import string

KINDS = ("addition", "variables", "sort")
METRIC = {"addition": "numeric_match", "variables": "numeric_match", "sort": "exact_match"}


def _addition(rng: random.Random, level: int) -> tuple[str, str]:
    digits = level + 1
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return f"{a}+{b}=", str(a + b)


def _variables(rng: random.Random, level: int) -> tuple[str, str]:
    hops, distractors = level + 1, level // 2
    names = rng.sample(string.ascii_lowercase, hops + distractors)
    chain, others = names[:hops], names[hops:]
    value = rng.randint(1, 9)
    statements = [f"{chain[0]}={value}"]
    for prev, name in zip(chain, chain[1:]):
        op = rng.choice(["+", "-", "*"] if abs(value) < 50 else ["+", "-"])
        k = 2 if op == "*" else rng.randint(1, 9)
        value = value + k if op == "+" else value - k if op == "-" else value * k
        statements.append(f"{name}={prev}{op}{k}")
    for name in others:  # distractors: defined from a chain variable, never asked for
        at = rng.randint(1, len(statements))
        defined = [s.split("=")[0] for s in statements[:at]]
        src = rng.choice([c for c in chain if c in defined])
        statements.insert(at, f"{name}={src}+{rng.randint(1, 9)}")
    return "; ".join(statements) + f"; {chain[-1]}=?", str(value)


def _sort(rng: random.Random, level: int) -> tuple[str, str]:
    n, top = level + 2, 9 if level <= 2 else 99
    items = [rng.randint(0, top) for _ in range(n)]
    return "sort " + " ".join(map(str, items)) + " =", " ".join(map(str, sorted(items)))


_MAKERS = {"addition": _addition, "variables": _variables, "sort": _sort}


def make_rows(kind: str, level: int, n: int, seed: int, split: str,
              exclude: frozenset = frozenset()) -> list[dict]:
    """n rows of one split, deterministic in (kind, level, seed, split); prompts in `exclude`
    are skipped (bounded tries: small levels may yield fewer distinct rows)."""
    if kind not in _MAKERS:
        raise ValueError(f"unknown synthetic task {kind!r}; one of {', '.join(KINDS)}")
    if not 1 <= level <= 5:
        raise ValueError(f"--level {level}: must be 1..5")
    rng = random.Random(f"{kind}:{level}:{seed}:{split}")
    rows, tries = [], 0
    while len(rows) < n and tries < 50 * n:
        tries += 1
        prompt, answer = _MAKERS[kind](rng, level)
        if prompt in exclude:
            continue
        rows.append({"prompt": prompt, "answer": answer})
    return rows


def write_task(kind: str, level: int, out: str, sizes: dict, seed: int = 0) -> dict:
    """Write OUT/{train,validation,test}.jsonl and OUT/task.json; returns rows per split."""
    os.makedirs(out, exist_ok=True)
    held: set = set()
    splits = {}
    for split in ("test", "validation", "train"):  # held-out prompts first, then train
        rows = make_rows(kind, level, sizes[split], seed, split,
                         frozenset(held) if split == "train" else frozenset())
        held.update(r["prompt"] for r in rows)
        splits[split] = rows
    for split, rows in splits.items():
        with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    meta = {"name": f"{kind}{level}", "metric": METRIC[kind], "generator": "ponder-pt sft-task",
            "kind": kind, "level": level, "seed": seed}
    with open(os.path.join(out, "task.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
    return {s: len(r) for s, r in splits.items()}


def cmd_sft_task(args) -> int:
    counts = write_task(args.kind, args.level, args.out,
                        {"train": args.train, "validation": args.validation, "test": args.test},
                        seed=args.seed)
    print(f"wrote {args.out}: {args.kind} level {args.level}, "
          + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0
