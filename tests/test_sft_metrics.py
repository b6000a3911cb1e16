"""`ponder-pt sft` pure parts: metrics against hand computations, example preparation,
task-directory parsing (planted bad rows), synthetic tasks, the one-line hub error."""

from __future__ import annotations

import json
import os
import re

import pytest

from ponder_pt.sft import metrics as M
from ponder_pt.sft.examples import IGNORE, TooLong, build_example


# ---------------------------------------------------------------------- metrics

@pytest.mark.parametrize("text, norm", [
    ("The Cat!", "cat"),
    ("  a  quick,  brown fox. ", "quick brown fox"),
    ("An apple; the pear", "apple pear"),
    ("theatre", "theatre"),            # an article only as a whole word
    ("U.S.A.", "usa"),
    ("Hello\tWorld\n", "hello world"),
])
def test_squad_normalisation(text, norm):
    assert M.normalize_answer(text) == norm


def test_exact_match_and_f1_by_hand():
    assert M.exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert M.exact_match("Eiffel", "eiffel tower") == 0.0
    # pred "eiffel tower paris" vs gold "the eiffel tower": common 2, P = 2/3, R = 2/2
    assert M.token_f1("Eiffel Tower, Paris", "the Eiffel Tower") == pytest.approx(
        2 * (2 / 3) * 1 / (2 / 3 + 1))
    # repeated tokens count min(pred, gold) times: pred "cat cat dog" vs gold "cat dog dog": common cat1 + dog1 = 2, P = R = 2/3
    assert M.token_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    assert M.token_f1("red", "blue") == 0.0
    assert M.token_f1("the", "a") == 1.0          # both normalise to empty
    assert M.token_f1("", "blue") == 0.0
    # the best over gold answers, as SQuAD scores several references
    assert M.best_over(M.token_f1, "Denver Broncos", ["Broncos", "the Denver Broncos"]) == 1.0
    assert M.best_over(M.exact_match, "Broncos", ["Denver Broncos", "broncos!"]) == 1.0
    scores = M.generative_metrics(["Denver", "x"], [["Denver Broncos"], ["y"]])
    assert scores["exact_match"] == 0.0
    assert scores["f1"] == pytest.approx((2 * 1 * 0.5 / 1.5) / 2)


@pytest.mark.parametrize("pred, gold, ok", [
    ("42", "42.0", True), ("42.", "42", True), ("+42", "42", True), ("1,000", "1000", True),
    ("$1,000.50", "1000.5", True), ("-7", "-7.00", True), ("42", "43", False),
    ("1,00", "100", False),                       # not a digit grouping
    ("so 18 #### 42", "42", True),                # GSM8k's final-answer marker
    ("42 apples", "42", False),                   # a number written alone only
    ("1 2 3", "1 2 3", True),                     # a non-number gold: exact match
    ("", "0", False),
])
def test_numeric_match(pred, gold, ok):
    assert M.numeric_match(pred, gold) == float(ok)


def test_choice_accuracy_and_pause_reading():
    assert M.choice_accuracy([[-1.0, -0.5], [-2.0, -3.0], [0.0, 0.0]], [1, 0, 1]) == \
        pytest.approx(2 / 3)  # a tie picks the first choice
    assert M.after_last_pause([5, 9, 9, 7, 8], 9) == [7, 8]
    assert M.after_last_pause([5, 9, 1, 9], 9) == []
    assert M.after_last_pause([5, 6], 9) == [5, 6]
    assert M.after_last_pause([5, 6], None) == [5, 6]


# ---------------------------------------------------------------------- examples

@pytest.mark.parametrize("m", [0, 3])
def test_build_example_labels_and_pauses(m):
    prompt, answer, eos, pause = [11, 12, 13], [21, 22], 0, 99
    ex = build_example(prompt, answer, eos, pause, m, max_length=64)
    seq = prompt + [pause] * m + answer + [eos]
    assert ex["input_ids"] == seq[:-1] and len(ex["labels"]) == len(seq) - 1
    assert ex["pause_positions"] == list(range(3, 3 + m))
    assert [ex["input_ids"][i] for i in ex["pause_positions"]] == [pause] * m
    kept = [(i, t) for i, t in enumerate(ex["labels"]) if t != IGNORE]
    assert [t for _, t in kept] == answer + [eos]
    # the first answer token is predicted at the last pause (the last prompt token for M = 0)
    assert kept[0][0] == len(prompt) + m - 1
    assert ex["truncated"] == 0


def test_build_example_truncates_prompt_from_the_left():
    ex = build_example(list(range(1, 11)), [50], 0, 99, 2, max_length=8)
    # 10 prompt + 2 pauses + answer + eos = 14 tokens, 13 inputs -> drop 5 from the left
    assert ex["truncated"] == 5 and len(ex["input_ids"]) == 8
    assert ex["input_ids"][:5] == [6, 7, 8, 9, 10]
    with pytest.raises(TooLong):
        build_example([1, 2], [3] * 10, 0, 99, 2, max_length=8)


# ---------------------------------------------------------------------- task directories

def _write(path, lines):
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def test_bad_rows_listed_with_file_and_line(tmp_path):
    from ponder_pt.sft.tasks import load_local_task

    d = tmp_path / "qa"
    d.mkdir()
    _write(d / "train.jsonl", [
        json.dumps({"prompt": "1+1=", "answer": "2"}),
        "{not json",                                            # line 2
        json.dumps({"prompt": "2+2="}),                         # line 3: no answer
        json.dumps({"prompt": "3+3=", "answer": "6"}),
        json.dumps({"prompt": "  ", "answer": "1"}),            # line 5: empty prompt
    ])
    _write(d / "dev.tsv", ["prompt\tanswer", "5+5=\t10", "6+6=\t"])  # line 3: empty answer
    task = load_local_task(str(d))
    assert task.kind == "generate" and task.metric == "exact_match" and task.test is None
    assert [r["prompt"] for r in task.train] == ["1+1=", "3+3="]
    got = {(os.path.basename(r["file"]), r["line"]): r["reason"] for r in task.rejected}
    assert set(got) == {("train.jsonl", 2), ("train.jsonl", 3), ("train.jsonl", 5),
                        ("dev.tsv", 3)}
    assert "bad JSON" in got[("train.jsonl", 2)] and "answer" in got[("train.jsonl", 3)]
    assert task.eval_split[0] == "validation"


def test_multiple_choice_and_task_json_mapping(tmp_path):
    from ponder_pt.sft.tasks import load_local_task

    d = tmp_path / "mc"
    d.mkdir()
    (d / "task.json").write_text(json.dumps({"prompt_template": "Q: {q}\nA:",
                                             "choices": "options", "label": "gold"}))
    _write(d / "train.jsonl", [
        json.dumps({"q": "sky?", "options": ["red", "blue"], "gold": 1}),
        json.dumps({"q": "grass?", "options": ["green", "pink"], "gold": 2}),   # out of range
        json.dumps({"options": ["a", "b"], "gold": 0}),                         # no q
    ])
    _write(d / "validation.csv", ["q,options,gold", "sun?,yellow|black,0"])
    task = load_local_task(str(d))
    assert task.kind == "choice" and task.metric == "accuracy"
    assert task.train[0]["prompt"] == "Q: sky?\nA:" and task.train[0]["target"] == "blue"
    assert task.validation[0]["choices"] == ["yellow", "black"]
    assert sorted(r["line"] for r in task.rejected) == [2, 3]


def test_hub_unreachable_is_one_line(tmp_path, monkeypatch, capsys):
    """No network / offline mode: the hub task fails in the launching process with one line
    naming the dataset and the local-directory option (no traceback, exit code 2)."""
    import datasets

    from ponder_pt.cli import main

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'rajpurkar/squad' on the Hub (offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    code = main(["sft", "--model", str(tmp_path / "none"), "--task", "squad",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "rajpurkar/squad" in err and "--task DIR" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out" / "task" / "task.json")
    assert main(["sft", "--model", "x", "--task", "no_such_task", "--out",
                 str(tmp_path / "o")]) == 2
    assert "not a directory and not a hub task" in capsys.readouterr().err


# ---------------------------------------------------------------------- synthetic tasks

@pytest.mark.parametrize("kind", ["addition", "variables", "sort"])
def test_synthetic_tasks_deterministic_and_correct(kind, tmp_path):
    from ponder_pt.sft.synthetic import write_task
    from ponder_pt.sft.tasks import load_local_task

    sizes = {"train": 60, "validation": 10, "test": 10}
    files = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_task(kind, 2, str(tmp_path / name), sizes, seed=seed)
        files[name] = {s: (tmp_path / name / f"{s}.jsonl").read_text() for s in sizes}
    assert files["a"] == files["b"] and files["a"] != files["c"]
    task = load_local_task(str(tmp_path / "a"))
    assert (len(task.train), len(task.validation), len(task.test)) == (60, 10, 10)
    assert not {r["prompt"] for r in task.test} & {r["prompt"] for r in task.train}
    for row in task.train + task.test:
        p, a = row["prompt"], row["target"]
        if kind == "addition":
            x, y = p.rstrip("=").split("+")
            assert len(x) == len(y) == 3 and int(x) + int(y) == int(a)
        elif kind == "variables":
            env: dict = {}
            *stmts, query = [s.strip() for s in p.split(";")]
            for s in stmts:
                name, expr = s.split("=")
                env[name] = eval(expr, {}, dict(env))  # noqa: S307 - our own generated text
            # level 2: 3 hops + 1 distractor
            assert len(stmts) == 3 + 1 and env[query.rstrip("=?")] == int(a)
        else:
            nums = [int(t) for t in re.findall(r"\d+", p)]
            assert len(nums) == 4 and a == " ".join(map(str, sorted(nums)))
    assert task.metric == ("exact_match" if kind == "sort" else "numeric_match")


def test_hub_tasks_written_as_task_directories(tmp_path, monkeypatch):
    """squad / commonsense_qa / gsm8k rows (a stand-in for `datasets`) become local task
    directories in OUT/task before any worker starts."""
    import datasets

    from ponder_pt.sft.tasks import load_local_task, resolve_task

    fake = {
        "rajpurkar/squad": [{"context": "Paris is in France.", "question": "Where is Paris?",
                             "answers": {"text": ["France", "in France"],
                                         "answer_start": [12, 9]}}] * 3,
        "tau/commonsense_qa": [{"question": "Sky colour?", "answerKey": "B",
                                "choices": {"label": ["A", "B"], "text": ["red", "blue"]}}] * 3,
        "openai/gsm8k": [{"question": "1+1?", "answer": "1+1=2\n#### 2"}] * 40,
    }
    calls = []

    def load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(fake[path])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    squad = load_local_task(resolve_task("squad", str(tmp_path / "a")))
    assert squad.kind == "generate" and squad.metric == "exact_match"
    ex = squad.train[0]
    assert ex["prompt"].endswith("Question: Where is Paris?\nAnswer:")
    assert ex["target"] == "France" and ex["golds"] == ["France", "in France"]
    csqa = load_local_task(resolve_task("commonsense-qa", str(tmp_path / "b")))
    assert csqa.kind == "choice" and csqa.train[0]["label"] == 1
    gsm = load_local_task(resolve_task("gsm8k", str(tmp_path / "c")))
    assert gsm.metric == "numeric_match" and gsm.train[0]["golds"] == ["2"]
    assert (len(gsm.train), len(gsm.validation), len(gsm.test)) == (38, 2, 40)
    n = len(calls)
    resolve_task("gsm8k", str(tmp_path / "c"))  # already in OUT/task: no second download
    assert len(calls) == n


def test_truncation_and_rejects_reported(tmp_path, capsys):
    """Examples too long for --max-length lose prompt tokens from the left and are counted;
    those whose pauses + answer cannot fit are rejected with their file and line; both are
    reported (stderr, OUT/rejects.jsonl)."""
    from types import SimpleNamespace

    from ponder_pt.sft.examples import prepare_split
    from ponder_pt.sft.train import report_prepared

    class CharTok:  # one token per character
        eod_id = 0

        def encode_batch(self, texts):
            return [[ord(c) for c in t] for t in texts]

    rows = [{"prompt": "p" * n, "target": a, "file": "t.jsonl", "line": i + 1}
            for i, (n, a) in enumerate([(3, "ab"), (20, "ab"), (2, "x" * 12)])]
    prep = prepare_split(rows, CharTok(), pause_id=999, pauses=2, max_length=10)
    assert [it["index"] for it in prep.items] == [0, 1] and prep.truncated == 1
    # 20 prompt + 2 pauses + 2 answer + EOS = 25 tokens, 24 inputs: 14 prompt tokens dropped
    assert len(prep.items[1]["input_ids"]) == 10 and prep.items[1]["truncated"] == 14
    assert [(r["file"], r["line"]) for r in prep.rejected] == [("t.jsonl", 3)]
    task = SimpleNamespace(rejected=[{"file": "t.jsonl", "line": 7, "reason": "bad JSON"}])
    empty = SimpleNamespace(rejected=[], truncated=0)
    counts = report_prepared(task, prep, empty, str(tmp_path), 10)
    err = capsys.readouterr().err
    assert counts == {"rejected_rows": 2, "truncated": 1}
    assert "2 rows rejected (e.g. t.jsonl:7: bad JSON)" in err and "1 examples longer" in err
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == 2
