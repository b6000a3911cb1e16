#!/usr/bin/env python
"""Build an offline wheelhouse (`make wheelhouse`): every wheel that ponder-pt and its extras
need, at the versions of requirements/lock.txt, for one Python version and platform, so that
air-gapped cluster nodes install with `pip install --no-index --find-links wheelhouse/`.

  python tools/wheelhouse.py --python-version 3.12 --platform manylinux_2_28_x86_64 --out wheelhouse

* Binary wheels are downloaded for the target (which need not be this machine): markers in the
  lock are evaluated for the target Python and platform, and every manylinux tag the target's
  glibc accepts is offered to pip.
* Packages published only as source archives (deepspeed among them: its ops JIT-compile on
  the GPU node) are built here into wheels; each must come out pure Python
  (`py3-none-any`), or the build stops, since a wheel compiled here would not fit the target.
* torch is left out unless --with-torch: clusters bring their own CUDA build.
* ponder-pt itself is built from this checkout.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import parse_wheel_filename

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def target_platforms(platform: str) -> list[str]:
    """manylinux_2_28_x86_64 -> the tags a glibc-2.28 x86-64 machine accepts (pip matches each
    --platform exactly, so the older manylinux tags must be listed too)."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    glibc, arch = int(m.group(1)), m.group(2)
    tags = [f"manylinux_2_{n}_{arch}" for n in range(glibc, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return tags + [f"{name}_{arch}" for n, name in legacy.items() if glibc >= n]


def locked_requirements(lock: str, python_version: str, platform: str) -> list[Requirement]:
    arch = platform.rsplit("_", 1)[-1] if "x86_64" not in platform else "x86_64"
    env = {"python_version": python_version, "python_full_version": python_version + ".0",
           "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
           "platform_machine": arch, "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "extra": ""}
    reqs = []
    for line in open(lock):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is None or Marker(str(req.marker)).evaluate(env):
            reqs.append(req)
    return reqs


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd[:8]), "..." if len(cmd) > 8 else "", flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lock", default=os.path.join(REPO, "requirements", "lock.txt"))
    ap.add_argument("--python-version", default=f"{sys.version_info[0]}.{sys.version_info[1]}")
    ap.add_argument("--platform", default="manylinux_2_28_x86_64")
    ap.add_argument("--with-torch", default="0", choices=["0", "1"])
    ap.add_argument("--torch-version", default=None,
                    help="with --with-torch 1 (default: the torch installed here)")
    ap.add_argument("--only", default="",
                    help="comma-separated package names: a partial wheelhouse (e.g. what a GPU "
                         "image lacks); default: everything")
    ap.add_argument("--out", default=os.path.join(REPO, "wheelhouse"))
    args = ap.parse_args(argv)

    pyver = args.python_version
    abi = "cp" + pyver.replace(".", "")
    reqs = locked_requirements(args.lock, pyver, args.platform)
    if args.only:
        want = {n.strip().lower().replace("_", "-") for n in args.only.split(",") if n.strip()}
        reqs = [r for r in reqs if r.name.lower() in want]
        missing = want - {r.name.lower() for r in reqs} - {"ponder-pt"}
        if missing:
            raise SystemExit(f"--only names packages not in {args.lock}: {sorted(missing)}")
    os.makedirs(args.out, exist_ok=True)
    target = ["--python-version", pyver, "--implementation", "cp", "--abi", abi,
              "--abi", "abi3", "--abi", "none"]
    for tag in target_platforms(args.platform):
        target += ["--platform", tag]
    target += ["--platform", "any"]

    with tempfile.TemporaryDirectory() as tmp:
        # --no-deps: the lock already lists the whole closure; it also lets pip fall back to a
        # source archive where a package has no wheel (built below)
        with open(os.path.join(tmp, "pins.txt"), "w") as fh:
            fh.writelines(f"{r.name}=={next(iter(r.specifier)).version}\n" for r in reqs)
        pip("download", "--no-deps", "--quiet", "-d", tmp, *target, "-r", fh.name)
        if args.with_torch == "1":
            import importlib.metadata as md
            version = args.torch_version or md.version("torch").split("+")[0]
            # torch's CUDA runtime wheels are its own dependencies: resolve them for the target
            pip("download", "--only-binary=:all:", "--quiet", "-d", tmp, *target,
                f"torch=={version}")
        for sdist in sorted(glob.glob(os.path.join(tmp, "*.tar.gz")) +
                            glob.glob(os.path.join(tmp, "*.zip"))):
            name = os.path.basename(sdist)
            # deepspeed's setup.py imports torch: build it against the torch installed here
            isolation = ["--no-build-isolation"] if name.startswith("deepspeed") else []
            pip("wheel", "--no-deps", "--quiet", *isolation, "-w", tmp, sdist)
            os.remove(sdist)
        pip("wheel", "--no-deps", "--quiet", "-w", tmp, REPO)
        for whl in glob.glob(os.path.join(tmp, "*.whl")):
            _, _, _, tags = parse_wheel_filename(os.path.basename(whl))
            built_here = any(t.platform.startswith("linux_") for t in tags)
            if built_here:
                raise SystemExit(f"{os.path.basename(whl)} was compiled on this machine and "
                                 f"would not fit {args.platform}; find a binary wheel for it")
            shutil.move(whl, os.path.join(args.out, os.path.basename(whl)))
    wheels = sorted(glob.glob(os.path.join(args.out, "*.whl")))
    size = sum(os.path.getsize(w) for w in wheels) / 2**20
    print(f"{args.out}: {len(wheels)} wheels, {size:.1f} MiB, for CPython {pyver} on "
          f"{args.platform}{' with torch' if args.with_torch == '1' else ' (torch not included)'}")
    print(f"install: pip install --no-index --find-links {args.out} 'ponder-pt[eval,wandb]'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
