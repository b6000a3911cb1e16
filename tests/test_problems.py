"""experiments/problems.py: every answer recomputed here from its statement's text alone, the
steps each level asks for, the answer's offset, the mixing share (in characters and in a real
tokenizer's tokens), determinism, and a corpus with a bad line."""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from _export_helpers import trained  # noqa: E402,F401
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


STEPS = {"addition": lambda lv: lv, "modsum": lambda lv: lv + 1,
         "chain": lambda lv: lv + 1, "s5": lambda lv: lv}


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
        rec = pb.problem(rng, "s5", 2)
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


class _Oracle:
    """A stand-in model over a word vocabulary: within a statement it predicts a wrong next
    token for sure (a CE of about 1e4); from the statement's last token on, uniform logits (CE
    log V). Its greedy decoder knows the answers of `knows` families and gets the rest
    wrong."""

    adaptive, vocab_rows = False, 64

    def __init__(self, knows):
        self.words, self.knows, self.answers = {}, set(knows), {}

    def encode(self, text):
        return [self.words.setdefault(w, len(self.words) % self.vocab_rows)
                for w in text.split(" ")]

    def logits(self, ids):
        import torch

        seq = ids[0].tolist()
        z = torch.zeros(1, len(seq), self.vocab_rows)
        prompt = next((p for p in self.answers if tuple(seq[:len(p)]) == p), ())
        for i in range(len(prompt) - 1):
            z[0, i, (seq[i + 1] + 1) % self.vocab_rows] = 1e4
        return z

    def generate(self, prompt, n, greedy=True, stop_at_eos=True):
        family, answer = self.answers[tuple(prompt)]
        return answer if family in self.knows else [(t + 1) % self.vocab_rows for t in answer]


def test_scores_count_exact_answers_and_answer_tokens():
    """Exact match is 1 where the model reproduces the answer and 0 where it does not; the
    answer loss averages over the answer's tokens only: log V (a statement token would add
    about 1e4)."""
    from experiments import problem_eval as pe

    records, _ = pb.mix(["some text here " * 20] * 4, 0.9, 2, seed=3)
    lm = _Oracle(knows={"addition", "s5"})
    for rec in records:
        if rec["kind"] == "problem":
            prompt, answer = pe.split(rec, lm.encode)
            lm.answers[tuple(prompt)] = (rec["family"], answer)
    res = pe.score(lm, records, per_cell=3, text_docs=2)
    assert set(res["cells"]) == {f"{f}/{lv}" for f in pb.FAMILIES for lv in (1, 2)}
    for key, cell in res["cells"].items():
        assert cell["n"] == 3
        assert cell["exact"] == (1.0 if key.split("/")[0] in lm.knows else 0.0), key
        assert cell["answer_loss"] == pytest.approx(math.log(lm.vocab_rows))
    assert res["text"]["documents"] == 2 and res["text"]["text_loss"] == pytest.approx(
        math.log(lm.vocab_rows))


def test_scores_of_a_trained_checkpoint_and_an_adaptive_model(trained, tmp_path):
    """On the tiny trained checkpoint: exact match from a greedy loop over the model's full
    logits and the answer loss from them, computed here; an adaptive model's passes split at
    the statement's end, from one forward's exits."""
    import torch

    from experiments import problem_eval as pe
    from ponder_pt.inference import NativeModel

    lm = NativeModel(trained["ponder"])
    records, _ = pb.mix(["Return the number of lines in the file. " * 8] * 3, 0.8, 1, seed=2)
    res = pe.score(lm, records, per_cell=2, text_docs=1)
    for key, cell in res["cells"].items():
        recs = [r for r in records if r["kind"] == "problem"
                and f"{r['family']}/{r['level']}" == key][:2]
        exact, total, count = 0, 0.0, 0
        for rec in recs:
            prompt, answer = pe.split(rec, lm.encode)
            seq = list(prompt)
            for _ in answer:
                z = lm.logits(torch.tensor([seq]))[0, -1, :lm.vocab_rows]
                seq.append(int(z.argmax()))
            exact += seq[len(prompt):] == answer
            z = lm.logits(torch.tensor([prompt + answer]))[0, :, :lm.vocab_rows]
            logp = torch.log_softmax(z, -1)
            total -= sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))
            count += len(answer)
        assert cell["exact"] == exact / len(recs), key
        assert cell["answer_loss"] == pytest.approx(total / count, rel=1e-5), key
    assert math.isfinite(res["text"]["text_loss"])

    # adaptive: the passes of each class from the exits of one forward
    from _model_helpers import tiny_model_config

    from ponder_pt.config.schema import HaltingConfig, PonderConfig
    from ponder_pt.models import PonderLM

    class Adaptive:
        adaptive, vocab_rows, halt_q, device = True, 120, 0.5, torch.device("cpu")
        model = PonderLM(tiny_model_config(), PonderConfig(
            steps=3, halting=HaltingConfig(mode="palbert")), seed=4).eval()
        with torch.no_grad():  # spread the exits over the passes
            model.halting.proj.weight.normal_(0, 1.0)

        def encode(self, text):
            return [ord(c) % 100 + 1 for c in text]

        def generate(self, prompt, n, greedy=True, stop_at_eos=True):
            return [0] * n

    alm = Adaptive()
    res = pe.score(alm, records, per_cell=1, text_docs=0)
    rec = next(r for r in records if r["kind"] == "problem"
               and f"{r['family']}/{r['level']}" == "chain/1")
    prompt, answer = pe.split(rec, alm.encode)
    with torch.no_grad():
        _, exits = alm.model(torch.tensor([prompt + answer]), halt_q=0.5, return_exits=True)
    passes = (exits[0] + 1).float()
    got = res["cells"]["chain/1"]["passes"]
    assert got["statement"] == pytest.approx(float(passes[:len(prompt) - 1].mean()))
    assert got["answer"] == pytest.approx(float(passes[len(prompt) - 1:-1].mean()))
    assert 1.0 <= got["answer"] <= 4.0 and "text" not in res


def test_reading_a_bad_file_names_the_line(tmp_path):
    from experiments import problem_eval as pe

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "a", "kind": "text"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: bad JSON.*\(1 bad line"):
        pe.read_records(str(path))
    path.write_text(json.dumps({"text": "a", "kind": "problem"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not a record of experiments.problems"):
        pe.read_records(str(path))
