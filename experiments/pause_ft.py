"""The pause paper's 2x2 in the miniature study (issue 13): StdPT / PausePT (the study's `plain`
and `pause` runs) x StdFT / PauseFT (`ponder-pt sft --pauses 0` / `--pauses M_ft`) on one
synthetic task (`ponder-pt sft-task`), each fine-tuned model scored with M in
`pause_ft.eval_pauses` pauses at inference (0 shows the paper's collapse of a pause-fine-tuned
model without pauses). A model that has no `<pause>` row (StdPT + StdFT) is scored at M = 0
only.

Resumable: a fine-tuning run whose OUT/spec.json matches its settings and that has its
OUT/final is not retrained, and its scores (OUT/scores.json) are reused when they match too.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

CELLS = [("StdPT", "plain", "StdFT"), ("StdPT", "plain", "PauseFT"),
         ("PausePT", "pause", "StdFT"), ("PausePT", "pause", "PauseFT")]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _read(path: str):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _score(final: str, task_dir: str, pauses: list, max_eval: int) -> dict:
    """{M: headline metric} of an sft export on the task's test split."""
    from ponder_pt.inference import load_model
    from ponder_pt.sft.evaluate import evaluate
    from ponder_pt.sft.tasks import load_local_task

    task = load_local_task(task_dir)
    _, rows = task.eval_split
    rows = rows[:max_eval] if max_eval else rows
    lm = load_model(final, device="cpu")
    out = {}
    for m in pauses:
        if m and lm.pause_id is None:
            out[str(m)] = None  # no <pause> row: only M = 0 exists for this model
            continue
        metrics, _ = evaluate(lm, rows, task.kind, int(m))
        out[str(m)] = metrics[task.metric]
    return {"metric": task.metric, "scores": out, "examples": len(rows)}


def _table(rows: list, pauses: list, metric: str) -> str:
    head = "| pretraining | fine-tuning | M_ft | " + " | ".join(f"M={m}" for m in pauses) + " |"
    sep = "|" + "---|" * (3 + len(pauses))
    lines = [head, sep]
    for r in rows:
        cells = ["n/a" if r["scores"].get(str(m)) is None else f"{r['scores'][str(m)]:.3f}"
                 for m in pauses]
        lines.append(f"| {r['pt']} | {r['ft']} | {r['m_ft']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n({metric} on the test split, greedy decoding after M pauses)"


def stage_pause_ft(study) -> None:
    from ponder_pt.sft.synthetic import write_task

    cfg = study.sc.get("pause_ft") or {}
    if not cfg.get("enabled", True):
        return
    root = os.path.join(study.work, "pause_ft")
    tcfg = dict({"kind": "addition", "level": 1, "train": 2000, "validation": 100, "test": 200,
                 "seed": 0}, **(cfg.get("task") or {}))
    task_dir = os.path.join(root, f"task_{tcfg['kind']}{tcfg['level']}")
    if not os.path.exists(os.path.join(task_dir, "task.json")):
        write_task(tcfg["kind"], int(tcfg["level"]), task_dir,
                   {s: int(tcfg[s]) for s in ("train", "validation", "test")},
                   seed=int(tcfg["seed"]))
    m_ft = int(cfg.get("ft_pauses", 10))
    pauses = [int(m) for m in cfg.get("eval_pauses", [0, 2, 5, 10])]
    args = [str(a) for a in cfg.get("args", [])]
    max_eval = int(cfg.get("max_eval", 0))
    runs = {r["name"]: r for r in study.runs}
    rows = []
    for pt, run_name, ft in CELLS:
        ckpt = os.path.join(study.run_dir(runs[run_name]), "ckpt") if run_name in runs else ""
        if not os.path.isdir(ckpt):
            study.log(f"pause_ft: {pt}/{ft} skipped (run {run_name} has no checkpoint; run the "
                      f"'runs' stage)")
            continue
        m = m_ft if ft == "PauseFT" else 0
        out = os.path.join(root, f"{pt}_{ft}")
        spec = {"ckpt": os.path.abspath(ckpt), "task": tcfg, "pauses": m, "args": args,
                "ckpt_step": open(os.path.join(ckpt, "latest")).read().strip()
                if os.path.exists(os.path.join(ckpt, "latest")) else None}
        digest = _digest(spec)
        done = _read(os.path.join(out, "spec.json"))
        if not (done and done.get("digest") == digest
                and os.path.exists(os.path.join(out, "final", "config.json"))):
            study.log(f"pause_ft: fine-tuning {pt}/{ft} (M={m}) on {tcfg['kind']}{tcfg['level']}")
            cmd = [sys.executable, "-m", "ponder_pt", "sft", "--model", ckpt, "--task",
                   task_dir, "--pauses", str(m), "--out", out, *args]
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "sft.log"), "w", encoding="utf-8") as log:
                code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT,
                                       env=dict(os.environ, OMP_NUM_THREADS="2",
                                                TOKENIZERS_PARALLELISM="false"))
            if code != 0:
                study.results.setdefault("errors", []).append(
                    f"pause_ft {pt}/{ft}: sft exited {code} (see {out}/sft.log)")
                continue
            with open(os.path.join(out, "spec.json"), "w", encoding="utf-8") as fh:
                json.dump({"digest": digest, **spec}, fh, indent=1)
        score_key = _digest({"digest": digest, "pauses": pauses, "max_eval": max_eval})
        scores = _read(os.path.join(out, "scores.json"))
        if not scores or scores.get("key") != score_key:
            scores = {"key": score_key, **_score(os.path.join(out, "final"), task_dir, pauses,
                                                 max_eval)}
            with open(os.path.join(out, "scores.json"), "w", encoding="utf-8") as fh:
                json.dump(scores, fh, indent=1)
        rows.append({"pt": pt, "ft": ft, "m_ft": m, "scores": scores["scores"],
                     "metric": scores["metric"], "examples": scores["examples"]})
    if not rows:
        return
    metric = rows[0]["metric"]
    study.results["pause_ft"] = {"task": tcfg, "ft_pauses": m_ft, "eval_pauses": pauses,
                                 "metric": metric, "rows": rows}
    study.sections.append("\n".join([
        "## Pause fine-tuning: the 2x2 (StdPT/PausePT x StdFT/PauseFT)", "",
        f"Task: `ponder-pt sft-task {tcfg['kind']} --level {tcfg['level']}` "
        f"({tcfg['train']} train / {tcfg['test']} test rows, seed {tcfg['seed']}); backbones: "
        f"the study's `plain` (StdPT) and `pause` (PausePT) runs; StdFT = `sft --pauses 0`, "
        f"PauseFT = `sft --pauses {m_ft}`; each model scored with M pauses at inference "
        f"(experiments/pause_ft.py). The paper (1B model) reports gains mostly for "
        f"PausePT+PauseFT (SQuAD +18% EM, CommonsenseQA +8%, GSM8k +1%) and a collapse of "
        f"pause-fine-tuned models at M=0.", "",
        _table(rows, pauses, metric)]))
