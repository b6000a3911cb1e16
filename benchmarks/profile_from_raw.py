#!/usr/bin/env python
"""The GPU suite's profile tables re-derived from saved gpu_results.json files, on any machine:
raw (as written), corrected (torch's record_function annotations taken out, exact) and
reconstructed (optimizer time from its step's annotation, an upper bound), each labelled
(`benchmarks.gpu.profiling.rederive`).

  python benchmarks/profile_from_raw.py benchmarks/results/gpu_h100_gen_profile/gpu_results.json
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.gpu.profiling import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["--from-raw", *sys.argv[1:]]))
