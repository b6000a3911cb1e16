"""Training one run of the study: its trainer overrides, the hash of what makes its result,
and the `ponder-pt train` subprocess (skipped when the run's final checkpoint is there). The
study's stages (experiments/study.py, experiments/adaptive.py) share these."""

from __future__ import annotations

import hashlib
import json
import os
import time

from .jobs import is_trained, job_command, job_env, run_logged


def run_overrides(sc: dict, run: dict, data: dict, run_dir: str) -> list[str]:
    base_iters = int(sc["train"]["base_iters"])
    interval = max(1, base_iters // max(1, int(sc["schedule"]["curve_points"])))
    return [
        *sc["train"]["overrides"],
        *sc.get("train_sets", []),
        f"model.vocab_size={data['padded_vocab_size']}",  # the same rows for every run
        f"data.train=[{data['train_prefix']}]", f"data.tokenizer={data['tokenizer']}",
        "data.split=100,0,0", "data.valid=[]", f"data.cache_dir={os.path.join(run_dir, 'cache')}",
        f"train.iters={run['iters']}", f"train.seed={run['seed']}",
        "train.eval_iters=0", f"train.eval_interval={run['iters']}",
        f"ponder.steps={run['ponder_steps']}", f"ponder.feedback={run['feedback']}",
        f"pause.rate={run['pause_rate']}",
        f"checkpoint.dir={os.path.join(run_dir, 'ckpt')}", f"checkpoint.interval={interval}",
        "checkpoint.keep_last=100000", f"log.dir={run_dir}", "log.interval=10",
        *run.get("extra", []),  # a later stage's own settings (e.g. adaptive pondering's)
    ]


def spec_hash(sc: dict, run: dict, overrides: list[str]) -> str:
    """What makes a run's result: its overrides, the data and the evaluation settings."""
    key = {"overrides": overrides, "run": run, "corpus": sc["corpus"],
           "tokenizer": sc["tokenizer"], "eval": sc["eval"], "config": sc["train"]["config"]}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def train_run(study, run: dict) -> float:
    """Train one run of `study` (an experiments.study.Study) in a subprocess unless its final
    checkpoint is there (a run whose settings changed since the last attempt starts over);
    returns the training seconds."""
    sc, run_dir = study.sc, study.run_dir(run)
    overrides = run_overrides(sc, run, study.data, run_dir)
    digest = spec_hash(sc, run, overrides)
    spec_path = os.path.join(run_dir, "spec.json")
    if os.path.exists(spec_path):
        with open(spec_path, encoding="utf-8") as fh:
            if json.load(fh).get("spec_hash") != digest:  # settings changed: start over
                import shutil

                study.log(f"{run['name']}: settings changed since the last attempt; retraining")
                shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(spec_path, "w", encoding="utf-8") as fh:
        json.dump({"spec_hash": digest, "run": run, "overrides": overrides}, fh, indent=1)
    t0 = time.time()
    if not is_trained(run_dir, run["iters"]):
        cmd = job_command("ponder_pt", "train", "--config", sc["train"]["config"],
                          "--nproc", sc["train"]["nproc"])
        for item in overrides:
            cmd += ["--set", item]
        code = run_logged(cmd, os.path.join(run_dir, "train.log"),
                          job_env(int(sc["schedule"]["threads_per_job"])))
        if code != 0:
            raise RuntimeError(f"{run['name']}: training exited with code {code}; see "
                               f"{os.path.join(run_dir, 'train.log')}")
    return time.time() - t0
