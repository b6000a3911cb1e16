"""SIGTERM/SIGUSR1 (SLURM preemption or time limit): finish the step, save, exit for requeue.

The handler only sets a flag; the training loop checks it between steps, agrees across ranks
(any rank signalled = all save), writes a checkpoint and exits with EXIT_REQUEUE, which the
sbatch scripts turn into `scontrol requeue`.
"""

from __future__ import annotations

import signal

EXIT_REQUEUE = 99
MARKER = "REQUEUE"  # written into checkpoint.dir next to the checkpoint saved on a signal


def marker_path(ckpt_dir: str) -> str:
    import os

    return os.path.join(ckpt_dir, MARKER)


class PreemptionFlag:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    @property
    def set(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
