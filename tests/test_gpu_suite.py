"""benchmarks/gpu_suite.py --smoke: every section of the GPU suite runs its real code path at
toy shapes on CPU (so the one-shot GPU run does not die of a typo), and writes a complete,
finite gpu_results.json / .md."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _numbers(x, path=""):
    """(path, value) for every number and every NaN/inf string (JSON has no NaN) in x."""
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, str) and x.lower() in ("nan", "inf", "-inf"):
        yield path, float(x)
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "gpu_suite.py"), "--smoke",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((out / "gpu_results.json").read_text())
    md = (out / "gpu_results.md").read_text()
    log = proc.stdout[-6000:]

    assert res["smoke"] is True and res["finished"]
    env_ = res["env"]
    for key in ("torch", "transformers", "deepspeed", "megatron_core", "python", "device",
                "peak_tflops", "vocab_chunk_available"):
        assert key in env_, key
    assert env_["device"] == "cpu"

    secs = res["sections"]
    assert set(secs) >= {"sdpa", "train", "generate", "gen", "throughput-toy"}, list(secs)
    for name, part in secs.items():
        assert part["status"] == "done", (name, part["status"], log)
        assert part["entries"], name
        for e in part["entries"]:
            assert e["status"] != "error", (name, e.get("name"), e.get("error"),
                                            e.get("traceback"))
            # a failed check is only tolerated for generation equality (test_export owns it)
            assert e["status"] != "fail" or name == "generate", (name, e)
    for where, value in _numbers(res):
        assert math.isfinite(value), where

    sdpa = {e["case"]: e for e in secs["sdpa"]["entries"]}
    assert set(sdpa) == {"train", "prefill_mask", "decode", "bare_hd256"}
    assert all(e["backend"].startswith("cpu (") for e in sdpa.values())

    train = secs["train"]["entries"][-1]
    assert train["status"] == "ok" and train["loss_falling"] and train["loss_finite"]
    assert train["steps"] == 6 and train["tokens_per_s"] > 0
    assert os.path.exists(os.path.join(train["checkpoint_dir"], "latest"))

    gen = secs["generate"]["entries"]
    assert len(gen) == 4 and all(isinstance(e.get("equal"), bool) for e in gen[1:])
    assert all(e["n_tokens"] == 16 for e in gen[1:])

    speed = {e["case"]: e for e in secs["gen"]["entries"]}
    assert secs["gen"]["K"] == 3 and secs["gen"]["new_tokens"] == 32
    for case in ("build", "k3_cached", "k0_cached", "ratio"):
        assert speed[case]["status"] == "ok", (case, speed[case])
    assert speed["k3_cached"]["n_tokens"] == speed["k0_cached"]["n_tokens"] == 32
    assert speed["k3_cached"]["ms_per_token"] > 0 and speed["ratio"]["ratio"] > 0
    for case in ("recompute", "hf_generate"):  # ok, or skipped if the busy CPU ran late
        assert speed[case]["status"] in ("ok", "skipped"), (case, speed[case])
    if speed["recompute"]["status"] == "ok":  # fp math on CPU: same greedy tokens
        assert speed["recompute"]["n_tokens"] == 16
    thr = {(e["impl"], e["K"], e["ckpt"], e["chunked"]): e for e in res["throughput"]}
    want = [("hf", 0, c, False) for c in ("none", "full")] + [
        ("ours", K, c, False) for K in range(4) for c in ("none", "full")]
    for key in want:
        e = thr[key]
        assert e["status"] == "ok", (key, e)
        assert e["tokens_per_s"] > 0 and e["tflops"] > 0 and e["micro_batch"] == 2
        assert e["mfu"] is None and e["peak_gib"] is None  # CPU: no peak, no CUDA memory
    assert thr[("hf", 0, "none", False)]["oom_tried"] == [4]  # the injected OOM halved it
    chunk = thr[("ours", 3, "none", True)]
    assert chunk["status"] == ("ok" if env_["vocab_chunk_available"] else "skipped")
    for heading in ("## Environment", "## SDPA kernels", "## Training through the real trainer",
                    "## Generation", "## Generation speed", "## Training throughput"):
        assert heading in md
