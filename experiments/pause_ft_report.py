"""The pause_ft stage's numbers and report (experiments/pause_ft.py runs the grid).

From the units' rows (each unit's score per M) and their per-row scores (each test row's score
per unit and M) this module makes the summary (mean ± sample std over the fine-tuning seeds),
the paired-bootstrap intervals of the differences between cells, `pause_ft.md` and the
stage's section of results.md. Every number and every verdict in them is computed here from
those two inputs, so `python -m experiments.pause_ft_report --render DIR` rebuilds them from
DIR/pause_ft.json and DIR/pause_ft_scores.jsonl alone (the committed experiments/results/
included), without the work directory.

Intervals (`paired_bootstrap`): for two cells of one task, each test row's score is averaged
over the cell's seeds; the difference is the mean over rows of (first - second), and its
interval the percentile interval of that mean over `resamples` resamples of the rows with
replacement (the same rows for both cells; numpy's default_rng(seed)); 10,000 resamples, seed
0 and 95 % unless `pause_ft.bootstrap` says otherwise.
"""

from __future__ import annotations

import json
import math
import os
import statistics

from .bootstrap import BOOTSTRAP, interval_side, paired_bootstrap


def read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- summary


def _agg(values: list) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals),
            "values": vals}


def summarize(rows: list, pauses: list) -> list:
    """One entry per (task, label): each M's mean/std over seeds."""
    out, order = {}, []
    for r in rows:
        key = (r["task_name"], r["label"])
        if key not in out:
            order.append(key)
            out[key] = {k: r[k] for k in ("task_name", "group", "label", "pt", "ft", "run", "m",
                                         "mult", "K", "matches_k", "metric")} | {"seeds": []}
        out[key]["seeds"].append(r["seed"])
    for key in order:
        mine = [r for r in rows if (r["task_name"], r["label"]) == key]
        out[key]["scores"] = {str(m): _agg([r["scores"].get(str(m)) for r in mine])
                              for m in pauses if any(str(m) in r["scores"] for r in mine)}
    return [out[k] for k in order]


def _fmt(a: dict | None, n_max: int = 0) -> str:
    """mean ± std, and the seed count where it is short of the table's (a grid stopped early)."""
    if not a or a["mean"] is None:
        return "n/a"
    text = f"{a['mean']:.3f} ± {a['std']:.3f}" if a["n"] > 1 else f"{a['mean']:.3f}"
    return text + (f" (n={a['n']})" if a["n"] < n_max else "")


def tables(summary: list, pauses: list, m_ft: int) -> str:
    parts = []
    for task in dict.fromkeys(s["task_name"] for s in summary):
        mine = [s for s in summary if s["task_name"] == task]
        metric = mine[0]["metric"]
        n = max(len(s["seeds"]) for s in mine)
        parts += [f"### {task} ({metric}, mean ± std over {n} fine-tuning seeds)", "",
                  "| pretraining | fine-tuning | M_ft | " +
                  " | ".join(f"M={m}" for m in pauses) + " |",
                  "|" + "---|" * (3 + len(pauses))]
        for s in (s for s in mine if s["group"] == "2x2"):
            parts.append(f"| {s['pt']} | {s['ft']} | {s['m']} | " +
                         " | ".join(_fmt(s["scores"].get(str(m)), n) for m in pauses) + " |")
        ponder = [s for s in mine if s["group"] in ("ponder", "flops")]
        if ponder:
            base = next((s for s in mine if s["label"] == "StdPT_StdFT"), None)
            parts += ["", "| backbone | K | fine-tuning steps | fine-tuning FLOPs | M=0 |",
                      "|---|---|---|---|---|"]
            if base:
                parts.append(f"| plain | 0 | 1x | 1x | {_fmt(base['scores'].get('0'), n)} |")
            for s in ponder:
                if s["group"] == "ponder":
                    parts.append(f"| {s['run']} | {s['K']} | 1x | {s['K'] + 1}x (equal tokens) "
                                 f"| {_fmt(s['scores'].get('0'), n)} |")
                else:
                    parts.append(f"| {s['run']} | 0 | {s['mult']}x | {s['mult']}x (equal FLOPs "
                                 f"with K={s['matches_k']}) | {_fmt(s['scores'].get('0'), n)} |")
        parts.append("")
    return "\n".join(parts)


# --------------------------------------------------------------------------- intervals

BASE = ("StdPT_StdFT", 0)  # the cell every other one is set against: no pauses anywhere


def score_lines(rows: list) -> list:
    """pause_ft_scores.jsonl: one line per (task, unit, seed, M), its score on each test row in
    the order of the task's test file."""
    return [{"task": r["task_name"], "label": r["label"], "seed": r["seed"], "M": int(m),
             "metric": r["metric"], "scores": v}
            for r in rows for m, v in r["per_row"].items()]


def cell_rows(lines: list, task: str, label: str, m: int) -> list | None:
    """Each test row's score of one cell at M, averaged over the cell's seeds (None: the cell
    was not scored at this M)."""
    mine = [ln["scores"] for ln in lines if (ln["task"], ln["label"], ln["M"]) == (task, label, m)]
    if not mine:
        return None
    if len({len(x) for x in mine}) != 1:
        raise ValueError(f"pause_ft: {task}/{label} M={m}: the seeds scored different numbers "
                         f"of test rows")
    return [statistics.fmean(col) for col in zip(*mine)]


def planned_comparisons(summary: list, m_ft: int) -> list:
    """(task, kind, (label, M), (label, M)): the difference first minus second.
    2x2: each cell at its own M against StdPT + StdFT; collapse: a PauseFT cell without
    pauses against itself with M_ft; converse: PausePT + StdFT given M_ft pauses against
    itself without; ponder: K against K = 0; flops: the K = 0 model fine-tuned (K+1)x the
    steps against K."""
    out = []
    for task in dict.fromkeys(s["task_name"] for s in summary):
        labels = {s["label"]: s for s in summary if s["task_name"] == task}
        if BASE[0] not in labels:
            continue
        for label in ("StdPT_PauseFT", "PausePT_StdFT", "PausePT_PauseFT"):
            if label in labels:
                out.append((task, "2x2", (label, labels[label]["m"]), BASE))
        for label in ("StdPT_PauseFT", "PausePT_PauseFT"):
            if label in labels:
                out.append((task, "collapse", (label, 0), (label, m_ft)))
        if "PausePT_StdFT" in labels:
            out.append((task, "converse", ("PausePT_StdFT", m_ft), ("PausePT_StdFT", 0)))
        for s in labels.values():
            if s["group"] == "ponder":
                out.append((task, "ponder", (s["label"], 0), BASE))
            elif s["group"] == "flops" and f"K{s['matches_k']}" in labels:
                out.append((task, "flops", (s["label"], 0), (f"K{s['matches_k']}", 0)))
    return out


def intervals(summary: list, lines: list, m_ft: int, boot: dict) -> list:
    out = []
    for task, kind, a, b in planned_comparisons(summary, m_ft):
        ra, rb = cell_rows(lines, task, *a), cell_rows(lines, task, *b)
        if ra is None or rb is None:
            continue
        out.append({"task": task, "kind": kind, "a": {"label": a[0], "M": a[1]},
                    "b": {"label": b[0], "M": b[1]},
                    **paired_bootstrap(ra, rb, int(boot["resamples"]), int(boot["seed"]),
                                       float(boot["level"]))})
    return out


def finish(doc: dict, lines: list) -> dict:
    """The derived part of pause_ft.json (summary, intervals) from its rows and the per-row
    scores; each unit's score must be the mean of its per-row scores."""
    for r in doc["rows"]:
        for m, value in r["scores"].items():
            if value is None:
                continue
            mine = [ln["scores"] for ln in lines if (ln["task"], ln["label"], ln["seed"], ln["M"])
                    == (r["task_name"], r["label"], r["seed"], int(m))]
            if len(mine) != 1 or abs(statistics.fmean(mine[0]) - value) > 1e-9:
                raise ValueError(f"pause_ft: {r['task_name']}/{r['label']}/s{r['seed']} M={m}: "
                                 f"score {value} has no matching per-row scores")
    doc["summary"] = summarize(doc["rows"], doc["eval_pauses"])
    doc["bootstrap"] = dict(BOOTSTRAP, **(doc.get("bootstrap") or {}))
    doc["intervals"] = intervals(doc["summary"], lines, doc["ft_pauses"], doc["bootstrap"])
    return doc


# --------------------------------------------------------------------------- markdown

CELL_NAMES = {"StdPT_StdFT": "StdPT + StdFT", "StdPT_PauseFT": "StdPT + PauseFT",
              "PausePT_StdFT": "PausePT + StdFT", "PausePT_PauseFT": "PausePT + PauseFT"}
PAPER = ("The pause paper (Goyal et al., a 1B model) reports gains over StdPT + StdFT mostly "
         "when both stages use pauses (+18 % EM on SQuAD, +8 % on CommonsenseQA, +1 % on "
         "GSM8k), a collapse of pause-fine-tuned models given 0 pauses, and that ~2 pauses "
         "already help.")


def _cell(label: str) -> str:
    if label in CELL_NAMES:
        return CELL_NAMES[label]
    if label.startswith("K0x"):
        return f"K = 0, {label[3:]}x steps"
    return f"K = {label[1:]}"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}".replace("+0.0", "0.0").replace("-0.0", "0.0")


def _iv(c: dict) -> str:
    return f"{_pts(c['diff'])} [{_pts(c['lo'])}, {_pts(c['hi'])}]"


def _span(values: list) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.3f}" if f"{lo:.3f}" == f"{hi:.3f}" else f"{lo:.3f}–{hi:.3f}"


def interval_table(doc: dict) -> str:
    level = round(100 * float(doc["bootstrap"]["level"]))
    lines = [f"| task | difference | what it measures | points, {level} % interval | "
             f"the interval |", "|---|---|---|---|---|"]
    what = {"2x2": "pauses in pretraining / fine-tuning", "collapse": "0 pauses at inference",
            "converse": "pauses given to a StdFT model", "ponder": "pondering, equal tokens",
            "flops": "more steps instead of pondering, equal fine-tuning FLOPs"}
    for c in doc["intervals"]:
        lines.append(f"| {c['task']} | {_cell(c['a']['label'])} (M={c['a']['M']}) − "
                     f"{_cell(c['b']['label'])} (M={c['b']['M']}) | {what[c['kind']]} | "
                     f"{_iv(c)} | {interval_side(c)} |")
    return "\n".join(lines)


def _how_computed(doc: dict) -> str:
    b = doc["bootstrap"]
    return (f"Differences are in points (×100) of the task's metric: the mean over the test rows "
            f"of each row's score averaged over the fine-tuning seeds, first cell minus second. "
            f"Intervals: paired bootstrap over the test rows ({int(b['resamples']):,} resamples "
            f"of the rows with replacement, the same rows for both cells, numpy "
            f"`default_rng({b['seed']})`), the {100 * float(b['level']):g} % percentile "
            f"interval. They measure the noise of the test set and of the seeds' average, not "
            f"that of pretraining.")


def backbone_provenance(doc: dict, study_runs: dict | None) -> str:
    """Where the backbones come from, and whether their validation losses are those of the
    study's runs of the same names (`study_runs`: results.json's "runs"), which they need not
    be: the stage may have trained them again."""
    bb = doc["backbones"]
    seeds = sorted({b.get("seed") for b in bb.values() if b.get("seed") is not None})
    text = (f"The backbones were trained for this stage with the study's settings and seed "
            f"{', '.join(map(str, seeds))} (`pause_ft.md` says how).")
    if not study_runs:
        return text
    gaps = {name: abs(b["valid_loss"] - study_runs[name]["final"]["valid_loss"])
            for name, b in bb.items() if (study_runs.get(name) or {}).get("final")}
    if not gaps:
        return text
    if max(gaps.values()) < 5e-5:
        return (text + f" Their validation losses equal those of the same runs in the tables "
                f"above to 4 decimals (largest difference {max(gaps.values()):.1e}).")
    worst = max(gaps, key=gaps.get)
    return (text + f" Their validation losses differ from those of the same runs in the tables "
            f"above by up to {gaps[worst]:.4f} (`{worst}`), so they are not the same models.")


def section(doc: dict, study_runs: dict | None = None) -> str:
    """The stage's section of results.md; `study_runs` is results.json's "runs"."""
    tasks = [t["name"] for t in doc["test_sets"]]
    return "\n".join([
        "## Pause fine-tuning: the 2x2 (StdPT/PausePT x StdFT/PauseFT) and pondering K", "",
        f"Tasks: {', '.join('`' + t + '`' for t in tasks)}; backbones: the study's `plain` "
        f"(StdPT), `pause` (PausePT) and `ponder_k*` runs; StdFT = `sft --pauses 0`, PauseFT = "
        f"`sft --pauses {doc['ft_pauses']}`; fine-tuning seeds {doc['seeds']}; each model "
        f"scored with M pauses at inference (experiments/pause_ft.py). {PAPER} The full "
        f"report, with what the numbers do and do not show: `pause_ft.md`; every test row's "
        f"score: `pause_ft_scores.jsonl`.", "", backbone_provenance(doc, study_runs), "",
        tables(doc["summary"], doc["eval_pauses"], doc["ft_pauses"]),
        "### Differences between cells", "", _how_computed(doc), "", interval_table(doc), ""])


def _find(doc: dict, task: str, kind: str, label: str) -> dict | None:
    return next((c for c in doc["intervals"] if (c["task"], c["kind"], c["a"]["label"])
                 == (task, kind, label)), None)


def _means(doc: dict, task: str, labels, m: int) -> list:
    return [s["scores"][str(m)]["mean"] for s in doc["summary"]
            if s["task_name"] == task and s["label"] in labels
            and (s["scores"].get(str(m)) or {}).get("mean") is not None]


def _tally(comparisons: list) -> str:
    above = sum(c["lo"] > 0 for c in comparisons)
    below = sum(c["hi"] < 0 for c in comparisons)
    return (f"of {len(comparisons)} differences, {above} with an interval above 0, {below} "
            f"below 0, {len(comparisons) - above - below} including 0")


def _per_task(tasks: list, comparisons: list, describe) -> list:
    """One bullet per task: its comparisons, described, separated by semicolons."""
    out = []
    for task in tasks:
        cs = [c for c in comparisons if c["task"] == task]
        if cs:
            out.append(f"- `{task}`: " + "; ".join(describe(c) for c in cs) + ".")
    return out


def findings(doc: dict) -> list:
    """What the numbers show, each sentence computed from them."""
    m_ft, out = doc["ft_pauses"], []
    tasks = list(dict.fromkeys(s["task_name"] for s in doc["summary"]))
    floors = {t["name"]: t["empty_answer_score"] for t in doc["test_sets"]}
    pause_ft_cells = ("StdPT_PauseFT", "PausePT_PauseFT")
    collapse = [c for c in doc["intervals"] if c["kind"] == "collapse"]
    if collapse:
        every = all(c["hi"] < 0 for c in collapse)
        out += [f"**Collapse without pauses: {'every' if every else 'not every'} "
                f"pause-fine-tuned cell falls with M = 0** (its interval against the same "
                f"models with M = {m_ft} is "
                f"{'below 0 in every case' if every else 'not always below 0'}).", ""]
        for task in tasks:
            at0, atm = _means(doc, task, pause_ft_cells, 0), _means(doc, task, pause_ft_cells,
                                                                   m_ft)
            if not at0 or not atm:
                continue
            cs = [c for c in collapse if c["task"] == task]
            floor = (f"; an empty prediction scores {floors[task]:.3f} here"
                     if floors.get(task) else "")
            out.append(f"- `{task}`: {_span(at0)} with 0 pauses against {_span(atm)} with "
                       f"{m_ft} ({'; '.join(_cell(c['a']['label']) + ' ' + _iv(c) for c in cs)})"
                       f"{floor}.")
        conv = [c for c in doc["intervals"] if c["kind"] == "converse"]
        for c in conv:
            given = [m for m in doc["eval_pauses"] if m]
            at = _means(doc, c["task"], ("PausePT_StdFT",), 0)
            withp = [x for m in given for x in _means(doc, c["task"], ("PausePT_StdFT",), m)]
            out.append(f"- The converse on `{c['task']}`: PausePT + StdFT scores "
                       f"{_span(at)} without pauses and {_span(withp)} when given "
                       f"{', '.join(map(str, given))} pauses (M = {m_ft}: {_iv(c)}).")
        few = min((m for m in doc["eval_pauses"] if 0 < m < m_ft), default=None)
        if few is not None:
            parts = []
            for task in tasks:
                for label in pause_ft_cells:
                    a, b = _means(doc, task, (label,), few), _means(doc, task, (label,), m_ft)
                    if a and b and b[0] > 0:
                        parts.append(f"{_cell(label)} on `{task}` {a[0]:.3f} of {b[0]:.3f} "
                                     f"({100 * a[0] / b[0]:.0f} %)")
            if parts:
                out.append(f"- With {few} pauses instead of {m_ft}, the pause-fine-tuned cells "
                           f"score: {'; '.join(parts)}.")
        out.append("")
    out += ["**PausePT + PauseFT, task by task**, against StdPT + StdFT (both stages without "
            "pauses). " + PAPER, ""]
    for task in tasks:
        both = _find(doc, task, "2x2", "PausePT_PauseFT")
        singles = [c for c in (_find(doc, task, "2x2", x) for x in ("StdPT_PauseFT",
                                                                     "PausePT_StdFT")) if c]
        if not both:
            continue
        s_both = next(s for s in doc["summary"] if (s["task_name"], s["label"])
                      == (task, "PausePT_PauseFT"))
        s_base = next(s for s in doc["summary"] if (s["task_name"], s["label"]) == (task, BASE[0]))
        a, b = s_both["scores"][str(both["a"]["M"])], s_base["scores"]["0"]
        if both["lo"] > 0 and not any(c["lo"] > 0 for c in singles):
            verdict = ("a gain whose interval is above 0, while neither single-stage cell's "
                       "is: the paper's pattern")
        elif both["lo"] > 0:
            verdict = "a gain whose interval is above 0, but a single-stage cell gains too"
        elif both["hi"] < 0:
            verdict = "a loss: the interval is below 0"
        else:
            verdict = "no difference that the interval separates from 0"
        spread = max(a["std"] or 0.0, b["std"] or 0.0)
        out.append(f"- `{task}`: {_fmt(a)} against {_fmt(b)}, {_iv(both)}: {verdict}. The "
                   f"difference is {'larger' if abs(both['diff']) > spread else 'not larger'} "
                   f"than the larger seed std ({100 * spread:.1f} points). Single-stage cells: "
                   + "; ".join(f"{_cell(c['a']['label'])} {_iv(c)}" for c in singles) + ".")
    out += [f"- PauseFT also spends {m_ft} extra positions of compute per answer.", ""]
    ponder = [c for c in doc["intervals"] if c["kind"] == "ponder"]
    if ponder:
        out += [f"**Pondering K fine-tuned at equal tokens**, against K = 0 (StdPT + StdFT): "
                f"{_tally(ponder)}.", ""]
        out += _per_task(tasks, ponder, lambda c: f"{_cell(c['a']['label'])} {_iv(c)}, "
                                                  f"{interval_side(c)}")
        bb = doc["backbones"]
        ks = sorted({int(c["a"]["label"][1:]) for c in ponder})
        if "plain" in bb and all(f"ponder_k{k}" in bb for k in ks) and \
                bb["plain"].get("valid_loss") is not None:
            losses_k = [bb[f"ponder_k{k}"]["valid_loss"] for k in ks]
            lower = all(x < bb["plain"]["valid_loss"] for x in losses_k)
            out.append(f"- The pondering backbones' pretraining validation loss "
                       f"({', '.join(f'{x:.3f}' for x in losses_k)} for K = "
                       f"{', '.join(map(str, ks))}) is {'below' if lower else 'not always below'}"
                       f" plain's ({bb['plain']['valid_loss']:.3f}). PonderingLM's claim "
                       f"concerns language-modelling loss (70M parameters, 30B tokens: Pile "
                       f"perplexity 16.95 plain, 14.16 with K = 3) and downstream scores of much "
                       f"larger models; the differences above say whether that loss carries over "
                       f"to a task fine-tuned for {_steps(doc)} steps here.")
        out.append("")
    flops = [c for c in doc["intervals"] if c["kind"] == "flops"]
    if flops:
        runs = sorted({s["run"] for s in doc["summary"] if s["group"] == "flops"})
        out += [f"**Equal fine-tuning FLOPs**: the K = 0 model fine-tuned for (K+1)x the steps "
                f"against pondering K (above 0: more steps win; below 0: pondering wins): "
                f"{_tally(flops)}.", ""]
        out += _per_task(tasks, flops, lambda c: f"{_cell(c['a']['label'])} − "
                                                 f"{_cell(c['b']['label'])} {_iv(c)}")
        bb = doc["backbones"]
        if runs == ["plain"] and "plain" in bb:
            ratios = [bb[f"ponder_k{int(c['b']['label'][1:])}"]["pretraining_flops"]
                      / bb["plain"]["pretraining_flops"] for c in flops
                      if f"ponder_k{int(c['b']['label'][1:])}" in bb]
            out.append(f"- Only the fine-tuning FLOPs are matched: the K = 0 rows start from "
                       f"`plain`, so the pondering backbones had "
                       f"{min(ratios):.2f}–{max(ratios):.2f}x its pretraining FLOPs, which "
                       f"favours pondering.")
        else:
            out.append(f"- The K = 0 rows start from {', '.join('`' + r + '`' for r in runs)}: "
                       f"`plain_x{{K+1}}` matches the pretraining FLOPs too, `plain` only the "
                       f"fine-tuning FLOPs.")
        out.append("")
    wide = [s for s in doc["summary"] for m, a in s["scores"].items()
            if a.get("n", 0) > 1 and a["std"] > 0.05]
    if wide:
        out += ["**Cells whose seeds disagree** (sample std above 0.05):", ""]
        for s in doc["summary"]:
            for m, a in s["scores"].items():
                if a.get("n", 0) > 1 and a["std"] > 0.05:
                    out.append(f"- `{s['task_name']}` {_cell(s['label'])} at M = {m}: "
                               f"{_fmt(a)}, the seeds give "
                               f"{', '.join(f'{v:.3f}' for v in a['values'])}.")
        out.append("")
    return out


def _steps(doc: dict) -> str:
    args = doc["args"]
    return args[args.index("--max-steps") + 1] if "--max-steps" in args else "the configured"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def report(doc: dict) -> str:
    """pause_ft.md."""
    m_ft, seeds, bb = doc["ft_pauses"], doc["seeds"], doc["backbones"]
    scale = "" if doc["scale"] == "cpu" else f" --scale {doc['scale']}"
    lines = [f"# Pause fine-tuning and pondering under fine-tuning, at `{doc['scale']}` scale "
             f"(stage `pause_ft`)", "",
             "Generated by experiments/pause_ft_report.py from `pause_ft.json` (settings, "
             "backbones, every unit's scores) and `pause_ft_scores.jsonl` (every unit's score on "
             "each test row); `python -m experiments.pause_ft_report --render DIR` rebuilds it "
             "from those two files.", "", "## How this was run", "",
             f"    python -m experiments.study{scale} --out OUT --only "
             f"{' '.join(sorted(bb, key=_RUN_ORDER))} \\",
             "        --set runs.seeded=[plain] --stages runs     # the backbones",
             f"    python -m experiments.study{scale} --out OUT --stages pause_ft report", ""]
    trained = [b["train_wall_s"] for b in bb.values() if b.get("train_wall_s")]
    units = [r for r in doc["rows"] if r.get("sft_wall_s")]
    loads = [r["load_1min"] for r in units if r.get("load_1min") is not None]
    timing = []
    if trained:
        timing.append(f"The backbones' training processes took {_minutes(sum(trained))} in all "
                      f"(the study trains 2 at a time).")
    if units:
        timing.append(f"The {len(doc['rows'])} fine-tunings' `sft` processes took "
                      f"{_minutes(sum(r['sft_wall_s'] for r in units))} in all")
        if doc.get("jobs"):
            timing[-1] += f", {doc['jobs']} at a time"
        timing[-1] += ("; the 1-minute load average at their ends was "
                       f"{statistics.fmean(loads):.1f} on average (max {max(loads):.1f}) on "
                       f"{doc.get('cpus') or '?'} cores." if loads else ".")
    for inv in doc.get("invocations", []):
        load = inv.get("load") or {}
        timing.append(f"The stage ran {inv['units']} fine-tunings in {_minutes(inv['wall_s'])} "
                      f"of wall time from {inv['started']}"
                      + (f" (1-minute load average {load['mean']:.1f}, max {load['max']:.1f})"
                         if load else "") + ".")
    if timing:
        lines += [" ".join(timing), ""]
    what = {"plain": "StdPT, and the K = 0 model", "pause": "PausePT"}
    lines += ["**Backbones**, from the study's runs:", "",
              "| run | what it is | seed | parameters | pretraining tokens | pretraining FLOPs | "
              "validation loss |", "|---|---|---|---|---|---|---|"]
    for name in sorted(bb, key=_RUN_ORDER):
        b = bb[name]
        desc = what.get(name) or (f"pondering, K = {b['ponder_steps']}" if b["ponder_steps"]
                                  else f"plain on {b['tokens'] / bb['plain']['tokens']:.0f}x "
                                  f"the tokens" if "plain" in bb else name)
        if b.get("pause_rate"):
            desc += f", pause rate {b['pause_rate']}"
        lines.append(f"| `{name}` | {desc} | {b['seed']} | {b['params']:,} | {b['tokens']:,} | "
                     f"{b['pretraining_flops']:.3g} | "
                     + (f"{b['valid_loss']:.3f}" if b.get("valid_loss") is not None else "n/a")
                     + " |")
    lines += ["", "Pretraining FLOPs: `ponder_pt.engine.flops.flops_per_token` (all K+1 passes) "
              "times the training tokens, as in results.md.", "", "**Tasks**, scored on their "
              "test rows:", ""]
    for t, info in zip(doc["tasks"], doc["test_sets"]):
        if t["kind"] == "corpus":
            desc = (f"{t['context_words']} words of a docstring then ` first:`, the answer the "
                    f"first word (span copy)" if t.get("mode") == "first" else
                    f"{t['context_words']} words of a docstring, the answer the next word, "
                    f"which occurs among them (recall)")
            desc += "; train rows from the training documents, test rows from held-out ones"
        else:
            desc = f"`ponder-pt sft-task {t['kind']} --level {t['level']}`"
        floor = (f" An empty (or article-only) prediction scores {info['empty_answer_score']:.3f}"
                 f" on the test rows (SQuAD's normalisation turns such answers into the empty "
                 f"string): that is the floor." if info["empty_answer_score"] else "")
        lines.append(f"- `{info['name']}`: {desc}; {t['train']} train, {t['validation']} "
                     f"validation, {info['rows']} test rows, {info['metric']}.{floor}")
    lines += ["", f"**Fine-tuning.** Every unit is `ponder-pt sft {' '.join(doc['args'])}` with "
              f"`--seed` {', '.join(map(str, seeds))}; StdFT is `--pauses 0`, PauseFT "
              f"`--pauses {m_ft}`; the equal-FLOPs rows multiply the steps. Every model is scored "
              f"greedily on the same test rows with M = {', '.join(map(str, doc['eval_pauses']))}"
              f" pauses (a model without a `<pause>` row at M = 0 only), the answer read after "
              f"the last pause.", "",
              f"**Seeds and noise.** Cells are mean ± sample std over the {len(seeds)} "
              f"fine-tuning seeds, which change the fine-tuning only (not the backbone nor the "
              f"test rows)."]
    for s in doc["summary"]:
        if s["label"] == BASE[0] and s["scores"]["0"]["mean"] is not None:
            p, n = s["scores"]["0"]["mean"], next(t["rows"] for t in doc["test_sets"]
                                                  if t["name"] == s["task_name"])
            lines[-1] += (f" On `{s['task_name']}` one seed's binomial standard error at "
                          f"StdPT + StdFT's {p:.3f} is ±{100 * math.sqrt(p * (1 - p) / n):.1f} "
                          f"points.")
    lines += ["", _how_computed(doc), "", "## The tables", "",
              tables(doc["summary"], doc["eval_pauses"], m_ft),
              f"## Differences with {100 * float(doc['bootstrap']['level']):g} % intervals",
              "", interval_table(doc), "", "## What the numbers show", "", *findings(doc),
              "## Limits", "",
              f"- One backbone seed per pretraining "
              f"({', '.join(sorted({str(b['seed']) for b in bb.values()}))}); the fine-tuning "
              f"seeds do not capture pretraining variance, and the intervals do not either.",
              f"- {len(doc['test_sets'])} small tasks of "
              f"{', '.join(str(t['rows']) for t in doc['test_sets'])} test rows, fine-tuned for "
              f"{_steps(doc)} steps."]
    if any(t["empty_answer_score"] for t in doc["test_sets"]):
        lines.append("- A task with an empty-answer floor (above) compresses the differences "
                     "near it.")
    if doc["scale"] == "cpu":
        lines.append("- `--scale gpu` (configs/gpu.yaml) is the larger version: "
                     "`variables --level 2` and a 32-word recall task, 5 seeds, 2000 steps, "
                     "and every equal-FLOPs row on the `plain_x{K+1}` backbones, which match "
                     "the pretraining FLOPs as well.")
    return "\n".join(lines) + "\n"


def _RUN_ORDER(name: str) -> tuple:
    return ({"plain": 0, "pause": 1}.get(name, 2), name)


# --------------------------------------------------------------------------- outputs


def write_outputs(out_dir: str, doc: dict, lines: list) -> list:
    """pause_ft.json, pause_ft_scores.jsonl and pause_ft.md in `out_dir`."""
    paths = [os.path.join(out_dir, n) for n in ("pause_ft.json", "pause_ft_scores.jsonl",
                                                "pause_ft.md")]
    write_json(paths[0], doc)
    with open(paths[1] + ".tmp", "w", encoding="utf-8") as fh:
        for ln in lines:
            fh.write(json.dumps(ln) + "\n")
    os.replace(paths[1] + ".tmp", paths[1])
    with open(paths[2] + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(report(doc))
    os.replace(paths[2] + ".tmp", paths[2])
    return paths


def splice_section(markdown: str, text: str) -> str:
    """`markdown` with its pause_ft section (from its heading to the next level-2 heading)
    replaced by `text`, or `text` added before an Errors section / at the end."""
    head = text.splitlines()[0]
    lines = markdown.rstrip("\n").split("\n")
    if head in lines:
        start = lines.index(head)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
    else:
        start = end = lines.index("## Errors") if "## Errors" in lines else len(lines)
        if start == len(lines) and lines[-1]:
            lines.append("")
            start = end = len(lines)
    return "\n".join(lines[:start] + text.rstrip("\n").split("\n") + [""] + lines[end:]) \
        .rstrip("\n") + "\n"


def read_lines(path: str) -> list:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def render(out_dir: str) -> list:
    """Rebuild the summary, the intervals and the markdown from DIR/pause_ft.json and
    DIR/pause_ft_scores.jsonl; put the section into DIR/results.md and the document under
    "pause_ft" in DIR/results.json, where those exist."""
    doc = read_json(os.path.join(out_dir, "pause_ft.json"))
    if doc is None:
        raise SystemExit(f"pause_ft_report: no {out_dir}/pause_ft.json")
    lines = read_lines(os.path.join(out_dir, "pause_ft_scores.jsonl"))
    doc = finish(doc, lines)
    paths = write_outputs(out_dir, doc, lines)
    results = read_json(os.path.join(out_dir, "results.json"))
    return paths + add_to_results(out_dir, "pause_ft", doc,
                                  section(doc, (results or {}).get("runs")))


def add_to_results(out_dir: str, key: str, doc: dict, text: str) -> list:
    """A stage's section spliced into DIR/results.md and its document put under `key` in
    DIR/results.json, where those exist (each replaced atomically); the paths written."""
    paths = []
    md_path = os.path.join(out_dir, "results.md")
    if os.path.exists(md_path):
        with open(md_path, encoding="utf-8") as fh:
            merged = splice_section(fh.read(), text)
        with open(md_path + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(merged)
        os.replace(md_path + ".tmp", md_path)
        paths.append(md_path)
    js_path = os.path.join(out_dir, "results.json")
    results = read_json(js_path)
    if results is not None:
        results[key] = doc
        with open(js_path + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(json.dumps(results, indent=1))
        os.replace(js_path + ".tmp", js_path)
        paths.append(js_path)
    return paths


def render_main(argv, prog: str, what: str, needs: str, render_fn) -> int:
    """`python -m PROG --render DIR`: rebuild a stage's report (`render_fn(DIR)`)."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=f"Rebuild the {what} report")
    ap.add_argument("--render", metavar="DIR", required=True,
                    help=f"a directory with {needs} (a study's --out, or experiments/results)")
    for p in render_fn(ap.parse_args(argv).render):
        print(f"wrote {p}")
    return 0


def main(argv=None) -> int:
    return render_main(argv, "python -m experiments.pause_ft_report", "pause_ft",
                       "pause_ft.json and pause_ft_scores.jsonl", render)


if __name__ == "__main__":
    raise SystemExit(main())
