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
               and a bare SDPA call at Pythia-1B's head_dim 256.
* train        the real trainer (`python -m ponder_pt.train`, one process, DeepSpeed ZeRO-1,
               bf16) on a locally generated corpus (stdlib docstrings -> BPE -> .bin/.idx):
               a pythia-14m-shaped PonderPythia (K=3, pause.rate 0.1); loss finite and
               falling, tokens/s and MFU from metrics.jsonl. The optimizer is torch's fused
               AdamW (`train.optimizer=torch`; DeepSpeed's FusedAdam would JIT-compile).
* generate     export to HF; greedy `generate()` (KV caches) vs a cache-free loop (full
               forward per token), and the native checkpoint's cached generation vs its own
               cache-free loop.
* gen          generation speed, batch 1, greedy, bf16 random Pythia-160M (then 410M if
               time allows) with K=3: ponder_pt's K+1-KV-cache decoding (generate_cached)
               at --gen-tokens new tokens (512; 1024 wants --sections gen --budget 240)
               vs plain K=0 cached decoding of the same model (ratio K=3 / (K+1 x K=0),
               goal <= 1.1), vs recomputing the whole prefix per token (the reference loop;
               256 tokens, continued if time allows, else a labelled extrapolation), and the
               HF export's generate(). ms/token, tokens/s.
* throughput-* per Pythia shape (160M, 410M, 1B; seq 2048): our PonderLM at TP=1 (K = 0..3,
               activation checkpointing none / full) and HF GPTNeoXForCausalLM (sdpa) at the
               same shape and micro-batch: forward + backward + torch.optim.AdamW(fused=True)
               step, both with bf16 parameters (no fp32 master, no autocast). Tokens/s,
               TFLOP/s and MFU (Megatron-convention FLOPs, all K+1 passes), peak memory. The
               micro-batch is the largest power of two a memory estimate admits (<= 32),
               halved on CUDA OOM. Work is ordered by priority and skipped (recorded as
               skipped) when the section's remaining time would not cover it.

Entry statuses: ok, fail (a check ran and did not hold), skipped (with a reason), error (an
exception, with its traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import glob
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
warnings.filterwarnings("ignore")

SHAPES = ["pythia-160m", "pythia-410m", "pythia-1b"]
SHAPE_WEIGHT = {"pythia-160m": 1.0, "pythia-410m": 1.0, "pythia-1b": 1.4, "toy": 1.0}
SMOKE_SHAPES = ["toy"]
GPU_VOCAB = 50304  # GPT-NeoX-20B tokenizer, padded
VOCAB_CHUNK = {"gpu": 8192, "smoke": 128}  # rows per chunk for the (future) model.vocab_chunk

# seconds per section (parent deadlines); throughput gets everything that is left
BUDGET = {"gpu": {"total": 480, "sdpa": 40, "train": 100, "generate": 40, "gen": 120},
          "smoke": {"total": 330, "sdpa": 40, "train": 170, "generate": 40, "gen": 30}}
# smoke: the train budget covers DeepSpeed's first JIT build of its CPU comm op (~1.5 min on
# 2 busy cores; cached in TORCH_EXTENSIONS_DIR afterwards, then the whole smoke takes ~1.5 min)

_T0 = float(os.environ.get("GPU_SUITE_T0", time.time()))


def log(msg: str) -> None:
    print(f"[gpu_suite +{time.time() - _T0:6.1f}s] {msg}", flush=True)


# ============================================================================ results store


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _clean(x):
    """JSON-safe: NaN/inf become strings (so a reader can still see them)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


class Part:
    """One section's results, in OUT/parts/NAME.json; every change rewrites the merged
    OUT/gpu_results.json and .md."""

    def __init__(self, out: str, name: str, order: int, **fields):
        self.out, self.path = out, os.path.join(out, "parts", f"{name}.json")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.data = {"name": name, "order": order, "status": "running",
                     "started": time.time(), "entries": [], **fields}
        self.save()

    def add(self, entry: dict) -> dict:
        self.data["entries"].append(entry)
        self.save()
        return entry

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.save()

    def finish(self, status: str = "done") -> None:
        self.data.update(status=status, wall_s=round(time.time() - self.data["started"], 1))
        self.save()

    def save(self) -> None:
        _atomic_write(self.path, json.dumps(_clean(self.data), indent=1))
        write_results(self.out)


def load_parts(out: str) -> dict:
    parts = {}
    for path in glob.glob(os.path.join(out, "parts", "*.json")):
        try:
            with open(path, encoding="utf-8") as fh:
                part = json.load(fh)
        except (OSError, json.JSONDecodeError):
            continue
        parts[part["name"]] = part
    return dict(sorted(parts.items(), key=lambda kv: (kv[1].get("order", 99), kv[0])))


def write_results(out: str) -> dict:
    parts = load_parts(out)
    meta = parts.pop("meta", {})
    env = parts.pop("env", {}).get("env", {})
    throughput = [e for name, p in parts.items() if name.startswith("throughput")
                  for e in p.get("entries", [])]
    counts = {}
    for p in parts.values():
        for e in p.get("entries", []):
            counts[e.get("status", "?")] = counts.get(e.get("status", "?"), 0) + 1
    res = {"suite": "ponder-pt benchmarks/gpu_suite.py", "smoke": meta.get("smoke"),
           "argv": meta.get("argv"), "started": meta.get("started_at"),
           "finished": meta.get("finished_at"), "wall_s": meta.get("wall_s"),
           "budget_s": meta.get("budget_s"), "status_counts": counts, "env": env,
           "sections": parts, "throughput": throughput}
    _atomic_write(os.path.join(out, "gpu_results.json"), json.dumps(_clean(res), indent=1))
    _atomic_write(os.path.join(out, "gpu_results.md"), render_md(res))
    return res


def _f(x, fmt="{:.3g}"):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return fmt.format(x)
    return str(x)


def _table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_md(res: dict) -> str:
    env, secs = res.get("env", {}), res.get("sections", {})
    out = ["# ponder-pt GPU suite" + (" (smoke: CPU, toy shapes)" if res.get("smoke") else ""),
           "", f"wall {_f(res.get('wall_s'))} s of a {_f(res.get('budget_s'))} s budget; "
           f"entries by status: {res.get('status_counts')}", "", "## Environment", ""]
    out.append(_table(["key", "value"], [[k, v] for k, v in env.items()]))
    out += ["", "## Sections", ""]
    out.append(_table(["section", "status", "wall s", "entries"],
                      [[n, p.get("status"), p.get("wall_s"), len(p.get("entries", []))]
                       for n, p in secs.items()]))
    sd = secs.get("sdpa", {}).get("entries", [])
    if sd:
        out += ["", "## SDPA kernels (torch.profiler)", ""]
        out.append(_table(["case", "status", "backend", "aten ops", "kernels (first 3)"],
                          [[e["name"], e["status"], e.get("backend"),
                            ", ".join(e.get("aten_ops", [])),
                            "; ".join(k[:60] for k in e.get("kernels", [])[:3])] for e in sd]))
    tr = secs.get("train", {}).get("entries", [])
    if tr:
        out += ["", "## Training through the real trainer (DeepSpeed, one process)", ""]
        out.append(_table(["case", "status", "steps", "loss first-5", "loss last-5", "falling",
                           "tokens/s", "TFLOP/s", "MFU", "optimizer", "s"],
                          [[e["name"], e["status"], e.get("steps"), e.get("loss_first_mean"),
                            e.get("loss_last_mean"), e.get("loss_falling"),
                            e.get("tokens_per_s"), e.get("tflops_per_gpu"), e.get("mfu"),
                            e.get("optimizer"), e.get("seconds")] for e in tr]))
    ge = secs.get("generate", {}).get("entries", [])
    if ge:
        out += ["", "## Generation: KV-cached vs cache-free greedy", ""]
        out.append(_table(["case", "status", "equal", "tokens", "first mismatch", "note"],
                          [[e["name"], e["status"], e.get("equal"), e.get("n_tokens"),
                            e.get("first_mismatch"), e.get("note")] for e in ge]))
    gs = secs.get("gen", {})
    if gs.get("entries"):
        out += ["", f"## Generation speed (batch 1, greedy, bf16, K={gs.get('K')}, prompt "
                    f"{gs.get('prompt_tokens')} tokens, {gs.get('new_tokens')} new tokens)", ""]
        rows = []
        for e in gs["entries"]:
            seg = e.get("ms_per_token_segment") or {}
            last = seg[max(seg, key=int)] if seg else None
            rows.append([e.get("shape"), e.get("case"), e["status"], e.get("n_tokens"),
                         e.get("ms_per_token"), last, e.get("tokens_per_s"),
                         e.get("ratio") or e.get("speedup_cached_vs_recompute")
                         or e.get("hf_over_native"),
                         e.get("extrapolated_ms_per_token"),
                         (e.get("note") or e.get("reason") or e.get("error", ""))[:90]])
        out.append(_table(["shape", "case", "status", "tokens", "ms/token", "ms/token last "
                           "segment", "tokens/s", "ratio*", "extrapolated ms/token**",
                           "note"], rows))
        out += ["", f"*ratio: for `ratio`, K={gs.get('K')} cached ms/token / (K+1 x K=0 "
                    f"cached ms/token), goal <= {gs.get('goal_ratio')}; for `recompute`, "
                    f"recompute ms/token / K={gs.get('K')} cached ms/token over the same "
                    f"tokens; for `hf_generate`, HF ms/token / native ms/token. **only where "
                    f"the recompute loop stopped early: a linear fit, not a measurement."]
    thr = res.get("throughput", [])
    if thr:
        hf = {(e.get("shape"), e.get("ckpt")): e for e in thr
              if e.get("impl") == "hf" and e.get("status") == "ok"}
        out += ["", "## Training throughput (fwd + bwd + fused AdamW, bf16 params)", ""]
        rows = []
        for e in thr:
            ref = hf.get((e.get("shape"), e.get("ckpt")))
            ratio = (e["tokens_per_s"] / ref["tokens_per_s"]
                     if ref and e.get("tokens_per_s") and e.get("status") == "ok" else None)
            rows.append([e.get("shape"), e.get("impl"), e.get("K"), e.get("ckpt"),
                         e.get("chunked"), e.get("micro_batch"), e.get("tokens_per_s"),
                         e.get("step_s"), e.get("tflops"), e.get("mfu"), e.get("peak_gib"),
                         ratio, e["status"] + (f": {e.get('reason') or e.get('error', '')[:80]}"
                                                if e["status"] != "ok" else "")])
        out.append(_table(["shape", "impl", "K", "ckpt", "chunked", "micro-batch", "tokens/s",
                           "step s", "TFLOP/s", "MFU", "peak GiB", "tok/s x HF", "status"], rows))
    errs = [(n, e) for n, p in secs.items() for e in p.get("entries", [])
            if e.get("status") == "error"]
    if errs:
        out += ["", "## Errors", ""]
        for n, e in errs:
            out.append(f"- {n} / {e['name']}: {e.get('error', '')[:300]}")
    return "\n".join(out) + "\n"


def record(part: Part, name: str, fn, **fields) -> dict:
    """Run one measurement; its dict (or the exception) becomes an entry. Never raises."""
    t = time.perf_counter()
    log(f"{part.data['name']}: {name} ...")
    try:
        res = fn() or {}
        entry = {"name": name, **fields, "status": "ok", **res}
    except Exception as exc:  # noqa: BLE001 - every failure becomes an entry
        entry = {"name": name, **fields, "status": "error",
                 "error": f"{type(exc).__name__}: {exc}"[:3000],
                 "traceback": traceback.format_exc()[-4000:]}
    entry["seconds"] = round(time.perf_counter() - t, 2)
    part.add(entry)
    extra = entry.get("error") or entry.get("reason") or ""
    log(f"{part.data['name']}: {name} -> {entry['status']} ({entry['seconds']}s) {extra[:300]}")
    return entry


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


# ============================================================================ env


def collect_env(smoke: bool) -> dict:
    import importlib
    import importlib.metadata as md

    import torch

    def version(dist_name, module):
        try:
            return md.version(dist_name)
        except md.PackageNotFoundError:
            try:
                return getattr(importlib.import_module(module), "__version__", "?")
            except Exception as exc:  # noqa: BLE001
                return f"not importable ({type(exc).__name__})"

    dev = device_name(smoke)
    env = {"python": platform.python_version(), "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "device": dev,
           "transformers": version("transformers", "transformers"),
           "deepspeed": version("deepspeed", "deepspeed"),
           "megatron_core": version("megatron-core", "megatron.core"),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version())
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001
            env["driver"] = None
    peak, src = peak_for(dev)
    env.update(peak_tflops=peak, peak_tflops_source=src)
    try:
        env["vocab_chunk_available"] = has_vocab_chunk()
    except Exception as exc:  # noqa: BLE001
        env["vocab_chunk_available"] = f"error: {exc}"
    return env


# ============================================================================ sdpa


def _profile(fn, dev: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    fn()  # warm-up (lazy init, cuBLAS handles)
    sync(dev)
    with profile(activities=acts) as prof:
        fn()
        sync(dev)
    from torch.autograd import DeviceType

    avgs = prof.key_averages()
    names = {e.key for e in avgs}
    gpu_names = {e.key for e in avgs if getattr(e, "device_type", None) == DeviceType.CUDA}
    aten = sorted(n for n in names if n.startswith("aten::")
                  and ("scaled_dot_product" in n or "attention" in n.lower()))
    pat = ("flash", "fmha", "efficient_attention", "cudnn", "attention", "sdpa", "attn")
    kernels = sorted(n for n in (gpu_names or names - set(aten))
                     if any(p in n.lower() for p in pat))

    def classify(text: str):
        for key, label in (("cudnn", "cudnn"), ("flash", "flash"), ("efficient", "efficient"),
                           ("fmha", "efficient")):
            if key in text:
                return label
        return None

    if dev != "cuda":
        fused = [a for a in aten if "_scaled_dot_product_" in a and "math" not in a]
        backend = "cpu (" + (fused[0].replace("aten::_scaled_dot_product_", "") if fused
                             else "math") + ")"
    else:  # the aten op names which kernel family ran; kernel names are the evidence
        backend = (classify(" ".join(aten).lower()) or classify(" ".join(kernels).lower())
                   or "math")
    return {"backend": backend, "aten_ops": aten, "kernels": [k[:200] for k in kernels[:12]],
            "fused_kernel": backend in ("flash", "efficient", "cudnn")}


def section_sdpa(args, part: Part) -> None:
    import torch

    from ponder_pt.config.schema import PonderConfig
    from ponder_pt.models import PonderLM

    dev = device_name(args.smoke)
    init_process_group(dev)
    shape, seq, batch = ("toy", 64, 2) if args.smoke else ("pythia-160m", 2048, 1)
    cfg = shape_config(shape, seq)
    dtype = torch.bfloat16
    model = PonderLM(cfg, PonderConfig(steps=1), params_dtype=dtype).to(dev)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(dev)
    part.update(shape=shape, seq=seq, batch=batch, dtype="bf16", device=dev,
                sdp_flags=_sdp_flags())

    def strict(res):
        if dev == "cuda" and not res["fused_kernel"]:
            res["status"] = "fail"
            res["note"] = "no flash / efficient / cudnn kernel ran: math fallback"
        return res

    def train_step():
        model.train()
        loss = model(ids, labels=torch.roll(ids, -1, 1), ponder_steps=1)
        loss.backward()
        model.zero_grad(set_to_none=True)

    record(part, f"train fwd+bwd, is_causal ({shape}, K=1, head_dim {cfg.head_dim})",
           lambda: strict(_profile(train_step, dev)), case="train", head_dim=cfg.head_dim)

    def prefill():
        model.eval()
        with torch.no_grad():
            model(ids[:1], caches=model.new_caches(1), ponder_steps=1)

    # informational: a boolean mask excludes flash; efficient/cudnn/math may run
    record(part, f"KV-cache prefill, boolean mask ({shape}, K=1)",
           lambda: _profile(prefill, dev), case="prefill_mask")

    def decode():
        model.eval()
        with torch.no_grad():
            caches = model.new_caches(1)
            model(ids[:1, :-1], caches=caches, ponder_steps=1)
            model(ids[:1, -1:], caches=caches, ponder_steps=1)

    record(part, "KV-cache decode, one token after the prefill", lambda: _profile(decode, dev),
           case="decode")
    del model
    cleanup(dev)

    hd, heads = (64, 2) if args.smoke else (256, 8)  # pythia-1b: 8 heads of 256

    def bare():
        import torch.nn.functional as F

        q, k, v = (torch.randn(batch, heads, seq, hd, device=dev, dtype=dtype,
                               requires_grad=True) for _ in range(3))

        def run():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        return strict(_profile(run, dev))

    record(part, f"bare SDPA fwd+bwd, is_causal, head_dim {hd} (pythia-1b)", bare,
           case="bare_hd256", head_dim=hd)


def _sdp_flags() -> dict:
    import torch

    b = torch.backends.cuda
    out = {}
    for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "cudnn_sdp_enabled",
                 "math_sdp_enabled", "is_flash_attention_available"):
        fn = getattr(b, name, None)
        try:
            out[name] = bool(fn()) if fn else None
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


# ============================================================================ train


def section_train(args, part: Part) -> None:
    work = os.path.join(args.out, "work", "train")
    os.makedirs(work, exist_ok=True)
    paths = {}

    def data():
        from ponder_pt.data.corpus import write_corpus
        from ponder_pt.data.prepare import prepare
        from ponder_pt.tokenizer import load_tokenizer, train_tokenizer

        corpus = os.path.join(work, "corpus.jsonl")
        info = write_corpus(corpus, max_bytes=120_000 if args.smoke else 400_000)
        tok_dir = os.path.join(work, "tokenizer")
        train_tokenizer([corpus], 512 if args.smoke else 1024, tok_dir, show_progress=False)
        prefix = os.path.join(work, "data", "corpus")
        stats = prepare([corpus], tok_dir, prefix, workers=1 if args.smoke else 2,
                        progress=False)
        paths.update(tok=tok_dir, prefix=prefix)
        return {"documents": info["documents"], "characters": info["characters"],
                "tokens": stats.tokens, "vocab": load_tokenizer(tok_dir).vocab_size}

    d = record(part, "corpus -> tokenizer -> data prepare", data)
    if d["status"] != "ok":
        return
    record(part, "PonderPythia K=3 + pause tokens, bf16, DeepSpeed ZeRO-1, 1 process",
           lambda: _train_run(args, work, paths))


def _train_run(args, work: str, paths: dict) -> dict:
    from ponder_pt.engine.metrics import read_metrics

    run_dir = os.path.join(work, "run")
    ckpt = os.path.join(run_dir, "ckpt")
    if os.path.isdir(run_dir):
        import shutil

        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    iters = 6 if args.smoke else 40
    if args.smoke:
        shape = ["model.preset=pythia-tiny", "data.seq_len=64", "train.micro_batch=2",
                 "train.global_batch=4", "train.warmup=1", "log.interval=1"]
    else:
        shape = ["model.preset=pythia-14m", "data.seq_len=512", "train.micro_batch=8",
                 "train.global_batch=16", "train.warmup=4", "log.interval=5"]
    overrides = shape + [
        "ponder.steps=3", "pause.rate=0.1", f"train.iters={iters}", "train.lr=3e-3",
        "train.min_lr=3e-4", "train.precision=bf16", f"train.eval_interval={iters}",
        "train.eval_iters=1", "parallel.zero_stage=1", "train.optimizer=torch",
        f"data.train=[{paths['prefix']}]", f"data.tokenizer={paths['tok']}",
        f"data.cache_dir={os.path.join(work, 'cache')}", "data.num_workers=0",
        f"log.dir={run_dir}", f"checkpoint.dir={ckpt}", f"checkpoint.interval={iters}"]
    # the optimizer DeepSpeed will build, from the same config resolution as the trainer's
    from ponder_pt.config import load_config
    from ponder_pt.engine.ds_config import build_ds_config

    opt_cfg = build_ds_config(load_config("demo", overrides, validate=False), 1)["optimizer"]
    params = opt_cfg.get("params", {})
    optimizer = (f"{opt_cfg.get('type')} torch_adam={params.get('torch_adam', False)} "
                 f"fused={params.get('fused', False)}")
    cmd = [sys.executable, "-m", "ponder_pt.train", "--config", "demo"]
    for item in overrides:
        cmd += ["--set", item]
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    if args.smoke:
        env["OMP_NUM_THREADS"] = "1"
    log_path = os.path.join(run_dir, "train.log")
    timeout = max(10.0, args.deadline - time.time() - 8)
    t = time.perf_counter()
    code = run_logged(cmd, log_path, timeout, env, show=("step ", "error", "Error"))
    wall = time.perf_counter() - t
    with open(log_path, errors="replace") as fh:
        text = fh.read()
    mpath = os.path.join(run_dir, "metrics.jsonl")
    rows = read_metrics(mpath) if os.path.exists(mpath) else []
    steps = [r for r in rows if "loss" in r]
    if code != 0:
        raise RuntimeError(f"trainer exited {code} after {wall:.0f}s ({len(steps)} steps "
                           f"logged); log tail:\n{text[-2500:]}")
    losses = [r["loss"] if isinstance(r["loss"], float) else float(r["loss"]) for r in steps]
    n = max(1, min(5, len(losses) // 2))
    first, last = statistics.mean(losses[:n]), statistics.mean(losses[-n:])
    finite = all(math.isfinite(x) for x in losses)
    timed = steps[min(3, len(steps) - 1):]  # drop the first steps (CUDA / allocator warm-up)

    def med(key):
        vals = [r[key] for r in timed if isinstance(r.get(key), (int, float))]
        return statistics.median(vals) if vals else None

    valid = [r for r in rows if "valid_loss" in r]
    res = {"steps": len(losses), "losses": [round(x, 4) for x in losses],
           "loss_first_mean": first, "loss_last_mean": last, "loss_finite": finite,
           "loss_falling": finite and last < first, "mean_of": n,
           "tokens_per_s": med("tokens_per_s"), "tflops_per_gpu": med("tflops_per_gpu"),
           "mfu": med("mfu"), "step_time_s": med("step_time"),
           "skipped_steps": steps[-1].get("skipped_steps") if steps else None,
           "valid_loss": valid[-1]["valid_loss"] if valid else None,
           "optimizer": optimizer, "ds_optimizer_config": opt_cfg,
           "checkpoint_dir": ckpt, "run_wall_s": round(wall, 1),
           "overrides": overrides}
    if not (finite and last < first):
        res["status"] = "fail"
        res["note"] = "loss not finite" if not finite else "loss did not fall"
    return res


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
            drop_stale_locks(started)
            return 124
        time.sleep(0.5)
        echo()
    echo()
    return proc.returncode


def drop_stale_locks(since: float) -> None:
    """A JIT build killed mid-way leaves TORCH_EXTENSIONS_DIR/<op>/lock behind, and every later
    build of that op waits on it forever: remove the locks our killed child created."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    for lock in glob.glob(os.path.join(root, "**", "lock"), recursive=True) if root else []:
        try:
            if os.path.getmtime(lock) >= since - 1:
                os.remove(lock)
                log(f"removed stale JIT-build lock {lock}")
        except OSError:
            pass


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


# ============================================================================ generate


def section_generate(args, part: Part) -> None:
    import torch

    dev = device_name(args.smoke)
    init_process_group(dev)
    ckpt = os.path.join(args.out, "work", "train", "run", "ckpt")
    hf_dir = os.path.join(args.out, "work", "hf")
    n_new = 8 if args.smoke else 32
    state = {}
    part.update(device=dev, new_tokens=n_new, dtype="fp32")

    def export():
        if not os.path.exists(os.path.join(ckpt, "latest")):
            raise FileNotFoundError(f"no trained checkpoint in {ckpt} (train section failed?)")
        from ponder_pt.export import checkpoint_to_hf

        tag = checkpoint_to_hf(ckpt, hf_dir, progress=False)
        return {"tag": tag, "hf_dir": hf_dir}

    if record(part, "export trained checkpoint to HF", export)["status"] != "ok":
        return

    def prompts(lm):
        from ponder_pt.inference import append_pauses

        texts = ["Return the number of", "The default value is"]
        return [append_pauses(lm.encode(t), lm.default_pauses, lm.pause_id) for t in texts]

    def nocache(lm, ids):
        seq = list(ids)
        for _ in range(n_new):
            z = lm.logits(torch.tensor([seq]))[0, -1].float()
            z[lm.vocab_rows:] = float("-inf")
            seq.append(int(z.argmax()))
        return seq[len(ids):]

    def compare(a, b, note=""):
        """a, b: per prompt token lists; first_mismatch = [prompt, position] or None."""
        mism = None
        for p, (x, y) in enumerate(zip(a, b)):
            i = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)
            if i is None and len(x) != len(y):
                i = min(len(x), len(y))
            if i is not None:
                mism = [p, i]
                break
        res = {"equal": a == b, "n_tokens": sum(len(x) for x in a), "prompts": len(a),
               "first_mismatch": mism, "cached": a,
               "nocache": b, "note": note}
        if a != b:
            res["status"] = "fail"
        return res

    def cached_and_nocache(lm):
        """Greedy tokens of every prompt: the model's cached generate() and the cache-free loop."""
        cached, free = [], []
        for ids in prompts(lm):
            cached.append(lm.generate(ids, n_new, greedy=True, stop_at_eos=False))
            free.append(nocache(lm, ids))
        return cached, free

    def hf_check():
        import transformers

        from ponder_pt.inference.model import HFModel

        lm = HFModel(hf_dir, dev)
        lm.model.generation_config.eos_token_id = None
        state["hf"] = lm
        cached, state["hf_nocache"] = cached_and_nocache(lm)
        return compare(cached, state["hf_nocache"],
                       f"transformers {transformers.__version__}, {type(lm.model).__name__}, "
                       f"{lm.default_pauses} pauses appended, K={lm.ponder_steps}")

    record(part, "HF generate() (KV caches) == cache-free loop", hf_check)

    def native_check():
        from ponder_pt.inference.model import NativeModel

        lm = NativeModel(ckpt, device=dev)
        state["native"] = lm
        cached, state["native_nocache"] = cached_and_nocache(lm)
        return compare(cached, state["native_nocache"],
                       f"native PonderLM, K+1={lm.ponder_steps + 1} caches")

    record(part, "native generate (K+1 KV caches) == cache-free loop", native_check)

    def cross():
        if "hf" not in state or "native" not in state:
            raise RuntimeError("needs both the HF and the native model")
        ids = torch.tensor([prompts(state["native"])[0]])
        a = state["native"].logits(ids).cpu()
        b = state["hf"].logits(ids).cpu()
        v = min(a.shape[-1], b.shape[-1])
        diff = float((a[..., :v] - b[..., :v]).abs().max())
        res = compare(state["native_nocache"], state["hf_nocache"],
                      f"max |logit diff| native vs HF {diff:.2e}")
        res["max_abs_logit_diff"] = diff
        return res

    record(part, "native cache-free == HF cache-free (same weights)", cross)


# ============================================================================ gen (speed)

GEN_K = 3
GEN_PROMPT = 16
GEN_GOAL = 1.1  # K=3 cached per token <= GOAL x (K+1) x plain cached per token
GEN_SHAPES = {"gpu": ["pythia-160m", "pythia-410m"], "smoke": ["toy"]}


def _gen_marks(n: int) -> list:
    """Lengths (new tokens) at which the decoding loops note the clock."""
    return sorted({m for m in (16, 32, 64, 128, 256, 512, 1024, 2048) if m <= n} | {n})


def _gen_timing(times: dict, n: int) -> dict:
    """times: {tokens done: seconds since the start (after a sync)} -> per-token figures."""
    done = max(times)
    total = times[done]
    marks = sorted(times)
    seg = {}
    prev = 0
    for m in marks:
        if m > prev:
            seg[str(m)] = 1e3 * (times[m] - times.get(prev, 0.0)) / (m - prev)
        prev = m
    return {"n_tokens": done, "requested_tokens": n, "total_s": total,
            "ms_per_token": 1e3 * total / done, "tokens_per_s": done / total,
            "ms_per_token_segment": seg,  # mean ms/token over (previous mark, mark]
            "ms_per_token_first": 1e3 * times[marks[0]] / marks[0]}


def section_gen(args, part: Part) -> None:
    """Generation speed: K=3 with K+1 KV caches (ponder_pt.inference.generate_cached, what
    `ponder-pt generate` runs on a checkpoint) vs plain K=0 cached decoding of the same
    model, vs recomputing the whole prefix per token (the reference PonderingLM loop: all K+1
    passes over the prefix for every new token), and the HF export's generate()."""
    import torch

    dev = device_name(args.smoke)
    init_process_group(dev)
    n_new = 32 if args.smoke else args.gen_tokens
    n_rec = 16 if args.smoke else 256  # recompute first to here, extended later if time allows
    shapes = GEN_SHAPES["smoke" if args.smoke else "gpu"]
    part.update(device=dev, K=GEN_K, new_tokens=n_new, prompt_tokens=GEN_PROMPT, batch=1,
                dtype="bf16", decoding="greedy, no EOS stop", goal_ratio=GEN_GOAL,
                shapes=shapes)
    prev = None
    for i, shape in enumerate(shapes):
        left = args.deadline - time.time()
        if i > 0 and left < 25:
            part.add({"name": f"{shape} (all)", "shape": shape, "status": "skipped",
                      "reason": f"time budget: {left:.0f}s left"})
            log(f"gen: {shape} -> skipped ({left:.0f}s left)")
            continue
        n = n_new
        if i > 0 and prev and prev.res.get(f"K{GEN_K}"):
            # a bigger shape: its full length only if ~2.2x the first shape's cached runs fit
            k3 = prev.res[f"K{GEN_K}"]["total_s"] * n_new / prev.res[f"K{GEN_K}"]["n_tokens"]
            if left < 2.2 * 1.3 * k3 + 15:
                n = min(n_new, 256)
        prev = GenBench(args, part, shape, dev, n, min(n_rec, n))
        prev.run()
        prev.model = None
        cleanup(dev)


class _StopGen(Exception):
    """Raised from generate_cached's on_token: the section's time is up."""


class GenBench:
    def __init__(self, args, part, shape, dev, n_new, n_rec):
        self.args, self.part, self.shape, self.dev = args, part, shape, dev
        self.n_new, self.n_rec = n_new, n_rec
        self.model = self.prompt = None
        self.res = {}  # key -> result dict of an ok entry
        self.rec_state = None  # (sequence tensor, times) of the recompute loop, to extend

    def remaining(self) -> float:
        return self.args.deadline - time.time() - 3.0

    def fields(self, case, **kw):
        return {"shape": self.shape, "case": case, **kw}

    def skip(self, name, fields, reason):
        self.part.add({"name": name, **fields, "status": "skipped", "reason": reason})
        log(f"gen: {name} -> skipped ({reason})")

    def build(self) -> dict:
        import torch

        from ponder_pt.config.schema import PonderConfig
        from ponder_pt.models import PonderLM

        t = time.perf_counter()
        cfg = shape_config(self.shape, GEN_PROMPT + self.n_new + 8)
        self.cfg = cfg
        self.model = PonderLM(cfg, PonderConfig(steps=GEN_K), params_dtype=torch.bfloat16,
                              seed=0).to(self.dev).eval()
        gen = torch.Generator().manual_seed(0)
        self.prompt = torch.randint(0, cfg.vocab_size, (GEN_PROMPT,), generator=gen).tolist()
        # warm-up: CUDA context, cuBLAS handles, SDPA kernels of prefill and one-token steps
        for K in (GEN_K, 0):
            self.cached(K, 8)
        self.recompute_loop(torch.tensor([self.prompt], device=self.dev), 2, {}, 0.0, None)
        # one plain decode over the whole length: kernels / plans chosen per KV length (cuDNN
        # SDPA graphs, oneDNN primitives on CPU) are built here, not in whichever timed run
        # comes first (that biased K=3 vs K=0); every pass sees the same KV lengths
        warm, _ = self.cached(0, self.n_new, stop_at=time.time() + 0.15 * self.remaining())
        sync(self.dev)
        from ponder_pt.engine.flops import param_count

        return {"build_s": time.perf_counter() - t, "warmup_tokens": len(warm),
                "layers": cfg.num_layers,
                "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
                "params": param_count(cfg, cfg.vocab_size)["total"]}

    def cached(self, K: int, n: int, stop_at=None) -> tuple:
        """(new tokens, {tokens done: seconds}) of ponder_pt's cached generation, cut short
        at time.time() >= stop_at."""
        from ponder_pt.inference.model import generate_cached

        marks, times, out = set(_gen_marks(n)), {}, []
        sync(self.dev)
        t0 = time.perf_counter()

        def on_token(i, tok):  # _pick's int() has synchronized already
            out.append(tok)
            if i + 1 in marks:
                times[i + 1] = time.perf_counter() - t0
            if stop_at is not None and time.time() >= stop_at:
                raise _StopGen

        try:
            generate_cached(self.model, self.prompt, n, ponder_steps=K, on_token=on_token)
        except _StopGen:
            pass
        sync(self.dev)
        times[len(out)] = time.perf_counter() - t0
        return out, times

    def recompute_loop(self, seq, n, times, t_before, stop_at):
        """The reference loop: every new token is a full forward (all K+1 passes) over the
        whole sequence. Continues `seq`, adding to `times` (offset t_before); stops at n new
        tokens or at time.time() >= stop_at."""
        import torch

        start = seq.shape[1] - GEN_PROMPT
        marks = set(_gen_marks(self.n_new))
        sync(self.dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(start, n):
                z = self.model(seq, gather_logits=True, ponder_steps=GEN_K)[0, -1].float()
                nxt = int(z.argmax())
                seq = torch.cat([seq, torch.tensor([[nxt]], device=seq.device)], 1)
                if i + 1 in marks or i + 1 == n:
                    times[i + 1] = t_before + time.perf_counter() - t0
                if stop_at is not None and time.time() >= stop_at:
                    break
        sync(self.dev)
        done = seq.shape[1] - GEN_PROMPT
        times[done] = t_before + time.perf_counter() - t0
        return seq, times

    # ---- entries
    def e_cached(self, K):
        n = self.n_new
        if K == 0 and f"K{GEN_K}" in self.res:  # the same length as the K=3 run reached
            n = self.res[f"K{GEN_K}"]["n_tokens"]
        # the K=3 run may use at most 45 % of what is left, so that the baselines still fit
        # (on an H200 the first GPU run spent the whole section on K=3 at 73 ms/token)
        share = 0.45 if K == GEN_K else 1.0
        out, times = self.cached(K, n, stop_at=time.time() + share * self.remaining())
        res = _gen_timing(times, n)
        res["tokens_head"] = out[:16]
        self.res[f"K{K}"] = {**res, "tokens": out}
        return res

    def e_ratio(self):
        a, b = self.res.get(f"K{GEN_K}"), self.res.get("K0")
        if not a or not b:
            raise RuntimeError("needs both the K=3 and the K=0 cached entries")
        ratio = a["ms_per_token"] / ((GEN_K + 1) * b["ms_per_token"])
        last = str(max(int(k) for k in a["ms_per_token_segment"]))
        ratio_last = a["ms_per_token_segment"][last] / (
            (GEN_K + 1) * b["ms_per_token_segment"][last])
        res = {"ratio": ratio, "ratio_last_segment": ratio_last, "goal": GEN_GOAL,
               "meets_goal": ratio <= GEN_GOAL, "k3_ms_per_token": a["ms_per_token"],
               "k0_ms_per_token": b["ms_per_token"], "n_tokens": a["n_tokens"],
               "note": f"K={GEN_K} cached ms/token / ({GEN_K + 1} x K=0 cached ms/token)"}
        if not self.args.smoke and ratio > GEN_GOAL:
            res.update(status="fail", note=res["note"] + f": above the {GEN_GOAL} goal")
        return res

    def e_recompute(self, n, extend=False):
        import torch

        if extend:
            seq, times = self.rec_state
            t_before = times[max(times)]
        else:
            seq, times, t_before = torch.tensor([self.prompt], device=self.dev), {}, 0.0
        # the continuation leaves the HF entry its estimated time
        reserve = self.hf_need() if extend and "hf" not in self.res else 0.0
        stop_at = time.time() + max(1.0, self.remaining() - reserve)
        seq, times = self.recompute_loop(seq, n, times, t_before, stop_at)
        self.rec_state = (seq, times)
        res = _gen_timing(times, n)
        res["measured_to"] = res["n_tokens"]
        out = seq[0, GEN_PROMPT:].tolist()
        ref = self.res.get(f"K{GEN_K}", {}).get("tokens")
        if ref:
            m = next((i for i, (u, v) in enumerate(zip(out, ref)) if u != v), None)
            res["same_tokens_as_cached"] = m is None
            res["first_mismatch"] = m  # bf16: cached and full forwards may round apart
        cached = self.res.get(f"K{GEN_K}")
        if cached:
            res["speedup_cached_vs_recompute"] = (res["ms_per_token"]
                                                  / cached_ms_to(cached, res["n_tokens"]))
        if res["n_tokens"] < self.n_new:
            res.update(_extrapolate(times, self.n_new))
        return res

    def e_hf(self):
        import shutil

        import torch
        from transformers import AutoModelForCausalLM

        from ponder_pt.config import Config
        from ponder_pt.export import export_full
        from ponder_pt.export.hf_auto import from_pretrained
        from ponder_pt.models.hf import full_state_dict

        out_dir = os.path.join(self.args.out, "work", f"gen_hf_{self.shape}")
        t = time.perf_counter()
        cfg = Config()
        cfg.model, cfg.ponder.steps = self.cfg, GEN_K
        export_full(cfg, full_state_dict(self.model), out_dir, progress=False)
        hf = from_pretrained(AutoModelForCausalLM, out_dir, False,
                             dtype=torch.bfloat16).to(self.dev).eval()
        shutil.rmtree(out_dir, ignore_errors=True)
        export_s = time.perf_counter() - t
        ids = torch.tensor([self.prompt], device=self.dev)
        hf.generation_config.eos_token_id = None

        def run(n, max_time=None):
            return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                               pad_token_id=0, max_time=max_time)

        run(8)  # warm-up
        sync(self.dev)
        t0 = time.perf_counter()
        out = run(self.n_new, max_time=max(1.0, self.remaining()))  # stops early if late
        sync(self.dev)
        total = time.perf_counter() - t0
        new = out[0, GEN_PROMPT:].tolist()
        n = len(new)
        res = {"n_tokens": n, "total_s": total, "ms_per_token": 1e3 * total / n,
               "tokens_per_s": n / total, "export_and_load_s": export_s,
               "hf_class": type(hf).__name__, "tokens_head": new[:16]}
        import transformers

        res["transformers"] = transformers.__version__
        ref = self.res.get(f"K{GEN_K}")
        if ref:
            m = next((i for i, (u, v) in enumerate(zip(new, ref["tokens"])) if u != v), None)
            res.update(same_tokens_as_native=m is None, first_mismatch=m,
                       hf_over_native=res["ms_per_token"] / ref["ms_per_token"])
        del hf
        cleanup(self.dev)
        self.res["hf"] = res
        return res

    def run(self):
        sh = self.shape
        self.part.update(**{f"build_{sh}": "running"})
        b = record(self.part, f"{sh} build PonderLM K={GEN_K} bf16 + warm-up", self.build,
                   **self.fields("build"))
        self.part.update(**{f"build_{sh}": b.get("build_s")})
        if b["status"] != "ok":
            return
        n = self.n_new
        # (name, case, function, rough seconds needed given what was measured)
        plan = [
            (f"{sh} K={GEN_K} cached (K+1 KV caches), {n} new tokens", "k3_cached",
             lambda: self.e_cached(GEN_K), lambda: 0.0),
            (f"{sh} K=0 cached (plain), {n} new tokens", "k0_cached",
             lambda: self.e_cached(0), lambda: self.est("K3", 1 / (GEN_K + 1))),
            (f"{sh} ratio K={GEN_K} cached / ({GEN_K + 1} x K=0 cached)", "ratio",
             self.e_ratio, lambda: 0.0),
            (f"{sh} recompute prefix (reference), K={GEN_K}, {self.n_rec} new tokens",
             "recompute", lambda: self.e_recompute(self.n_rec),
             lambda: self.est("K3", self.n_rec / n)),
            (f"{sh} recompute prefix continued to {n} new tokens", "recompute_full",
             lambda: self.e_recompute(n, extend=True),
             lambda: self.est("K3", 0.25) + self.hf_need()),
            (f"{sh} HF export generate(), K={GEN_K}, {n} new tokens", "hf_generate",
             self.e_hf, self.hf_need),
        ]
        for name, case, fn, need in plan:
            if case == "recompute_full" and (self.rec_state is None
                                             or max(self.rec_state[1]) >= n):
                continue
            if case == "ratio" and not ("K0" in self.res and f"K{GEN_K}" in self.res):
                self.skip(name, self.fields(case), "needs both cached entries")
                continue
            want = need()
            if self.remaining() < want:
                self.skip(name, self.fields(case), f"time budget: {self.remaining():.0f}s "
                          f"left, ~{want:.0f}s needed")
                continue
            record(self.part, name, fn, **self.fields(case))
        self.model = None

    def hf_need(self) -> float:
        """Rough seconds for the HF entry: export + load, and ~1.3x our K=3 decoding."""
        return self.est(f"K{GEN_K}", 1.3) + (3.0 if self.args.smoke else 12.0)

    def est(self, key, factor) -> float:
        r = self.res.get(key)
        return r["total_s"] * factor if r else 0.0


def cached_ms_to(res: dict, n: int) -> float:
    """Mean ms/token of a cached run over its first n tokens (from its marks)."""
    seg = res["ms_per_token_segment"]
    total, prev = 0.0, 0
    for m in sorted(int(k) for k in seg):
        upto = min(m, n)
        if upto > prev:
            total += seg[str(m)] * (upto - prev)
            prev = upto
        if prev >= n:
            break
    return total / max(prev, 1)


def _extrapolate(times: dict, n: int) -> dict:
    """Recompute stopped before n: least-squares line of per-token ms vs tokens done over the
    measured segments, summed to n. Labelled as an extrapolation."""
    marks = sorted(times)
    xs, ys, prev = [], [], 0
    for m in marks:
        if m > prev:
            xs.append((m + prev) / 2)
            ys.append(1e3 * (times[m] - times.get(prev, 0.0)) / (m - prev))
        prev = m
    if len(xs) < 2:
        a, b = (ys[0] if ys else 0.0), 0.0
    else:
        mx, my = statistics.mean(xs), statistics.mean(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(
            sum((x - mx) ** 2 for x in xs), 1e-9)
        a = my - b * mx
    total_ms = sum(max(a + b * (i + 0.5), 0.0) for i in range(n))
    return {"extrapolated_to": n, "extrapolated_ms_per_token": total_ms / n,
            "extrapolated_note": "linear fit of measured per-token ms vs prefix length, "
                                 "NOT measured"}


# ============================================================================ throughput


def _mb_estimate(cfg, seq: int, K: int, ckpt: str, mem_bytes: float, cap: int = 32) -> int:
    """Largest power-of-two micro-batch (<= cap) that a rough memory model admits: params +
    grads + Adam moments in bf16 (8 B/param), activations ~34 s b h bytes per layer per pass
    (x1.5 slack; input only with full checkpointing), and per pass ~12 B per logit element
    (bf16 logits, fp32 probabilities / CE)."""
    from ponder_pt.engine.flops import param_count

    h, L, V = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    fixed = 8 * param_count(cfg, V)["total"] + 2 * 2**30
    passes = K + 1
    mb = cap
    while mb > 1:
        tok = seq * mb
        act = (L * 2 * tok * h + 40 * tok * h) if ckpt == "full" else 1.5 * 34 * L * tok * h
        logits = 12 * tok * V
        if fixed + passes * (act + logits) < 0.85 * mem_bytes:
            break
        mb //= 2
    return mb


class Throughput:
    def __init__(self, args, part: Part, shape: str):
        import torch

        self.args, self.part, self.shape = args, part, shape
        self.dev = device_name(args.smoke)
        self.seq = 64 if args.smoke else 2048
        self.cfg = shape_config(shape, self.seq)
        self.vocab_chunk_ok = has_vocab_chunk()
        self.peak, _ = peak_for(self.dev)
        self.warmup, self.iters = (1, 2) if args.smoke else (2, 8)
        self.spec_cap = 4.0 if args.smoke else 12.0  # seconds of timed steps per entry
        self.mem = (torch.cuda.get_device_properties(0).total_memory if self.dev == "cuda"
                    else None)
        self.timings = {}  # (impl, K, ckpt) -> (step_s, mb)
        self.fake_oom = args.smoke  # smoke: one injected OOM exercises the halving path
        self.model = self.opt = None
        self.build_s = {}

    # ---- time / memory planning
    def remaining(self) -> float:
        return self.args.deadline - time.time() - 4.0

    def flops_tok(self, K: int) -> float:
        from ponder_pt.engine.flops import flops_per_token

        return flops_per_token(self.cfg, self.cfg.vocab_size, self.seq, K)

    def start_mb(self, K: int, ckpt: str) -> int:
        if self.dev != "cuda":
            return 4 if self.fake_oom else 2
        return _mb_estimate(self.cfg, self.seq, K, ckpt, self.mem)

    def estimate(self, K: int, ckpt: str, mb: int):
        ref = self.timings.get(("ours", 0, "none")) or self.timings.get(("hf", 0, "none"))
        if ref is None:
            return None
        t0, mb0 = ref
        return t0 * (mb / mb0) * self.flops_tok(K) / self.flops_tok(0) * (
            1.35 if ckpt == "full" else 1.0)

    # ---- models
    def build_hf(self):
        import torch
        from transformers import GPTNeoXForCausalLM

        from ponder_pt.models import hf_config_from

        hc = hf_config_from(self.cfg)
        hc.use_cache = False
        t = time.perf_counter()
        with torch.device(self.dev):
            model = GPTNeoXForCausalLM._from_config(hc, attn_implementation="sdpa",
                                                    dtype=torch.bfloat16)
        model.to(self.dev).train()
        self.build_s["hf"] = time.perf_counter() - t
        return model

    def build_ours(self, chunk: int = 0):
        import torch

        from ponder_pt.config.schema import PonderConfig
        from ponder_pt.models import PonderLM

        cfg = dataclasses.replace(self.cfg)
        if chunk:
            cfg.vocab_chunk = chunk
        t = time.perf_counter()
        model = PonderLM(cfg, PonderConfig(steps=0), params_dtype=torch.bfloat16)
        model.to(self.dev).train()
        self.build_s["ours"] = time.perf_counter() - t
        return model

    def optimizer(self, model):
        import torch

        return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=True)

    # ---- one measurement
    def measure(self, impl: str, model, opt, K: int, ckpt: str, chunked: bool = False) -> dict:
        import torch

        dev, seq = self.dev, self.seq
        if impl == "hf":
            if ckpt == "full":
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
        else:
            model.set_activation_checkpointing(ckpt)
        mb = self.start_mb(K, ckpt)
        tried = []
        gen = torch.Generator().manual_seed(0)
        while True:
            ids = torch.randint(0, self.cfg.vocab_size, (mb, seq), generator=gen).to(dev)
            labels = torch.roll(ids, -1, 1)

            def step():
                if self.fake_oom:
                    self.fake_oom = False
                    raise torch.cuda.OutOfMemoryError("injected by --smoke (tests OOM halving)")
                if impl == "hf":
                    loss = model(input_ids=ids, labels=ids).loss
                else:
                    loss = model(ids, labels=labels, ponder_steps=K)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach()

            try:
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync(dev)
                t = time.perf_counter()
                for _ in range(self.warmup):
                    loss = step()
                sync(dev)
                warm = (time.perf_counter() - t) / self.warmup
                n = max(2, min(self.iters, int(self.spec_cap / max(warm, 1e-6))))
                if self.remaining() < warm * n:
                    n = max(1, int(self.remaining() / max(warm, 1e-6)))
                times = []
                for _ in range(n):
                    sync(dev)
                    t = time.perf_counter()
                    loss = step()
                    sync(dev)
                    times.append(time.perf_counter() - t)
                break
            except torch.cuda.OutOfMemoryError:
                tried.append(mb)
                opt.zero_grad(set_to_none=True)
                model.zero_grad(set_to_none=True)
                cleanup(dev)
                if mb == 1:
                    raise
                mb //= 2
                log(f"{self.part.data['name']}: OOM at micro-batch {tried[-1]}; trying {mb}")
        step_s = statistics.median(times)
        tokens = mb * seq
        tok_s = tokens / step_s
        tflops = self.flops_tok(K) * tok_s / 1e12
        self.timings.setdefault((impl, K, ckpt), (step_s, mb))
        lossv = float(loss.float())
        res = {"micro_batch": mb, "oom_tried": tried, "tokens_per_step": tokens,
               "step_s": step_s, "step_s_min": min(times), "timed_steps": len(times),
               "tokens_per_s": tok_s, "flops_per_token": self.flops_tok(K), "tflops": tflops,
               "mfu": tflops / self.peak if self.peak else None,
               "peak_gib": (torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda"
                            else None),
               "loss": lossv}
        if not math.isfinite(lossv):
            res.update(status="fail", note="non-finite loss")
        if impl == "hf":
            res["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        return res

    # ---- plan
    def plan(self) -> list:
        # (impl, K, ckpt, chunked) in priority order
        if self.shape in ("pythia-160m", "toy"):
            ours = [(0, "none"), (3, "none"), (1, "none"), (2, "none"), (0, "full"),
                    (3, "full"), (1, "full"), (2, "full")]
        else:
            ours = [(0, "none"), (3, "none"), (3, "full"), (0, "full"), (1, "none"),
                    (2, "none")]
        if self.args.plan == "vocab-chunk":
            # model.vocab_chunk side by side with the unchunked model at the same micro-batch
            # (unchunked first, then chunked: one model build each)
            return [("ours", K, c, chunked) for chunked in (False, True)
                    for K, c in ((3, "full"), (3, "none"), (0, "full"))]
        return ([("hf", 0, "none", False), ("hf", 0, "full", False)]
                + [("ours", K, c, False) for K, c in ours]
                + [("ours", 3, "full", True), ("ours", 3, "none", True)])

    def run(self) -> None:
        from ponder_pt.engine.flops import param_count

        params = param_count(self.cfg, self.cfg.vocab_size)["total"]
        self.part.update(shape=self.shape, seq=self.seq, device=self.dev, params=params,
                         precision="bf16 params + torch.optim.AdamW(fused=True), no autocast",
                         vocab_chunk_available=self.vocab_chunk_ok)
        hf_model = hf_opt = None
        for impl, K, ckpt, chunked in self.plan():
            fields = {"shape": self.shape, "impl": impl, "K": K, "ckpt": ckpt,
                      "chunked": chunked, "seq": self.seq}
            name = (f"{self.shape} {'HF GPTNeoX' if impl == 'hf' else 'ours'} K={K} "
                    f"ckpt={ckpt}" + (" vocab-chunked" if chunked else ""))
            if chunked and not self.vocab_chunk_ok:
                self.skip(name, fields, "not available: ModelConfig has no vocab_chunk yet")
                continue
            # models: HF first (then freed), ours built once (a fresh one for chunked)
            if impl == "ours" and hf_model is not None:
                del hf_model, hf_opt
                hf_model = hf_opt = None
                cleanup(self.dev)
            mb = self.start_mb(K, ckpt)
            est = self.estimate(K, ckpt, mb)
            build = 0.0
            if impl == "hf" and hf_model is None or impl == "ours" and (
                    self.model is None or chunked != bool(getattr(self.model.cfg,
                                                                  "vocab_chunk", 0))):
                build = self.build_s.get(impl, 0.0)
            need = (est * (self.warmup + 2) if est else 0.0) + build + 1.0
            if self.remaining() < need:
                self.skip(name, fields, f"time budget: {self.remaining():.0f}s left, "
                          f"~{need:.0f}s needed")
                continue

            def go(impl=impl, K=K, ckpt=ckpt, chunked=chunked):
                nonlocal hf_model, hf_opt
                if impl == "hf":
                    if hf_model is None:
                        hf_model = self.build_hf()
                        hf_opt = self.optimizer(hf_model)
                    return self.measure("hf", hf_model, hf_opt, K, ckpt)
                chunk = VOCAB_CHUNK["smoke" if self.args.smoke else "gpu"] if chunked else 0
                if self.model is None or getattr(self.model.cfg, "vocab_chunk", 0) != chunk:
                    # same seed, so the chunked model starts from the same weights
                    self.model = self.opt = None
                    cleanup(self.dev)
                    self.model = self.build_ours(chunk)
                    self.opt = self.optimizer(self.model)
                res = self.measure("ours", self.model, self.opt, K, ckpt, chunked=chunked)
                if chunked:
                    res["vocab_chunk"] = chunk
                return res

            entry = record(self.part, name, go, **fields)
            if entry["status"] == "error":
                if impl == "hf":
                    hf_model = hf_opt = None
                cleanup(self.dev)
        self.model = self.opt = None
        del hf_model, hf_opt
        cleanup(self.dev)
        self.part.update(build_s={k: round(v, 1) for k, v in self.build_s.items()})

    def skip(self, name, fields, reason):
        self.part.add({"name": name, **fields, "status": "skipped", "reason": reason})
        log(f"{self.part.data['name']}: {name} -> skipped ({reason})")


def section_throughput(args, part: Part) -> None:
    dev = device_name(args.smoke)
    init_process_group(dev)
    Throughput(args, part, args.shape).run()


# ============================================================================ driver

SECTIONS = {"sdpa": section_sdpa, "train": section_train, "generate": section_generate,
            "gen": section_gen, "throughput": section_throughput}
ORDER = {"env": 0, "sdpa": 1, "train": 2, "generate": 3, "gen": 3.5, "throughput": 4}
FIXED = ("sdpa", "train", "generate", "gen")  # sections with their own budget


def child_main(args) -> int:
    name = args.section if args.section != "throughput" else f"throughput-{args.shape}"
    order = ORDER[args.section]
    if args.section == "throughput":
        known = SHAPES + SMOKE_SHAPES
        order += (known.index(args.shape) if args.shape in known else 9) / 10
    part = Part(args.out, name, order, deadline=args.deadline)
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
    cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--section", section,
           "--deadline", str(deadline)]
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
        _atomic_write(os.path.join(args.out, "parts", f"{name}.json"),
                      json.dumps(_clean(part), indent=1))
        log(f"{name}: {why}")
    write_results(args.out)


def parent_main(args) -> int:
    os.environ["GPU_SUITE_T0"] = str(_T0)
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
    wanted = args.sections.split(",") if args.sections else list(SECTIONS)
    if args.budget:
        # scale the chosen sections' budgets to --budget (throughput takes what is left;
        # without it, the fixed sections share the whole budget, 10 s kept for the env)
        base = (budget["total"] if "throughput" in wanted
                else sum(budget[s] for s in FIXED if s in wanted) + 10)
        scale = args.budget / base
        budget = {k: v * scale for k, v in budget.items()}
        budget["total"] = args.budget
    end = _T0 + budget["total"]
    meta = Part(args.out, "meta", -1, smoke=args.smoke, argv=sys.argv, budget_s=budget["total"])
    meta.update(started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    env_part = Part(args.out, "env", 0)
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
                     shape=shape).add({"name": f"throughput-{shape}", "status": "skipped",
                                       "shape": shape, "reason": "time budget exhausted"})
                continue
            run_child(args, "throughput", share, shape)
    meta.update(finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), wall_s=round(time.time() - _T0, 1))
    meta.finish()
    res = write_results(args.out)
    log(f"done in {time.time() - _T0:.0f}s: {res['status_counts']}; "
        f"{os.path.join(args.out, 'gpu_results.json')}, {os.path.join(args.out, 'gpu_results.md')}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (gpu_results.json / .md)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, toy shapes, same code paths (< 2-3 min on 2 cores)")
    ap.add_argument("--budget", type=float, default=None,
                    help="total seconds (default 540 on GPU, 330 for --smoke); the chosen "
                         "sections' budgets scale to it")
    ap.add_argument("--sections", default=None,
                    help="comma list of sdpa,train,generate,gen,throughput (default: all)")
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
