#!/usr/bin/env bash
# On a lent GPU machine, with the .gpu/ folder from `make gpu-bundle` carried over: install the
# bundled wheels (no index) beside the machine's own torch and transformers, run the test
# suite's `gpu`-marked tests (GPU_TESTS=0 skips them; at most GPU_TESTS_S seconds, 150), then
# the GPU suite from the bundled snapshot. Results go to $OUT/gpu (the device tool's output
# folder), else /tmp/gpu_out: gpu_tests.txt, gpu_results.{json,md}. Extra arguments go to
# benchmarks/gpu_suite.py (e.g. --sections gen); without --budget the suite gets what is left
# of 480 s after the tests.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # .gpu/repo
site=/tmp/ponder_site
wheels=$(ls "$here"/../whl/*.whl | grep -v '/ponder_pt-')   # ponder-pt runs from the snapshot
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" $wheels
export PYTHONPATH="$site" PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_ext
cd "$here"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out="${OUT:-/tmp/gpu_out}/gpu"
mkdir -p "$out"
start=$SECONDS
if [ "${GPU_TESTS:-1}" != 0 ]; then
  # a failing or hanging test must not cost the suite's run: record it and go on
  # only the files that hold gpu tests: the others may import what this machine lacks
  timeout "${GPU_TESTS_S:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider \
    $(grep -l "mark.gpu" tests/test_*.py) > "$out/gpu_tests.txt" 2>&1 \
    || echo "gpu tests: exit $?" >> "$out/gpu_tests.txt"
  tail -n 5 "$out/gpu_tests.txt"
fi
# the tests' time comes out of the suite's default 480 s, so that the whole call stays
# inside one 10-minute command; an explicit --budget wins
case " $* " in
  *" --budget"*|*" --smoke "*) ;;
  *) set -- --budget $((480 - (SECONDS - start))) "$@" ;;
esac
exec python3 benchmarks/gpu_suite.py --out "$out" "$@"
