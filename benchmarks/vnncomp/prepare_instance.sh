#!/bin/bash
# VNN-COMP tool script: prepare_instance.sh VERSION BENCHMARK ONNX VNNLIB
# Untimed work before run_instance.sh (benchmarks/cluster/vnncomp.py): ends the processes an
# earlier prepare started, loads and checks the model and the spec (a bad instance is reported
# here, not in the timed run), caches the converted model by the file's hash in
# CERTIPRUNE_CACHE_DIR for the timed run, and with CERTIPRUNE_WARM=1 starts a warm Dask worker
# that run_instance.sh hands the instance to. Exit 0 when the instance is ready.
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
export CERTIPRUNE_CACHE_DIR="${CERTIPRUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/certiprune/models}"
export CERTIPRUNE_STATE_DIR="${CERTIPRUNE_STATE_DIR:-${TMPDIR:-/tmp}/certiprune-vnncomp-$(id -u)}"
echo "preparing certiprune for benchmark '$BENCHMARK': $ONNX $VNNLIB"
exec "$PYTHON" -m benchmarks.cluster.vnncomp "$ONNX" "$VNNLIB"
