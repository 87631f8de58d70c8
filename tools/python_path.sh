#!/usr/bin/env bash
# Sourced by the launch scripts: the interpreter they run.
#
# PYTHON, when set, wins. Otherwise the checkout's own virtual environment
# (.venv/bin/python, which `make setup` creates) is used when it exists, so
# that the README's commands work without activating it; else `python` from
# PATH.
#
#   source "$TOOLS_DIR/python_path.sh"   # sets PYTHON from TOOLS_DIR

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$TOOLS_DIR/../.venv/bin/python" ]; then
        PYTHON="$(cd "$TOOLS_DIR/.." && pwd)/.venv/bin/python"
    else
        PYTHON=python
    fi
fi
