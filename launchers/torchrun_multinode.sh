#!/bin/bash
# torchrun on every node with c10d rendezvous at the first node:
#   srun --ntasks-per-node=1 bash launchers/torchrun_multinode.sh --config ... --set ...
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/env.sh
exec python -m torch.distributed.run --nnodes "${SLURM_NNODES:-1}" \
  --nproc-per-node "${GPUS_PER_NODE:-8}" --rdzv-backend c10d \
  --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${SLURM_JOB_ID:-ponder}" \
  -m ponder_pt.train "$@"
