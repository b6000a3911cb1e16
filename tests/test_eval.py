"""`ponder-pt eval`: lm-evaluation-harness end to end on a tiny checkpoint with local (offline)
YAML tasks covering loglikelihood (multiple choice), loglikelihood_rolling and generate_until."""

from __future__ import annotations

import json
import os

import pytest
from _export_helpers import trained  # noqa: F401
from zygote import ponder

# hf_compat (the tests that score an HF export): CI runs them again at the oldest declared
# transformers; the native checkpoint's tests run once

pytest.importorskip("lm_eval")

ROWS = [
    {"q": "The function returns", "choices": [" a list", " the cat", " blue sky"]},
    {"q": "Import the", "choices": [" module", " ocean", " violin"]},
    {"q": "Raise an", "choices": [" error", " apple", " eagle"]},
    {"q": "Open the", "choices": [" file", " moon", " piano"]},
]
PAUSES, LIMIT = 2, 3

TASKS = {
    "tiny_mc": """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "tiny_ppl": """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{q}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
""",
    "tiny_gen": """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ["\\\\s"]
""",
}


def _direct(lm):
    """What the tasks should score, from the model's own logits: each choice's log-likelihood
    after the question and PAUSES pauses, each question's log-likelihood from the EOS token,
    and each question's greedy continuation (4 tokens, cut at a newline)."""
    import torch

    def logp(ids):
        with torch.no_grad():
            z = lm.model(torch.tensor([ids]), gather_logits=True)[0].float()
        return torch.log_softmax(z, -1)

    pauses = [lm.pause_id] * PAUSES
    out = []
    for row in ROWS[:LIMIT]:
        ctx, lls = lm.encode(row["q"]), []
        for choice in row["choices"]:
            whole = lm.encode(row["q"] + choice)
            cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else lm.encode(choice)
            lp = logp(ctx + pauses + cont[:-1])
            lls.append(sum(float(lp[len(ctx) + PAUSES - 1 + i, t]) for i, t in enumerate(cont)))
        lp = logp([lm.eos_id] + ctx[:-1])
        rolling = sum(float(lp[i, t]) for i, t in enumerate(ctx))
        ids, new = ctx + pauses, []
        for _ in range(4):
            new.append(int(logp(ids)[-1, :lm.vocab_rows].argmax()))
            ids = ids + new[-1:]
            if new[-1] == lm.eos_id:
                break
        out.append({"lls": lls, "rolling": rolling, "text": lm.decode(new).split("\n")[0]})
    return out


def test_eval_cli_local_tasks_with_pauses(trained, tmp_path):  # noqa: F811
    """lm-eval's scores through `ponder-pt eval` equal the ones computed here from the model's
    own logits: tasks whose answers are set from them (the best choice in two rows, the worst
    in the third: acc 2/3; the model's own greedy text in two rows: exact match 2/3), and the
    word perplexity from the summed log-probabilities. The generations are decoded
    speculatively (`--speculative 1:2`), which must not change their greedy text."""
    import math
    import re

    from ponder_pt.inference import NativeModel

    direct = _direct(NativeModel(trained["ponder"], device="cpu"))
    rows = []
    for i, (row, d) in enumerate(zip(ROWS, direct + [None])):
        lls = d["lls"] if d else [0.0]
        pick = max if i < 2 else min
        rows.append(dict(row, label=lls.index(pick(lls)),
                         answer=(d["text"] if i < 2 else d["text"] + "~") if d else ""))
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, text in TASKS.items():
        (tmp_path / f"{name}.yaml").write_text(text.format(data=data))
    out = str(tmp_path / "results.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))
    proc = ponder(["eval", "--model", trained["ponder"],
                   "--tasks", "tiny_mc,tiny_ppl", "tiny_gen", "--include-path",
                   str(tmp_path), "--limit", str(LIMIT), "--pauses", str(PAUSES),
                   "--output", out, "--json", "--device", "cpu", "--speculative", "1:2"],
                  timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    results = printed["results"]
    # the generations were decoded speculatively: the same greedy text, and the counts
    assert printed["speculative"]["verify_steps"] > 0
    assert set(results) == {"tiny_mc", "tiny_ppl", "tiny_gen"}
    assert results["tiny_mc"]["acc,none"] == pytest.approx(2 / 3)
    words = sum(len(re.split(r"\s+", r["q"])) for r in ROWS[:LIMIT])
    assert results["tiny_ppl"]["word_perplexity,none"] == pytest.approx(
        math.exp(-sum(d["rolling"] for d in direct) / words), rel=1e-4)
    assert results["tiny_gen"]["exact_match,none"] == pytest.approx(2 / 3)
    with open(out) as fh:
        assert json.load(fh)["results"] == results


@pytest.fixture(scope="module")
def ponder_export(trained, tmp_path_factory):  # noqa: F811
    """The pondering, pause-trained checkpoint as an HF export (with its model card)."""
    from ponder_pt.export import checkpoint_to_hf

    hf_dir = str(tmp_path_factory.mktemp("eval_export") / "hf")
    checkpoint_to_hf(trained["ponder"], hf_dir, progress=False)
    return hf_dir


@pytest.mark.hf_compat
def test_eval_write_card_on_an_export(ponder_export, tmp_path):
    """`ponder-pt eval --write-card` on the export: its results go into the export's model card
    (model-index and the results section), everything else in the card stays as it was; a
    directory that is not an HF export is refused before any evaluation."""
    from huggingface_hub import ModelCard

    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(dict(r, label=0, answer="")) + "\n" for r in ROWS))
    for name, text in TASKS.items():
        (tmp_path / f"{name}.yaml").write_text(text.format(data=data))
    out = str(tmp_path / "results.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))
    card_path = os.path.join(ponder_export, "README.md")
    before = ModelCard.load(card_path)
    proc = ponder(["eval", "--model", ponder_export,
                   "--tasks", "tiny_mc,tiny_ppl", "tiny_gen", "--include-path",
                   str(tmp_path), "--limit", str(LIMIT), "--pauses", str(PAUSES),
                   "--output", out, "--json", "--device", "cpu", "--write-card"],
                  timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    # the card: model-index and results section replaced, everything else as it was
    card = ModelCard.load(card_path)
    found = {(r.dataset_name, r.metric_type): r for r in card.data.eval_results}
    assert set(found) == {("tiny_mc", "acc"), ("tiny_ppl", "word_perplexity"),
                          ("tiny_gen", "exact_match")}
    assert found["tiny_mc", "acc"].metric_value == results["tiny_mc"]["acc,none"]
    assert found["tiny_mc", "acc"].dataset_args == {"num_fewshot": 0, "pauses": PAUSES,
                                                    "limit": LIMIT}
    assert card.data.model_name == "hf" and card.data.tags == before.data.tags
    assert (f"| tiny_mc | acc | {results['tiny_mc']['acc,none']:.4g} | test | 0 | {PAUSES} | "
            f"{LIMIT} |") in card.text
    head, tail = before.text.split("<!-- ponder-pt eval results -->")
    assert card.text.startswith(head) and card.text.endswith(tail.split("-->", 1)[1])
    native = ponder(["eval", "--model", "/nonexistent",
                     "--tasks", "tiny_mc", "--write-card"])
    assert native.returncode == 2 and "not an HF export" in native.stderr


def test_wrapper_scores_after_exactly_m_pauses(trained):  # noqa: F811
    """loglikelihood feeds context + M pauses + continuation and scores only the continuation."""
    import torch

    from ponder_pt.inference import NativeModel
    from ponder_pt.inference.evaluation import PonderEvalLM

    lm = NativeModel(trained["ponder"])
    seen = []
    real = lm.logits
    lm.logits = lambda ids: (seen.append(ids[0].tolist()), real(ids))[1]
    ev = PonderEvalLM(lm, pauses=3, progress=False)
    ctx, cont = ev._split("Open the", " file")
    ll, _ = ev._score(ctx, cont)
    assert seen[-1] == ctx + [lm.pause_id] * 3 + cont[:-1]
    z = torch.log_softmax(real(torch.tensor([ctx + [lm.pause_id] * 3 + cont]))[0], -1)
    n = len(cont)
    expect = sum(float(z[len(ctx) + 3 - 1 + i, cont[i]]) for i in range(n))
    assert abs(ll - expect) < 1e-4


@pytest.mark.hf_compat
def test_batched_loglikelihood_equals_one_at_a_time(trained, ponder_export):  # noqa: F811
    """Requests of different lengths scored in right-padded batches (longest first, split by
    batch_size and batch_tokens) give each request's one-at-a-time score, in request order,
    on the pondering checkpoint and on its HF export."""
    from types import SimpleNamespace

    from ponder_pt.inference import HFModel, NativeModel
    from ponder_pt.inference.evaluation import PonderEvalLM

    hf_dir = ponder_export
    pairs = [("Open the", " file"), ("Return the number of lines in the", " given text"),
             ("x", " = 1"), ("def f(a, b):\n    return", " a + b"), ("The", " end")]
    requests = [SimpleNamespace(args=p) for p in pairs]
    for lm in (NativeModel(trained["ponder"], device="cpu"), HFModel(hf_dir, device="cpu")):
        ev = PonderEvalLM(lm, pauses=2, progress=False, batch_size=3, batch_tokens=40)
        single = [ev._score(*ev._split(*p)) for p in pairs]
        batched = ev.loglikelihood(requests)
        assert [g for _, g in batched] == [g for _, g in single], lm.kind
        for (a, _), (b, _) in zip(batched, single):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (lm.kind, a, b)
