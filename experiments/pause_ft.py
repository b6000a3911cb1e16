"""Pause fine-tuning and pondering under fine-tuning, in the miniature study (stage `pause_ft`).

For every task in `pause_ft.tasks` (a synthetic `ponder-pt sft-task` and a task built from the
study's own corpus) and every fine-tuning seed in `pause_ft.seeds`:

* the pause paper's 2x2: StdPT / PausePT (the study's `plain` and `pause` runs) x StdFT /
  PauseFT (`ponder-pt sft --pauses 0` / `--pauses M_ft`), each fine-tuned model scored with M in
  `pause_ft.eval_pauses` pauses at inference (M = 0 shows the paper's collapse of a
  pause-fine-tuned model without pauses). A model without a `<pause>` row (StdPT + StdFT) is
  scored at M = 0 only;
* pondering K in `pause_ft.ponder_steps`: the study's `ponder_k{K}` runs fine-tuned with the
  same settings (equal tokens; K = 0 is the StdPT + StdFT cell) and, at equal FLOPs, the K = 0
  model fine-tuned for (K+1)x the steps (a K-step pondering model costs K+1 passes per token).
  The K = 0 backbone of those rows is the study's `plain_x{K+1}` run when it has a checkpoint
  (pretraining FLOPs matched too), else `plain` (only fine-tuning FLOPs matched); the table
  says which.

Every cell is reported as mean ± sample standard deviation over the fine-tuning seeds. Each
unit's score on every test row is kept, so the differences between cells get paired-bootstrap
intervals over the test rows (`paired_bootstrap`: per-row scores averaged over the seeds,
`pause_ft.bootstrap` resamples with a fixed seed, percentile interval).

Written to the study's --out: `pause_ft.json` (settings, backbones, every unit's scores, the
summary and the intervals), `pause_ft_scores.jsonl` (one line per unit and M: its score on each
test row), `pause_ft.md` (the report), and the stage's section of results.md.
The numbers and the markdown are made by experiments/pause_ft_report.py, which can rebuild them
from the first two files alone (`python -m experiments.pause_ft_report --render DIR`).

The corpus task (`kind: corpus`) is cut from the study's corpus: `context_words` consecutive
words of a docstring, then either (`mode: next`) the next word as the answer, chosen only where
that word already occurs in the prompt (recall), or (`mode: first`) " first:" and the prompt's
first word as the answer (span copy). Train rows come from the training documents, validation
and test rows from the held-out ones.

Resumable: each unit (task, cell, seed) lives in its own directory; a fine-tuning run whose
OUT/spec.json matches its settings and that has its OUT/final is not retrained, and its scores
(OUT/scores.json) are reused when they match too. Units run `schedule.jobs` at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .bootstrap import BOOTSTRAP
from .jobs import is_trained, job_command, job_env, run_logged
from .pause_ft_report import (finish, read_json, read_lines, score_lines, section,
                              write_json, write_outputs)

CELLS = [("StdPT", "plain", "StdFT"), ("StdPT", "plain", "PauseFT"),
         ("PausePT", "pause", "StdFT"), ("PausePT", "pause", "PauseFT")]
_TASK_DEFAULTS = {"train": 2000, "validation": 100, "test": 200, "seed": 0}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- tasks


def task_name(t: dict) -> str:
    if t["kind"] == "corpus":
        return f"corpus_{t.get('mode', 'next')}{t.get('context_words', 16)}"
    return f"{t['kind']}{t['level']}"


_WORD = re.compile(r"^[A-Za-z][A-Za-z_]{2,}$")


def corpus_rows(texts: list, n: int, seed: int, context_words: int, exclude=frozenset(),
                mode: str = "next") -> list:
    """n {prompt, answer} rows from documents. mode "next": `context_words` words of a
    document, then the next word, taken only where that word (letters, >= 3) already occurs
    among the prompt's words (recall); mode "first": the prompt's words then " first:", the
    answer its first word (span copy)."""
    rng = random.Random(f"corpus:{mode}:{seed}:{context_words}:{len(texts)}")
    strip = ".,:;()[]'\"`"
    cands = []
    for d, text in enumerate(texts):
        words = text.split()
        for i in range(context_words, len(words)):
            if mode == "first":
                w = words[i - context_words].strip(strip)
                ok = _WORD.match(w) and i % 4 == 0
            else:
                w = words[i].strip(strip)
                ok = _WORD.match(w) and w.lower() != "the" and \
                    w in {x.strip(strip) for x in words[i - context_words:i]}
            if ok:
                cands.append((d, i, w))
    rng.shuffle(cands)
    rows, seen = [], set(exclude)
    for d, i, w in cands:
        prompt = " ".join(texts[d].split()[i - context_words:i])
        if mode == "first":
            prompt = " ".join([w] + prompt.split()[1:]) + " first:"
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": w})
        if len(rows) == n:
            break
    return rows


def write_corpus_task(t: dict, data_dir: str, out: str) -> dict:
    def texts(name):
        with open(os.path.join(data_dir, f"{name}.jsonl"), encoding="utf-8") as fh:
            return [json.loads(line)["text"] for line in fh if line.strip()]

    cw, seed, mode = int(t.get("context_words", 16)), int(t["seed"]), t.get("mode", "next")
    held = corpus_rows(texts("heldout"), int(t["validation"]) + int(t["test"]), seed, cw,
                       mode=mode)
    splits = {"test": held[:int(t["test"])], "validation": held[int(t["test"]):],
              "train": corpus_rows(texts("train"), int(t["train"]), seed, cw,
                                   frozenset(r["prompt"] for r in held), mode=mode)}
    os.makedirs(out, exist_ok=True)
    for split, rows in splits.items():
        with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    write_json(os.path.join(out, "task.json"),
               {"name": task_name(t), "metric": "exact_match",
                "generator": "experiments/pause_ft.py", "kind": "corpus", "mode": mode,
                "context_words": cw, "seed": seed})
    return {s: len(r) for s, r in splits.items()}


def ensure_task(study, t: dict, root: str) -> str:
    from ponder_pt.sft.synthetic import write_task

    out = os.path.join(root, f"task_{task_name(t)}")
    if os.path.exists(os.path.join(out, "task.json")):
        return out
    if t["kind"] == "corpus":
        counts = write_corpus_task(t, os.path.join(study.work, "data"), out)
    else:
        counts = write_task(t["kind"], int(t["level"]), out,
                            {s: int(t[s]) for s in ("train", "validation", "test")},
                            seed=int(t["seed"]))
    study.log(f"pause_ft: task {task_name(t)}: " + ", ".join(f"{n} {s}" for s, n in
                                                             counts.items()))
    return out


# --------------------------------------------------------------------------- units


def scale_steps(args: list, mult: int) -> list:
    """`sft` arguments with (--max-steps or --epochs) multiplied by `mult` (and --eval-every,
    so every run is validated as often)."""
    out = list(args)
    if "--eval-every" in out and mult != 1:
        i = out.index("--eval-every") + 1
        out[i] = str(int(out[i]) * mult)
    for flag in ("--max-steps", "--epochs"):
        if flag in out and mult != 1:
            i = out.index(flag) + 1
            out[i] = str(int(out[i]) * mult)
            return out
    if mult != 1:
        raise ValueError("pause_ft.args must set --max-steps or --epochs for the equal-FLOPs "
                         "rows")
    return out


def plan_units(cfg: dict, runs: dict) -> list:
    """Every fine-tuning unit of one task and seed, as dicts (without task/seed)."""
    m_ft = int(cfg.get("ft_pauses", 10))
    units = [{"group": "2x2", "label": f"{pt}_{ft}", "pt": pt, "ft": ft, "run": run,
              "m": m_ft if ft == "PauseFT" else 0, "mult": 1, "K": 0}
             for pt, run, ft in CELLS]
    for k in cfg.get("ponder_steps", []):
        k = int(k)
        units.append({"group": "ponder", "label": f"K{k}", "pt": f"ponder_k{k}", "ft": "StdFT",
                      "run": f"ponder_k{k}", "m": 0, "mult": 1, "K": k})
        flops = cfg.get("equal_flops", True)  # true, false, or the list of K to match
        if flops is True or (isinstance(flops, list) and k in [int(x) for x in flops]):
            long_run = f"plain_x{k + 1}"
            run = long_run if runs.get(long_run, {}).get("has_ckpt") else "plain"
            units.append({"group": "flops", "label": f"K0x{k + 1}", "pt": run, "ft": "StdFT",
                          "run": run, "m": 0, "mult": k + 1, "K": 0, "matches_k": k})
    return units


_SCORE_LOCK = threading.Lock()
_SCORES_FORMAT = 2  # scores.json keeps each test row's score (older files are rescored)


def score(final: str, task_dir: str, pauses: list, max_eval: int) -> dict:
    """{"metric", "scores": {M: metric}, "per_row": {M: [score of each test row]},
    "examples"} of an sft export on the task's test split (in this process, one model at a
    time)."""
    with _SCORE_LOCK:
        return _score(final, task_dir, pauses, max_eval)


def _score(final: str, task_dir: str, pauses: list, max_eval: int) -> dict:
    import torch

    from ponder_pt.inference import load_model
    from ponder_pt.sft.evaluate import evaluate
    from ponder_pt.sft.tasks import load_local_task

    task = load_local_task(task_dir)
    _, rows = task.eval_split
    rows = rows[:int(max_eval)] if int(max_eval) else rows
    lm = load_model(final, device="cuda" if torch.cuda.is_available() else "cpu")
    scores, per_row = {}, {}
    for m in pauses:
        if m and lm.pause_id is None:
            scores[str(m)] = None  # no <pause> row: only M = 0 exists for this model
            continue
        metrics, records = evaluate(lm, rows, task.kind, int(m))
        scores[str(m)] = metrics[task.metric]
        per_row[str(m)] = [float(r[task.metric]) for r in records]
    return {"metric": task.metric, "scores": scores, "per_row": per_row, "examples": len(rows)}


def _own_eval(out: str, n_rows: int) -> tuple[dict, dict, str | None]:
    """The score (and per-row scores) that `sft` itself wrote for its M on the same test rows:
    ({M: value}, {M: [per row]}, metric), or empty when it scored other rows."""
    ev = read_json(os.path.join(out, "eval.json")) or {}
    path = os.path.join(out, "predictions.jsonl")
    if ev.get("examples") != n_rows or not ev.get("metric") or not os.path.exists(path):
        return {}, {}, None
    with open(path, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    if len(records) != n_rows:
        return {}, {}, None
    m = str(ev["M"])
    return {m: ev["value"]}, {m: [float(r[ev["metric"]]) for r in records]}, ev["metric"]


def run_unit(study, u: dict, task_dir: str, cfg: dict, args: list, env: dict) -> dict | None:
    """Fine-tune (unless done) and score one unit; its row of pause_ft.json, with the
    per-row scores under "per_row"."""
    out = u["out"]
    spec = {"ckpt": os.path.abspath(u["ckpt"]), "task": u["task"], "pauses": u["m"],
            "args": args, "seed": u["seed"], "ckpt_step": u["ckpt_step"]}
    digest = _digest(spec)
    done = read_json(os.path.join(out, "spec.json"))
    tag = f"{u['task_name']}/{u['label']}/s{u['seed']}"
    fine_tuned = not (done and done.get("digest") == digest
                      and os.path.exists(os.path.join(out, "final", "config.json")))
    if fine_tuned:
        if not cfg.get("run_missing", True):  # report what is finished, run nothing
            return None
        study.log(f"pause_ft: fine-tuning {tag} ({u['run']}, M={u['m']}, x{u['mult']} steps)")
        os.makedirs(out, exist_ok=True)
        cmd = job_command("ponder_pt", "sft", "--model", u["ckpt"], "--task", task_dir,
                          "--pauses", u["m"], "--out", out, "--seed", u["seed"], *args)
        t0 = time.time()
        code = run_logged(cmd, os.path.join(out, "sft.log"), env, mode="w")
        if code != 0 or not os.path.exists(os.path.join(out, "final", "config.json")):
            study.results.setdefault("errors", []).append(
                f"pause_ft {tag}: sft exited {code} (see {out}/sft.log)")
            return None
        done = {"digest": digest, **spec, "sft_wall_s": round(time.time() - t0, 1),
                "load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg")
                else None}
        write_json(os.path.join(out, "spec.json"), done)
    pauses = u["score_pauses"]
    max_eval = int(cfg.get("max_eval", 0))
    key = _digest({"digest": digest, "pauses": pauses, "max_eval": max_eval,
                   "format": _SCORES_FORMAT})
    scores = read_json(os.path.join(out, "scores.json"))
    if not scores or scores.get("key") != key:
        n_rows = _count_rows(task_dir, max_eval)
        reuse, reuse_rows, metric = _own_eval(out, n_rows)
        todo = [m for m in pauses if str(m) not in reuse]
        got = {"metric": metric, "scores": {}, "per_row": {}, "examples": n_rows}
        if todo and u["run"] in ("plain", "ponder_k1", "ponder_k2", "ponder_k3") \
                and u["m"] == 0 and all(todo):
            got["scores"] = {str(m): None for m in todo}  # no <pause> row: M = 0 only
        elif todo:
            t0 = time.time()
            got = score(os.path.join(out, "final"), task_dir, todo, max_eval)
            done = dict(done or {}, score_wall_s=round(time.time() - t0, 1))
            write_json(os.path.join(out, "spec.json"), done)
        per_row = dict(reuse_rows, **got["per_row"])
        scores = {"key": key, "metric": got["metric"], "examples": got["examples"],
                  "scores": {str(m): dict(reuse, **got["scores"]).get(str(m)) for m in pauses},
                  "per_row": {str(m): per_row[str(m)] for m in pauses if str(m) in per_row}}
        write_json(os.path.join(out, "scores.json"), scores)
    history = (read_json(os.path.join(out, "eval.json")) or {}).get("training", {})
    return {k: u[k] for k in ("group", "label", "pt", "ft", "run", "m", "mult", "K", "seed",
                              "task_name")} | {
        "matches_k": u.get("matches_k"), "scores": scores["scores"], "metric": scores["metric"],
        "examples": scores["examples"], "best_step": history.get("best_step"),
        "steps": history.get("steps"), "sft_wall_s": (done or {}).get("sft_wall_s"),
        "load_1min": (done or {}).get("load_1min"), "per_row": scores["per_row"],
        "_fine_tuned": fine_tuned}


def _count_rows(task_dir: str, max_eval: int) -> int:
    path = os.path.join(task_dir, "test.jsonl")
    if not os.path.exists(path):
        path = os.path.join(task_dir, "validation.jsonl")
    with open(path, encoding="utf-8") as fh:
        n = sum(1 for line in fh if line.strip())
    return min(n, max_eval) if max_eval else n


# --------------------------------------------------------------------------- the stage


def _test_set(name: str, task_dir: str, max_eval: int) -> dict:
    """Name, metric, row count and digest of the rows every unit is scored on, and what an
    empty prediction scores on them (a floor under exact match: SQuAD's normalisation makes
    an answer such as "the" empty)."""
    from ponder_pt.sft.metrics import SCORERS, best_over
    from ponder_pt.sft.tasks import load_local_task

    task = load_local_task(task_dir)
    _, rows = task.eval_split
    rows = rows[:max_eval] if max_eval else rows
    empty = statistics.fmean(best_over(SCORERS[task.metric], "", r["golds"]) for r in rows) \
        if task.metric in SCORERS else 0.0
    return {"name": name, "metric": task.metric, "rows": len(rows),
            "sha256": _digest([[r["prompt"], r.get("golds"), r.get("choices"), r.get("label")]
                               for r in rows]),
            "empty_answer_score": empty}


def _backbone(study, run: dict) -> dict:
    """A backbone run's pretraining numbers, from its eval.json (experiments/evaluate.py)."""
    ev = read_json(os.path.join(study.run_dir(run), "eval.json")) or {}
    final = ev.get("final") or {}
    return {"valid_loss": final.get("valid_loss"), "pretraining_flops": final.get("flops"),
            "tokens": final.get("tokens"), "params": (ev.get("params") or {}).get("total"),
            "seed": run["seed"], "ponder_steps": run["ponder_steps"],
            "pause_rate": run["pause_rate"], "train_wall_s": ev.get("train_wall_s")}


class _LoadSampler:
    """The 1-minute load average every few seconds while the grid runs."""

    def __init__(self, every: float = 5.0):
        self.values, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every):
        while hasattr(os, "getloadavg") and not self._stop.wait(every):
            self.values.append(os.getloadavg()[0])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def stage_pause_ft(study) -> None:
    cfg = study.sc.get("pause_ft") or {}
    if not cfg.get("enabled", True):
        return
    root = os.path.join(study.work, "pause_ft")
    task_cfgs = [dict(_TASK_DEFAULTS, **t) for t in
                 (cfg.get("tasks") or [cfg.get("task") or {"kind": "addition", "level": 1}])]
    m_ft = int(cfg.get("ft_pauses", 10))
    pauses = [int(m) for m in cfg.get("eval_pauses", [0, 2, 5, 10])]
    seeds = [int(s) for s in cfg.get("seeds", [42])]
    args = [str(a) for a in cfg.get("args", [])]
    runs = {}
    for r in study.runs:  # only runs trained to the end (not one still training)
        done = is_trained(study.run_dir(r), r["iters"])
        runs[r["name"]] = {"ckpt": os.path.join(study.run_dir(r), "ckpt"), "has_ckpt": done,
                           "step": f"step_{r['iters']:08d}" if done else None}
    todo, skipped, task_dirs = [], set(), []
    for t in task_cfgs:
        task_dir = ensure_task(study, t, root)
        task_dirs.append(task_dir)
        groups = t.get("groups", ["2x2", "ponder", "flops"])
        for u in plan_units(cfg, runs):
            if u["group"] not in groups:
                continue
            if not runs.get(u["run"], {}).get("has_ckpt"):
                skipped.add(u["run"])
                continue
            for seed in seeds:
                unit = dict(u, task=t, task_name=task_name(t), seed=seed,
                            ckpt=runs[u["run"]]["ckpt"], ckpt_step=runs[u["run"]]["step"],
                            out=os.path.join(root, task_name(t), f"{u['label']}_s{seed}"),
                            score_pauses=pauses if u["group"] == "2x2" else [0])
                todo.append((unit, task_dir, scale_steps(args, u["mult"])))
    for name in sorted(skipped):
        study.log(f"pause_ft: cells on run {name} skipped (no checkpoint; run the 'runs' stage "
                  f"for it)")
    threads = int(study.sc["schedule"].get("threads_per_job", 1))
    env = job_env(threads)
    import torch

    torch.set_num_threads(threads)  # the in-process scoring
    jobs = max(1, int(cfg.get("jobs", study.sc["schedule"].get("jobs", 1))))
    # seed by seed (each seed completes the whole grid), the 2x2 first within a seed
    prio = {"2x2": 0, "ponder": 1, "flops": 2}
    todo.sort(key=lambda x: (seeds.index(x[0]["seed"]), prio[x[0]["group"]]))
    t0, started = time.time(), time.strftime("%Y-%m-%d %H:%M")
    with _LoadSampler() as load, ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda x: run_unit(study, x[0], x[1], cfg, x[2], env), todo))
    trained = [r for r in results if r and r.pop("_fine_tuned")]
    inv_path = os.path.join(root, "invocations.jsonl")
    if trained:  # the measured wall of the grid: one line per invocation that fine-tuned
        with open(inv_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"started": started, "wall_s": round(time.time() - t0, 1),
                                 "units": len(trained), "load": {
                                     "mean": round(statistics.fmean(load.values), 2),
                                     "max": round(max(load.values), 2)}
                                 if load.values else None}) + "\n")
    order = {(u["task_name"], u["label"], u["seed"]): i for i, (u, _, _) in
             enumerate(sorted(todo, key=lambda x: (task_cfgs.index(x[0]["task"]),
                                                   _LABEL_ORDER(x[0]), x[0]["seed"])))}
    rows = sorted((r for r in results if r), key=lambda r: order[(r["task_name"], r["label"],
                                                                  r["seed"])])
    if not rows:
        return
    lines = score_lines(rows)
    for r in rows:
        del r["per_row"]
    used = {u["run"] for u, _, _ in todo}
    doc = {"scale": study.sc["scale"],
           "backbones": {r["name"]: _backbone(study, r) for r in study.runs
                         if r["name"] in used},
           "tasks": task_cfgs,
           "test_sets": [_test_set(task_name(t), d, int(cfg.get("max_eval", 0)))
                         for t, d in zip(task_cfgs, task_dirs)],
           "ft_pauses": m_ft, "eval_pauses": pauses, "seeds": seeds, "args": args,
           "bootstrap": dict(BOOTSTRAP, **(cfg.get("bootstrap") or {})), "jobs": jobs,
           "cpus": os.cpu_count(),
           "invocations": read_lines(inv_path) if os.path.exists(inv_path) else [],
           "rows": rows}
    doc = finish(doc, lines)
    for p in write_outputs(study.out, doc, lines):
        study.log(f"wrote {p}")
    study.results["pause_ft"] = doc
    study.sections.append(section(doc, study.results.get("runs")))


def _LABEL_ORDER(u: dict) -> int:
    fixed = ["StdPT_StdFT", "StdPT_PauseFT", "PausePT_StdFT", "PausePT_PauseFT"]
    if u["label"] in fixed:
        return fixed.index(u["label"])
    return 10 + 2 * int(u.get("matches_k", u["K"])) + (u["group"] == "flops")
