#!/usr/bin/env python
"""The CPU tables of benchmarks/README.md, written from the raw output the benchmarks saved.

    python benchmarks/cpu_tables.py            # rewrite every marked block from its raw file
    python benchmarks/cpu_tables.py --check    # exit 1 where a block differs from its raw file

A block is marked in the README as

    <!-- cpu-table results/cpu/bench_data.json -->
    ...written here...
    <!-- /cpu-table -->

and holds the table that the script's own `render_table(record)` makes from the recorded
measurements (the function it prints with; the `table` string saved beside them is not read),
under a line with the file, the date, the load average, the torch version and the source of
the run (its commit, and whether the tree had uncommitted changes). A `.txt` file (the stdout
of a script that predates `--record`, e.g. an old commit's) is shown as it is.
tests/test_cpu_tables.py runs the check, so no hand-edited number stays in a marked table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")
BLOCK = re.compile(r"(<!-- cpu-table (\S+) -->\n)(.*?)(<!-- /cpu-table -->)", re.S)


def _load(raw: str) -> str:
    return ", ".join(f"{x:g}" for x in raw) if raw else "?"


def source_line(doc: dict) -> str:
    src = doc.get("source") or {}
    commit = (src.get("commit") or "?")[:7]
    if src.get("dirty"):
        return (f"commit {commit} with uncommitted changes to {len(src['changed_files'])} "
                f"file(s), diff sha256 {(src.get('diff_sha256') or '?')[:12]}")
    if "dirty" not in src and src.get("modified_files"):  # records from before the diff hash
        return f"commit {commit} with {src['modified_files']} modified file(s), diff not recorded"
    return f"commit {commit}"


def render_table(doc: dict) -> str:
    """The script's table of a record, made from its measurements by the script itself."""
    name = os.path.splitext(os.path.basename(doc["script"]))[0]
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    module = importlib.import_module(name)
    return module.render_table(doc)


def render(rel: str, root: str = HERE) -> str:
    """The block's text for raw file `rel` (relative to `root`, the README's folder)."""
    path = os.path.join(root, rel)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{rel}: no such raw output; run the command above the block "
                                f"(it writes the file), then this script again")
    if rel.endswith(".txt"):
        with open(path, encoding="utf-8") as fh:
            return f"Raw output: [{rel}]({rel}) (stdout, shown as printed).\n\n{fh.read().strip()}\n"
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    start = doc.get("load_average_at_start")
    end = (doc.get("machine") or {}).get("load_average_1_5_15")
    torch = (doc.get("versions") or {}).get("torch")
    head = (f"Raw output: [{rel}]({rel}) ({doc['date'][:10]}, `{doc['script']}"
            f"{' ' + ' '.join(doc['argv']) if doc.get('argv') else ''}`, torch {torch}; "
            f"1-minute load average {_load(start[:1] if start else None)} at the start, "
            f"{_load(end[:1] if end else None)} at the end; {source_line(doc)}).")
    return f"{head}\n\n{render_table(doc).strip()}\n"


def rewrite(text: str, root: str = HERE) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group(2), root) + m.group(4), text)


def marked(text: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(text)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", default=README)
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 where a block differs from its raw file")
    args = ap.parse_args(argv)
    with open(args.readme, encoding="utf-8") as fh:
        text = fh.read()
    try:
        new = rewrite(text, os.path.dirname(os.path.abspath(args.readme)))
    except FileNotFoundError as e:
        print(f"cpu_tables: {e}", file=sys.stderr)
        return 1
    stale = [rel for rel, old, cur in zip(marked(text), BLOCK.findall(text), BLOCK.findall(new))
             if old[2] != cur[2]]
    if args.check:
        for rel in stale:
            print(f"cpu_tables: the table of {rel} in {args.readme} is not what the raw file "
                  f"says: run python benchmarks/cpu_tables.py", file=sys.stderr)
        return 1 if stale else 0
    if new != text:
        tmp = args.readme + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(new)
        os.replace(tmp, args.readme)
    print(f"cpu_tables: {len(marked(text))} table(s), {len(stale)} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
