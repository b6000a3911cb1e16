"""`ponder-pt eval`: lm-evaluation-harness end to end on a tiny checkpoint with local (offline)
YAML tasks covering loglikelihood (multiple choice), loglikelihood_rolling and generate_until."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _export_helpers import trained  # noqa: F401

# hf_compat: CI runs these again at the oldest declared transformers
pytestmark = pytest.mark.hf_compat

pytest.importorskip("lm_eval")

ROWS = [
    {"q": "The function returns", "choices": [" a list", " the cat", " blue sky"], "label": 0},
    {"q": "Import the", "choices": [" module", " ocean", " violin"], "label": 0},
    {"q": "Raise an", "choices": [" error", " apple", " eagle"], "label": 0},
    {"q": "Open the", "choices": [" file", " moon", " piano"], "label": 0},
]

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
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    data = root / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for name, text in TASKS.items():
        (root / f"{name}.yaml").write_text(text.format(data=data))
    return str(root)


@pytest.fixture(scope="module")
def ponder_export(trained, tmp_path_factory):  # noqa: F811
    """The pondering, pause-trained checkpoint as an HF export (with its model card)."""
    from ponder_pt.export import checkpoint_to_hf

    hf_dir = str(tmp_path_factory.mktemp("eval_export") / "hf")
    checkpoint_to_hf(trained["ponder"], hf_dir, progress=False)
    return hf_dir


def test_eval_cli_local_tasks_with_pauses(ponder_export, task_dir, tmp_path):
    """`ponder-pt eval` on the export, its results written into the export's model card."""
    from huggingface_hub import ModelCard

    out = str(tmp_path / "results.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))
    card_path = os.path.join(ponder_export, "README.md")
    before = ModelCard.load(card_path)
    proc = subprocess.run([sys.executable, "-m", "ponder_pt", "eval", "--model", ponder_export,
                           "--tasks", "tiny_mc,tiny_ppl", "tiny_gen", "--include-path", task_dir,
                           "--limit", "3", "--pauses", "2", "--output", out, "--json",
                           "--write-card"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    assert set(results) == {"tiny_mc", "tiny_ppl", "tiny_gen"}
    assert 0.0 <= results["tiny_mc"]["acc,none"] <= 1.0
    assert results["tiny_ppl"]["word_perplexity,none"] > 1.0
    assert "exact_match,none" in results["tiny_gen"]
    assert os.path.exists(out)
    # the card: model-index and results section replaced, everything else as it was
    card = ModelCard.load(card_path)
    found = {(r.dataset_name, r.metric_type): r for r in card.data.eval_results}
    assert set(found) == {("tiny_mc", "acc"), ("tiny_ppl", "word_perplexity"),
                          ("tiny_gen", "exact_match")}
    assert found["tiny_mc", "acc"].metric_value == results["tiny_mc"]["acc,none"]
    assert found["tiny_mc", "acc"].dataset_args == {"num_fewshot": 0, "pauses": 2, "limit": 3}
    assert card.data.model_name == "hf" and card.data.tags == before.data.tags
    assert f"| tiny_mc | acc | {results['tiny_mc']['acc,none']:.4g} | test | 0 | 2 | 3 |" in card.text
    head, tail = before.text.split("<!-- ponder-pt eval results -->")
    assert card.text.startswith(head) and card.text.endswith(tail.split("-->", 1)[1])
    native = subprocess.run([sys.executable, "-m", "ponder_pt", "eval", "--model", "/nonexistent",
                             "--tasks", "tiny_mc", "--write-card"], capture_output=True, text=True)
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
