"""The fine-tuning loop shared by `finetune` and `sft` (ponder_pt.engine.finetune_loop), with a
fake step and validation: keep-best, early stopping after `patience` stale validations,
validation at the last step, and what is logged."""

from __future__ import annotations

import pytest

from ponder_pt.engine.finetune_loop import run_finetune_loop


class FakeLogger:
    def __init__(self):
        self.rows = []

    def log(self, step, values, prefix=""):
        self.rows.append((step, prefix, dict(values)))


def _run(metrics, *, batches=4, total=100, eval_every=2, patience=2, is_main=True):
    logger, saved, epochs, steps = FakeLogger(), [], [], []
    scores = iter(metrics)

    def train_step(batch):
        steps.append(batch)
        return {"loss": 1.0 / (len(steps)), "lr": 0.1}

    summary = run_finetune_loop(
        list(range(batches)), total=total, eval_every=eval_every, patience=patience,
        train_step=train_step, validate=lambda: {"metric": next(scores), "acc": 0.5},
        save_best=lambda step, metric: saved.append((step, metric)), logger=logger,
        is_main=is_main, desc="test", set_epoch=epochs.append)
    return summary, logger, saved, epochs, steps


def test_early_stop_after_patience_keeps_the_best():
    # validations at steps 2, 4, 6, 8, 10: best at 4, then 2 stale ones -> stop at step 8
    summary, logger, saved, epochs, steps = _run([0.1, 0.5, 0.4, 0.5, 0.9])
    assert summary["steps"] == 8 and summary["stopped_early"]
    assert summary["best_step"] == 4 and summary["best_metric"] == 0.5
    assert saved == [(2, 0.1), (4, 0.5)]  # an equal metric is not an improvement
    assert [h["step"] for h in summary["history"]] == [2, 4, 6, 8]
    assert summary["history"][1] == {"step": 4, "metric": 0.5, "acc": 0.5}
    assert epochs == [0, 1] and steps == [0, 1, 2, 3, 0, 1, 2, 3]
    train_rows = [r for r in logger.rows if r[1] == ""]
    assert [s for s, _, _ in train_rows] == list(range(1, 9))
    assert train_rows[4][2] == {"loss": 0.2, "lr": 0.1, "epoch": 1}
    assert [(s, v["metric"]) for s, p, v in logger.rows if p == "valid_"] == [
        (2, 0.1), (4, 0.5), (6, 0.4), (8, 0.5)]


def test_runs_to_total_and_validates_the_last_step():
    summary, _, saved, _, _ = _run([0.1, 0.2, 0.3, 0.4], total=7, eval_every=2, patience=0)
    assert summary["steps"] == 7 and not summary["stopped_early"]
    assert [h["step"] for h in summary["history"]] == [2, 4, 6, 7]
    assert summary["best_step"] == 7 and saved[-1] == (7, 0.4)


def test_other_ranks_neither_validate_nor_log():
    summary, logger, saved, _, _ = _run([], total=5, eval_every=2, patience=1, is_main=False)
    # no rank validates here, so every validation is stale: patience 1 stops at the first
    assert summary["steps"] == 2 and summary["history"] == [] and saved == []
    assert logger.rows == []


def test_empty_loader_fails_instead_of_spinning():
    with pytest.raises(ValueError, match="no batch"):
        _run([], batches=0)
