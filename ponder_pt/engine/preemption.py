"""SIGTERM/SIGUSR1 (SLURM preemption or time limit): finish the step, save, exit for requeue.

The handler only sets a flag; the training loop checks it between steps, agrees across ranks
(any rank signalled = all save), writes a checkpoint and exits with EXIT_REQUEUE, which the
sbatch scripts turn into `scontrol requeue`.
"""

from __future__ import annotations

import contextlib
import signal

EXIT_REQUEUE = 99
MARKER = "REQUEUE"  # written into checkpoint.dir next to the checkpoint saved on a signal
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_early: list[int] = []  # signals caught by catch_early() before the training loop began


def catch_early(signals=SIGNALS) -> None:
    """Called first thing by the training entry point under SLURM: a preemption or time-limit
    signal that arrives during startup (imports, process group, model, resume) would otherwise
    kill the rank with nothing saved (Python's default for SIGUSR1 is to terminate) and the job
    would not requeue. Caught here, it is remembered; the loop then runs one step, saves and
    exits for requeue, so every requeued run makes progress."""

    def _remember(signum, frame) -> None:
        _early.append(signum)

    for sig in signals:
        signal.signal(sig, _remember)


@contextlib.contextmanager
def signals_held(signals=SIGNALS):
    """Hold preemption signals back: they stay pending and reach this process's handler when
    the block is lifted. Child processes inherit the block, so ninja, run by a DeepSpeed op
    build, finishes instead of dying of a SIGUSR1 that SLURM sends to every process of the
    step (its compilers it starts unblocked: engine/ds_ops.py builds again after them)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


REQUEUE_FILE_ENV = "PONDER_PT_REQUEUE_FILE"  # set by slurm/pretrain.sh


def announce_requeue(step: int) -> None:
    """Rank 0, after every rank saved: create $PONDER_PT_REQUEUE_FILE. The sbatch script
    requeues on this file as well as on exit code 99, because `srun --kill-on-bad-exit`
    terminates the ranks still exiting once the first one has exited 99, and srun then reports
    143 (SIGTERM) instead of 99."""
    import os

    path = os.environ.get(REQUEUE_FILE_ENV)
    if path:
        with open(path, "w") as fh:
            fh.write(f"step {step}\n")


def marker_path(ckpt_dir: str) -> str:
    import os

    return os.path.join(ckpt_dir, MARKER)


class PreemptionFlag:
    def __init__(self, signals=SIGNALS):
        self.received: int | None = _early[0] if _early else None
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
