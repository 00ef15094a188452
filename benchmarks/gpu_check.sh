#!/usr/bin/env bash
# One prepared GPU check (issue #14): every GPU claim measured by one command in at most 8 minutes.
#   benchmarks/gpu_check.sh OUTDIR [--dry-run] [--compare-data DIR] [--skip SECTIONS] [--budget SECONDS]
# Runs in the bare GPU environment (torch, triton and transformers preinstalled, no package registry):
# the project is used in place through PYTHONPATH=src, nothing is installed or downloaded. --dry-run runs
# the identical plan on CPU at tiny shapes with the Triton interpreter (< 5 minutes).
# Then: python benchmarks/gpu_results_to_docs.py OUTDIR   (the tables of docs/benchmarks.md)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m diffattn.bench.gpu_check "$@"
