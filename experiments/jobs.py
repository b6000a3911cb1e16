"""The study's child processes: each training / evaluation / fine-tuning job runs as a
subprocess with its output in a log file, registered so that an interrupted study stops them
all (a trainer then saves a checkpoint, and the next invocation resumes it).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

from ponder_pt.launch_env import job_python

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_command(module: str, *args) -> list[str]:
    """`python -m MODULE ARGS` for a job, `python` being `launch_env.job_python()`."""
    return [*job_python(), "-m", module, *(str(a) for a in args)]


def job_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


_CHILDREN: set = set()
_CHILDREN_LOCK = threading.Lock()
_STOPPING = threading.Event()


def run_logged(cmd: list[str], log_path: str, env: dict, mode: str = "a") -> int:
    """Run `cmd` with output to `log_path`; registered so an interrupted study can stop it."""
    if _STOPPING.is_set():
        return 130
    with open(log_path, mode, encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        with _CHILDREN_LOCK:
            _CHILDREN.add(proc)
        try:
            return proc.wait()
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc)


def stop_children(timeout: float = 60.0) -> None:
    """SIGTERM every running child (a trainer then saves a checkpoint and exits, so the next
    invocation resumes it) and wait for them."""
    _STOPPING.set()
    with _CHILDREN_LOCK:
        procs = list(_CHILDREN)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()


def is_trained(run_dir: str, iters: int) -> bool:
    """Whether the run in `run_dir` saved its checkpoint of step `iters`."""
    try:
        with open(os.path.join(run_dir, "ckpt", "latest"), encoding="utf-8") as fh:
            return fh.read().strip() == f"step_{iters:08d}"
    except OSError:
        return False
