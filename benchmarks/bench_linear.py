"""Training step at TP = 1 with megatron-core's linear forward vs `F.linear` (ponder-pt's
default at TP = 1, `ponder_pt/models/linear.py`): the same model and batch, forward + backward
of the loss, K = 0 and K = 3, the two forwards alternated for `--rounds` rounds and the fastest
of `--steps` timed steps kept for each.

    .venv/bin/python benchmarks/bench_linear.py
    .venv/bin/python benchmarks/bench_linear.py --device cuda --hidden 2048 --layers 16 --seq 2048
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from cpu_record import add_record_arg, environment, write_record  # noqa: E402


def set_plain_linears(model, plain: bool) -> None:
    """Switch every TP linear between F.linear (True) and megatron's forward (False)."""
    from ponder_pt.models.linear import ColumnLinear, RowLinear

    for m in model.modules():
        if isinstance(m, (ColumnLinear, RowLinear)):
            m.plain = plain


def main(argv=None) -> None:
    from ponder_pt.config.schema import ModelConfig, PonderConfig
    from ponder_pt.models import PonderLM, init_single_process

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--ponder", type=int, nargs="+", default=[0, 3])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_record_arg(p, "bench_linear")
    args = p.parse_args(argv)
    started = environment()
    init_single_process()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = ModelConfig(arch="gpt_neox", num_layers=args.layers, hidden_size=args.hidden,
                      num_heads=max(1, args.hidden // 64), vocab_size=args.vocab,
                      max_seq_len=args.seq)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores, torch threads "
             f"{torch.get_num_threads()}, device {dev}, {args.dtype}; GPT-NeoX {args.layers} "
             f"layers x hidden {args.hidden}, vocab {args.vocab}, batch {args.batch} x seq "
             f"{args.seq}; forward + backward", "",
             "| K | megatron linear step (ms) | F.linear step (ms) | F.linear / megatron |",
             "|---:|---:|---:|---:|"]
    print("\n".join(lines))
    measured = []
    for K in args.ponder:
        model = PonderLM(cfg, PonderConfig(steps=K), params_dtype=dtype).to(dev).train()
        best = {}
        for _ in range(args.rounds):
            for plain in (False, True):
                set_plain_linears(model, plain)
                for i in range(args.steps + 1):  # the first step is a warm-up
                    model.zero_grad(set_to_none=True)
                    sync()
                    t = time.perf_counter()
                    model(ids, labels=ids).backward()
                    sync()
                    if i:
                        best[plain] = min(best.get(plain, float("inf")), time.perf_counter() - t)
        lines.append(f"| {K} | {1e3 * best[False]:.1f} | {1e3 * best[True]:.1f} | "
                     f"{best[True] / best[False]:.3f} |")
        print(lines[-1], flush=True)
        measured.append({"K": K, "megatron_step_s": best[False], "f_linear_step_s": best[True]})
    write_record(args.record, "bench_linear.py", args, measured, "\n".join(lines), started)


if __name__ == "__main__":
    main()
