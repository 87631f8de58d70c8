#!/usr/bin/env bash
# The torchrun launch shared by dist_train.sh and dist_test.sh.
#
#   tools/torchrun.sh NPROC SCRIPT [script arguments...]
#
# NPROC processes on this node (one per GPU; on a machine without CUDA, CPU
# processes that communicate over gloo). Several nodes: run it on each with
# NNODES, NODE_RANK, MASTER_ADDR and PORT set alike. PYTHON selects the
# interpreter (default: the checkout's .venv/bin/python if it exists, else
# python; see python_path.sh).
set -euo pipefail

NPROC=$1
SCRIPT=$2
TOOLS_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=python_path.sh
source "$TOOLS_DIR/python_path.sh"

PYTHONPATH="$TOOLS_DIR/..${PYTHONPATH:+:$PYTHONPATH}" \
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$NPROC" \
    "$SCRIPT" --launcher pytorch "${@:3}"
