"""Metrics sinks: metrics.jsonl always (rank 0), TensorBoard and wandb (offline by default)
when asked. One `log(step, values)` call feeds all of them."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from ..config.schema import LogConfig


class MetricsLogger:
    def __init__(self, cfg: LogConfig, enabled: bool = True, run_config: Optional[dict] = None,
                 resume: bool | int = False):
        """resume: append to metrics.jsonl. Given as the step a run resumed from (an int),
        rows past that step, logged by the run that died after its last checkpoint, are
        dropped first, so every step is in the file once."""
        self.enabled = enabled
        self._tb = self._wandb = None
        self.path = os.path.join(cfg.dir, "metrics.jsonl")
        if not enabled:
            self._file = None
            return
        os.makedirs(cfg.dir, exist_ok=True)
        # a resumed run appends; a fresh run starts the file anew
        if resume and not isinstance(resume, bool) and os.path.exists(self.path):
            _drop_after(self.path, int(resume))
        self._file = open(self.path, "a" if resume else "w", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(cfg.dir, "tensorboard"))
        if cfg.wandb:
            import wandb

            self._wandb = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=cfg.dir,
                                     config=run_config, resume="allow")

    def log(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}{k}": _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def _drop_after(path: str, step: int) -> None:
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) > step:
                continue
        except (ValueError, KeyError, TypeError):  # a line cut short by the crash
            continue
        keep.append(line)
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(keep)
        os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
