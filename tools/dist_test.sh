#!/usr/bin/env bash
# Distributed testing with torchrun (see torchrun.sh for the environment:
# NNODES, NODE_RANK, MASTER_ADDR, PORT, PYTHON).
#
#   tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py arguments...]
set -euo pipefail

if [ "$#" -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT GPUS [test.py arguments...]" >&2
    exit 2
fi
TOOLS_DIR=$(cd "$(dirname "$0")" && pwd)
exec bash "$TOOLS_DIR/torchrun.sh" "$3" "$TOOLS_DIR/test.py" "$1" "$2" \
    "${@:4}"
