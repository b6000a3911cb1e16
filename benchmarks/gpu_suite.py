"""GPU suite: correctness on CUDA and training throughput, in one command with a time budget.

    python benchmarks/gpu_suite.py --out gpu_out            # on the GPU machine (<= 9 min)
    python benchmarks/gpu_suite.py --out gpu_out --sections gen --budget 110  # generation speed
    python benchmarks/gpu_suite.py --out tmp --smoke        # same code paths, toy shapes, CPU

Writes OUT/gpu_results.json and OUT/gpu_results.md, rewritten after every measurement (a run
cut short still leaves its data). Sections, each in its own child process with its own
deadline (a crash, a hang or a CUDA error stops that section only; the parent kills a child
that overruns, by its process id, and goes on):

* env          GPU name, torch / CUDA / transformers / deepspeed / megatron-core versions,
               the peak TFLOP/s used for MFU (ponder_pt.engine.flops.PEAK_TFLOPS by GPU name).
* sdpa         which SDPA kernel really runs: torch.profiler over one training forward +
               backward of our model (is_causal path), a KV-cache prefill (boolean-mask path),
               and a bare SDPA call at Pythia-1B's head_dim 256; then ms per one-token call
               over keys growing by one (eager decoding) with SDPA's default kernels vs
               ponder_pt.sdpa_backends.varying_shapes (no cuDNN: no plan per shape).
* train        the real trainer (`python -m ponder_pt.train`, one process, DeepSpeed ZeRO-1,
               bf16) on a locally generated corpus (stdlib docstrings -> BPE -> .bin/.idx):
               a pythia-14m-shaped PonderPythia (K=3, pause.rate 0.1); loss finite and
               falling, tokens/s and MFU from metrics.jsonl. The optimizer is torch's fused
               AdamW (`train.optimizer=torch`; DeepSpeed's FusedAdam would JIT-compile).
* generate     export to HF; greedy `generate()` (KV caches) vs a cache-free loop (full
               forward per token), and the native checkpoint's cached generation vs its own
               cache-free loop.
* gen          generation speed, batch 1, greedy, bf16 random Pythia-160M (then 410M and 1B
               while time allows) with K=3: ponder_pt's decoding (generate_cached: K+1
               preallocated KV caches, the one-token step replayed from a CUDA graph) at
               --gen-tokens new tokens (512; 1024 wants --sections gen --budget 240) vs plain
               K=0 cached decoding of the same model (steady-state ratio K=3 / (K+1 x K=0),
               goal <= 1.1, beside the floor reading the weights sets: weight_read_ratio),
               vs the same decoding without the graph (64 tokens), vs recomputing the whole
               prefix per token (the reference loop; 256 tokens, continued if time allows,
               else a labelled extrapolation), and the HF export's generate() (these two at
               the first shape only, under varying_shapes). ms/token, tokens/s.
* profile      where a training step's time goes, at one shape (Pythia-1B, seq 2048; toy on
               --smoke): torch.profiler (CUDA kernels; CPU ops on --smoke) over two
               forward + backward + fused AdamW steps after warm-up, for HF
               GPTNeoXForCausalLM and our model K=0 at the same micro-batch, then ours K=3 if
               time allows: device time per step by kernel category (gemm, attention, norm,
               elementwise, softmax + cross-entropy, optimizer, communication, other), the top
               15 kernels, and the gap between summed kernel time and the wall step time.
* trainer      (only with --sections trainer) the real trainer at Pythia-1B, seq 2048 (toy
               on --smoke): `python -m ponder_pt.train` (DeepSpeed ZeRO-1, bf16 with fp32
               master weights) at K=0, then K=3 if time allows, at the largest micro-batch
               its `--dry-run` memory estimate admits, next to the bare model step of the
               throughput section at the same micro-batch: tokens/s of both and their ratio
               (framework overhead), and the trainer's allocator peak against the estimate.
* throughput-* per Pythia shape (160M, 410M, 1B; seq 2048): our PonderLM at TP=1 (K = 0..3,
               activation checkpointing none / full) and HF GPTNeoXForCausalLM (sdpa) at the
               same shape and micro-batch: forward + backward + torch.optim.AdamW(fused=True)
               step, both with bf16 parameters (no fp32 master, no autocast). Tokens/s,
               TFLOP/s and MFU (Megatron-convention FLOPs, all K+1 passes), peak memory. The
               micro-batch is the largest power of two (<= 32) that the framework's memory
               estimate admits, halved on CUDA OOM. At 1B, last: ours K=0 and K=3 with
               torch.compile'd blocks (train.compile). Work is ordered by priority and skipped
               (recorded as skipped) when the section's remaining time would not cover it.

Entry statuses: ok, fail (a check ran and did not hold), skipped (with a reason), error (an
exception, with its traceback).

The sections live in benchmarks/gpu/ (one module each, plus common / results / env); this file
is the driver: it runs every section in a child process (this same script with --section).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
import traceback
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
warnings.filterwarnings("ignore")

from benchmarks.gpu.common import T0, kill_group, log  # noqa: E402
from benchmarks.gpu.env import collect_env  # noqa: E402
from benchmarks.gpu.gen import section_gen  # noqa: E402
from benchmarks.gpu.generate import section_generate  # noqa: E402
from benchmarks.gpu.profiling import section_profile  # noqa: E402
from benchmarks.gpu.report import write_results  # noqa: E402
from benchmarks.gpu.results import Part, atomic_write, json_safe, load_parts  # noqa: E402
from benchmarks.gpu.sdpa import section_sdpa  # noqa: E402
from benchmarks.gpu.throughput import section_throughput  # noqa: E402
from benchmarks.gpu.train import section_train  # noqa: E402
from benchmarks.gpu.trainer_scale import section_trainer  # noqa: E402
from ponder_pt.launch_env import job_python  # noqa: E402

SHAPES = ["pythia-160m", "pythia-410m", "pythia-1b"]
SHAPE_WEIGHT = {"pythia-160m": 1.0, "pythia-410m": 1.0, "pythia-1b": 1.4, "toy": 1.0}
SMOKE_SHAPES = ["toy"]

# seconds per section (parent deadlines); throughput gets everything that is left. A section
# that ends early leaves its time to the later ones, so these are caps, not reservations.
BUDGET = {"gpu": {"total": 480, "sdpa": 35, "train": 75, "generate": 40, "gen": 120,
                  "profile": 45, "trainer": 150},
          "smoke": {"total": 330, "sdpa": 40, "train": 170, "generate": 40, "gen": 60,
                    "profile": 45, "trainer": 120}}
# smoke: the train budget covers DeepSpeed's first JIT build of its CPU comm op (~1.5 min on
# 2 busy cores; cached in TORCH_EXTENSIONS_DIR afterwards, then the whole smoke takes ~1.5 min)


# ============================================================================ driver

SECTIONS = {"sdpa": section_sdpa, "train": section_train, "generate": section_generate,
            "gen": section_gen, "profile": section_profile, "throughput": section_throughput,
            "trainer": section_trainer}
ORDER = {"env": 0, "sdpa": 1, "train": 2, "generate": 3, "gen": 3.5, "profile": 3.7,
         "trainer": 3.8, "throughput": 4}
# sections with their own budget
FIXED = ("sdpa", "train", "generate", "gen", "profile", "trainer")
OPT_IN = ("trainer",)  # run only when --sections names them


def child_main(args) -> int:
    name = args.section if args.section != "throughput" else f"throughput-{args.shape}"
    order = ORDER[args.section]
    if args.section == "throughput":
        known = SHAPES + SMOKE_SHAPES
        order += (known.index(args.shape) if args.shape in known else 9) / 10
    part = Part(args.out, name, order, on_save=write_results, deadline=args.deadline)
    try:
        SECTIONS[args.section](args, part)
    except Exception as exc:  # noqa: BLE001
        part.add({"name": f"{name} (section)", "status": "error",
                  "error": f"{type(exc).__name__}: {exc}"[:3000],
                  "traceback": traceback.format_exc()[-4000:]})
        log(f"{name}: section error {type(exc).__name__}: {exc}")
    part.finish()
    try:  # megatron / torch.distributed: leave cleanly (gloo may abort at exit otherwise)
        import torch.distributed as dist

        if dist.is_initialized():
            from megatron.core import parallel_state as ps

            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001  (the results are written; teardown at exit only)
        pass
    return 0


def run_child(args, section: str, budget: float, shape: str = None) -> None:
    deadline = time.time() + budget
    cmd = [*job_python(), os.path.abspath(__file__), "--out", args.out, "--section",
           section, "--deadline", str(deadline)]
    if shape:
        cmd += ["--shape", shape]
    if args.smoke:
        cmd.append("--smoke")
    cmd += ["--plan", args.plan, "--gen-tokens", str(args.gen_tokens)]
    name = section if section != "throughput" else f"throughput-{shape}"
    log(f"== {name}: budget {budget:.0f}s")
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        code = proc.wait(timeout=budget + 15)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        code = "timeout"
    parts = load_parts(args.out)
    part = parts.get(name)
    if part is None or part.get("status") == "running" or code != 0:
        part = part or {"name": name, "order": ORDER[section], "entries": [],
                        "started": deadline - budget}
        why = ("killed at its deadline" if code == "timeout"
               else f"child exited with code {code}")
        if part.get("status") == "running" or part["entries"] == [] or code != 0:
            part["entries"].append({"name": f"{name} (section)", "status": "error",
                                    "error": why})
        part["status"] = "timeout" if code == "timeout" else "crashed"
        part["wall_s"] = round(time.time() - part["started"], 1)
        atomic_write(os.path.join(args.out, "parts", f"{name}.json"),
                     json.dumps(json_safe(part), indent=1))
        log(f"{name}: {why}")
    write_results(args.out)


def parent_main(args) -> int:
    os.environ["GPU_SUITE_T0"] = str(T0)
    if args.smoke:  # CPU everywhere, the DeepSpeed training child included
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.makedirs(args.out, exist_ok=True)
    for old in glob.glob(os.path.join(args.out, "parts", "*.json")):
        os.remove(old)
    # DeepSpeed JIT-builds a small C++ op on CPU (cached here; the Makefile uses the same dir)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    kind = "smoke" if args.smoke else "gpu"
    budget = dict(BUDGET[kind])
    wanted = (args.sections.split(",") if args.sections
              else [s for s in SECTIONS if s not in OPT_IN])
    if args.budget:
        # scale the chosen sections' budgets to --budget (throughput takes what is left;
        # without it, the fixed sections share the whole budget, 10 s kept for the env)
        base = (budget["total"] if "throughput" in wanted
                else sum(budget[s] for s in FIXED if s in wanted) + 10)
        scale = args.budget / base
        budget = {k: v * scale for k, v in budget.items()}
        budget["total"] = args.budget
    end = T0 + budget["total"]
    meta = Part(args.out, "meta", -1, on_save=write_results, smoke=args.smoke, argv=sys.argv,
                budget_s=budget["total"])
    meta.update(started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    env_part = Part(args.out, "env", 0, on_save=write_results)
    try:
        env = collect_env(args.smoke)
        env_part.update(env=env)
        log("env: " + json.dumps(env))
        if env["device"] != "cuda" and not args.smoke:
            log("warning: no CUDA device; running the full-size suite on CPU will mostly skip")
    except Exception as exc:  # noqa: BLE001
        env_part.add({"name": "env", "status": "error", "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-3000:]})
    env_part.finish()
    for section in FIXED:
        if section in wanted:
            run_child(args, section, max(5.0, min(budget[section], end - time.time() - 20)))
    if "throughput" in wanted:
        shapes = SMOKE_SHAPES if args.smoke else (args.shapes.split(",") if args.shapes
                                                  else SHAPES)
        for i, shape in enumerate(shapes):
            left = end - time.time()
            share = left * SHAPE_WEIGHT.get(shape, 1.0) / sum(
                SHAPE_WEIGHT.get(s, 1.0) for s in shapes[i:])
            if share < 8:
                Part(args.out, f"throughput-{shape}", ORDER["throughput"] + i / 10,
                     on_save=write_results, shape=shape).add({"name": f"throughput-{shape}", "status": "skipped",
                                       "shape": shape, "reason": "time budget exhausted"})
                continue
            run_child(args, "throughput", share, shape)
    meta.update(finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), wall_s=round(time.time() - T0, 1))
    meta.finish()
    res = write_results(args.out)
    log(f"done in {time.time() - T0:.0f}s: {res['status_counts']}; "
        f"{os.path.join(args.out, 'gpu_results.json')}, {os.path.join(args.out, 'gpu_results.md')}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (gpu_results.json / .md)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, toy shapes, same code paths (< 2-3 min on 2 cores)")
    ap.add_argument("--budget", type=float, default=None,
                    help="total seconds (default 480 on GPU, 330 for --smoke); the chosen "
                         "sections' budgets scale to it")
    ap.add_argument("--sections", default=None,
                    help="comma list of sdpa,train,generate,gen,profile,throughput,trainer "
                         "(default: all but trainer)")
    ap.add_argument("--shapes", default=None, help="throughput shapes (default: "
                    + ",".join(SHAPES) + ")")
    ap.add_argument("--plan", default="all", choices=["all", "vocab-chunk"],
                    help="throughput entries: all (HF, ours K=0..3, chunked K=3), or "
                         "vocab-chunk (ours K=3 / K=0 with and without model.vocab_chunk, "
                         "same micro-batch)")
    ap.add_argument("--gen-tokens", type=int, default=512,
                    help="new tokens per generation run in the gen section (1024 needs "
                         "--sections gen --budget 240 or more on an H100/H200)")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out = os.path.abspath(args.out)
    bad = [x for x in (args.shapes or "").split(",") if x and x not in SHAPES]
    bad += [x for x in (args.sections or "").split(",") if x and x not in SECTIONS]
    if bad:
        ap.error(f"unknown section/shape {bad}; sections {list(SECTIONS)}, shapes {SHAPES}")
    if args.section:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
