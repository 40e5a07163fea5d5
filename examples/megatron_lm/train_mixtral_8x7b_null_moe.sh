#!/usr/bin/env bash
# A Mixtral-8x7B-style Megatron-LM recipe with null experts. Compared with a stock top-2 recipe,
# MOE_ARGS gains --num-null-experts (and k goes 2 -> 4: 4 * 8 / (8 + 8) = 2 real experts per
# token in expectation, the same FLOPs; `python -m megatron_nullmoe.flops --partners --experts 8
# --baseline-topk 2` lists the partners), and the script is our entry instead of pretrain_gpt.py.
#
#   export PYTHONPATH=/path/to/Megatron-LM:$PYTHONPATH   # the tag of your megatron-core, e.g.
#                                                        # core_v0.16.1 or core_v0.19.0
#   bash examples/megatron_lm/train_mixtral_8x7b_null_moe.sh CHECKPOINT_DIR TOKENIZER_MODEL DATA_PREFIX
# The layout below (PP 4 x EP 8, TP 1) needs 32 GPUs or more: 4 nodes of 8, NNODES=4 and
# NODE_RANK/MASTER_ADDR set on each (or launch it from launch/slurm.sbatch-style tooling).
# Set DRY_RUN=1 to print the torchrun command.
set -euo pipefail

CHECKPOINT_PATH=${1:?checkpoint dir}
TOKENIZER_MODEL=${2:?tokenizer model}
DATA_PATH=${3:?data prefix}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

export CUDA_DEVICE_MAX_CONNECTIONS=1
DISTRIBUTED_ARGS=(
    --nproc-per-node "${GPUS_PER_NODE:-8}"
    --nnodes "${NNODES:-4}"
    --node-rank "${NODE_RANK:-0}"
    --master-addr "${MASTER_ADDR:-localhost}"
    --master-port "${MASTER_PORT:-6000}"
)
MODEL_ARGS=(
    --disable-bias-linear
    --seq-length 4096
    --max-position-embeddings 32768
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --init-method-std 0.01
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --normalization RMSNorm
    --position-embedding-type rope
    --swiglu
    --untie-embeddings-and-output-weights
    --group-query-attention
    --num-query-groups 8
    --no-masked-softmax-fusion
    --no-position-embedding
    --rotary-base 1000000
)
MOE_ARGS=(
    --num-experts 8
    --moe-router-topk 4                       # was 2
    --num-null-experts 8                      # new: 8 null slots; E[real experts] = 2
    --moe-router-pre-softmax                  # new: all-slot softmax, then top-k; the default gate
                                              # rule scales these gates by (8 + 8) / 8 (README)
    --moe-router-load-balancing-type aux_loss # balancing over all 16 slots drives null use
    --moe-aux-loss-coeff 1e-2
    --moe-grouped-gemm
    --moe-token-dispatcher-type alltoall      # alltoall or allgather (flex is refused)
    --expert-tensor-parallel-size 1           # null experts refuse expert tensor parallelism
    --overlap-grad-reduce
)
DATA_ARGS=(
    --tokenizer-type Llama2Tokenizer
    --tokenizer-model "$TOKENIZER_MODEL"
    --data-path "$DATA_PATH"
    --split 99990,8,2
)
TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size 256
    --lr 1e-4
    --train-iters 500000
    --lr-decay-iters 320000
    --lr-decay-style cosine
    --min-lr 1.0e-5
    --weight-decay 0.1
    --lr-warmup-iters 500
    --clip-grad 1.0
    --bf16
)
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 4
    --expert-model-parallel-size 8
    --use-distributed-optimizer
    --sequence-parallel
)
LOGGING_ARGS=(
    --log-interval 1
    --save-interval 10000
    --eval-interval 1000
    --eval-iters 10
    --save "$CHECKPOINT_PATH"
    --load "$CHECKPOINT_PATH"                  # a restarted job resumes with optimizer and RNG
    --tensorboard-dir "$CHECKPOINT_PATH/tensorboard"
)

# Pre-emption and faults, with Megatron-LM's own flags (NaN/Inf in loss and gradients is checked
# by default; --no-check-for-nan-in-loss-and-grad would turn that off):
RESILIENCE_ARGS=(
    --exit-signal-handler                      # SIGTERM: checkpoint at the next iteration, exit
    --exit-duration-in-mins "${EXIT_DURATION_MINS:-1410}"  # stop with a checkpoint under --time
    --distributed-timeout-minutes 10           # a hung collective fails instead of waiting forever
)

CMD=(torchrun "${DISTRIBUTED_ARGS[@]}" "$ROOT/launch/megatron_lm/pretrain_gpt_nullmoe.py"
     "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}"
     "${MODEL_PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}" "${RESILIENCE_ARGS[@]}")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
