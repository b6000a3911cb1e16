#!/bin/bash
# torchrun on every node with c10d rendezvous at the first node:
#   srun --ntasks-per-node=1 bash launchers/torchrun_multinode.sh --config ... --set ...
# Processes per node: NPROC_PER_NODE, else GPUS_PER_NODE (8); GPUS_PER_NODE=0 runs
# NPROC_PER_NODE (default 1) CPU processes with gloo.
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/env.sh
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$((GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1))}"
exec "${PYTHON:-python3}" -m torch.distributed.run --nnodes "${SLURM_NNODES:-1}" \
  --nproc-per-node "$NPROC_PER_NODE" --rdzv-backend c10d \
  --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${SLURM_JOB_ID:-ponder}" \
  -m ponder_pt.train "$@"
