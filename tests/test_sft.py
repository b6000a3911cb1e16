"""`ponder-pt sft` end to end on tiny models: --inspect with exactly M pauses and answer-only
labels; a 2-process run equal to a 1-process run; the export recording M that `generate`
(and `eval`) apply by default; multiple-choice scoring; a native pause-trained backbone."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _ee_helpers import pondering_export
from _export_helpers import trained  # noqa: F401  (the native pause-trained checkpoint)

from ponder_pt.sft.examples import IGNORE
from ponder_pt.sft.synthetic import write_task
from zygote import ponder

pytestmark = pytest.mark.hf_compat


def _cli(*args, timeout=600, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    proc = ponder(args, timeout=timeout, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def sft_env(bpe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    task = str(root / "add1")
    write_task("addition", 1, task, {"train": 64, "validation": 8, "test": 8}, seed=0)
    plain = pondering_export(str(root / "plain"), bpe_dir, steps=0)
    ponder = pondering_export(str(root / "ponder"), bpe_dir, steps=1)
    return {"root": root, "task": task, "plain": plain, "ponder": ponder}


# early stopping after one validation without improvement: the tiny models score 0 at every
# validation, so the runs stop at step 4 of 8
TRAIN = ["--max-steps", "8", "--batch-size", "8", "--eval-every", "2", "--lr", "1e-3",
         "--max-eval", "4", "--max-new-tokens", "4", "--early-stop", "1"]


@pytest.mark.parametrize("m", [0, 3])
def test_inspect_exactly_m_pauses_answer_only_labels(sft_env, m, capsys):
    from ponder_pt.cli import main
    from ponder_pt.inference import load_model
    from ponder_pt.sft.tasks import load_local_task
    from ponder_pt.tokenizer import load_tokenizer

    assert main(["sft", "--model", sft_env["plain"], "--task", sft_env["task"], "--pauses",
                 str(m), "--inspect", "3", "--json", "--out", str(sft_env["root"] / "x")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    lm = load_model(sft_env["plain"], device="cpu")
    pause = load_tokenizer(sft_env["plain"]).pause_row
    assert pause >= lm.vocab_rows
    rows = load_local_task(sft_env["task"]).train[:3]
    for line, row in zip(lines, rows):
        ex = json.loads(line)
        assert set(ex) == {"input_ids", "labels", "pause_positions"}
        prompt, answer = lm.encode(row["prompt"]), lm.encode(row["target"])
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels) == len(prompt) + m + len(answer)
        assert ids[:len(prompt)] == prompt
        assert ex["pause_positions"] == list(range(len(prompt), len(prompt) + m))
        assert all(ids[p] == ids[len(prompt)] for p in ex["pause_positions"])
        if m:  # the tiny export has no <pause>: sft reserves the tokenizer's padded row
            assert ids[len(prompt)] == pause and ids.count(pause) == m
        # labels: -100 on every prompt and pause target; then the answer and EOS
        n_ignored = len(prompt) + m - 1
        assert labels[:n_ignored] == [IGNORE] * n_ignored
        assert labels[n_ignored:] == answer + [lm.eos_id]
        assert ids[len(prompt) + m:] == answer  # the answer follows the M pauses directly


def sft_env_task(run_dir):
    with open(os.path.join(run_dir, "eval.json")) as fh:
        return json.load(fh)["task"]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def one_proc_run(sft_env):
    out = str(sft_env["root"] / "run1")
    _cli("sft", "--model", sft_env["ponder"], "--task", sft_env["task"], "--pauses", "2",
         "--out", out, *TRAIN)
    return out


@pytest.mark.slow
def test_two_processes_equal_one(sft_env, one_proc_run):
    """Data-parallel (2 gloo processes, ZeRO-2) trains exactly as one process (ZeRO-0): the
    loss is the global mean over answer tokens whatever the split."""
    out2 = str(sft_env["root"] / "run2")
    _cli("sft", "--model", sft_env["ponder"], "--task", sft_env["task"], "--pauses", "2",
         "--out", out2, "--nproc", "2", "--zero-stage", "2", *TRAIN)
    one, two = _losses(one_proc_run), _losses(out2)
    assert len(one) == len(two) >= 4
    assert one == pytest.approx(two, rel=1e-5, abs=1e-6)
    assert one[-1] < one[0]


def test_export_records_m_and_generate_uses_it(one_proc_run):
    """OUT/final records M = 2 (config.json default_pauses); `generate` and the lm-eval
    wrapper append those pauses by default; --pauses overrides; eval.json, predictions,
    metrics.jsonl and the loss plot are written."""
    from ponder_pt.inference import generate_text, load_model
    from ponder_pt.inference.evaluation import PonderEvalLM

    final = os.path.join(one_proc_run, "final")
    with open(os.path.join(final, "config.json")) as fh:
        config = json.load(fh)
    assert config["default_pauses"] == 2 and config["ponder_steps"] == 1
    pause = config["pause_token_id"]
    lm = load_model(final, device="cpu")
    res = generate_text(lm, "12+34=", 4, greedy=True)
    assert res["pauses"] == 2 and res["prompt_ids"] == lm.encode("12+34=") + [pause] * 2
    assert pause not in res["token_ids"]
    out = json.loads(_cli("generate", "--model", final, "--prompt", "12+34=", "--greedy",
                          "--max-new-tokens", "4", "--json").stdout)
    assert out["token_ids"] == res["token_ids"]
    none = generate_text(lm, "12+34=", 4, greedy=True, pauses=0)
    assert none["pauses"] == 0 and pause not in none["prompt_ids"]
    assert PonderEvalLM(lm, progress=False).pauses == 2
    assert PonderEvalLM(lm, pauses=0, progress=False).pauses == 0

    with open(os.path.join(one_proc_run, "eval.json")) as fh:
        doc = json.load(fh)
    assert doc["metric"] == "numeric_match" and doc["M"] == 2 and doc["K"] == 1
    assert 0.0 <= doc["value"] <= 1.0 and doc["split"] == "test" and doc["examples"] == 4
    # early stopping: the run stops after the first validation that does not improve
    hist = [h["metric"] for h in doc["training"]["history"]]  # validations at steps 2, 4, ...
    n = len(hist)
    assert n >= 2 and all(hist[i] > max(hist[:i]) for i in range(1, n - 1))
    assert n == 4 or hist[-1] <= max(hist[:-1])
    assert doc["training"]["stopped_early"] == (n < 4) and doc["training"]["steps"] == 2 * n
    assert doc["training"]["best_metric"] == max(hist)
    with open(os.path.join(one_proc_run, "predictions.jsonl")) as fh:
        preds = [json.loads(line) for line in fh]
    assert len(preds) == 4 and {"prompt", "prediction", "golds", "numeric_match"} <= set(preds[0])
    assert os.path.exists(os.path.join(one_proc_run, "loss.png"))
    # OUT/final's model card: a pondering model fine-tuned with M = 2 pauses
    from huggingface_hub import ModelCard

    card = ModelCard.load(os.path.join(final, "README.md"))
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["ponder-pt", "pondering", "pause-tokens"]
    assert f"`<pause>` = id {pause}" in card.text and "Fine-tuned with M = 2 pauses" in card.text
    assert (f"Fine-tuned with `ponder-pt sft` on `{sft_env_task(one_proc_run)}`: "
            f"{doc['training']['steps']} steps, best validation at step "
            f"{doc['training']['best_step']}") in card.text
    assert any("valid_metric" in json.loads(line)
               for line in open(os.path.join(one_proc_run, "metrics.jsonl")))
    # --eval-only scores the export again, with its recorded M or the one asked for
    from ponder_pt.cli import main

    for m, want in ((None, 2), (0, 0)):
        out = os.path.join(one_proc_run, f"re-eval-{m}")
        argv = ["sft", "--eval-only", final, "--task", sft_env_task(one_proc_run), "--out", out,
                "--max-eval", "4", "--max-new-tokens", "4"]
        assert main(argv + (["--pauses", str(m)] if m is not None else [])) == 0
        with open(os.path.join(out, "eval.json")) as fh:
            again = json.load(fh)
        assert again["M"] == want and again["K"] == 1
        if m is None:
            assert again["value"] == doc["value"]
    # the converted HF backbone's weights are gone, its tokenizer stays
    assert not [n for n in os.listdir(os.path.join(one_proc_run, "backbone"))
                if n.startswith("step_")]


def test_multiple_choice_scores_by_log_likelihood(sft_env):
    """Choice scores = sum of log p(choice tokens + EOS | prompt + M pauses), by hand."""
    import torch.nn.functional as F

    from ponder_pt.inference import load_model
    from ponder_pt.sft.evaluate import evaluate

    lm = load_model(sft_env["plain"], device="cpu")
    lm.pause_id = pause = lm.vocab_rows  # a padded row of the tiny export, as sft reserves it
    rows = [{"prompt": "The value is", "choices": ["one", "two", "three"], "label": 2,
             "golds": ["three"]}]
    metrics, records = evaluate(lm, rows, "choice", pauses=2)
    ctx = lm.encode("The value is") + [pause, pause]
    for choice, got in zip(rows[0]["choices"], records[0]["scores"]):
        cont = lm.encode(choice) + [lm.eos_id]
        seq = ctx + cont
        logp = F.log_softmax(lm.logits(torch.tensor([seq[:-1]]))[0], -1)
        want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert got == pytest.approx(want, rel=1e-5)
    best = max(range(3), key=lambda j: records[0]["scores"][j])
    assert metrics["accuracy"] == float(best == 2)


@pytest.mark.slow
def test_native_pause_trained_backbone(trained, sft_env, tmp_path):  # noqa: F811
    """A native checkpoint.dir (pause-trained, K=2) fine-tunes with its own <pause> id and
    the export records it with the new M."""
    from ponder_pt.config import load_run_config

    ckpt = trained["ponder"]
    cfg = load_run_config(ckpt)
    out = str(tmp_path / "native")
    _cli("sft", "--model", ckpt, "--task", sft_env["task"], "--pauses", "1", "--out", out,
         "--max-length", "24", *TRAIN)
    with open(os.path.join(out, "final", "config.json")) as fh:
        config = json.load(fh)
    assert config["pause_token_id"] == cfg.pause.token_id and config["default_pauses"] == 1
    assert config["ponder_steps"] == cfg.ponder.steps == 2
    assert not os.path.exists(os.path.join(out, "backbone"))
