#!/bin/bash
# DeepSpeed's own launcher over pdsh/ssh, with a hostfile built from the SLURM allocation.
# Run once (on the first node) inside an allocation:
#   salloc -N 4 --gpus-per-node 8 bash launchers/deepspeed_multinode.sh --config ponderpythia-1b --set ...
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/env.sh
HOSTFILE="${HOSTFILE:-$(mktemp)}"
python launchers/slurm_hosts.py --hostfile "$HOSTFILE" --slots "${GPUS_PER_NODE:-8}" >/dev/null
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  ponder_pt/train.py "$@"
