# Sourced by the launchers and sbatch scripts: rendezvous address and NCCL settings.
# Override any of these in the environment before submitting.
# MASTER_ADDR: the job's first host. Only a one-node job may fall back to this host's loopback;
# with more nodes the others could never reach it, so that is an error here, not a hang later.
if [[ -z "${MASTER_ADDR:-}" ]]; then
  MASTER_ADDR="$("${PYTHON:-python3}" launchers/slurm_hosts.py --first 2>/dev/null)" || MASTER_ADDR=""
  if [[ -z "$MASTER_ADDR" ]]; then
    if (( ${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}} > 1 )); then
      echo "launchers/env.sh: a ${SLURM_JOB_NUM_NODES:-$SLURM_NNODES}-node job, but the first host of SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}' could not be found; export MASTER_ADDR (the first node's address) before submitting" >&2
      exit 2
    fi
    MASTER_ADDR=127.0.0.1
  fi
fi
if (( ${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}} > 1 )) && ! "${PYTHON:-python3}" -c \
    'import socket, sys; socket.getaddrinfo(sys.argv[1], None)' "$MASTER_ADDR" 2>/dev/null; then
  echo "launchers/env.sh: MASTER_ADDR=$MASTER_ADDR does not resolve on $(hostname); the other nodes could not reach it either: export MASTER_ADDR as an address every node resolves" >&2
  exit 2
fi
export MASTER_ADDR
# MASTER_PORT: from the job id under SLURM (the same on every node, as ponder_pt.engine.rendezvous
# derives it; jobs sharing a host differ); elsewhere a port the OS says is free, so two runs
# started on one host never collide
if [[ -z "${MASTER_PORT:-}" ]]; then
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
  else
    MASTER_PORT="$("${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
  fi
fi
export MASTER_PORT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # TP comm/compute overlap
export NCCL_ASYNC_ERROR_HANDLING=1      # fail fast instead of hanging on a dead rank
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
# export NCCL_SOCKET_IFNAME=ib0         # set to the cluster's fabric interface if needed
# export NCCL_DEBUG=INFO                # when debugging hangs
