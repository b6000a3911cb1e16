"""Early-exit heads, losses, exit rules, batched inference, tasks and `ponder-pt finetune`.

Backbones are tiny random-initialised ALBERT / RoBERTa encoders and a ponder-pt pondering
export (K=2), all built locally; the task is the local polarity task (ponder_pt.early_exit.toy).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from ponder_pt.config import ConfigError
from ponder_pt.early_exit import losses
from ponder_pt.early_exit.backbones import load_backbone
from ponder_pt.early_exit.config import ExitConfig, load_finetune_config
from ponder_pt.early_exit.exits import (EntropyExit, ExitRule, PatienceExit, QExit, SampledExit,
                                        make_rule, predict)
from ponder_pt.early_exit.heads import ExitModel
from ponder_pt.early_exit.tasks import GLUE, Encoded, compute_metrics, load_task
from ponder_pt.early_exit.toy import tiny_encoder, write_polarity_task

sys.path.insert(0, os.path.dirname(__file__))
from _ee_helpers import pondering_export  # noqa: E402
from zygote import ponder

STRATEGIES = ["none", "palbert", "pondernet", "pabee", "entropy"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    # the bag-of-words version (no negations): tiny models learn it in a few dozen steps
    return write_polarity_task(str(tmp_path_factory.mktemp("polarity") / "polarity"),
                               n_train=256, n_valid=48, negation=0.0)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory, bpe_dir):
    root = tmp_path_factory.mktemp("ee_backbones")
    out = {arch: tiny_encoder(arch, str(root / arch), layers=4, hidden=32)
           for arch in ("albert", "roberta")}
    out["ponder_neox"] = pondering_export(str(root / "ponder_neox"), bpe_dir, steps=2)
    return out


def exit_model(path, strategy, num_labels=2, seed=0, **exit_kw):
    torch.manual_seed(seed)
    bb, tok = load_backbone(path, dtype=torch.float32)
    model = ExitModel(bb, num_labels, ExitConfig(strategy=strategy, **exit_kw))
    return model, tok


def encoded(task_dir, tok, split="validation", n=None):
    task = load_task(task_dir)
    rows = getattr(task, split)[:n] if n else getattr(task, split)
    return task, Encoded(rows, tok, 64, regression=False)


def full_batch(data: Encoded):
    return data.collate([data[i] for i in range(len(data))])


# --------------------------------------------------------------------------- losses

def test_exit_distribution_and_prior_by_hand():
    lam = torch.tensor([[0.2, 0.5, 0.4, 0.9]])
    p = losses.exit_distribution(lam)[0]
    expected = [0.2, 0.8 * 0.5, 0.8 * 0.5 * 0.4, 0.8 * 0.5 * 0.6]  # last layer takes the rest
    assert torch.allclose(p, torch.tensor(expected))
    prior = losses.geometric_prior(4, 0.1)
    assert torch.allclose(prior, torch.tensor([0.1, 0.09, 0.081, 1 - 0.271]))
    q = torch.tensor(expected)
    kl_pq = sum(a * math.log(a / b) for a, b in zip(expected, prior.tolist()))
    kl_qp = sum(b * math.log(b / a) for a, b in zip(expected, prior.tolist()))
    assert losses.kl_to_prior(q[None], prior, "p_prior").item() == pytest.approx(kl_pq, rel=1e-5)
    assert losses.kl_to_prior(q[None], prior, "prior_p").item() == pytest.approx(kl_qp, rel=1e-5)


def test_epsilon_truncation_and_pondering_loss_by_hand():
    lam = torch.tensor([[0.97, 0.5, 0.5]])
    p = losses.exit_distribution(lam)
    p_kl, live = losses.truncate(p, 0.05)
    # CDF before layer 2 is 0.97 > 0.95: layers 2 and 3 leave the task loss, p = ε/N in the KL
    assert live.tolist() == [[True, False, False]]
    assert torch.allclose(p_kl[0, 1:], torch.full((2,), 0.05 / 3))
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    labels = torch.tensor([0])
    loss, stats = losses.pondering_loss(logits, lam, labels, beta=0.5, prior_lambda=0.1,
                                        epsilon=0.05, kl_direction="p_prior")
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    prior = losses.geometric_prior(3, 0.1).tolist()
    pk = p_kl[0].tolist()
    kl = sum(a * math.log(a / b) for a, b in zip(pk, prior))
    assert loss.item() == pytest.approx(0.97 * ce0 + 0.5 * kl, rel=1e-5)
    # PABEE: Σ j L_j / Σ j
    per = losses.per_layer_task_loss(logits, labels)[0].tolist()
    assert losses.pabee_loss(logits, labels).item() == pytest.approx(
        (per[0] + 2 * per[1] + 3 * per[2]) / 6, rel=1e-6)


# --------------------------------------------------------------------------- exit rules

def _per_layer(model, batch):
    """Per-layer logits and λ's computed directly from the backbone's pooled vectors."""
    with torch.no_grad():
        pooled = model.backbone(batch["input_ids"], batch["attention_mask"],
                                batch.get("token_type_ids"))
        logits = [model.head(i, h) for i, h in enumerate(pooled)]
        lams, prev = [], torch.zeros_like(pooled[0])
        if model.halting is not None:
            for h in pooled:
                lams.append(model.halt(h, prev))
                prev = h
    return logits, lams


def _main_direction(feats):
    """(unit direction of largest variance, projection of the mean, std along it)."""
    centred = feats - feats.mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    return direction, float(feats.mean(0) @ direction), float((centred @ direction).std())


def spread_lambdas(model, batch):
    """Point the random halting unit along the main direction in which its input features
    vary (over samples and layers), scaled to logits of std 2: exits then land on several
    layers instead of all on the first or the last (random backbones give nearly equal
    pooled vectors for all inputs)."""
    with torch.no_grad():
        pooled = model.backbone(batch["input_ids"], batch["attention_mask"],
                                batch.get("token_type_ids"))
        prev = [torch.zeros_like(pooled[0])] + pooled[:-1]
        feats = torch.cat([model.halting.net[:-1](torch.cat([h, p], -1))
                           for h, p in zip(pooled, prev)])
        direction, mean, std = _main_direction(feats)
        last = model.halting.net[-1]
        last.weight.copy_(direction[None] * 2.0 / std)
        last.bias.fill_(-mean * 2.0 / std)


def spread_heads(model, batch):
    """Same idea for per-layer heads: class 1's logit minus class 0's varies over samples."""
    with torch.no_grad():
        pooled = model.backbone(batch["input_ids"], batch["attention_mask"],
                                batch.get("token_type_ids"))
        for head, h in zip(model.heads, pooled):
            direction, mean, std = _main_direction(h)
            head.weight.zero_()
            head.bias.zero_()
            head.weight[1] = direction * 3.0 / std
            head.bias[1] = -mean * 3.0 / std


@pytest.mark.parametrize("arch", ["albert", "roberta", "ponder_neox"])
def test_q_exit_is_first_layer_whose_cdf_exceeds_q(backbones, task_dir, arch):
    model, tok = exit_model(backbones[arch], "palbert", seed=3)
    model.eval()
    _, data = encoded(task_dir, tok, n=24)
    batch = full_batch(data)
    spread_lambdas(model, batch)
    _, lams = _per_layer(model, batch)
    lam = torch.stack(lams, 1).double()
    n = model.num_layers
    cdf = losses.exit_distribution(lam).cumsum(1)

    def between(values):  # a threshold halfway between two samples' values
        v = values.sort().values
        return float(v[len(v) // 2 - 1: len(v) // 2 + 1].mean())

    spreads = []
    for q in [between(cdf[:, j]) for j in range(n - 1)] + [0.97]:
        expected = []
        for row in lam.tolist():  # by hand: p_i = λ_i ∏_{j<i}(1-λ_j), exit when Σ p > q
            total, survive, layer = 0.0, 1.0, n
            for i, l in enumerate(row):
                total += l * survive
                survive *= 1 - l
                if total > q:
                    layer = i + 1
                    break
            expected.append(layer)
        got = predict(model, batch["input_ids"], batch["attention_mask"], QExit(q),
                      token_type_ids=batch.get("token_type_ids"))
        assert got.exit_layers.tolist() == expected
        spreads.append(len(set(expected)))
    assert max(spreads) > 1  # not vacuous: some threshold sends samples to several layers


@pytest.mark.parametrize("patience", [1, 2])
def test_pabee_exits_after_exactly_t_agreements(backbones, task_dir, patience):
    model, tok = exit_model(backbones["albert"], "pabee", seed=5)
    model.eval()
    _, data = encoded(task_dir, tok, n=32)
    batch = full_batch(data)
    spread_heads(model, batch)
    logits, _ = _per_layer(model, batch)
    preds = torch.stack([l.argmax(-1) for l in logits], 1).tolist()
    n = model.num_layers
    expected, exit_preds = [], []
    for row in preds:
        counter, layer = 0, n
        for i in range(1, n):
            counter = counter + 1 if row[i] == row[i - 1] else 0
            if counter == patience:
                layer = i + 1
                break
        expected.append(layer)
        exit_preds.append(row[layer - 1])
    got = predict(model, batch["input_ids"], batch["attention_mask"],
                  PatienceExit(patience, 0.1, regression=False),
                  token_type_ids=batch.get("token_type_ids"))
    assert got.exit_layers.tolist() == expected
    assert got.predictions.tolist() == exit_preds
    assert len(set(expected)) > 1  # not vacuous: samples exit on different layers


def test_patience_regression_uses_threshold():
    rule = PatienceExit(2, 0.1, regression=True)
    rule.reset(torch.arange(2))
    seq = [[[0.0], [1.0]], [[0.05], [1.5]], [[0.1], [1.55]], [[0.12], [1.6]]]
    exits = [rule.step(i, torch.tensor(x), None).tolist() for i, x in enumerate(seq)]
    # sample 0: |Δ| = .05, .05 -> 2 agreements at layer 3; sample 1: .5 (reset), .05, .05 -> layer 4
    assert [e[0] for e in exits] == [False, False, True, True]
    assert [e[1] for e in exits] == [False, False, False, True]


def test_entropy_exit_by_hand(backbones, task_dir):
    model, tok = exit_model(backbones["albert"], "entropy", seed=2)
    model.eval()
    _, data = encoded(task_dir, tok, n=24)
    batch = full_batch(data)
    spread_heads(model, batch)
    logits, _ = _per_layer(model, batch)
    ent = torch.stack([-(l.softmax(-1) * l.log_softmax(-1)).sum(-1) for l in logits], 1)
    first = ent[:, 0].sort().values  # S between two samples' values: about half exit at layer 1
    s = float(first[len(first) // 2 - 1: len(first) // 2 + 1].mean())
    expected = [next((i + 1 for i, e in enumerate(row) if e < s), model.num_layers)
                for row in ent.tolist()]
    got = predict(model, batch["input_ids"], batch["attention_mask"], EntropyExit(s),
                  token_type_ids=batch.get("token_type_ids"))
    assert got.exit_layers.tolist() == expected and len(set(expected)) > 1


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("arch", ["albert", "roberta", "ponder_neox"])
def test_batched_exit_equals_batch_size_1(backbones, task_dir, arch, strategy):
    """Dropping exited samples between layers = no dropping = one sample at a time."""
    model, tok = exit_model(backbones[arch], strategy, seed=7)
    model.eval()
    _, data = encoded(task_dir, tok, n=20)
    batch = full_batch(data)
    if model.halting is not None:
        spread_lambdas(model, batch)
    if len(model.heads) > 1:
        spread_heads(model, batch)
    tt = batch.get("token_type_ids")
    thresholds = {"palbert": 0.5, "pondernet": None, "pabee": 1, "entropy": 0.69, "none": None}

    def rule():
        return make_rule(model, thresholds[strategy])

    dropped = predict(model, batch["input_ids"], batch["attention_mask"], rule(),
                      sample_ids=batch["sample_ids"], token_type_ids=tt)
    kept = predict(model, batch["input_ids"], batch["attention_mask"], rule(),
                   sample_ids=batch["sample_ids"], token_type_ids=tt, drop_exited=False)
    singles = []
    for i in range(len(data)):
        one = data.collate([data[i]])
        singles.append(predict(model, one["input_ids"], one["attention_mask"], rule(),
                               sample_ids=one["sample_ids"],
                               token_type_ids=one.get("token_type_ids")))
    one_layers = [s.exit_layers.item() for s in singles]
    one_preds = [s.predictions.item() for s in singles]
    assert dropped.exit_layers.tolist() == kept.exit_layers.tolist() == one_layers
    assert dropped.predictions.tolist() == kept.predictions.tolist() == one_preds
    # spread_* amplify the tiny sample-to-sample differences of random backbones, and float
    # noise with them: logits agree to ~1e-4 relative; decisions above are exact
    assert torch.allclose(dropped.logits, torch.cat([s.logits for s in singles]), rtol=1e-3,
                          atol=1e-3)
    if strategy == "none":
        assert set(one_layers) == {model.num_layers}


def test_pondernet_draws_do_not_depend_on_batching():
    rule_a, rule_b = SampledExit(3, 4), SampledExit(3, 4)
    rule_a.reset(torch.tensor([5, 9, 11]))
    rule_b.reset(torch.tensor([11]))
    assert torch.equal(rule_a.draws[2], rule_b.draws[0])


# --------------------------------------------------------------------------- training

def _train_losses(model, data, steps, lr):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    batches = [data.collate([data[j] for j in range(i, i + 16)]) for i in range(0, 128, 16)]
    out = []
    for step in range(steps):
        b = batches[step % len(batches)]
        loss, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b.get("token_type_ids"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def test_learned_position_tables_bound_the_input_length(backbones):
    # tiny_encoder: 72 learned positions (RoBERTa's table has pad_token_id + 1 more, unused)
    for arch in ("albert", "roberta"):
        assert load_backbone(backbones[arch])[0].max_positions == 72
    assert load_backbone(backbones["ponder_neox"])[0].max_positions is None  # rotary


@pytest.mark.parametrize("arch", ["albert", "roberta", "ponder_neox"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_trains(backbones, task_dir, strategy, arch):
    model, tok = exit_model(backbones[arch], strategy, seed=0, dropout=0.0)
    _, data = encoded(task_dir, tok, split="train", n=128)
    trace = _train_losses(model, data, 48, lr=2e-3)
    first, last = np.mean(trace[:8]), np.mean(trace[-8:])
    assert all(map(math.isfinite, trace))
    assert last < 0.85 * first, (strategy, arch, first, last)


def test_training_stops_unrolling_once_every_sample_halted(backbones, task_dir):
    model, tok = exit_model(backbones["albert"], "palbert", epsilon=0.05)
    with torch.no_grad():  # λ ≈ 1 at the first layer: the CDF passes 1-ε immediately
        model.halting.net[-1].bias.fill_(20.0)
    calls = []
    layer = model.backbone.layer
    model.backbone.layer = lambda i, s: (calls.append(i), layer(i, s))[1]
    _, data = encoded(task_dir, tok, split="train", n=8)
    b = full_batch(data)
    loss, stats = model(b["input_ids"], b["attention_mask"], b["labels"], b.get("token_type_ids"))
    assert calls == [0] and math.isfinite(loss.item())
    assert stats["expected_layer"].item() == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- tasks

def test_local_task_rejects_are_counted_with_file_and_line(tmp_path):
    d = tmp_path / "RTE"
    d.mkdir()
    good = {"sentence1": "a b", "sentence2": "c", "label": 1}
    lines = [json.dumps(good), "{not json", json.dumps({"sentence1": "x", "label": 0}),
             json.dumps({**good, "label": 7}), json.dumps({**good, "label": 0})]
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    (d / "dev.tsv").write_text("sentence1\tsentence2\tlabel\nx y\tz\t1\nq\tr\tmaybe\n")
    task = load_task(str(d))
    assert task.spec is GLUE["rte"] and len(task.train) == 2 and len(task.validation) == 1
    where = {(os.path.basename(r["file"]), r["line"]) for r in task.rejected}
    assert where == {("train.jsonl", 2), ("train.jsonl", 3), ("train.jsonl", 4), ("dev.tsv", 3)}
    reasons = " ".join(r["reason"] for r in task.rejected)
    assert "bad JSON" in reasons and "sentence2" in reasons and "outside 0..1" in reasons
    with pytest.raises(ValueError, match="GLUE task"):
        load_task(str(tmp_path))  # neither a GLUE name nor a task.json


@pytest.mark.parametrize("pairs", [True, False])
def test_encoded_truncates_as_the_tokenizer_does_and_counts(backbones, pairs):
    """Encoded tokenizes each row once and only the too-long ones again: the result is the
    tokenizer's own one-call truncation (pairs: the longer text loses tokens first), and
    `truncated` counts the rows that did not fit."""
    _, tok = load_backbone(backbones["roberta"], dtype=torch.float32)
    words = "good bad film plot actor scene the a was very not".split()
    rng = torch.Generator().manual_seed(0)
    text = lambda: " ".join(words[int(i)] for i in  # noqa: E731
                            torch.randint(len(words), (int(torch.randint(1, 14, (1,),
                                                                          generator=rng)),),
                                          generator=rng))
    rows = [{"texts": [text(), text()] if pairs else [text()], "label": i % 2}
            for i in range(60)]
    firsts = [r["texts"][0] for r in rows]
    seconds = [r["texts"][1] for r in rows] if pairs else None
    data = Encoded(rows, tok, 12, regression=False)
    want = tok(firsts, seconds, truncation=True, max_length=12)
    assert {k: list(v) for k, v in data.enc.items()} == {k: list(v) for k, v in want.items()}
    lengths = [len(ids) for ids in tok(firsts, seconds)["input_ids"]]
    assert data.truncated == sum(n > 12 for n in lengths) and 0 < data.truncated < len(rows)


def test_metrics_per_task_by_hand():
    """Each task's metrics against values worked out by hand. F1, Matthews, Pearson and Spearman
    are symmetric in (predictions, labels), so these cases pin what is not: label 1 is F1's
    positive class (F1 of class 0 here is 2/3, not 4/7), binary F1 is not macro-averaged
    (0.619), Pearson is not Spearman on a monotone curve, constant predictions give 0."""
    # TP = 2, FP = 2, FN = 1, TN = 3
    preds, gold = [1, 1, 1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1, 0, 0]
    mrpc = compute_metrics(GLUE["mrpc"], preds, gold)
    assert mrpc == {"f1": pytest.approx(2 * 2 / (2 * 2 + 2 + 1)), "accuracy": 5 / 8}
    cola = compute_metrics(GLUE["cola"], preds, gold)
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 2) / sqrt(4 * 3 * 5 * 4)
    assert cola == {"matthews_correlation": pytest.approx(4 / 240 ** 0.5), "accuracy": 5 / 8}
    assert compute_metrics(GLUE["cola"], [1 - p for p in gold], gold)["matthews_correlation"] \
        == pytest.approx(-1.0)
    # y = x^2: ranks agree exactly; Pearson 60 / sqrt(10 * 374) from the deviations
    # (-2, -1, 0, 1, 2) and (-10, -7, -2, 5, 14)
    sts = compute_metrics(GLUE["stsb"], [1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 4.0, 9.0, 16.0, 25.0])
    assert sts == {"pearson": pytest.approx(60 / 3740 ** 0.5), "spearmanr": pytest.approx(1.0)}
    assert compute_metrics(GLUE["stsb"], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]) == {
        "pearson": pytest.approx(-1.0), "spearmanr": pytest.approx(-1.0)}
    assert compute_metrics(GLUE["stsb"], [1.0, 1.0], [0.0, 2.0]) == {"pearson": 0.0,
                                                                     "spearmanr": 0.0}


def test_config_presets_and_errors():
    cfg = load_finetune_config("palbert", backbone="x", task="rte")
    assert (cfg.exit.strategy, cfg.exit.beta, cfg.exit.prior_lambda, cfg.exit.q,
            cfg.exit.epsilon, cfg.train.lr, cfg.train.exit_lr) == ("palbert", 0.5, 0.1, 0.5,
                                                                    0.05, 1e-5, 1e-5)
    assert load_finetune_config("pabee", backbone="x", task="rte").exit.patience == 6
    with pytest.raises(ConfigError, match="exit.q"):
        load_finetune_config("palbert", overrides=["exit.q=1.5"], backbone="x", task="rte")
    with pytest.raises(ConfigError, match="did you mean"):
        load_finetune_config("palbert", overrides=["exit.patiense=3"], backbone="x", task="rte")
    with pytest.raises(ConfigError, match="unknown"):
        load_finetune_config("palbart", backbone="x", task="rte")
    with pytest.raises(ConfigError, match="not divisible"):
        from ponder_pt.early_exit.config import check
        check(load_finetune_config("palbert", overrides=["train.batch_size=5"], backbone="x",
                                   task="rte"), world_size=2)


def test_entropy_on_regression_is_rejected(backbones):
    bb, _ = load_backbone(backbones["albert"])
    with pytest.raises(ValueError, match="regression"):
        ExitModel(bb, 1, ExitConfig(strategy="entropy"))


# --------------------------------------------------------------------------- CLI

def _finetune(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = ponder(["finetune", *args],
                  timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


QUICK = ["--set", "train.lr=2e-3", "--set", "train.exit_lr=2e-3", "--set", "train.epochs=2",
         "--set", "train.batch_size=16", "--set", "eval.batch_size=16",
         "--set", "train.max_train_samples=128", "--set", "train.eval_every=4"]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [r["loss"] for r in map(json.loads, fh) if "loss" in r]


def test_finetune_cli_writes_consistent_eval_json(backbones, task_dir, tmp_path):
    out = str(tmp_path / "ft")
    _finetune(["--backbone", backbones["albert"], "--task", task_dir, "--exit", "palbert",
               "--out", out, *QUICK])
    with open(os.path.join(out, "eval.json")) as fh:
        doc = json.load(fh)
    with open(os.path.join(out, "predictions.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    n = doc["num_layers"]
    assert doc["num_samples"] == len(records) == 48
    hist = [sum(r["exit_layer"] == i + 1 for r in records) for i in range(n)]
    assert doc["exit_histogram"] == hist and sum(hist) == len(records)
    assert doc["avg_exit_layer"] == pytest.approx(np.mean([r["exit_layer"] for r in records]))
    acc = np.mean([r["prediction"] == r["label"] for r in records])
    assert doc["metric_name"] == "accuracy" and doc["metric"] == pytest.approx(acc)
    assert doc["layer_speedup"] == pytest.approx(n / doc["avg_exit_layer"])
    assert doc["wall_speedup"] > 0 and doc["batch_size_1"]["wall_speedup"] > 0
    assert doc["batch_size_1"]["exit_histogram"] == hist  # the classic mode decides alike
    assert [s["threshold"] for s in doc["sweep"]] == pytest.approx(
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert all(sum(s["exit_histogram"]) == len(records) for s in doc["sweep"])
    assert os.path.exists(os.path.join(out, "threshold_sweep.png"))
    assert os.path.exists(os.path.join(out, "best", "exit_heads.safetensors"))
    assert doc["training"]["best_metric"] >= max(h["metric"] for h in doc["training"]["history"])
    # --eval-only on the saved model reproduces the decisions
    again = str(tmp_path / "again")
    _finetune(["--eval-only", os.path.join(out, "best"), "--task", task_dir, "--exit",
               "palbert", "--out", again, "--set", "eval.batch1=false"])
    with open(os.path.join(again, "predictions.jsonl")) as fh:
        assert [json.loads(line) for line in fh] == records


@pytest.mark.slow
def test_finetune_two_processes_equal_one(backbones, task_dir, tmp_path):
    """Data-parallel DeepSpeed run (2 gloo processes) = single process, step by step."""
    args = ["--backbone", backbones["albert"], "--task", task_dir, "--exit", "pabee", *QUICK,
            "--set", "exit.dropout=0", "--set", "train.max_steps=6", "--set", "eval.batch1=false",
            "--set", "eval.max_eval_samples=16"]
    _finetune([*args, "--out", str(tmp_path / "one")])
    _finetune([*args, "--out", str(tmp_path / "two"), "--nproc", "2"])
    one, two = _losses(str(tmp_path / "one")), _losses(str(tmp_path / "two"))
    assert len(one) == len(two) == 6
    assert np.allclose(one, two, rtol=1e-4), (one, two)


def test_finetune_decoder_export_backbone(backbones, task_dir, tmp_path):
    out = str(tmp_path / "dec")
    _finetune(["--backbone", backbones["ponder_neox"], "--task", task_dir, "--exit", "pabee",
               "--out", out, *QUICK, "--set", "train.max_steps=4", "--set", "eval.batch1=false",
               "--set", "eval.max_eval_samples=16"])
    with open(os.path.join(out, "eval.json")) as fh:
        doc = json.load(fh)
    assert doc["num_samples"] == 16 and doc["strategy"] == "pabee"
    assert [s["threshold"] for s in doc["sweep"]] == list(range(1, doc["num_layers"]))


def test_finetune_rejects_bad_config_before_starting(backbones, task_dir):
    proc = ponder(["finetune", "--backbone",
                   backbones["albert"], "--task", task_dir, "--exit", "palbert",
                   "--set", "exit.beta=-1", "--nproc", "2"],
                  timeout=120)
    assert proc.returncode == 2 and "exit.beta" in proc.stderr
    proc = ponder(["finetune", "--backbone",
                   backbones["albert"], "--task", str(task_dir) + "_missing/", "--nproc",
                   "2"], timeout=120)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
