# Sourced by the launchers and sbatch scripts: rendezvous address and NCCL settings.
# Override any of these in the environment before submitting.
export MASTER_ADDR="${MASTER_ADDR:-$("${PYTHON:-python3}" launchers/slurm_hosts.py --first 2>/dev/null || echo 127.0.0.1)}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # TP comm/compute overlap
export NCCL_ASYNC_ERROR_HANDLING=1      # fail fast instead of hanging on a dead rank
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
# export NCCL_SOCKET_IFNAME=ib0         # set to the cluster's fabric interface if needed
# export NCCL_DEBUG=INFO                # when debugging hangs
