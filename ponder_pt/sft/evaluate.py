"""Scoring a model on an sft task, pause-aware: every prompt gets the same M pauses as in
fine-tuning, generation starts after the last pause, and predictions are read from the
tokens after the last pause only (`metrics.after_last_pause`).

Generative tasks: greedy decoding (K+1 KV caches for pondering models) up to EOS, scored with
exact match, token F1 and numeric match against the gold answers. Multiple choice: the
log-likelihood of each choice followed by EOS (what fine-tuning trains) after prompt + pauses;
the highest wins. Works on any `ponder_pt.inference.InferenceModel` (a loaded OUT/final, or
`LiveModel` around the model being trained).
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..inference.model import InferenceModel, PonderLMModel
from ..inference.pauses import append_pauses
from .metrics import SCORERS, after_last_pause, best_over, choice_accuracy, generative_metrics


class LiveModel(PonderLMModel):
    """The `PonderLM` being fine-tuned, seen through the inference interface."""

    kind = "live"

    def __init__(self, model, tokenizer, pause_id: Optional[int], pauses: int):
        self.model, self.tok = model, tokenizer
        self.eos_id, self.pause_id, self.default_pauses = tokenizer.eod_id, pause_id, pauses
        self.vocab_rows = tokenizer.vocab_size
        if pause_id is not None and pause_id < self.vocab_rows:
            self.vocab_rows = pause_id  # a <pause> the tokenizer itself holds: never emit it
        self.max_len = model.cfg.max_seq_len
        self.ponder_steps = model.ponder_cfg.steps
        self.thoughts = model.thoughts_cfg.count

    @property
    def device(self):
        return next(self.model.parameters()).device


def _context(lm: InferenceModel, prompt: str, pauses: int, room: int) -> list[int]:
    """Prompt ids + M pauses, prompt tokens dropped from the left to fit `room`."""
    ids = lm.encode(prompt) or [lm.eos_id]
    keep = max(1, room - pauses)
    return append_pauses(ids[-keep:], pauses, lm.pause_id)


def answer_length(lm: InferenceModel, rows: list) -> int:
    return max(len(lm.encode(g)) for r in rows for g in r["golds"]) + 2


@torch.no_grad()
def predict(lm: InferenceModel, rows: list, kind: str, pauses: int,
            max_new_tokens: int = 0, batch_size: int = 16) -> list[dict]:
    """One record per row: prompt, prediction, golds and its scores. Generative rows are
    decoded greedily `batch_size` at a time (`InferenceModel.generate_batch`)."""
    records = []
    if kind == "generate":
        n_new = max_new_tokens or answer_length(lm, rows)
        contexts = [_context(lm, row["prompt"], pauses, lm.max_len - n_new) for row in rows]
        outputs = lm.generate_batch(contexts, n_new, batch_size=batch_size)
        for i, (row, new) in enumerate(zip(rows, outputs)):
            out = after_last_pause(new, lm.pause_id)
            if lm.eos_id in out:
                out = out[:out.index(lm.eos_id)]
            text = lm.decode(out).strip()
            records.append({"index": i, "prompt": row["prompt"], "prediction": text,
                            "golds": row["golds"],
                            **{k: best_over(fn, text, row["golds"]) for k, fn in SCORERS.items()}})
        return records
    for i, row in enumerate(rows):
        scores = []
        for choice in row["choices"]:
            cont = lm.encode(choice) + [lm.eos_id]
            ctx = _context(lm, row["prompt"], pauses, lm.max_len + 1 - len(cont))
            seq = (ctx + cont)
            logp = F.log_softmax(lm.logits(torch.tensor([seq[:-1]]))[0, -len(cont):], dim=-1)
            target = torch.tensor(cont, device=logp.device)
            scores.append(float(logp.gather(1, target[:, None]).sum()))
        best = max(range(len(scores)), key=lambda j: (scores[j], -j))
        records.append({"index": i, "prompt": row["prompt"], "prediction": row["choices"][best],
                        "label": row["label"], "scores": scores,
                        "accuracy": float(best == row["label"])})
    return records


def summarize(records: list, kind: str) -> dict:
    if kind == "choice":
        return {"accuracy": choice_accuracy([r["scores"] for r in records],
                                            [r["label"] for r in records])}
    return generative_metrics([r["prediction"] for r in records],
                              [r["golds"] for r in records])


def evaluate(lm: InferenceModel, rows: list, kind: str, pauses: int,
             max_new_tokens: int = 0) -> tuple[dict, list]:
    """(metrics, records) of `lm` on `rows` with M = `pauses`."""
    was_training = getattr(getattr(lm, "model", None), "training", False)
    if was_training:
        lm.model.eval()
    try:
        records = predict(lm, rows, kind, pauses, max_new_tokens)
    finally:
        if was_training:
            lm.model.train()
    return summarize(records, kind), records


@torch.no_grad()
def validation_loss(model, items: list, pad_id: int, batch_size: int = 16) -> float:
    """Token-mean cross-entropy on prepared examples (answer + EOS tokens only)."""
    from .examples import collate

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = collate(items[start:start + batch_size], pad_id)
        n = int((batch["labels"] >= 0).sum())
        loss = model(batch["input_ids"].to(device), labels=batch["labels"].to(device))
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def write_eval(out_dir: str, metric: str, metrics: dict, records: list, info: dict) -> str:
    """OUT/eval.json ({"metric", "value", "M", "K", ...}) and OUT/predictions.jsonl."""
    os.makedirs(out_dir, exist_ok=True)
    doc = {"metric": metric, "value": metrics[metric], **info, "metrics": metrics}
    path = os.path.join(out_dir, "eval.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
    with open(os.path.join(out_dir, "predictions.jsonl"), "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path
