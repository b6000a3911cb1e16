"""The adaptive pondering part of the miniature study: does a halting head buy back decode
compute, and does it beat exiting at random?

Trained at the study's equal token count with K = `adaptive.ponder_steps` and a halting head:
`palbert` and `pondernet` heads, `dense` and `frozen` exits (DESIGN.md, "Adaptive pondering");
plus the head-only calibration of the study's own fixed-K run (`ponder_k{K}`: only the head
trains, `adaptive.head_iters` steps). Each is scored on the study's held-out windows at every q
of `adaptive.qs`: validation loss (each token's CE at its exit pass, frozen keys/values) against
mean passes per token. Beside them, on the same windows:

* the study's fixed-K runs (plain and ponder_k1..K, every seed the plan has: the stage fails,
  naming them, while one is not trained);
* the same model with **random exits at the same mean passes**: the exit passes its halting
  chose, shuffled over the tokens (the same histogram, so the same compute), averaged over
  `adaptive.random_draws` shuffles. A halting head that does not beat this has learned nothing
  about which tokens are easy. Each window's loss is kept for both, so the report puts a paired
  bootstrap interval over the windows on halting − random (experiments/adaptive_report.py);
* per-token loss by exit pass (at `adaptive.by_exit_q`), next to the fixed-K model's loss on the
  same tokens: easy tokens should exit first.

The goal line: at <= 60 % of fixed K's passes, validation loss within 1 % of the fixed-K run.
Writes OUT/adaptive.json (with the plan it was asked for and the stage's wall time),
OUT/adaptive.md, OUT/adaptive.png and the section of results.md; `python -m
experiments.adaptive --render DIR` rebuilds the markdown, the figure and the section from
DIR/adaptive.json, and `--readme experiments/README.md` the README's table from the json it
names (experiments/adaptive_report.py).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from .adaptive_report import FORMAT, main, summarise, train_hint, write_report
from .bootstrap import BOOTSTRAP
from .jobs import is_trained
from .training import run_overrides, spec_hash, train_run

QS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
VARIANTS = {"palbert_dense": ("palbert", "dense"), "pondernet_dense": ("pondernet", "dense"),
            "palbert_frozen": ("palbert", "frozen"), "pondernet_frozen": ("pondernet", "frozen")}


def _halting_sets(cfg: dict, mode: str, exits: str) -> list[str]:
    return [f"ponder.halting.mode={mode}", f"ponder.halting.train_exits={exits}",
            f"ponder.halting.q={cfg.get('q', 0.5)}", f"ponder.halting.beta={cfg.get('beta', 0.1)}",
            f"ponder.halting.prior={cfg.get('prior', 0.3)}"]


def check_scoring(sc: dict) -> None:
    """The scoring settings a report can be made from: at least one q in (0, 1) and at least
    one random draw (checked before anything trains)."""
    cfg = sc.get("adaptive") or {}
    where = f"experiments/configs/{sc.get('scale', 'cpu')}.yaml (or --set)"
    qs = cfg.get("qs", QS)
    if not isinstance(qs, list) or not qs or not all(
            isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q < 1 for q in qs):
        raise SystemExit(f"study: adaptive.qs = {qs!r} in {where}: list the Q-exit thresholds "
                         f"to score, each in (0, 1), e.g. --set adaptive.qs=[0.3,0.6]")
    draws = cfg.get("random_draws", 8)
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
        raise SystemExit(f"study: adaptive.random_draws = {draws!r} in {where}: the number of "
                         f"shuffles the random-exit baseline averages, an integer >= 1, e.g. "
                         f"--set adaptive.random_draws=8")


def plan(study) -> list[dict]:
    """The stage's runs (study run dicts with their halting overrides in "extra")."""
    cfg = study.sc.get("adaptive") or {}
    check_scoring(study.sc)
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


def _window_means(ce) -> list:
    """Each window's mean token loss (the unit the report's bootstrap resamples)."""
    return [float(x) for x in ce.mean(dim=1)]


def score_adaptive(model, windows, cfg: dict) -> dict:
    """The q sweep with the random-exit baseline at each q (every window's loss for both,
    each draw's mean) and, per exit pass at `by_exit_q`, the tokens' summed losses."""
    import torch

    K = model.ponder_cfg.steps
    batch, draws = int(cfg.get("batch", 32)), int(cfg.get("random_draws", 8))
    fixed_ce, _ = token_losses(model, windows, batch, q=1.0)
    curve = []
    for q in cfg.get("qs", QS):
        ce, exits = token_losses(model, windows, batch, q=float(q))
        hist = [float((exits == k).float().mean()) for k in range(K + 1)]
        if max(hist) == 1.0:
            # every token exits at one pass: a shuffle changes no exit, so each draw is this
            # very scoring (the report calls the point "same exits", never a win)
            rand_windows, rand_draws = _window_means(ce), [float(ce.mean())] * draws
        else:
            per_draw = []
            for d in range(draws):
                gen = torch.Generator().manual_seed(1000 + d)
                shuffled = exits.flatten()[torch.randperm(exits.numel(), generator=gen)]
                rce, _ = token_losses(model, windows, batch, exit_at=shuffled.view(exits.shape))
                per_draw.append(rce)
            rand_draws = [float(r.mean()) for r in per_draw]
            rand_windows = _window_means(torch.stack(per_draw).mean(dim=0))
        curve.append({"q": float(q), "passes": float(exits.float().mean()) + 1.0,
                      "loss": float(ce.mean()), "hist": hist,
                      "loss_windows": _window_means(ce), "random_windows": rand_windows,
                      "random_draws": rand_draws})
    q_by = float(cfg.get("by_exit_q", 0.5))
    ce, exits = token_losses(model, windows, batch, q=q_by)
    by_exit = [{"pass": k + 1, "tokens": int((exits == k).sum()),
                "ce_sum": float(ce[exits == k].sum()),
                "fixed_k_ce_sum": float(fixed_ce[exits == k].sum())} for k in range(K + 1)]
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
    return json.dumps({"spec": digest, "format": FORMAT,
                       "scoring": {k: cfg.get(k) for k in ("qs", "random_draws", "by_exit_q",
                                                           "batch")}}, sort_keys=True)


# --------------------------------------------------------------------------- the stage


def _load_avg() -> Optional[float]:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def stage_adaptive(study) -> None:
    import torch

    cfg = study.sc.get("adaptive") or {}
    if not cfg.get("enabled", True):
        return
    t0, load0 = time.time(), _load_avg()
    K = int(cfg.get("ponder_steps", 3))
    fixed_runs = [r for r in study.runs if r["kind"] in ("plain", "ponder")
                  and r["ponder_steps"] <= K]
    runs = plan(study)
    # every fixed-K seed the plan has, or none of the report: its means are over what was asked
    missing = [r["name"] for r in fixed_runs if not is_trained(study.run_dir(r), r["iters"])]
    if missing:
        raise SystemExit(f"study: the adaptive stage compares with every fixed-K run of the "
                         f"plan, and {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not trained in "
                         f"{os.path.join(study.work, 'runs')}: "
                         + train_hint(study.sc["scale"], study.out, missing))
    study.log(f"adaptive: training {len(runs)} runs ({int(study.sc['schedule']['jobs'])} at a "
              f"time): {', '.join(r['name'] for r in runs)}")
    trained = []

    def train(run: dict) -> None:  # train_run skips a trained run (retrains a changed one)
        fresh = not is_trained(study.run_dir(run), run["iters"])
        if fresh:
            study.log(f"adaptive: start {run['name']} ({run['iters']} steps, seed "
                      f"{run['seed']})")
        seconds = train_run(study, run)
        if fresh:
            trained.append(run["name"])
            study.log(f"adaptive: done  {run['name']} in {seconds:.0f}s")

    with ThreadPoolExecutor(max_workers=max(1, int(study.sc["schedule"]["jobs"]))) as pool:
        list(pool.map(train, runs))
    t_trained = time.time()
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
        study.log(f"adaptive: scoring {r['name']} at {len(scoring.get('qs', QS))} q values")
        scores = _cached_score(study.run_dir(r), _run_key(study, r, scoring),
                               lambda r=r: score_adaptive(_load(study.run_dir(r)), windows,
                                                          scoring))
        variants[r["name"]] = dict(group=r["group"], variant=r["variant"], seed=r["seed"],
                                   iters=r["iters"], **scores)
    doc = {"format": FORMAT, "K": K, "scale": study.sc["scale"], "windows": int(len(windows)),
           "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
           "settings": {k: cfg.get(k) for k in ("q", "beta", "prior", "head_iters",
                                                "random_draws", "by_exit_q")},
           "bootstrap": dict(BOOTSTRAP, **(cfg.get("bootstrap") or {})),
           # what the report was asked for: it fails while any of these is absent
           "planned": {"fixed": [r["name"] for r in fixed_runs],
                       "runs": [r["name"] for r in runs]},
           "stage": {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
                     "wall_s": round(time.time() - t0, 1),
                     "train_wall_s": round(t_trained - t0, 1),
                     "trained": sorted(trained), "jobs": int(schedule["jobs"]),
                     "threads_per_job": int(schedule["threads_per_job"]),
                     "load_1min": {"start": load0, "end": _load_avg()}, "cpus": os.cpu_count()},
           "fixed": fixed, "runs": variants}
    paths, text = write_report(study.out, summarise(doc))
    for path in paths:
        study.log(f"wrote {path}")
    study.results["adaptive"] = doc
    study.sections.append(text)


if __name__ == "__main__":
    raise SystemExit(main())
