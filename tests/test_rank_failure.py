"""A failing rank says why in one line: workers run under torch elastic's @record, and
`ponder-pt train --nproc N` ends with `rank R failed: Type: message`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from train_utils import train_cmd

from ponder_pt.engine.failures import first_failure, one_line, with_log_dir

# imported by every Python process of the run (PYTHONPATH); only rank 1 of the workers fails
# (torchrun's RANK, or srun's SLURM_PROCID),
# inside the trainer's entry point (D.init), like an error only that rank can hit
PLANT = '''
import os
if os.environ.get("RANK", os.environ.get("SLURM_PROCID")) == "1" and \
        os.environ.get("PLANTED_FAILURE"):
    import ponder_pt.engine.distributed as D

    def init(*args, **kwargs):
        raise RuntimeError(os.environ["PLANTED_FAILURE"])

    D.init = init
'''
MESSAGE = "planted failure: rank 1 cannot read its data shard"


def planted_env(env: dict, tmp_path) -> dict:
    """`env` with the planted rank-1 failure on PYTHONPATH."""
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(PLANT)
    return dict(env, PLANTED_FAILURE=MESSAGE,
                PYTHONPATH=os.pathsep.join([str(plant), env.get("PYTHONPATH", "")]))


def test_failing_rank_ends_the_launcher_output(prepared, bpe_dir, tmp_path):
    env = planted_env(dict(os.environ, OMP_NUM_THREADS="1"), tmp_path)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(train_cmd(str(tmp_path / "run"), prepared, bpe_dir, nproc=2), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines[-1] == f"ponder-pt train: rank 1 failed: RuntimeError: {MESSAGE}", lines[-12:]
    # torchrun's own summary carries the rank and the message, not "To enable traceback"
    summary = proc.stderr[proc.stderr.rfind("Root Cause"):]
    assert "rank      : 1" in summary and f"RuntimeError: {MESSAGE}" in summary, summary
    assert "To enable traceback" not in summary
    # the rank's own output ends its traceback with the same one line
    assert f"ponder-pt train: rank 1 failed: RuntimeError: {MESSAGE}" in proc.stderr[
        :proc.stderr.rfind("Root Cause")]


def test_first_failure_reads_torchrun_error_files(tmp_path):
    def error(rank, message, stamp):
        d = tmp_path / "run_x" / "attempt_0" / str(rank)
        d.mkdir(parents=True)
        (d / "error.json").write_text(json.dumps({"message": {
            "message": message, "extraInfo": {"py_callstack": "...", "timestamp": str(stamp)}}}))

    assert first_failure(str(tmp_path)) is None
    error(3, "ValueError: late", 200)
    error(2, "ConfigError: invalid configuration:\n  - model.x: bad", 100)
    assert first_failure(str(tmp_path)) == ("rank 2 failed: ConfigError: invalid configuration: "
                                            "model.x: bad (first of 2 failing ranks)")
    assert one_line("a\n  - b\n\n c") == "a b c"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "-m", "x"]
    assert with_log_dir(cmd, "/l")[3] == "--log-dir=/l"
