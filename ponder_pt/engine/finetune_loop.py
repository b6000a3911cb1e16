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
same stale validations and stops at the same step.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

from . import distributed as D


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
