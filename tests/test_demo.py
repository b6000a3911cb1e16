"""`make demo` stays true: the embedded end-to-end run, at its quick size."""

import json
import os
import subprocess
import sys


def test_demo_quick_end_to_end(tmp_path):
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "ponder_pt", "demo", "--quick", "--out",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["prepare"]["documents_in"] == summary["prepare"]["documents_written"] + \
        summary["prepare"]["rejected"]
    assert summary["train"]["steps"] == 20
    assert summary["train"]["last_loss"] < summary["train"]["first_loss"]
    assert os.path.getsize(summary["train"]["loss_curve"]) > 1000
    assert os.path.exists(tmp_path / "hf" / "config.json") and summary["export"]["pauses"] == 10
    # the demo compared the export's generation with native generation itself
    assert summary["export"]["matches_native"] and summary["export"]["token_ids"]
    assert "gives the same" in proc.stdout
