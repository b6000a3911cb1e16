#!/usr/bin/env python
"""Expand SLURM_JOB_NODELIST ("gpu[001-003,007],cpu5") into host names, and optionally write a
DeepSpeed hostfile ("host slots=N" per line).

  python launchers/slurm_hosts.py                 # one host per line
  python launchers/slurm_hosts.py --first         # the first host (MASTER_ADDR)
  python launchers/slurm_hosts.py --hostfile hostfile --slots 8
Uses `scontrol show hostnames` when it works, else parses the list itself (also where
scontrol is installed but has no cluster configuration, as on a login-less test box).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

# the checkout's package, importable by any python3 (the module needs nothing installed)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ponder_pt.engine.rendezvous import expand_nodelist  # noqa: E402,F401 (this module's API)


def hosts_from_env() -> list[str]:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise SystemExit("error: SLURM_JOB_NODELIST is not set (run inside a SLURM allocation)")
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            out = None
        # a failing scontrol (no slurm.conf, controller down) is no reason to fail here
        if out is not None and out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    return expand_nodelist(nodelist)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--first", action="store_true")
    p.add_argument("--hostfile")
    p.add_argument("--slots", type=int, default=int(os.environ.get("SLURM_GPUS_ON_NODE", 8)))
    args = p.parse_args(argv)
    hosts = hosts_from_env()
    if args.hostfile:
        with open(args.hostfile, "w") as fh:
            fh.writelines(f"{h} slots={args.slots}\n" for h in hosts)
    print(hosts[0] if args.first else "\n".join(hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
