#!/usr/bin/env bash
# The CPU benchmarks recorded in docs/benchmarks.md (issue #8). Run from the repository root after
# `make install`; writes docs/bench/*.json and *.txt, then prints the markdown tables.
set -euo pipefail
D=${OUT:-docs/bench}
mkdir -p "$D"
.venv/bin/python benchmarks/cpu_paths.py --repeats 9 --json "$D/cpu_paths.json" | tee "$D/cpu_paths.txt"
.venv/bin/diffattn bench attention --json "$D/attention_cpu.json" | tee "$D/attention_cpu.txt"
.venv/bin/diffattn bench train --seq-len 2048 --no-memory --json "$D/train_cpu_t2048.json" | tee "$D/train_cpu_t2048.txt"
.venv/bin/diffattn bench train --seq-len 8192 --memory-only --json "$D/train_mem_cpu_t8192.json" | tee "$D/train_mem_cpu_t8192.txt"
.venv/bin/diffattn bench generate --seq-len 1024 --batch 1 4 --new-tokens 32 --json "$D/generate_cpu.json" | tee "$D/generate_cpu.txt"
.venv/bin/python benchmarks/to_markdown.py "$D"/attention_cpu.json "$D"/train_cpu_t2048.json "$D"/train_mem_cpu_t8192.json "$D"/generate_cpu.json
