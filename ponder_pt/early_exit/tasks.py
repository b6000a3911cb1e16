"""GLUE-style classification tasks: by name through `datasets`, or from a local directory;
the task's metric from scikit-learn / scipy.

A local directory holds `train.*` and `validation.*` (`dev.*` also accepted) and is named
after a GLUE task (`RTE/`, `SST-2/`, `STS-B/`, `MNLI/` ...), has a `task.json`, or is given
`--task-format TASK`:
    {"glue_task": "rte"}                                   # GLUE fields and metric, or
    {"text_keys": ["sentence"], "num_labels": 2, "metric": "accuracy"}   # a custom task
Its files are jsonl/tsv/csv with the hub's field names (`sentence1`, `label` 0/1, ...) or GLUE's
original distribution exactly as `download_glue_data.py` writes it: each task's own columns
(MRPC's `Quality`/`#1 String`/`#2 String`, MNLI's `gold_label` with `dev_matched.tsv` /
`dev_mismatched.tsv`, QQP's `is_duplicate`, STS-B's `score`, headerless CoLA) and label strings
(`entailment`/`not_entailment`, ...), mapped to the label ids of HF's `nyu-mll/glue`.
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

from ..data.rows import read_rows


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_keys: tuple
    num_labels: int           # 1 = regression
    metric: str               # the headline metric (early stopping, plots)
    extra_metrics: tuple = ()
    validation_split: str = "validation"
    label_names: tuple = ()
    """Class names in the order of the ids of HF's `nyu-mll/glue` (label i = label_names[i])."""
    columns: tuple = ()
    """GLUE's original TSV column for each text key, where it differs ((key, column), ...)."""
    label_column: str = "label"
    """The label's column in GLUE's original TSV files (`gold_label`, `Quality`, ...)."""
    hub_config: str = ""
    """`nyu-mll/glue` config name when it differs from `name`."""
    local_validation: tuple = ("validation", "dev")
    """File names (without extension) tried for the validation split of a local directory."""
    local_test: tuple = ("test",)


# Text columns, label columns and label strings of GLUE's own distribution (the files that
# `download_glue_data.py` writes: RTE/train.tsv, MNLI/dev_matched.tsv, ...), and the label
# order of HF's `nyu-mll/glue`, so that a model fine-tuned from local files and one
# fine-tuned from the hub agree on label ids. CoLA's train/dev files have no header: source,
# label, original mark, sentence.
_NLI2 = ("entailment", "not_entailment")
GLUE = {
    "cola": TaskSpec("cola", ("sentence",), 2, "matthews_correlation", ("accuracy",),
                     label_names=("unacceptable", "acceptable")),
    "sst2": TaskSpec("sst2", ("sentence",), 2, "accuracy", label_names=("negative", "positive")),
    "mrpc": TaskSpec("mrpc", ("sentence1", "sentence2"), 2, "f1", ("accuracy",),
                     label_names=("not_equivalent", "equivalent"),
                     columns=(("sentence1", "#1 String"), ("sentence2", "#2 String")),
                     label_column="Quality"),
    "stsb": TaskSpec("stsb", ("sentence1", "sentence2"), 1, "pearson", ("spearmanr",),
                     label_column="score"),
    "qqp": TaskSpec("qqp", ("question1", "question2"), 2, "f1", ("accuracy",),
                    label_names=("not_duplicate", "duplicate"), label_column="is_duplicate"),
    "mnli": TaskSpec("mnli", ("premise", "hypothesis"), 3, "accuracy",
                     validation_split="validation_matched",
                     label_names=("entailment", "neutral", "contradiction"),
                     columns=(("premise", "sentence1"), ("hypothesis", "sentence2")),
                     label_column="gold_label",
                     local_validation=("validation_matched", "dev_matched", "validation", "dev"),
                     local_test=("test_matched", "test")),
    "mnli_mismatched": TaskSpec(
        "mnli_mismatched", ("premise", "hypothesis"), 3, "accuracy",
        validation_split="validation_mismatched",
        label_names=("entailment", "neutral", "contradiction"),
        columns=(("premise", "sentence1"), ("hypothesis", "sentence2")),
        label_column="gold_label", hub_config="mnli",
        local_validation=("validation_mismatched", "dev_mismatched"),
        local_test=("test_mismatched",)),
    "qnli": TaskSpec("qnli", ("question", "sentence"), 2, "accuracy", label_names=_NLI2),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), 2, "accuracy", label_names=_NLI2),
    "wnli": TaskSpec("wnli", ("sentence1", "sentence2"), 2, "accuracy",
                     label_names=("not_entailment", "entailment")),
}
METRICS = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")
HUB_DATASET = "nyu-mll/glue"
_ALIASES = {"mnlimm": "mnli_mismatched", "mnlimismatched": "mnli_mismatched",
            "mnlim": "mnli", "mnlimatched": "mnli"}


def glue_name(name: str) -> Optional[str]:
    """The GLUE task of a name as users and GLUE's own folders spell it (RTE, SST-2, STS-B,
    MNLI-mm, mnli_mismatched, ...), or None."""
    key = name.lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
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
    test: list = field(default_factory=list)      # unlabelled rows (label None), with_test=True


# ---------------------------------------------------------------------- loading

def _spec_for_dir(path: str, task_format: str = "") -> TaskSpec:
    if task_format:
        name = glue_name(task_format)
        if name is None:
            raise ValueError(f"--task-format {task_format!r}: not a GLUE task ("
                             f"{', '.join(GLUE)})")
        return GLUE[name]
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
                        tuple(m for m in meta.get("extra_metrics", []) if m != metric),
                        label_names=tuple(meta.get("label_names", ())))
    name = glue_name(os.path.basename(os.path.normpath(path)))
    if name is None:
        name = _detect_glue_layout(path)
    if name is None:
        raise ValueError(f"task directory {path}: name it after a GLUE task "
                         f"({', '.join(GLUE)}), pass --task-format TASK, or add a task.json "
                         f"(see ponder_pt/early_exit/tasks.py)")
    return GLUE[name]


# header columns that identify a GLUE task's original train.tsv on their own
_LAYOUT_COLUMNS = (("mnli", {"gold_label", "sentence1", "sentence2"}),
                   ("mrpc", {"Quality", "#1 String", "#2 String"}),
                   ("qqp", {"is_duplicate", "question1", "question2"}),
                   ("stsb", {"score", "sentence1", "sentence2"}),
                   ("qnli", {"question", "sentence", "label"}))


def _detect_glue_layout(path: str) -> Optional[str]:
    """The GLUE task whose original column layout `path/train.tsv` has, when unambiguous
    (RTE and WNLI share theirs: those need the directory name or --task-format)."""
    train = os.path.join(path, "train.tsv")
    if not os.path.exists(train):
        return None
    with open(train, encoding="utf-8-sig", newline="") as fh:
        header = set(fh.readline().rstrip("\r\n").split("\t"))
    for name, cols in _LAYOUT_COLUMNS:
        if cols <= header:
            return name
    return None


def _split_file(path: str, split: str, spec: Optional[TaskSpec] = None,
                required: bool = True) -> Optional[str]:
    if split == "train":
        names = ["train"]
    elif split == "test":
        names = list(spec.local_test if spec else ("test",))
    else:
        names = list(spec.local_validation if spec else ("validation", "dev"))
    for base in names:
        for ext in ("jsonl", "json", "tsv", "csv"):
            candidate = os.path.join(path, f"{base}.{ext}")
            if os.path.exists(candidate):
                return candidate
    if not required:
        return None
    raise FileNotFoundError(f"task directory {path}: no {split} file (tried "
                            f"{', '.join(n + '.jsonl/.tsv/.csv' for n in names)})")


def _read_rows(path: str, rejected: list, spec: Optional[TaskSpec] = None
               ) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a jsonl/tsv/csv file (`data.rows.read_rows`: GLUE's own
    quoting and BOM); unparsable lines go to `rejected`. CoLA's train/dev files have no header
    (source, label, original mark, sentence)."""
    if spec is not None and spec.name == "cola" and path.endswith(".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as fh:
            if "sentence" not in fh.readline().rstrip("\r\n").split("\t"):
                fh.seek(0)
                return _read_cola(fh, path, rejected)
    return read_rows(path, rejected)


def _read_cola(fh, path: str, rejected: list) -> list[tuple[int, dict]]:
    rows = []
    reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
    for fields in reader:
        if not fields:
            continue
        if len(fields) != 4:
            rejected.append({"file": path, "line": reader.line_num,
                             "reason": f"expected CoLA's 4 tab-separated fields (source, label, "
                                       f"original mark, sentence), got {len(fields)}"})
            continue
        rows.append((reader.line_num, {"sentence": fields[3], "label": fields[1]}))
    return rows


def _label_id(spec: TaskSpec, raw) -> tuple[Optional[object], Optional[str]]:
    """(label, None) or (None, reason): numbers as given, class names by HF's label order."""
    if spec.num_labels == 1:
        try:
            return float(raw), None
        except (TypeError, ValueError):
            return None, f"label {raw!r} is not a number"
    if isinstance(raw, str) and raw.strip() in spec.label_names:
        return spec.label_names.index(raw.strip()), None
    try:
        value = float(raw)
        if not value.is_integer():
            raise ValueError
        label = int(value)
    except (TypeError, ValueError):
        names = (f"one of {', '.join(spec.label_names)} or " if spec.label_names else "")
        return None, f"label {raw!r} is not {names}a class number"
    if not 0 <= label < spec.num_labels:
        return None, f"label {label} outside 0..{spec.num_labels - 1}"
    return label, None


def _clean(rows, spec: TaskSpec, source: str, rejected: list, labelled: bool = True) -> list:
    columns = dict(spec.columns)
    out = []
    for i, (line, row) in enumerate(rows):
        reason = None
        texts = tuple(row.get(k) if row.get(k) is not None else row.get(columns.get(k, k))
                      for k in spec.text_keys)
        raw = row.get("label")
        if raw is None or raw == "":
            raw = row.get(spec.label_column)
        label = None
        if any(t is None for t in texts):
            missing = [k for k, t in zip(spec.text_keys, texts) if t is None]
            reason = f"missing text field(s) {missing}"
        elif labelled:
            if raw is None or raw == "":
                reason = "missing label"
            else:
                label, reason = _label_id(spec, raw)
        if reason:
            rejected.append({"file": source, "line": line, "reason": reason})
            continue
        idx = row.get("idx", row.get("index", i))
        try:
            idx = int(idx)
        except (TypeError, ValueError):
            idx = i
        out.append({"texts": tuple(str(t) for t in texts), "label": label, "idx": idx})
    return out


def hub_hint(name: str) -> str:
    """Where to put GLUE's original files for `name` instead of the hub."""
    folder = {"cola": "CoLA", "sst2": "SST-2", "stsb": "STS-B", "mnli_mismatched": "MNLI"}.get(
        name, name.upper())
    dev = {"mnli": "dev_matched", "mnli_mismatched": "dev_mismatched"}.get(name, "dev")
    return (f"--task DIR, e.g. glue_data/{folder}/ with GLUE's own train.tsv and {dev}.tsv "
            f"(as download_glue_data.py writes them)")


def _hub_rows(spec: TaskSpec, hub_split: str, rejected: list):
    from ..data.hub import load_hub_dataset

    ds = load_hub_dataset(HUB_DATASET, spec.hub_config or spec.name, split=hub_split,
                          local_hint=hub_hint(spec.name))
    return _clean(list(enumerate(ds.to_list())), spec,
                  f"{HUB_DATASET}/{spec.hub_config or spec.name}:{hub_split}", rejected)


def resolve_task(name_or_dir: str, task_format: str = "") -> TaskSpec:
    """Check that a task can be loaded before any process starts: a local directory is read
    in full (bad rows listed); a hub name is fetched (and cached) through `datasets`, and an
    unreachable Hub raises `ponder_pt.data.hub.HubUnavailable` with one line."""
    if os.path.isdir(name_or_dir):
        return load_task(name_or_dir, task_format=task_format).spec
    if os.sep in name_or_dir or name_or_dir.startswith("."):
        raise FileNotFoundError(f"--task {name_or_dir}: no such directory")
    name = glue_name(name_or_dir)
    if name is None:
        raise ValueError(f"--task {name_or_dir!r}: not a directory and not a GLUE task "
                         f"({', '.join(GLUE)})")
    from ..data.hub import load_hub_dataset

    spec = GLUE[name]
    load_hub_dataset(HUB_DATASET, spec.hub_config or spec.name, local_hint=hub_hint(name))
    return spec


def load_task(name_or_dir: str, *, max_train: int = 0, max_eval: int = 0,
              task_format: str = "", with_test: bool = False) -> TaskData:
    """A GLUE task by name (downloads through `datasets`) or a local task directory: GLUE's
    original layout (RTE/train.tsv, MNLI/dev_matched.tsv, headerless CoLA, ...) or
    jsonl/tsv/csv files with the hub's field names. `with_test` also reads the unlabelled
    test file of a local directory (rows with label None) into `TaskData.test`."""
    rejected: list = []
    test: list = []
    if os.path.isdir(name_or_dir):
        spec = _spec_for_dir(name_or_dir, task_format)
        splits = {}
        for split in ("train", "validation"):
            path = _split_file(name_or_dir, split, spec)
            splits[split] = _clean(_read_rows(path, rejected, spec), spec, path, rejected)
        if with_test:
            path = _split_file(name_or_dir, "test", spec, required=False)
            if path:
                test = _clean(_read_rows(path, rejected, spec), spec, path, rejected,
                              labelled=False)
        source = os.path.abspath(name_or_dir)
    else:
        name = glue_name(name_or_dir)
        if name is None:
            raise ValueError(f"--task {name_or_dir!r}: not a directory and not a GLUE task "
                             f"({', '.join(GLUE)})")
        spec = GLUE[name]
        splits = {split: _hub_rows(spec, hub_split, rejected)
                  for split, hub_split in (("train", "train"),
                                           ("validation", spec.validation_split))}
        source = f"{HUB_DATASET}/{spec.hub_config or name}"
    train, valid = splits["train"], splits["validation"]
    if max_train:
        train = train[:max_train]
    if max_eval:
        valid = valid[:max_eval]
    for split, rows in (("train", train), ("validation", valid)):
        if not rows:
            raise ValueError(f"task {name_or_dir}: the {split} split has no usable rows "
                             f"({len(rejected)} rejected, e.g. {rejected[:2]})")
    return TaskData(spec, train, valid, rejected, source, test)


# ---------------------------------------------------------------------- batches

class Encoded:
    """Tokenized examples and a padding collate for a DataLoader. Rows longer than max_length
    are truncated by the tokenizer (pairs: the longer text first); `truncated` counts them."""

    def __init__(self, rows: list, tokenizer, max_length: int, regression: bool):
        self.rows = rows
        self.tokenizer = tokenizer
        self.regression = regression
        firsts = [r["texts"][0] for r in rows]
        seconds = [r["texts"][1] for r in rows] if len(rows[0]["texts"]) > 1 else None
        # tokenized whole once; only the rows that are too long again, truncated
        self.enc = tokenizer(firsts, seconds, truncation=False, verbose=False)
        long = [i for i, ids in enumerate(self.enc["input_ids"]) if len(ids) > max_length]
        self.truncated = len(long)
        if long:
            cut = tokenizer([firsts[i] for i in long],
                            [seconds[i] for i in long] if seconds else None,
                            truncation=True, max_length=max_length)
            for key, rows_of_key in self.enc.items():
                for j, i in enumerate(long):
                    rows_of_key[i] = cut[key][j]

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
