#!/bin/bash
# VNN-COMP tool script: prepare_instance.sh VERSION BENCHMARK ONNX VNNLIB
# Checks the arguments, then loads the model and parses the spec once (untimed), so that a bad
# instance is reported here rather than during the timed run. Exit 0 when the instance is ready.
set -u
if [ "$#" -lt 4 ]; then
    echo "usage: $0 v1 BENCHMARK ONNX VNNLIB" >&2
    exit 1
fi
VERSION=$1 BENCHMARK=$2 ONNX=$3 VNNLIB=$4
if [ "$VERSION" != "v1" ]; then
    echo "$0: expected version string v1, got '$VERSION'" >&2
    exit 1
fi
for f in "$ONNX" "$VNNLIB"; do
    [ -r "$f" ] || { echo "$0: cannot read $f" >&2; exit 1; }
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="$ROOT/.venv/bin/python"
[ -x "$PYTHON" ] || PYTHON=python3
echo "preparing certiprune for benchmark '$BENCHMARK': $ONNX $VNNLIB"
exec "$PYTHON" - "$ONNX" "$VNNLIB" >/dev/null <<'PY'
import sys
from verifier.cli import main
# `certiprune bounds` loads the model, checks the spec against it, and bounds it once (IBP: cheap).
sys.exit(main(["bounds", sys.argv[1], sys.argv[2], "--method", "ibp", "--json"]) and 1)
PY
