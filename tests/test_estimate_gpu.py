"""The memory estimate (ponder_pt/engine/estimate.py) against peaks measured on real GPUs.

`benchmarks/gpu_suite.py`'s throughput section records `peak_gib`
(torch.cuda.max_memory_allocated) for each shape / K / checkpointing / vocab-chunk setting,
trained with bf16 parameters and torch.optim.AdamW(fused=True): 2 B params + 2 B grads +
4 B for the two bf16 moments = 8 B per parameter, no fp32 master, no parallelism. Every peak
of our model in every committed results file is checked: the estimate of such a run (model
states + activations + backward transient) of the code that measured it must lie within
LOW..HIGH of the peak (the README states these bounds). HF entries are not our model, and
compiled entries keep what Inductor decides, which the estimate does not model. A results
file that cannot be read fails.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.gpu.common import shape_config  # noqa: E402
from benchmarks.gpu.throughput import VOCAB_CHUNK, estimated_peak  # noqa: E402

GiB = 2**30
LOW, HIGH = -0.02, 0.11  # (estimate - peak) / peak
# Runs started before this time measured the unchunked loss and feedback as they were: the
# loss kept megatron's fp32 softmax (4 B per logit, now the bf16 logits: 2 B) and a pondering
# pass fp32 probabilities plus their bf16 cast (6 B, now 2 B). The vocab-chunked ones did not
# change.
BF16_LOSS_SINCE = datetime.datetime(2026, 11, 26, 19, 0, tzinfo=datetime.timezone.utc)
RESULTS = sorted(glob.glob(os.path.join(REPO, "benchmarks", "results", "*",
                                        "gpu_results.json")))


def read_results(path: str) -> tuple[dict | None, str | None]:
    """(results, None), or (None, what is wrong with the file)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
        if not isinstance(data, dict):
            return None, "not a JSON object"
        data["started_at"] = datetime.datetime.strptime(data["started"], "%Y-%m-%dT%H:%M:%S%z")
        if not isinstance(data.get("throughput", []), list):
            return None, "throughput is not a list"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return data, None


def measured_entries() -> list:
    """(id, results file, entry, measured before the bf16 loss) for every ok entry of our
    model with a measured peak."""
    out = []
    for path in RESULTS:
        data, _ = read_results(path)
        if data is None or data.get("smoke"):
            continue
        for e in data.get("throughput", []):
            # the estimate models eager autograd; compiled graphs keep what Inductor chooses
            if (e.get("status") != "ok" or e.get("impl") != "ours" or not e.get("peak_gib")
                    or e.get("compiled")):
                continue
            run = os.path.basename(os.path.dirname(path))
            older = data["started_at"] < BF16_LOSS_SINCE and not e.get("chunked")
            out.append(pytest.param(path, e, older, id=f"{run}: {e['name']}"))
    return out


def estimate_gib(e: dict, older: bool = False) -> float:
    """The estimate of the run. older: of the code before the bf16 loss and feedback, whose
    paths the estimate still models where today's code takes them: fp16 (2-byte activations,
    megatron's fp32-softmax loss) and top-k feedback (fp32 probabilities and their cast)."""
    m = shape_config(e["shape"], e["seq"])
    m.activation_checkpointing = e["ckpt"]
    if e.get("chunked"):
        m.vocab_chunk = e.get("vocab_chunk") or VOCAB_CHUNK["gpu"]
    if older:
        return estimated_peak(m, e["K"], e["micro_batch"], e["seq"], precision="fp16",
                              top_k=1 if e["K"] else 0) / GiB
    return estimated_peak(m, e["K"], e["micro_batch"], e["seq"]) / GiB


ENTRIES = measured_entries()


def test_every_results_file_reads():
    assert RESULTS, "no benchmarks/results/*/gpu_results.json"
    bad = {os.path.relpath(p, REPO): why for p in RESULTS for why in [read_results(p)[1]] if why}
    assert not bad, bad
    assert ENTRIES, "no measured peak of our model in the results files"


@pytest.mark.parametrize("path,entry,older", ENTRIES)
def test_estimate_within_bounds_of_gpu_peak(path, entry, older):
    est, peak = estimate_gib(entry, older), entry["peak_gib"]
    assert LOW <= (est - peak) / peak <= HIGH, (
        f"{entry['name']} micro-batch {entry['micro_batch']}: estimate {est:.2f} GiB, "
        f"measured {peak:.2f} GiB ({os.path.relpath(path, REPO)}"
        f"{', code before the bf16 loss' if older else ''})")


def test_malformed_results_file_is_reported(tmp_path):
    bad = tmp_path / "gpu_results.json"
    for text, why in (('{"started": "2026-11-26T10:00:00+0000", "throughput": [', "JSONDecode"),
                      ('{"throughput": []}', "KeyError"), ("[1, 2]", "not a JSON object"),
                      ('{"started": "yesterday"}', "ValueError")):
        bad.write_text(text)
        data, err = read_results(str(bad))
        assert data is None and why in err, (text, err)
    bad.write_text('{"started": "2026-11-26T10:00:00+0000", "throughput": []}')
    assert read_results(str(bad))[1] is None
