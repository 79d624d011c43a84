#!/bin/bash
# VNN-COMP tool script: install_tool.sh VERSION
# Sets up the tool's Python environment, .venv at the repository root, with the pinned
# dependencies of requirements.txt and certiprune itself (editable). Idempotent: a second run
# with the same requirements.txt and setup.cfg does nothing (`make venv` keeps the same stamp).
# PYTHON names the interpreter to build the venv with (default python3.11, else python3).
set -eu
if [ "$#" -lt 1 ] || [ "$1" != "v1" ]; then
    echo "usage: $0 v1" >&2
    exit 1
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="$ROOT/.venv"
STAMP="$VENV/.installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt requirements.txt ] && [ "$STAMP" -nt setup.cfg ] \
        && "$VENV/bin/python" -c "import verifier, torch, onnxruntime, distributed" 2>/dev/null; then
    echo "certiprune: $VENV is up to date"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -r requirements.txt
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
touch "$STAMP"
"$VENV/bin/certiprune" --help >/dev/null
echo "certiprune: installed in $VENV"
