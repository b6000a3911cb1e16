#!/usr/bin/env python
"""Data-parallel training across 2 simulated nodes on shaped links, against one node of the
same world size and against the communication model of `train --dry-run`.

  sudo python benchmarks/bench_multinode.py [--gbps 20 5 1] [--steps 8] [--delay-ms 0]

Two nodes are network namespaces on a private bridge (tools/netns_cluster.py); `tc` gives
each link a rate (tbf) in both directions, and with --delay-ms a delay (netem, where the
kernel has it). torchrun starts 2 CPU ranks per node
(DP = 4, ZeRO-1, fp32) of the pythia-70m shape, and once on one node with 4 ranks. For each
run the table shows the median step time (the first `--warmup` steps left out), the bytes one
node sent per step over its link (the bridge port's counters, read as the steps are logged),
and the model's prediction (ponder_pt/engine/comm_model.py): the one-node step time plus the
predicted communication time, and the predicted bytes. Needs root; the namespaces are removed
at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from cpu_record import REPO, add_record_arg, environment, write_record

sys.path.insert(0, os.path.join(REPO, "tools"))
from netns_cluster import NetnsUnavailable, SimCluster, why_not_here  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CONFIG = "ponderpythia-70m"


def overrides(args) -> list[str]:
    return [f"ponder.steps={args.ponder}", "parallel.zero_stage=1", "train.precision=fp32",
            f"train.micro_batch={args.micro_batch}", f"train.global_batch={4 * args.micro_batch}",
            f"data.seq_len={args.seq_len}", f"train.iters={args.steps}", "train.warmup=1",
            "train.eval_interval=100000", "log.interval=1", "data.num_workers=0",
            f"model.vocab_size={args.vocab}"]


def prepare_data(work: str) -> tuple[str, str]:
    """The embedded corpus, a BPE tokenizer and the prepared dataset, in `work`."""
    from ponder_pt.data.prepare import prepare
    from ponder_pt.tokenizer import train_tokenizer

    corpus = os.path.join(work, "corpus.jsonl")
    subprocess.run([sys.executable, "-m", "ponder_pt", "data", "corpus", "--out", corpus,
                    "--max-mb", "1"], check=True, capture_output=True)
    tok = os.path.join(work, "tok")
    train_tokenizer([corpus], 1000, tok, kind="bpe", show_progress=False)
    prefix = os.path.join(work, "data", "corpus")
    prepare([corpus], tok, prefix, progress=False)
    return prefix, tok


def train_cmd(args, run_dir, data, tok, nnodes, nproc, node_rank, port) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
           f"--nproc-per-node={nproc}", f"--node-rank={node_rank}", "--master-addr=node1",
           f"--master-port={port}", "-m", "ponder_pt.train", "--config", CONFIG]
    for item in [*overrides(args), f"data.train=[{data}]", f"data.tokenizer={tok}",
                 f"data.cache_dir={run_dir}/cache", f"log.dir={run_dir}"]:
        cmd += ["--set", item]
    return cmd


def run_once(sim, args, run_dir, data, tok, two_nodes: bool, port: int) -> dict:
    """Step times and per-step bytes of one training run."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    os.makedirs(run_dir, exist_ok=True)
    layout = [(1, 0, 2), (2, 1, 2)] if two_nodes else [(1, 0, 4)]
    procs = []
    for node, rank, nproc in layout:
        cmd = sim.node_command(node, train_cmd(args, run_dir, data, tok, len(layout), nproc,
                                               rank, port))
        log = open(os.path.join(run_dir, f"node{node}.log"), "w")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=REPO), log))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    marks = {}  # step -> bytes node1 had sent when the step was logged
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and any(p.poll() is None for p, _ in procs):
        try:
            steps = [json.loads(line)["step"] for line in open(metrics) if '"loss"' in line]
        except (OSError, ValueError):
            steps = []
        if steps and steps[-1] not in marks:
            marks[steps[-1]] = sim.link_bytes().get(1, {}).get("tx", 0)
        time.sleep(0.05)
    for p, log in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        log.close()
    if any(p.returncode for p, _ in procs):
        tail = open(os.path.join(run_dir, "node1.log")).read()[-3000:]
        raise RuntimeError(f"a training run failed:\n{tail}")
    rows = [json.loads(line) for line in open(metrics) if '"loss"' in line]
    times = [r["step_time"] for r in rows[args.warmup:]]
    first, last = min(s for s in marks if s > args.warmup), max(marks)
    per_step = ((marks[last] - marks[first]) / (last - first)) if last > first else None
    return {"step_s": statistics.median(times), "step_times": times,
            "bytes_per_step": per_step if two_nodes else 0.0}


def model_estimate(args):
    """The communication model's estimate for the runs: 4 ranks, 2 per node."""
    from ponder_pt.engine import comm_model
    from ponder_pt.train import resolve

    cfg, _ = resolve(CONFIG, overrides(args), 4, need_tokenizer=False)
    return comm_model.estimate(cfg, 4, 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gbps", type=float, nargs="+", default=[20.0, 5.0, 1.0])
    ap.add_argument("--delay-ms", type=float, default=0.0,
                    help="added at each end of a link (needs the kernel's netem)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ponder", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=50304, help="model.vocab_size (70m's)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    add_record_arg(ap, "bench_multinode")
    args = ap.parse_args(argv)
    reason = why_not_here()
    if reason:
        print(f"bench_multinode: {reason}", file=sys.stderr)
        return 2
    started = environment()
    work = tempfile.mkdtemp(prefix="bench-multinode-")
    sim = SimCluster("pbench", 2, work)
    results = []
    est = model_estimate(args)
    try:
        data, tok = prepare_data(work)
        sim.up()
        base = run_once(sim, args, os.path.join(work, "one_node"), data, tok, False, 29411)
        print(f"one node, 4 ranks: {base['step_s']:.3f} s/step", flush=True)
        results.append({"run": "1 node x 4 ranks", "gbps": None, **base,
                        "pred_step_s": base["step_s"], "pred_bytes": 0.0})
        for i, gbps in enumerate([None, *args.gbps]):
            sim.shape(gbps * 1000 if gbps else None, args.delay_ms if gbps else 0.0)
            got = run_once(sim, args, os.path.join(work, f"two_{i}"), data, tok, True,
                           29412 + i)
            pred_bytes = est.node_bytes.get(0, 0.0)  # what node1 sends per step
            # the delay is added on the node's side and on the switch's: one way crosses both
            pred_comm = est.seconds(gbps, 2 * args.delay_ms * 1000) if gbps else 0.0
            label = f"2 nodes x 2 ranks, {f'{gbps:g} Gbit/s' if gbps else 'unshaped'}"
            results.append({"run": label, "gbps": gbps, **got, "pred_bytes": pred_bytes,
                            "pred_step_s": base["step_s"] + pred_comm if gbps else None})
            print(f"{label}: {got['step_s']:.3f} s/step, "
                  f"{(got['bytes_per_step'] or 0) / 2**20:.1f} MiB/step sent by node1",
                  flush=True)
    except NetnsUnavailable as exc:
        print(f"bench_multinode: {exc}", file=sys.stderr)
        return 2
    finally:
        sim.shape(None)
        sim.down()
    lines = [f"pythia-70m shape, DP = 4 (ZeRO-1, fp32), micro-batch {args.micro_batch} x seq "
             f"{args.seq_len}, K = {args.ponder}; links delayed {args.delay_ms:g} ms at each "
             f"end; median of steps {args.warmup + 1}..{args.steps}; the links' own latency "
             "is not in the prediction", "",
             "| run | step (s) | predicted (s) | measured / predicted | MiB sent per step by "
             "node1 | predicted MiB |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        pred = r["pred_step_s"]
        ratio = f"{r['step_s'] / pred:.2f}" if pred else "-"
        sent = (f"{r['bytes_per_step'] / 2**20:,.1f}" if r["bytes_per_step"] is not None
                else "?")
        lines.append(f"| {r['run']} | {r['step_s']:.3f} | {f'{pred:.3f}' if pred else '-'} | "
                     f"{ratio} | {sent} | {r['pred_bytes'] / 2**20:,.1f} |")
    table = "\n".join(lines)
    print("\n" + table)
    write_record(args.record, "bench_multinode.py", args, results, table, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
