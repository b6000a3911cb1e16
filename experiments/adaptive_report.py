"""The adaptive stage's numbers and report (experiments/adaptive.py trains and scores).

Everything here is computed from adaptive.json alone, so `python -m experiments.adaptive
--render DIR` rebuilds adaptive.md, adaptive.png and the results.md section from DIR/adaptive.json,
and `--readme experiments/README.md` the README's block from the json its marker names:

    <!-- adaptive-table results/adaptive.json -->
    ...written here...
    <!-- /adaptive-table -->

(`--check` changes nothing and exits 1 where the block differs; tests/test_adaptive_report.py
runs it on the committed files).

The report uses every run the json's plan asked for (every fixed-K seed, every variant's seed)
and every random draw its settings asked for, or it fails naming what is missing and the
command that makes it. Halting against random exits: per q, each window's loss averaged over a
group's seeds (the random one also over the draws), and a paired bootstrap over the windows
(experiments/bootstrap.py) of halting − random; a q counts as a win only where the interval
lies below 0. Where every token exits at one pass a shuffle changes nothing: the point is
"same exits", never a win.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from typing import Optional

from .bootstrap import BOOTSTRAP, interval_side, paired_bootstrap
from .pause_ft_report import add_to_results, write_json

FORMAT = 2  # adaptive.json with the plan, the stage's wall time and every window's loss
HEADING = "## Adaptive pondering (halting over the pondering passes)"
GOAL_SHARE, GOAL_LOSS = 0.6, 0.01  # <= 60 % of fixed K's passes, loss within 1 %
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
BLOCK = re.compile(r"(<!-- adaptive-table (\S+) -->\n)(.*?)(<!-- /adaptive-table -->)", re.S)


def train_hint(scale: str, out: str, names: list) -> str:
    """What trains the study runs `names` (the runs stage's seeds) for the adaptive stage."""
    return (f"train {'it' if len(names) == 1 else 'them'} with `python -m experiments.study "
            f"--scale {scale} --out {out} --stages runs --only {' '.join(names)}` (with the "
            f"study's other --set / --train-set options), then run the adaptive stage again "
            f"(`--stages adaptive`)")


def _rerun(doc: dict) -> str:
    return (f"`python -m experiments.study --scale {doc.get('scale', 'cpu')} --out OUT --stages "
            f"adaptive` (OUT: the study's --out; it trains what is missing and rescores)")


# --------------------------------------------------------------------------- checks


def check_complete(doc: dict, source: str = "adaptive.json") -> None:
    """Every run of the plan is in the document (read from `source`) and every curve point has
    every window and every random draw; a SystemExit names what is missing otherwise."""
    if doc.get("format") != FORMAT:
        raise SystemExit(
            f"adaptive report: {source} has format {doc.get('format')!r}, the report "
            f"reads format {FORMAT} (the plan it was asked for, every window's loss for the "
            f"paired intervals, the stage's wall time); an older adaptive stage wrote it: "
            f"rerun the stage, {_rerun(doc)}")
    planned = doc["planned"]
    for part, what in (("fixed", "fixed-K run"), ("runs", "adaptive run")):
        missing = [n for n in planned[part] if n not in doc[part]]
        extra = [n for n in doc[part] if n not in planned[part]]
        if missing:
            how = (train_hint(doc["scale"], "OUT", missing) if part == "fixed"
                   else f"rerun the stage, {_rerun(doc)}")
            raise SystemExit(f"adaptive report: the plan asked for the {what}(s) "
                             f"{', '.join(missing)}, which {source} does not have: {how}")
        if extra:
            raise SystemExit(f"adaptive report: {source} has {what}(s) "
                             f"{', '.join(extra)} that its plan ({', '.join(planned[part])}) "
                             f"did not ask for: rerun the stage, {_rerun(doc)}")
    draws, windows = int(doc["settings"]["random_draws"]), int(doc["windows"])
    for name, r in doc["runs"].items():
        if not r["curve"]:
            raise SystemExit(f"adaptive report: {name} was scored at no q (adaptive.qs is "
                             f"empty): set adaptive.qs and rerun the stage, {_rerun(doc)}")
        for c in r["curve"]:
            if len(c["random_draws"]) != draws:
                raise SystemExit(f"adaptive report: {name} at q = {c['q']:g} has "
                                 f"{len(c['random_draws'])} random draws, the settings ask for "
                                 f"{draws}: rerun the stage, {_rerun(doc)}")
            if not len(c["loss_windows"]) == len(c["random_windows"]) == windows:
                raise SystemExit(f"adaptive report: {name} at q = {c['q']:g} has "
                                 f"{len(c['loss_windows'])} / {len(c['random_windows'])} "
                                 f"window losses for {windows} windows: rerun the stage, "
                                 f"{_rerun(doc)}")


def _mean(values: list) -> float:
    if not values or any(v is None for v in values):
        raise ValueError(f"a mean over {values!r}: every value must be there")
    return statistics.fmean(values)


def _std(values: list) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _columns_mean(rows: list) -> list:
    return [statistics.fmean(col) for col in zip(*rows, strict=True)]


# --------------------------------------------------------------------------- verdicts


def point_verdict(vs: dict, same_exits: bool) -> str:
    """One q: "same exits" (every token exits at one pass, so the shuffle is the scoring
    itself), else "win" / "loss" where the interval of halting − random lies below / above 0,
    else "tie" (within noise; an interval of exactly [0, 0] too)."""
    if same_exits:
        return "same exits"
    return {"below 0": "win", "above 0": "loss", "includes 0": "tie"}[interval_side(vs)]


def tally(curve: list) -> dict:
    """The q values of each verdict over a group's curve; an empty curve is an error (a claim
    over no thresholds would pass vacuously)."""
    if not curve:
        raise ValueError("tally: an empty curve (no q scored) supports no verdict")
    out = {"win": [], "loss": [], "tie": [], "same exits": []}
    for c in curve:
        out[c["verdict"]].append(c["q"])
    return out


def beats_random(t: dict) -> Optional[bool]:
    """True: a win at every q where the exits differ; False: some such q is not a win; None:
    no q where the exits differ (nothing compared)."""
    contested = len(t["win"]) + len(t["loss"]) + len(t["tie"])
    return None if contested == 0 else len(t["win"]) == contested


# --------------------------------------------------------------------------- summary


def _group_curve(rows: list, boot: dict) -> list:
    qs = [[c["q"] for c in r["curve"]] for r in rows]
    if any(q != qs[0] for q in qs):
        raise SystemExit(f"adaptive report: the seeds of {rows[0]['group']} were scored at "
                         f"different q values ({qs}): rerun the stage")
    curve = []
    for i, point in enumerate(rows[0]["curve"]):
        at = [r["curve"][i] for r in rows]
        vs = paired_bootstrap(_columns_mean([a["loss_windows"] for a in at]),
                              _columns_mean([a["random_windows"] for a in at]),
                              int(boot["resamples"]), int(boot["seed"]), float(boot["level"]))
        same = all(max(a["hist"]) == 1.0 for a in at)
        curve.append({"q": point["q"], "passes": _mean([a["passes"] for a in at]),
                      "loss": _mean([a["loss"] for a in at]),
                      "loss_std": _std([a["loss"] for a in at]),
                      "random_loss": _mean([statistics.fmean(a["random_draws"]) for a in at]),
                      "random_draw_std": _mean([_std(a["random_draws"]) for a in at]),
                      "vs_random": vs, "verdict": point_verdict(vs, same)})
    return curve


def _by_exit(rows: list) -> list:
    """Per exit pass, pooled over the seeds' tokens (a pass no token took has no loss)."""
    out = []
    for j, b in enumerate(rows[0]["by_exit"]):
        n = sum(r["by_exit"][j]["tokens"] for r in rows)
        total = sum(sum(x["tokens"] for x in r["by_exit"]) for r in rows)
        out.append({"pass": b["pass"], "share": n / total, "tokens": n,
                    "loss": sum(r["by_exit"][j]["ce_sum"] for r in rows) / n if n else None,
                    "fixed_k_loss": (sum(r["by_exit"][j]["fixed_k_ce_sum"] for r in rows) / n
                                     if n else None)})
    return out


def summarise(doc: dict, source: str = "adaptive.json") -> dict:
    """Per group (seeds averaged): the curve with the intervals against random exits, the
    fixed-K rows, the goal and the verdicts; fails (check_complete) on a partial document."""
    check_complete(doc, source)
    K = doc["K"]
    boot = doc["bootstrap"] = dict(BOOTSTRAP, **(doc.get("bootstrap") or {}))
    fixed: dict = {}
    for name in doc["planned"]["fixed"]:
        fixed.setdefault(doc["fixed"][name]["K"], []).append(doc["fixed"][name])
    doc["fixed_summary"] = {k: {"loss": _mean([r["loss"] for r in v]),
                                "std": _std([r["loss"] for r in v]), "n": len(v),
                                "seeds": [r["seed"] for r in v]}
                            for k, v in sorted(fixed.items())}
    ref = doc["fixed_summary"].get(K, {}).get("loss")
    groups: dict = {}
    for name in doc["planned"]["runs"]:
        groups.setdefault(doc["runs"][name]["group"], []).append(doc["runs"][name])
    summary = {}
    for group, rows in groups.items():
        curve = _group_curve(rows, boot)
        t = tally(curve)
        within = [c for c in curve if c["passes"] <= GOAL_SHARE * (K + 1)]
        best = min(within, key=lambda c: c["loss"]) if within else None
        goal = None
        if best is not None and ref is not None:
            goal = {"q": best["q"], "passes": best["passes"], "loss": best["loss"],
                    "fixed_k_loss": ref, "gap": best["loss"] / ref - 1.0,
                    "met": best["loss"] <= (1 + GOAL_LOSS) * ref}
            # the fixed K that pays at least as many passes: the equal-compute comparison
            k = min((int(k) for k in doc["fixed_summary"] if int(k) + 1 >= best["passes"]),
                    default=None)
            if k is not None:
                loss = doc["fixed_summary"][k]["loss"]
                goal["equal_compute"] = {"K": k, "loss": loss, "gap": best["loss"] / loss - 1.0,
                                         "n": doc["fixed_summary"][k]["n"]}
        by_exit = _by_exit(rows)
        easy_first = [b["fixed_k_loss"] for b in by_exit if b["fixed_k_loss"] is not None]
        summary[group] = {"variant": rows[0]["variant"], "seeds": [r["seed"] for r in rows],
                          "own_fixed_k_loss": _mean([r["fixed_k_loss"] for r in rows]),
                          "curve": curve, "tally": t, "beats_random": beats_random(t),
                          "goal": goal, "by_exit": by_exit, "by_exit_q": rows[0]["by_exit_q"],
                          "easy_exit_first": (len(easy_first) > 1
                                              and easy_first == sorted(easy_first))}
    doc["summary"] = summary
    return doc


# --------------------------------------------------------------------------- markdown


def _fmt(x: Optional[float], digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _iv(vs: dict) -> str:
    return f"{vs['diff']:+.4f} [{vs['lo']:+.4f}, {vs['hi']:+.4f}]"


def _qs(values: list) -> str:
    return ", ".join(f"{q:g}" for q in values)


def _level(doc: dict) -> int:
    return round(100 * float(doc["bootstrap"]["level"]))


def _how(doc: dict) -> str:
    b = doc["bootstrap"]
    return (f"Random exits are averaged over {doc['settings']['random_draws']} shuffles; "
            f"halting − random has a paired bootstrap interval over the {doc['windows']} "
            f"windows (each window's loss averaged over the seeds, {int(b['resamples']):,} "
            f"resamples, seed {b['seed']}, {_level(doc)} %): a win where it lies below 0, a "
            f"loss above 0, a tie where it includes 0; where every token exits at one pass the "
            f"shuffle changes nothing (same exits).")


def _spread(mean: float, std: float, n: int) -> str:
    """mean, with ± the sample std where there is more than one value."""
    return _fmt(mean) + (f" ± {std:.4f}" if n > 1 else "")


def _fixed_cell(row: dict) -> str:
    return _spread(row["loss"], row["std"], row["n"])


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def section(doc: dict) -> str:
    K, s = doc["K"], doc["summary"]
    draws = int(doc["settings"]["random_draws"])
    lines = [HEADING, "",
             f"K = {K} with a halting head, trained at the study's equal token count; each "
             f"scored on the same {doc['windows']} held-out windows ({doc['tokens']:,} tokens) "
             "at each Q-exit threshold q: validation loss (each token's cross-entropy at its "
             "exit pass, later passes reading its frozen keys/values) against the mean passes "
             "per token. *Random* = the same model with the exits its head chose shuffled over "
             "the tokens (same passes, same histogram). " + _how(doc) + " Settings: "
             + ", ".join(f"{k} {v}" for k, v in doc["settings"].items() if v is not None)
             + ". Figure: adaptive.png.", "",
             "Fixed K on the same windows (every seed of the study's plan; mean ± sample std):",
             "", "| K | passes | valid loss | seeds |", "|---:|---:|---:|---|"]
    for k, row in doc["fixed_summary"].items():
        lines.append(f"| {k} | {int(k) + 1} | {_fixed_cell(row)} | {row['n']} "
                     f"({', '.join(map(str, row['seeds']))}) |")
    for group, g in s.items():
        lines += ["", f"**{group}** ({g['variant']}; {_seeds(len(g['seeds']))}: "
                  f"{', '.join(map(str, g['seeds']))}; its own q = 1 loss "
                  f"{_fmt(g['own_fixed_k_loss'])}):", "",
                  f"| q | mean passes | valid loss | random exits, same passes | "
                  f"halting − random [{_level(doc)} % interval] | verdict |",
                  "|---:|---:|---:|---:|---:|---|"]
        for c in g["curve"]:
            lines.append(f"| {c['q']:g} | {c['passes']:.2f} | "
                         f"{_spread(c['loss'], c['loss_std'], len(g['seeds']))} | "
                         f"{_spread(c['random_loss'], c['random_draw_std'], draws)} | "
                         f"{_iv(c['vs_random'])} | {c['verdict']} |")
        lines += ["", f"Loss by exit pass at q = {g['by_exit_q']:g} (tokens pooled over the "
                  "seeds):", "",
                  "| exit pass | share of tokens | tokens | loss at exit | fixed-K loss, same "
                  "tokens |", "|---:|---:|---:|---:|---:|"]
        for b in g["by_exit"]:
            lines.append(f"| {b['pass']} | {_fmt(b['share'], 3)} | {b['tokens']:,} | "
                         f"{_fmt(b['loss'])} | {_fmt(b['fixed_k_loss'])} |")
    if draws > 1:
        lines += ["", "(± after a valid loss: the sample std over the seeds; after a random-exit "
                  "loss: the sample std over the shuffles, averaged over the seeds.)"]
    lines += ["", "**Verdict.**", ""] + verdict(doc)
    return "\n".join(lines) + "\n"


def _random_words(g: dict) -> str:
    t = g["tally"]
    won = g["beats_random"]
    if won is None:
        head = "every token exits at one pass at every q: nothing to compare with random exits"
    elif won:
        head = (f"halting beats random exits at every q where tokens exit at different passes "
                f"(q = {_qs(t['win'])})")
    elif not t["win"]:
        head = "halting does not beat random exits at any q"
    else:
        head = f"halting beats random exits at q = {_qs(t['win'])} only"
    parts = [head]
    if t["tie"]:
        parts.append(f"within noise (the interval includes 0) at q = {_qs(t['tie'])}")
    if t["loss"]:
        parts.append(f"worse than random at q = {_qs(t['loss'])}")
    if t["same exits"] and won is not None:
        parts.append(f"at q = {_qs(t['same exits'])} every token exits at one pass (same "
                     f"exits, no contest)")
    return "; ".join(parts)


def verdict(doc: dict) -> list[str]:
    K, out = doc["K"], []
    for group, g in doc["summary"].items():
        line = f"- {group} ({_seeds(len(g['seeds']))}): {_random_words(g)}"
        goal = g["goal"]
        if goal is None:
            line += f"; no threshold reaches <= {GOAL_SHARE * (K + 1):.1f} passes"
        else:
            line += (f"; at {goal['passes']:.2f} passes (q = {goal['q']:g}) the loss is "
                     f"{100 * goal['gap']:+.1f} % of fixed K = {K}'s "
                     f"({_seeds(doc['fixed_summary'][K]['n'])}): the goal (<= "
                     f"{100 * GOAL_SHARE:.0f} % of the passes within {100 * GOAL_LOSS:.0f} %) is "
                     f"{'met' if goal['met'] else 'not met'}")
            same = goal.get("equal_compute")
            if same:
                line += (f"; fixed K = {same['K']} ({_seeds(same['n'])}), paying "
                         f"{same['K'] + 1} passes for every token, scores {same['loss']:.4f}: "
                         f"adaptive is {100 * same['gap']:+.1f} % against it")
        line += ("; tokens that exit earlier are the ones fixed K finds easier"
                 if g["easy_exit_first"] else
                 "; earlier exits are not consistently the easier tokens")
        out.append(line + ".")
    fs = doc["fixed_summary"]
    best = min(fs, key=lambda k: fs[k]["loss"])
    out.append(f"- fixed K: the lowest validation loss is K = {best}'s ({fs[best]['loss']:.4f}, "
               f"{_seeds(fs[best]['n'])}); "
               + ", ".join(f"K = {k} {_fixed_cell(r)} ({_seeds(r['n'])})"
                           for k, r in fs.items() if k != best) + ".")
    if doc["scale"] == "toy":
        out.append("- toy scale: a pipeline check, the numbers mean nothing.")
    return out


# --------------------------------------------------------------------------- the README block


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def stage_line(doc: dict) -> str:
    st = doc["stage"]
    load = st.get("load_1min") or {}
    trained = st["trained"]
    return (f"The stage's last invocation (started {st['started']}) took "
            f"{_minutes(st['wall_s'])}: {len(trained)} of its {len(doc['planned']['runs'])} runs "
            f"trained there ({st['jobs']} at a time, {_minutes(st['train_wall_s'])}), then the "
            f"scoring; 1-minute load average {load.get('start')} at the start, "
            f"{load.get('end')} at the end, on {st.get('cpus')} CPUs. The fixed-K runs come "
            f"from the study's `runs` stage.")


def readme_block(doc: dict, rel: str) -> str:
    """The README's adaptive table from a summarised document (`rel`: the json's path from the
    README's folder)."""
    K, fs = doc["K"], doc["fixed_summary"]
    level = _level(doc)
    lines = [f"Rendered from [{rel}]({rel}) by `python -m experiments.adaptive --readme "
             f"experiments/README.md` ({doc['scale']} scale: {doc['windows']} held-out windows, "
             f"{doc['tokens']:,} tokens). " + stage_line(doc), "",
             f"| model | seeds | q | mean passes | valid loss | random exits, same passes | "
             f"halting − random [{level} % interval] | verdict | fixed K = {K} ({K + 1} "
             f"passes) | cheapest fixed K paying >= the passes |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for group, g in doc["summary"].items():
        goal = g["goal"]
        q = goal["q"] if goal else g["by_exit_q"]
        c = next((c for c in g["curve"] if c["q"] == q), g["curve"][-1])
        same = (goal or {}).get("equal_compute")
        lines.append(
            f"| {g['variant']} | {len(g['seeds'])} | {c['q']:g} | {c['passes']:.2f} | "
            f"{_spread(c['loss'], c['loss_std'], len(g['seeds']))} | "
            f"{_fmt(c['random_loss'])} | {_iv(c['vs_random'])} | {c['verdict']} | "
            f"{_fixed_cell(fs[K]) if K in fs else '–'} ({fs[K]['n'] if K in fs else 0}) | "
            + (f"K = {same['K']}: {_fixed_cell(fs[same['K']])} ({same['n']})" if same else "–")
            + " |")
    lines += ["", f"Each model at the q with the lowest loss within {100 * GOAL_SHARE:.0f} % of "
              f"fixed K = {K}'s passes (a model with none: at its by-exit q); valid loss and "
              f"fixed K: mean ± sample std over the seeds, the fixed-K seeds' number in "
              f"brackets. {_how(doc)} Every q, "
              f"the loss by exit pass and each run: [results/adaptive.md]"
              f"(results/adaptive.md).", "", "Verdict:", ""] + verdict(doc)
    return "\n".join(lines) + "\n"


def rewrite_readme(text: str, root: str) -> str:
    """`text` (a README) with every adaptive block rendered from the json its marker names
    (relative to `root`, the README's folder)."""
    def one(m):
        path = os.path.join(root, m.group(2))
        if not os.path.exists(path):
            raise SystemExit(f"adaptive report: {m.group(2)} (named in the README's "
                             f"adaptive-table marker) does not exist: run the adaptive stage "
                             f"or fix the marker")
        with open(path, encoding="utf-8") as fh:
            doc = summarise(json.load(fh), path)
        return m.group(1) + readme_block(doc, m.group(2)) + m.group(4)

    if not BLOCK.search(text):
        raise SystemExit("adaptive report: the README has no <!-- adaptive-table FILE --> ... "
                         "<!-- /adaptive-table --> block to write")
    return BLOCK.sub(one, text)


# --------------------------------------------------------------------------- outputs


def plot(doc: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for group, g in doc["summary"].items():
        color = next(colors)
        xs = [c["passes"] for c in g["curve"]]
        ax.plot(xs, [c["loss"] for c in g["curve"]], "o-", color=color, label=group, ms=3)
        ax.plot(xs, [c["random_loss"] for c in g["curve"]], "x--", color=color, ms=3,
                alpha=0.6, label=f"{group}: random exits")
    fixed = doc["fixed_summary"]
    ax.errorbar([int(k) + 1 for k in fixed], [v["loss"] for v in fixed.values()],
                yerr=[v["std"] for v in fixed.values()], fmt="ks", capsize=3,
                label="fixed K = 0..K (± std over seeds)")
    ax.set_xlabel("mean passes per token (decode compute)")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title(f"Adaptive pondering, K = {doc['K']} ({doc['scale']} scale)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: str, doc: dict) -> tuple[list, str]:
    """adaptive.json, adaptive.md and adaptive.png of a summarised document in `out_dir`; the
    paths and the section's markdown."""
    os.makedirs(out_dir, exist_ok=True)
    js = os.path.join(out_dir, "adaptive.json")
    write_json(js, doc)
    text = section(doc)
    md = os.path.join(out_dir, "adaptive.md")
    with open(md + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(md + ".tmp", md)
    return [js, md, plot(doc, os.path.join(out_dir, "adaptive.png"))], text


def render(out_dir: str) -> list:
    """Rebuild adaptive.md / .png from DIR/adaptive.json and splice the section into
    DIR/results.md (and the document into results.json) where those exist."""
    path = os.path.join(out_dir, "adaptive.json")
    if not os.path.exists(path):
        raise SystemExit(f"adaptive report: no {path}: run the adaptive stage "
                         f"(python -m experiments.study --out {out_dir} --stages adaptive)")
    with open(path, encoding="utf-8") as fh:
        doc = summarise(json.load(fh), path)
    paths, text = write_report(out_dir, doc)
    return paths + add_to_results(out_dir, "adaptive", doc, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.adaptive",
                                 description="Rebuild the adaptive pondering report from its "
                                 "adaptive.json")
    ap.add_argument("--render", metavar="DIR",
                    help="a directory with adaptive.json (a study's --out, or "
                    "experiments/results): rewrite adaptive.md / .png and the results.md section")
    ap.add_argument("--readme", metavar="FILE", help="rewrite the <!-- adaptive-table FILE --> "
                    "block(s) of this README (e.g. experiments/README.md) from the json named")
    ap.add_argument("--check", action="store_true",
                    help="with --readme: change nothing; exit 1 where a block differs")
    args = ap.parse_args(argv)
    if not args.render and not args.readme:
        ap.error("give --render DIR and/or --readme FILE")
    if args.check and not args.readme:
        ap.error("--check goes with --readme")
    if args.render:
        for p in render(args.render):
            print(f"wrote {p}")
    if args.readme:
        with open(args.readme, encoding="utf-8") as fh:
            text = fh.read()
        new = rewrite_readme(text, os.path.dirname(os.path.abspath(args.readme)))
        if args.check:
            if new != text:
                print(f"adaptive report: the adaptive table in {args.readme} is not what its "
                      f"json says: run python -m experiments.adaptive --readme {args.readme}",
                      file=sys.stderr)
                return 1
            print(f"adaptive report: {args.readme}: the adaptive table matches its json")
        elif new != text:
            write_text = args.readme + ".tmp"
            with open(write_text, "w", encoding="utf-8") as fh:
                fh.write(new)
            os.replace(write_text, args.readme)
            print(f"wrote {args.readme}")
    return 0
