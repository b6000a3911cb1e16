"""DeepSpeed's JIT-built C++ ops, built before DeepSpeed asks for them.

DeepSpeed compiles an op on first use (the CPU shared-memory comm op in `init_distributed`,
CPU Adam for an offloaded optimizer and FusedAdam in `deepspeed.initialize`) and caches it
under TORCH_EXTENSIONS_DIR. SLURM sends a preemption or time-limit signal to every process of
the step, and the compilers ninja starts do not inherit a blocked signal: a compiler the
signal kills fails the rank with "Error building extension", where the run should save and
requeue. Built here with the signals held, a build that a signal broke is built again (the
signal came once; the next build runs undisturbed), and the signal reaches the training loop's
handler once the op is built. DeepSpeed then finds the op already loaded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Optional

from .ds_config import adam_op
from .preemption import SIGNALS, signals_held

ATTEMPTS = 3
# a stop signal sent to the process may be taken by another thread (only this one blocks it),
# whose handler then runs here a moment later: a failed build waits this long for it
SIGNAL_WAIT_S = 1.0


@contextlib.contextmanager
def _signals_recorded(signals=SIGNALS):
    """The preemption signals this process's handlers see meanwhile (another thread may take
    a signal the main thread holds back), handed to the handlers in place before, afterwards."""
    seen: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: seen.append(signum))
                for sig in signals}
    try:
        yield seen
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in seen:
            signal.raise_signal(sig)


def build_in_fresh_process(name: str) -> None:
    """Build the op in a new interpreter: torch remembers, per process, an op it has tried to
    build, and after a failed build it would only try to import it."""
    code = ("from deepspeed.accelerator import get_accelerator; "
            f"get_accelerator().create_op_builder({name!r}).load()")
    subprocess.run([sys.executable, "-c", code], check=True)


NINJA_DIR_ENV = "PONDER_PT_NINJA_DIR"


def use_locked_ninja() -> Optional[str]:
    """Put the `ninja` of this Python's environment (the locked pip package) first on PATH,
    for torch's JIT builds here and in child processes; returns its folder (None without it).
    PONDER_PT_NINJA_DIR names another folder holding the `ninja` to use instead.

    Why: ninja 1.13 hashes the commands in its build log differently from earlier releases,
    so two ninjas taking turns on one TORCH_EXTENSIONS_DIR (a system 1.11 for processes whose
    PATH lacks the venv, the venv's 1.13 for the rest) each see the other's build as stale and
    rebuild it, every time. Besides the minutes lost, a process killed during one of those
    rebuilds leaves torch's build lock behind, and every later process waits on it forever."""
    folder = os.environ.get(NINJA_DIR_ENV)
    if not folder:
        try:
            import ninja
        except ImportError:
            return None
        folder = getattr(ninja, "BIN_DIR", None)
    if not folder or not os.path.exists(os.path.join(folder, "ninja")):
        return None
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != folder:
        os.environ["PATH"] = folder + (os.pathsep + path if path else "")
    return folder


def _signalled_since(seen: list, before: int, wait: float = SIGNAL_WAIT_S) -> bool:
    """A stop signal came since `seen` held `before` entries (recorded, or pending for this
    thread), waiting up to `wait` seconds for one another thread took."""
    deadline = time.monotonic() + wait
    while True:
        if len(seen) > before or set(signal.sigpending()) & set(SIGNALS):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def build_op(name: str, attempts: int = ATTEMPTS):
    """Load DeepSpeed's op builder `name` (e.g. "ShareMemCommBuilder", "CPUAdamBuilder") for
    this accelerator, compiling it if needed; None where the accelerator has no such op."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    use_locked_ninja()
    builder = get_accelerator().create_op_builder(name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    with signals_held(), _signals_recorded() as seen:
        for attempt in range(1, attempts + 1):
            before = len(seen)
            try:
                if attempt > 1:
                    build_in_fresh_process(name)
                return builder.load()
            except (RuntimeError, subprocess.CalledProcessError):
                if attempt == attempts or not _signalled_since(seen, before):
                    raise
                print(f"a preemption signal came while DeepSpeed's {builder.NAME} op was "
                      f"being built: building it again ({attempt + 1}/{attempts}); the run "
                      "saves once it is built", file=sys.stderr, flush=True)


def build_adam_op(cfg) -> None:
    """The op of the AdamW DeepSpeed will build for run config `cfg`, if it is a JIT-built one."""
    name = adam_op(cfg)
    if name is not None:
        build_op(name)
