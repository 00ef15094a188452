"""Turn a `benchmarks/gpu_check.sh OUTDIR` directory into the Markdown of docs/benchmarks.md (and, for
section 6, of docs/results/).

Usage: python benchmarks/gpu_results_to_docs.py OUTDIR [--out FILE]

Prints (or writes) one Markdown document: the command, hardware and date; each section's status; the
correctness table (every check with its error and tolerance); the attention, training-step (eager and
torch.compile) and decode tables as ratios to the baseline measured in the same run; the compare summary;
the DEX study's tables (section 7).
A section that did not run, failed or timed out says so in its place. Uses only the standard library and
benchmarks/to_markdown.py, so it runs anywhere the JSON files are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import to_markdown  # noqa: E402  (benchmarks/to_markdown.py: the bench tables)

SECTIONS = (("env", "1. Environment"), ("correctness", "2. Correctness of the fused kernel on the GPU"),
            ("attention", "3. Attention speed"), ("train", "4. Training step at the gpu-medium shapes"),
            ("decode", "5. Decode with the KV cache"), ("compare", "6. gpu-small compare on a budget"),
            ("dex", "7. DEX study, GPU preset"))


def _load(outdir: Path, name: str):
    p = outdir / name
    return json.loads(p.read_text()) if p.is_file() else None


def _status_line(sec: dict | None) -> str:
    if sec is None:
        return "*not run*"
    line = f"*status: **{sec['status']}***"
    if sec.get("seconds") is not None:
        line += f" *in {sec['seconds']:.0f} s (cap {sec.get('cap_s')} s)*"
    if sec.get("status") not in ("ok", None) and sec.get("stderr_tail"):
        tail = sec["stderr_tail"].strip().splitlines()[-1:] or [""]
        line += f" — `{tail[0][:200]}`"
    return line


def env_section(env: dict) -> str:
    rows = [("GPU", env.get("gpu") or "none (dry run on CPU)" if env.get("dry_run") else env.get("gpu")),
            ("GPU memory", f"{env['gpu_memory_gib']} GiB" if env.get("gpu_memory_gib") else "—"),
            ("driver", env.get("driver") or "—"), ("CUDA (torch build)", env.get("cuda") or "—"),
            ("torch", env.get("torch")), ("triton", env.get("triton")), ("transformers", env.get("transformers")),
            ("Python", env.get("python")), ("platform", env.get("platform")), ("date", env.get("date"))]
    out = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if env.get("problems"):
        out += ["", "Environment problems (the check stopped): " + "; ".join(env["problems"])]
    return "\n".join(out)


def correctness_section(c: dict) -> str:
    out = [f"{c['passed']} of {c['total']} checks passed on {c['device']} "
           f"({'dry run: tiny shapes, Triton interpreter' if c.get('dry_run') else 'compiled Triton kernels'}). "
           "Error: max |x − ref| / max |ref| against fp32 two-map attention from the same inputs.", "",
           "| check | shape (B, H, Hkv, T, d) | dtype | causal | worst error (which) | tolerance | result |",
           "|---|---|---|---|---|---|---|"]
    for r in c["checks"]:
        shape = (f"{r['b']}, {r['h']}, {r['hkv']}, {r['t']}, {r['d']}" if "t" in r else r.get("variant", "—"))
        if r.get("errors"):
            which, worst = max(r["errors"].items(), key=lambda kv: kv[1])
            err = f"{worst:.2e} ({which})"
        else:
            err = r.get("error", "—")
        extra = ""
        if "greedy_tokens_equal" in r:
            extra = "; greedy tokens " + ("equal" if r["greedy_tokens_equal"] else "DIFFER")
        if r.get("path", "triton") != "triton":
            extra += f"; served by {r['path']}"
        out.append(f"| {r['check']} | {shape} | {r.get('dtype', 'fp32')} | {r.get('causal', '—')} | {err}{extra} | "
                   f"{r.get('tol', '—')} | {'pass' if r['passed'] else '**FAIL**'} |")
    if c.get("kernels"):
        out += ["", "Kernels loaded on the device by these checks (the driver's registers and spills; compare "
                "`diffattn bench compile`):", "",
                "| kernel | arch | warps/stages | regs | spills | shared memory B | MMA |",
                "|---|---|---|---|---|---|---|"]
        for k in c["kernels"]:
            if k.get("error"):
                out.append(f"| {k['kernel']} | — | — | — | — | — | {k['error']} |")
                continue
            out.append(f"| {k['kernel']} | {k['arch']} | {k['num_warps']}/{k['num_stages']} | {k['regs']} | "
                       f"{k['spills']} | {k['smem_bytes']} | {k.get('tensor_cores') or '—'} |")
    return "\n".join(out)


def attention_section(a: dict) -> str:
    text = to_markdown.attention(a)
    ratios = []
    for t in sorted({r["seq_len"] for r in a["results"]}):
        rows = {r["name"]: r for r in a["results"] if r["seq_len"] == t}
        fused = next((r for n, r in rows.items() if r["scope"] == "core" and n.startswith("diff_v1 core [")
                      and "authors" not in n), None)
        split = rows.get("diff_v1 core [authors split-value]")
        if fused:
            cell = f"T = {t}: fused V1 core {fused['ratio_fwd']:.2f}× (fwd) / {fused['ratio_fwd_bwd']:.2f}× (fwd+bwd) the " \
                   "matched baseline's SDPA core (FLOP floor 1.5×)"
            if split:
                cell += f"; {fused['fwd_bwd']['median_s'] / split['fwd_bwd']['median_s']:.2f}× the authors' split-value " \
                        "core (fwd+bwd)"
            ratios.append(cell)
    return "\n".join(["- " + r for r in ratios] + [""]) + "\n" + text


def train_section(t: dict) -> str:
    parts = []
    for key, title in (("eager", "eager"), ("compile", "torch.compile")):
        if key in t:
            parts += [f"**{title}**", "", to_markdown.train(t[key])]
    return "\n".join(parts)


def compare_section(c: dict) -> str:
    res = c["results"]
    out = [f"preset `{res['preset']}`, command `{res['environment'].get('command')}`, "
           f"{res['environment'].get('device')}, wall time {res.get('wall_time_s', 0) / 60:.1f} min", ""]
    if res.get("runs"):
        out += ["| variant | parameters | final validation loss |", "|---|---|---|"]
        for v in res["variants"]:
            vals = [r["summary"].get("val_loss") for r in res["runs"].get(v, {}).values()]
            vals = [x for x in vals if x is not None]
            out.append(f"| {v} | {res['models'][v]['params']['total']:,} | "
                       f"{(sum(vals) / len(vals)) if vals else float('nan'):.4f} |")
    if res.get("recall"):
        out += ["", "| variant | recall accuracy (mean over N and seeds) |", "|---|---|"]
        for v, by_seed in res["recall"]["runs"].items():
            accs = [sum(x["accuracy"] for x in r["by_n"]) / len(r["by_n"]) for r in by_seed.values()]
            out.append(f"| {v} | {sum(accs) / len(accs):.3f} |")
    return "\n".join(out)


def dex_section(d: dict) -> str:
    args = d.get("args") or {}
    head = (f"`python -m diffattn.dex.study --preset {args.get('preset')}` on {args.get('base')}: "
            f"{args.get('steps')} steps × {args.get('batch_size')}×{args.get('seq_len')} tokens per arm, "
            f"wall time {(d.get('wall_s') or 0) / 60:.1f} min")
    body = "\n".join("#" + ln if ln.startswith("## ") else ln for ln in d["results"]["summary_md"].splitlines())
    return head + "\n\n" + body  # the study's headings one level down, under the section's


def render(outdir: Path) -> str:
    summary = _load(outdir, "summary.json")
    if summary is None:
        raise FileNotFoundError(f"{outdir}: no summary.json (not a gpu_check output directory)")
    env = _load(outdir, "1_env.json") or {}
    head = [f"# GPU check{' (DRY RUN on CPU: tiny shapes, not GPU numbers)' if summary.get('dry_run') else ''}", "",
            f"- command: `{summary['command']}`",
            f"- hardware: {env.get('gpu') or 'CPU (dry run)'}; torch {env.get('torch')}, triton {env.get('triton')}, "
            f"transformers {env.get('transformers')}",
            f"- date: {env.get('date') or summary.get('started')}; total {summary.get('elapsed_s', 0):.0f} s of a "
            f"{summary.get('budget_s', 0):.0f} s budget" + (f"; **stopped: {summary['aborted']}**" if summary.get("aborted")
                                                             else ""), ""]
    renderers = {"env": env_section, "correctness": correctness_section, "attention": attention_section,
                 "train": train_section, "decode": to_markdown.generate, "compare": compare_section,
                 "dex": dex_section}
    files = {"env": "1_env.json", "correctness": "2_correctness.json", "attention": "3_attention.json",
             "train": "4_train.json", "decode": "5_decode.json", "compare": "6_compare.json", "dex": "7_dex.json"}
    body = []
    for name, title in SECTIONS:
        sec = summary["sections"].get(name)
        body += [f"## {title}", "", _status_line(sec), ""]
        data = _load(outdir, files[name])
        if data is not None:
            body += [renderers[name](data), ""]
    return "\n".join(head + body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir")
    p.add_argument("--out", help="write the Markdown here instead of printing it")
    args = p.parse_args(argv)
    try:
        text = render(Path(args.outdir))
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as e:
        print(f"gpu_results_to_docs: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
