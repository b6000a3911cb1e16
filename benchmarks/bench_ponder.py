"""Step time and memory of pondering (K = 0..3) with and without activation checkpointing.

Every configuration runs in its own subprocess (so peak-RSS numbers do not leak between
configurations) at the same shape, and the parent prints one markdown table with ratios vs
the plain model (K = 0). A training step is forward + backward of the mean CE loss.

Memory, two measures:
* `saved MiB`: bytes of the tensors autograd keeps for backward at the end of the forward
  (torch.autograd.graph.saved_tensors_hooks, unique storages, parameters excluded) -- the
  activation memory that pondering multiplies and checkpointing removes; exact and
  deterministic on any device.
* CPU: `peak RSS delta MiB`: the process's peak resident set (getrusage ru_maxrss) minus the
  RSS just before the first step (model, optimizer-free). Includes allocator slack and
  transient buffers; coarse.
* CUDA: `peak MiB` = torch.cuda.max_memory_allocated() minus memory allocated before the step.

Each run writes its rows, the machine, versions and arguments to a json (`--record`, default
benchmarks/results/cpu/bench_ponder.json; benchmarks/README.md names the file of each table).

CPU (the table in benchmarks/README.md):
    .venv/bin/python benchmarks/bench_ponder.py
Vocab-chunked loss and feedback (`model.vocab_chunk`) side by side with the unchunked path:
    .venv/bin/python benchmarks/bench_ponder.py --preset pythia-70m --seq 512 --batch 2 \
        --steps 0,3 --ckpt full --vocab-chunk 0,4096
GPU, tokens/s and MFU for a Pythia-410M shape (bf16):
    python benchmarks/bench_ponder.py --device cuda --dtype bf16 --preset pythia-410m \
        --seq 2048 --batch 8 --iters 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
warnings.filterwarnings("ignore")

from cpu_record import add_record_arg, draft, environment, write_record  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="model preset (e.g. pythia-410m); "
                    "default: a small CPU shape set by the flags below")
    ap.add_argument("--arch", default="gpt_neox", choices=["gpt_neox", "llama", "gpt2"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192, help="padded vocabulary rows")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", default="0,1,2,3", help="pondering steps K to compare")
    ap.add_argument("--ckpt", default="none,full", help="activation checkpointing modes")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--vocab-chunk", default="0", help="model.vocab_chunk values to compare "
                    "(comma list; 0 = unchunked logits)")
    ap.add_argument("--iters", type=int, default=5, help="timed steps")
    ap.add_argument("--stat", default="min", choices=["min", "median"],
                    help="step-time statistic; min is robust to other load on a shared machine")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2,
                    help="sweeps over all configurations (interleaved); best sweep is kept")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="accelerator peak for MFU (H100 SXM dense bf16: 989)")
    ap.add_argument("--json", action="store_true", help="print raw results as JSON lines too")
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)  # "K,ckpt,chunk" (child)
    add_record_arg(ap, "bench_ponder")
    return ap.parse_args(argv)


def model_config(args):
    from ponder_pt.config.presets import MODEL_PRESETS
    from ponder_pt.config.schema import ModelConfig

    if args.preset:
        fields = dict(MODEL_PRESETS[args.preset])
        fields.setdefault("vocab_size", 32000 if fields["arch"] == "llama" else 50304)
        return ModelConfig(preset=args.preset, **fields)
    over = {"llama": dict(rotary_pct=1.0, parallel_residual=False),
            "gpt2": dict(rotary_pct=0.0, parallel_residual=False, tie_embeddings=True)}.get(
        args.arch, {})
    return ModelConfig(arch=args.arch, num_layers=args.layers, hidden_size=args.hidden,
                       num_heads=args.heads, vocab_size=args.vocab, max_seq_len=args.seq, **over)


def train_flops_per_token(cfg, seq: int, K: int) -> float:
    """Model FLOPs of one training token (fwd + bwd = 3x fwd), all K+1 passes.

    Per pass: 2 x (matmul params incl. the output head) + causal-agnostic attention
    2 x 2 x s x h per layer (QK^T and PV, as in the usual 6N + 12 L h s count).
    Per pondering step add the soft embedding p.W_in (2 V h).
    """
    h, L, V = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    kv = cfg.kv_heads * cfg.head_dim
    attn = h * (h + 2 * kv) + h * h
    mlp = (3 if cfg.arch == "llama" else 2) * h * cfg.ffn_size
    matmul_params = L * (attn + mlp) + V * h
    per_pass = 2 * matmul_params + 4 * L * seq * h
    return 3 * ((K + 1) * per_pass + K * 2 * V * h)


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_single(args) -> dict:
    import torch

    from ponder_pt.config.schema import PonderConfig
    from ponder_pt.engine.estimate import saved_for_backward
    from ponder_pt.models import PonderLM, init_single_process

    torch.set_num_threads(args.threads)
    K, ckpt, chunk = args.single.split(",")
    K, chunk = int(K), int(chunk)
    init_single_process("nccl" if args.device == "cuda" else "gloo")
    cfg = model_config(args)
    cfg.activation_checkpointing = ckpt
    cfg.vocab_chunk = chunk
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = PonderLM(cfg, PonderConfig(steps=K, top_k=args.top_k), params_dtype=dtype)
    model.to(args.device).train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(args.device)
    labels = torch.roll(ids, -1, dims=1)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def step(measure_saved=False):
        saved = {}
        if measure_saved:
            with saved_for_backward(model) as saved:
                loss = model(ids, labels=labels)
        else:
            loss = model(ids, labels=labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return sum(saved.values())

    rss0 = rss_mib()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    saved_bytes = step(measure_saved=True)
    for _ in range(args.warmup - 1):
        step()
    times = []
    for _ in range(args.iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    t = min(times) if args.stat == "min" else statistics.median(times)
    if args.device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    tokens = args.batch * args.seq
    flops = train_flops_per_token(cfg, args.seq, K) * tokens
    return {"K": K, "ckpt": ckpt, "vocab_chunk": chunk, "step_s": t, "flops": flops,
            "step_s_median": statistics.median(times), "step_s_min": min(times), "saved_mib": saved_bytes / 2**20,
            "peak_mib": peak, "tokens_per_s": tokens / t,
            "mfu": flops / t / (args.peak_tflops * 1e12) if args.device == "cuda" else None,
            "device": args.device, "dtype": args.dtype, "threads": args.threads,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def table(rows, args) -> str:
    plain = {r["ckpt"]: r for r in rows if r["K"] == 0 and not r["vocab_chunk"]}
    base = plain.get("none") or next(iter(plain.values()), None)
    unchunked = {(r["K"], r["ckpt"]): r for r in rows if not r["vocab_chunk"]}
    peak_name = "peak MiB (CUDA)" if args.device == "cuda" else "peak RSS delta MiB"
    head = ["K", "ckpt", "vocab chunk", f"step s ({args.stat})", "time x plain",
            "time x unchunked", "FLOPs x plain", "tokens/s", "saved MiB", "saved x plain",
            peak_name]
    if args.device == "cuda":
        head.append("MFU")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ref = plain.get(r["ckpt"], base)
        same = unchunked.get((r["K"], r["ckpt"]))
        cells = [str(r["K"]), r["ckpt"], str(r["vocab_chunk"] or "-"), f"{r['step_s']:.3f}",
                 f"{r['step_s'] / ref['step_s']:.2f}" if ref else "-",
                 f"{r['step_s'] / same['step_s']:.2f}" if same else "-",
                 f"{r['flops'] / ref['flops']:.2f}" if ref else "-",
                 f"{r['tokens_per_s']:.0f}", f"{r['saved_mib']:.1f}",
                 f"{r['saved_mib'] / base['saved_mib']:.2f}" if base else "-",
                 f"{r['peak_mib']:.0f}"]
        if args.device == "cuda":
            cells.append(f"{100 * r['mfu']:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.single:
        print("RESULT " + json.dumps(run_single(args)), flush=True)
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    started = environment()
    best = {}
    for _ in range(args.repeats):
        for ckpt, K, chunk in itertools.product(args.ckpt.split(","),
                                                (int(k) for k in args.steps.split(",")),
                                                (int(c) for c in args.vocab_chunk.split(","))):
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--single",
                   f"{K},{ckpt},{chunk}"]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"K={K} ckpt={ckpt} vocab_chunk={chunk} failed:\n"
                         f"{out.stderr[-3000:]}")
            row = json.loads(line[-1][len("RESULT "):])
            if args.json:
                print(json.dumps(row), flush=True)
            if (K, ckpt, chunk) not in best or row["step_s"] < best[K, ckpt, chunk]["step_s"]:
                best[K, ckpt, chunk] = row
    rows = list(best.values())
    text = render_table(draft(args, rows, started=started))
    print("\n" + text)
    write_record(args.record, "bench_ponder.py", args, rows, text, started)


def render_table(doc: dict) -> str:
    """The table of a record (cpu_record.draft / the saved json) from its measurements; the
    load averages are the record's (at the start, and when it was written)."""
    args, rows = argparse.Namespace(**doc["args"]), doc["measurements"]
    cfg = model_config(args)
    load0 = (doc.get("load_average_at_start") or [None])[0]
    load1 = (doc["machine"].get("load_average_1_5_15") or [None])[0]
    start, end = ("?" if x is None else f"{x:.1f}" for x in (load0, load1))
    return (f"shape: {cfg.arch} L={cfg.num_layers} h={cfg.hidden_size} heads={cfg.num_heads} "
            f"V={cfg.vocab_size} seq={args.seq} batch={args.batch} ({rows[0]['params_m']:.1f}M "
            f"params), {args.device} {args.dtype}, {args.threads} threads, top_k={args.top_k}, "
            f"{args.stat} of {args.iters} steps x {args.repeats} sweeps after {args.warmup} "
            f"warm-up; 1-min load average {start} at start, {end} at end\n\n{table(rows, args)}")

if __name__ == "__main__":
    main()
