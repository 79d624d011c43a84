#!/bin/bash
# VNN-COMP tool script: run_instance.sh VERSION BENCHMARK ONNX VNNLIB RESULT_FILE TIMEOUT
# Runs `certiprune verify` on one instance; the verdict (sat + counterexample, unsat, timeout,
# unknown or error) goes to RESULT_FILE. Extra verify flags may be given in CERTIPRUNE_ARGS,
# e.g. CERTIPRUNE_ARGS="--device cuda".
#
# RESULT_FILE is deleted before anything else: a stale verdict from an earlier run must never
# survive a run that dies before writing (a wrong `unsat` costs 150 points, a missing one 0).
# When prepare_instance.sh left a warm worker (CERTIPRUNE_WARM=1), the instance is handed to it
# by benchmarks.cluster.handoff, which writes RESULT_FILE from this process; when none answers,
# the instance runs cold, as below.
set -u
if [ "$#" -ge 5 ]; then
    rm -f -- "$5"
fi
if [ "$#" -lt 6 ]; then
    echo "usage: $0 v1 BENCHMARK ONNX VNNLIB RESULT_FILE TIMEOUT" >&2
    [ "$#" -ge 5 ] && echo "error" > "$5"
    exit 1
fi
VERSION=$1 BENCHMARK=$2 ONNX=$3 VNNLIB=$4 RESULT_FILE=$5 TIMEOUT=$6
if [ "$VERSION" != "v1" ]; then
    echo "$0: expected version string v1, got '$VERSION'" >&2
    echo "error" > "$RESULT_FILE"
    exit 1
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="$ROOT/.venv/bin/python"
CERTIPRUNE="$ROOT/.venv/bin/certiprune"
[ -x "$CERTIPRUNE" ] || { CERTIPRUNE=certiprune; PYTHON=python3; }
# converted models cached by prepare_instance.sh (keyed by the ONNX file's hash)
export CERTIPRUNE_CACHE_DIR="${CERTIPRUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/certiprune/models}"
STATE="${CERTIPRUNE_STATE_DIR:-${TMPDIR:-/tmp}/certiprune-vnncomp-$(id -u)}"
echo "certiprune on benchmark '$BENCHMARK': $ONNX $VNNLIB, timeout $TIMEOUT s"
if [ -s "$STATE/scheduler.json" ]; then
    # the warm worker; the hand-off runs `certiprune verify` itself when none answers
    # shellcheck disable=SC2086  # CERTIPRUNE_ARGS is a list of flags
    "$PYTHON" -m benchmarks.cluster.handoff "$STATE/scheduler.json" "$ONNX" "$VNNLIB" "$RESULT_FILE" \
        "$TIMEOUT" ${CERTIPRUNE_ARGS:-}
    status=$?
    [ -s "$RESULT_FILE" ] || echo "error" > "$RESULT_FILE"
    exit $status
fi
# shellcheck disable=SC2086  # CERTIPRUNE_ARGS is a list of flags
"$CERTIPRUNE" verify "$ONNX" "$VNNLIB" --timeout "$TIMEOUT" --result-file "$RESULT_FILE" ${CERTIPRUNE_ARGS:-}
status=$?
# The CLI writes `error` to the result file itself on bad input; make sure a crash leaves one too.
[ -s "$RESULT_FILE" ] || echo "error" > "$RESULT_FILE"
exit $status
