"""The miniature study: the papers' claims, reproduced small, with one command.

    python -m experiments.study --out experiments/results          # ~30 min on 2 CPU cores
    python -m experiments.study --toy --out /tmp/study_toy          # the whole pipeline, seconds
    python -m experiments.study --scale gpu --out runs/study_gpu --set corpus.inputs=[big.jsonl]
    python -m experiments.study --out experiments/results --list    # the plan, nothing run

Every run trains the same Pythia-shaped model on the same corpus with the same seed and
token count (`ponder-pt train`), then is evaluated with the same code on the same held-out
windows (experiments/evaluate.py):

* plain (ponder.steps=0, no pauses); pondering K = 1, 2, 3 (PonderingLM); the looped baseline
  (ponder.feedback=hidden, PonderingLM's ablation); latent thoughts M = 1 (PonderLM-2,
  scored exactly and with training's Jacobi iterations); pause pretraining (pause.rate=0.1,
  Goyal et al.), scored with 0, 2 and 10 appended pauses on a held-out next-token task;
* equal FLOPs: plain trained on (K+1)x the tokens, for every K;
* extra seeds for `runs.seeded` (plain and K=3): mean ± spread.

The study is a list of stages (`STAGES`): data -> runs -> report. Each stage skips what is
already done, so a rerun only redoes what is missing (a run whose eval.json matches its spec
is skipped; a run whose training was interrupted resumes from its last checkpoint), and the
report stage always regenerates results.md, results.json and the figures. A later study adds
itself by appending a stage (a function of the `Study`) that stores its numbers under
`study.results[<name>]` and its markdown in `study.sections`; the report stage writes both.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import yaml

from ponder_pt.config.tree import deep_merge

from .adaptive import stage_adaptive
from .early_exit import stage_early_exit
from .jobs import job_command, job_env, run_logged, stop_children
from .pause_ft import stage_pause_ft
from .training import run_overrides, spec_hash, train_run  # noqa: F401 - run_overrides: tests

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "configs")


# --------------------------------------------------------------------------- study config


def _load_chain(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    base = raw.pop("base", None)
    if base:
        return deep_merge(_load_chain(os.path.join(CONFIGS, f"{base}.yaml")), raw)
    return raw


def load_study_config(scale: str, sets: list[str] = ()) -> dict:
    """configs/<scale>.yaml (or a YAML path), its `base:` chain, then --set dotted overrides
    (the key must exist, so a typo fails instead of being ignored)."""
    path = scale if os.path.exists(scale) else os.path.join(CONFIGS, f"{scale}.yaml")
    if not os.path.exists(path):
        known = sorted(f[:-5] for f in os.listdir(CONFIGS) if f.endswith(".yaml"))
        raise SystemExit(f"study: --scale {scale!r}: no such config (known: {', '.join(known)})")
    sc = _load_chain(path)
    sc["scale"] = os.path.splitext(os.path.basename(path))[0]
    for item in sets:
        key, eq, value = item.partition("=")
        parts = key.strip().split(".")
        node = sc
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not eq or not isinstance(node, dict) or parts[-1] not in node:
            raise SystemExit(f"study: --set {item!r}: expected an existing dotted.key=value "
                             f"of the study config (e.g. train.base_iters=400)")
        node[parts[-1]] = yaml.safe_load(value)
    return sc


def train_override(sc: dict, key: str, default=None):
    """The value a `train.overrides` entry sets for `key` (last wins), else `default`."""
    value = default
    for item in sc["train"]["overrides"]:
        k, _, v = item.partition("=")
        if k.strip() == key:
            value = yaml.safe_load(v)
    return value


# --------------------------------------------------------------------------- the plan


def plan_runs(sc: dict) -> list[dict]:
    """Every run: name, group (the run without its seed), seed, and its own overrides."""
    r = sc["runs"]
    seeds = list(r["seeds"])
    base_iters = int(sc["train"]["base_iters"])
    groups: list[dict] = [{"group": "plain", "kind": "plain", "ponder_steps": 0, "mult": 1}]
    for k in r.get("ponder_steps", []):
        groups.append({"group": f"ponder_k{k}", "kind": "ponder", "ponder_steps": int(k),
                       "mult": 1})
    for k in r.get("looped_steps", []):
        groups.append({"group": f"looped_k{k}", "kind": "looped", "ponder_steps": int(k),
                       "mult": 1, "feedback": "hidden"})
    for m in r.get("thoughts", []):  # latent thoughts (PonderLM-2); its keys only, so the
        # other runs' specs (and finished runs) stay as they were
        groups.append({"group": f"thoughts_m{m}", "kind": "thoughts", "ponder_steps": 0,
                       "mult": 1, "thoughts": int(m), "extra": [f"thoughts.count={int(m)}"]})
    for m in r.get("pause_every_token", []):  # PonderLM-2's pause baseline
        groups.append({"group": f"pause_every_m{m}", "kind": "pause_every", "ponder_steps": 0,
                       "mult": 1, "pause_every": int(m),
                       "extra": ["pause.mode=every_token", f"pause.per_token={int(m)}"]})
    if float(r.get("pause_rate", 0) or 0) > 0:
        groups.append({"group": "pause", "kind": "pause", "ponder_steps": 0, "mult": 1,
                       "pause_rate": float(r["pause_rate"])})
    for m in r.get("flops_multiples", []):
        groups.append({"group": f"plain_x{m}", "kind": "plain_long", "ponder_steps": 0,
                       "mult": int(m)})
    runs = []
    for g in groups:
        g_seeds = seeds if g["group"] in r.get("seeded", []) else seeds[:1]
        for i, seed in enumerate(g_seeds):
            run = dict(g, seed=int(seed), name=g["group"] if i == 0 else f"{g['group']}.s{seed}",
                       iters=base_iters * g["mult"])
            run.setdefault("feedback", "embedding")
            run.setdefault("pause_rate", 0.0)
            runs.append(run)
    return runs


def relative_cost(sc: dict, run: dict, vocab: int) -> float:
    """Training FLOPs of a run (for scheduling and the ETA)."""
    from ponder_pt.config import load_config
    from ponder_pt.engine.flops import run_flops_per_token

    cfg = load_config(sc["train"]["config"], [
        *sc["train"]["overrides"], *sc.get("train_sets", []),
        f"ponder.steps={run['ponder_steps']}", f"ponder.feedback={run['feedback']}",
        *run.get("extra", [])], validate=False)
    cfg.model.vocab_size = vocab
    fpt = run_flops_per_token(cfg)
    return fpt * run["iters"] * cfg.train.global_batch * cfg.data.seq_len


# --------------------------------------------------------------------------- the study


@dataclass
class Study:
    sc: dict
    out: str
    only: Optional[list[str]] = None
    log: Callable = print
    runs: list = field(default_factory=list)
    data: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    sections: list = field(default_factory=list)
    started: float = field(default_factory=time.time)
    trained: list = field(default_factory=list)  # runs trained / evaluated by this invocation
    load: Optional[dict] = None  # 1-minute load average while they ran

    @property
    def work(self) -> str:
        return os.path.join(self.out, "work")

    def run_dir(self, run: dict) -> str:
        return os.path.join(self.work, "runs", run["name"])

    def selected(self) -> list[dict]:
        if not self.only:
            return self.runs
        return [r for r in self.runs if r["name"] in self.only or r["group"] in self.only]


def _last_step(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 2048))
            lines = fh.read().decode("utf-8", "replace").strip().splitlines()
        return int(json.loads(lines[-1])["step"])
    except (OSError, ValueError, IndexError, KeyError):
        return 0


def _load_eval(run_dir: str, digest: str) -> Optional[dict]:
    try:
        with open(os.path.join(run_dir, "eval.json"), encoding="utf-8") as fh:
            ev = json.load(fh)
    except (OSError, ValueError):
        return None
    return ev if ev.get("spec_hash") == digest else None


def execute_run(study: Study, run: dict) -> dict:
    """Train (unless trained) and evaluate one run in subprocesses; returns its eval.json."""
    sc, run_dir = study.sc, study.run_dir(run)
    overrides = run_overrides(sc, run, study.data, run_dir)
    digest = spec_hash(sc, run, overrides)
    ev = _load_eval(run_dir, digest)
    if ev is not None:
        return ev
    train_wall = train_run(study, run)
    threads = int(sc["schedule"]["threads_per_job"])
    env = job_env(threads)
    ev_cfg = sc["eval"]
    extra = {"spec_hash": digest, "name": run["name"], "group": run["group"],
             "kind": run["kind"], "seed": run["seed"], "mult": run["mult"],
             "train_wall_s": round(train_wall, 1)}
    prev = os.path.join(run_dir, "train_wall.json")  # keep the first, complete training time
    if os.path.exists(prev) and train_wall < 5:
        with open(prev, encoding="utf-8") as fh:
            extra["train_wall_s"] = json.load(fh)["train_wall_s"]
    else:
        with open(prev, "w", encoding="utf-8") as fh:
            json.dump({"train_wall_s": extra["train_wall_s"]}, fh)
    cmd = job_command("experiments.evaluate", "--run-dir", run_dir,
                      "--data", os.path.join(study.work, "data"),
                      "--curve-windows", ev_cfg.get("curve_windows", 0),
                      "--pause-counts", ",".join(str(m) for m in ev_cfg["pause_counts"]),
                      "--batch", ev_cfg["batch"], "--device", ev_cfg["device"],
                      "--threads", threads, "--extra", json.dumps(extra))
    if ev_cfg.get("keep_checkpoints"):
        cmd.append("--keep-checkpoints")
    code = run_logged(cmd, os.path.join(run_dir, "eval.log"), env, mode="w")
    if code != 0:
        raise RuntimeError(f"{run['name']}: evaluation exited with code {code}; see "
                           f"{os.path.join(run_dir, 'eval.log')}")
    ev = _load_eval(run_dir, digest)
    if ev is None:
        raise RuntimeError(f"{run['name']}: evaluation wrote no eval.json")
    return ev


# --------------------------------------------------------------------------- stages


def stage_data(study: Study) -> None:
    from .data import build

    seq_len = train_override(study.sc, "data.seq_len", 2048)
    tp = int(train_override(study.sc, "parallel.tp", 1) or 1)
    study.data = build(study.sc, study.work, int(seq_len), tp, log=study.log)
    study.results["data"] = study.data
    train_tokens = study.data["train_tokens"]
    longest = max((relative_tokens(study, r) for r in study.runs), default=0)
    if longest > 4 * train_tokens:
        study.log(f"note: the longest run reads {longest:,} tokens = {longest / train_tokens:.1f} "
                  f"epochs of the {train_tokens:,}-token training set")


def relative_tokens(study: Study, run: dict) -> int:
    gb = int(train_override(study.sc, "train.global_batch", 1))
    sl = int(train_override(study.sc, "data.seq_len", 2048))
    return run["iters"] * gb * sl


def stage_runs(study: Study) -> None:
    """Train + evaluate every selected run, `schedule.jobs` at a time, longest first."""
    runs = study.selected()
    vocab = study.data["padded_vocab_size"]
    cost = {r["name"]: relative_cost(study.sc, r, vocab) for r in runs}
    evals: dict = {}
    todo = []
    for r in runs:
        overrides = run_overrides(study.sc, r, study.data, study.run_dir(r))
        ev = _load_eval(study.run_dir(r), spec_hash(study.sc, r, overrides))
        if ev is not None:
            evals[r["name"]] = ev
        else:
            todo.append(r)
    study.log(f"runs: {len(runs)} planned, {len(evals)} already done, {len(todo)} to run "
              f"({int(study.sc['schedule']['jobs'])} at a time)")
    todo.sort(key=lambda r: cost[r["name"]], reverse=True)
    todo_names = [r["name"] for r in todo]
    total = sum(cost[r["name"]] for r in todo) or 1.0
    lock = threading.Lock()
    state = {"running": {}, "done_cost": 0.0, "errors": [], "t0": time.time()}

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                run = todo.pop(0)
                state["running"][run["name"]] = (run, time.time())
            study.log(f"start {run['name']} ({run['iters']} steps, K={run['ponder_steps']}"
                      f"{' looped' if run['feedback'] == 'hidden' else ''}"
                      f"{', pause rate ' + str(run['pause_rate']) if run['pause_rate'] else ''}"
                      f", seed {run['seed']})")
            try:
                ev = execute_run(study, run)
                with lock:
                    evals[run["name"]] = ev
                study.log(f"done  {run['name']}: valid loss {ev['final']['valid_loss']:.4f} "
                          f"(ppl {ev['final']['valid_ppl']:.2f}), train {ev['train_wall_s']:.0f}s"
                          f", eval {ev['eval_seconds']:.0f}s")
            except Exception as exc:  # keep going; reported at the end
                with lock:
                    state["errors"].append(str(exc))
                study.log(f"FAILED {run['name']}: {exc}")
            with lock:
                state["running"].pop(run["name"], None)
                state["done_cost"] += cost[run["name"]]

    threads = [threading.Thread(target=worker, daemon=True)
               for _ in range(max(1, int(study.sc["schedule"]["jobs"])))]
    for t in threads:
        t.start()
    last, loads = time.time(), []
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        if hasattr(os, "getloadavg"):
            loads.append(os.getloadavg()[0])
        if time.time() - last >= float(study.sc["schedule"].get("progress_s", 30)):
            last = time.time()
            with lock:
                running = list(state["running"].values())
                done_cost = state["done_cost"]
            partial = sum(cost[r["name"]] * min(1.0, _last_step(study.run_dir(r)) / r["iters"])
                          for r, _ in running)
            frac = (done_cost + partial) / total
            elapsed = time.time() - state["t0"]
            eta = f", eta {elapsed / frac * (1 - frac) / 60:.1f} min" if frac > 0.02 else ""
            now = ", ".join(f"{r['name']} {_last_step(study.run_dir(r))}/{r['iters']}"
                            for r, _ in running)
            study.log(f"progress {frac:5.1%} of the training FLOPs, {elapsed / 60:.1f} min"
                      f"{eta} | running: {now or '-'}")
    for t in threads:
        t.join()
    study.results["runs"] = {r["name"]: evals[r["name"]] for r in study.runs
                             if r["name"] in evals}
    # runs outside --only that were done earlier still belong in the report
    for r in study.runs:
        if r["name"] not in study.results["runs"]:
            overrides = run_overrides(study.sc, r, study.data, study.run_dir(r))
            ev = _load_eval(study.run_dir(r), spec_hash(study.sc, r, overrides))
            if ev is not None:
                study.results["runs"][r["name"]] = ev
    if state["errors"]:
        study.results["errors"] = state["errors"]
    study.trained = [n for n in todo_names if n in evals]
    if loads:
        study.load = {"mean": round(sum(loads) / len(loads), 2), "max": round(max(loads), 2),
                      "cpus": os.cpu_count()}


def stage_report(study: Study) -> None:
    from .report import write_report

    if "runs" not in study.results:  # --stages report: collect what is on disk
        study.results["runs"] = {}
        for r in study.runs:
            overrides = run_overrides(study.sc, r, study.data, study.run_dir(r))
            ev = _load_eval(study.run_dir(r), spec_hash(study.sc, r, overrides))
            if ev is not None:
                study.results["runs"][r["name"]] = ev
    paths = write_report(study)
    for p in paths:
        study.log(f"wrote {p}")


# name -> function(study); run in this order. Later studies (e.g. early exit) append here.
STAGES: list[tuple[str, Callable[[Study], None]]] = [
    ("data", stage_data),
    ("runs", stage_runs),
    ("early_exit", stage_early_exit),
    ("pause_ft", stage_pause_ft),
    ("adaptive", stage_adaptive),
    ("report", stage_report),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.study",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join("experiments", "results"),
                    help="results.md / results.json / figures here; runs under OUT/work")
    ap.add_argument("--scale", default="cpu",
                    help="study config: toy | cpu | gpu | cluster (experiments/configs) or a YAML")
    ap.add_argument("--toy", action="store_true", help="same as --scale toy")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a study config key, e.g. --set train.base_iters=400")
    ap.add_argument("--train-set", dest="train_sets", action="append", default=[],
                    metavar="KEY=VALUE", help="extra trainer override for every run, e.g. "
                    "--train-set model.hidden_size=256")
    ap.add_argument("--only", nargs="*", help="run only these runs or groups (e.g. plain "
                    "ponder_k3); the report still shows every finished run")
    ap.add_argument("--stages", nargs="*", help=f"stages to run (default all: "
                    f"{' '.join(n for n, _ in STAGES)}); data is always loaded")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)

    sc = load_study_config("toy" if args.toy else args.scale, args.sets)
    sc["train_sets"] = list(args.train_sets)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "work", "study.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log_fh = open(log_path, "a", encoding="utf-8")
    t_start = time.time()

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{(time.time() - t_start) / 60:5.1f}m] {msg}"
        print(line, flush=True)
        log_fh.write(line + "\n")
        log_fh.flush()

    study = Study(sc=sc, out=args.out, only=args.only, log=log)
    study.runs = plan_runs(sc)
    if args.list:
        for r in study.runs:
            print(f"{r['name']:<22} K={r['ponder_steps']} feedback={r['feedback']:<9} "
                  f"pause={r['pause_rate']} iters={r['iters']} seed={r['seed']}")
        return 0
    log(f"study '{sc['scale']}': {sc.get('description', '')}; {len(study.runs)} runs -> "
        f"{os.path.abspath(args.out)}")
    wanted = set(args.stages or [n for n, _ in STAGES])
    unknown = wanted - {n for n, _ in STAGES}
    if unknown:
        raise SystemExit(f"study: unknown stage(s) {sorted(unknown)}")
    import signal

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        for name, fn in STAGES:
            if name in wanted or name == "data":
                log(f"=== stage {name}")
                fn(study)
    except KeyboardInterrupt:
        log("interrupted: stopping the running runs (they save a checkpoint; rerun the same "
            "command to resume)")
        stop_children()
        return 130
    wall = round(time.time() - t_start, 1)
    if study.trained:  # the measured cost of the study: one line per invocation that ran runs
        with open(os.path.join(study.work, "invocations.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"started": time.strftime("%Y-%m-%d %H:%M:%S",
                                                          time.localtime(t_start)),
                                 "wall_s": wall, "runs": study.trained, "load": study.load,
                                 "jobs": sc["schedule"]["jobs"]}) + "\n")
        if "report" in wanted:  # the report above could not know this invocation's wall yet
            stage_report(study)
    log(f"study finished in {wall / 60:.1f} min")
    if study.results.get("errors"):
        log("errors:\n  " + "\n  ".join(study.results["errors"]))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
