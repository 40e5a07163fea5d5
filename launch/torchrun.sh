#!/usr/bin/env bash
# Launch megatron_nullmoe training on this node with torchrun. Thin: env knobs, one command.
#
#   launch/torchrun.sh RECIPE.yaml [key.sub=value ...]
#
# Env knobs (defaults):
#   NNODES=1  NPROC_PER_NODE=<GPUs on this node, or 1 without GPUs>  NODE_RANK=0
#   MASTER_ADDR=127.0.0.1  MASTER_PORT=29500        static rendezvous (node 0 hosts it)
#   RDZV_ENDPOINT=host:port  RDZV_ID=nullmoe        c10d rendezvous instead (no NODE_RANK needed)
#   PYTHON=<repo>/.venv/bin/python if present, else python3
#   DRY_RUN=1                                       print the command instead of running it
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 1 ]]; then
  echo "usage: launch/torchrun.sh RECIPE.yaml [key.sub=value ...]" >&2
  exit 2
fi
RECIPE="$1"; shift
if [[ ! -f "$RECIPE" ]]; then
  echo "launch/torchrun.sh: recipe '$RECIPE' not found (e.g. examples/demo_vlm.yaml)" >&2
  exit 2
fi

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1
fi
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON="$ROOT/.venv/bin/python"
  [[ -x "$PYTHON" ]] || PYTHON=python3
fi

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  RDZV=(--rdzv-backend=c10d "--rdzv-endpoint=$RDZV_ENDPOINT" "--rdzv-id=${RDZV_ID:-nullmoe}")
else
  RDZV=("--node-rank=${NODE_RANK:-0}" "--master-addr=${MASTER_ADDR:-127.0.0.1}"
        "--master-port=${MASTER_PORT:-29500}")
fi

CMD=("$PYTHON" -m torch.distributed.run "--nnodes=${NNODES:-1}" "--nproc-per-node=$NPROC_PER_NODE"
     "${RDZV[@]}" -m megatron_nullmoe.train --config "$RECIPE" "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
