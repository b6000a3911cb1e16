"""SLURM scripts and launchers: syntax, dry runs that resolve every script's config, hosts."""

import glob
import os
import subprocess
import sys

import pytest
import zygote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "slurm", "pretrain_*.sh")))
EXPECTED = {  # size: parameters of the published Pythia model (GPT-NeoX-20B vocab, 50304 rows)
    "70m": 70_426_624, "160m": 162_322_944, "410m": 405_334_016, "1b": 1_011_781_632,
    "1.4b": 1_414_647_808, "2.8b": 2_775_208_960,
}


def test_every_method_and_size_has_a_script():
    names = {os.path.basename(s) for s in SCRIPTS}
    for method in ("pythia", "ponderpythia", "pausepythia"):
        for size in EXPECTED:
            assert f"pretrain_{method}_{size}.sh" in names


def _script_env(forked=False, **extra):
    """The scripts' environment. forked: their `$PYTHON -m ponder_pt.train --dry-run` is
    forked from the test zygote (tests/zygote_client.py) instead of a new interpreter."""
    env = dict(os.environ, **extra)
    for key in ("WORLD_SIZE", "GPUS_PER_NODE", "PRECISION", "SLURM_GPUS_PER_NODE",
                "SLURM_NTASKS", "SLURM_JOB_ID"):
        if key not in extra:
            env.pop(key, None)
    env["PYTHON"] = sys.executable
    if forked and zygote.ENABLED:
        env["PONDER_ZYGOTE_SOCKET"] = zygote.server_socket(env)
        env["PYTHON"] = os.path.join(ROOT, "tests", "zygote_client.py")
    return env


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_syntax_and_dry_run(script):
    subprocess.run(["bash", "-n", script], check=True)
    env = _script_env(forked=True)
    out = subprocess.run(["bash", script, "--dry-run"], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    method, size = os.path.basename(script)[len("pretrain_"):-3].split("_")
    assert f"parameters: {EXPECTED[size]:,} total" in text
    assert "world_size:" in text and "flops_per_token:" in text and "tokens/step" in text
    assert "2,097,152 tokens/step" in text  # the Pythia 2M-token batch
    assert "sbatch -> srun" in text and "ponder_pt.train" in text
    if method == "ponderpythia":
        assert "steps: 3" in text and "(training, 4 passes)" in text
        if size in ("1b", "1.4b", "2.8b"):
            assert "activation_checkpointing: full" in text
    if method == "pausepythia":
        assert "rate: 0.1" in text


def test_script_on_cpus_passes_trailing_arguments_last():
    """GPUS_PER_NODE=0: CPU tasks (fp32, world = the tasks SLURM gives); `--set` pairs after
    the script name reach the trainer after the script's own, so they win. The same scripts
    run under a live SLURM in tests/test_slurm_live.py."""
    script = os.path.join(ROOT, "slurm", "pretrain_ponderpythia_2.8b.sh")
    out = subprocess.run(["bash", script, "--dry-run", "--set", "train.iters=30",
                          "--set", "parallel.tp=1", "--set", "train.micro_batch=2"],
                         env=_script_env(True, GPUS_PER_NODE="0", SLURM_NTASKS="2"),
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "world_size: 2 = tp 1 x pp 1 x dp 2" in text
    assert "precision: fp32" in text and "iters: 30" in text and "micro_batch: 2" in text
    # the trailing pairs come after the script's own in the launch command
    launch = text.split("# launch\n")[1]
    assert launch.index("parallel.tp=2") < launch.index("parallel.tp=1")
    assert launch.rstrip().endswith("--set train.micro_batch=2")


def test_nodelist_expansion():
    from ponder_pt.engine.rendezvous import expand_nodelist

    assert expand_nodelist("gpu[001-003,007],cpu5") == ["gpu001", "gpu002", "gpu003", "gpu007", "cpu5"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[1-2]-ib,b[09-10]") == ["a1-ib", "a2-ib", "b09", "b10"]


@pytest.mark.parametrize("scontrol", ["absent", "broken"])
def test_hostfile_from_slurm_env(tmp_path, scontrol):
    """The nodelist is expanded without SLURM's tools, and also where an installed scontrol
    fails (no slurm.conf on this box): that is what a broken scontrol looks like."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if scontrol == "broken":
        fake = bindir / "scontrol"
        fake.write_text("#!/bin/sh\necho 'scontrol: error: resolve_ctls_from_dns_srv' >&2\nexit 1\n")
        fake.chmod(0o755)
    env = dict(os.environ, SLURM_JOB_NODELIST="n[1-2]", PATH=f"{bindir}:/nonexistent")
    hostfile = tmp_path / "hosts"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "slurm_hosts.py"),
                          "--hostfile", str(hostfile), "--slots", "4"], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["n1", "n2"]
    assert hostfile.read_text() == "n1 slots=4\nn2 slots=4\n"


def test_launcher_scripts_parse():
    for script in glob.glob(os.path.join(ROOT, "launchers", "*.sh")) + \
            glob.glob(os.path.join(ROOT, "data_prep", "*.sbatch")) + \
            [os.path.join(ROOT, "slurm", "pretrain.sh")]:
        subprocess.run(["bash", "-n", script], check=True)


FAKE_SRUN = """#!/bin/sh
[ -n "$TOUCH_REQUEUE_FILE" ] && : > "$PONDER_PT_REQUEUE_FILE"
exit "$FAKE_SRUN_RC"
"""


@pytest.mark.parametrize("rc,requeue_file,requeued,message", [
    (0, False, False, None),
    (99, False, True, "every rank saved (srun exit 99)"),
    # srun --kill-on-bad-exit terminated ranks still exiting after the first exited 99
    (143, True, True, "every rank saved (srun exit 143)"),
    # the time-limit signal struck before Python started, so no rank could catch it
    (138, False, True, "SIGUSR1 struck the ranks before they could catch it"),
    (143, False, False, None),  # SIGTERM without a save: a failure, not a requeue
    (1, False, False, None),
])
def test_batch_script_requeues_only_what_can_resume(tmp_path, rc, requeue_file, requeued,
                                                    message):
    """What the batch script does after srun, with srun and scontrol replaced: requeue (exit
    99) when every rank saved, or when they died of SIGUSR1 before catching it; otherwise
    pass srun's status on. The live scheduler runs the real thing in test_slurm_live.py."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(FAKE_SRUN)
    (bindir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    for tool in ("srun", "scontrol"):
        (bindir / tool).chmod(0o755)
    env = _script_env(GPUS_PER_NODE="0", SLURM_JOB_ID="77", SLURM_SUBMIT_DIR=ROOT,
                      RUN_DIR=str(tmp_path / "run"), FAKE_SRUN_RC=str(rc),
                      PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    env.pop("SLURM_JOB_NODELIST", None)
    if requeue_file:
        env["TOUCH_REQUEUE_FILE"] = "1"
    out = subprocess.run(["bash", os.path.join(ROOT, "slurm", "pretrain_ponderpythia_70m.sh")],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    calls = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    if requeued:
        assert out.returncode == 99, out.stdout + out.stderr
        assert calls == "requeue 77\n" and message in out.stdout
        assert not (tmp_path / "run" / ".requeue.77").exists()
    else:
        assert out.returncode == rc, out.stdout + out.stderr
        assert "requeue" not in calls and "requeueing" not in out.stdout


def test_rendezvous_kept_derived_or_refused():
    from ponder_pt.engine.rendezvous import set_rendezvous

    env = {"WORLD_SIZE": "1"}
    set_rendezvous(env, lambda: 12345)
    assert env == {"WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "12345"}
    env = {"WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500",
           "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_JOB_ID": "7"}
    set_rendezvous(env, None)  # the launcher's values win
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.5", "29500")
    env = {"WORLD_SIZE": "8", "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_JOB_ID": "40123"}
    set_rendezvous(env, None)  # every rank derives the same pair
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu001", "20123")
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.5"}
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but MASTER_PORT is not set"):
        set_rendezvous(env, lambda: 1)


def _source_env_sh(**env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
    return subprocess.run(["bash", "-c", 'source launchers/env.sh && echo "$MASTER_ADDR $MASTER_PORT"'],
                          env=dict(base, PYTHON=sys.executable, **env), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_env_sh_rendezvous():
    """launchers/env.sh: the job's first host and a port from the job id under SLURM; outside
    SLURM a free port, so two runs on one host never share 20000; a job of several nodes whose
    first host does not resolve stops there instead of falling back to 127.0.0.1."""
    out = _source_env_sh(SLURM_JOB_ID="40123", SLURM_JOB_NODELIST="localhost,n2",
                         SLURM_JOB_NUM_NODES="2")
    assert out.returncode == 0 and out.stdout.split() == ["localhost", "20123"], out.stderr
    with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
        lo, hi = map(int, fh.read().split())
    out = _source_env_sh()
    addr, port = out.stdout.split()
    assert out.returncode == 0 and addr == "127.0.0.1" and lo <= int(port) <= hi  # the OS's pick
    for bad in (dict(SLURM_JOB_NODELIST="nohost[1-2]"), dict()):  # unresolvable, no nodelist
        out = _source_env_sh(SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="2", **bad)
        assert out.returncode == 2 and out.stdout == "", out.stdout
        assert "export MASTER_ADDR" in out.stderr and "127.0.0.1" not in out.stdout


def test_a_failed_collective_names_the_lost_peer(monkeypatch):
    """The transport's message gives the peer's address; the ranks gathered at start-up map
    it to a rank and host. A timeout names dist.timeout; other errors are left alone."""
    from ponder_pt.engine import distributed as D

    places = [("node1", "10.0.0.2")] * 2 + [("node2", "10.0.0.3")] * 2
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.2")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert D.describe_world(places) == ("4 ranks on 2 hosts (node1, node2); rendezvous "
                                        "10.0.0.2:29500")
    closed = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                          "[10.0.0.3]:41235")
    assert D.explain_comm_error(closed, 30).startswith(
        "lost contact with ranks 2, 3 on node2 (10.0.0.3): that process or its node is gone")
    stranger = RuntimeError("Read error [10.9.9.9]:5555: Connection reset by peer")
    assert "lost contact with a peer rank" in D.explain_comm_error(stranger, 30)
    hung = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                        "30000ms for recv operation to complete")
    assert "did not answer within dist.timeout=30 s" in D.explain_comm_error(hung, 30)
    assert D.explain_comm_error(RuntimeError("CUDA out of memory"), 30) is None
