"""`python -m MODULE ARGS` run by the test zygote (tests/zygote.py) instead of a new
interpreter: `python tests/zygote_client.py -m MODULE ARGS` with $PONDER_ZYGOTE_SOCKET naming
the server (`zygote.server_socket`). This client imports nothing heavy. The forked command
runs in this client's working directory and environment and writes to its stdout and
stderr. SIGINT, SIGTERM and SIGUSR1 are passed on to it, and the client exits with its code.

The study's jobs run through it in tests/test_study.py ($PONDER_JOB_PYTHON, experiments/jobs.py):
each job would otherwise import torch, DeepSpeed, megatron-core and transformers again."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys


def main(argv: list) -> int:
    if len(argv) < 2 or argv[0] != "-m":
        print("usage: zygote_client.py -m MODULE [ARGS...]", file=sys.stderr)
        return 2
    me = os.getpid()
    request = {"module": argv[1], "argv": argv[2:], "env": dict(os.environ),
               "cwd": os.getcwd(), "stdout": f"/proc/{me}/fd/1", "stderr": f"/proc/{me}/fd/2",
               "append": True}
    sys.stdout.flush()
    sys.stderr.flush()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(os.environ["PONDER_ZYGOTE_SOCKET"])
        conn.sendall((json.dumps(request) + "\n").encode())
        answers = conn.makefile()
        child = json.loads(answers.readline())["pid"]

        def forward(sig, frame):
            try:
                os.kill(child, sig)
            except ProcessLookupError:
                pass

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, forward)
        line = answers.readline()
    return json.loads(line)["code"] if line else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
