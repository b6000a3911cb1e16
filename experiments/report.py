"""The study's report: results.json, results.md (tables), loss_curves.png and pauses.png.

Numbers come only from the runs' eval.json files (experiments/evaluate.py), so every run is
compared on the same held-out windows with the same code. Groups with several seeds report
mean ± sample standard deviation (and the min..max range).
"""

from __future__ import annotations

import json
import math
import os
import statistics

CLAIMS = {
    "pondering": "PonderingLM (Zeng et al. 2025): at 70M parameters and 30B Pile tokens, "
                 "Pile perplexity 16.95 plain vs 14.16 with K=3 pondering steps; loss falls "
                 "as K grows.",
    "pause": "Pause tokens (Goyal et al. 2023): a 1B model pause-pretrained and fine-tuned "
             "with M=10 pauses gains on downstream tasks; a pause-pretrained model evaluated "
             "with 0 pauses does worse than with pauses (and can fall below the plain model).",
    "thoughts": "Latent thoughts (PonderLM-2, LUMIA-Group): PonderLM-2-Pythia-1.4B, trained "
                "on 300B Pile tokens with one thought per token, beats Pythia-2.8B, and beats "
                "PonderLM, looped and pause baselines at equal tokens.",
}


def _stats(values: list[float]) -> dict:
    out = {"mean": statistics.fmean(values), "n": len(values), "min": min(values),
           "max": max(values), "values": values}
    out["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def summarize(runs: dict) -> dict:
    """Per group (a run and its extra seeds): final validation loss / ppl stats and more."""
    groups: dict = {}
    for name, ev in runs.items():
        groups.setdefault(ev["group"], []).append(ev)
    out = {}
    for group, evs in groups.items():
        evs.sort(key=lambda e: e["seed"])
        first = evs[0]
        out[group] = {
            "kind": first["kind"], "mult": first["mult"],
            "ponder_steps": first["config"]["ponder_steps"],
            "feedback": first["config"]["feedback"], "pause_rate": first["config"]["pause_rate"],
            "thoughts": first["config"].get("thoughts", 0),
            "pause_every": first["config"].get("pause_every", 0),
            "runs": [e["name"] for e in evs], "seeds": [e["seed"] for e in evs],
            "tokens": first["final"]["tokens"], "flops": first["final"]["flops"],
            "flops_per_token": first["final"]["flops_per_token"],
            "params": first["params"]["total"],
            "valid_loss": _stats([e["final"]["valid_loss"] for e in evs]),
            "valid_ppl": _stats([e["final"]["valid_ppl"] for e in evs]),
            "task0_nll": _stats([e["task"]["0"]["nll"] for e in evs]),
            "task0_acc": _stats([e["task"]["0"]["acc"] for e in evs]),
            "train_wall_s": _stats([e["train_wall_s"] for e in evs]),
        }
        if "valid_loss_jacobi" in first["final"]:  # latent thoughts: training's approximation
            out[group]["valid_loss_jacobi"] = _stats([e["final"]["valid_loss_jacobi"]
                                                      for e in evs])
            out[group]["jacobi_iters"] = first["final"]["jacobi_iters"]
    return out


def _pm(st: dict, digits: int = 2) -> str:
    if st["n"] > 1:
        return (f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f} "
                f"(n={st['n']}, {st['min']:.{digits}f}..{st['max']:.{digits}f})")
    return f"{st['mean']:.{digits}f}"


def _flops(x: float) -> str:
    for unit, div in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.3g} FLOP"


def _label(group: str, g: dict) -> str:
    if g["kind"] == "plain":
        return "plain"
    if g["kind"] == "ponder":
        return f"pondering K={g['ponder_steps']}"
    if g["kind"] == "looped":
        return f"looped K={g['ponder_steps']}"
    if g["kind"] == "pause":
        return f"pause rate {g['pause_rate']}"
    if g["kind"] == "thoughts":
        return f"latent thoughts M={g['thoughts']}"
    if g["kind"] == "pause_every":
        return f"{g['pause_every']} pause(s) after every token"
    return f"plain, {g['mult']}x tokens"


def claims(summary: dict, runs: dict) -> list[str]:
    """Plain-language verdicts, computed from the numbers (never hand-written)."""
    lines = []
    plain = summary.get("plain")
    ks = sorted(g["ponder_steps"] for g in summary.values() if g["kind"] == "ponder")
    if plain and ks:
        chain = [plain["valid_loss"]["mean"]] + [summary[f"ponder_k{k}"]["valid_loss"]["mean"]
                                                 for k in ks]
        mono = all(b < a for a, b in zip(chain, chain[1:]))
        seq = " > ".join(f"{x:.4f}" for x in chain)
        lines.append(f"- **Loss falls monotonically with K** (plain, K={', K='.join(map(str, ks))}"
                     f", equal tokens): {'yes' if mono else 'no'} — validation loss {seq}.")
        top = summary[f"ponder_k{ks[-1]}"]
        d = top["valid_ppl"]["mean"] - plain["valid_ppl"]["mean"]
        spread = max(top["valid_ppl"]["std"], plain["valid_ppl"]["std"])
        beyond = ("larger than" if abs(d) > 2 * spread else "within") if spread > 0 else "n/a:"
        seeds_note = (f"{beyond} twice the seed spread (std ≤ {spread:.2f})" if spread > 0
                      else "single seed, no spread measured")
        lines.append(f"- **K={ks[-1]} vs plain at equal tokens**: perplexity "
                     f"{plain['valid_ppl']['mean']:.2f} → {top['valid_ppl']['mean']:.2f} "
                     f"({d:+.2f}, {100 * d / plain['valid_ppl']['mean']:+.1f}%; paper at 70M/30B: "
                     f"16.95 → 14.16, -16.5%); difference {seeds_note}.")
        for k in ks:
            long = summary.get(f"plain_x{k + 1}")
            if long is None:
                continue
            p = summary[f"ponder_k{k}"]
            win = "pondering" if p["valid_loss"]["mean"] < long["valid_loss"]["mean"] else "plain"
            lines.append(f"- **Equal FLOPs, K={k} vs plain on {k + 1}x tokens**: ppl "
                         f"{p['valid_ppl']['mean']:.2f} vs {long['valid_ppl']['mean']:.2f} "
                         f"(FLOPs ratio {p['flops'] / long['flops']:.3f}) — {win} is better.")
    for g in summary.values():
        if g["kind"] != "looped":
            continue
        k = g["ponder_steps"]
        p = summary.get(f"ponder_k{k}")
        if p:
            win = "pondering" if p["valid_loss"]["mean"] < g["valid_loss"]["mean"] else "looped"
            lines.append(f"- **Pondering vs looped (hidden-state feedback), K={k}**: ppl "
                         f"{p['valid_ppl']['mean']:.2f} vs {g['valid_ppl']['mean']:.2f} — {win} "
                         f"is better (the paper's ablation favours pondering).")
    for g in summary.values():
        if g["kind"] != "thoughts":
            continue
        m, loss = g["thoughts"], g["valid_loss"]["mean"]
        cost = g["flops_per_token"] / plain["flops_per_token"] if plain else 0.0
        line = (f"- **Latent thoughts M={m} (PonderLM-2), equal tokens**: ppl "
                f"{g['valid_ppl']['mean']:.2f} at {cost:.1f}x plain's training FLOPs/token"
                if plain else
                f"- **Latent thoughts M={m}**: ppl {g['valid_ppl']['mean']:.2f}")
        if plain:
            line += (f" — {'better' if loss < plain['valid_loss']['mean'] else 'not better'} "
                     f"than plain ({plain['valid_ppl']['mean']:.2f})")
        p = summary.get(f"ponder_k{m}")
        if p:
            line += (f"; pondering K={m} (the same passes at decoding) "
                     f"{p['valid_ppl']['mean']:.2f}")
        q = summary.get(f"pause_every_m{m}")
        if q:
            line += (f"; {m} pause(s) after every token (the same slots, no thought) "
                     f"{q['valid_ppl']['mean']:.2f}")
        lines.append(line + ".")
        if "valid_loss_jacobi" in g:
            jac = g["valid_loss_jacobi"]["mean"]
            lines.append(f"- **Exact thoughts vs training's Jacobi (n={g['jacobi_iters']})**: "
                         f"validation loss {loss:.4f} exact, {jac:.4f} Jacobi ({jac - loss:+.4f})"
                         f" on the same windows.")
    pause = next((e for e in runs.values() if e["kind"] == "pause"), None)
    plain_run = runs.get("plain")
    if pause:
        t = pause["task"]
        ms = sorted(int(m) for m in t)
        best = min(ms, key=lambda m: t[str(m)]["nll"])
        lines.append(f"- **Pauses at inference help the pause-trained model**: target NLL "
                     + ", ".join(f"M={m}: {t[str(m)]['nll']:.4f}" for m in ms)
                     + f" — best at M={best}; "
                     + ("yes" if best > 0 and t[str(best)]["nll"] < t["0"]["nll"] else "no")
                     + ".")
        if plain_run:
            p0, z0 = plain_run["task"]["0"]["nll"], t["0"]["nll"]
            lines.append(f"- **0 pauses hurt the pause-trained model vs the plain model**: "
                         f"target NLL {z0:.4f} (pause-trained, M=0) vs {p0:.4f} (plain) — "
                         + ("yes" if z0 > p0 else "no") + "; with its best M: "
                         f"{t[str(best)]['nll']:.4f}.")
    return lines


def _plot_curves(runs: dict, summary: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"plain": "black", "ponder_k1": "tab:blue", "ponder_k2": "tab:green",
              "ponder_k3": "tab:red", "pause": "tab:purple"}
    other = iter(["tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), dpi=120)
    shown = set()
    for name in sorted(runs, key=lambda n: (runs[n]["group"], runs[n]["seed"])):
        ev = runs[name]
        g = ev["group"]
        if g not in colors:
            colors[g] = ("0.55" if ev["kind"] == "plain_long" and ev["mult"] == 2 else
                         "0.4" if ev["kind"] == "plain_long" and ev["mult"] == 3 else
                         "0.25" if ev["kind"] == "plain_long" else next(other, "tab:gray"))
        style = "--" if ev["kind"] == "plain_long" else ":" if ev["kind"] == "looped" else "-"
        curve = ev["curve"]
        n_seeds = summary[g]["valid_loss"]["n"]
        label = None if g in shown else (_label(g, summary[g])
                                         + (f" ({n_seeds} seeds)" if n_seeds > 1 else ""))
        shown.add(g)
        for ax, key in zip(axes, ("tokens", "flops")):
            ax.plot([c[key] for c in curve], [c["valid_loss"] for c in curve], style, marker="o",
                    ms=3, lw=1.4 if ev["seed"] == summary[g]["seeds"][0] else 0.8,
                    color=colors[g], label=label if ax is axes[0] else None)
    axes[0].set_xlabel("training tokens")
    axes[1].set_xlabel("training FLOPs (all K+1 passes)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/token, same held-out windows)")
        ax.grid(alpha=0.3)
    axes[0].set_title("equal tokens")
    axes[1].set_title("equal training FLOPs")
    fig.legend(loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = os.path.join(out, "loss_curves.png")
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_pauses(runs: dict, out: str):
    pause = [e for e in runs.values() if e["kind"] == "pause"]
    if not pause:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = pause[0]
    ms = sorted(int(m) for m in ev["task"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for ax, key, name in zip(axes, ("nll", "acc"), ("target NLL (nats/token)",
                                                   "target top-1 accuracy")):
        ax.bar([str(m) for m in ms], [ev["task"][str(m)][key] for m in ms], color="tab:purple",
               label=f"pause-trained (rate {ev['config']['pause_rate']})")
        if "plain" in runs:
            ax.axhline(runs["plain"]["task"]["0"][key], color="black", ls="--",
                       label="plain model, no pauses")
        vals = [ev["task"][str(m)][key] for m in ms]
        if "plain" in runs:
            vals.append(runs["plain"]["task"]["0"][key])
        lo, hi = min(vals), max(vals)
        pad = (hi - lo) * 0.5 + 1e-3
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("pauses appended after the prompt (M)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle("held-out next-token task")
    fig.tight_layout()
    path = os.path.join(out, "pauses.png")
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown(study, summary: dict, runs: dict) -> str:
    sc, data = study.sc, study.data
    plain = summary.get("plain")
    any_run = next(iter(runs.values()))
    c = any_run["config"]
    lines = [f"# Miniature study: {sc.get('description', sc['scale'])}", "",
             f"Scale `{sc['scale']}`; generated by `python -m experiments.study` "
             f"({time_str()}). Every number is from experiments/evaluate.py on the same "
             f"held-out data.", "",
             "## Setup", "",
             f"- corpus: {data['corpus'].get('kind')}: {data['split']['train_documents']} "
             f"training documents ({data['train_tokens']:,} tokens), "
             f"{data['split']['heldout_documents']} held-out documents "
             f"({data['heldout_tokens']:,} tokens, never trained on)",
             f"- tokenizer: byte-level BPE, {data['vocab_rows']} tokens, "
             f"{data['padded_vocab_size']} rows in every model (`<pause>` = {data['pause_id']})",
             f"- model: {any_run['params']['total']:,} parameters "
             f"({any_run['params']['non_embedding']:,} non-embedding); sequence length "
             f"{c['seq_len']}, global batch {c['global_batch']}; "
             f"{plain['tokens'] if plain else any_run['final']['tokens']:,} training tokens "
             f"for the equal-token runs ("
             f"{(plain['tokens'] if plain else any_run['final']['tokens']) / data['train_tokens']:.2f}"
             f" epochs; the longest run: "
             f"{max(e['final']['tokens'] for e in runs.values()) / data['train_tokens']:.2f} "
             f"epochs)",
             f"- validation: {data['n_windows']} held-out windows of {data['seq_len'] + 1} "
             f"tokens ({data['n_windows'] * data['seq_len']:,} targets), the same for every run;"
             f" pause-task: {data['n_task']} held-out prompts of {data['prompt_len']} tokens, "
             f"{data['target_len']} target tokens each", ""]
    eq = [g for g in summary if summary[g]["mult"] == 1]
    order = {"plain": 0, "ponder": 1, "looped": 2, "thoughts": 3, "pause_every": 4, "pause": 5}
    eq.sort(key=lambda g: (order.get(summary[g]["kind"], 9), summary[g]["ponder_steps"]))
    lines += ["## Equal tokens", "",
              "| run | K | feedback | seeds | tokens | training FLOPs | FLOPs vs plain | "
              "valid loss | valid ppl | Δppl vs plain | train wall (s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in eq:
        s = summary[g]
        d = f"{s['valid_ppl']['mean'] - plain['valid_ppl']['mean']:+.2f}" if plain else "-"
        ratio = f"{s['flops'] / plain['flops']:.2f}x" if plain else "-"
        lines.append(f"| {_label(g, s)} | {s['ponder_steps']} | "
                     f"{s['feedback'] if s['ponder_steps'] else '-'} | {s['valid_loss']['n']} | "
                     f"{s['tokens']:,} | {_flops(s['flops'])} | {ratio} | "
                     f"{_pm(s['valid_loss'], 4)} | {_pm(s['valid_ppl'])} | {d} | "
                     f"{s['train_wall_s']['mean']:.0f} |")
    longs = sorted((g for g in summary if summary[g]["kind"] == "plain_long"),
                   key=lambda g: summary[g]["mult"])
    if longs:
        lines += ["", "## Equal training FLOPs", "",
                  "Pondering costs K+1 passes (plus K products p·W_in), so plain models were "
                  "also trained on (K+1)x the tokens (their own full LR schedule, data repeated "
                  f"where it runs out: {data['train_tokens']:,} training tokens).", "",
                  "| K | pondering: ppl | FLOPs | plain on (K+1)x tokens: ppl | FLOPs | "
                  "tokens | better at equal FLOPs |", "|---|---|---|---|---|---|---|"]
        for g in longs:
            s = summary[g]
            k = s["mult"] - 1
            p = summary.get(f"ponder_k{k}")
            if p is None:
                lines.append(f"| ({s['mult']}x) | - | - | {_pm(s['valid_ppl'])} | "
                             f"{_flops(s['flops'])} | {s['tokens']:,} | - |")
                continue
            win = "pondering" if p["valid_loss"]["mean"] < s["valid_loss"]["mean"] else "plain"
            lines.append(f"| {k} | {_pm(p['valid_ppl'])} | {_flops(p['flops'])} | "
                         f"{_pm(s['valid_ppl'])} | {_flops(s['flops'])} | {s['tokens']:,} | "
                         f"{win} |")
    pause = next((e for e in runs.values() if e["kind"] == "pause"), None)
    if pause:
        lines += ["", "## Pause tokens", "",
                  f"Held-out next-token task: prompt + M `<pause>` + teacher-forced targets; "
                  f"outputs from the last pause on are scored ({data['n_task']} prompts × "
                  f"{data['target_len']} targets).", "",
                  "| model | M pauses | target NLL | target ppl | top-1 acc | first-token acc |",
                  "|---|---|---|---|---|---|"]
        if "plain" in runs:
            t = runs["plain"]["task"]["0"]
            lines.append(f"| plain | 0 | {t['nll']:.4f} | {t['ppl']:.2f} | {t['acc']:.4f} | "
                         f"{t['acc_first']:.4f} |")
        for m in sorted(int(x) for x in pause["task"]):
            t = pause["task"][str(m)]
            lines.append(f"| pause-trained (rate {pause['config']['pause_rate']}) | {m} | "
                         f"{t['nll']:.4f} | {t['ppl']:.2f} | {t['acc']:.4f} | "
                         f"{t['acc_first']:.4f} |")
        pv = pause.get("pause_valid")
        lines += ["", "Validation perplexity of the pause-trained model (same windows):", "",
                  "| windows | valid loss | valid ppl | scored targets |", "|---|---|---|---|",
                  f"| no pauses (as every run) | {pause['final']['valid_loss']:.4f} | "
                  f"{pause['final']['valid_ppl']:.2f} | {pause['final']['valid_tokens']:,} |"]
        if pv:
            lines.append(f"| pauses inserted at rate {pv['rate']} (pause targets excluded) | "
                         f"{pv['valid_loss']:.4f} | {pv['valid_ppl']:.2f} | "
                         f"{pv['valid_tokens']:,} |")
        if "plain" in runs:
            lines.append(f"| plain model, no pauses | {runs['plain']['final']['valid_loss']:.4f}"
                         f" | {runs['plain']['final']['valid_ppl']:.2f} | "
                         f"{runs['plain']['final']['valid_tokens']:,} |")
    lines += ["", "## The papers' claims, checked on this miniature", ""]
    lines += claims(summary, runs)
    lines += ["", "For reference:", ""] + [f"- {v}" for v in CLAIMS.values()]
    lines += ["", "## All runs", "",
              "| run | seed | steps | tokens | valid loss | valid ppl | task NLL (M=0) | "
              "train wall (s) | eval (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(runs, key=lambda n: (runs[n]["group"], runs[n]["seed"])):
        e = runs[name]
        lines.append(f"| {name} | {e['seed']} | {e['final']['step']} | "
                     f"{e['final']['tokens']:,} | {e['final']['valid_loss']:.4f} | "
                     f"{e['final']['valid_ppl']:.2f} | {e['task']['0']['nll']:.4f} | "
                     f"{e['train_wall_s']:.0f} | {e['eval_seconds']:.0f} |")
    inv = study.results.get("invocations") or []
    if inv:
        lines += ["", "## Wall time", "",
                  "| started | wall | runs trained + evaluated | jobs at once | 1-min load average "
                  "(mean / max) |", "|---|---|---|---|---|"]
        for i in inv:
            load = i.get("load") or {}
            lines.append(f"| {i['started']} | {i['wall_s'] / 60:.1f} min | {len(i['runs'])} | "
                         f"{i.get('jobs', '')} | "
                         + (f"{load['mean']} / {load['max']} on {load['cpus']} CPUs" if load
                            else "not recorded")
                         + (f" ({load['note']})" if load.get("note") else "") + " |")
        lines.append(f"\nSum over runs: training {study.results['train_wall_s_sum'] / 60:.1f} "
                     f"min, evaluation {study.results['eval_s_sum'] / 60:.1f} min (process time "
                     f"of the runs, {inv[-1].get('jobs', 1)} at a time).")
    lines += ["", "Figures: `loss_curves.png` (validation loss vs tokens and vs training FLOPs, "
              "every run), `pauses.png` (the pause task).", ""]
    for section in study.sections:
        lines += [section.rstrip(), ""]
    if study.results.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in study.results["errors"]] + [""]
    return "\n".join(lines)


def read_invocations(work: str) -> list[dict]:
    """work/invocations.jsonl: wall time (and CPU load) of each invocation that ran runs."""
    try:
        with open(os.path.join(work, "invocations.jsonl"), encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except OSError:
        return []


def time_str() -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M")


def write_report(study) -> list[str]:
    runs = study.results.get("runs", {})
    out = study.out
    if not runs:
        study.log("report: no finished runs yet")
        return []
    summary = summarize(runs)
    study.results["summary"] = summary
    study.results["claims"] = claims(summary, runs)
    study.results["config"] = study.sc
    study.results["invocations"] = read_invocations(study.work)
    study.results["train_wall_s_sum"] = round(sum(e["train_wall_s"] for e in runs.values()), 1)
    study.results["eval_s_sum"] = round(sum(e["eval_seconds"] for e in runs.values()), 1)
    paths = []
    for name, text in (("results.md", markdown(study, summary, runs)),
                       ("results.json", json.dumps(_finite(study.results), indent=1))):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(path + ".tmp", path)
        paths.append(path)
    paths.append(_plot_curves(runs, summary, out))
    p = _plot_pauses(runs, out)
    if p:
        paths.append(p)
    return paths


def _finite(obj):
    """JSON has no NaN/inf: such values become strings (the test checks there are none)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
