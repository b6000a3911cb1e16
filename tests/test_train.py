"""Training under DeepSpeed: every parallel layout matches a single-process run of the same
seed and global batch; checkpoints survive SIGKILL and corruption (stop signals:
test_run_safety)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import free_port
from train_utils import TINY, metrics, run_train, train_cmd

REL = 2e-5  # fp32, different reduction orders


@pytest.fixture(scope="module")
def reference_run(prepared, bpe_dir, tmp_path_factory):
    """The single-process run every layout must reproduce (checkpoints and TensorBoard on:
    neither changes the losses)."""
    run = tmp_path_factory.mktemp("ref")
    run_train(str(run), prepared, bpe_dir, ["checkpoint.dir=" + str(run / "ckpt"),
                                            "checkpoint.interval=2", "log.tensorboard=true"])
    return run


@pytest.fixture(scope="module")
def reference(reference_run):
    return metrics(str(reference_run))


def _assert_same(got, ref):
    train, valid = got
    ref_train, ref_valid = ref
    assert sorted(train) == sorted(ref_train) == [1, 2, 3, 4]
    for step, loss in ref_train.items():
        assert train[step] == pytest.approx(loss, rel=REL), (step, train, ref_train)
    assert valid[4] == pytest.approx(ref_valid[4], rel=REL)


def test_single_process_run(reference, reference_run):
    train, valid = reference
    assert train[4] < train[1]  # it learns
    run = reference_run
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tensorboard"))
    rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
    step1 = rows[0]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "step_time", "tokens_per_s",
                "tflops_per_gpu", "mfu", "skipped_steps"):
        assert key in step1
    assert step1["tokens"] == 8 * 32 and rows[-1]["valid_ppl"] > 1
    assert (run / "loss.png").stat().st_size > 1000
    assert set(os.listdir(run / "ckpt")) >= {"latest", "step_00000002", "step_00000004"}
    assert (run / "ckpt" / "latest").read_text() == "step_00000004"


@pytest.mark.parametrize("stage", [0, 2, 3])  # ZeRO-1: under the deepspeed launcher, below
def test_zero_stages_match_single_process(stage, reference, prepared, bpe_dir, tmp_path):
    run_train(str(tmp_path), prepared, bpe_dir, [f"parallel.zero_stage={stage}"], nproc=2)
    _assert_same(metrics(str(tmp_path)), reference)


def test_tp2_dp2_matches_single_process(reference, prepared, bpe_dir, tmp_path):
    run_train(str(tmp_path), prepared, bpe_dir, ["parallel.tp=2"], nproc=4)
    _assert_same(metrics(str(tmp_path)), reference)


def test_sequence_parallel_matches_single_process(reference, prepared, bpe_dir, tmp_path):
    run_train(str(tmp_path), prepared, bpe_dir, ["parallel.tp=2", "parallel.sequence_parallel=true",
                                                 "parallel.zero_stage=2"], nproc=2)
    _assert_same(metrics(str(tmp_path)), reference)


def test_pp2_pondering_matches_single_process(reference, prepared, bpe_dir, tmp_path):
    """K=2 pondering unrolled over 2 pipeline stages with tied blocks."""
    run_train(str(tmp_path), prepared, bpe_dir, ["parallel.pp=2"], nproc=2)
    _assert_same(metrics(str(tmp_path)), reference)


@pytest.mark.slow
def test_tp2_pp2_matches_single_process(reference, prepared, bpe_dir, tmp_path):
    run_train(str(tmp_path), prepared, bpe_dir, ["parallel.pp=2", "parallel.tp=2"], nproc=4)
    _assert_same(metrics(str(tmp_path)), reference)


LONG = 40  # room to kill the run after its step-10 checkpoint and before its end


def _long(run_dir):
    return [f"train.iters={LONG}", "train.eval_interval=1000", f"checkpoint.dir={run_dir}/ckpt",
            "checkpoint.interval=10"]


def _wait_for_step(path, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        if os.path.exists(path):
            steps = [json.loads(x)["step"] for x in open(path) if x.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)  # a tighter poll takes CPU from the run it waits for
    raise AssertionError("timed out waiting for the run")


def _signal_tree(proc, sig):
    """Signal the launcher and every worker: torchrun starts its workers in sessions of
    their own, so a process-group kill would miss them."""
    import psutil

    parent = psutil.Process(proc.pid)
    for p in [parent, *parent.children(recursive=True)]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _spawn(run_dir, prefix, tok, extra, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen(train_cmd(run_dir, prefix, tok, extra, nproc), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_matches_uninterrupted(prepared, bpe_dir, tmp_path):
    full = tmp_path / "full"
    run_train(str(full), prepared, bpe_dir, _long(full), nproc=2)
    ref, _ = metrics(str(full))

    cut = tmp_path / "cut"
    proc = _spawn(str(cut), prepared, bpe_dir, _long(cut))
    _wait_for_step(cut / "metrics.jsonl", 13, proc)
    _signal_tree(proc, signal.SIGKILL)  # no chance to save: resume from the last checkpoint
    proc.wait()
    out = run_train(str(cut), prepared, bpe_dir, _long(cut), nproc=2).stdout
    assert "resumed from" in out
    start = int(out.split("training steps ")[1].split("..")[0])
    assert start % 10 == 0 and 10 <= start < LONG, out[-2000:]
    resumed, _ = metrics(str(cut))
    assert sorted(resumed) == list(range(1, LONG + 1))
    for step in range(1, LONG + 1):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-6), (step, resumed, ref)


def test_truncated_newest_checkpoint_falls_back_to_previous(prepared, bpe_dir, tmp_path):
    from ponder_pt.weights.files import verify

    extra = ["train.iters=4", f"checkpoint.dir={tmp_path}/ckpt", "checkpoint.interval=2"]
    run_train(str(tmp_path / "a"), prepared, bpe_dir, extra)
    ckpt = tmp_path / "ckpt"
    newest = ckpt / "step_00000004"
    victim = max((p for p in newest.iterdir() if p.suffix == ".pt"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert "truncated" in verify(str(ckpt), "step_00000004")
    # an unfinished save (no meta) must be ignored too
    (ckpt / "step_00000006").mkdir()
    proc = run_train(str(tmp_path / "b"), prepared, bpe_dir, extra[:1] + ["train.iters=6"] + extra[1:])
    out = proc.stdout + proc.stderr
    assert "step_00000006: skipped, incomplete" in out
    assert "step_00000004: skipped, truncated" in out
    assert "resumed from" in out and "step_00000002" in out
    train, _ = metrics(str(tmp_path / "b"))
    assert sorted(train) == [3, 4, 5, 6]


def test_two_node_rendezvous_on_localhost(prepared, bpe_dir, tmp_path):
    """Two torchrun 'nodes' (one process each) meet through c10d rendezvous and train."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--rdzv-id=ponder-test", "-m", "ponder_pt.train", "--config", "demo"]
        for item in [*TINY, f"data.train=[{prepared}]", f"data.tokenizer={bpe_dir}",
                     f"data.cache_dir={tmp_path}/cache", f"log.dir={tmp_path}"]:
            cmd += ["--set", item]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    train, _ = metrics(str(tmp_path))
    assert sorted(train) == [1, 2, 3, 4]


def _srun_style(cmd, env, ntasks=2):
    """`ntasks` ranks started the way `srun python -m ponder_pt.train` starts them: each with
    its SLURM_PROCID and nothing else a launcher would set."""
    procs = []
    for rank in range(ntasks):
        procs.append(subprocess.Popen(
            cmd, env=dict(env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                          SLURM_NTASKS=str(ntasks)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def test_srun_style_ranks_meet_where_the_allocation_says(reference, prepared, bpe_dir, tmp_path):
    """Ranks that srun started without env.sh derive MASTER_ADDR / MASTER_PORT from the SLURM
    allocation, the same on every rank, and train as one process does; without an allocation
    they stop at once with the fix instead of each waiting on a port of its own."""
    cmd = [sys.executable, "-m", "ponder_pt.train", "--config", "demo"]
    for item in [*TINY, f"data.train=[{prepared}]", f"data.tokenizer={bpe_dir}",
                 f"data.cache_dir={tmp_path}/cache", f"log.dir={tmp_path}"]:
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"

    for rc, out, err in _srun_style(cmd, env):  # each ends (a hang would time out)
        assert rc != 0 and "WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT are not set" in err, \
            err[-2000:]
        assert "ponder-pt train --nproc N" in err

    port = free_port()
    while not 20000 <= port < 40000:  # the derived port is 20000 + job id % 20000
        port = free_port()
    env.update(SLURM_JOB_ID=str(port - 20000), SLURM_JOB_NODELIST="localhost")
    results = _srun_style(cmd, env)
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    assert "world 2 = tp 1 x pp 1 x dp 2" in "".join(out + err for _, out, err in results)
    _assert_same(metrics(str(tmp_path)), reference)


def test_bad_config_is_rejected_before_any_process_starts(prepared, bpe_dir, tmp_path):
    proc = run_train(str(tmp_path), prepared, bpe_dir, ["parallel.tp=3"], nproc=3, check=False)
    assert proc.returncode == 2
    assert "model.num_heads=4 is not divisible by parallel.tp=3" in proc.stderr
    assert "torch.distributed" not in proc.stderr and "Traceback" not in proc.stderr
    proc = run_train(str(tmp_path), prepared, bpe_dir, ["train.global_batch=6"], nproc=2, check=False)
    assert proc.returncode == 2 and "train.global_batch=6 is not divisible" in proc.stderr
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        proc = run_train(str(tmp_path), prepared, bpe_dir, ["log.wandb=true"], check=False)
        assert proc.returncode == 2 and "log.wandb=true needs the 'wandb' package" in proc.stderr


def test_non_finite_steps_are_counted_and_stop_the_run(prepared, bpe_dir, tmp_path):
    from ponder_pt.engine.trainer import EXIT_DIVERGED

    proc = run_train(str(tmp_path), prepared, bpe_dir,
                     ["train.lr=1e6", "train.min_lr=0", "train.grad_clip=0", "train.iters=40",
                      "train.max_bad_steps=3"], check=False)
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-2000:]
    assert "3 steps in a row with non-finite loss or gradients" in proc.stderr
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["skipped_steps"] >= 3 and rows[-1]["step"] < 40


def test_deepspeed_launcher_matches_single_process(reference, prepared, bpe_dir, tmp_path):
    """The documented entry point: deepspeed ponder_pt/train.py --config ... (2 processes,
    ZeRO-1, the stage test_zero_stages_match_single_process leaves to this launcher)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = train_cmd(str(tmp_path), prepared, bpe_dir, ["parallel.zero_stage=1"])
    args = cmd[cmd.index("--config"):]
    args = [a for i, a in enumerate(args) if a != "--nproc" and args[i - 1] != "--nproc"]
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(free_port()),
                           os.path.join(root, "ponder_pt", "train.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2 = tp 1 x pp 1 x dp 2" in proc.stdout + proc.stderr
    _assert_same(metrics(str(tmp_path)), reference)


@pytest.mark.slow
def test_zero2_cpu_offload_matches_single_process(reference, prepared, bpe_dir, tmp_path):
    """ZeRO-Offload: optimizer step in DeepSpeedCPUAdam (JIT-built on first use)."""
    run_train(str(tmp_path), prepared, bpe_dir, ["parallel.zero_stage=2", "parallel.cpu_offload=true"],
              nproc=2, timeout=900)
    _assert_same(metrics(str(tmp_path)), reference)


def test_keep_last_prunes_old_checkpoints(prepared, bpe_dir, tmp_path):
    run_train(str(tmp_path), prepared, bpe_dir, ["train.iters=6", f"checkpoint.dir={tmp_path}/ckpt",
                                                 "checkpoint.interval=2", "checkpoint.keep_last=2"])
    assert sorted(p for p in os.listdir(tmp_path / "ckpt") if p.startswith("step_")) == [
        "step_00000004", "step_00000006"]


def test_pp2_resume_matches_uninterrupted(prepared, bpe_dir, tmp_path):
    """Pipeline checkpoints hold every weight, the tied embedding/head included."""
    extra = ["parallel.pp=2", "train.iters=6", "train.eval_interval=100",
             f"checkpoint.dir={tmp_path}/ckpt", "checkpoint.interval=3"]
    run_train(str(tmp_path / "full"), prepared, bpe_dir, extra, nproc=2)
    ref, _ = metrics(str(tmp_path / "full"))
    import shutil

    shutil.rmtree(tmp_path / "ckpt" / "step_00000006")  # as if the run died after step 5
    out = run_train(str(tmp_path / "resumed"), prepared, bpe_dir, extra, nproc=2).stdout
    assert "training steps 3..6" in out
    resumed, _ = metrics(str(tmp_path / "resumed"))
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-6), (resumed, ref)
