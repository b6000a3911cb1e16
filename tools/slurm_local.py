#!/usr/bin/env python3
"""A private one-node SLURM on this machine, for the live-SLURM tests and for trying the sbatch
scripts on a CPU box (root, Debian/Ubuntu; no systemd or cgroups needed, so it runs in a
container). Everything lives in one directory: munge key and socket, slurm.conf, state, spool,
logs, pid files; the ports are free ones picked at start. It does not touch /etc/slurm, an
existing munged or another SLURM on the machine.

  python3 tools/slurm_local.py install          # apt-get install slurm-wlm munge (if missing)
  python3 tools/slurm_local.py up [--dir DIR]   # install if missing, start, wait for the node
  export SLURM_CONF=DIR/slurm.conf              # (printed by `up`) then sbatch/squeue/... work
  python3 tools/slurm_local.py status [--dir DIR]
  python3 tools/slurm_local.py down [--dir DIR] # cancels its jobs, stops its daemons

`make slurm-up` / `make slurm-down` run these with DIR=/tmp/ponder-slurm. The tests start their
own instance in a temporary directory (tests/test_slurm_live.py) and stop it at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

DEFAULT_DIR = "/tmp/ponder-slurm"
PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order
PARTITION = "debug"


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why."""


def _which(name: str):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def missing_programs() -> list[str]:
    return [p for p in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
            if _which(p) is None]


def why_not_here() -> str | None:
    """A reason this machine cannot run the private SLURM at all, or None."""
    if not sys.platform.startswith("linux"):
        return "the local SLURM needs Linux"
    if os.geteuid() != 0:
        return "the local SLURM needs root (slurmd runs jobs as their user; munged and " \
               "apt-get need root); run the live-SLURM tests as root or in a container"
    if missing_programs() and _which("apt-get") is None:
        return f"SLURM is not installed ({', '.join(missing_programs())} missing) and there " \
               "is no apt-get to install slurm-wlm and munge"
    return None


def install(timeout: float = 600, log=print) -> None:
    """apt-get install slurm-wlm munge, unless already there; `apt-get update` once if the
    package lists are stale or empty (a fresh container). Raises SlurmUnavailable."""
    if not missing_programs():
        return
    reason = why_not_here()
    if reason:
        raise SlurmUnavailable(reason)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    deadline = time.monotonic() + timeout
    out = ""
    for attempt in ("install", "update", "install"):
        args = cmd if attempt == "install" else ["apt-get", "update", "-q"]
        log(f"slurm_local: {' '.join(args)}")
        try:
            proc = subprocess.run(args, env=env, capture_output=True, text=True,
                                  timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(args)}` did not finish in {timeout:.0f}s "
                                   "(no access to the package registry?)") from None
        out = proc.stdout[-2000:] + proc.stderr[-2000:]
        if attempt == "install" and proc.returncode == 0 and not missing_programs():
            return
    raise SlurmUnavailable(f"could not install {' '.join(PACKAGES)} with apt-get "
                           f"(no access to the package registry?):\n{out}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class LocalSlurm:
    """One node, one partition (`debug`), all CPUs of this machine (at least 2)."""

    def __init__(self, directory: str = DEFAULT_DIR, cpus: int | None = None):
        self.dir = os.path.abspath(directory)
        if cpus is None:  # the CPUs this process may use (a container's share, not the host's)
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.cpus = max(cpus or 1, 2)  # 2 at least: the tests run 2 tasks
        self.host = socket.gethostname().split(".")[0]

    # ----------------------------------------------------------------- paths and env
    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    @property
    def conf(self) -> str:
        return self.path("slurm.conf")

    def env(self, base: dict | None = None) -> dict:
        """An environment whose sbatch/squeue/scontrol talk to this instance."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = self.conf
        sbin = "/usr/sbin:/sbin"
        if sbin not in env.get("PATH", ""):
            env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":" + sbin
        return env

    def run(self, *args: str, timeout: float = 30, check: bool = True):
        proc = subprocess.run(list(args), env=self.env(), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` exited {proc.returncode}: "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    # ----------------------------------------------------------------- setup
    def _write_key(self) -> None:
        key = self.path("munge", "munge.key")
        if not os.path.exists(key):
            with open(key, "wb") as fh:
                fh.write(os.urandom(1024))
        os.chmod(key, 0o600)

    def write_conf(self) -> None:
        d = self.path
        sock = d("munge", "munge.socket")
        lines = [
            "# written by tools/slurm_local.py: a private one-node SLURM",
            "ClusterName=ponder",
            f"SlurmctldHost={self.host}({self._addr()})",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays a requeued job's restart (default 120 s)
            f"AuthInfo=socket={sock},cred_expire=10",
            f"StateSaveLocation={d('state')}",
            f"SlurmdSpoolDir={d('spool')}",
            f"SlurmctldPidFile={d('slurmctld.pid')}",
            f"SlurmdPidFile={d('slurmd.pid')}",
            f"SlurmctldLogFile={d('slurmctld.log')}",
            f"SlurmdLogFile={d('slurmd.log')}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # a container: no cgroups, no task affinity
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,sched_min_interval=100000",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=120",
            "KillWait=5",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "MessageTimeout=20",
            f"NodeName={self.host} NodeAddr={self._addr()} CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={self.host} Default=YES MaxTime=INFINITE "
            "OverSubscribe=NO State=UP",
        ]
        with open(self.conf, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    def _addr(self) -> str:
        try:
            return socket.gethostbyname(self.host)
        except OSError:
            return "127.0.0.1"

    # ----------------------------------------------------------------- state
    def pid(self, daemon: str) -> int | None:
        path = self.path("munge", "munged.pid") if daemon == "munged" else self.path(f"{daemon}.pid")
        try:
            pid = int(open(path).read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) else None

    def node_state(self) -> str | None:
        try:
            proc = self.run("sinfo", "-h", "-N", "-o", "%t", timeout=15, check=False)
        except (subprocess.SubprocessError, OSError):
            return None
        return proc.stdout.strip() or None if proc.returncode == 0 else None

    def running(self) -> bool:
        return all(self.pid(d) for d in DAEMONS) and self.node_state() in ("idle", "mix", "alloc")

    def log_tail(self, n: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log"):
            try:
                lines = open(self.path(name), errors="replace").read().splitlines()[-n:]
            except OSError:
                continue
            out.append(f"--- {self.path(name)} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(out)

    # ----------------------------------------------------------------- start / stop
    def start(self, timeout: float = 90) -> None:
        """Start munged, slurmctld and slurmd (installed already) and wait until the node is
        idle. Raises SlurmUnavailable with the daemons' logs on failure."""
        if self.running():
            return
        if missing_programs():
            raise SlurmUnavailable(f"not installed: {', '.join(missing_programs())} "
                                   "(python3 tools/slurm_local.py install)")
        self.stop()  # leftovers of an earlier, half-started instance in this directory
        for sub in ("munge", "state", "spool"):
            os.makedirs(self.path(sub), exist_ok=True)
        os.chmod(self.dir, 0o755)
        os.chmod(self.path("munge"), 0o700)
        self._write_key()
        self.write_conf()
        m = self.path("munge")
        self._spawn([_which("munged"), "--force", f"--socket={m}/munge.socket",
                     f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid",
                     f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"], "munged")
        self._wait(lambda: os.path.exists(f"{m}/munge.socket") and self.pid("munged"),
                   10, "munged did not start")
        self._spawn([_which("slurmctld"), "-f", self.conf, "-i"], "slurmctld")
        self._spawn([_which("slurmd"), "-f", self.conf], "slurmd")
        self._wait(lambda: self.node_state() == "idle", timeout,
                   "the node did not come up idle")

    def _spawn(self, cmd: list[str], name: str) -> None:
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{name} failed to start (exit {proc.returncode}): "
                                   f"{proc.stderr.strip()}\n{self.log_tail()}")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.5)
        state = self.node_state()
        self.stop()
        raise SlurmUnavailable(f"{what} within {timeout:.0f}s (node state {state!r})\n"
                               f"{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        """Cancel this instance's jobs, then stop its daemons (by their pid files)."""
        if self.pid("slurmctld"):
            try:
                self.run("scancel", "--full", f"--partition={PARTITION}", timeout=15, check=False)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    q = self.run("squeue", "-h", "-o", "%i", timeout=15, check=False)
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(1)
            except (subprocess.SubprocessError, OSError):
                pass
        for daemon in DAEMONS:
            pid = self.pid(daemon)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["install", "up", "down", "status"])
    p.add_argument("--dir", default=os.environ.get("PONDER_SLURM_DIR", DEFAULT_DIR))
    p.add_argument("--timeout", type=float, default=90, help="seconds to wait for the node")
    args = p.parse_args(argv)
    cluster = LocalSlurm(args.dir)
    try:
        if args.action == "install":
            install()
            print("slurm-wlm and munge are installed")
        elif args.action == "up":
            install()
            cluster.start(args.timeout)
            print(f"SLURM is up ({cluster.host}, {cluster.cpus} CPUs, partition "
                  f"{PARTITION}); to use it:\n  export SLURM_CONF={cluster.conf}")
        elif args.action == "down":
            cluster.stop()
            print(f"stopped the SLURM in {cluster.dir}")
        else:
            up = cluster.running()
            print(f"{'up' if up else 'down'}: {cluster.dir} "
                  f"(node {cluster.node_state() or '-'})")
            return 0 if up else 1
    except SlurmUnavailable as exc:
        print(f"slurm_local: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
