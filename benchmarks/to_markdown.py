"""Render `diffattn bench ... --json` files as the markdown tables of docs/benchmarks.md.

Usage: .venv/bin/python benchmarks/to_markdown.py docs/bench/attention_cpu.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def ms(s: dict) -> str:
    return f"{s['median_s'] * 1e3:,.1f} ({s['min_s'] * 1e3:,.1f}–{s['max_s'] * 1e3:,.1f})"


def env_line(env: dict, options: dict) -> str:
    hw = env.get("gpu") or f"{env['cpu']}, {env['cpu_threads']} threads"
    return (f"*{env['date']}; {hw}; torch {env['torch']}, transformers {env.get('transformers')}, "
            f"triton {env.get('triton')}; load average {env.get('load_average_1m')}; "
            f"`{env['command']}`; {options.get('dtype')}, kernel {options.get('kernel')}, "
            f"{options.get('repeats')} repeats after {options.get('warmup')} warm-up, median (min–max).*")


def attention(data: dict) -> str:
    out = [env_line(data["env"], data["options"]), ""]
    for t in sorted({r["seq_len"] for r in data["results"]}):
        out += [f"T = {t}, batch {data['options']['batch']}:", "",
                "| scope | row | fwd ms | vs std | fwd+bwd ms | vs std |", "|---|---|---|---|---|---|"]
        for r in (r for r in data["results"] if r["seq_len"] == t):
            out.append(f"| {r['scope']} | {r['name']} | {ms(r['fwd'])} | {r['ratio_fwd']:.2f}× | {ms(r['fwd_bwd'])} | "
                       f"{r['ratio_fwd_bwd']:.2f}× |")
        out.append("")
    return "\n".join(out)


def train(data: dict) -> str:
    out = [env_line(data["env"], data["options"]), ""]
    res = data["results"]
    timed, mem = "step" in res[0], "memory" in res[0]
    head = ["row", "params"] + (["step ms", "tokens/s", "vs std", "MFU"] if timed else []) \
        + (["peak MiB", "vs std", "step growth MiB", "vs std"] if mem else [])
    for t in sorted({r["seq_len"] for r in res}):
        out += [f"T = {t}, batch {data['options']['batch']}, {data['options']['n_layer']} layers, "
                f"vocabulary {data['options']['vocab_size']}:", "", "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head)]
        for r in (r for r in res if r["seq_len"] == t):
            cells = [r["name"], f"{r['params'] / 1e6:.2f}M"]
            if timed:
                cells += [ms(r["step"]), f"{r['tokens_per_s']:,.0f}", f"{r['ratio_tokens_per_s']:.3f}",
                          f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "–"]
            if mem:
                g = r.get("ratio_step_growth")
                cells += [f"{r['memory']['peak_bytes'] / 2**20:,.0f}", f"{r['ratio_peak_memory']:.3f}",
                          f"{r['memory'].get('step_growth_bytes', 0) / 2**20:,.0f}", f"{g:.3f}" if g is not None else "–"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def generate(data: dict) -> str:
    out = [env_line(data["env"], data["options"]), ""]
    res = data["results"]
    for t, b in sorted({(r["seq_len"], r["batch"]) for r in res}):
        out += [f"context {t}, batch {b}, {res[0]['new_tokens']} new tokens:", "",
                "| row | prefill ms | prefill tok/s | vs std | decode ms | decode tok/s | vs std |",
                "|---|---|---|---|---|---|---|"]
        for r in (r for r in res if r["seq_len"] == t and r["batch"] == b):
            out.append(f"| {r['name']} | {ms(r['prefill'])} | {r['prefill_tokens_per_s']:,.0f} | {r['ratio_prefill']:.3f} | "
                       f"{ms(r['decode'])} | {r['decode_tokens_per_s']:,.1f} | {r['ratio_decode']:.3f} |")
        out.append("")
    return "\n".join(out)


def main(paths: list[str]) -> None:
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        print(f"<!-- {p} -->")
        print({"attention": attention, "train": train, "generate": generate}[data["bench"]](data))


if __name__ == "__main__":
    main(sys.argv[1:])
