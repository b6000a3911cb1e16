"""How long the tests' tiny trainings take from the preloaded zygote (tests/zygote.py) and as
plain subprocesses, side by side in one run; the losses of the two must be equal.

    .venv/bin/python tools/launch_time.py            # 1 process, ZeRO-1 on 2, PP 2 on 2

Each layout is trained both ways, alternating, on the tests' tiny model and data (built here:
the embedded corpus, a 600-token BPE); the table gives wall seconds per training and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

LAYOUTS = {"1 process": (1, []), "ZeRO-1, 2 ranks": (2, ["parallel.zero_stage=1"]),
           "PP 2, 2 ranks": (2, ["parallel.pp=2"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1, help="trainings per layout and way")
    args = ap.parse_args(argv)
    from ponder_pt.data.corpus import write_corpus
    from ponder_pt.data.prepare import prepare
    from ponder_pt.tokenizer import train_tokenizer

    import train_utils
    import zygote

    with tempfile.TemporaryDirectory(prefix="launch_time_") as root:
        corpus = os.path.join(root, "corpus.jsonl")
        write_corpus(corpus, max_bytes=150_000)
        tok = os.path.join(root, "bpe")
        train_tokenizer([corpus], 600, tok, kind="bpe", show_progress=False)
        prefix = os.path.join(root, "data", "corpus")
        prepare([corpus], tok, prefix, progress=False)
        zygote.ponder(["config", "list"])  # the server's own start-up is not a training's
        rows = []
        for name, (nproc, extra) in LAYOUTS.items():
            seconds = {True: [], False: []}
            losses = {}
            for rep in range(args.repeats):
                for preloaded in (True, False):
                    zygote.ENABLED = preloaded
                    run = os.path.join(root, f"{len(rows)}_{rep}_{preloaded}")
                    t0 = time.perf_counter()
                    train_utils.run_train(run, prefix, tok, extra, nproc=nproc)
                    seconds[preloaded].append(time.perf_counter() - t0)
                    losses[preloaded] = train_utils.metrics(run)[0]
            if losses[True] != losses[False]:
                raise SystemExit(f"{name}: the losses differ: {losses}")
            z, p = (sum(seconds[k]) / len(seconds[k]) for k in (True, False))
            rows.append(f"| {name} | {z:.1f} | {p:.1f} | {p / z:.1f}x |")
    load = os.getloadavg()[0]
    print(f"tiny training (tests/train_utils.TINY), wall seconds per run, 1-min load {load:.1f} "
          f"on {os.cpu_count()} cores\n")
    print("| layout | from the zygote | subprocesses | ratio |\n|---|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
