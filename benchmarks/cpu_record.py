"""Raw output of the CPU benchmarks. Each script writes what it measured, with the machine, the
library versions, the date, its arguments, the source (commit; from a tree with uncommitted
changes also the sha256 of `git diff HEAD` and the changed files) and the markdown table it
printed, to a json file (`--record PATH`; by default benchmarks/results/cpu/<name>.json).
Each script's `render_table(record)` makes its table from the measurements; it prints that
and benchmarks/cpu_tables.py writes it into benchmarks/README.md under the file's name."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "cpu")


def default_path(name: str) -> str:
    return os.path.join(RESULTS, f"{name}.json")


def add_record_arg(parser, name: str) -> None:
    parser.add_argument("--record", default=default_path(name), metavar="PATH",
                        help="write the measurements, machine, versions, date and arguments "
                             "here as json (default: %(default)s; '' for none)")


def _version(dist: str):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def git_source() -> dict:
    def git(*a):
        out = subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    # a dirty tree is recorded, not refused (several people edit this checkout at once): the
    # hash of `git diff HEAD` and the changed files say which code printed the numbers
    changed = git("diff", "HEAD", "--name-only")
    diff = subprocess.run(["git", "-C", REPO, "diff", "HEAD"], capture_output=True)
    files = changed.splitlines() if changed else []
    return {"commit": git("rev-parse", "HEAD"),
            "modified_files": None if changed is None else len(files),
            "dirty": bool(files),
            "diff_sha256": (hashlib.sha256(diff.stdout).hexdigest()
                            if files and diff.returncode == 0 else None),
            "changed_files": files}


def environment() -> dict:
    """The machine and the versions a measurement ran on."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"machine": {"platform": platform.platform(), "arch": platform.machine(),
                        "processor": platform.processor() or None, "cpus": os.cpu_count(),
                        "load_average_1_5_15": [round(x, 2) for x in load] if load else None},
            "versions": {"python": platform.python_version(),
                         **{d: _version(d) for d in ("torch", "ponder-pt", "deepspeed",
                                                     "megatron-core", "transformers",
                                                     "tokenizers")}},
            "source": git_source()}


def draft(args, measurements, context: dict | None = None, started: dict | None = None) -> dict:
    """What a record holds that a script's `render_table` reads (its arguments, measurements,
    the machine and versions, and `context`: settings the arguments do not hold, e.g. torch's
    thread count), for printing the table the same way benchmarks/cpu_tables.py renders it."""
    doc = {"args": {k: v for k, v in vars(args).items() if k != "record"},
           **environment(), "measurements": measurements, "context": context or {}}
    if started:
        doc["load_average_at_start"] = started["machine"]["load_average_1_5_15"]
    return doc


def write_record(path: str, script: str, args, measurements, table: str,
                 started: dict | None = None, context: dict | None = None) -> str | None:
    """Write the json (nothing when `path` is empty); `started`: `environment()` taken before
    the measurements (its load average), kept beside the one at the end. `table` is kept as
    printed, for reference only: the README's tables are rendered from the measurements by
    the script's `render_table` (benchmarks/cpu_tables.py)."""
    if not path:
        return None
    doc = {"script": f"benchmarks/{script}", "argv": sys.argv[1:],
           "args": {k: v for k, v in vars(args).items() if k != "record"},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           **environment(), "measurements": measurements, "context": context or {},
           "table": table}
    if started:
        doc["load_average_at_start"] = started["machine"]["load_average_1_5_15"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)
    print(f"\nraw output: {os.path.relpath(path, REPO)}")
    return path
