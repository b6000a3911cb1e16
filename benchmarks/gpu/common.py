"""Shared by every section: paths, logging, device and model-shape helpers, markdown table
helpers, and running / ending child processes."""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU_VOCAB = 50304  # GPT-NeoX-20B tokenizer, padded

T0 = float(os.environ.get("GPU_SUITE_T0", time.time()))


def log(msg: str) -> None:
    print(f"[gpu_suite +{time.time() - T0:6.1f}s] {msg}", flush=True)


def md_cell(x, fmt="{:.3g}"):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return fmt.format(x)
    return str(x)


def md_table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ============================================================================ helpers


def device_name(smoke: bool) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and not smoke else "cpu"


def sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def cleanup(dev: str) -> None:
    import torch

    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()


def init_process_group(dev: str) -> None:
    from ponder_pt.models import init_single_process

    init_single_process("nccl" if dev == "cuda" else "gloo")


def shape_config(shape: str, seq: int):
    from ponder_pt.config.presets import MODEL_PRESETS
    from ponder_pt.config.schema import ModelConfig

    if shape == "toy":
        return ModelConfig(arch="gpt_neox", num_layers=2, hidden_size=64, num_heads=4,
                           vocab_size=512, max_seq_len=seq)
    fields = dict(MODEL_PRESETS[shape], vocab_size=GPU_VOCAB)
    return ModelConfig(preset=shape, **fields)


def has_vocab_chunk() -> bool:
    from ponder_pt.config.schema import ModelConfig

    return "vocab_chunk" in {f.name for f in dataclasses.fields(ModelConfig)}


def peak_for(dev: str):
    import torch

    from ponder_pt.engine.flops import peak_tflops

    if dev != "cuda":
        return None, "cpu: no MFU"
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name)
    if peak is None:
        return 989.0, f"{name!r} not in ponder_pt.engine.flops.PEAK_TFLOPS: assumed 989"
    return peak, "ponder_pt.engine.flops.PEAK_TFLOPS"


# ============================================================================ subprocesses


def run_logged(cmd, log_path, timeout, env, show=()) -> int:
    """Run cmd with output to log_path, echoing lines that contain any of `show`; kill the
    child's process group at the timeout (returns 124)."""
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
    pos, end = 0, time.time() + timeout

    def echo():
        nonlocal pos
        with open(log_path, errors="replace") as fh:
            fh.seek(pos)
            chunk = fh.read()
        cut = chunk.rfind("\n") + 1
        pos += len(chunk[:cut].encode("utf-8", errors="replace"))
        for line in chunk[:cut].splitlines():
            if any(s in line for s in show):
                print(f"    | {line[:200]}", flush=True)

    started = time.time()
    while proc.poll() is None:
        if time.time() > end:
            kill_group(proc)
            echo()
            # a JIT build killed mid-way leaves <op>/lock behind, and every later build of
            # that op would wait on it forever: remove the locks our killed child created
            from ponder_pt.engine.ext_locks import drop_stale_locks

            drop_stale_locks(started, log=log)
            return 124
        time.sleep(0.5)
        echo()
    echo()
    return proc.returncode


def kill_group(proc) -> None:
    """End a child we started (and its own children) by its process-group id."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
