#!/usr/bin/env bash
# On a lent GPU machine, with the .gpu/ folder from `make gpu-bundle` carried over: install the
# bundled wheels (no index) beside the machine's own torch and transformers, then run the GPU
# suite from the bundled snapshot. Results go to $OUT/gpu (the device tool's output folder),
# else /tmp/gpu_out. Extra arguments go to benchmarks/gpu_suite.py (e.g. --sections gen).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # .gpu/repo
site=/tmp/ponder_site
wheels=$(ls "$here"/../whl/*.whl | grep -v '/ponder_pt-')   # ponder-pt runs from the snapshot
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" $wheels
export PYTHONPATH="$site" PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_ext
cd "$here"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 benchmarks/gpu_suite.py --out "${OUT:-/tmp/gpu_out}/gpu" "$@"
