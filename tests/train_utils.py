"""Running `ponder-pt train` for the training tests (from the preloaded zygote, tests/zygote.py)."""

from __future__ import annotations

import json
import os
import sys

from zygote import ponder

# a tiny PonderPythia with pause tokens; vocab fixed so TP=1 and TP=2 pad alike
TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.ffn_hidden_size=64",
    "model.vocab_size=768", "ponder.steps=2", "pause.rate=0.1", "data.seq_len=32",
    "data.num_workers=0", "train.global_batch=8", "train.micro_batch=2", "train.iters=4",
    "train.warmup=1", "train.lr=3e-3", "train.eval_interval=4", "train.eval_iters=1",
    "train.precision=fp32", "log.interval=1",
]


def train_cmd(run_dir, prefix, tokenizer, extra=(), nproc=1):
    cmd = [sys.executable, "-m", "ponder_pt", "train", "--config", "demo", "--nproc", str(nproc)]
    for item in [*TINY, f"data.train=[{prefix}]", f"data.tokenizer={tokenizer}",
                 f"data.cache_dir={os.path.join(run_dir, 'cache')}", f"log.dir={run_dir}", *extra]:
        cmd += ["--set", item]
    return cmd


def run_train(run_dir, prefix, tokenizer, extra=(), nproc=1, timeout=600, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = train_cmd(run_dir, prefix, tokenizer, extra, nproc)
    proc = ponder(cmd[3:], env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    valid = {r["step"]: r["valid_loss"] for r in rows if "valid_loss" in r}
    return train, valid
