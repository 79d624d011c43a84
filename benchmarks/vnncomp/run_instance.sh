#!/bin/bash
# VNN-COMP tool script: run_instance.sh VERSION BENCHMARK ONNX VNNLIB RESULT_FILE TIMEOUT
# Runs `certiprune verify` on one instance; the verdict (sat + counterexample, unsat, timeout,
# unknown or error) goes to RESULT_FILE. Extra verify flags may be given in CERTIPRUNE_ARGS,
# e.g. CERTIPRUNE_ARGS="--device cuda".
set -u
if [ "$#" -lt 6 ]; then
    echo "usage: $0 v1 BENCHMARK ONNX VNNLIB RESULT_FILE TIMEOUT" >&2
    exit 1
fi
VERSION=$1 BENCHMARK=$2 ONNX=$3 VNNLIB=$4 RESULT_FILE=$5 TIMEOUT=$6
if [ "$VERSION" != "v1" ]; then
    echo "$0: expected version string v1, got '$VERSION'" >&2
    exit 1
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CERTIPRUNE="$ROOT/.venv/bin/certiprune"
[ -x "$CERTIPRUNE" ] || CERTIPRUNE=certiprune
echo "certiprune on benchmark '$BENCHMARK': $ONNX $VNNLIB, timeout $TIMEOUT s"
# shellcheck disable=SC2086  # CERTIPRUNE_ARGS is a list of flags
"$CERTIPRUNE" verify "$ONNX" "$VNNLIB" --timeout "$TIMEOUT" --result-file "$RESULT_FILE" ${CERTIPRUNE_ARGS:-}
status=$?
# The CLI writes `error` to the result file itself on bad input; make sure a crash leaves one too.
[ -s "$RESULT_FILE" ] || echo "error" > "$RESULT_FILE"
exit $status
