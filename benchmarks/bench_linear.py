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
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from cpu_record import add_record_arg, draft, environment, write_record  # noqa: E402


def set_plain_linears(model, plain: bool) -> None:
    """Switch every TP linear between F.linear (True) and megatron's forward (False)."""
    from ponder_pt.models.linear import ColumnLinear, RowLinear

    for m in model.modules():
        if isinstance(m, (ColumnLinear, RowLinear)):
            m.plain = plain


def render_table(doc: dict) -> str:
    """The table of a record (cpu_record.draft / the saved json) from its measurements."""
    a, mach = doc["args"], doc["machine"]
    threads = (doc.get("context") or {}).get("torch_threads", "not recorded")
    lines = [f"machine: {mach['arch']}, {mach['cpus']} cores, torch threads "
             f"{threads}, device {a['device']}, {a['dtype']}; GPT-NeoX {a['layers']} "
             f"layers x hidden {a['hidden']}, vocab {a['vocab']}, batch {a['batch']} x seq "
             f"{a['seq']}; forward + backward", "",
             "| K | megatron linear step (ms) | F.linear step (ms) | F.linear / megatron |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['K']} | {1e3 * r['megatron_step_s']:.1f} | {1e3 * r['f_linear_step_s']:.1f} "
              f"| {r['f_linear_step_s'] / r['megatron_step_s']:.3f} |"
              for r in doc["measurements"]]
    return "\n".join(lines)


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

    context = {"torch_threads": torch.get_num_threads()}
    lines = render_table(draft(args, [], context)).splitlines()
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
        measured.append({"K": K, "megatron_step_s": best[False], "f_linear_step_s": best[True]})
        print(render_table(draft(args, measured, context)).splitlines()[-1], flush=True)
    write_record(args.record, "bench_linear.py", args, measured,
                 render_table(draft(args, measured, context)), started, context)


if __name__ == "__main__":
    main()
