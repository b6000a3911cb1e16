"""Early exit on a CPU: metric and measured wall-clock speed-up against the full model for
each strategy (none, PALBERT Q-exit, PonderNet, PABEE, entropy) at several thresholds.

    .venv/bin/python benchmarks/bench_early_exit.py                  # ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_early_exit.py --quick          # ~1 min smoke run

Backbone: a random-initialised 6-layer BERT (hidden 128) fine-tuned from scratch on the local
polarity task (ponder_pt.early_exit.toy: negations and small margins make some samples need
depth; `--arch albert` for PALBERT's shared-layer setting, which learns the negations less
well at this size). Each strategy is trained in its own process, then timed alone (one
untimed pass, best of 5 timed passes). Writes early_exit.md / .json / .png into --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ponder_pt.early_exit.compare import STRATEGIES, run_strategies, write_report  # noqa: E402
from ponder_pt.early_exit.toy import tiny_encoder, write_polarity_task  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/early_exit")
    ap.add_argument("--arch", default="bert", choices=["albert", "bert", "roberta"])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--valid", type=int, default=400)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    ap.add_argument("--fresh", action="store_true", help="retrain even if results exist")
    ap.add_argument("--reeval", action="store_true",
                    help="keep the trained models, redo only their evaluation and timing")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.epochs, args.train, args.valid = 4, 32, 1, 128, 32
    os.makedirs(args.out, exist_ok=True)
    task = write_polarity_task(os.path.join(args.out, "polarity"), args.train, args.valid)
    backbone = os.path.join(args.out, f"{args.arch}_backbone")
    if not os.path.exists(os.path.join(backbone, "config.json")):
        tiny_encoder(args.arch, backbone, layers=args.layers, hidden=args.hidden)
    overrides = [f"train.lr={args.lr}", f"train.exit_lr={args.lr}", f"train.epochs={args.epochs}",
                 "train.batch_size=32", "train.early_stop=0", "eval.batch_size=32",
                 "eval.timing_repeats=5", "exit.dropout=0.0"]
    if args.quick:
        overrides += ["eval.timing_repeats=1", "eval.batch1=false"]
    results = run_strategies(backbone, task, os.path.join(args.out, "runs"), args.strategies,
                             overrides, skip_existing=not args.fresh, reevaluate=args.reeval)
    report = write_report(results, args.out, title=f"Early exit on CPU ({platform.machine()}, "
                          f"{os.cpu_count()} cores, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} threads)")
    print(report["table"])
    print(f"figure: {report['figure']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
