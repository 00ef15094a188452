#!/bin/bash
# The DEX study of issue #16 at the CPU preset (256 steps x 4 x 512 = 524k tokens per arm; 2 seeds of DEX and
# linear), the full evaluation set. Resumable: re-run this script after any stop (finished arms and evaluations
# are kept). STUDY_SRC pins the source tree the study runs from (default: this checkout's src).
cd "$(dirname "$0")/../.."
export PYTHONPATH="${STUDY_SRC:-$PWD/src}"
.venv/bin/python -m diffattn.dex.study --out runs/dex-study/out --preset cpu --seeds 2 \
  --arms dex linear lora dex-quoted >> runs/dex-study/study.log 2>&1
echo "exit $? $(date -u +%FT%TZ)" >> runs/dex-study/study.log
