"""The sbatch scripts and launchers across two simulated nodes (tools/netns_cluster.py via
tools/slurm_local.py --nodes 2: each node its own network, hostname and /etc/hosts, on a
private bridge) x 2 CPU tasks. The rendezvous is node1's address, and every collective that
spans the nodes crosses a (virtual) link, whose byte counters the tests read. Each run is
compared with one process of the same resolved config.

Every job checks several things (the suite's time budget, DEVELOPERS.md): the layouts through
the real script, DeepSpeed's own launcher over pdsh, a node lost mid-run (ZeRO-3 across the
nodes, then resumed on one node at DP 2), a stopped rank (TP 2 inside each node).
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from test_slurm_live import (TERMINAL, Job, job_environment, live_cluster, losses, submit,
                             train_job, wait_for_step)

pytestmark = pytest.mark.slurm

MULTI_ITERS = 20
MULTI_ARGS = ["--set", f"train.iters={MULTI_ITERS}", "--set", "log.tensorboard=false"]
# name -> overrides; srun places tasks 0-1 on node1 and 2-3 on node2. DP 4 with ZeRO-3 is the
# lost-node test's layout, TP 2 in a node x DP 2 across the stopped-rank test's.
LAYOUTS = {
    "dp4_zero1": ["parallel.zero_stage=1"],
    "pp2_one_stage_per_node": ["parallel.pp=2", "parallel.zero_stage=1"],
}


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


def check_two_node_run(cluster, job: Job, run_dir, before: dict, reference: dict,
                       upto: int = MULTI_ITERS) -> None:
    """4 ranks on node1 and node2 met at node1's address, traffic crossed both links, and the
    losses of steps 1..`upto` equal the 1-process run's (fp32, other reduction orders)."""
    text = job.text()
    node1 = cluster.sim.addr(1)
    job.check(re.search(rf"4 ranks on 2 hosts \(node1, node2\); rendezvous node1:\d+ = "
                        rf"{re.escape(node1)}\b", text) is not None,
              "4 ranks on node1 and node2 met at node1's address")
    crossed = {n: b["tx"] - before[n]["tx"] for n, b in cluster.sim.link_bytes().items()}
    print(f"bytes sent over each node's link: {crossed}")
    # gradient all-reduces (or activations, for PP) between the nodes: far more than SLURM's
    # own messages, which are a few kB
    job.check(all(b > 500_000 for b in crossed.values()), f"traffic crossed: {crossed}")
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
    check_two_node_run(slurm2, job, tmp_path, before, one_process)


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


def wait_until_ended(job: Job, since: float, bound: float) -> float:
    """Seconds from `since` until the job's batch script ended (SLURM may still be waiting
    for the lost node to clean up); fails past `bound`."""
    def ended(info):
        return (info.get("JobState") in TERMINAL | {"COMPLETING", "PENDING", "REQUEUED"}
                or int(info.get("Restarts", 0)) >= 1)
    job.wait(ended, timeout=bound, what=f"end within {bound:.0f}s")
    return time.monotonic() - since


DIST_TIMEOUT = 30


def test_a_lost_node_ends_the_job_and_one_node_resumes_it(slurm2, job_env2, one_process,
                                                          tmp_path):
    """DP 4 with ZeRO-3 across the nodes; node2 dies mid-run (its slurmd and both of its ranks
    SIGKILLed at once, while every rank is held, so the loss lands between two steps): the job
    ends within 2 x dist.timeout instead of hanging, its log names what was lost, and the same
    script resubmitted with --nodes=1 resumes from the last checkpoint at DP=2 (ZeRO-3 shards
    converted, Adam's moments kept) and follows the uninterrupted run."""
    extra = [*MULTI_ARGS, "--set", "parallel.zero_stage=3", "--set", "checkpoint.interval=5",
             "--set", f"dist.timeout={DIST_TIMEOUT}"]
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
        slurm2.sim.kill_node(2)
        for pid in on1:
            os.kill(pid, signal.SIGCONT)
        took = wait_until_ended(job, lost, 2 * DIST_TIMEOUT)
        text = job.text()
        print(f"the job ended {took:.0f}s after node2 was lost")
        # every surviving rank that talked to node2 says so (which of them fails first varies)
        job.check(re.search(r"PeerLost: lost contact with ranks? [23](, 3)? on node2 "
                            rf"\({re.escape(slurm2.sim.addr(2))}\)", text) is not None,
                  "a rank's last line names the lost node and its ranks")
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
    check_two_node_run(slurm2, job, tmp_path, before, one_process, upto=3)
    stopped = time.monotonic()
    took = wait_until_ended(job, stopped, 2 * DIST_TIMEOUT)
    text = job.text()
    print(f"the job ended {took:.0f}s after a rank stopped")
    job.check(f"did not answer within dist.timeout={DIST_TIMEOUT} s" in text,
              "the ranks that waited say for how long and why")
    slurm2.run("scancel", job.id, check=False)
