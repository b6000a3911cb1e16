"""Where the ranks of a run meet: MASTER_ADDR and MASTER_PORT.

A launcher (torchrun, deepspeed, `ponder-pt train --nproc`, launchers/env.sh under SLURM)
sets both, the same on every rank. `srun python -m ponder_pt.train` without env.sh sets
neither: every rank then derives them from the SLURM allocation the same way (the job's first
host, a port from the job id). Anywhere else a multi-process world without them is an error:
each rank would pick its own port and wait forever. Imports nothing heavy (env.sh's helper
launchers/slurm_hosts.py uses it at every job start).
"""

from __future__ import annotations

import os
import re
from typing import MutableMapping

PORT_BASE, PORT_SPAN = 20000, 20000  # launchers/env.sh uses the same formula


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[001-003,007],cpu5") as host names."""
    hosts: list[str] = []
    # split on commas that are not inside brackets
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                for n in range(int(lo), int(hi) + 1):
                    hosts.append(f"{prefix}{n:0{len(lo)}d}{suffix}")
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    return hosts


def slurm_port(job_id: str) -> int:
    """The rendezvous port of SLURM job `job_id`: the same on every node of the job, and
    different for jobs whose ids differ by less than PORT_SPAN (two jobs sharing a host)."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def set_rendezvous(env: MutableMapping[str, str], free_port) -> None:
    """Fill in MASTER_ADDR / MASTER_PORT of `env` (WORLD_SIZE already set): kept as the
    launcher set them; derived from SLURM_JOB_NODELIST and SLURM_JOB_ID when a SLURM step
    started the ranks itself; for one process, localhost and `free_port()`. Raises ValueError
    naming the fix for a multi-process world with neither."""
    world = int(env.get("WORLD_SIZE", "1"))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if not missing:
        return
    if world == 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        if not env.get("MASTER_PORT"):
            env["MASTER_PORT"] = str(free_port())
        return
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    job_id = env.get("SLURM_JOB_ID")
    if nodelist and job_id:
        if not env.get("MASTER_ADDR"):
            env["MASTER_ADDR"] = expand_nodelist(nodelist)[0]
        if not env.get("MASTER_PORT"):
            env["MASTER_PORT"] = str(slurm_port(job_id))
        return
    raise ValueError(
        f"WORLD_SIZE={world} but {' and '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not set, and this is no SLURM step to derive "
        f"{'it' if len(missing) == 1 else 'them'} from: each rank would pick its own and wait "
        "for the others forever. Launch with `ponder-pt train --nproc N`, torchrun or "
        "deepspeed (they set both), or export MASTER_ADDR (rank 0's host) and MASTER_PORT (a "
        "free port there) with the same values on every rank")
