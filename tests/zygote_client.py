#!/usr/bin/env python3
"""`python -m MODULE ARGS` or `python SCRIPT ARGS` run by the test zygote (tests/zygote.py)
instead of a new interpreter. Run it as `tests/zygote_client.py -m MODULE ARGS` (or `SCRIPT
ARGS`): it is executable, so it can stand for a script's $PYTHON. $PONDER_ZYGOTE_SOCKET
names the server (`zygote.server_socket`). The client imports nothing heavy. The forked
command runs in the client's working directory and environment and writes to its stdout and
stderr. SIGINT, SIGTERM and SIGUSR1 are passed on to it, and the client exits with its code.

Where the tests use it: the toy study's jobs (tests/test_study.py) and the GPU suite's
section and trainer children in its CPU smoke (tests/test_gpu_suite.py), both through
$PONDER_JOB_PYTHON (`ponder_pt.launch_env.job_python`), and the SLURM scripts' dry runs
(tests/test_launch.py, through $PYTHON). Each would otherwise import torch, DeepSpeed,
megatron-core and transformers again."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys


def main(argv: list) -> int:
    if argv[:1] == ["-m"] and len(argv) >= 2:
        what, args = {"module": argv[1]}, argv[2:]
    elif argv and not argv[0].startswith("-"):
        what, args = {"script": os.path.abspath(argv[0])}, argv[1:]
    else:
        print("usage: zygote_client.py -m MODULE [ARGS...] | SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    me = os.getpid()
    request = {**what, "argv": args, "env": dict(os.environ), "cwd": os.getcwd(),
               "stdout": f"/proc/{me}/fd/1", "stderr": f"/proc/{me}/fd/2", "append": True}
    sys.stdout.flush()
    sys.stderr.flush()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(os.environ["PONDER_ZYGOTE_SOCKET"])
        conn.sendall((json.dumps(request) + "\n").encode())
        answers = conn.makefile()
        child = json.loads(answers.readline())["pid"]

        def forward(sig, frame):
            with contextlib.suppress(ProcessLookupError):  # the command has just ended
                os.kill(child, sig)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, forward)
        line = answers.readline()
    return json.loads(line)["code"] if line else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
