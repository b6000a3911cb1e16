"""The adaptive pondering part of the miniature study: does a halting head buy back decode
compute, and does it beat exiting at random?

Trained at the study's equal token count with K = `adaptive.ponder_steps` and a halting head:
`palbert` and `pondernet` heads, `dense` and `frozen` exits (DESIGN.md, "Adaptive pondering");
plus the head-only calibration of the study's own fixed-K run (`ponder_k{K}`: only the head
trains, `adaptive.head_iters` steps). Each is scored on the study's held-out windows at every q
of `adaptive.qs`: validation loss (each token's CE at its exit pass, frozen keys/values) against
mean passes per token. Beside them, on the same windows:

* the study's fixed-K runs (plain and ponder_k1..K, every seed trained);
* the same model with **random exits at the same mean passes**: the exit passes its halting
  chose, shuffled over the tokens (the same histogram, so the same compute), averaged over
  `adaptive.random_draws` shuffles. A halting head that does not beat this has learned nothing
  about which tokens are easy;
* per-token loss by exit pass (at `adaptive.by_exit_q`), next to the fixed-K model's loss on the
  same tokens: easy tokens should exit first.

The goal line: at <= 60 % of fixed K's passes, validation loss within 1 % of the fixed-K run.
Writes OUT/adaptive.json, OUT/adaptive.md, OUT/adaptive.png and the section of results.md;
`python -m experiments.adaptive --render DIR` rebuilds the markdown, the figure and the
section from DIR/adaptive.json.
"""

from __future__ import annotations

import json
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from .jobs import is_trained
from .pause_ft_report import add_to_results, render_main
from .training import run_overrides, spec_hash, train_run

VARIANTS = {"palbert_dense": ("palbert", "dense"), "pondernet_dense": ("pondernet", "dense"),
            "palbert_frozen": ("palbert", "frozen"), "pondernet_frozen": ("pondernet", "frozen")}
HEADING = "## Adaptive pondering (halting over the pondering passes)"
GOAL_SHARE, GOAL_LOSS = 0.6, 0.01  # <= 60 % of fixed K's passes, loss within 1 %


def _halting_sets(cfg: dict, mode: str, exits: str) -> list[str]:
    return [f"ponder.halting.mode={mode}", f"ponder.halting.train_exits={exits}",
            f"ponder.halting.q={cfg.get('q', 0.5)}", f"ponder.halting.beta={cfg.get('beta', 0.1)}",
            f"ponder.halting.prior={cfg.get('prior', 0.3)}"]


def plan(study) -> list[dict]:
    """The stage's runs (study run dicts with their halting overrides in "extra")."""
    cfg = study.sc.get("adaptive") or {}
    K, seeds = int(cfg.get("ponder_steps", 3)), list(study.sc["runs"]["seeds"])
    iters = int(study.sc["train"]["base_iters"])
    runs = []
    for variant in cfg.get("variants", list(VARIANTS)):
        if variant not in VARIANTS:
            raise SystemExit(f"study: adaptive.variants: {variant!r} is not one of "
                             f"{', '.join(VARIANTS)}")
        mode, exits = VARIANTS[variant]
        group = f"adaptive_{variant}"
        v_seeds = seeds if variant in cfg.get("seeded", []) else seeds[:1]
        for i, seed in enumerate(v_seeds):
            runs.append({"group": group, "kind": "adaptive", "ponder_steps": K, "mult": 1,
                         "seed": int(seed), "name": group if i == 0 else f"{group}.s{seed}",
                         "iters": iters, "feedback": "embedding", "pause_rate": 0.0,
                         "variant": variant,
                         "extra": _halting_sets(cfg, mode, exits) + [  # the final one only
                             f"checkpoint.interval={iters}"]})
    source = next((r for r in study.runs if r["group"] == f"ponder_k{K}"), None)
    if cfg.get("calibrate", True) and source is not None:
        mode = cfg.get("calibrate_mode", "palbert")
        ckpt = os.path.join(study.run_dir(source), "ckpt")
        runs.append({"group": "adaptive_calibrated", "kind": "adaptive", "ponder_steps": K,
                     "mult": 1, "seed": int(source["seed"]), "name": "adaptive_calibrated",
                     "iters": int(cfg.get("head_iters", 50)), "feedback": "embedding",
                     "pause_rate": 0.0, "variant": f"calibrated ({mode}, head only)",
                     "source": source["name"],
                     "extra": _halting_sets(cfg, mode, "dense") + [
                         "ponder.halting.head_only=true", f"checkpoint.init_from={ckpt}",
                         f"train.lr={cfg.get('head_lr', 1e-2)}",
                         f"checkpoint.interval={int(cfg.get('head_iters', 50))}"]})
    return runs


# --------------------------------------------------------------------------- scoring


def _windows(study):
    import numpy as np

    return np.load(os.path.join(study.work, "data", "windows.npy"))


def token_losses(model, windows, batch: int, q: Optional[float] = None, exit_at=None):
    """Per-token CE [N, L] of each window's targets and the exit passes [N, L]; q / exit_at as
    `PonderLM.forward` takes them (a fixed-K model: every token at pass K)."""
    import torch
    import torch.nn.functional as F

    ces, exits = [], []
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            w = torch.from_numpy(windows[start:start + batch]).long()
            tokens, labels = w[:, :-1], w[:, 1:]
            kw = {}
            if model.halting is not None:
                kw = {"halt_q": 1.0 if q is None else q}
                if exit_at is not None:
                    kw["exit_at"] = exit_at[start:start + batch]
            z, ex = model(tokens, gather_logits=True, return_exits=True, **kw)
            ce = F.cross_entropy(z.float().flatten(0, 1), labels.flatten(), reduction="none")
            ces.append(ce.view(labels.shape))
            exits.append(ex)
    return torch.cat(ces), torch.cat(exits)


def _load(run_dir: str):
    from .evaluate import load_model

    _, model = load_model(os.path.join(run_dir, "ckpt"), None, "cpu")
    return model


def score_adaptive(model, windows, cfg: dict) -> dict:
    """The q sweep, the random-exit baseline at each q and the loss by exit pass."""
    import torch

    K = model.ponder_cfg.steps
    batch, draws = int(cfg.get("batch", 32)), int(cfg.get("random_draws", 2))
    fixed_ce, _ = token_losses(model, windows, batch, q=1.0)
    curve = []
    for q in cfg.get("qs", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]):
        ce, exits = token_losses(model, windows, batch, q=float(q))
        random = []
        for d in range(draws):
            gen = torch.Generator().manual_seed(1000 + d)
            shuffled = exits.flatten()[torch.randperm(exits.numel(), generator=gen)]
            rce, _ = token_losses(model, windows, batch, exit_at=shuffled.view(exits.shape))
            random.append(float(rce.mean()))
        curve.append({"q": float(q), "passes": float(exits.float().mean()) + 1.0,
                      "loss": float(ce.mean()), "random_loss": statistics.fmean(random),
                      "hist": [float((exits == k).float().mean()) for k in range(K + 1)]})
    q_by = float(cfg.get("by_exit_q", 0.5))
    ce, exits = token_losses(model, windows, batch, q=q_by)
    by_exit = [{"pass": k + 1, "share": float((exits == k).float().mean()),
                "loss": float(ce[exits == k].mean()) if bool((exits == k).any()) else None,
                "fixed_k_loss": (float(fixed_ce[exits == k].mean())
                                 if bool((exits == k).any()) else None)}
               for k in range(K + 1)]
    return {"fixed_k_loss": float(fixed_ce.mean()), "curve": curve, "by_exit_q": q_by,
            "by_exit": by_exit}


def _cached_score(run_dir: str, key: str, compute) -> dict:
    """The run's scores from run_dir/adaptive_eval.json when `key` (what they depend on)
    matches, else computed and stored."""
    path = os.path.join(run_dir, "adaptive_eval.json")
    try:
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        if saved.get("key") == key:
            return saved["scores"]
    except (OSError, ValueError):
        pass  # no scores yet, or unreadable ones: computed again below
    scores = compute()
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump({"key": key, "scores": scores}, fh, indent=1)
    os.replace(path + ".tmp", path)
    return scores


def _run_key(study, run: dict, cfg: dict) -> str:
    digest = spec_hash(study.sc, run, run_overrides(study.sc, run, study.data,
                                                    study.run_dir(run)))
    return json.dumps({"spec": digest, "scoring": {k: cfg.get(k) for k in
                                                   ("qs", "random_draws", "by_exit_q", "batch")}},
                      sort_keys=True)


# --------------------------------------------------------------------------- the stage


def stage_adaptive(study) -> None:
    import torch

    cfg = study.sc.get("adaptive") or {}
    if not cfg.get("enabled", True):
        return
    K = int(cfg.get("ponder_steps", 3))
    fixed_runs = [r for r in study.runs if r["kind"] in ("plain", "ponder")
                  and r["ponder_steps"] <= K]
    missing = [r["name"] for r in fixed_runs if not is_trained(study.run_dir(r), r["iters"])]
    runs = plan(study)
    if missing:
        if not study.only:
            raise SystemExit(f"study: the adaptive stage compares with the fixed-K runs; "
                             f"{', '.join(missing)} not trained: run the 'runs' stage first")
        fixed_runs = [r for r in fixed_runs if r["name"] not in missing]
        runs = [r for r in runs if r.get("source") not in missing]
    study.log(f"adaptive: training {len(runs)} runs ({int(study.sc['schedule']['jobs'])} at a "
              f"time): {', '.join(r['name'] for r in runs)}")
    def train(run: dict) -> None:  # train_run skips a trained run (retrains a changed one)
        fresh = not is_trained(study.run_dir(run), run["iters"])
        if fresh:
            study.log(f"adaptive: start {run['name']} ({run['iters']} steps, seed "
                      f"{run['seed']})")
        seconds = train_run(study, run)
        if fresh:
            study.log(f"adaptive: done  {run['name']} in {seconds:.0f}s")

    with ThreadPoolExecutor(max_workers=max(1, int(study.sc["schedule"]["jobs"]))) as pool:
        list(pool.map(train, runs))
    # the trainings are done: the scoring here may use every thread the jobs had
    schedule = study.sc["schedule"]
    torch.set_num_threads(max(1, int(schedule["jobs"]) * int(schedule["threads_per_job"])))
    windows = _windows(study)
    scoring = dict(cfg, batch=study.sc["eval"]["batch"])
    fixed = {}
    for r in fixed_runs:
        def compute(r=r):
            ce, _ = token_losses(_load(study.run_dir(r)), windows, int(scoring["batch"]))
            return {"loss": float(ce.mean())}
        fixed[r["name"]] = dict(group=r["group"], K=r["ponder_steps"], seed=r["seed"],
                                **_cached_score(study.run_dir(r), _run_key(study, r, {}),
                                                compute))
    variants = {}
    for r in runs:
        study.log(f"adaptive: scoring {r['name']} at {len(scoring.get('qs') or [])} q values")
        scores = _cached_score(study.run_dir(r), _run_key(study, r, scoring),
                               lambda r=r: score_adaptive(_load(study.run_dir(r)), windows,
                                                          scoring))
        variants[r["name"]] = dict(group=r["group"], variant=r["variant"], seed=r["seed"],
                                   iters=r["iters"], **scores)
    doc = summarise({"K": K, "scale": study.sc["scale"], "windows": int(len(windows)),
                     "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
                     "settings": {k: cfg.get(k) for k in ("q", "beta", "prior", "head_iters",
                                                          "random_draws", "by_exit_q")},
                     "fixed": fixed, "runs": variants})
    for path in write_outputs(study.out, doc):
        study.log(f"wrote {path}")
    study.results["adaptive"] = doc
    study.sections.append(section(doc))


# --------------------------------------------------------------------------- report


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarise(doc: dict) -> dict:
    """Per group (seeds averaged): the curve, the fixed-K rows, the goal and the verdicts."""
    K = doc["K"]
    fixed = {}
    for r in doc["fixed"].values():
        fixed.setdefault(r["K"], []).append(r["loss"])
    doc["fixed_summary"] = {k: {"loss": _mean(v), "std": statistics.pstdev(v), "n": len(v)}
                            for k, v in sorted(fixed.items())}
    ref = doc["fixed_summary"].get(K, {}).get("loss")
    groups: dict = {}
    for name, r in doc["runs"].items():
        groups.setdefault(r["group"], []).append(r)
    summary = {}
    for group, rows in groups.items():
        curve = []
        for i, point in enumerate(rows[0]["curve"]):
            at = [r["curve"][i] for r in rows]
            curve.append({"q": point["q"], "passes": _mean([a["passes"] for a in at]),
                          "loss": _mean([a["loss"] for a in at]),
                          "loss_std": statistics.pstdev([a["loss"] for a in at]),
                          "random_loss": _mean([a["random_loss"] for a in at])})
        # a threshold where every token exits at the same pass ties with its own shuffle
        beats = sum(c["loss"] < c["random_loss"] - 1e-9 for c in curve)
        ties = sum(abs(c["loss"] - c["random_loss"]) <= 1e-9 for c in curve)
        budget = GOAL_SHARE * (K + 1)
        within = [c for c in curve if c["passes"] <= budget]
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
                goal["equal_compute"] = {"K": k, "loss": loss, "gap": best["loss"] / loss - 1.0}
        by_exit = [{"pass": b["pass"], "share": _mean([r["by_exit"][j]["share"] for r in rows]),
                    "loss": _mean([r["by_exit"][j]["loss"] for r in rows]),
                    "fixed_k_loss": _mean([r["by_exit"][j]["fixed_k_loss"] for r in rows])}
                   for j, b in enumerate(rows[0]["by_exit"])]
        easy_first = [b["fixed_k_loss"] for b in by_exit if b["fixed_k_loss"] is not None]
        summary[group] = {"variant": rows[0]["variant"], "seeds": [r["seed"] for r in rows],
                          "own_fixed_k_loss": _mean([r["fixed_k_loss"] for r in rows]),
                          "curve": curve, "beats_random": beats, "ties_random": ties,
                          "points": len(curve),
                          "goal": goal, "by_exit": by_exit, "by_exit_q": rows[0]["by_exit_q"],
                          "easy_exit_first": (len(easy_first) > 1
                                              and easy_first == sorted(easy_first))}
    doc["summary"] = summary
    return doc


def _fmt(x: Optional[float], digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def section(doc: dict) -> str:
    K, s = doc["K"], doc["summary"]
    fs = doc["fixed_summary"]
    lines = [HEADING, "",
             f"K = {K} with a halting head, trained at the study's equal token count; each "
             f"scored on the same {doc['windows']} held-out windows ({doc['tokens']:,} tokens) "
             "at each Q-exit threshold q: validation loss (each token's cross-entropy at its "
             "exit pass, later passes reading its frozen keys/values) against the mean passes "
             "per token. *Random* = the same model with the exits its head chose shuffled over "
             "the tokens (same passes, same histogram). Settings: "
             + ", ".join(f"{k} {v}" for k, v in doc["settings"].items() if v is not None)
             + ". Figure: adaptive.png.", "",
             "Fixed K on the same windows (the study's runs; mean over seeds):", "",
             "| K | passes | valid loss | seeds |", "|---:|---:|---:|---:|"]
    for k, row in fs.items():
        spread = f" ± {row['std']:.4f}" if row["n"] > 1 else ""
        lines.append(f"| {k} | {int(k) + 1} | {_fmt(row['loss'])}{spread} | {row['n']} |")
    for group, g in s.items():
        lines += ["", f"**{group}** ({g['variant']}; seeds {', '.join(map(str, g['seeds']))}; "
                  f"its own q = 1 loss {_fmt(g['own_fixed_k_loss'])}):", "",
                  "| q | mean passes | valid loss | random exits, same passes | halting − random |",
                  "|---:|---:|---:|---:|---:|"]
        for c in g["curve"]:
            spread = f" ± {c['loss_std']:.4f}" if len(g["seeds"]) > 1 else ""
            lines.append(f"| {c['q']:g} | {c['passes']:.2f} | {_fmt(c['loss'])}{spread} | "
                         f"{_fmt(c['random_loss'])} | {c['loss'] - c['random_loss']:+.4f} |")
        lines += ["", f"Loss by exit pass at q = {g['by_exit_q']:g}:", "",
                  "| exit pass | share of tokens | loss at exit | fixed-K loss, same tokens |",
                  "|---:|---:|---:|---:|"]
        for b in g["by_exit"]:
            lines.append(f"| {b['pass']} | {_fmt(b['share'], 3)} | {_fmt(b['loss'])} | "
                         f"{_fmt(b['fixed_k_loss'])} |")
    lines += ["", "**Verdict.**", ""] + verdict(doc)
    return "\n".join(lines) + "\n"


def verdict(doc: dict) -> list[str]:
    K, out = doc["K"], []
    for group, g in doc["summary"].items():
        beats, ties = g["beats_random"], g.get("ties_random", 0)
        rest = g["points"] - ties  # thresholds where the exits differ between tokens
        word = ("beats" if beats == rest and rest else "does not beat" if beats == 0
                else f"beats at {beats} of {rest}")
        line = f"- {group}: halting {word} random exits at the same mean passes"
        if ties:
            line += (f" ({rest} thresholds where tokens exit at different passes; at "
                     f"{ties} every token exits at the same pass, a tie)")
        goal = g["goal"]
        if goal is None:
            line += f"; no threshold reaches <= {GOAL_SHARE * (K + 1):.1f} passes"
        else:
            line += (f"; at {goal['passes']:.2f} passes (q = {goal['q']:g}) the loss is "
                     f"{100 * goal['gap']:+.1f} % of fixed K = {K}'s: the goal (<= "
                     f"{100 * GOAL_SHARE:.0f} % of the passes within {100 * GOAL_LOSS:.0f} %) is "
                     f"{'met' if goal['met'] else 'not met'}")
            same = goal.get("equal_compute")
            if same:
                line += (f"; fixed K = {same['K']}, paying {same['K'] + 1} passes for every "
                         f"token, scores {same['loss']:.4f}: adaptive is "
                         f"{100 * same['gap']:+.1f} % against it")
        line += ("; tokens that exit earlier are the ones fixed K finds easier"
                 if g["easy_exit_first"] else
                 "; earlier exits are not consistently the easier tokens")
        out.append(line + ".")
    if doc["scale"] == "toy":
        out.append("- toy scale: a pipeline check, the numbers mean nothing.")
    return out


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
    ax.plot([int(k) + 1 for k in fixed], [v["loss"] for v in fixed.values()], "ks",
            label="fixed K = 0..K")
    ax.set_xlabel("mean passes per token (decode compute)")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title(f"Adaptive pondering, K = {doc['K']} ({doc['scale']} scale)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(out_dir: str, doc: dict) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    js = os.path.join(out_dir, "adaptive.json")
    with open(js + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(js + ".tmp", js)
    md = os.path.join(out_dir, "adaptive.md")
    with open(md, "w", encoding="utf-8") as fh:
        fh.write(section(doc))
    return [js, md, plot(doc, os.path.join(out_dir, "adaptive.png"))]


def render(out_dir: str) -> list[str]:
    """Rebuild adaptive.md / .png from DIR/adaptive.json and splice the section into
    DIR/results.md (and the document into results.json) where those exist."""
    with open(os.path.join(out_dir, "adaptive.json"), encoding="utf-8") as fh:
        doc = summarise(json.load(fh))
    return write_outputs(out_dir, doc) + add_to_results(out_dir, "adaptive", doc, section(doc))


def main(argv=None) -> int:
    return render_main(argv, "python -m experiments.adaptive", "adaptive pondering",
                       "adaptive.json", render)


if __name__ == "__main__":
    raise SystemExit(main())
