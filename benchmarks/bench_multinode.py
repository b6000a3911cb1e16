#!/usr/bin/env python
"""Training across 2 simulated nodes on shaped links, against one node of the same world size
and against the communication model of `train --dry-run`.

  sudo python benchmarks/bench_multinode.py [--layouts zero1 ...] [--gbps 0 20 5 1] [--steps 8]

Two nodes are network namespaces on a private bridge (tools/netns_cluster.py); `tc` gives
each link a rate (tbf) in both directions, and with --delay-ms a delay (netem, where the
kernel has it). torchrun starts the ranks of a layout (LAYOUTS: ZeRO-1/2/3 with DP = 4 on
2 x 2 ranks; TP = 2 on 2 x 1 ranks, so the TP group spans the nodes; PP = 2, DP = 2 on 2 x 2
ranks, so the stage boundary crosses them) of the pythia-70m shape (fp32), once with every
rank on one node and once on two nodes per `--gbps` (0: unshaped). Per run: the median step
time (the first `--warmup` steps left out), the bytes each node sent per step over its link
(the bridge port's counters, read as the steps are logged), and the model's bytes and
communication time (ponder_pt/engine/comm_model.py). The table sets the measured extra time
(two-node step - one-node step of the same layout) against the modelled communication time.
Needs root; the namespaces are removed at the end, also on failure.
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

# name -> (settings, ranks per node, what it is, global batch in micro-batches); 2 nodes each.
# ZeRO-2 runs 2 micro-batches per step (gradient accumulation 2), as it reduces the gradients
# of every micro-batch where ZeRO-1 reduces once per step.
LAYOUTS = {
    "zero1": (["parallel.zero_stage=1"], 2, "DP = 4, ZeRO-1", 4),
    "zero2": (["parallel.zero_stage=2"], 2, "DP = 4, ZeRO-2, gradient accumulation 2", 8),
    "zero3": (["parallel.zero_stage=3"], 2, "DP = 4, ZeRO-3", 4),
    "tp2": (["parallel.tp=2", "parallel.zero_stage=1"], 1,
            "TP = 2 across the nodes (DP = 1, so gradient accumulation 4)", 4),
    "pp2": (["parallel.pp=2", "parallel.zero_stage=1"], 2,
            "PP = 2 across the nodes, DP = 2 inside each (gradient accumulation 2)", 4),
}


def overrides(args, layout: str = "zero1") -> list[str]:
    settings, _, _, micro_batches = LAYOUTS[layout]
    return [f"ponder.steps={args.ponder}", *settings, "train.precision=fp32",
            f"train.micro_batch={args.micro_batch}",
            f"train.global_batch={micro_batches * args.micro_batch}",
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


def train_cmd(args, layout, run_dir, data, tok, nnodes, nproc, node_rank, port) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
           f"--nproc-per-node={nproc}", f"--node-rank={node_rank}", "--master-addr=node1",
           f"--master-port={port}", "-m", "ponder_pt.train", "--config", CONFIG]
    for item in [*overrides(args, layout), f"data.train=[{data}]", f"data.tokenizer={tok}",
                 f"data.cache_dir={run_dir}/cache", f"log.dir={run_dir}"]:
        cmd += ["--set", item]
    return cmd


def run_once(sim, args, layout, run_dir, data, tok, two_nodes: bool, port: int) -> dict:
    """Step times and per-step bytes each node sent, of one training run."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    os.makedirs(run_dir, exist_ok=True)
    per_node = LAYOUTS[layout][1]
    nodes = [(1, 0, per_node), (2, 1, per_node)] if two_nodes else [(1, 0, 2 * per_node)]
    procs = []
    for node, rank, nproc in nodes:
        cmd = sim.node_command(node, train_cmd(args, layout, run_dir, data, tok, len(nodes),
                                               nproc, rank, port))
        log = open(os.path.join(run_dir, f"node{node}.log"), "w")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=REPO), log))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    marks = {}  # step -> {node: bytes it had sent} when the step was logged
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and any(p.poll() is None for p, _ in procs):
        try:
            steps = [json.loads(line)["step"] for line in open(metrics) if '"loss"' in line]
        except (OSError, ValueError):
            steps = []
        if steps and steps[-1] not in marks:
            marks[steps[-1]] = {n: c.get("tx", 0) for n, c in sim.link_bytes().items()}
        time.sleep(0.05)
    for p, log in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        log.close()
    if any(p.returncode for p, _ in procs):
        tail = open(os.path.join(run_dir, "node1.log")).read()[-3000:]
        raise RuntimeError(f"a training run ({layout}) failed:\n{tail}")
    rows = [json.loads(line) for line in open(metrics) if '"loss"' in line]
    times = [r["step_time"] for r in rows[args.warmup:]]
    first, last = min(s for s in marks if s > args.warmup), max(marks)
    sent = {}
    for n in (1, 2):
        sent[f"node{n}"] = (((marks[last][n] - marks[first][n]) / (last - first))
                            if two_nodes and last > first else (0.0 if not two_nodes else None))
    return {"step_s": statistics.median(times), "step_times": times, "bytes_per_step": sent}


def model_estimate(args, layout: str):
    """The communication model's estimate for a layout's two-node runs."""
    from ponder_pt.engine import comm_model
    from ponder_pt.train import resolve

    per_node = LAYOUTS[layout][1]
    cfg, _ = resolve(CONFIG, overrides(args, layout), 2 * per_node, need_tokenizer=False)
    return comm_model.estimate(cfg, 2 * per_node, per_node)


def _ratio(a, b, digits: int = 2) -> str:
    return f"{a / b:.{digits}f}" if a is not None and b else "-"


def _rows(measured: list) -> list:
    """The measurement rows; those of records from before --layouts (one ZeRO-1 layout; the
    prediction was the one-node step plus the modelled time) are read into the same fields."""
    if all("layout" in r for r in measured):
        return measured
    base = next(r["step_s"] for r in measured if r["run"].startswith("1 node"))
    out = []
    for r in measured:
        one = r["run"].startswith("1 node")
        out.append({"layout": "zero1", "what": "DP = 4, ZeRO-1", "global_batch": 4,
                    "nodes": 1 if one else 2, "ranks": 4, "gbps": r["gbps"],
                    "step_s": r["step_s"], "bytes_per_step": {"node1": r["bytes_per_step"]},
                    "model_bytes": {"node1": r["pred_bytes"]},
                    "model_comm_s": (None if one or r.get("pred_step_s") is None
                                     else r["pred_step_s"] - base)})
    return out


def render_table(doc: dict) -> str:
    """The table of a record (cpu_record.write_record's json) from its measurements alone:
    what this script prints and benchmarks/cpu_tables.py writes into the README."""
    args, rows = doc["args"], _rows(doc["measurements"])
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    head = (f"pythia-70m shape, fp32, micro-batch {args['micro_batch']} x seq "
            f"{args['seq_len']}, K = {args['ponder']}; "
            f"links delayed {args['delay_ms']:g} ms at each end; median of steps "
            f"{args['warmup'] + 1}..{args['steps']}; the links' latency is not in the model")
    first = {name: next(r for r in rows if r["layout"] == name) for name in layouts}
    what = "; ".join(f"{name}: {first[name]['what']}, 2 nodes x {first[name]['ranks'] // 2} "
                     f"ranks, global batch {first[name]['global_batch']}" for name in layouts)
    lines = [head, "", f"Layouts: {what}.", "",
             "| layout | run | step (s) | extra over 1 node (s) | modelled communication (s) "
             "| extra / modelled | MiB sent per step by node1 | modelled MiB | measured / "
             "modelled bytes |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in layouts:
        mine = [r for r in rows if r["layout"] == name]
        base = next((r["step_s"] for r in mine if r["nodes"] == 1), None)
        for r in mine:
            if r["nodes"] == 1:
                lines.append(f"| {name} | 1 node x {r['ranks']} ranks | {r['step_s']:.3f} | - | "
                             "- | - | - | - | - |")
                continue
            link = f"{r['gbps']:g} Gbit/s" if r["gbps"] else "unshaped"
            extra = r["step_s"] - base if base is not None else None
            model_s = r["model_comm_s"]
            sent = r["bytes_per_step"].get("node1")
            lines.append(
                f"| {name} | 2 nodes, {link} | {r['step_s']:.3f} | "
                f"{f'{extra:+.3f}' if extra is not None else '-'} | "
                f"{f'{model_s:.3f}' if model_s is not None else '-'} | "
                f"{_ratio(extra, model_s) if model_s is not None else '-'} | "
                f"{f'{sent / 2**20:,.1f}' if sent is not None else '?'} | "
                f"{r['model_bytes']['node1'] / 2**20:,.1f} | "
                f"{_ratio(sent, r['model_bytes']['node1'], 3)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=["zero1"], choices=sorted(LAYOUTS),
                    help="parallel layouts to run, each on one node and on two")
    ap.add_argument("--gbps", type=float, nargs="+", default=[0.0, 20.0, 5.0, 1.0],
                    help="link rates of the two-node runs, Gbit/s; 0: unshaped")
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
    if any(g < 0 for g in args.gbps):
        ap.error("--gbps: rates must be >= 0 (0: unshaped)")
    reason = why_not_here()
    if reason:
        print(f"bench_multinode: {reason}", file=sys.stderr)
        return 2
    started = environment()
    work = tempfile.mkdtemp(prefix="bench-multinode-")
    sim = SimCluster("pbench", 2, work)
    results, failed, layout = [], None, None
    port = 29411
    try:
        data, tok = prepare_data(work)
        sim.up()
        for layout in args.layouts:
            est = model_estimate(args, layout)
            model_bytes = {f"node{n + 1}": est.node_bytes.get(n, 0.0) for n in range(2)}
            per_node = LAYOUTS[layout][1]
            sim.shape(None)
            got = run_once(sim, args, layout, os.path.join(work, f"{layout}_one"), data, tok,
                           False, port)
            port += 1
            print(f"{layout}, one node, {2 * per_node} ranks: {got['step_s']:.3f} s/step",
                  flush=True)
            about = {"layout": layout, "what": LAYOUTS[layout][2],
                     "global_batch": LAYOUTS[layout][3] * args.micro_batch,
                     "settings": LAYOUTS[layout][0],
                     "model_by_kind": est.by_kind}  # inter-node bytes per step, both nodes
            results.append({**about, "nodes": 1, "ranks": 2 * per_node, "gbps": None,
                            **got, "model_bytes": {"node1": 0.0, "node2": 0.0},
                            "model_comm_s": 0.0})
            for i, gbps in enumerate(args.gbps):
                sim.shape(gbps * 1000 if gbps else None, args.delay_ms if gbps else 0.0)
                got = run_once(sim, args, layout, os.path.join(work, f"{layout}_two_{i}"), data,
                               tok, True, port)
                port += 1
                # the delay is added on the node's side and on the switch's: one way crosses
                # both
                model_s = est.seconds(gbps, 2 * args.delay_ms * 1000) if gbps else None
                results.append({**about, "nodes": 2, "ranks": 2 * per_node,
                                "gbps": gbps or None, **got, "model_bytes": model_bytes,
                                "model_comm_s": model_s})
                sent = got["bytes_per_step"]["node1"] or 0
                print(f"{layout}, two nodes, {f'{gbps:g} Gbit/s' if gbps else 'unshaped'}: "
                      f"{got['step_s']:.3f} s/step, {sent / 2**20:.1f} MiB/step sent by node1 "
                      f"(model {model_bytes['node1'] / 2**20:.1f})", flush=True)
    except NetnsUnavailable as exc:
        print(f"bench_multinode: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a training run failed: keep the layouts that finished
        print(f"bench_multinode: {exc}", file=sys.stderr)
        failed = layout
        results = [r for r in results if r["layout"] != failed]
        args.layouts = [name for name in args.layouts if any(r["layout"] == name
                                                            for r in results)]
        if not results:
            return 1
        print(f"bench_multinode: layout {failed} failed (above); recording the layouts that "
              f"finished: {' '.join(args.layouts)}", file=sys.stderr)
    finally:
        sim.shape(None)
        sim.down()
    doc = {"args": {k: v for k, v in vars(args).items() if k != "record"},
           "measurements": results}
    print("\n" + render_table(doc))
    write_record(args.record, "bench_multinode.py", args, results, render_table(doc), started)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
