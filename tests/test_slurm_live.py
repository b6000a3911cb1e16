"""The sbatch scripts under a live one-node SLURM (tools/slurm_local.py), with a tiny model on
2 CPU tasks: completion, preemption (USR1 -> save -> exit 99 -> requeue -> resume), the time
limit's signal, a job killed outright and resubmitted, the launchers under srun, and the
data-prep array with its merge.

The module starts a private SLURM (munged, slurmctld, slurmd in a temporary directory, free
ports) once and stops it at the end. It installs slurm-wlm and munge with apt-get when they are
missing. Where that is impossible (not root, no apt-get, no registry) the tests skip and say
why; with PONDER_SLURM=require (set by .ci/run) or CI=true they fail instead, since CI is
meant to run them. PONDER_SLURM=0 skips them on purpose, except under CI=true, where it
fails. Every wait has a timeout, and a failing test prints the job's SLURM log and the
daemons' logs.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from test_rank_failure import MESSAGE, planted_env
from train_utils import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import slurm_local  # noqa: E402

pytestmark = pytest.mark.slurm

SCRIPT = "slurm/pretrain_ponderpythia_70m.sh"
ITERS = 100  # ~6 s of training at 2 ranks: room to signal mid-run
# the tiny model of the training tests on top of the script's ponderpythia-70m config, with the
# default data.split (its 1/1000 test share of the tiny corpus is empty, and dropped), validation
# once at the end
TRAIN_ARGS = [a for s in TINY if not s.startswith(("train.iters=", "train.eval_interval="))
              for a in ("--set", s)] + [
    "--set", f"train.iters={ITERS}", "--set", "train.eval_interval=1000"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT = 300  # seconds any one wait may take before the test gives up (and cancels)


def live_slurm_required(env) -> bool:
    """Whether these tests must run (CI) rather than skip where SLURM cannot start."""
    return (env.get("PONDER_SLURM") == "require"
            or env.get("CI", "").lower() in ("1", "true", "yes"))


def test_ci_cannot_switch_the_live_tests_off(tmp_path):
    """PONDER_SLURM=0 skips them on a developer's machine only; under CI=true it fails."""
    probe = tmp_path / "test_probe.py"
    probe.write_text("import os, sys\nsys.path.insert(0, %r)\nfrom test_slurm_live import slurm\n"
                     "def test_uses_it(slurm):\n    pass\n" % os.path.dirname(__file__))
    for ci, outcome in (("true", "1 error"), ("", "1 skipped")):
        env = dict(os.environ, PONDER_SLURM="0", CI=ci)
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p",
                              "no:cacheprovider", "-p", "no:xdist", str(probe)], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert outcome in out.stdout, out.stdout[-2000:]
        assert ("CI must run the live-SLURM tests" in out.stdout) == bool(ci), out.stdout


# ------------------------------------------------------------------------- the cluster
def live_cluster(nodes: int = 1):
    """A started private SLURM of `nodes` nodes (a generator: stopped and removed after its
    yield), or the skip / CI failure that says why there is none."""
    in_ci = live_slurm_required(os.environ)
    if os.environ.get("PONDER_SLURM", "1") == "0":
        if in_ci:  # CI runs these tests or fails: no switch skips them there
            pytest.fail("PONDER_SLURM=0 under CI=true: CI must run the live-SLURM tests; unset "
                        "PONDER_SLURM", pytrace=False)
        pytest.skip("PONDER_SLURM=0: live-SLURM tests switched off")
    reason = slurm_local.why_not_here()
    try:
        if reason:
            raise slurm_local.SlurmUnavailable(reason)
        slurm_local.install(timeout=600, log=lambda msg: print(msg, file=sys.stderr))
    except slurm_local.SlurmUnavailable as exc:
        if in_ci:
            pytest.fail(f"PONDER_SLURM=require or CI=true, but the live SLURM cannot be set up: "
                        f"{exc}", pytrace=False)
        pytest.skip(f"no live SLURM here: {exc}")
    directory = tempfile.mkdtemp(prefix="ponder-slurm-")  # short: holds the munge socket
    cluster = slurm_local.LocalSlurm(directory, nodes=nodes)
    try:
        cluster.start(timeout=120)
    except slurm_local.SlurmUnavailable as exc:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
        if in_ci:
            pytest.fail(f"the live SLURM did not start: {exc}", pytrace=False)
        pytest.skip(f"the live SLURM did not start: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm():
    yield from live_cluster(1)


def job_environment(cluster, prepared, bpe_dir, cache) -> dict:
    """What sbatch hands every job (it exports the submitting environment)."""
    env = cluster.env()
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID"):
        env.pop(key, None)
    env.update(GPUS_PER_NODE="0", PYTHON=sys.executable, DATA=prepared, TOKENIZER=bpe_dir,
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   os.path.join(ROOT, ".torch_extensions")))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # deepspeed
    env["PONDER_TEST_CACHE"] = str(cache)
    # DeepSpeed's shared-memory comm op, built before the first job: on a fresh checkout its
    # build (30-60 s on a loaded machine) would otherwise fall inside the first job that needs
    # it, and the time-limit drill's 1-minute job would end before the build did. A signal
    # during the build is test_preemption's case.
    subprocess.run([sys.executable, "-c", "from ponder_pt.engine.ds_ops import build_op; "
                    "build_op('ShareMemCommBuilder')"], env=env, cwd=ROOT, check=True,
                   timeout=900)
    return env


@pytest.fixture(scope="module")
def job_env(slurm, prepared, bpe_dir, tmp_path_factory):
    return job_environment(slurm, prepared, bpe_dir, tmp_path_factory.mktemp("slurm_cache"))


class Job:
    def __init__(self, cluster, job_id: str, log: str):
        self.cluster, self.id, self.log = cluster, job_id, log

    def info(self) -> dict:
        out = self.cluster.run("scontrol", "-o", "show", "job", self.id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}

    def text(self) -> str:
        try:
            return open(self.log, errors="replace").read()
        except OSError:
            return "(no log yet)"

    def report(self) -> str:
        return (f"--- SLURM job {self.id}: {self.info()}\n--- {self.log}:\n"
                f"{self.text()[-12000:]}\n{self.cluster.log_tail(15)}")

    def poll(self, until, timeout: float):
        """The job's info once `until(info)` holds, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if until(info):
                return info
            time.sleep(0.2)
        return None

    def wait(self, until=lambda info: info.get("JobState") in TERMINAL, timeout=JOB_TIMEOUT,
             what="to end") -> dict:
        info = self.poll(until, timeout)
        if info is not None:
            return info
        report = self.report()
        self.cluster.run("scancel", self.id, check=False)
        pytest.fail(f"job {self.id} did not {what} within {timeout}s\n{report}", pytrace=False)

    def check(self, condition: bool, message: str = "") -> None:
        if not condition:
            pytest.fail(f"{message}\n{self.report()}", pytrace=False)


def submit(cluster, env, script_and_args, opts=(), log_dir=None, run_dir=None,
           log_name="slurm-%j.out") -> Job:
    """sbatch from the repository root; command-line options override the #SBATCH lines."""
    env = dict(env)
    if run_dir is not None:
        env["RUN_DIR"] = str(run_dir)
    log = os.path.join(str(log_dir or run_dir), log_name)
    os.makedirs(os.path.dirname(log), exist_ok=True)  # or SLURM cannot open it: launch fails
    cmd = ["sbatch", "--parsable", f"--output={log}", *opts, *script_and_args]
    proc = subprocess.run(cluster.command(*cmd), env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    job_id = proc.stdout.strip().split(";")[0]
    return Job(cluster, job_id, log.replace("%j", job_id))


def train_job(cluster, env, run_dir, extra=(), time_opts=("--time=10", "--signal=USR1@60"),
              nodes=1, tasks_per_node=2):
    """The real script on `nodes` nodes x 2 CPU tasks; --set pairs after the script name win."""
    opts = [f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--gpus-per-node=0",
            "--cpus-per-task=1", *time_opts]
    args = [*TRAIN_ARGS, "--set", f"data.cache_dir={env['PONDER_TEST_CACHE']}", *extra]
    return submit(cluster, env, [SCRIPT, *args], opts, run_dir=run_dir)


def losses(run_dir) -> tuple[dict, list]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [r["step"] for r in rows if "loss" in r]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, steps


def wait_for_step(job: Job, run_dir, step: int, timeout=JOB_TIMEOUT) -> None:
    path = os.path.join(run_dir, "metrics.jsonl")

    def reached(info):
        if info.get("JobState") in TERMINAL:
            job.check(False, f"job {job.id} ended before step {step}")
        try:
            return any(json.loads(line).get("step", 0) >= step for line in open(path))
        except (OSError, ValueError):
            return False

    job.wait(reached, timeout, what=f"reach step {step}")


def assert_matches_reference(job: Job, run_dir, reference: dict) -> None:
    got, steps = losses(run_dir)
    job.check(steps == list(range(1, ITERS + 1)),
              f"every step logged once in metrics.jsonl, got {steps}")
    for step, loss in reference.items():
        job.check(got[step] == pytest.approx(loss, rel=1e-6),
                  f"step {step}: loss {got[step]} != uninterrupted {loss}")


# ------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def reference(slurm, job_env, tmp_path_factory):
    """Completion: the ponderpythia script trains to the end in 2 tasks, uninterrupted."""
    run = tmp_path_factory.mktemp("slurm_complete")
    job = train_job(slurm, job_env, run)
    info = job.wait()
    job.check(info["JobState"] == "COMPLETED" and info["Restarts"] == "0",
              f"job {job.id} should complete without requeue")
    return job, run, losses(run)[0]


def test_script_trains_to_completion_in_two_cpu_tasks(reference):
    job, run, got = reference
    text = job.text()
    job.check("world 2 = tp 1 x pp 1 x dp 2" in text, "2 tasks, one rank each, gloo")
    job.check(sorted(got) == list(range(1, ITERS + 1)), f"steps 1..{ITERS} logged")
    job.check(os.path.exists(os.path.join(run, "checkpoints", "latest")),
              "the final checkpoint is saved")
    job.check(os.path.isdir(os.path.join(run, "tensorboard")), "the script's tensorboard logs")
    # the --set pairs after the script name won over the script's own
    resolved = open(os.path.join(run, "checkpoints", "run_config.yaml")).read()
    job.check("micro_batch: 2" in resolved and f"iters: {ITERS}" in resolved
              and "precision: fp32" in resolved, resolved)


def test_usr1_saves_exits_99_requeues_and_resumes(slurm, job_env, reference, tmp_path):
    """Preemption: scancel --signal=USR1 mid-run -> every rank saves at the same step, the job
    exits 99 and requeues itself; the requeued job resumes, finishes and matches."""
    job = train_job(slurm, job_env, tmp_path, ["--set", "checkpoint.interval=1000",
                                               "--set", "log.tensorboard=false"])
    wait_for_step(job, tmp_path, 3)
    slurm.run("scancel", "--signal=USR1", job.id)
    info = job.wait()
    text = job.text()
    job.check(info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1,
              "requeued once, then completed")
    saved = re.search(r"signal received: saving at step (\d+)", text)
    job.check(saved is not None and 3 <= int(saved.group(1)) < ITERS, "saved on the signal")
    step = int(saved.group(1))
    job.check("Exited with exit code 99" in text and f"requeueing {job.id}" in text,
              "every task exited 99, the script requeued the job")
    job.check(f"resumed from {tmp_path}/checkpoints/step_{step:08d}" in text
              and f"training steps {step}..{ITERS}" in text, "the requeued job resumed")
    job.check(not os.path.exists(os.path.join(tmp_path, "checkpoints", "REQUEUE")),
              "the requeued run removed the marker")
    assert_matches_reference(job, tmp_path, reference[2])


def test_time_limit_signal_takes_the_requeue_path(slurm, job_env, tmp_path):
    """--time=1 with --signal=USR1@55: SLURM itself signals ahead of the limit. It checks
    time limits only every 30 s, so the signal comes within ~30 s of the start, during startup
    or training (caught either way: the ranks run a step, save, exit 99). The run is endless
    (train.iters=100000), so it cannot finish first. A requeued job keeps its limit and would
    be signalled again at once, so while it waits the test raises the limit, as one would for
    the rest of a run, then stops the job once it has trained past the save."""
    extra = ["--set", "checkpoint.interval=100000", "--set", "train.iters=100000",
             "--set", "log.tensorboard=false"]
    requeued = lambda i: int(i.get("Restarts", 0)) >= 1 or i.get("JobState") in TERMINAL
    for attempt in range(3):
        run = tmp_path / f"attempt{attempt}"
        job = train_job(slurm, job_env, run, extra, time_opts=("--time=1", "--signal=USR1@55"))
        info = job.poll(requeued, timeout=JOB_TIMEOUT)
        job.check(info is not None, "neither requeued nor ended")
        text = job.text()
        if "signal received" in text:
            break
        # SLURM checks limits every 30 s, so its signal can come in the job's first ~0.3 s.
        if info.get("JobState") == "TIMEOUT":
            # before srun's step existed: SLURM signals the job's steps, there were none yet,
            # and it is not sent again
            print(f"time-limit signal lost before the step started; again\n{job.report()}")
        elif "SIGUSR1 struck the ranks before they could catch it" in text:
            # after the step started but before Python caught it: the batch script requeues
            job.check(int(info.get("Restarts", 0)) == 1, "requeued after an uncaught SIGUSR1")
            slurm.run("scancel", job.id, check=False)
            print(f"time-limit signal came before Python started; again\n{job.report()}")
        else:
            break
    job.check(int(info.get("Restarts", 0)) == 1, "requeued by the time-limit signal")
    slurm.run("scontrol", "update", f"JobId={job.id}", "TimeLimit=10", check=False)
    text = job.text()
    saved = re.search(r"signal received: saving at step (\d+)", text)
    job.check(saved is not None and f"requeueing {job.id}" in text, "saved and requeued")
    step = int(saved.group(1))
    wait_for_step(job, run, step + 3)
    text = job.text()
    slurm.run("scancel", job.id)
    job.check("TIME LIMIT" not in text, "the limit itself never struck")
    job.check(f"resumed from {run}/checkpoints/step_{step:08d}" in text
              and f"training steps {step}..100000" in text, "the requeued job resumed")
    _, steps = losses(run)
    job.check(steps[:step + 3] == list(range(1, step + 4)), f"each step once: {steps}")


def test_killed_job_resubmitted_resumes_from_last_intact_checkpoint(slurm, job_env, reference,
                                                                     tmp_path):
    """Every rank SIGKILLed (an OOM kill, a node lost; `scancel` itself sends SIGTERM first,
    which the ranks would catch and save on): nothing is saved, the job fails without
    requeueing; the same sbatch command again resumes from the newest complete checkpoint,
    repeats the steps after it, and logs each step once."""
    extra = ["--set", "checkpoint.interval=10", "--set", "log.tensorboard=false"]
    job = train_job(slurm, job_env, tmp_path, extra)
    wait_for_step(job, tmp_path, 14)
    listing = slurm.run("scontrol", "listpids", job.id).stdout.splitlines()[1:]
    ranks = [int(row.split()[0]) for row in listing
             if len(row.split()) >= 4 and row.split()[2] == "0" and row.split()[3].isdigit()]
    job.check(len(ranks) == 2, f"two ranks in step 0: {listing}")
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    info = job.wait()
    text = job.text()
    job.check(info["JobState"] == "FAILED" and info["Restarts"] == "0"
              and "signal received" not in text and "requeueing" not in text,
              "killed outright, not requeued")
    latest = open(os.path.join(tmp_path, "checkpoints", "latest")).read().strip()
    start = int(latest.split("_")[-1])
    job.check(start % 10 == 0 and 10 <= start < ITERS, f"latest is {latest}")
    again = train_job(slurm, job_env, tmp_path, extra)
    info = again.wait()
    again.check(info["JobState"] == "COMPLETED", "the resubmitted job completes")
    again.check(f"training steps {start}..{ITERS}" in again.text(),
                f"resumed from step {start}")
    assert_matches_reference(again, tmp_path, reference[2])


def test_failing_rank_is_the_last_line_of_the_job_log(slurm, job_env, tmp_path):
    """A rank that raises: the job fails (no requeue), and its log ends with the rank and the
    exception, not srun's exit codes."""
    job = train_job(slurm, planted_env(job_env, tmp_path), tmp_path / "run")
    info = job.wait()
    job.check(info["JobState"] == "FAILED" and info["Restarts"] == "0", "fails, no requeue")
    last = [x for x in job.text().splitlines() if x.strip()][-1]
    job.check(last == f"ponder-pt train: rank 1 failed: RuntimeError: {MESSAGE}",
              f"last line: {last!r}")


def test_launchers_under_srun_with_two_cpu_tasks(slurm, job_env, prepared, bpe_dir, tmp_path):
    """launchers/torchrun_multinode.sh (srun, one task per node) and deepspeed_multinode.sh
    (hostfile from the allocation) on one node with 2 CPU processes each: same losses."""
    sets = []
    for s in [*TINY, f"data.train=[{prepared}]", f"data.tokenizer={bpe_dir}",
              f"data.cache_dir={job_env['PONDER_TEST_CACHE']}"]:
        sets += ["--set", s]
    q = " ".join(f"'{a}'" for a in sets)
    body = ("#!/bin/bash\nset -euo pipefail\n"
            f"srun --ntasks-per-node=1 bash launchers/torchrun_multinode.sh --config demo {q} "
            f"--set log.dir={tmp_path}/torchrun\n"
            f"bash launchers/deepspeed_multinode.sh --config demo {q} "
            f"--set log.dir={tmp_path}/deepspeed\n")
    script = tmp_path / "launch.sh"
    script.write_text(body)
    env = dict(job_env, NPROC_PER_NODE="2")
    job = submit(slurm, env, [str(script)], ["--nodes=1", "--ntasks-per-node=1",
                                             "--cpus-per-task=2", "--time=10"], log_dir=tmp_path)
    info = job.wait()
    job.check(info["JobState"] == "COMPLETED", "both launchers ran")
    tr, steps = losses(tmp_path / "torchrun")
    ds, _ = losses(tmp_path / "deepspeed")
    job.check(steps == [1, 2, 3, 4] and job.text().count("world 2 = tp 1 x pp 1 x dp 2") == 2,
              "2 ranks each")
    for step in tr:
        job.check(ds[step] == pytest.approx(tr[step], rel=1e-6), f"step {step}: {tr} vs {ds}")


def test_data_prep_array_runs_and_merges(slurm, job_env, corpus, bpe_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    lines = open(corpus).read().splitlines()
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        (shards / f"part{i}.jsonl").write_text("\n".join(lines[i::3]) + "\n")
    out, merged = tmp_path / "prepared", tmp_path / "merged"
    env = dict(job_env, MERGE_LOG=str(tmp_path / "merge-%j.out"), MERGE_TIME="10")
    job = submit(slurm, env, ["data_prep/prepare_array.sbatch", str(shards / "*.jsonl"),
                              bpe_dir, str(out), str(merged)],
                 ["--array=0-1", "--cpus-per-task=1", "--time=10"], log_dir=tmp_path,
                 log_name="slurm-%A_%a.out")
    # the array's first task submitted the merge job, which waits for every task
    deadline = time.monotonic() + JOB_TIMEOUT
    merge_id = None
    while merge_id is None and time.monotonic() < deadline:
        for path in glob.glob(str(tmp_path / "slurm-*.out")):
            m = re.search(r"merge job: (\d+)", open(path, errors="replace").read())
            merge_id = m.group(1) if m else merge_id
        time.sleep(0.5)
    job.check(merge_id is not None, "the first array task submitted the merge job")
    merge = Job(slurm, merge_id, str(tmp_path / f"merge-{merge_id}.out"))
    info = merge.wait()
    logs = "\n".join(open(p, errors="replace").read()
                     for p in sorted(glob.glob(str(tmp_path / "slurm-*.out"))))
    merge.check(info["JobState"] == "COMPLETED", f"the merge ran\n{logs[-6000:]}")
    merge.check("merged 3 shards" in merge.text(), merge.text())
    parts = [IndexedDataset(str(out / f"part{i}")) for i in range(3)]
    whole = IndexedDataset(str(merged))
    merge.check(len(whole) == sum(len(p) for p in parts) > 0, "every document merged")
    merge.check(list(whole[0]) == list(parts[0][0])
                and list(whole[len(whole) - 1]) == list(parts[2][len(parts[2]) - 1]),
                "shards merged in order")


# ------------------------------------------------------------------------- without daemons
def test_slurm_local_says_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(slurm_local.os, "geteuid", lambda: 1000)
    assert "needs root" in slurm_local.why_not_here()
    with pytest.raises(slurm_local.SlurmUnavailable, match="needs root"):
        monkeypatch.setattr(slurm_local, "missing_programs", lambda: ["slurmd"])
        slurm_local.install()


def test_slurm_local_config_is_private_to_its_directory(tmp_path):
    cluster = slurm_local.LocalSlurm(str(tmp_path), cpus=1)
    cluster.write_conf()
    conf = (tmp_path / "slurm.conf").read_text()
    for line in ("ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobRequeue=1",
                 f"StateSaveLocation={tmp_path}/state", f"SlurmdSpoolDir={tmp_path}/spool",
                 f"AuthInfo=socket={tmp_path}/munge/munge.socket,cred_expire=10",
                 f"NodeName={cluster.host} ", " CPUs=2 ", "PartitionName=debug"):
        assert line in conf, line
    assert "cgroup" not in conf
    assert cluster.env({"PATH": "/usr/bin"})["SLURM_CONF"] == str(tmp_path / "slurm.conf")
    assert cluster.command("sinfo") == ["sinfo"]  # one node: the machine's own network


def test_slurm_local_multinode_config_names_every_simulated_node(tmp_path):
    """N nodes: one per namespace, each with its address on the bridge and files of its own;
    the controller listens on the bridge's address, where the SLURM commands run."""
    cluster = slurm_local.LocalSlurm(str(tmp_path), nodes=3)
    cluster.write_conf()
    conf = (tmp_path / "slurm.conf").read_text()
    for line in (f"SlurmctldHost={cluster.host}(10.77.0.1)", "NodeName=node1 NodeAddr=10.77.0.2",
                 "NodeName=node3 NodeAddr=10.77.0.4", "PartitionName=debug Nodes=node1,node2,node3",
                 f"SlurmdPidFile={tmp_path}/slurmd-%n.pid", f"SlurmdSpoolDir={tmp_path}/spool/%n",
                 f"SlurmdLogFile={tmp_path}/slurmd-%n.log"):
        assert line in conf, line
    assert cluster.node_names == ["node1", "node2", "node3"]
    cmd = cluster.command("sbatch", "x.sh")
    assert cmd[:2] == ["nsenter", f"--net=/run/netns/{cluster.sim.switch}"]
    assert cmd[-2:] == ["sbatch", "x.sh"]
    assert f"mount --bind {tmp_path}/hosts /etc/hosts" in " ".join(cmd)
    node = cluster.sim.node_command(2, ["slurmd"])
    assert "--uts" in node and any(part.startswith("hostname node2 &&") for part in node)


NINJA_SIGNALLING = """#!/bin/bash
# DeepSpeed's op build (or up-to-date check) runs ninja: signal the whole process group, as
# SLURM signals every process of a step, once, then build
if [ ! -e "$PONDER_TEST_MARK" ]; then touch "$PONDER_TEST_MARK"; kill -USR1 0; fi
exec {ninja} "$@"
"""


@pytest.mark.parametrize("when", ["imports", "op_build"])
def test_signal_during_startup_under_slurm_still_saves_and_exits_99(prepared, bpe_dir, tmp_path,
                                                                     when):
    """A rank signalled before its training loop (SLURM may send the time-limit signal that
    early) must not die of SIGUSR1's default action with nothing saved and no requeue: under
    SLURM (SLURM_JOB_ID set) the entry point catches it first thing; the loop then runs one
    step, saves and exits 99. One process, no scheduler needed. `imports`: the signal comes
    while DeepSpeed is imported. `op_build`: it reaches every process of the group while ninja
    builds or checks DeepSpeed's CPU comm op, which must finish its build, not fail the rank."""
    cmd = [sys.executable, "-m", "ponder_pt.train", "--config", "demo"]
    for item in [*TINY, "train.iters=50", f"data.train=[{prepared}]", f"data.tokenizer={bpe_dir}",
                 f"data.cache_dir={tmp_path}/cache", f"log.dir={tmp_path}",
                 f"checkpoint.dir={tmp_path}/ckpt", "checkpoint.interval=1000"]:
        cmd += ["--set", item]
    env = dict(os.environ, SLURM_JOB_ID="12345", OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_PORT"):
        env.pop(key, None)
    if when == "op_build":
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        import ninja

        # the wrapper runs the locked ninja, the one every other build uses (ds_ops)
        (bin_dir / "ninja").write_text(NINJA_SIGNALLING.format(
            ninja=os.path.join(ninja.BIN_DIR, "ninja")))
        (bin_dir / "ninja").chmod(0o755)
        env.update(PONDER_PT_NINJA_DIR=str(bin_dir), PONDER_TEST_MARK=str(tmp_path / "signalled"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own group to signal
    out = []
    try:
        for line in proc.stdout:  # deepspeed is imported after the handler is in place
            out.append(line)
            if when == "imports" and ("real_accelerator" in line
                                      or "Setting accelerator" in line):
                proc.send_signal(signal.SIGUSR1)
                break
        out.append(proc.communicate(timeout=300)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(out)
    if when == "op_build":
        assert (tmp_path / "signalled").exists(), "ninja never ran"
    assert proc.returncode == 99, text[-3000:]
    saved = re.search(r"signal received: saving at step (\d+)", text)
    assert saved and int(saved.group(1)) < 50, text[-3000:]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == f"step_{int(saved.group(1)):08d}"


def test_resumed_metrics_drop_the_rows_logged_after_the_checkpoint(tmp_path):
    """A run killed at step 14 after saving at 10 resumes from 10: its rows 11..14 (and a line
    cut short by the kill) are dropped, so the resumed run logs each of them once."""
    from ponder_pt.config.schema import LogConfig
    from ponder_pt.engine.metrics import MetricsLogger, read_metrics

    cfg = LogConfig(dir=str(tmp_path))
    first = MetricsLogger(cfg)
    for step in range(1, 15):
        first.log(step, {"loss": float(step)})
    first.log(10, {"loss": 0.5}, prefix="valid_")
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 15, "lo')  # the kill struck mid-write
    second = MetricsLogger(cfg, resume=10)
    for step in range(11, 13):
        second.log(step, {"loss": float(step)})
    second.close()
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in rows if "valid_loss" in r] == [10]
    MetricsLogger(cfg, resume=True).close()  # plain append, as before: nothing dropped
    assert len(read_metrics(str(tmp_path / "metrics.jsonl"))) == len(rows)
