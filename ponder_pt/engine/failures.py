"""A failing rank says why in one line.

Workers run under torch elastic's `@record` (`recorded`), which writes each rank's exception to
the error file torchrun names in TORCHELASTIC_ERROR_FILE, so torchrun's ChildFailedError
summary carries the failing rank and its traceback instead of "To enable traceback see ...".
Errors a worker handles itself (a config error detected in-rank, exit code 2) are recorded the
same way (`record_error`). Every failing rank also ends its own output with
`ponder-pt <cmd>: rank R failed: Type: message` (what srun's log shows last for that task), and
`ponder-pt train|finetune --nproc N` runs torchrun with a `--log-dir` of its own and prints the
first failure's one line after torchrun's summary (`first_failure`), so the launcher's last
line names the failing rank and its exception.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Optional, Sequence


def rank_label() -> str:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
    return f"rank {rank}" if rank is not None else "the process"


def one_line(message: str, limit: int = 600) -> str:
    text = " ".join(part.strip(" -") for part in str(message).splitlines() if part.strip())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe(exc: BaseException) -> str:
    return one_line(f"{type(exc).__name__}: {exc}")


def record_error(exc: BaseException) -> None:
    """Write `exc` to torch elastic's error file for this worker (no-op outside torchrun)."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    get_error_handler().record_exception(exc)


def _error_file_from_dir() -> None:
    """Under srun (no torchrun to name an error file), PONDER_PT_ERROR_DIR gives each rank
    DIR/<rank>/error.json, the layout torchrun's --log-dir uses, so `first_failure` reads both."""
    root = os.environ.get("PONDER_PT_ERROR_DIR")
    if root and not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        os.makedirs(os.path.join(root, rank), exist_ok=True)
        os.environ["TORCHELASTIC_ERROR_FILE"] = os.path.join(root, rank, "error.json")


def recorded(prog: str, fn: Callable[[], int]) -> int:
    """Run a worker's main under torch elastic's `@record`, ending a failure with one line."""
    from torch.distributed.elastic.multiprocessing.errors import record

    _error_file_from_dir()

    def body() -> int:
        try:
            return fn()
        except Exception as exc:
            print(f"{prog}: {rank_label()} failed: {describe(exc)}", file=sys.stderr, flush=True)
            raise

    return record(body)()


def run_cli(prog: str, fn: Callable[[], int], user_errors: tuple = ()) -> int:
    """A worker's or command's main: `fn()` under `recorded`; a user error (`user_errors`, e.g.
    a config error) prints `prog: error: message` and exits 2, still written to torch elastic's
    error file so the launcher's summary shows it. PONDER_PT_DEBUG=1 re-raises it instead."""

    def body() -> int:
        try:
            return fn()
        except user_errors as exc:
            if os.environ.get("PONDER_PT_DEBUG"):
                raise
            print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
            record_error(exc)
            return 2

    return recorded(prog, body)


def first_failure(log_dir: str) -> Optional[str]:
    """`rank R failed: message` of the earliest error file torchrun collected under log_dir
    (local rank = rank on the single machine of `--nproc`), plus how many ranks failed."""
    found = []
    for path in glob.glob(os.path.join(log_dir, "**", "error.json"), recursive=True):
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue
        msg = data.get("message", "")
        stamp = 0
        if isinstance(msg, dict):
            stamp = int(msg.get("extraInfo", {}).get("timestamp", 0) or 0)
            msg = msg.get("message", "")
        rank = os.path.basename(os.path.dirname(path))
        found.append((stamp, int(rank) if rank.isdigit() else 0, rank, one_line(msg)))
    if not found:
        return None
    found.sort()
    _, _, rank, msg = found[0]
    more = f" (first of {len(found)} failing ranks)" if len(found) > 1 else ""
    return f"rank {rank} failed: {msg}{more}"


def with_log_dir(cmd: Sequence[str], log_dir: str) -> list[str]:
    """A `python -m torch.distributed.run ...` command with `--log-dir` (error files) added."""
    cmd = list(cmd)
    at = cmd.index("torch.distributed.run") + 1
    return cmd[:at] + [f"--log-dir={log_dir}"] + cmd[at:]


def run_torchrun(cmd: Sequence[str], prog: str,
                 wait: Optional[Callable[[list], int]] = None) -> int:
    """Run torchrun (`wait(cmd)` runs it, default subprocess.call) and, when it fails, print
    `prog: rank R failed: ...` as the last line."""
    import subprocess

    log_dir = tempfile.mkdtemp(prefix="ponder_pt_torchrun_")
    try:
        full = with_log_dir(cmd, log_dir)
        code = wait(full) if wait else subprocess.call(full)
        if code != 0:
            line = first_failure(log_dir)
            if line:
                print(f"{prog}: {line}", file=sys.stderr, flush=True)
        return code
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m ponder_pt.engine.failures DIR [--prog NAME]`: print the first failing rank's
    one line from the error files under DIR (the SLURM scripts' last line after a failed srun)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ponder_pt.engine.failures")
    parser.add_argument("dir")
    parser.add_argument("--prog", default="ponder-pt train")
    args = parser.parse_args(argv)
    line = first_failure(args.dir)
    if line is None:
        return 1
    print(f"{args.prog}: {line}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
