"""What the launch environment says about who talks to the user, and which Python runs a
child job.

`ponder-pt train --nproc N` starts torchrun with PONDER_PT_LAUNCHER_REPORTS=1: its ranks leave
the notes the launcher already printed, and the report of a stop, to the launcher. Under any
other launcher rank 0 says them once.
"""

from __future__ import annotations

import os
import shlex
import sys

LAUNCHER_REPORTS_ENV = "PONDER_PT_LAUNCHER_REPORTS"
JOB_PYTHON_ENV = "PONDER_JOB_PYTHON"


def job_python() -> list[str]:
    """The command that starts a child job's Python (the study's jobs, the GPU suite's
    sections): $PONDER_JOB_PYTHON when set, e.g. a wrapper that runs the job elsewhere (the
    tests fork jobs from an interpreter that has imported the libraries already); else this
    interpreter."""
    return shlex.split(os.environ.get(JOB_PYTHON_ENV, "")) or [sys.executable]


def is_main_rank() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def launcher_reports() -> bool:
    """True in the ranks of `ponder-pt train --nproc N`, whose launcher reports to the user."""
    return os.environ.get(LAUNCHER_REPORTS_ENV) == "1"


def tells_the_user() -> bool:
    """Whether this process prints notes meant for the user once per run."""
    return is_main_rank() and not launcher_reports()
