#!/bin/bash
# DeepSpeed's own launcher over pdsh/ssh, with a hostfile built from the SLURM allocation.
# Run once (on the first node) inside an allocation:
#   salloc -N 4 --gpus-per-node 8 bash launchers/deepspeed_multinode.sh --config ponderpythia-1b --set ...
# Slots per node: NPROC_PER_NODE, else GPUS_PER_NODE (8); GPUS_PER_NODE=0 runs NPROC_PER_NODE
# (default 1) CPU processes per node with gloo.
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/env.sh
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$((GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1))}"
if [[ "${SLURM_NNODES:-1}" == 1 && -z "${HOSTFILE:-}" ]]; then
  # one node: no hostfile, or DeepSpeed insists on reaching this very host over ssh
  exec "${DEEPSPEED:-deepspeed}" --num_gpus "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" ponder_pt/train.py "$@"
fi
HOSTFILE="${HOSTFILE:-$(mktemp)}"
"${PYTHON:-python3}" launchers/slurm_hosts.py --hostfile "$HOSTFILE" --slots "$NPROC_PER_NODE" >/dev/null
# pdsh starts the remote ranks with ssh's bare environment; DeepSpeed forwards only a few
# prefixes (PYTHON*, NCCL*, ...) and what DS_ENV_FILE lists: list env.sh's settings and the
# caches and paths a run reads (unless you pass your own DS_ENV_FILE)
if [[ -z "${DS_ENV_FILE:-}" ]]; then
  DS_ENV_FILE="$(mktemp)"
  for var in OMP_NUM_THREADS TOKENIZERS_PARALLELISM CUDA_DEVICE_MAX_CONNECTIONS \
      NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_IB_TIMEOUT \
      NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME TORCH_EXTENSIONS_DIR HF_HOME HF_DATASETS_CACHE \
      TRITON_CACHE_DIR PATH LD_LIBRARY_PATH; do
    if [[ -n "${!var:-}" ]]; then echo "$var=${!var}" >> "$DS_ENV_FILE"; fi
  done
  export DS_ENV_FILE
fi
exec "${DEEPSPEED:-deepspeed}" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" ponder_pt/train.py "$@"
