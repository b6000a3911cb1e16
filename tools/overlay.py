#!/usr/bin/env python
"""Install, into --target, the pins of one lock file that differ from another's, with their
dependencies at --lock's versions (`make test-compat`): the venv holds --base, and
PYTHONPATH=--target turns it into --lock's environment without a second full install.

  python tools/overlay.py --base requirements/lock.txt \
      --lock requirements/lock-transformers-oldest.txt --target .venv-compat
  python tools/overlay.py --lock requirements/lock-transformers-oldest.txt --version-of transformers
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement


def pins(lock: str) -> dict[str, str]:
    """name -> version for the lines of a uv lock that apply to this interpreter."""
    env = default_environment()
    out = {}
    for line in open(lock):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            out[req.name.lower()] = next(iter(req.specifier)).version
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base")
    ap.add_argument("--lock", required=True)
    ap.add_argument("--target")
    ap.add_argument("--version-of", help="print this package's pinned version and exit")
    args = ap.parse_args(argv)
    want = pins(args.lock)
    if args.version_of:
        print(want[args.version_of.lower()])
        return 0
    if not (args.base and args.target):
        ap.error("--base and --target are needed to build an overlay")
    have = pins(args.base)
    diff = sorted(f"{n}=={v}" for n, v in want.items() if have.get(n) != v)
    stamp = os.path.join(args.target, ".overlay.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == diff:
        print(f"{args.target}: up to date ({', '.join(diff)})")
        return 0
    shutil.rmtree(args.target, ignore_errors=True)
    print(f"{args.target}: {', '.join(diff) or 'nothing differs'}", flush=True)
    if diff:
        # with dependencies: a changed pin can need a package the venv lacks (e.g. an older
        # huggingface-hub needs httpx); --lock as constraints keeps all of them at its pins
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target",
                        args.target, "-c", args.lock, *diff], check=True)
    os.makedirs(args.target, exist_ok=True)
    json.dump(diff, open(stamp, "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
