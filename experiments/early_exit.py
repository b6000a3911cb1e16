"""The early-exit part of the miniature study: PALBERT Q-exit vs PonderNet vs PABEE (and the
full model, and entropy exit) fine-tuned on one small local classification task, metric
against the average number of layers used.

The backbone is, by default, the study's own pretrained plain model exported to Hugging Face
format (`ponder-pt convert to-hf`), so the whole chain — pretrain, export, fine-tune with
exit heads — runs with this framework's tools; `early_exit.backbone` may name another run of
the study (e.g. ponder_k3) or a random-initialised tiny encoder (albert / bert / roberta, as
in PALBERT's ALBERT setting). The task is ponder_pt.early_exit.toy's polarity task.
"""

from __future__ import annotations

import os
import subprocess

from ponder_pt.early_exit.compare import markdown, plot, rows_of, run_strategies
from ponder_pt.early_exit.toy import tiny_encoder, write_polarity_task

from .jobs import job_command

ENCODERS = ("albert", "bert", "roberta")


def _backbone(study, cfg: dict, root: str) -> str:
    name = cfg.get("backbone", "plain")
    out = os.path.join(root, f"backbone_{name}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    if name in ENCODERS:
        return tiny_encoder(name, out, layers=int(cfg.get("layers", 6)),
                            hidden=int(cfg.get("hidden", 128)))
    runs = {r["name"]: r for r in study.runs}
    if name not in runs:
        raise SystemExit(f"study: early_exit.backbone={name!r} is neither a run of this study "
                         f"({', '.join(runs)}) nor one of {', '.join(ENCODERS)}")
    ckpt = os.path.join(study.run_dir(runs[name]), "ckpt")
    if not os.path.isdir(ckpt):
        if study.only:  # a partial study (--only) that did not train the backbone run
            return None
        raise SystemExit(f"study: early_exit.backbone={name}: no checkpoint in {ckpt}; run the "
                         f"'runs' stage first")
    cmd = job_command("ponder_pt", "convert", "to-hf", "--checkpoint", ckpt, "--out", out)
    study.log(f"early exit: exporting {name} -> {out}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"export of {ckpt} failed:\n{proc.stderr[-3000:]}")
    return out


def stage_early_exit(study) -> None:
    cfg = study.sc.get("early_exit") or {}
    if not cfg.get("enabled", True):
        return
    root = os.path.join(study.work, "early_exit")
    os.makedirs(root, exist_ok=True)
    task = write_polarity_task(os.path.join(root, "polarity"), int(cfg.get("n_train", 2000)),
                               int(cfg.get("n_valid", 400)))
    backbone = _backbone(study, cfg, root)
    if backbone is None:
        study.log(f"early exit: skipped (run {cfg.get('backbone')} not trained in this study)")
        return
    strategies = cfg.get("strategies", ["none", "palbert", "pondernet", "pabee"])
    study.log(f"early exit: fine-tuning {', '.join(strategies)} on the polarity task")
    results = run_strategies(backbone, task, os.path.join(root, "runs"), strategies,
                             cfg.get("overrides", []))
    figure = os.path.join(study.out, "early_exit.png")
    plot(results, figure)
    study.results["early_exit"] = {"backbone": cfg.get("backbone", "plain"),
                                   "rows": rows_of(results)}
    study.sections.append("\n".join([
        "## Early exit (PALBERT Q-exit vs PonderNet vs PABEE)", "",
        f"Backbone: `{cfg.get('backbone', 'plain')}` "
        f"({'the study run, exported to HF' if cfg.get('backbone', 'plain') not in ENCODERS else 'random-initialised encoder'}); "
        "task: the local polarity task (ponder_pt/early_exit/toy.py); one fine-tuned model per "
        "strategy, its threshold swept. Figure: early_exit.png.", "",
        markdown(results)]))
