"""tests/zygote_client.py, the stand-in for `python` that scripts and the study use in the
tests: a command's arguments, working directory, environment, output (after what its files
already hold) and exit code; signals passed on; and nothing left running when the client is
killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import zygote

CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zygote_client.py")
PROBE = """import os, signal, sys, time
def on_term(sig, frame):
    print("terminated", flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, on_term)
print("argv", sys.argv[1:], "cwd", os.getcwd(), "env", os.environ.get("PROBE"), flush=True)
print("pid", os.getpid(), file=sys.stderr, flush=True)
if sys.argv[1:] == ["wait"]:
    time.sleep(120)
sys.exit(int(sys.argv[1]) if sys.argv[1:] and sys.argv[1].isdigit() else 0)
"""

pytestmark = pytest.mark.skipif(not zygote.ENABLED, reason="PONDER_TEST_ZYGOTE=0")


def _start(tmp_path, *args):
    (tmp_path / "probe.py").write_text(PROBE)
    env = dict(os.environ, PROBE="seen")
    env["PONDER_ZYGOTE_SOCKET"] = zygote.server_socket(env)
    out = open(tmp_path / "out.log", "w")
    out.write("before\n")
    out.flush()
    proc = subprocess.Popen([CLIENT, "-m", "probe", *args], cwd=tmp_path, env=env, stdout=out,
                            stderr=subprocess.PIPE, text=True)
    out.close()
    return proc


def _pid(proc) -> int:
    line = proc.stderr.readline()
    assert line.startswith("pid "), line
    return int(line.split()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone as far as the command goes
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(")")[-1].split()[0] != "Z"


def test_arguments_directory_environment_output_and_exit_code(tmp_path):
    proc = _start(tmp_path, "7")
    assert proc.wait(timeout=60) == 7
    text = (tmp_path / "out.log").read_text()
    assert text == f"before\nargv ['7'] cwd {tmp_path} env seen\n"


def test_signals_reach_the_command_and_a_killed_client_takes_it_along(tmp_path):
    proc = _start(tmp_path, "wait")
    pid = _pid(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 3
    assert (tmp_path / "out.log").read_text().endswith("terminated\n")

    proc = _start(tmp_path, "wait")
    pid = _pid(proc)
    proc.kill()  # SIGKILL: nothing the client can pass on
    proc.wait(timeout=10)
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the command outlived its client"


def test_usage_without_a_module_or_script():
    out = subprocess.run([sys.executable, CLIENT, "--help"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: zygote_client.py" in out.stderr
