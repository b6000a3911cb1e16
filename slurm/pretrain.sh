# Shared body of the slurm/pretrain_*.sh scripts (sourced, not run). They set CONFIG, NODES,
# TP, PP, ZERO, MICRO and EXTRA (more --set pairs), then source this file with "$@".
# Submit from the repository root. DATA, TOKENIZER, RUN_DIR, PYTHON, PRECISION may be
# overridden in the environment; arguments after the script name go to the trainer last, so
# `sbatch slurm/X.sh --set train.iters=30` wins over everything here.
# GPUS_PER_NODE=0 (or `sbatch --gpus-per-node=0`): one CPU task per --ntasks-per-node, gloo,
# fp32 unless PRECISION says otherwise. The worked CPU example is in README.md (SLURM).
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-8}}"
GPUS_PER_NODE="${GPUS_PER_NODE##*:}"  # SLURM writes typed requests as "a100:8"
NAME="${SLURM_JOB_NAME:-pretrain_${CONFIG//-/_}}"
DATA="${DATA:-data/pile_deduped_text_document}"
TOKENIZER="${TOKENIZER:-tokenizers/gpt-neox-20b}"
RUN_DIR="${RUN_DIR:-runs/$NAME}"
PYTHON="${PYTHON:-python3}"
if [[ "$GPUS_PER_NODE" == 0 ]]; then PRECISION="${PRECISION:-fp32}"; else PRECISION="${PRECISION:-bf16}"; fi
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi

ARGS=(--config "$CONFIG"
  --set "parallel.tp=$TP" --set "parallel.pp=$PP" --set "parallel.zero_stage=$ZERO"
  --set "train.micro_batch=$MICRO" --set "train.precision=$PRECISION" "${EXTRA[@]}"
  --set "data.train=[$DATA]" --set "data.tokenizer=$TOKENIZER"
  --set "checkpoint.dir=$RUN_DIR/checkpoints" --set checkpoint.interval=1000
  --set "log.dir=$RUN_DIR" --set log.tensorboard=true "$@")
# one task per GPU (per --ntasks-per-node on CPUs), so SLURM's preemption signal reaches every
# rank directly
LAUNCH=(srun --kill-on-bad-exit=1 --cpu-bind=none "$PYTHON" -m ponder_pt.train "${ARGS[@]}")

if [[ $DRY_RUN == 1 ]]; then
  WORLD_SIZE="${SLURM_NTASKS:-$((NODES * (GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1)))}" \
  PONDER_PT_RANKS_PER_NODE="${SLURM_NTASKS_PER_NODE:-$((GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1))}" \
  PONDER_PT_LAUNCH="sbatch -> ${LAUNCH[*]}" \
    exec "$PYTHON" -m ponder_pt.train "${ARGS[@]}" --dry-run
fi

source launchers/env.sh
mkdir -p logs "$RUN_DIR"
# rank 0 creates this file once every rank has saved on SIGUSR1/SIGTERM (preemption, or
# --signal=USR1@N before the time limit); they exit 99, but srun may report 143 for ranks it
# terminated while they exited, so the file decides
export PONDER_PT_REQUEUE_FILE="$RUN_DIR/.requeue.${SLURM_JOB_ID:-0}"
rm -f "$PONDER_PT_REQUEUE_FILE"
# each rank records its exception here; after a failed srun the log's last line names the
# first failing rank and its message (srun's own lines only give exit codes)
export PONDER_PT_ERROR_DIR="$RUN_DIR/.errors.${SLURM_JOB_ID:-0}"
rm -rf "$PONDER_PT_ERROR_DIR"
set +e
"${LAUNCH[@]}"
rc=$?
set -e
if [[ $rc -eq 99 || ( $rc -ne 0 && -e "$PONDER_PT_REQUEUE_FILE" ) ]]; then
  rm -f "$PONDER_PT_REQUEUE_FILE"
  echo "every rank saved (srun exit $rc): requeueing $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"  # ends this run; the job restarts and resumes
  exit 99
fi
# 138 = 128 + SIGUSR1: the ranks died of the time-limit signal itself, which only happens when
# it lands before Python has started and caught it; nothing newer than the last checkpoint
# existed, so requeue as if they had saved
if [[ $rc -eq 138 ]]; then
  echo "SIGUSR1 struck the ranks before they could catch it (srun exit 138): nothing to save;" \
    "requeueing $SLURM_JOB_ID to resume from the last checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 99
fi
if [[ $rc -ne 0 ]]; then
  "$PYTHON" -m ponder_pt.engine.failures "$PONDER_PT_ERROR_DIR" --prog "ponder-pt train" || true
fi
exit $rc
