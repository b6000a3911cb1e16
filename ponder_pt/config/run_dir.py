"""Where a training run lives: one run directory (`ponder-pt train --out DIR`, `run.dir`).

    DIR/checkpoints/      checkpoint.dir (step tags, latest, run_config.yaml)
    DIR/metrics.jsonl     log.dir: metrics, tensorboard/, loss.png
    DIR/run_config.yaml   what was run (also in checkpoints/, which export reads)

`run.dir` unset: `log.dir`, else `checkpoint.dir`, names the run's directory (the settings
scripts used before run directories existed); with none of them a new directory under
`runs/` (`NAME-YYYYmmdd-HHMMSS`) is made, never one that exists. Starting again with the
same directory resumes from its newest checkpoint; a directory whose run trained but has no
checkpoint to resume from is refused unless `run.overwrite=true` (or SLURM requeued the job,
which then starts over), so one run never silently replaces another's metrics.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from ..weights.files import CHECKPOINTS, newest_complete
from .errors import ConfigError
from .schema import Config

RUNS_ROOT = "runs"


def run_name(cfg: Config, config_arg: Optional[str]) -> str:
    """A directory name for the run: the named config, else the YAML file's stem."""
    name = cfg.name
    if name in ("", "custom") and config_arg:
        name = os.path.splitext(os.path.basename(config_arg))[0]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name or "run")


def new_run_dir(name: str, root: str = RUNS_ROOT) -> str:
    """Create and return `root/NAME-YYYYmmdd-HHMMSS` (with -2, -3... if that exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(root, exist_ok=True)
    for n in range(1, 1000):
        path = os.path.join(root, f"{name}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"run.dir: could not make a new directory under {root}/; set --out DIR")


def chosen_run_dir(cfg: Config) -> Optional[str]:
    """The run directory the settings name, or None when a new one is to be made."""
    return cfg.run.dir or cfg.log.dir or cfg.checkpoint.dir


def fill_dirs(cfg: Config, run_dir: str) -> None:
    """run.dir, and log.dir / checkpoint.dir where not set explicitly."""
    cfg.run.dir = run_dir
    cfg.log.dir = cfg.log.dir or run_dir
    if cfg.checkpoint.save:
        cfg.checkpoint.dir = cfg.checkpoint.dir or os.path.join(run_dir, CHECKPOINTS)
    elif cfg.checkpoint.dir or cfg.checkpoint.load:
        raise ConfigError("checkpoint.save=false with checkpoint.dir or checkpoint.load set: a "
                          "run that saves nothing cannot resume; drop one of them")


def trained_steps(log_dir: str) -> int:
    """Steps logged in `log_dir`'s metrics.jsonl (0 when there is none)."""
    steps = 0
    try:
        with open(os.path.join(log_dir, "metrics.jsonl"), encoding="utf-8") as fh:
            for line in fh:
                try:
                    steps = max(steps, int(json.loads(line).get("step", 0)))
                except (ValueError, AttributeError):
                    continue  # a line cut short by a crash
    except OSError:
        return 0
    return steps


def check_reuse(cfg: Config) -> None:
    """Refuse a run directory that holds another run's progress but nothing to resume from."""
    if cfg.run.overwrite:
        return
    ckpt, load = cfg.checkpoint.dir, cfg.checkpoint.load
    if (ckpt and newest_complete(ckpt)) or load:
        return  # a resume: checked against the checkpoint's own config (config.resume)
    steps = trained_steps(cfg.log.dir)
    if steps and os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
        return  # SLURM requeued this job before its first checkpoint: it starts over
    if steps:
        raise ConfigError(
            f"run.dir: {cfg.run.dir} holds a run that trained {steps} steps "
            f"({os.path.join(cfg.log.dir, 'metrics.jsonl')}) but has no checkpoint to resume "
            f"from; choose another --out (or leave it unset for a new directory under "
            f"{RUNS_ROOT}/), or add --set run.overwrite=true to start afresh there",
            headline="refusing to reuse a run directory")


def place_run(cfg: Config, config_arg: Optional[str], create: bool = True) -> None:
    """Settle the run's directories before anything is written: the named one (checked by
    `check_reuse`), or, with `create`, a new one. Without `create` and with no name (ranks
    of a launch that did not pass one), run.dir stays None for rank 0 to choose."""
    where = chosen_run_dir(cfg)
    if where is None:
        if not create:
            return
        where = new_run_dir(run_name(cfg, config_arg))
    fill_dirs(cfg, where)
    check_reuse(cfg)
