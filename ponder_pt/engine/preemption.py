"""Stop signals: finish the step, save, exit. SIGTERM/SIGUSR1 (SLURM preemption or time
limit, `scancel`, `timeout`, systemd) exit for requeue; SIGINT (Ctrl-C) exits as interrupted.

The handler only sets a flag; the training loop checks it between steps, agrees across ranks
(any rank signalled = all save), writes a checkpoint and exits with EXIT_REQUEUE (which the
sbatch scripts turn into `scontrol requeue`) or EXIT_INTERRUPTED. A second Ctrl-C exits at
once: a save cut short leaves a tag without ponder_meta.json, which is never loaded, so the
last complete checkpoint stays the one a resume takes. DataLoader workers ignore the signals
(`ignore_stop_signals`): a signal to the whole process group must not kill them under the
rank that is saving.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

from ..launch_env import tells_the_user

EXIT_REQUEUE = 99
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
MARKER = "REQUEUE"  # written into checkpoint.dir next to the checkpoint saved on a signal
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# a second SIGINT this soon after the first is the same Ctrl-C reaching the process twice
SAME_PRESS_S = 1.0
_received: list[tuple[int, float]] = []  # (signal, time) of the first stop signal


def _on_signal(signum, frame) -> None:
    if _received:
        first, at = _received[0]
        if (signum == signal.SIGINT and first == signal.SIGINT
                and time.monotonic() - at > SAME_PRESS_S):
            if tells_the_user():
                print("\nponder-pt: second Ctrl-C: exiting now, without saving (the last "
                      "complete checkpoint is kept)", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        return  # the run is stopping already
    _received.append((signum, time.monotonic()))
    if signum == signal.SIGINT and tells_the_user():
        print("\nponder-pt: Ctrl-C: stopping after this step and saving (Ctrl-C again to exit "
              "at once, without saving)", file=sys.stderr, flush=True)


def stop_signal() -> int | None:
    """The first stop signal this process received, or None."""
    return _received[0][0] if _received else None


def catch_early(signals=SIGNALS) -> None:
    """Called first thing by the training entry points: a stop signal that arrives during
    startup (imports, process group, model, resume) would otherwise kill the rank with nothing
    saved (Python's default for SIGUSR1 and SIGTERM is to terminate, SIGINT raises
    KeyboardInterrupt mid-import) and a SLURM job would not requeue. Caught here, it is
    remembered: after SIGTERM/SIGUSR1 the loop runs one step, saves and exits for requeue, so
    every requeued run makes progress; after Ctrl-C it stops before the first step."""
    for sig in signals:
        signal.signal(sig, _on_signal)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker's `worker_init_fn`: the rank that owns it decides when to stop."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


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
    path = os.environ.get(REQUEUE_FILE_ENV)
    if path:
        with open(path, "w") as fh:
            fh.write(f"step {step}\n")


def marker_path(ckpt_dir: str) -> str:
    return os.path.join(ckpt_dir, MARKER)


def write_marker(ckpt_dir: str, step: int, signum: int) -> None:
    """Rank 0, after every rank saved on a stop signal: the step and the signal, for the
    launcher's last line (the requeued run removes it)."""
    with open(marker_path(ckpt_dir), "w") as fh:
        fh.write(f"step {step}\nsignal {signal.Signals(signum).name}\n")


def read_marker(ckpt_dir: str, since: float = 0.0) -> tuple[int, int] | None:
    """(step, signal) of a stop marker written after `since` (a time.time()), or None."""
    path = marker_path(ckpt_dir)
    try:
        if os.path.getmtime(path) < since:
            return None
        with open(path, encoding="utf-8") as fh:
            fields = dict(line.split(" ", 1) for line in fh.read().splitlines() if " " in line)
        return int(fields["step"]), int(getattr(signal, fields.get("signal", "SIGTERM").strip()))
    except (OSError, KeyError, ValueError, AttributeError):
        return None


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class PreemptionFlag:
    """The stop handler for the training loop (keeping a signal `catch_early` saw)."""

    def __init__(self, signals=SIGNALS):
        self._previous = {sig: signal.signal(sig, _on_signal) for sig in signals}

    @property
    def received(self) -> int | None:
        return stop_signal()

    @property
    def set(self) -> bool:
        return self.received is not None

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.received == signal.SIGINT else EXIT_REQUEUE

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
