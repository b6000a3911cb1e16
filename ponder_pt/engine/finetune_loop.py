"""The epoch / validation / keep-best / early-stop loop shared by the fine-tuning commands
(`ponder-pt finetune`, `ponder-pt sft`).

The command owns the model, the data and what "best" means on disk; the loop owns the step
count, when to validate and when to stop. Three callbacks form the seam:

    train_step(batch) -> dict    every rank: one optimizer step; returns the row to log for
                                 it (already averaged over the data-parallel ranks), with "loss"
    validate() -> dict           rank 0 only: validation metrics, "metric" the one that picks
                                 the best model (higher is better)
    save_best(step, metric)      rank 0 only: keep the weights that just improved "metric"

Only rank 0 validates; whether it improved is shared with `any_true`, so every rank counts the
same stale validations and stops at the same step. Around the loop both commands also share
seeding, the report of rejected rows and how the best weights are kept (`keep_best`: the new
best replaces the old one in one rename, so a crash never leaves half of OUT/best).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from typing import Callable, Iterable, Optional

from . import distributed as D


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def report_rejects(rejected: list, out_dir: str, prog: str) -> None:
    """OUT/rejects.jsonl (every rejected row with its file, line and reason) and one line on
    stderr naming the first."""
    if not rejected:
        return
    path = os.path.join(out_dir, "rejects.jsonl")
    with open(path, "w", encoding="utf-8") as fh:
        for r in rejected:
            fh.write(json.dumps(r) + "\n")
    first = rejected[0]
    print(f"{prog}: {len(rejected)} rows rejected (e.g. {first['file']}:{first['line']}: "
          f"{first['reason']}); all listed in {path}", file=sys.stderr)


def keep_best(out_dir: str, write: Callable[[str], None]) -> None:
    """Replace `out_dir` with what `write(tmp)` puts into a sibling directory, swapping the
    two by renames."""
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def run_finetune_loop(loader: Iterable, *, total: int, eval_every: int, patience: int,
                      train_step: Callable[[object], dict], validate: Callable[[], dict],
                      save_best: Callable[[int, float], None], logger, is_main: bool,
                      desc: str, set_epoch: Optional[Callable[[int], None]] = None) -> dict:
    """Train for `total` steps over epochs of `loader`, validating every `eval_every` steps and
    at the last one; stop after `patience` validations in a row without improvement (0: never
    early). Logs each step's row (plus "epoch") and each validation (prefix "valid_") on rank 0.

    Returns {"best_step", "best_metric", "steps", "stopped_early", "history"}; history (rank 0's
    validations, [] elsewhere) is [{"step", **validate()}, ...].
    """
    from tqdm import tqdm

    best, best_step, stale, step, history = -math.inf, 0, 0, 0, []
    bar = tqdm(total=total, desc=desc, disable=not is_main, dynamic_ncols=True)
    stop, epoch = False, 0
    while not stop:
        if set_epoch is not None:
            set_epoch(epoch)
        seen = False
        for batch in loader:
            seen = True
            row = train_step(batch)
            step += 1
            bar.update(1)
            if is_main:
                logger.log(step, {**row, "epoch": epoch})
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if step % eval_every == 0 or step == total:
                improved = False
                if is_main:
                    result = validate()
                    history.append({"step": step, **result})
                    logger.log(step, result, prefix="valid_")
                    improved = result["metric"] > best
                    if improved:
                        best, best_step = result["metric"], step
                        save_best(step, best)
                stale = 0 if D.any_true(improved) else stale + 1
                if patience and stale >= patience:
                    stop = True
            if step >= total:
                stop = True
            if stop:
                break
        if not seen:  # an empty loader would spin here forever
            raise ValueError("the training loader yields no batch")
        epoch += 1
    bar.close()
    return {"best_step": best_step, "best_metric": best, "steps": step,
            "stopped_early": step < total, "history": history}
