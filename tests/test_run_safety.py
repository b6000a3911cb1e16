"""A run a user cannot lose, through the real CLI as a user drives it: one run directory made
by default, every stop signal to the process group (Ctrl-C, SIGTERM) saves with DataLoader
workers running and ends in one sentence with the command that resumes, a second Ctrl-C
exits at once keeping the last complete checkpoint, and a resume refuses what it cannot do
before it writes anything."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from train_utils import TINY

# TINY with the presets' DataLoader workers (every preset's default): the signal reaches them too
SETTINGS = [s for s in TINY if not s.startswith(("data.num_workers", "train.iters"))] + [
    "data.num_workers=2", "train.iters=400", "train.eval_interval=1000",
    "checkpoint.interval=3"]
LAST_LINE = re.compile(r"^stopped at step (\d+) \((Ctrl-C|SIGTERM)\), saved; resume with: (.+)$")


def _cmd(prefix, tok, extra=(), nproc=1):
    cmd = [sys.executable, "-m", "ponder_pt", "train", "--config", "demo", "--nproc", str(nproc)]
    for item in [*SETTINGS, f"data.train=[{prefix}]", f"data.tokenizer={tok}", *extra]:
        cmd += ["--set", item]
    return cmd


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def _steps(run_dir) -> list[int]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(x)["step"] for x in open(path) if x.strip() and '"loss"' in x]


def _stop(cmd, cwd, run_dir_of, sig, at_step=4, again_after=None):
    """Start `cmd` in a process group of its own, send `sig` to the whole group once the run
    logged `at_step` (and again `again_after` seconds later, the ranks held meanwhile: a save
    slower than the user's patience, whatever the machine's speed); its output and exit
    code."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        run_dir = run_dir_of()
        if run_dir and max(_steps(run_dir), default=0) >= at_step:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended early ({proc.returncode}):\n{proc.stdout.read()}"
    os.killpg(proc.pid, sig)
    if again_after is not None:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "ponder_pt.train" in " ".join(child.cmdline()):
                    child.suspend()
            except psutil.NoSuchProcess:  # it exited meanwhile: nothing left to suspend
                pass
        time.sleep(again_after)
        os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=300)
    return out, proc.returncode


def _run(cmd, cwd=None):
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def _as_python(command: str) -> list[str]:
    """The printed `ponder-pt ...` command, run with this Python."""
    argv = shlex.split(command)
    assert argv[0] == "ponder-pt", command
    return [sys.executable, "-m", "ponder_pt", *argv[1:]]


def _no_traceback(out: str) -> None:
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-4000:]
    assert "DataLoader worker" not in out, out[-4000:]


@pytest.fixture(scope="module")
def ctrl_c_run(prepared, bpe_dir, tmp_path_factory):
    """`ponder-pt train` with no --out in a fresh directory, stopped by Ctrl-C to its group."""
    cwd = tmp_path_factory.mktemp("user")
    runs = cwd / "runs"

    def made():
        found = list(runs.iterdir()) if runs.exists() else []
        return str(found[0]) if found else None

    out, code = _stop(_cmd(prepared, bpe_dir), str(cwd), made, signal.SIGINT)
    return {"cwd": str(cwd), "run_dir": made(), "out": out, "code": code}


def test_ctrl_c_saves_and_the_printed_command_resumes(ctrl_c_run, prepared, bpe_dir):
    out, run_dir = ctrl_c_run["out"], ctrl_c_run["run_dir"]
    _no_traceback(out)
    assert ctrl_c_run["code"] == 130, out[-3000:]
    # a new directory under runs/ named after the config, announced with its checkpoints
    assert os.path.basename(run_dir).startswith("demo-")
    assert f"run directory: runs/{os.path.basename(run_dir)}" in out
    assert f"checkpoints: runs/{os.path.basename(run_dir)}/checkpoints, every 3 steps" in out
    last = out.strip().splitlines()[-1]
    match = LAST_LINE.match(last)
    assert match and match.group(2) == "Ctrl-C", out[-3000:]
    step = int(match.group(1))
    ckpt = os.path.join(run_dir, "checkpoints")
    assert open(os.path.join(ckpt, "latest")).read() == f"step_{step:08d}"
    assert json.load(open(os.path.join(ckpt, f"step_{step:08d}", "ponder_meta.json")))["step"] \
        == step
    # the printed command resumes it; a changed setting is listed, not applied silently
    resume = _run(_as_python(match.group(3)) + ["--set", f"train.iters={step + 1}",
                                                "--set", "train.lr=1e-3"], ctrl_c_run["cwd"])
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    said = resume.stdout
    assert f"resuming from runs/{os.path.basename(run_dir)}/checkpoints/step_{step:08d}" in said
    assert "  train.iters: 400 -> " in said and "  train.lr: 0.003 -> 0.001" in said, said
    assert f"training steps {step}..{step + 1}" in said
    assert _steps(run_dir) == list(range(1, step + 2))  # every step once
    assert f"ponder-pt convert to-hf --model runs/{os.path.basename(run_dir)}" in said


def test_sigterm_to_the_group_saves_on_two_ranks_and_resumes_on_one(prepared, bpe_dir,
                                                                     tmp_path):
    """What `scancel`, `timeout` and systemd send: ranks and DataLoader workers all get it."""
    from ponder_pt.engine.preemption import EXIT_REQUEUE

    run_dir = tmp_path / "run"
    out, code = _stop(_cmd(prepared, bpe_dir, nproc=2) + ["--out", str(run_dir)],
                      str(tmp_path), lambda: str(run_dir), signal.SIGTERM)
    _no_traceback(out)
    # DeepSpeed's start-up messages once per run, not once per rank
    for banner in ("Setting accelerator to CPU", "built successfully", "OMP_NUM_THREADS"):
        assert out.count(banner) <= 1, out[-3000:]
    assert code == EXIT_REQUEUE, out[-3000:]
    match = LAST_LINE.match(out.strip().splitlines()[-1])
    assert match and match.group(2) == "SIGTERM" and "--nproc 2" in match.group(3), out[-3000:]
    step = int(match.group(1))
    ckpt = run_dir / "checkpoints"
    meta = json.load(open(ckpt / f"step_{step:08d}" / "ponder_meta.json"))
    assert meta["state"]["consumed_samples"] == 8 * step
    assert (ckpt / "REQUEUE").exists()
    # the requeued job resumes where the signal struck, here on one process (the optimizer is
    # carried over: test_elastic_resume), and removes the marker
    again = [a for a in _as_python(match.group(3)) if a not in ("--nproc", "2")]
    resumed = _run(again + ["--set", f"train.iters={step + 1}"], str(tmp_path))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"training steps {step}..{step + 1}" in resumed.stdout
    assert "saved at TP=1 PP=1 DP=2 ZeRO-1, resuming at TP=1 PP=1 DP=1 ZeRO-1" in resumed.stdout
    assert not (ckpt / "REQUEUE").exists()


def test_second_ctrl_c_exits_at_once_keeping_the_last_checkpoint(prepared, bpe_dir, tmp_path):
    import psutil

    from ponder_pt.weights.files import newest_complete, verify

    run_dir = tmp_path / "run"
    out, code = _stop(_cmd(prepared, bpe_dir, nproc=2) + ["--out", str(run_dir)],
                      str(tmp_path), lambda: str(run_dir), signal.SIGINT, again_after=1.5)
    _no_traceback(out)
    assert code == 130, out[-3000:]
    assert "second Ctrl-C" in out
    ckpt = str(run_dir / "checkpoints")
    tag = newest_complete(ckpt)
    assert tag is not None and verify(ckpt, tag) is None
    assert open(os.path.join(ckpt, "latest")).read() == tag
    # nothing trains on after the second Ctrl-C: no rank is left behind
    left = [p for p in psutil.process_iter(["cmdline"])
            if str(run_dir) in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]


def test_resume_refuses_what_it_cannot_do_before_writing(ctrl_c_run, prepared, bpe_dir,
                                                         tmp_path, capsys):
    from ponder_pt.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(ctrl_c_run["run_dir"], run_dir)
    record = (run_dir / "checkpoints" / "run_config.yaml").read_bytes()
    # another model: each differing key with the --set that matches the checkpoint
    other = _run(_cmd(prepared, bpe_dir, ["model.num_layers=3", "model.hidden_size=64"])
                 + ["--out", str(run_dir)])
    assert other.returncode == 2, other.stderr[-3000:]
    assert "cannot resume" in other.stderr and "the model differs" in other.stderr
    assert "--set model.num_layers=2" in other.stderr
    assert "--set model.hidden_size=32" in other.stderr
    assert "damaged" not in other.stderr and "fallback_to_older" not in other.stderr
    assert "Traceback" not in other.stderr
    assert (run_dir / "checkpoints" / "run_config.yaml").read_bytes() == record
    # checkpoint.load naming nothing
    nope = _run(_cmd(prepared, bpe_dir, [f"checkpoint.load={tmp_path}/nope"])
                + ["--out", str(tmp_path / "fresh")])
    assert nope.returncode == 2 and f"checkpoint.load={tmp_path}/nope: no such directory" \
        in nope.stderr, nope.stderr[-2000:]
    assert not (tmp_path / "fresh" / "metrics.jsonl").exists()

    # a run directory with a trained run but no checkpoint is not reused silently
    shutil.rmtree(run_dir / "checkpoints")
    args = ["train", "--config", "demo", "--out", str(run_dir)]
    for item in [*SETTINGS, f"data.train=[{prepared}]", f"data.tokenizer={bpe_dir}"]:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "refusing to reuse a run directory" in err and "run.overwrite=true" in err
    # a tag that is not there lists the ones that are
    assert main(["convert", "to-hf", "--checkpoint", ctrl_c_run["run_dir"], "--tag",
                 "step_00000099", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "no tag step_00000099; these exist: step_" in err, err


def test_new_run_directories_are_never_reused(tmp_path):
    from ponder_pt.config.run_dir import new_run_dir

    made = {new_run_dir("tiny", str(tmp_path)) for _ in range(3)}  # within one second
    assert len(made) == 3 and all(os.path.isdir(p) for p in made)
