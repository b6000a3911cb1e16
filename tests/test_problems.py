"""experiments/problems.py: every answer recomputed here from its statement's text alone, the
steps each level asks for, the answer's offset, the mixing share (in characters and in a real
tokenizer's tokens), determinism, and a corpus with a bad line."""

from __future__ import annotations

import json
import os
import random
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from experiments import problems as pb  # noqa: E402


def _numbers(text: str) -> list[int]:
    return [int(x) for x in text.split()]


def _solve(statement: str) -> tuple[str, int]:
    """(the answer, the number of steps) from the statement's text, written apart from the
    generator."""
    if statement.startswith("add"):
        a, b = statement.split(":", 1)[1].rstrip("= ").split("+")
        a, b = _numbers(a), _numbers(b)
        value = int("".join(map(str, a[::-1]))) + int("".join(map(str, b[::-1])))
        return " ".join(str(value)[::-1]), len(a)
    if statement.startswith("sum mod"):
        p = int(re.match(r"sum mod (\d+):", statement).group(1))
        xs = _numbers(statement.split(":", 1)[1].rstrip("= "))
        return str(sum(xs) % p), len(xs)
    if statement.startswith("mod 100"):
        env = {}
        *assigns, question = [s.strip() for s in statement.split(":", 1)[1].split(";")]
        for a in assigns:
            name, expr = [x.strip() for x in a.split("=")]
            parts = expr.split()
            if len(parts) == 1:
                env[name] = int(parts[0])
            else:
                x, op, k = env[parts[0]], parts[1], int(parts[2])
                env[name] = {"+": x + k, "-": x - k, "*": x * k}[op] % 100
        return " ".join(str(env[question.rstrip(" ?")])), len(assigns)
    if statement.startswith("compose"):
        perms = [_numbers(p) for p in statement.split(":", 1)[1].rstrip("= ").split("|")]
        items = list(range(1, 6))
        for p in perms:  # apply p: the item at position i comes from position p[i]
            items = [items[j - 1] for j in p]
        return " ".join(map(str, items)), len(perms)
    raise AssertionError(f"unknown statement {statement!r}")


STEPS = {"addition": lambda lv: 2 * lv, "modsum": lambda lv: 2 * lv + 1,
         "chain": lambda lv: lv + 2, "s5": lambda lv: lv + 1}


def test_every_answer_and_level_recomputed_from_the_text():
    rng = random.Random(5)
    for family in pb.FAMILIES:
        for level in (1, 2, 4, 6):
            for _ in range(40):
                rec = pb.problem(rng, family, level)
                text, start = rec["text"], rec["answer_start"]
                assert text.endswith("\n") and text[start:-1] == rec["answer"]
                want, steps = _solve(text[:start].rstrip())
                assert rec["answer"] == want, (family, level, text)
                assert steps == STEPS[family](level), (family, level, text)


def test_s5_composition_order_matters():
    """The composition applies the permutations in the order written: checked on a case
    where the other order gives another answer."""
    rng = random.Random(0)
    for _ in range(50):
        rec = pb.problem(rng, "s5", 1)
        statement = rec["text"][:rec["answer_start"]].rstrip()
        p, q = [_numbers(x) for x in statement.split(":", 1)[1].rstrip("= ").split("|")]
        swapped = f"compose: {' '.join(map(str, q))} | {' '.join(map(str, p))} ="
        if _solve(swapped)[0] != rec["answer"]:
            return
    raise AssertionError("no case told the two orders apart")


def test_mix_share_cells_and_seed():
    texts = [f"document {i}: " + "some words of prose " * (5 + i % 7) for i in range(60)]
    records, stats = pb.mix(texts, 0.5, 3, seed=1)
    probs = [r for r in records if r["kind"] == "problem"]
    chars = sum(len(r["text"]) for r in probs)
    total = sum(len(r["text"]) for r in records)
    assert stats["problem_share"] == pytest.approx(chars / total)
    longest = max(len(r["text"]) for r in probs)
    assert 0.5 <= chars / total <= 0.5 + longest / total  # stops at the first problem past it
    assert {(r["family"], r["level"]) for r in probs} == {
        (f, lv) for f in pb.FAMILIES for lv in (1, 2, 3)}
    assert sum(stats["per_family_level"].values()) == len(probs) == stats["problems"]
    assert [r["kind"] for r in records[:30]].count("text") not in (0, 30)  # shuffled
    again, _ = pb.mix(texts, 0.5, 3, seed=1)
    other, _ = pb.mix(texts, 0.5, 3, seed=2)
    assert again == records and other != records
    with pytest.raises(ValueError, match="--share"):
        pb.mix(texts, 1.0, 3, seed=1)
    with pytest.raises(ValueError, match="unknown"):
        pb.mix(texts, 0.5, 3, seed=1, families=("parity",))


def test_cli_counts_tokens_and_names_bad_corpus_lines(tmp_path, bpe_dir, capsys):
    from ponder_pt.tokenizer import load_tokenizer

    corpus = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"Paragraph {i} about files and lists and loops."})
             for i in range(40)]
    lines.insert(7, "{not json")
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "mixed.jsonl"
    assert pb.main(["--corpus", str(corpus), "--out", str(out), "--share", "0.3",
                    "--levels", "2", "--tokenizer", bpe_dir]) == 0
    printed = capsys.readouterr().out
    assert "1 unusable corpus record(s)" in printed and "docs.jsonl:8" in printed
    records = [json.loads(x) for x in out.read_text().splitlines()]
    stats = json.loads((tmp_path / "mixed.jsonl.stats.json").read_text())
    assert stats["unit"] == "tokens" and stats["text_documents"] == 40
    tok = load_tokenizer(bpe_dir)
    counts = {k: sum(len(tok.encode(r["text"])) for r in records if r["kind"] == k)
              for k in ("problem", "text")}
    share = counts["problem"] / (counts["problem"] + counts["text"])
    assert share == pytest.approx(stats["problem_share"]) and 0.3 <= share < 0.4
