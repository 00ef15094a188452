#!/usr/bin/env bash
# The GPU benchmarks of issue #8 (H100/H200, bf16). Pending: no GPU was available when the kernel was
# written. Run from the repository root on the GPU machine after `pip install -e ".[test,triton]"`.
set -euo pipefail
D=${OUT:-docs/bench}
mkdir -p "$D"
# 0. correctness first: the fused kernel at real shapes in bf16 (compiled, not interpreted)
.venv/bin/python -m pytest tests/test_triton_diff.py -q -m "slow or gpu or not slow"
# 1. attention fwd+bwd, T=4096, head_dim 128: 32 standard heads vs 16 DIFF heads
.venv/bin/diffattn bench attention --device cuda --seq-len 4096 --d-model 4096 --n-head 32 --head-dim 128 \
    --repeats 20 --warmup 5 --json "$D/attention_gpu.json" | tee "$D/attention_gpu.txt"
# 2. end-to-end training of a ~370M model (d_model 1024, 24 layers, 16 heads x 64, vocab 32000), T=4096
.venv/bin/diffattn bench train --device cuda --seq-len 4096 --batch 4 --d-model 1024 --n-head 16 --n-layer 24 \
    --vocab-size 32000 --repeats 10 --warmup 3 --json "$D/train_gpu.json" | tee "$D/train_gpu.txt"
# 3. decode at 4K context, batch 1 and 16
.venv/bin/diffattn bench generate --device cuda --seq-len 4096 --batch 1 16 --new-tokens 128 --d-model 1024 \
    --n-head 16 --n-layer 24 --vocab-size 32000 --repeats 5 --json "$D/generate_gpu.json" | tee "$D/generate_gpu.txt"
.venv/bin/python benchmarks/to_markdown.py "$D"/attention_gpu.json "$D"/train_gpu.json "$D"/generate_gpu.json
