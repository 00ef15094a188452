#!/bin/bash
# Copy the DEX study's raw records (runs/dex-study/out, produced by runs/dex-study/run.sh) into this directory:
# each arm's adapter_config.json and per-step metrics.jsonl, each evaluation's results.json, study.json,
# summary.md and the study log. Safe to re-run while the study goes on (it copies what is finished).
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
src=runs/dex-study/out dst=docs/results/dex-study
for d in "$src"/*/; do
  arm=$(basename "$d")
  [ -f "$d/adapter_config.json" ] || continue
  mkdir -p "$dst/$arm" && cp "$d/adapter_config.json" "$d/metrics.jsonl" "$dst/$arm/"
done
if [ -d "$src/eval" ]; then
  mkdir -p "$dst/eval"
  for r in "$src"/eval/*/results.json; do cp "$r" "$dst/eval/$(basename "$(dirname "$r")").json"; done
fi
for f in study.json summary.md results.json; do [ -f "$src/$f" ] && cp "$src/$f" "$dst/"; done
cp runs/dex-study/study.log "$dst/study.log"
cp runs/dex-study/run.sh "$dst/run.sh"
