"""The real trainer (`python -m ponder_pt.train`, one process, DeepSpeed ZeRO-1, bf16) on a
locally generated corpus: loss finite and falling, tokens/s and MFU from metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
import statistics
import time

from ponder_pt.launch_env import job_python

from .common import md_table, run_logged
from .results import Part, record


def prepare_corpus(args, work: str) -> dict:
    """Stdlib-docstring corpus -> BPE tokenizer -> .bin/.idx under `work` (kept, and reused
    when already there): {"tok", "prefix", "documents", "characters", "tokens", "vocab"}."""
    from ponder_pt.data.corpus import write_corpus
    from ponder_pt.data.prepare import prepare
    from ponder_pt.tokenizer import load_tokenizer, train_tokenizer

    tok_dir = os.path.join(work, "tokenizer")
    prefix = os.path.join(work, "data", "corpus")
    info_path = os.path.join(work, "corpus_info.json")
    if os.path.exists(info_path) and os.path.exists(prefix + ".idx"):
        with open(info_path) as fh:
            return json.load(fh)
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.jsonl")
    info = write_corpus(corpus, max_bytes=120_000 if args.smoke else 400_000)
    train_tokenizer([corpus], 512 if args.smoke else 1024, tok_dir, show_progress=False)
    stats = prepare([corpus], tok_dir, prefix, workers=1 if args.smoke else 2, progress=False)
    out = {"tok": tok_dir, "prefix": prefix, "documents": info["documents"],
           "characters": info["characters"], "tokens": stats.tokens,
           "vocab": load_tokenizer(tok_dir).vocab_size}
    with open(info_path, "w") as fh:
        json.dump(out, fh)
    return out


def run_trainer(args, run_dir: str, overrides: list, paths: dict, timeout: float,
                show=("step ", "error", "Error")) -> tuple:
    """`python -m ponder_pt.train --config demo` with `overrides` on the prepared corpus, in
    a fresh `run_dir`: (exit code, wall s, log text, metrics.jsonl rows)."""
    from ponder_pt.engine.metrics import read_metrics

    if os.path.isdir(run_dir):
        import shutil

        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    overrides = overrides + [
        f"data.train=[{paths['prefix']}]", f"data.tokenizer={paths['tok']}",
        f"data.cache_dir={os.path.join(os.path.dirname(run_dir), 'cache')}",
        "data.num_workers=0", f"log.dir={run_dir}"]
    if not any(o.startswith("checkpoint.") for o in overrides):
        overrides.append("checkpoint.save=false")  # timing rows: no checkpoint to write
    cmd = [*job_python(), "-m", "ponder_pt.train", "--config", "demo"]
    for item in overrides:
        cmd += ["--set", item]
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    if args.smoke:
        env["OMP_NUM_THREADS"] = "1"
    log_path = os.path.join(run_dir, "train.log")
    t = time.perf_counter()
    code = run_logged(cmd, log_path, timeout, env, show=show)
    wall = time.perf_counter() - t
    with open(log_path, errors="replace") as fh:
        text = fh.read()
    mpath = os.path.join(run_dir, "metrics.jsonl")
    return code, wall, text, read_metrics(mpath) if os.path.exists(mpath) else []


def median_of(rows: list, key: str, skip: int = 3):
    """Median of `key` over the step rows after the first `skip` (CUDA / allocator warm-up)."""
    steps = [r for r in rows if "loss" in r]
    vals = [r[key] for r in steps[min(skip, max(0, len(steps) - 1)):]
            if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def section_train(args, part: Part) -> None:
    work = os.path.join(args.out, "work", "train")
    paths = {}

    def data():
        paths.update(prepare_corpus(args, work))
        return {k: paths[k] for k in ("documents", "characters", "tokens", "vocab")}

    d = record(part, "corpus -> tokenizer -> data prepare", data)
    if d["status"] != "ok":
        return
    record(part, "PonderPythia K=3 + pause tokens, bf16, DeepSpeed ZeRO-1, 1 process",
           lambda: _train_run(args, work, paths))


def _train_run(args, work: str, paths: dict) -> dict:
    run_dir = os.path.join(work, "run")
    ckpt = os.path.join(run_dir, "ckpt")
    iters = 6 if args.smoke else 40
    if args.smoke:
        shape = ["model.preset=pythia-tiny", "data.seq_len=64", "train.micro_batch=2",
                 "train.global_batch=4", "train.warmup=1", "log.interval=1"]
    else:
        shape = ["model.preset=pythia-14m", "data.seq_len=512", "train.micro_batch=8",
                 "train.global_batch=16", "train.warmup=4", "log.interval=5"]
    overrides = shape + [
        "ponder.steps=3", "pause.rate=0.1", f"train.iters={iters}", "train.lr=3e-3",
        "train.min_lr=3e-4", "train.precision=bf16", f"train.eval_interval={iters}",
        "train.eval_iters=1", "parallel.zero_stage=1", "train.optimizer=torch",
        f"checkpoint.dir={ckpt}", f"checkpoint.interval={iters}"]
    optimizer, opt_cfg = ds_optimizer(overrides)
    timeout = max(10.0, args.deadline - time.time() - 8)
    code, wall, text, rows = run_trainer(args, run_dir, overrides, paths, timeout)
    steps = [r for r in rows if "loss" in r]
    if code != 0:
        raise RuntimeError(f"trainer exited {code} after {wall:.0f}s ({len(steps)} steps "
                           f"logged); log tail:\n{text[-2500:]}")
    losses = [r["loss"] if isinstance(r["loss"], float) else float(r["loss"]) for r in steps]
    n = max(1, min(5, len(losses) // 2))
    first, last = statistics.mean(losses[:n]), statistics.mean(losses[-n:])
    finite = all(math.isfinite(x) for x in losses)
    valid = [r for r in rows if "valid_loss" in r]
    res = {"steps": len(losses), "losses": [round(x, 4) for x in losses],
           "loss_first_mean": first, "loss_last_mean": last, "loss_finite": finite,
           "loss_falling": finite and last < first, "mean_of": n,
           "tokens_per_s": median_of(rows, "tokens_per_s"),
           "tflops_per_gpu": median_of(rows, "tflops_per_gpu"), "mfu": median_of(rows, "mfu"),
           "step_time_s": median_of(rows, "step_time"),
           "skipped_steps": steps[-1].get("skipped_steps") if steps else None,
           "valid_loss": valid[-1]["valid_loss"] if valid else None,
           "optimizer": optimizer, "ds_optimizer_config": opt_cfg,
           "checkpoint_dir": ckpt, "run_wall_s": round(wall, 1),
           "overrides": overrides}
    if not (finite and last < first):
        res["status"] = "fail"
        res["note"] = "loss not finite" if not finite else "loss did not fall"
    return res


def ds_optimizer(overrides: list) -> tuple:
    """The optimizer DeepSpeed will build, from the same config resolution as the trainer's:
    (one-line description, its DeepSpeed config)."""
    from ponder_pt.config import load_config
    from ponder_pt.engine.ds_config import build_ds_config

    opt_cfg = build_ds_config(load_config("demo", overrides, validate=False), 1)["optimizer"]
    params = opt_cfg.get("params", {})
    return (f"{opt_cfg.get('type')} torch_adam={params.get('torch_adam', False)} "
            f"fused={params.get('fused', False)}"), opt_cfg


def markdown(res: dict) -> list:
    tr = res.get("sections", {}).get("train", {}).get("entries", [])
    if not tr:
        return []
    out = ["", "## Training through the real trainer (DeepSpeed, one process)", ""]
    out.append(md_table(["case", "status", "steps", "loss first-5", "loss last-5", "falling",
                         "tokens/s", "TFLOP/s", "MFU", "optimizer", "s"],
                        [[e["name"], e["status"], e.get("steps"), e.get("loss_first_mean"),
                          e.get("loss_last_mean"), e.get("loss_falling"),
                          e.get("tokens_per_s"), e.get("tflops_per_gpu"), e.get("mfu"),
                          e.get("optimizer"), e.get("seconds")] for e in tr]))
    return out
