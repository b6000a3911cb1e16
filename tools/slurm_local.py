#!/usr/bin/env python3
"""A private SLURM on this machine, for the live-SLURM tests and for trying the sbatch scripts
on a CPU box (root, Debian/Ubuntu; no systemd or cgroups needed, so it runs in a container).
Everything lives in one directory: munge key and socket, slurm.conf, state, spool, logs, pid
files. It does not touch /etc/slurm, an existing munged or another SLURM on the machine.

One node (the default) is this machine itself, on free ports. With `--nodes N` (N >= 2) each
node is simulated (tools/netns_cluster.py): its own network and UTS namespace (hostname
node1..nodeN), an address on a private bridge, and an /etc/hosts of its own that names every
node, which the jobs it runs see too. One slurmctld listens in the bridge's namespace, one
munged serves all (its socket is a file). Job steps then cross real (virtual) links: srun,
torch's rendezvous and gloo all talk TCP between the nodes' addresses. `down` deletes the
namespaces, their links and every process in them.

  python3 tools/slurm_local.py install          # apt-get install slurm-wlm munge (if missing)
  python3 tools/slurm_local.py up [--dir DIR] [--nodes N]   # install if missing, start, wait
  export SLURM_CONF=DIR/slurm.conf              # (printed by `up`) then sbatch/squeue/... work
                                                # (N >= 2: run them through `slurm_local.py
                                                # run -- sbatch ...`, in the bridge's namespace)
  python3 tools/slurm_local.py status [--dir DIR]
  python3 tools/slurm_local.py down [--dir DIR] # cancels its jobs, stops its daemons

`make slurm-up [NODES=N]` / `make slurm-down` run these with DIR=/tmp/ponder-slurm. The tests
start their own instances in temporary directories (tests/test_slurm_live.py,
tests/test_slurm_multinode.py) and stop them at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from netns_cluster import SWITCH_ADDR, NetnsUnavailable, SimCluster  # noqa: E402

DEFAULT_DIR = "/tmp/ponder-slurm"
# seconds a silent node counts as alive (clusters use 300): SLURM ends a job on a lost node
# only then, up to a ping interval (a third of it) later
SLURMD_TIMEOUT = 30
# openssh-server and pdsh: DeepSpeed's own launcher between simulated nodes
PACKAGES = ("slurm-wlm", "munge", "openssh-server", "pdsh")
PARTITION = "debug"


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why."""


def _which(name: str):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def missing_programs() -> list[str]:
    return [p for p in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "sshd",
                        "ssh-keygen", "pdsh") if _which(p) is None]


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


def _terminate(pid: int | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL if `pid` outlives `timeout` seconds."""
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


class LocalSlurm:
    """One partition (`debug`). One node: this machine, all its CPUs (at least 2). N nodes:
    simulated ones (the module docstring), `cpus` each (default 2)."""

    def __init__(self, directory: str = DEFAULT_DIR, cpus: int | None = None, nodes: int = 1):
        self.dir = os.path.abspath(directory)
        self.nodes = nodes
        if cpus is None and nodes == 1:  # the CPUs this process may use (a container's share)
            cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count())
        self.cpus = max(cpus or 1, 2)  # 2 at least: the tests run 2 tasks per node
        self.host = socket.gethostname().split(".")[0]
        # the namespaces' names derive from the directory: one instance per directory
        tag = hashlib.sha1(self.dir.encode()).hexdigest()[:6]
        self.sim = SimCluster(f"ps{tag}", nodes, self.dir) if nodes > 1 else None

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

    def command(self, *args: str) -> list[str]:
        """A SLURM client command (sbatch, scontrol, ...) as it must run to reach this
        instance: with simulated nodes, inside the bridge's namespace."""
        return self.sim.switch_command(list(args)) if self.sim else list(args)

    @property
    def node_names(self) -> list[str]:
        if self.sim is None:
            return [self.host]
        return [self.sim.hostname(i) for i in range(1, self.nodes + 1)]

    def run(self, *args: str, timeout: float = 30, check: bool = True):
        proc = subprocess.run(self.command(*args), env=self.env(), capture_output=True,
                              text=True, timeout=timeout)
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
        # simulated nodes: fixed ports, since every namespace has all of its ports free
        ports = (6817, 6818) if self.sim else (_free_port(), _free_port())
        lines = [
            f"# written by tools/slurm_local.py: a private {self.nodes}-node SLURM",
            "ClusterName=ponder",
            f"SlurmctldHost={self.host}({self._addr()})",
            f"SlurmctldPort={ports[0]}",
            f"SlurmdPort={ports[1]}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays a requeued job's restart (default 120 s)
            f"AuthInfo=socket={sock},cred_expire=10",
            f"StateSaveLocation={d('state')}",
            f"SlurmdSpoolDir={d('spool', '%n') if self.sim else d('spool')}",
            f"SlurmctldPidFile={d('slurmctld.pid')}",
            f"SlurmdPidFile={d('slurmd-%n.pid') if self.sim else d('slurmd.pid')}",
            f"SlurmctldLogFile={d('slurmctld.log')}",
            f"SlurmdLogFile={d('slurmd-%n.log') if self.sim else d('slurmd.log')}",
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
            f"SlurmdTimeout={SLURMD_TIMEOUT}",
            "MessageTimeout=20",
        ]
        if self.sim is None:
            lines.append(f"NodeName={self.host} NodeAddr={self._addr()} CPUs={self.cpus} "
                         "State=UNKNOWN")
        else:
            lines += [f"NodeName={self.sim.hostname(i)} NodeAddr={self.sim.addr(i)} "
                      f"CPUs={self.cpus} State=UNKNOWN" for i in range(1, self.nodes + 1)]
        lines.append(f"PartitionName={PARTITION} Nodes={','.join(self.node_names)} Default=YES "
                     "MaxTime=INFINITE OverSubscribe=NO State=UP")
        with open(self.conf, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    def _addr(self) -> str:
        if self.sim:
            return SWITCH_ADDR
        try:
            return socket.gethostbyname(self.host)
        except OSError:
            return "127.0.0.1"

    # ----------------------------------------------------------------- state
    def pid(self, daemon: str, node: str | None = None) -> int | None:
        """A daemon's pid (slurmd: node `node`'s, by default the first) while it runs."""
        if daemon == "munged":
            path = self.path("munge", "munged.pid")
        elif daemon == "slurmd" and self.sim:
            path = self.path(f"slurmd-{node or self.node_names[0]}.pid")
        else:
            path = self.path(f"{daemon}.pid")
        try:
            pid = int(open(path).read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) else None

    def node_states(self) -> dict[str, str]:
        """{node: SLURM's short state} ({} when the controller does not answer)."""
        try:
            proc = self.run("sinfo", "-h", "-N", "-o", "%N %t", timeout=15, check=False)
        except (subprocess.SubprocessError, OSError):
            return {}
        if proc.returncode != 0:
            return {}
        return dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2)

    def node_state(self) -> str | None:
        """The nodes' one state when they agree ("idle"), else all of them ("idle,down*")."""
        states = self.node_states()
        if len(states) < self.nodes:
            return None
        distinct = sorted(set(states.values()))
        return distinct[0] if len(distinct) == 1 else ",".join(states[n] for n in self.node_names)

    def daemons_up(self) -> bool:
        return (all(self.pid(d) for d in ("munged", "slurmctld"))
                and all(self.pid("slurmd", n) for n in self.node_names))

    def running(self) -> bool:
        return self.daemons_up() and self.node_state() in ("idle", "mix", "alloc")

    def log_tail(self, n: int = 30) -> str:
        out = []
        slurmd_logs = [f"slurmd-{node}.log" for node in self.node_names] if self.sim else [
            "slurmd.log"]
        for name in ("slurmctld.log", *slurmd_logs, "munge/munged.log"):
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
        if self.sim:
            for node in self.node_names:
                os.makedirs(self.path("spool", node), exist_ok=True)
            try:
                self.sim.up()
            except NetnsUnavailable as exc:
                raise SlurmUnavailable(f"cannot simulate {self.nodes} nodes: {exc}") from None
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
        self._spawn(self.command(_which("slurmctld"), "-f", self.conf, "-i"), "slurmctld")
        if self.sim is None:
            self._spawn([_which("slurmd"), "-f", self.conf], "slurmd")
        for i in range(1, self.nodes + 1) if self.sim else ():
            self._spawn_slurmd(i)
        self._wait(lambda: self.node_state() == "idle", timeout,
                   f"the {'nodes' if self.sim else 'node'} did not come up idle")

    def start_node(self, node: int, timeout: float = 90) -> None:
        """Simulated node `node` (1-based) back after `sim.kill_node`: its slurmd started
        again and the node returned to service (SLURM set it DOWN when it stopped answering)."""
        name = self.node_names[node - 1]
        self._spawn_slurmd(node)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.node_states().get(name, "")
            if state == "idle":
                return
            if "down" in state or "drain" in state or "fail" in state:
                self.run("scontrol", "update", f"NodeName={name}", "State=RESUME", check=False)
            time.sleep(1)
        raise SlurmUnavailable(f"{name} did not return to idle within {timeout:.0f}s "
                               f"({self.node_states()})\n{self.log_tail()}")

    def _spawn_slurmd(self, node: int) -> None:
        """Simulated node `node`'s slurmd, inside that node's namespaces."""
        name = self.node_names[node - 1]
        self._spawn(self.sim.node_command(node, [_which("slurmd"), "-N", name, "-f",
                                                 self.conf]), f"slurmd on {name}")

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
        for pid in [self.pid("slurmd", node) for node in self.node_names] + [
                self.pid("slurmctld")]:
            _terminate(pid, timeout)
        if self.sim:  # whatever is left in the namespaces, then the namespaces themselves
            self.sim.down()
        _terminate(self.pid("munged"), timeout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["install", "up", "down", "status", "run"],
                   help="run: the command after -- as a SLURM client of this instance")
    p.add_argument("--dir", default=os.environ.get("PONDER_SLURM_DIR", DEFAULT_DIR))
    p.add_argument("--nodes", type=int, default=None,
                   help="nodes to start (up; default 1); the other actions read it from DIR")
    p.add_argument("--timeout", type=float, default=90, help="seconds to wait for the nodes")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, cmd = p.parse_args(argv[:split]), argv[split + 1:]
    nodes = args.nodes or _recorded_nodes(args.dir)
    if nodes < 1:
        p.error("--nodes must be at least 1")
    cluster = LocalSlurm(args.dir, nodes=nodes)
    try:
        if args.action == "install":
            install()
            print("slurm-wlm and munge are installed")
        elif args.action == "up":
            install()
            if _recorded_nodes(args.dir) != nodes:  # an instance of another size: stop it
                LocalSlurm(args.dir, nodes=_recorded_nodes(args.dir)).stop()
            os.makedirs(cluster.dir, exist_ok=True)
            _record_nodes(args.dir, nodes)  # first: `down` must find a half-started instance
            cluster.start(args.timeout)
            where = (f"{cluster.host}, {cluster.cpus} CPUs" if nodes == 1 else
                     ", ".join(f"{n}={cluster.sim.addr(i)}"
                               for i, n in enumerate(cluster.node_names, start=1))
                     + f"; {cluster.cpus} CPUs each")
            print(f"SLURM is up ({where}; partition {PARTITION}); to use it:\n"
                  f"  export SLURM_CONF={cluster.conf}")
            if nodes > 1:
                print(f"  python3 tools/slurm_local.py run --dir {cluster.dir} -- sbatch ...   "
                      "(the controller is in the nodes' network)")
        elif args.action == "down":
            cluster.stop()
            print(f"stopped the SLURM in {cluster.dir}")
        elif args.action == "run":
            if not cmd:
                p.error("run needs a command after --")
            return subprocess.call(cluster.command(*cmd), env=cluster.env())
        else:
            up = cluster.running()
            states = cluster.node_states()
            nodes_text = ", ".join(f"{n} {states.get(n, '-')}" for n in cluster.node_names)
            print(f"{'up' if up else 'down'}: {cluster.dir} ({nodes_text})")
            return 0 if up else 1
    except SlurmUnavailable as exc:
        print(f"slurm_local: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _recorded_nodes(directory: str) -> int:
    """The node count `up` last started in `directory` (1 if none)."""
    try:
        return int(open(os.path.join(directory, "nodes")).read())
    except (OSError, ValueError):
        return 1


def _record_nodes(directory: str, nodes: int) -> None:
    with open(os.path.join(directory, "nodes"), "w") as fh:
        fh.write(f"{nodes}\n")


if __name__ == "__main__":
    sys.exit(main())
