"""GLUE-style classification tasks: by name through `datasets`, or from a local directory of
jsonl/tsv/csv files with the same fields; the task's metric from scikit-learn / scipy.

A local directory holds `train.*` and `validation.*` (`dev.*` also accepted) and is named
after a GLUE task (`RTE/`, `sst2/`, ...) or has a `task.json`:
    {"glue_task": "rte"}                                   # GLUE fields and metric, or
    {"text_keys": ["sentence"], "num_labels": 2, "metric": "accuracy"}   # a custom task
Rows with a missing text field or a label outside the task's range are counted and reported
with file and line; they are never silently dropped.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_keys: tuple
    num_labels: int           # 1 = regression
    metric: str               # the headline metric (early stopping, plots)
    extra_metrics: tuple = ()
    validation_split: str = "validation"


GLUE = {
    "cola": TaskSpec("cola", ("sentence",), 2, "matthews_correlation", ("accuracy",)),
    "sst2": TaskSpec("sst2", ("sentence",), 2, "accuracy"),
    "mrpc": TaskSpec("mrpc", ("sentence1", "sentence2"), 2, "f1", ("accuracy",)),
    "stsb": TaskSpec("stsb", ("sentence1", "sentence2"), 1, "pearson", ("spearmanr",)),
    "qqp": TaskSpec("qqp", ("question1", "question2"), 2, "f1", ("accuracy",)),
    "mnli": TaskSpec("mnli", ("premise", "hypothesis"), 3, "accuracy",
                     validation_split="validation_matched"),
    "qnli": TaskSpec("qnli", ("question", "sentence"), 2, "accuracy"),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), 2, "accuracy"),
    "wnli": TaskSpec("wnli", ("sentence1", "sentence2"), 2, "accuracy"),
}
METRICS = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")
HUB_DATASET = "nyu-mll/glue"


def glue_name(name: str) -> Optional[str]:
    key = name.lower().replace("-", "").replace("_", "")
    return key if key in GLUE else None


def compute_metrics(spec: TaskSpec, predictions, labels) -> dict:
    """The task's metrics from scikit-learn (classification) and scipy (regression)."""
    preds, gold = np.asarray(predictions), np.asarray(labels)
    out = {}
    for name in (spec.metric, *spec.extra_metrics):
        if name == "accuracy":
            from sklearn.metrics import accuracy_score
            out[name] = float(accuracy_score(gold, preds))
        elif name == "f1":
            from sklearn.metrics import f1_score
            out[name] = float(f1_score(gold, preds, average="binary" if spec.num_labels == 2
                                       else "macro"))
        elif name == "matthews_correlation":
            from sklearn.metrics import matthews_corrcoef
            out[name] = float(matthews_corrcoef(gold, preds))
        elif name in ("pearson", "spearmanr"):
            from scipy.stats import pearsonr, spearmanr
            with warnings.catch_warnings():  # constant predictions: nan, reported as 0
                warnings.simplefilter("ignore")
                value = (pearsonr if name == "pearson" else spearmanr)(preds, gold)[0]
            out[name] = 0.0 if np.isnan(value) else float(value)
        else:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return out


@dataclass
class TaskData:
    spec: TaskSpec
    train: list          # [{"texts": (a, b?), "label": int|float, "idx": int}]
    validation: list
    rejected: list = field(default_factory=list)  # [{"file", "line", "reason"}]
    source: str = ""


# ---------------------------------------------------------------------- loading

def _spec_for_dir(path: str) -> TaskSpec:
    meta_path = os.path.join(path, "task.json")
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
        if "glue_task" in meta:
            name = glue_name(str(meta["glue_task"]))
            if name is None:
                raise ValueError(f"{meta_path}: glue_task {meta['glue_task']!r} is not one of "
                                 f"{', '.join(GLUE)}")
            return GLUE[name]
        missing = [k for k in ("text_keys", "num_labels") if k not in meta]
        if missing:
            raise ValueError(f"{meta_path}: needs 'glue_task', or 'text_keys' and 'num_labels' "
                             f"(missing {missing})")
        metric = meta.get("metric", "accuracy" if meta["num_labels"] > 1 else "pearson")
        if metric not in METRICS:
            raise ValueError(f"{meta_path}: metric {metric!r} is not one of {', '.join(METRICS)}")
        return TaskSpec(meta.get("name", os.path.basename(os.path.normpath(path))),
                        tuple(meta["text_keys"]), int(meta["num_labels"]), metric,
                        tuple(m for m in meta.get("extra_metrics", []) if m != metric))
    name = glue_name(os.path.basename(os.path.normpath(path)))
    if name is None:
        raise ValueError(f"task directory {path}: name it after a GLUE task "
                         f"({', '.join(GLUE)}) or add a task.json (see ponder_pt/early_exit/"
                         f"tasks.py)")
    return GLUE[name]


def _split_file(path: str, split: str) -> str:
    names = [split] + (["dev"] if split.startswith("validation") else [])
    for base in names:
        for ext in ("jsonl", "json", "tsv", "csv"):
            candidate = os.path.join(path, f"{base}.{ext}")
            if os.path.exists(candidate):
                return candidate
    raise FileNotFoundError(f"task directory {path}: no {split}.jsonl/.tsv/.csv "
                            f"(also tried {', '.join(names)})")


def _read_rows(path: str, rejected: list) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a jsonl/tsv/csv file; unparsable lines go to `rejected`."""
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        if path.endswith((".jsonl", ".json")):
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    rejected.append({"file": path, "line": line_no, "reason": f"bad JSON: {exc}"})
                    continue
                if not isinstance(row, dict):
                    rejected.append({"file": path, "line": line_no, "reason": "not an object"})
                    continue
                rows.append((line_no, row))
        else:
            reader = csv.DictReader(fh, delimiter="\t" if path.endswith(".tsv") else ",",
                                    quoting=csv.QUOTE_NONE if path.endswith(".tsv")
                                    else csv.QUOTE_MINIMAL)
            for row in reader:
                rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
    return rows


def _clean(rows, spec: TaskSpec, source: str, rejected: list) -> list:
    out = []
    for i, (line, row) in enumerate(rows):
        reason = None
        texts = tuple(row.get(k) for k in spec.text_keys)
        label = row.get("label")
        if any(t is None for t in texts):
            reason = f"missing text field(s) {[k for k, t in zip(spec.text_keys, texts) if t is None]}"
        elif label is None or label == "":
            reason = "missing label"
        else:
            try:
                label = float(label) if spec.num_labels == 1 else int(label)
            except (TypeError, ValueError):
                reason = f"label {label!r} is not a number"
            else:
                if spec.num_labels > 1 and not 0 <= label < spec.num_labels:
                    reason = f"label {label} outside 0..{spec.num_labels - 1}"
        if reason:
            rejected.append({"file": source, "line": line, "reason": reason})
            continue
        out.append({"texts": tuple(str(t) for t in texts), "label": label,
                    "idx": int(row.get("idx", i))})
    return out


def load_task(name_or_dir: str, *, max_train: int = 0, max_eval: int = 0) -> TaskData:
    """A GLUE task by name (downloads through `datasets`) or a local task directory."""
    rejected: list = []
    if os.path.isdir(name_or_dir):
        spec = _spec_for_dir(name_or_dir)
        splits = {}
        for split in ("train", "validation"):
            path = _split_file(name_or_dir, split)
            splits[split] = _clean(_read_rows(path, rejected), spec, path, rejected)
        source = os.path.abspath(name_or_dir)
    else:
        name = glue_name(name_or_dir)
        if name is None:
            raise ValueError(f"--task {name_or_dir!r}: not a directory and not a GLUE task "
                             f"({', '.join(GLUE)})")
        import datasets

        spec = GLUE[name]
        splits = {}
        for split, hub_split in (("train", "train"), ("validation", spec.validation_split)):
            ds = datasets.load_dataset(HUB_DATASET, name, split=hub_split)
            splits[split] = _clean(list(enumerate(ds.to_list())), spec,
                                   f"{HUB_DATASET}/{name}:{hub_split}", rejected)
        source = f"{HUB_DATASET}/{name}"
    train, valid = splits["train"], splits["validation"]
    if max_train:
        train = train[:max_train]
    if max_eval:
        valid = valid[:max_eval]
    for split, rows in (("train", train), ("validation", valid)):
        if not rows:
            raise ValueError(f"task {name_or_dir}: the {split} split has no usable rows "
                             f"({len(rejected)} rejected, e.g. {rejected[:2]})")
    return TaskData(spec, train, valid, rejected, source)


# ---------------------------------------------------------------------- batches

class Encoded:
    """Tokenized examples and a padding collate for a DataLoader."""

    def __init__(self, rows: list, tokenizer, max_length: int, regression: bool):
        self.rows = rows
        self.tokenizer = tokenizer
        self.regression = regression
        firsts = [r["texts"][0] for r in rows]
        seconds = [r["texts"][1] for r in rows] if len(rows[0]["texts"]) > 1 else None
        self.enc = tokenizer(firsts, seconds, truncation=True, max_length=max_length)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        item = {k: v[i] for k, v in self.enc.items()}
        item["labels"] = self.rows[i]["label"]
        item["sample_ids"] = i
        return item

    def collate(self, items: list) -> dict:
        import torch

        labels = [it.pop("labels") for it in items]
        sample_ids = [it.pop("sample_ids") for it in items]
        batch = self.tokenizer.pad(items, return_tensors="pt")
        batch["labels"] = torch.tensor(labels, dtype=torch.float if self.regression
                                       else torch.long)
        batch["sample_ids"] = torch.tensor(sample_ids)
        return dict(batch)
