"""The sbatch scripts and launchers across two simulated nodes (tools/netns_cluster.py via
tools/slurm_local.py --nodes 2: each node its own network, hostname and /etc/hosts, on a
private bridge) x 2 CPU tasks. The rendezvous is node1's address, and every collective that
spans the nodes crosses a (virtual) link, whose byte counters the tests read. Each run is
compared with one process of the same resolved config.

Every job checks several things (the suite's time budget, DEVELOPERS.md): the layouts through
the real script, each rank's host and its TP / PP / DP ranks from the run's log, DeepSpeed's
own launcher over pdsh, a node lost silently mid-run (ZeRO-3 across the nodes; its link cut,
then its processes killed, so no connection closes; then resumed on one node at DP 2), a
stopped rank (TP 2 inside each node).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from test_slurm_live import (ROOT, TERMINAL, Job, job_environment, live_cluster, losses,
                             submit, train_job, wait_for_step)

sys.path.insert(0, os.path.join(ROOT, "tools"))
import netns_cluster  # noqa: E402
from slurm_local import SLURMD_TIMEOUT  # noqa: E402

pytestmark = pytest.mark.slurm

MULTI_ITERS = 20
MULTI_ARGS = ["--set", f"train.iters={MULTI_ITERS}", "--set", "log.tensorboard=false"]
# name -> overrides; srun places tasks 0-1 on node1 and 2-3 on node2 (check_placement). DP 4
# with ZeRO-3 is the lost-node test's layout, TP 2 in a node x DP 2 across the stopped-rank
# test's.
LAYOUTS = {
    "dp4_zero1": ["parallel.zero_stage=1"],
    "pp2_one_stage_per_node": ["parallel.pp=2", "parallel.zero_stage=1"],
}
HOSTS = {0: "node1", 1: "node1", 2: "node2", 3: "node2"}  # rank -> node, for every run here


@pytest.fixture(scope="module")
def slurm2():
    yield from live_cluster(2)


@pytest.fixture(scope="module")
def job_env2(slurm2, prepared, bpe_dir, tmp_path_factory):
    return job_environment(slurm2, prepared, bpe_dir, tmp_path_factory.mktemp("slurm2_cache"))


@pytest.fixture(scope="module")
def one_process_run(slurm2, job_env2, tmp_path_factory):
    """The reference: the same script and settings as one task on one node."""
    run = tmp_path_factory.mktemp("slurm2_one")
    job = train_job(slurm2, job_env2, run, MULTI_ARGS, tasks_per_node=1)
    info = job.wait()
    job.check(info["JobState"] == "COMPLETED", "the 1-process reference completed")
    return run, losses(run)[0]


@pytest.fixture(scope="module")
def one_process(one_process_run):
    return one_process_run[1]


def placement(text: str) -> dict[int, tuple]:
    """rank -> (host, tp rank, pp rank, dp rank), from the lines under the run log's "N ranks
    on M hosts" line (describe_world; with DeepSpeed's launcher, pdsh puts "nodeN: " before
    them). The first run in the log, if a job ran more than once."""
    start = text.find(" ranks on ")
    out: dict[int, tuple] = {}
    for m in re.finditer(r"(node\d+) \(([\d.]+)\): ranks? ((?:\d+ \(tp \d+ pp \d+ dp \d+\)"
                         r"(?:, )?)+)", text[start:]):
        for rank, tp, pp, dp in re.findall(r"(\d+) \(tp (\d+) pp (\d+) dp (\d+)\)",
                                           m.group(3)):
            out.setdefault(int(rank), (m.group(1), int(tp), int(pp), int(dp)))
    return out


def check_placement(job: Job, tp: int = 1, pp: int = 1) -> dict[int, tuple]:
    """Each rank on its node (HOSTS), the grid TP x PP x DP complete, every TP group inside one
    node and, with PP = 2, one pipeline stage per node."""
    where = placement(job.text())
    job.check({r: p[0] for r, p in where.items()} == HOSTS, f"rank -> host: {where}")
    grid = sorted(p[1:] for p in where.values())
    dp = len(HOSTS) // (tp * pp)
    job.check(grid == sorted((t, s, d) for t in range(tp) for s in range(pp) for d in range(dp)),
              f"TP {tp} x PP {pp} x DP {dp}, each rank once: {where}")
    groups: dict = {}
    for host, t, s, d in where.values():
        groups.setdefault((s, d), set()).add(host)
    job.check(all(len(hosts) == 1 for hosts in groups.values()),
              f"every TP group inside one node: {groups}")
    if pp > 1:
        stages: dict = {}
        for host, t, s, d in where.values():
            stages.setdefault(s, set()).add(host)
        job.check(all(len(h) == 1 for h in stages.values())
                  and len(set().union(*stages.values())) == pp,
                  f"one pipeline stage per node: {stages}")
    return where


def check_two_node_run(cluster, job: Job, run_dir, before: dict, reference: dict,
                       upto: int = MULTI_ITERS, tp: int = 1, pp: int = 1) -> None:
    """4 ranks on node1 and node2 met at node1's address, each rank on its node with its TP /
    PP / DP ranks (check_placement), traffic crossed both links, and the losses of steps
    1..`upto` equal the 1-process run's (fp32, other reduction orders)."""
    text = job.text()
    node1 = cluster.sim.addr(1)
    job.check(re.search(rf"4 ranks on 2 hosts \(node1, node2\); rendezvous node1:\d+ = "
                        rf"{re.escape(node1)}\b", text) is not None,
              "4 ranks on node1 and node2 met at node1's address")
    check_placement(job, tp, pp)
    crossed = {n: b["tx"] - before[n]["tx"] for n, b in cluster.sim.link_bytes().items()}
    print(f"bytes sent over each node's link: {crossed}")
    # gradient all-reduces (or activations, for PP) between the nodes: far more than SLURM's
    # own messages, which are a few kB
    job.check(sorted(crossed) == [1, 2] and all(b > 500_000 for b in crossed.values()),
              f"traffic crossed both links: {crossed}")
    got, steps = losses(run_dir)
    job.check(steps[:upto] == list(range(1, upto + 1)), f"steps logged once: {steps}")
    for step in range(1, upto + 1):
        job.check(got[step] == pytest.approx(reference[step], rel=2e-5),
                  f"step {step}: loss {got[step]} != one process's {reference[step]}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_nodes_train_like_one_process(slurm2, job_env2, one_process, tmp_path, layout):
    before = slurm2.sim.link_bytes()
    extra = [*MULTI_ARGS, *(a for o in LAYOUTS[layout] for a in ("--set", o))]
    job = train_job(slurm2, job_env2, tmp_path, extra, nodes=2)
    info = job.wait()
    job.check(info["JobState"] == "COMPLETED", f"job {job.id} completed")
    check_two_node_run(slurm2, job, tmp_path, before, one_process,
                       pp=2 if "parallel.pp=2" in LAYOUTS[layout] else 1)


def test_deepspeed_launcher_over_pdsh_on_two_nodes(slurm2, job_env2, one_process_run,
                                                   tmp_path):
    """launchers/deepspeed_multinode.sh inside a 2-node allocation: DeepSpeed's runner reaches
    both nodes with pdsh over ssh (an sshd in each node, keys made for the test) and starts 2
    ranks on each; the run's losses equal the 1-process run of the same resolved config."""
    run, reference = one_process_run
    env = dict(job_env2, NPROC_PER_NODE="2", **slurm2.sim.start_sshd(job_env2["PATH"]))
    before = slurm2.sim.link_bytes()
    script = tmp_path / "launch.sh"
    script.write_text(
        "#!/bin/bash\nset -euo pipefail\n"
        f"bash launchers/deepspeed_multinode.sh --config {run}/checkpoints/run_config.yaml "
        f"--set log.dir={tmp_path}/ds --set checkpoint.dir={tmp_path}/ds/checkpoints\n")
    job = submit(slurm2, env, [str(script)], ["--nodes=2", "--ntasks-per-node=1",
                                              "--cpus-per-task=2", "--time=10"],
                 log_dir=tmp_path)
    info = job.wait()
    job.check(info["JobState"] == "COMPLETED", "DeepSpeed's launcher ran on both nodes")
    check_two_node_run(slurm2, job, tmp_path / "ds", before, reference)


def ranks_on(cluster, node: int) -> list[int]:
    """The pids of the training ranks running on simulated node `node`."""
    pids = []
    for pid in cluster.sim.pids(cluster.sim.netns(node)):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if argv[1:3] == [b"-m", b"ponder_pt.train"]:
            pids.append(pid)
    return pids


def wait_until_ended(job: Job, since: float, bound: float, said: str) -> tuple[float, float]:
    """Seconds from `since` until the job's log first matched `said` (the ranks' message) and
    until its batch script ended (SLURM may still be waiting for the lost node to clean up);
    fails past `bound`, or if the job ended without the message."""
    seen = {}

    def ended(info):
        if "said" not in seen and re.search(said, job.text()):
            seen["said"] = time.monotonic() - since
        return (info.get("JobState") in TERMINAL | {"COMPLETING", "PENDING", "REQUEUED"}
                or int(info.get("Restarts", 0)) >= 1)
    job.wait(ended, timeout=bound, what=f"end within {bound:.0f}s")
    took = time.monotonic() - since
    if "said" not in seen and re.search(said, job.text()):  # written as the job ended
        seen["said"] = took
    job.check("said" in seen, f"the job ended without a line matching {said!r}")
    return seen["said"], took


# Small, so a hang shows quickly. The lost-node run's is below SLURM's node timeout by more than
# the survivors need to report (dist.timeout + their network probe): when SLURM declares the
# node down first, it ends the step and kills them before they can say what they saw.
DIST_TIMEOUT = 30
LOST_DIST_TIMEOUT = 20


def test_a_lost_node_ends_the_job_and_one_node_resumes_it(slurm2, job_env2, one_process,
                                                          tmp_path):
    """DP 4 with ZeRO-3 across the nodes; node2 is lost mid-run the way a machine that loses
    power or its link is: its link goes down first, then its slurmd and both of its ranks are
    SIGKILLed, so no FIN or RST reaches anyone (every rank is held meanwhile, so the loss lands
    between two steps). The survivors wait out dist.timeout, find node2 silent on the network
    and say so, naming it, its address and its ranks, within 2 x dist.timeout; the job ends
    within 2 x max(dist.timeout, SLURM's node timeout) instead of hanging. The same script
    resubmitted with --nodes=1 resumes from the last checkpoint at DP=2 (ZeRO-3 shards
    converted, Adam's moments kept) and follows the uninterrupted run. (This silent loss
    replaces killing node2's processes with the link up, whose closed connections made the
    survivors fail at once: test_launch checks how such a message is read.)"""
    extra = [*MULTI_ARGS, "--set", "parallel.zero_stage=3", "--set", "checkpoint.interval=5",
             "--set", f"dist.timeout={LOST_DIST_TIMEOUT}"]
    before = slurm2.sim.link_bytes()
    job = train_job(slurm2, job_env2, tmp_path, extra, nodes=2)
    try:
        wait_for_step(job, tmp_path, 7)
        on1, on2 = ranks_on(slurm2, 1), ranks_on(slurm2, 2)
        job.check(len(on1) == len(on2) == 2, f"2 ranks per node: {on1}, {on2}")
        for pid in on1 + on2:
            os.kill(pid, signal.SIGSTOP)
        check_two_node_run(slurm2, job, tmp_path, before, one_process, upto=7)
        lost = time.monotonic()
        with slurm2.sim.cut_off(2):  # the link comes back however this block ends
            slurm2.sim.kill_node(2)
            for pid in on1:
                os.kill(pid, signal.SIGCONT)
            # every surviving rank waited on node2; which of them reports first varies
            said = (r"PeerLost: a peer rank did not answer within "
                    rf"dist.timeout={LOST_DIST_TIMEOUT} s, and node2 "
                    rf"\({re.escape(slurm2.sim.addr(2))}; ranks 2, 3\) is unreachable from "
                    r"node1 [^\n]*")
            # the ranks: dist.timeout; the job: until SLURM declares node2 down, too
            bound = 2 * max(LOST_DIST_TIMEOUT, SLURMD_TIMEOUT)
            reported, took = wait_until_ended(job, lost, bound, said)
            print(f"node2 cut off: the ranks said so after {reported:.0f}s, the job ended "
                  f"after {took:.0f}s: {re.search(said, job.text()).group(0)}")
            job.check(reported <= 2 * LOST_DIST_TIMEOUT, f"the ranks reported after "
                      f"{reported:.0f}s, more than 2 x dist.timeout")
            slurm2.run("scancel", job.id, check=False)
            job.wait(lambda i: i.get("JobState") in TERMINAL, what="be cancelled")
    finally:
        slurm2.start_node(2)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    job.check("step_00000005" in saved, f"a checkpoint at step 5: {saved}")
    newest = int(saved[-1][5:])
    again = train_job(slurm2, job_env2, tmp_path, extra[:-2], nodes=1)
    info = again.wait()
    text = again.text()
    again.check(info["JobState"] == "COMPLETED", "the resubmitted job completed")
    again.check("saved at TP=1 PP=1 DP=4 ZeRO-3, resuming at TP=1 PP=1 DP=2 ZeRO-3" in text,
                "converted from DP=4 to DP=2")
    again.check(f"training steps {newest}..{MULTI_ITERS}" in text, "resumed at the checkpoint")
    got, _ = losses(tmp_path)
    for step, loss in one_process.items():
        again.check(got[step] == pytest.approx(loss, rel=2e-5),
                    f"step {step}: loss {got[step]} != uninterrupted {loss}")


def test_a_stopped_rank_ends_the_job_within_the_timeout(slurm2, job_env2, one_process,
                                                         tmp_path):
    """TP 2 inside each node x DP 2 across them, as one process up to step 3; then one rank on
    node2 is SIGSTOPped (hung, not dead: no connection closes): the others wait in their next
    collective for dist.timeout, then fail, and the job ends."""
    extra = [*MULTI_ARGS, "--set", "parallel.tp=2", "--set", "parallel.zero_stage=1",
             "--set", f"dist.timeout={DIST_TIMEOUT}"]
    before = slurm2.sim.link_bytes()
    job = train_job(slurm2, job_env2, tmp_path, extra, nodes=2)
    wait_for_step(job, tmp_path, 3)
    victim = ranks_on(slurm2, 2)[-1]
    os.kill(victim, signal.SIGSTOP)
    check_two_node_run(slurm2, job, tmp_path, before, one_process, upto=3, tp=2)
    stopped = time.monotonic()
    # the ranks that waited say for how long and why; a stopped process, not a lost node:
    # every host still answers on the network
    said = (rf"did not answer within dist.timeout={DIST_TIMEOUT} s: one of the ranks on node1, "
            r"node2 is hung or stopped \(every other host answers")
    reported, took = wait_until_ended(job, stopped, 2 * DIST_TIMEOUT, said)
    print(f"a rank stopped: the others said so after {reported:.0f}s, the job ended after "
          f"{took:.0f}s")
    slurm2.run("scancel", job.id, check=False)


# ------------------------------------------------------------------------- without daemons
def test_link_counters_that_cannot_be_read_are_an_error(monkeypatch, tmp_path):
    """The traffic checks read every node's link; `ip` failing, output that does not parse
    and a node's port missing are errors naming the command, never an empty reading."""
    sim = netns_cluster.SimCluster("t", 2, str(tmp_path))
    port = {"ifname": "p1", "stats64": {"rx": {"bytes": 7}, "tx": {"bytes": 9}}}
    for rc, out, why in ((1, "", "exited 1: Cannot open network namespace"),
                         (0, "not json", "cannot read the links' byte counters (JSONDecodeError"),
                         (0, json.dumps([port]), "(KeyError: \"no port p2 (node 2's link)")):
        monkeypatch.setattr(netns_cluster.subprocess, "run", lambda cmd, **kw: (
            subprocess.CompletedProcess(cmd, rc, out, "Cannot open network namespace")))
        with pytest.raises(netns_cluster.NetnsUnavailable) as err:
            sim.link_bytes()
        assert str(err.value).startswith("`ip -n t-sw -s -j link show`") and why in str(
            err.value), str(err.value)
    both = [port, dict(port, ifname="p2")]
    monkeypatch.setattr(netns_cluster.subprocess, "run", lambda cmd, **kw: (
        subprocess.CompletedProcess(cmd, 0, json.dumps(both), "")))
    assert sim.link_bytes() == {1: {"tx": 7, "rx": 9}, 2: {"tx": 7, "rx": 9}}


def test_a_placement_is_read_back_from_the_run_log():
    """What describe_world logs is what check_placement reads: rank -> host, TP / PP / DP."""
    from ponder_pt.engine import distributed as D

    places = [("node1", "10.77.0.2", (t, 0, 0)) for t in range(2)] + [
        ("node2", "10.77.0.3", (t, 0, 1)) for t in range(2)]
    text = D.describe_world(places)
    assert placement(text) == {0: ("node1", 0, 0, 0), 1: ("node1", 1, 0, 0),
                               2: ("node2", 0, 0, 1), 3: ("node2", 1, 0, 1)}, text
    pdsh = "\n".join(f"node1: {line}" for line in text.splitlines())  # DeepSpeed's launcher
    assert placement(pdsh) == placement(text)
