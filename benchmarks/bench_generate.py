"""Pondering generation latency per token: K+1 KV caches vs recomputing the prefix.

The reference PonderingLM code generates by running all K+1 passes over the whole sequence
for every new token (O(n^2) per sequence); ponder-pt keeps one KV cache per pass, so a new
token costs K+1 one-token forwards. Both loops here decode greedily (argmax, no EOS stop) from
the same random PonderLM and must produce the same tokens; the script checks that and
reports ms per generated token and the speed-up, at 64/256/1024 new tokens.

    .venv/bin/python benchmarks/bench_generate.py                  # CPU table (benchmarks/README.md)
    .venv/bin/python benchmarks/bench_generate.py --device cuda --hidden 1024 --layers 24

`--decoders` instead times one cached token four ways, for K = 0 and K = `--steps` side by
side: megatron-core's linear forward with caches grown by concatenation (how ponder-pt decoded
before), the eager decoder (preallocated caches, `F.linear` at TP = 1), its fixed-shape form
(what a CUDA graph captures, run eagerly), and on CUDA the graph replay. It reports ms/token and
the pondering cost ratio K-step / ((K+1) x plain), whose goal is <= 1.1.

    .venv/bin/python benchmarks/bench_generate.py --decoders --layers 12 --hidden 64

`--adaptive` times adaptive pondering (a halting head, K = `--steps`): greedy decoding of
the same model at several Q-exit thresholds against q = 1 (every pass, fixed K), side by side,
and checks that the time per token follows the passes taken: adaptive / fixed ms per token
against (mean passes) / (K+1). The halting head is random, scaled so tokens spread over the
passes (`--halt-spread`).

    .venv/bin/python benchmarks/bench_generate.py --adaptive --layers 6 --hidden 512 --heads 8 --vocab 50304 --lengths 64

`--thoughts M` times a latent-thoughts model (M thoughts per token: M+1 one-slot passes per
token through one cache (M+1)x as long) against the plain model and pondering with K = M
(also M+1 passes per token, over K+1 caches), side by side on the same shape.

    .venv/bin/python benchmarks/bench_generate.py --thoughts 1 --layers 6 --hidden 512 --heads 8 --vocab 50304 --lengths 64

`--speculative` times speculative decoding over the passes on trained checkpoints
(`--checkpoint NAME=DIR`, `--plain DIR`, prompts from `--corpus`) against their ordinary
fixed-K decoding: see benchmarks/speculative_bench.py.

Each run writes its measurements, the machine, versions and arguments to a json (`--record`;
default benchmarks/results/cpu/bench_generate.json, with --decoders
bench_generate_decoders.json, with --thoughts bench_generate_thoughts.json, with --speculative
bench_generate_speculative.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from cpu_record import add_record_arg, default_path, draft, environment, write_record  # noqa: E402
from speculative_bench import speculative_rows, speculative_table  # noqa: E402


def model_config(args):
    """The benchmarked shape (GPT-NeoX), room for the prompt and the longest generation."""
    from ponder_pt.config.schema import ModelConfig

    return ModelConfig(arch="gpt_neox", num_layers=args.layers, hidden_size=args.hidden,
                       num_heads=args.heads, max_seq_len=args.prompt + max(args.lengths) + 8,
                       vocab_size=args.vocab)


def build(args):
    return build_thoughts(args, steps=args.steps)


def build_thoughts(args, thoughts: int = 0, steps: int = 0):
    """The `build` shape with latent thoughts or pondering (the same weights for every
    variant: one seed)."""
    from ponder_pt.config.schema import PonderConfig, ThoughtsConfig
    from ponder_pt.models import PonderLM, init_single_process

    init_single_process()
    return PonderLM(model_config(args), PonderConfig(steps=steps),
                    thoughts=ThoughtsConfig(count=thoughts), seed=0).to(args.device).eval()


def thoughts_table(args, prompt) -> list:
    """ms/token of plain, latent thoughts (M) and pondering (K = M), min of two interleaved
    rounds: the measurements."""
    M, n = args.thoughts, args.lengths[0]
    models = {"plain": build_thoughts(args), f"latent thoughts M={M}": build_thoughts(args, M),
              f"pondering K={M}": build_thoughts(args, steps=M)}
    for model in models.values():
        decoder(model, prompt, 8, None, "eager")  # warm-up
    best = {}
    for _ in range(2):
        for name, model in models.items():
            _, t = timed(decoder, model, prompt, n, None, "eager")
            best[name] = min(best.get(name, float("inf")), t / n)
    return [{"model": name, "s_per_token": t, "passes": 1 if name == "plain" else M + 1}
            for name, t in best.items()]


def _thought_rows(rows: list) -> list:
    lines = ["| model | passes per token | ms/token | vs plain |", "|---|---:|---:|---:|"]
    plain = next(r["s_per_token"] for r in rows if r["model"] == "plain")
    for r in rows:
        lines.append(f"| {r['model']} | {r['passes']} | {1e3 * r['s_per_token']:.2f} | "
                     f"{r['s_per_token'] / plain:.2f}x |")
    return lines


def build_adaptive(args):
    """The `build` shape with a palbert halting head spread by --halt-spread."""
    from ponder_pt.config.schema import HaltingConfig, PonderConfig
    from ponder_pt.models import PonderLM, init_single_process

    init_single_process()
    model = PonderLM(model_config(args),
                     PonderConfig(steps=args.steps, halting=HaltingConfig(mode="palbert")), seed=0)
    with torch.no_grad():
        w = model.halting.proj.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
                * args.halt_spread / args.hidden ** 0.5)
    return model.to(args.device).eval()


@torch.no_grad()
def adaptive_decode(model, prompt, n, q):
    """Greedy tokens and the passes each took, decoding at Q-exit threshold q."""
    from ponder_pt.inference.decode import Decoder

    dec = Decoder(model, prompt.shape[1] + n, halt_q=q, mode="eager")
    z, out, passes = dec.prefill_one(prompt[0].tolist()), [], []
    for _ in range(n):
        out.append(int(z.argmax()))
        passes.append(dec.passes[0] if dec.adaptive else model.ponder_cfg.steps + 1)
        z = dec.step_one(out[-1])
    return out, passes


def adaptive_table(model, prompt, args) -> list:
    """ms/token at each q and at q = 1, min of two interleaved rounds: the measurements."""
    n, K, qs = args.lengths[0], args.steps, [1.0] + list(args.halt_q)
    for q in qs:
        adaptive_decode(model, prompt, 8, q)  # warm-up
    best, passes = {}, {}
    for _ in range(2):
        for q in qs:
            (out, used), t = timed(adaptive_decode, model, prompt, n, q)
            best[q] = min(best.get(q, float("inf")), t / n)
            passes[q] = sum(used) / len(used)
    measured = []
    for q in qs:
        ratio, want = best[q] / best[1.0], passes[q] / (K + 1)
        measured.append({"q": q, "mean_passes": passes[q], "s_per_token": best[q],
                         "ratio_to_fixed": ratio, "passes_ratio": want,
                         "within_15pct": abs(ratio - want) <= 0.15 * want})
    return measured


def _adaptive_rows(rows: list, K: int) -> list:
    lines = [f"| q | mean passes | ms/token | vs fixed K={K} | (mean passes) / {K + 1} "
             "| within 15 % |", "|---:|---:|---:|---:|---:|:---:|"]
    fixed = next(r["s_per_token"] for r in rows if r["q"] >= 1)
    for r in rows:
        ratio, want = r["s_per_token"] / fixed, r["mean_passes"] / (K + 1)
        ok = abs(ratio - want) <= 0.15 * want
        lines.append(f"| {r['q']:g}{' (fixed K)' if r['q'] >= 1 else ''} | "
                     f"{r['mean_passes']:.2f} | {1e3 * r['s_per_token']:.2f} | {ratio:.2f} | "
                     f"{want:.2f} | {'yes' if ok else 'NO'} |")
    return lines


def cached(model, prompt, n):
    """ponder-pt's decoding (`Decoder`: preallocated caches; CUDA graph on a GPU)."""
    return decoder(model, prompt, n, None, None)


@torch.no_grad()
def recompute(model, prompt, n):
    seq = prompt
    for _ in range(n):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq[0, prompt.shape[1]:].tolist()


@torch.no_grad()
def grown(model, prompt, n, K):
    """Before preallocation: megatron's linear forward, caches grown by torch.cat."""
    from bench_linear import set_plain_linears

    set_plain_linears(model, False)
    try:
        caches, ids, out = model.new_caches(K), prompt, []
        for _ in range(n):
            nxt = model(ids, caches=caches, ponder_steps=K)[:, -1].argmax(-1, keepdim=True)
            out.append(int(nxt))
            ids = nxt
        return out
    finally:
        set_plain_linears(model, True)


@torch.no_grad()
def decoder(model, prompt, n, K, mode):
    from ponder_pt.inference.decode import Decoder

    dec = Decoder(model, prompt.shape[1] + n, ponder_steps=K, mode=mode)
    z, out = dec.prefill_one(prompt[0].tolist()), []
    for _ in range(n):
        out.append(int(z.argmax()))
        z = dec.step_one(out[-1])
    return out


def decoders_table(model, prompt, args) -> list:
    """ms/token per decoder for K = 0 and K, min of two interleaved rounds: the
    measurements."""
    ways = {"megatron linear, grown caches": lambda K, n: grown(model, prompt, n, K)}
    modes = ["eager", "static"] + (["graph"] if args.device.startswith("cuda") else [])
    for mode in modes:
        ways[f"decoder {mode}"] = (lambda m: lambda K, n: decoder(model, prompt, n, K, m))(mode)
    n, best, tokens = args.lengths[0], {}, {}
    for name, fn in ways.items():  # warm-up (and graph capture paths) once
        for K in (0, args.steps):
            fn(K, 8)
    for _ in range(2):
        for name, fn in ways.items():
            for K in (0, args.steps):
                out, t = timed(fn, K, n)
                best[name, K] = min(best.get((name, K), float("inf")), t / n)
                tokens.setdefault(K, out)
                assert out == tokens[K] or args.device != "cpu", (name, K)
    K = args.steps
    return [{"decoder": name, "K0_s_per_token": best[name, 0],
             f"K{K}_s_per_token": best[name, K]} for name in ways]


def _decoder_rows(rows: list, K: int) -> list:
    lines = [f"| decoder | K=0 ms/token | K={K} ms/token | K={K} / ({K + 1} x K=0) "
             f"| vs first row, K={K} |", "|---|---:|---:|---:|---:|"]
    first = rows[0][f"K{K}_s_per_token"]
    for r in rows:
        a, b = r["K0_s_per_token"], r[f"K{K}_s_per_token"]
        lines.append(f"| {r['decoder']} | {1e3 * a:.2f} | {1e3 * b:.2f} | {b / ((K + 1) * a):.2f} "
                     f"| {first / b:.2f}x |")
    return lines


def render_table(doc: dict) -> str:
    """The table of a record (cpu_record.draft / the saved json) from its measurements."""
    a, mach, rows = doc["args"], doc["machine"], doc["measurements"]
    machine = f"machine: {mach['arch']}, {mach['cpus']} cores, torch threads {a['threads']}"
    head = (f"{machine}, device {a['device']}; GPT-NeoX {a['layers']} layers x hidden "
            f"{a['hidden']}, vocab {a['vocab']}")
    if a.get("speculative"):
        d = ", ".join(f"{n}={path}" for n, path in a["checkpoint"])
        return "\n".join([f"{machine}, device cpu; checkpoints {d}; {a['prompts']} prompts of "
                          f"{a['prompt']} tokens, {a['lengths'][0]} new tokens each, greedy, "
                          "batch 1, eager decoder", "", *speculative_rows(rows)])
    if a.get("thoughts"):
        return "\n".join([f"{head}, prompt {a['prompt']}, {a['lengths'][0]} new tokens, greedy, "
                          "batch 1, eager decoder", "", *_thought_rows(rows)])
    if a.get("adaptive") or a.get("decoders"):
        what = f"K={a['steps']} with a palbert halting head, " if a.get("adaptive") else ""
        lines = [f"{head}, {what}prompt {a['prompt']}, {a['lengths'][0]} new tokens, greedy, "
                 "batch 1", ""]
        lines += (_adaptive_rows if a.get("adaptive") else _decoder_rows)(rows, a["steps"])
        return "\n".join(lines)
    lines = [f"{head}, K={a['steps']} (K+1={a['steps'] + 1} passes), prompt {a['prompt']} "
             f"tokens, greedy, batch 1", "",
             "| new tokens | K+1 caches ms/token | recompute prefix ms/token | speed-up "
             "| same tokens |", "|---:|---:|---:|---:|:---:|"]
    for r in rows:
        n, ta, tb = r["new_tokens"], r["cached_s"], r["recompute_s"]
        lines.append(f"| {n} | {1e3 * ta / n:.2f} | {1e3 * tb / n:.2f} | {tb / ta:.1f}x | "
                     f"{'yes' if r['same_tokens'] else 'NO'} |")
    return "\n".join(lines)

def timed(fn, *a):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*a)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--steps", type=int, default=3, help="pondering steps K")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--decoders", action="store_true",
                   help="time the decoders against each other (first of --lengths tokens)")
    p.add_argument("--adaptive", action="store_true",
                   help="time adaptive pondering at --halt-q thresholds against fixed K")
    p.add_argument("--halt-q", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--halt-spread", type=float, default=4.0,
                   help="std of the random halting head's logit (tokens spread over passes)")
    p.add_argument("--thoughts", type=int, default=0,
                   help="time a latent-thoughts model with M thoughts against plain and K = M")
    p.add_argument("--speculative", action="store_true",
                   help="time speculative decoding on trained --checkpoint runs")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                   type=lambda text: tuple(text.split("=", 1)),
                   help="--speculative: a pondering run directory or checkpoint.dir")
    p.add_argument("--plain", metavar="DIR", help="--speculative: a plain (K=0) run to compare")
    p.add_argument("--corpus", metavar="JSONL", help="--speculative: prompts' documents")
    p.add_argument("--prompts", type=int, default=4, help="--speculative: prompts decoded")
    p.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2, 3, 4],
                   help="--speculative: the n to time (every d in 1..K is timed)")
    p.add_argument("--loss-docs", type=int, default=64,
                   help="--speculative: held-out documents for each model's loss")
    p.add_argument("--repeats", type=int, default=2,
                   help="--speculative: interleaved rounds (the least time is kept)")
    add_record_arg(p, "bench_generate")
    args = p.parse_args(argv)
    if args.speculative and args.record == default_path("bench_generate"):
        args.record = default_path("bench_generate_speculative")
    if args.decoders and args.record == default_path("bench_generate"):
        args.record = default_path("bench_generate_decoders")
    if args.adaptive and args.record == default_path("bench_generate"):
        args.record = default_path("bench_generate_adaptive")
    if args.thoughts and args.record == default_path("bench_generate"):
        args.record = default_path("bench_generate_thoughts")
    started = environment()
    torch.set_num_threads(args.threads)
    if args.speculative:
        if not args.checkpoint or not args.corpus:
            p.error("--speculative needs --checkpoint NAME=DIR (one or more) and --corpus")
        measured = speculative_table(args)
        table = render_table(draft(args, measured))
        print(table)
        write_record(args.record, "bench_generate.py", args, measured, table, started)
        return
    if args.thoughts:
        prompt = torch.randint(0, args.vocab, (1, args.prompt),
                               generator=torch.Generator().manual_seed(0)).to(args.device)
        measured = thoughts_table(args, prompt)
        table = render_table(draft(args, measured))
        print(table)
        write_record(args.record, "bench_generate.py", args, measured, table, started)
        return
    model = build_adaptive(args) if args.adaptive else build(args)
    prompt = torch.randint(0, args.vocab, (1, args.prompt),
                           generator=torch.Generator().manual_seed(0)).to(args.device)
    if args.adaptive or args.decoders:
        measured = (adaptive_table if args.adaptive else decoders_table)(model, prompt, args)
        table = render_table(draft(args, measured))
        print(table)
        write_record(args.record, "bench_generate.py", args, measured, table, started)
        return
    cached(model, prompt, 4)  # warm-up
    recompute(model, prompt, 4)
    print(render_table(draft(args, [])))
    measured = []
    for n in args.lengths:
        a, ta = timed(cached, model, prompt, n)
        b, tb = timed(recompute, model, prompt, n)
        measured.append({"new_tokens": n, "cached_s": ta, "recompute_s": tb,
                         "same_tokens": a == b})
        print(render_table(draft(args, measured)).splitlines()[-1], flush=True)
    write_record(args.record, "bench_generate.py", args, measured,
                 render_table(draft(args, measured)), started)

if __name__ == "__main__":
    main()
