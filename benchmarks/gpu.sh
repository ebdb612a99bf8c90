#!/usr/bin/env bash
# The one GPU check (benchmarks/gpu.py says what it runs and writes): builds the CUDA kernels,
# runs every CUDA test, times the rasterizer and the NGP kernels on CUDA, runs the demo and a
# short NGP training, all within 8 minutes, and writes one JSON.
#
#   bash benchmarks/gpu.sh [JSON] [gpu.py options: --subject DIR, --skip PART ..., --budget S]
#
# JSON: the first argument, else $OUT/gpu.json when OUT is set, else gpu-results/gpu.json (the
# JSON is also printed; gpu.log beside it holds the parts' logs). Needs no network and no install:
# the package is imported from this checkout (PYTHONPATH), with $PYTHON, else .venv/bin/python
# when there is one, else python3. Without CUDA it stops after a few seconds with exit code 2.
set -u

if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    case $1 in
        /*) JSON=$1 ;;
        *) JSON=$PWD/$1 ;;
    esac
    shift
elif [ -n "${OUT:-}" ]; then
    JSON=$OUT/gpu.json
else
    JSON=
fi

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
JSON=${JSON:-$ROOT/gpu-results/gpu.json}
mkdir -p "$(dirname "$JSON")" || exit 1

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
    PY=$ROOT/.venv/bin/python
else
    PY=python3
fi

export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

LIMIT=${GPU_CHECK_LIMIT_S:-465}  # the hard stop; gpu.py plans its parts within LIMIT - 25 s
timeout -k 10 "$LIMIT" "$PY" benchmarks/gpu.py --json "$JSON" --budget "$((LIMIT - 25))" "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "[gpu] stopped after ${LIMIT} s; $JSON holds the parts that finished:" >&2
    cat "$JSON" 2>/dev/null
fi
exit "$rc"
