#!/usr/bin/env python3
"""Several simulated "nodes" on one Linux machine (root), with real TCP between them.

Each node is a network namespace with its own UTS namespace (hostname `node1`..`nodeN`) and,
for what runs in it, a private mount namespace whose /etc/hosts names every node. A veth link
joins each node to a bridge in a separate "switch" namespace, which also holds the address
that a controller (slurmctld) listens on. Nothing is added to the machine's own network
namespace or its /etc: traffic only ever flows between namespaces this module made, and
`down` deletes them all (their links and bridge go with them).

The byte counters of the switch's ports show what crossed each link, `shape` gives the links a
bandwidth and a latency with `tc` (tbf + netem), for benchmarks, and `cut` takes a node's link
down without a word to its peers (a node lost as a power cut loses it).

  python3 tools/netns_cluster.py up --name demo --nodes 2
  python3 tools/netns_cluster.py exec --name demo --nodes 2 --node 1 -- hostname
  python3 tools/netns_cluster.py down --name demo
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

SUBNET = "10.77.0"  # private to the switch namespace: it cannot clash with the host's routes
SWITCH_ADDR = f"{SUBNET}.1"


def _sbin(name: str) -> str:
    for d in ("/usr/sbin", "/sbin", "/usr/bin"):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    return name


class NetnsUnavailable(RuntimeError):
    """The namespaces cannot be made here; the message says why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def why_not_here() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    for tool in ("ip", "unshare"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"`{tool}` is not installed (iproute2, util-linux)"
    return None


class SimCluster:
    """`nodes` namespaces named `<name>-n1`.. and a switch `<name>-sw`; `state_dir` holds the
    hosts file the nodes see."""

    def __init__(self, name: str, nodes: int, state_dir: str):
        if not 1 <= nodes <= 200:
            raise ValueError(f"nodes must be 1..200, not {nodes}")
        self.name, self.nodes, self.dir = name, nodes, os.path.abspath(state_dir)
        self.switch = f"{name}-sw"

    # ----------------------------------------------------------------- names
    def netns(self, node: int) -> str:
        return f"{self.name}-n{node}"

    @staticmethod
    def hostname(node: int) -> str:
        return f"node{node}"

    @staticmethod
    def addr(node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    @property
    def hosts_file(self) -> str:
        return os.path.join(self.dir, "hosts")

    def all_netns(self) -> list[str]:
        return [self.switch] + [self.netns(i) for i in range(1, self.nodes + 1)]

    def exists(self) -> list[str]:
        listed = _ip("netns", "list", check=False).stdout.split("\n")
        names = {line.split()[0] for line in listed if line.strip()}
        return [ns for ns in self.all_netns() if ns in names]

    # ----------------------------------------------------------------- up / down
    def up(self) -> None:
        reason = why_not_here()
        if reason:
            raise NetnsUnavailable(reason)
        self.down()  # leftovers of an earlier instance of this name
        os.makedirs(self.dir, exist_ok=True)
        with open(self.hosts_file, "w") as fh:
            fh.write("127.0.0.1 localhost\n")
            fh.write(f"{SWITCH_ADDR} switch\n")
            for i in range(1, self.nodes + 1):
                fh.write(f"{self.addr(i)} {self.hostname(i)}\n")
        try:
            sw = self.switch
            _ip("netns", "add", sw)
            _ip("-n", sw, "link", "set", "lo", "up")
            _ip("-n", sw, "link", "add", "br0", "type", "bridge")
            _ip("-n", sw, "addr", "add", f"{SWITCH_ADDR}/24", "dev", "br0")
            _ip("-n", sw, "link", "set", "br0", "up")
            for i in range(1, self.nodes + 1):
                ns = self.netns(i)
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                # the node's end is created straight inside its namespace, named eth0 there
                _ip("-n", sw, "link", "add", self.port(i), "type", "veth", "peer", "name",
                    "eth0", "netns", ns)
                _ip("-n", sw, "link", "set", self.port(i), "master", "br0")
                _ip("-n", sw, "link", "set", self.port(i), "up")
                _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except NetnsUnavailable:
            self.down()
            raise

    def down(self, timeout: float = 10) -> None:
        """Kill every process left in the namespaces, then delete them (links go with them)."""
        present = self.exists()
        for ns in present:
            self._kill_all(ns, timeout)
        for ns in present:
            _ip("netns", "del", ns, check=False)

    @staticmethod
    def port(node: int) -> str:
        """The switch's end of node `node`'s link."""
        return f"p{node}"

    # ----------------------------------------------------------------- running things
    def _enter(self, ns: str, cmd: list[str], hostname: str | None = None) -> list[str]:
        # nsenter + unshare rather than `ip netns exec`, which remounts /sys: slurmd needs the
        # machine's /sys/fs/cgroup. The private mount namespace gets its own /etc/hosts.
        script = (f"hostname {hostname} && " if hostname else "") + (
            f"mount --bind {self.hosts_file} /etc/hosts && exec \"$@\"")
        return ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount",
                *(["--uts"] if hostname else []), "sh", "-c", script, "sh", *cmd]

    def node_command(self, node: int, cmd: list[str]) -> list[str]:
        """`cmd` run as on node `node`: its network, hostname and /etc/hosts."""
        return self._enter(self.netns(node), cmd, self.hostname(node))

    def switch_command(self, cmd: list[str]) -> list[str]:
        """`cmd` run in the switch namespace (the controller's address), with the nodes'
        names resolvable."""
        return self._enter(self.switch, cmd)

    def pids(self, ns: str) -> list[int]:
        out = _ip("netns", "pids", ns, check=False).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    def _kill_all(self, ns: str, timeout: float) -> None:
        """SIGKILL every process in `ns` until none is left (a dying daemon may fork)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.pids(ns)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):  # exited since it was listed
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def kill_node(self, node: int) -> None:
        """Every process on node `node` SIGKILLed at once, as when a machine dies."""
        self._kill_all(self.netns(node), 10)

    def cut(self, node: int) -> None:
        """Node `node`'s link down at the switch (its bridge port): from then on nothing it
        sends arrives and nothing reaches it, silently, as when a machine loses power or its
        cable; processes killed on it afterwards send no FIN or RST to anyone. `restore`
        undoes it (and `down` deletes the link with the rest)."""
        _ip("-n", self.switch, "link", "set", self.port(node), "down")

    def restore(self, node: int) -> None:
        """Node `node`'s link up again after `cut`."""
        _ip("-n", self.switch, "link", "set", self.port(node), "up")

    @contextlib.contextmanager
    def cut_off(self, node: int):
        """`cut` for the block's duration: the link comes back however the block ends."""
        self.cut(node)
        try:
            yield
        finally:
            self.restore(node)

    # ----------------------------------------------------------------- ssh between nodes
    @property
    def ssh_dir(self) -> str:
        return os.path.join(self.dir, "ssh")

    def start_sshd(self, path: str | None = None) -> dict:
        """An sshd on every node (port 22 of its namespace) that lets root in with a key made
        here, and an `ssh` ahead of `path` (default: this PATH) that uses it: the environment
        to add for pdsh or DeepSpeed's launcher. Nothing under ~/.ssh or /etc/ssh is touched."""
        d = self.ssh_dir
        os.makedirs(d, exist_ok=True)
        for name in ("host_key", "id_ed25519"):
            if not os.path.exists(os.path.join(d, name)):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                                os.path.join(d, name)], check=True, timeout=60)
        with open(os.path.join(d, "id_ed25519.pub")) as src, \
                open(os.path.join(d, "authorized_keys"), "w") as dst:
            dst.write(src.read())
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        with open(os.path.join(d, "ssh_config"), "w") as fh:
            fh.write(f"Host *\n  IdentityFile {d}/id_ed25519\n  User root\n"
                     "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
                     "  LogLevel ERROR\n  BatchMode yes\n")
        os.makedirs(os.path.join(d, "bin"), exist_ok=True)
        wrapper = os.path.join(d, "bin", "ssh")
        with open(wrapper, "w") as fh:
            fh.write(f"#!/bin/sh\nexec /usr/bin/ssh -F {d}/ssh_config \"$@\"\n")
        os.chmod(wrapper, 0o755)
        for i in range(1, self.nodes + 1):
            conf = os.path.join(d, f"sshd_config.{i}")
            with open(conf, "w") as fh:
                fh.write(f"Port 22\nListenAddress {self.addr(i)}\nHostKey {d}/host_key\n"
                         f"AuthorizedKeysFile {d}/authorized_keys\n"
                         "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                         f"StrictModes no\nUsePAM no\nPidFile {d}/sshd.{i}.pid\n"
                         "AcceptEnv *\n")
            cmd = self.node_command(i, [_sbin("sshd"), "-f", conf, "-E",
                                        os.path.join(d, f"sshd.{i}.log")])
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                raise NetnsUnavailable(f"sshd on {self.hostname(i)} did not start: "
                                       f"{proc.stderr.strip()}")
        path = os.environ.get("PATH", "") if path is None else path
        return {"PATH": f"{d}/bin{os.pathsep}{path}",
                "PDSH_RCMD_TYPE": "ssh"}

    # ----------------------------------------------------------------- traffic
    def link_bytes(self) -> dict[int, dict[str, int]]:
        """{node: {"rx": bytes the node received, "tx": bytes it sent}} over its link, from
        the switch port's counters (the port receives what the node sends), for every node.
        NetnsUnavailable naming the command when they cannot be read: `ip` fails, its output
        does not parse, or a node's port or counters are missing."""
        cmd = ["ip", "-n", self.switch, "-s", "-j", "link", "show"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        where = f"`{' '.join(cmd)}`"
        if proc.returncode != 0:
            raise NetnsUnavailable(f"{where} exited {proc.returncode}: "
                                   f"{proc.stderr.strip() or proc.stdout.strip()}")
        try:
            links = {link["ifname"]: link for link in json.loads(proc.stdout)}
            out = {}
            for i in range(1, self.nodes + 1):
                if self.port(i) not in links:
                    raise KeyError(f"no port {self.port(i)} (node {i}'s link) among "
                                   f"{sorted(links)}")
                stats = links[self.port(i)]["stats64"]
                out[i] = {"tx": int(stats["rx"]["bytes"]), "rx": int(stats["tx"]["bytes"])}
        except (ValueError, KeyError, TypeError) as exc:
            raise NetnsUnavailable(f"{where}: cannot read the links' byte counters "
                                   f"({type(exc).__name__}: {exc}); output: "
                                   f"{proc.stdout[:500]!r}") from None
        return out

    def shape(self, mbit: float | None, delay_ms: float = 0.0) -> None:
        """Every link limited to `mbit` Mbit/s each way (a token bucket, tbf) and, where the
        kernel has netem, delayed `delay_ms` at each end; None removes the shaping."""
        for i in range(1, self.nodes + 1):
            for ns, dev in ((self.netns(i), "eth0"), (self.switch, self.port(i))):
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev,
                                "root"], capture_output=True, timeout=30)
                if mbit is None:
                    continue
                # a burst of 10 ms at the rate (at least 64 kB): above rate / HZ, as tbf needs
                burst = max(int(mbit * 1e6 / 8 / 100), 65536)
                cmds = [["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf",
                         "rate", f"{mbit:g}mbit", "burst", str(burst), "latency", "100ms"]]
                if delay_ms:
                    cmds.append(["tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle",
                                 "10:", "netem", "delay", f"{delay_ms:g}ms"])
                for cmd in cmds:
                    proc = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True,
                                          text=True, timeout=30)
                    if proc.returncode != 0:
                        raise NetnsUnavailable(f"`{' '.join(cmd)}` in {ns} failed: "
                                               f"{proc.stderr.strip()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down", "exec", "bytes"])
    p.add_argument("--name", default="ponder")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--dir", default=None, help="state directory (default /tmp/<name>-netns)")
    p.add_argument("--node", type=int, default=1)
    argv = sys.argv[1:] if argv is None else list(argv)
    cmd = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    cluster = SimCluster(args.name, args.nodes, args.dir or f"/tmp/{args.name}-netns")
    try:
        if args.action == "up":
            cluster.up()
            print(f"{args.nodes} nodes up: " + ", ".join(
                f"{cluster.hostname(i)}={cluster.addr(i)}" for i in range(1, args.nodes + 1)))
        elif args.action == "down":
            cluster.down()
        elif args.action == "bytes":
            print(cluster.link_bytes())
        else:
            return subprocess.call(cluster.node_command(args.node, cmd))
    except NetnsUnavailable as exc:
        print(f"netns_cluster: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
