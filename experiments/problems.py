"""Problems whose answers need computation, mixed into text: the corpus of a study where
thought can pay.

    python -m experiments.problems --corpus docs.jsonl --out mixed.jsonl --share 0.5 \\
        --levels 4 --seed 0 [--tokenizer DIR]

Each problem is a statement, then an answer whose tokens need several steps of computation.
Digits and symbols are separated by spaces, so every digit is its own token whatever the
tokenizer merges. Four families, each at levels 1..L (the level sets the number of steps):

* `addition`: two numbers of `level` digits. Both are written least-significant digit first,
  and so is their sum: answer digit i needs the carry chain of digits 0..i.
* `modsum`: level + 1 numbers below p = 7, and their sum modulo p (one token that needs
  every addition).
* `chain`: a chain of level + 1 variables, each the previous one plus, minus or times a small
  number, modulo 100 (level steps). The question names the last one.
* `s5`: `level` permutations of 1..5 in one-line notation, and their composition (apply the
  first, then the next, ...): S5 state tracking. Level 1 copies its one permutation.

Level 1 is within reach of a small model (one digit, two numbers, one step, a copy); each
level adds one step.

Every output line is {"text", "kind"}. Problems add "family", "level", "answer" (the answer's
text) and "answer_start": the character offset where the answer begins. So a study can score
answer tokens apart from the statement and from text (tokenize with offsets; a token belongs
to the answer when it starts at or after `answer_start`). Text documents come from --corpus
(read like `ponder-pt data prepare` reads it; unusable lines are counted and named). Problems
are added until they hold --share of the tokens (with --tokenizer; of the characters without
it), then everything is shuffled with --seed.
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Callable, Optional

FAMILIES = ("addition", "modsum", "chain", "s5")
MODULUS = 7
OPS = ("+", "-", "*")


def _spaced(digits) -> str:
    return " ".join(str(d) for d in digits)


def addition(rng: random.Random, level: int) -> tuple[str, str]:
    n = level
    a = [rng.randrange(10) for _ in range(n)]  # least-significant digit first
    b = [rng.randrange(10) for _ in range(n)]
    total = sum(d * 10 ** i for i, d in enumerate(a)) + sum(d * 10 ** i for i, d in enumerate(b))
    out = [int(c) for c in reversed(str(total))]
    return f"add (least significant digit first): {_spaced(a)} + {_spaced(b)} =", _spaced(out)


def modsum(rng: random.Random, level: int) -> tuple[str, str]:
    xs = [rng.randrange(MODULUS) for _ in range(level + 1)]
    return f"sum mod {MODULUS}: {_spaced(xs)} =", str(sum(xs) % MODULUS)


def chain(rng: random.Random, level: int) -> tuple[str, str]:
    names = rng.sample("abcdefghijklmnopqrstuvwxyz", level + 1)
    value = rng.randrange(10)
    parts = [f"{names[0]} = {value}"]
    for prev, name in zip(names, names[1:]):
        op, k = rng.choice(OPS), rng.randrange(2, 10)
        value = (value + k if op == "+" else value - k if op == "-" else value * k) % 100
        parts.append(f"{name} = {prev} {op} {k}")
    return f"mod 100: {' ; '.join(parts)} ; {names[-1]} ?", _spaced(str(value))


def s5(rng: random.Random, level: int) -> tuple[str, str]:
    perms = []
    for _ in range(level):
        p = list(range(1, 6))
        rng.shuffle(p)
        perms.append(p)
    state = list(range(1, 6))  # position i holds state[i]; apply p: new[i] = state[p[i] - 1]
    for p in perms:
        state = [state[j - 1] for j in p]
    return f"compose: {' | '.join(_spaced(p) for p in perms)} =", _spaced(state)


MAKERS: dict[str, Callable] = {"addition": addition, "modsum": modsum, "chain": chain, "s5": s5}


def problem(rng: random.Random, family: str, level: int) -> dict:
    """One problem record: text = statement + " " + answer + "\\n"."""
    statement, answer = MAKERS[family](rng, level)
    text = f"{statement} {answer}\n"
    return {"text": text, "kind": "problem", "family": family, "level": level,
            "answer": answer, "answer_start": len(statement) + 1}


def read_text(specs: list[str], log: Callable = print) -> list[str]:
    """The documents of --corpus, read like `ponder-pt data prepare` reads them; unusable
    records are counted and named (file and line), never dropped silently."""
    from ponder_pt.data.readers import Document, read_input

    docs, bad = [], []
    for spec in specs:
        for rec in read_input(spec):
            if isinstance(rec, Document):
                docs.append(rec.text)
            else:
                bad.append(rec)
    if bad:
        log(f"problems: {len(bad)} unusable corpus record(s), e.g. {bad[0]}")
    if not docs:
        raise ValueError(f"--corpus {' '.join(specs)}: no documents")
    return docs


def mix(texts: list[str], share: float, levels: int, seed: int,
        families=FAMILIES, count: Optional[Callable[[str], int]] = None) -> tuple[list, dict]:
    """Text documents and problems (families x levels 1..levels in turn) until problems hold
    `share` of the units `count` measures (characters by default), shuffled with `seed`.
    Returns (records, stats)."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"--share {share}: must be in (0, 1)")
    unknown = [f for f in families if f not in MAKERS]
    if unknown or levels < 1:
        raise ValueError(f"families {unknown} unknown (known: {FAMILIES}) or levels < 1")
    count = count or len
    rng = random.Random(seed)
    records = [{"text": t, "kind": "text"} for t in texts]
    text_units = sum(count(t) for t in texts)
    want = share / (1.0 - share) * text_units
    cells = [(f, lv) for f in families for lv in range(1, levels + 1)]
    units, i = 0, 0
    per_cell: dict = {}
    while units < want:
        fam, lv = cells[i % len(cells)]
        rec = problem(rng, fam, lv)
        records.append(rec)
        units += count(rec["text"])
        per_cell[f"{fam}/{lv}"] = per_cell.get(f"{fam}/{lv}", 0) + 1
        i += 1
    rng.shuffle(records)
    stats = {"text_documents": len(texts), "problems": i, "per_family_level": per_cell,
             "problem_share": units / (units + text_units), "seed": seed}
    return records, stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", nargs="+", required=True,
                   help="text documents: jsonl / txt / parquet / ... as `data prepare` reads")
    p.add_argument("--out", required=True, help="the mixed jsonl to write")
    p.add_argument("--share", type=float, default=0.5, help="problems' share of the tokens")
    p.add_argument("--levels", type=int, default=4, help="difficulty levels 1..L per family")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="measure the share in this tokenizer's tokens "
                                       "(default: characters)")
    args = p.parse_args(argv)
    count = None
    if args.tokenizer:
        from ponder_pt.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        count = lambda text: len(tok.encode(text))  # noqa: E731
    records, stats = mix(read_text(args.corpus), args.share, args.levels, args.seed,
                         [f for f in args.families.split(",") if f], count)
    with open(args.out, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    stats["unit"] = "tokens" if args.tokenizer else "characters"
    with open(args.out + ".stats.json", "w", encoding="utf-8") as fh:
        json.dump(stats, fh, indent=1)
    print(f"problems: {stats['problems']} problems and {stats['text_documents']} text documents "
          f"-> {args.out} (problems hold {stats['problem_share']:.1%} of the {stats['unit']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
