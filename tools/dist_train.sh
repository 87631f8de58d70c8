#!/usr/bin/env bash
# Distributed training with torchrun (see torchrun.sh for the environment:
# NNODES, NODE_RANK, MASTER_ADDR, PORT, PYTHON).
#
#   tools/dist_train.sh CONFIG GPUS [train.py arguments...]
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: $0 CONFIG GPUS [train.py arguments...]" >&2
    exit 2
fi
TOOLS_DIR=$(cd "$(dirname "$0")" && pwd)
exec bash "$TOOLS_DIR/torchrun.sh" "$2" "$TOOLS_DIR/train.py" "$1" "${@:3}"
