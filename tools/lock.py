#!/usr/bin/env python
"""Regenerate the lock files (`make lock`): every dependency of ponder-pt and its extras,
pinned, for Python 3.11+ on any platform, resolved by `uv pip compile --universal`.

  requirements/lock.txt                       the newest releases the ranges allow: what
                                              `make test`, `make demo` and CI install
  requirements/lock-transformers-oldest.txt   the same with transformers at the lower bound of
                                              its declared range (`make test-compat`)

torch is left out, and so are the CUDA runtime wheels that only torch pulls in (nvidia-*,
triton): the Makefile installs the tested CPU build first, and on a GPU cluster the site's
CUDA torch is kept, so pinning its runtime here would make pip fight the site's torch.
The lock is used as a pip constraints file (-c): it fixes the version of everything that
gets installed without adding anything that is not needed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

EXTRAS = ("dev", "eval", "wandb")
# only torch needs these; they follow whichever torch is installed
TORCH_RUNTIME = re.compile(r"^(nvidia-[a-z0-9-]+|triton|cuda-[a-z0-9-]+)==", re.M)


def transformers_lower_bound(pyproject: str = "pyproject.toml") -> str:
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.load(open(pyproject, "rb"))["project"]["dependencies"]
    spec = next(Requirement(d).specifier for d in deps if Requirement(d).name == "transformers")
    lows = [s.version for s in spec if s.operator == ">="]
    if len(lows) != 1:
        raise SystemExit(f"pyproject.toml: transformers needs one '>=' lower bound, got {spec}")
    return lows[0]


# held back where the newest release makes the resolver trade something worse down
CONSTRAINTS = "requirements/lock-constraints.txt"


def compile_cmd(uv: str, out: str, exclude: list[str], upgrade: bool,
                constraints: tuple[str, ...] = (CONSTRAINTS,)) -> list[str]:
    cmd = [uv, "pip", "compile", "pyproject.toml", "--universal", "--python-version", "3.11",
           "--quiet", "-o", out, "--custom-compile-command", "make lock"]
    cmd += [a for e in EXTRAS for a in ("--extra", e)]
    cmd += [a for p in ["torch", *exclude] for a in ("--no-emit-package", p)]
    if upgrade:
        cmd.append("--upgrade")
    for path in constraints:
        cmd += ["--constraint", path]
    return cmd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uv", default="uv")
    ap.add_argument("--out", default="requirements/lock.txt")
    ap.add_argument("--oldest-out", default="requirements/lock-transformers-oldest.txt")
    ap.add_argument("--upgrade", action="store_true",
                    help="re-resolve everything to the newest allowed releases")
    args = ap.parse_args(argv)
    # first pass finds the torch-only runtime packages, second pass writes without them
    subprocess.run(compile_cmd(args.uv, args.out, [], args.upgrade), check=True)
    runtime = sorted(set(TORCH_RUNTIME.findall(open(args.out).read())))
    subprocess.run(compile_cmd(args.uv, args.out, runtime, False), check=True)
    pins = [l for l in open(args.out) if re.match(r"^[A-Za-z0-9]", l)]
    print(f"{args.out}: {len(pins)} pinned packages (left out: torch, {', '.join(runtime)})")

    oldest = transformers_lower_bound()
    pin = args.oldest_out + ".in"
    with open(pin, "w") as fh:
        fh.write(f"transformers=={oldest}\n")
    try:
        subprocess.run(compile_cmd(args.uv, args.oldest_out, runtime, False,
                                   (CONSTRAINTS, pin)), check=True)
    finally:
        os.remove(pin)
    print(f"{args.oldest_out}: transformers=={oldest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
