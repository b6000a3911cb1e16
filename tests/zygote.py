"""`ponder-pt` commands for the tests, started from a process that has already imported torch,
DeepSpeed, megatron-core, transformers and ponder_pt.

Each rank of a training launched through `python -m ponder_pt train --nproc N` pays several
seconds of imports, and the suite launches a few hundred of them. Here one server per test
process (per xdist worker) imports everything once, before any torch op runs, and forks a
child per command: the child is `python -m ponder_pt ARGS` as a fresh process would run it
(its own session, working directory, environment, stdout and stderr), from `cli.main`.

When that command launches torchrun for its ranks (`ponder-pt train|finetune --nproc N`: the
`python -m torch.distributed.run --standalone --nproc-per-node=N -m MODULE ...` of
`train.torchrun_command`), the launcher is replaced by a fork of the child that forks N ranks
with the environment torchrun gives them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, an
error file per rank under torchrun's --log-dir) and runs MODULE's `main`, as torchrun's ranks
do: the process group, gloo, DeepSpeed and the training are the real ones. Like torchrun,
the launcher stops the other ranks when one fails and exits 1; its own agent, rendezvous and
restarts are not emulated, so the tests of the launcher itself (signals, rank failure, SLURM,
the newcomer path) start real processes.

PONDER_TEST_ZYGOTE=0 runs every command as a plain subprocess instead.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

ENABLED = os.environ.get("PONDER_TEST_ZYGOTE", "1") != "0"
PRELOAD = ("torch", "deepspeed", "megatron.core.tensor_parallel", "transformers",
           "ponder_pt.cli", "ponder_pt.train", "ponder_pt.engine.trainer",
           "ponder_pt.engine.pipeline", "ponder_pt.export.to_hf", "ponder_pt.sft.train")
TORCHRUN = ("-m", "torch.distributed.run")
STOP_GRACE_S = 30  # torchrun's default time between SIGTERM and SIGKILL of the other ranks


# ------------------------------------------------------------------ inside the forked command
def _exit(code: int) -> None:
    """End a forked process as the interpreter would (exit handlers, flushed streams), but
    never return into the server's code."""
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


def _run_rank(module: str, args: list, env: dict) -> None:
    """A rank: MODULE's main(args) in this forked process, then exit with its code."""
    import importlib

    atexit._clear()  # a fresh process: only what this rank registers runs at its exit
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [module, *args]
    code = 1
    try:
        code = importlib.import_module(module).main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - a rank's crash, reported like python's own
        traceback.print_exc()
    finally:
        _exit(code or 0)


def _signal_all(pids, sig: int) -> None:
    """Send `sig` to each of `pids` that is still there (one may exit meanwhile)."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _launch(nproc: int, module: str, args: list, log_dir: str, env: dict) -> int:
    """torchrun --standalone's part: N ranks, the others stopped when one fails, 1 if any
    failed."""
    port = str(_free_port())
    ranks = {}
    for rank in range(nproc):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0",
                        ROLE_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                        ROLE_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                        PONDER_PT_ERROR_DIR=os.path.join(log_dir, "zygote"))
        rank_env.pop("TORCHELASTIC_ERROR_FILE", None)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_rank(module, args, rank_env)
        ranks[pid] = rank
    failed = []
    while ranks:
        pid, status = os.wait()
        rank = ranks.pop(pid, None)
        if rank is None:
            continue
        code = _exit_code(status)
        if code != 0 and not failed:
            failed.append((rank, code))
            _signal_all(ranks, signal.SIGTERM)  # torchrun stops the group when one fails
            deadline = time.monotonic() + STOP_GRACE_S
            while ranks and time.monotonic() < deadline:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid:
                    ranks.pop(pid, None)
                else:
                    time.sleep(0.05)
            _signal_all(ranks, signal.SIGKILL)
    if failed:
        rank, code = failed[0]
        print(f"zygote launcher: rank {rank} exited with {code}; the other ranks were stopped",
              file=sys.stderr, flush=True)
        return 1
    return 0


class LauncherPopen:
    """What `subprocess.Popen(torchrun command, env=..., start_new_session=...)` returns, for
    the commands `_torchrun_parts` understands: the launcher is a fork of this process."""

    def __init__(self, nproc, module, args, log_dir, env, new_session):
        sys.stdout.flush()
        sys.stderr.flush()
        self.returncode = None
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                if new_session:
                    os.setsid()
                code = _launch(nproc, module, args, log_dir, env)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = _exit_code(status)
        return self.returncode

    def wait(self, timeout=None):
        if timeout is not None:
            deadline = time.monotonic() + timeout
            while self.poll() is None:
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired("torchrun", timeout)
                time.sleep(0.05)
            return self.returncode
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = _exit_code(status)
        return self.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.wait()

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def _torchrun_parts(cmd):
    """(nproc, module, args, log_dir) of `python -m torch.distributed.run [--log-dir=D]
    --standalone --nproc-per-node=N -m MODULE ARGS`, or None for any other command."""
    cmd = [str(c) for c in cmd] if isinstance(cmd, (list, tuple)) else None
    if not cmd or tuple(cmd[1:3]) != TORCHRUN:
        return None
    nproc, log_dir, rest = None, None, cmd[3:]
    while rest and rest[0] != "-m":
        opt = rest.pop(0)
        if opt.startswith("--log-dir="):
            log_dir = opt.split("=", 1)[1]
        elif opt.startswith("--nproc-per-node="):
            nproc = int(opt.split("=", 1)[1])
        elif opt != "--standalone":
            return None  # multi-node or other options: the real torchrun
    if nproc is None or log_dir is None or len(rest) < 2:
        return None
    return nproc, rest[1], rest[2:], log_dir


def _install_launcher() -> None:
    real = subprocess.Popen

    def popen(cmd, *args, **kwargs):
        parts = _torchrun_parts(cmd)
        if parts is None or args:
            return real(cmd, *args, **kwargs)
        nproc, module, margs, log_dir = parts
        env = dict(kwargs.get("env") or os.environ)
        return LauncherPopen(nproc, module, margs, log_dir, env,
                             bool(kwargs.get("start_new_session")))

    subprocess.Popen = popen


def _run_command(request: dict) -> None:
    """The forked child: `python -m ponder_pt ARGS` (or the request's "module", or its
    "script") in the request's cwd, env and files ("append": write after what the files
    hold, e.g. a client's own stdout, `zygote_client.py`)."""
    atexit._clear()
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    mode = os.O_APPEND if request.get("append") else os.O_TRUNC
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o644)
        os.dup2(out, fd)
        os.close(out)
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
    _install_launcher()
    module, script = request.get("module", "ponder_pt"), request.get("script")
    code = 1
    try:
        if script or module != "ponder_pt":  # `python SCRIPT` / `python -m MODULE`: its
            import runpy                     # directory (or cwd) and PYTHONPATH first

            extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            sys.path[:0] = [os.path.dirname(script) if script else os.getcwd(), *extra]
            sys.argv = [script or module, *request["argv"]]
            if script:
                runpy.run_path(script, run_name="__main__")
            else:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            _exit(0)
        sys.argv = ["ponder-pt", *request["argv"]]
        from ponder_pt.cli import main

        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - a crash, reported like python's own
        traceback.print_exc()
    finally:
        _exit(code or 0)


# ------------------------------------------------------------------ the server
def serve(path: str) -> None:
    """Import everything, then fork a child per request until stdin closes. A request is one
    JSON line; the answers are {"pid": P} at once and {"code": C} when the child exits."""
    handshake = os.fdopen(os.dup(1), "w")
    log = os.open(path + ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd in (1, 2):  # what the imports print goes to the log; stdout only says "ready"
        os.dup2(log, fd)
    os.close(log)
    for name in PRELOAD:
        __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    handshake.write("ready\n")
    handshake.close()
    waiting = {}  # child pid -> connection
    while True:
        clients = {conn: pid for pid, conn in waiting.items()}
        readable, _, _ = select.select([listener, sys.stdin, *clients], [], [], 0.05)
        if sys.stdin in readable and not sys.stdin.readline():
            break
        for conn in set(readable) & set(clients):  # a client gone (killed at its timeout):
            if not conn.recv(1):                   # its command goes too, nothing outlives it
                with contextlib.suppress(ProcessLookupError):  # (or it has just ended)
                    os.killpg(clients[conn], signal.SIGKILL)
        if listener in readable:
            conn, _ = listener.accept()
            request = json.loads(conn.makefile().readline())
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                _run_command(request)
            conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
            waiting[pid] = conn
        while waiting:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall((json.dumps({"code": _exit_code(status)}) + "\n").encode())
                except OSError:  # the client gave up (its timeout) and closed the socket
                    pass
                conn.close()


# ------------------------------------------------------------------ the client (a test)
# environment variables that libraries read when they are imported (huggingface_hub's
# HF_HUB_OFFLINE, datasets' cache, the interpreter's path...): a command whose values differ
# from a server's gets a server started with its own
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "DATASETS", "TOKENIZERS", "TORCH",
                   "PYTORCH", "DS_", "DEEPSPEED", "MEGATRON", "WANDB", "PYTHON", "CUDA",
                   "OMP_", "MKL_", "LD_", "XDG_", "HOME")
_SERVERS: dict = {}  # import-time environment -> {"proc", "path"}


def _import_env(env: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)))


def _server_path(env: dict) -> str:
    key = _import_env(env)
    server = _SERVERS.get(key)
    if server is not None and server["proc"].poll() is None:
        return server["path"]
    root = tempfile.mkdtemp(prefix="ponder_zygote_")
    path = os.path.join(root, "socket")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), path], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.wait(timeout=60)
        raise RuntimeError(f"the test zygote did not start (exit {proc.poll()}):\n"
                           + _read(path + ".log")[-3000:])
    if not _SERVERS:
        atexit.register(_stop_servers)
    _SERVERS[key] = {"proc": proc, "path": path, "root": root}
    return path


def server_socket(env: dict) -> str:
    """The socket of the server for `env`'s import-time settings (started if needed): what
    `zygote_client.py` connects to through $PONDER_ZYGOTE_SOCKET."""
    return _server_path(env)


def _stop_servers() -> None:
    for server in _SERVERS.values():
        proc = server["proc"]
        if proc.poll() is None:
            proc.stdin.close()
    for server in _SERVERS.values():
        try:
            server["proc"].wait(timeout=10)
        except subprocess.TimeoutExpired:
            server["proc"].kill()
        shutil.rmtree(server["root"], ignore_errors=True)


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def ponder(argv, env=None, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """`python -m ponder_pt ARGV` with `env` (default: this process's) in `cwd`: a forked
    child of the zygote, or with PONDER_TEST_ZYGOTE=0 a subprocess. stdout and stderr are
    captured as text, like `subprocess.run(..., capture_output=True, text=True)`."""
    argv = [str(a) for a in argv]
    env = dict(os.environ if env is None else env)
    cwd = os.path.abspath(cwd or os.getcwd())
    if not ENABLED:
        return subprocess.run([sys.executable, "-m", "ponder_pt", *argv], env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="ponder_cmd_") as out:
        request = {"argv": argv, "env": env, "cwd": cwd,
                   "stdout": os.path.join(out, "stdout"), "stderr": os.path.join(out, "stderr")}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(_server_path(env))
            conn.sendall((json.dumps(request) + "\n").encode())
            answers = conn.makefile()
            pid = json.loads(answers.readline())["pid"]
            ready, _, _ = select.select([conn], [], [], timeout)
            if not ready:
                _kill_tree(pid)
                raise subprocess.TimeoutExpired(["ponder-pt", *argv], timeout,
                                                _read(request["stdout"]),
                                                _read(request["stderr"]))
            line = answers.readline()
            code = json.loads(line)["code"] if line else 1
        return subprocess.CompletedProcess(["ponder-pt", *argv], code, _read(request["stdout"]),
                                           _read(request["stderr"]))


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


if __name__ == "__main__":
    serve(sys.argv[1])
