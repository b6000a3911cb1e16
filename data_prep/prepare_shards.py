#!/usr/bin/env python
"""Tokenize many corpus shards on a cluster: one indexed dataset per shard, optionally merged.

  # one node, all shards, then one merged prefix
  python data_prep/prepare_shards.py --input 'pile/*.jsonl.gz' --tokenizer tok/ \
      --out-dir data/pile --workers 32 --merge-into data/pile_text_document

  # a SLURM array: task i of N handles shards i, i+N, ...; merge afterwards with --merge-only
  sbatch --array=0-63 data_prep/prepare_array.sbatch
  python data_prep/prepare_shards.py --input 'pile/*.jsonl.gz' --out-dir data/pile \
      --merge-only --merge-into data/pile_text_document

A shard whose .idx and .stats.json exist is skipped, so a re-submitted array resumes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

from ponder_pt.data.prepare import merge, prepare


def shard_prefix(out_dir: str, shard: str) -> str:
    name = os.path.basename(shard)
    name = re.sub(r"(\.jsonl|\.json|\.txt|\.parquet|\.arrow|\.csv)?(\.gz)?$", "", name)
    return os.path.join(out_dir, name)


def expand(patterns: list[str]) -> list[str]:
    shards: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) or ([pattern] if os.path.exists(pattern) else [])
        if not found:
            raise SystemExit(f"error: --input {pattern!r} matches nothing")
        shards.extend(found)
    return shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="shard files or glob patterns")
    p.add_argument("--tokenizer")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--text-key", default="text")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--strict", action="store_true")
    p.add_argument("--task-index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)))
    p.add_argument("--num-tasks", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)))
    p.add_argument("--merge-into", metavar="PREFIX", help="also merge all shard prefixes into one")
    p.add_argument("--merge-only", action="store_true", help="skip tokenizing; only merge")
    args = p.parse_args(argv)

    shards = expand(args.input)
    os.makedirs(args.out_dir, exist_ok=True)
    prefixes = [shard_prefix(args.out_dir, s) for s in shards]
    if len(set(prefixes)) != len(prefixes):
        raise SystemExit("error: two shards map to the same output name; rename or split --out-dir")
    totals = {"shards": 0, "documents_in": 0, "documents_written": 0, "rejected": 0, "tokens": 0}
    if not args.merge_only:
        if not args.tokenizer:
            raise SystemExit("error: --tokenizer is required unless --merge-only")
        mine = list(range(args.task_index, len(shards), args.num_tasks))
        for n, i in enumerate(mine, start=1):
            prefix = prefixes[i]
            if os.path.exists(prefix + ".idx") and os.path.exists(prefix + ".stats.json"):
                print(f"[{n}/{len(mine)}] {shards[i]}: done already, skipping", file=sys.stderr)
                stats = json.load(open(prefix + ".stats.json"))
            else:
                print(f"[{n}/{len(mine)}] {shards[i]} -> {prefix}", file=sys.stderr)
                stats = vars(prepare([shards[i]], args.tokenizer, prefix, text_key=args.text_key,
                                     workers=args.workers, strict=args.strict))
            totals["shards"] += 1
            for key in ("documents_in", "documents_written", "rejected", "tokens"):
                totals[key] += stats[key]
        print(json.dumps(totals), file=sys.stderr)
    if args.merge_into:
        if args.num_tasks > 1 and not args.merge_only:
            print("note: array task; merge later with --merge-only", file=sys.stderr)
            return 0
        missing = [p for p in prefixes if not os.path.exists(p + ".idx")]
        if missing:
            raise SystemExit(f"error: cannot merge, shards not prepared yet: {missing[:5]}")
        docs = merge(prefixes, args.merge_into)
        print(f"merged {len(prefixes)} shards into {args.merge_into}: {docs} documents", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
