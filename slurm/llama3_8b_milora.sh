#!/bin/bash
# MiLoRA fine-tuning of Llama-3-8B on a GPU cluster: convert -> train -> export.
#
#   sbatch slurm/llama3_8b_milora.sh                      # defaults below
#   HF_MODEL=/models/Meta-Llama-3-8B DATA=/data/train.jsonl OUTPUT_DIR=/scratch/milora \
#     sbatch --nodes 2 slurm/llama3_8b_milora.sh
#   GPUS_PER_NODE=0 TP=2 CONFIG=configs/tiny_cpu.yaml HF_MODEL=... DATA=... \
#     sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/llama3_8b_milora.sh   # CPU + gloo (tiny models)
#   (--cpus-per-task must fit the node: the header asks for 32, which a small node never has)
#
# Steps (each skipped when its output already exists, so a requeued job resumes):
#   1. tools/convert/hf_to_megatron.py  HF_MODEL -> OUTPUT_DIR/base_ckpt   (first node, one process)
#   2. torchrun launch/pretrain_milora.py on every node (c10d rendezvous on the first node);
#      checkpoints in OUTPUT_DIR/run; rerunning resumes from the latest one
#   3. tools/convert/megatron_to_hf.py  -> OUTPUT_DIR/hf_merged and OUTPUT_DIR/peft_adapter
#
# Environment (defaults): HF_MODEL (required), DATA (required), OUTPUT_DIR (./runs/llama3_8b_milora),
# TP (1), PP (1), SP (the config's; true makes sense with TP > 1, and a mixture-of-experts model
# needs it there), EP (1; a mixture-of-experts model: experts over EP ranks, carved out of
# DP x TP), ETP (TP; each expert split over this many ranks), CONFIG
# (configs/llama3_8b_milora.yaml), GPUS_PER_NODE (the GPUs Slurm allocated on the node,
# SLURM_GPUS_ON_NODE; 0 = CPU + gloo with TP x PP x EP processes per node), EXTRA_ARGS (extra
# key=value overrides for the trainer).
#
# Layout: every GPU of every node is a data-parallel rank by default (TP=1 x DP=GPUs). A frozen
# 8B base with r-wide adapters fits one GPU (about 45 GB at micro-batch 2, seq 2048), and TP
# would make every GEMM TP times thinner and add per-layer all-gathers / reduce-scatters and
# many small adapter collectives. Use TP (TP=2 SP=true, ...) only for a model that does not fit.
#
# Time limit / preemption: Slurm sends USR1 to the job step's processes 120 s before the end
# (--signal=USR1@120). The trainer workers save a checkpoint and exit 0 (launch/torchrun_usr1.py
# is torchrun with USR1 ignored in the launcher itself, whose default action would kill it);
# this script sees the run is not done and requeues the job, which resumes from that checkpoint.
# `scancel --signal=USR1 JOBID` does the same by hand. If you submit with --signal=B:USR1@...
# instead (batch shell only), the trap below forwards the signal to the trainers.
#SBATCH --job-name=milora-llama3-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=milora-%j.out

set -euo pipefail

REPO="${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
HF_MODEL="${HF_MODEL:?set HF_MODEL to a local Hugging Face Llama folder}"
DATA="${DATA:?set DATA to the training file (jsonl/json/parquet or a save_to_disk folder)}"
OUTPUT_DIR="${OUTPUT_DIR:-$REPO/runs/llama3_8b_milora}"
TP="${TP:-1}"
PP="${PP:-1}"
EP="${EP:-1}"
CONFIG="${CONFIG:-$REPO/configs/llama3_8b_milora.yaml}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}"  # one process per allocated GPU
EXTRA_ARGS="${EXTRA_ARGS:-}"

NNODES="${SLURM_JOB_NUM_NODES:-1}"
NPROC=$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : TP * PP * EP ))
# Since Slurm 22.05 srun no longer inherits the job's --cpus-per-task: pass it on explicitly,
# or the trainer step would get one CPU.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
HEAD_NODE=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || hostname)
PORT="${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}"
CKPT="$OUTPUT_DIR/base_ckpt"
RUN="$OUTPUT_DIR/run"
mkdir -p "$OUTPUT_DIR"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
DEVICE=cuda
if [ "$GPUS_PER_NODE" -eq 0 ]; then DEVICE=cpu; export CUDA_VISIBLE_DEVICES=""; fi

echo "[$(date)] job ${SLURM_JOB_ID:-none} nodes=$NNODES procs/node=$NPROC device=$DEVICE TP=$TP PP=$PP EP=$EP out=$OUTPUT_DIR"

# 1. convert (once)
if [ ! -f "$CKPT/milora_base.json" ]; then
  "$PYTHON" "$REPO/tools/convert/hf_to_megatron.py" --hf-dir "$HF_MODEL" --out "$CKPT" --tp "$TP" --pp "$PP" --ep "$EP" --overwrite
fi

# 2. train. A USR1/TERM that reaches this batch shell (--signal=B:..., scancel --batch) is
#    forwarded to the trainer processes on every node.
forward() {
  echo "[$(date)] received $1: asking the trainer to checkpoint and stop"
  # only this job's trainers: another job on the same node runs the same script
  srun --overlap --ntasks-per-node=1 pkill "-$1" -f "launch/pretrain_milora.py .*output.dir=$RUN( |\$)" || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 "$PYTHON" "$REPO/launch/torchrun_usr1.py" \
  --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:$PORT" --rdzv_id "${SLURM_JOB_ID:-local}" \
  "$REPO/launch/pretrain_milora.py" --config "$CONFIG" \
  model.load="$CKPT" model.device="$DEVICE" data.train="$DATA" output.dir="$RUN" parallel.tp="$TP" parallel.pp="$PP" \
  parallel.ep="$EP" ${ETP:+parallel.etp="$ETP"} ${SP:+parallel.sp="$SP"} $EXTRA_ARGS &
TRAIN_PID=$!
set +e
wait $TRAIN_PID; rc=$?
while kill -0 $TRAIN_PID 2>/dev/null; do wait $TRAIN_PID; rc=$?; done  # wait again after a trapped signal
set -e
if [ "$rc" -ne 0 ]; then echo "[$(date)] training failed ($rc)"; exit "$rc"; fi

# finished all steps? (a signal-stopped run saves and exits 0 but is not done)
if ! grep -q '"event": "done"' "$RUN/metrics.jsonl" 2>/dev/null; then
  echo "[$(date)] stopped before the end; requeueing to resume"
  [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi

# 3. export
"$PYTHON" "$REPO/tools/convert/megatron_to_hf.py" --ckpt "$RUN" --out "$OUTPUT_DIR/hf_merged" --overwrite --quiet
"$PYTHON" "$REPO/tools/convert/megatron_to_hf.py" --ckpt "$RUN" --out "$OUTPUT_DIR/peft_adapter" --overwrite --adapter-only
echo "[$(date)] done: merged HF model in $OUTPUT_DIR/hf_merged, PEFT adapter in $OUTPUT_DIR/peft_adapter"
