# Shared body of the slurm/pretrain_*.sh scripts (sourced, not run). They set CONFIG, NODES,
# TP, PP, ZERO, MICRO and EXTRA (more --set pairs), then source this file with "$@".
# Submit from the repository root. DATA, TOKENIZER, RUN_DIR, PYTHON may be overridden.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}"
GPUS_PER_NODE=8
NAME="${SLURM_JOB_NAME:-pretrain_${CONFIG//-/_}}"
DATA="${DATA:-data/pile_deduped_text_document}"
TOKENIZER="${TOKENIZER:-tokenizers/gpt-neox-20b}"
RUN_DIR="${RUN_DIR:-runs/$NAME}"
PYTHON="${PYTHON:-python}"

ARGS=(--config "$CONFIG"
  --set "parallel.tp=$TP" --set "parallel.pp=$PP" --set "parallel.zero_stage=$ZERO"
  --set "train.micro_batch=$MICRO" --set train.precision=bf16 "${EXTRA[@]}"
  --set "data.train=[$DATA]" --set "data.tokenizer=$TOKENIZER"
  --set "checkpoint.dir=$RUN_DIR/checkpoints" --set checkpoint.interval=1000
  --set "log.dir=$RUN_DIR" --set log.tensorboard=true)
# one task per GPU, so SLURM's preemption signal reaches every rank directly
LAUNCH=(srun --kill-on-bad-exit=1 --cpu-bind=none "$PYTHON" -m ponder_pt.train "${ARGS[@]}")

if [[ "${1:-}" == "--dry-run" ]]; then
  WORLD_SIZE=$((NODES * GPUS_PER_NODE)) PONDER_PT_LAUNCH="sbatch -> ${LAUNCH[*]}" \
    exec "$PYTHON" -m ponder_pt.train "${ARGS[@]}" --dry-run
fi

source launchers/env.sh
mkdir -p logs "$RUN_DIR"
set +e
"${LAUNCH[@]}"
rc=$?
set -e
if [[ $rc -eq 99 ]]; then  # every rank saved on the signal: continue in a requeued job
  echo "requeueing $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit $rc
