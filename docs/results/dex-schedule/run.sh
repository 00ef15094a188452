#!/bin/bash
# Choosing the DEX schedule default (issue #16): the same 48 steps × 4 × 256 tokens on SmolLM2, per schedule.
# Resumable: an arm with an adapter_config.json is skipped.
cd "$(dirname "$0")/../../.."  # the repository root (this copy lives in docs/results/dex-schedule)
for arm in additive quoted; do
  out=runs/dex-measure/$arm
  [ -f $out/adapter_config.json ] && continue
  .venv/bin/diffattn adapt dex --base smollm2 --text source:sotu source:shakespeare source:moby_dick \
    --steps 48 --batch-size 4 --seq-len 256 --lr 2e-3 --val-tokens 16384 --schedule $arm --seed 0 \
    --out $out --no-progress > runs/dex-measure/$arm.log 2>&1
done
echo done > runs/dex-measure/DONE
