"""Tasks of `ponder-pt sft`: a local directory, or a hub dataset (SQuAD, CommonsenseQA, GSM8k).

A task directory holds `train.*` and `validation.*` (or `dev.*`), optionally `test.*`, each
.jsonl / .json (one object per line), .tsv or .csv. Rows are either
    {"prompt": "12+34=", "answer": "46"}                      generative (answer: a string, or
                                                              a list of golds: the first is
                                                              trained on, any one scores)
    {"prompt": "Sky?", "choices": ["red", "blue"], "label": 1}  multiple choice
(in .tsv/.csv, `choices` is a JSON list or "a|b|c"). An optional `task.json` maps other field
names and picks the metric:
    {"prompt": "question", "answer": "response", "choices": "options", "label": "gold",
     "golds": "aliases", "prompt_template": "Q: {question}\\nA:", "metric": "numeric_match"}
(`prompt_template` formats the prompt from the row's fields; `golds` names a list of extra
scored answers, e.g. GSM8k's final number while `answer` holds the worked solution). Metrics:
exact_match (default), f1, numeric_match; multiple choice is scored by log-likelihood
accuracy. Rows with a missing field, an empty answer or a bad label are counted and reported
with file and line, never silently dropped.

Hub names are resolved in the launching process (`resolve_task`) and written to OUT/task as a
task directory, so workers never touch the network; an unreachable hub is one line
(`ponder_pt.data.hub`, shared with `finetune`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from ..data.rows import read_rows
from .metrics import METRICS

SPLITS = ("train", "validation", "test")
LOCAL_HINT = ("--task DIR with train.jsonl and validation.jsonl of {\"prompt\", \"answer\"} "
              "rows (see `ponder-pt sft-task` and the README's \"Pause fine-tuning\" section)")


@dataclass
class SftTask:
    name: str
    kind: str                      # "generate" | "choice"
    metric: str                    # headline metric (early stopping, eval.json)
    train: list    # [{"prompt", "target", "golds", "choices", "label", "file", "line"}]
    validation: list
    test: Optional[list] = None    # None: the final evaluation uses the validation split
    rejected: list = field(default_factory=list)  # [{"file", "line", "reason"}]
    source: str = ""

    @property
    def eval_split(self) -> tuple[str, list]:
        return ("test", self.test) if self.test else ("validation", self.validation)


# ---------------------------------------------------------------------- local directories

def _split_file(path: str, split: str) -> Optional[str]:
    for base in (split, "dev") if split == "validation" else (split,):
        for ext in ("jsonl", "json", "tsv", "csv"):
            candidate = os.path.join(path, f"{base}.{ext}")
            if os.path.exists(candidate):
                return candidate
    return None


def _as_list(value) -> Optional[list]:
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                return None
            return parsed if isinstance(parsed, list) else None
        return [part for part in text.split("|")] if text else None
    return None


def _example(row: dict, meta: dict) -> dict:
    """One cleaned example, or raises ValueError(reason)."""
    names = {k: meta.get(k, k) for k in ("prompt", "answer", "choices", "label", "golds")}
    template = meta.get("prompt_template")
    if template:
        try:
            prompt = template.format(**row)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"prompt_template: field {exc} missing") from None
    else:
        prompt = row.get(names["prompt"])
        if prompt is None:
            raise ValueError(f"missing prompt field {names['prompt']!r}")
    prompt = str(prompt)
    if not prompt.strip():
        raise ValueError("empty prompt")
    if row.get(names["choices"]) is not None:
        choices = _as_list(row[names["choices"]])
        if not choices or any(not str(c).strip() for c in choices):
            raise ValueError(f"{names['choices']!r} is not a list of non-empty choices")
        raw = row.get(names["label"])
        if raw is None or raw == "":
            raise ValueError(f"missing label field {names['label']!r}")
        try:
            label = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"label {raw!r} is not an integer") from None
        if not 0 <= label < len(choices):
            raise ValueError(f"label {label} outside 0..{len(choices) - 1}")
        choices = [str(c) for c in choices]
        return {"prompt": prompt, "target": choices[label], "golds": [choices[label]],
                "choices": choices, "label": label}
    answer = row.get(names["answer"])
    if answer is None:
        raise ValueError(f"missing answer field {names['answer']!r}")
    answers = answer if isinstance(answer, list) else [answer]
    answers = [str(a) for a in answers if a is not None and str(a).strip()]
    if not answers:
        raise ValueError("empty answer")
    golds = answers
    if row.get(names["golds"]) is not None:
        golds = [str(g) for g in (_as_list(row[names["golds"]]) or []) if str(g).strip()]
        if not golds:
            raise ValueError(f"{names['golds']!r} holds no answer")
    return {"prompt": prompt, "target": answers[0], "golds": golds, "choices": None,
            "label": None}


def read_split(path: str, meta: dict, rejected: list) -> list[dict]:
    out = []
    for line, row in read_rows(path, rejected):
        try:
            ex = _example(row, meta)
        except ValueError as exc:
            rejected.append({"file": path, "line": line, "reason": str(exc)})
            continue
        out.append({**ex, "file": path, "line": line})
    return out


def load_local_task(path: str, max_train: int = 0) -> SftTask:
    meta: dict = {}
    meta_path = os.path.join(path, "task.json")
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as fh:
            try:
                meta = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{meta_path}: not JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path}: must hold a JSON object")
    rejected: list = []
    splits = {}
    for split in SPLITS:
        f = _split_file(path, split)
        if f is None:
            if split != "test":
                raise FileNotFoundError(f"task directory {path}: no {split}.jsonl/.tsv/.csv"
                                        + (" (or dev.*)" if split == "validation" else ""))
            splits[split] = None
            continue
        splits[split] = read_split(f, meta, rejected)
    for split in ("train", "validation"):
        if not splits[split]:
            raise ValueError(f"task {path}: the {split} split has no usable rows "
                             f"({len(rejected)} rejected, e.g. {rejected[:2]})")
    kinds = {("choice" if ex["choices"] else "generate")
             for s in SPLITS for ex in (splits[s] or [])}
    if len(kinds) > 1:
        raise ValueError(f"task {path}: mixes multiple-choice rows (choices/label) and "
                         f"prompt/answer rows; use one layout")
    kind = kinds.pop()
    metric = meta.get("metric") or ("accuracy" if kind == "choice" else "exact_match")
    if metric not in METRICS or (kind == "choice") != (metric == "accuracy"):
        allowed = "accuracy" if kind == "choice" else "exact_match, f1, numeric_match"
        raise ValueError(f"{meta_path}: metric {metric!r} does not fit this {kind} task "
                         f"(use {allowed})")
    train = splits["train"][:max_train] if max_train else splits["train"]
    return SftTask(meta.get("name", os.path.basename(os.path.normpath(path))), kind, metric,
                   train, splits["validation"], splits["test"], rejected,
                   os.path.abspath(path))


# ---------------------------------------------------------------------- hub datasets

def _squad(split):
    return [{"prompt": f"{r['context']}\nQuestion: {r['question']}\nAnswer:",
             "answer": r["answers"]["text"]} for r in split]


def _csqa(split):
    out = []
    for r in split:
        labels = r["choices"]["label"]
        if r.get("answerKey") not in labels:
            continue  # the unlabelled test split
        out.append({"prompt": f"Question: {r['question']}\nAnswer:",
                    "choices": r["choices"]["text"], "label": labels.index(r["answerKey"])})
    return out


def _gsm8k(split):
    return [{"prompt": f"Question: {r['question']}\nAnswer:", "answer": r["answer"],
             "golds": [r["answer"].rsplit("####", 1)[-1].strip()]} for r in split]


# name -> (hub path, config, {our split: hub split}, converter, metric)
HUB_TASKS = {
    "squad": ("rajpurkar/squad", None, {"train": "train", "validation": "validation"},
              _squad, "exact_match"),
    "commonsense_qa": ("tau/commonsense_qa", None,
                       {"train": "train", "validation": "validation"}, _csqa, "accuracy"),
    "gsm8k": ("openai/gsm8k", "main", {"train": "train", "test": "test"}, _gsm8k,
              "numeric_match"),
}


def hub_name(name: str) -> Optional[str]:
    key = name.lower().replace("-", "_")
    key = {"csqa": "commonsense_qa", "commonsenseqa": "commonsense_qa"}.get(key, key)
    return key if key in HUB_TASKS else None


def write_hub_task(name: str, out_dir: str) -> str:
    """Download hub task `name` (through `datasets`) into a task directory; returns it."""
    from ..data.hub import load_hub_dataset

    path, config, splits, convert, metric = HUB_TASKS[name]
    rows = {ours: convert(load_hub_dataset(path, config, split=hub,
                                           local_hint=LOCAL_HINT).to_list())
            for ours, hub in splits.items()}
    if "validation" not in rows:  # GSM8k: hold out the last 5% of train for validation
        n = max(1, len(rows["train"]) // 20)
        rows["train"], rows["validation"] = rows["train"][:-n], rows["train"][-n:]
    os.makedirs(out_dir, exist_ok=True)
    for split, items in rows.items():
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as fh:
            for item in items:
                fh.write(json.dumps(item) + "\n")
    with open(os.path.join(out_dir, "task.json"), "w", encoding="utf-8") as fh:
        json.dump({"name": name, "metric": metric, "source": f"{path}"
                   + (f"/{config}" if config else "")}, fh, indent=1)
    return out_dir


def resolve_task(task: str, out: str) -> str:
    """The task directory for `--task`: a local directory as is, a hub name written to
    OUT/task (once; reused when present). Raises a one-line error otherwise."""
    if os.path.isdir(task):
        return task
    name = hub_name(task)
    if name is None:
        if os.sep in task or task.startswith("."):
            raise FileNotFoundError(f"--task {task}: no such directory")
        raise ValueError(f"--task {task!r}: not a directory and not a hub task "
                         f"({', '.join(HUB_TASKS)}); {LOCAL_HINT}")
    target = os.path.join(out, "task")
    meta_path = os.path.join(target, "task.json")
    if os.path.exists(meta_path):  # downloaded by an earlier run into this OUT: reuse it
        with open(meta_path, encoding="utf-8") as fh:
            if json.load(fh).get("name") == name:
                return target
    return write_hub_task(name, target)
