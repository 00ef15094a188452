"""One prepared GPU check: every GPU claim of the project measured by one command in at most 8 minutes.

    benchmarks/gpu_check.sh OUTDIR            # on one H100/H200 (the project used in place, nothing downloaded)
    benchmarks/gpu_check.sh OUTDIR --dry-run  # the identical plan on CPU, tiny shapes, Triton interpreter

Sections run in order of importance, each in its own process with its own time cap; a section that fails
or runs out of time is recorded and the next one runs. Each writes its result into OUTDIR as soon as it
finishes, and ``summary.json`` is rewritten after every section, so whatever ran is safe on disk if the
machine goes away. At most 8 flat files:

1. ``1_env.json``          GPU, driver, CUDA, torch, triton, transformers (checked before anything runs)
2. ``2_correctness.json``  fused DIFF V1 kernel vs reference: bf16 first, then fp32 (routed to sdpa), fwd/bwd,
                           causal/not, GQA, T ≤ 8K, head_dim 64/128; decode vs the full forward's last row; tiny
                           V1 / Shared DIFF models with kernel="triton" vs "eager" (logits, gradients, greedy
                           tokens); and the registers, spills and shared memory of every kernel it loaded on the
                           device (the table `diffattn bench compile` predicts on a CPU)
3. ``3_attention.json``    ``diffattn bench attention`` bf16, T = 2K/4K/8K, fwd and fwd+bwd: fused V1 core vs
                           flash SDPA of the matched baseline, the authors' split-value core, DiffLlama
4. ``4_train.json``        ``diffattn bench train`` at the gpu-medium shapes (~125M), bf16, every variant:
                           tokens/s ratios, MFU, peak memory; eager and torch.compile
5. ``5_decode.json``       ``diffattn bench generate``: KV-cache decode tokens/s at batch 1 and 16
6. ``6_compare.json``      only with the time left: a ``diffattn compare --preset gpu-small`` run on a budget
                           that fits (its results.json and REPORT.md)
7. ``7_dex.json``          the DEX study's GPU preset (``python -m diffattn.dex.study --preset gpu``: DEX, the
                           quoted schedule, linear and LoRA controls, ~8.4M tokens per arm in bf16, ppl and
                           multi-needle at 1-2K) on the base model given by ``--dex-base DIR`` (skipped without
                           it: no base model ships to the machine); its own command:
                           ``gpu_check.sh OUTDIR --only dex --dex-base DIR [--dex-data SHARDS] --budget 570``
   ``summary.json``        every section's status, seconds and cap, the command, the plan

``benchmarks/gpu_results_to_docs.py OUTDIR`` turns the directory into the tables of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TOTAL_BUDGET_S = 480  # 8 minutes, wall clock, everything included
MIN_VERSIONS = {"torch": (2, 11), "transformers": (5, 17), "triton": (3, 2)}
# the gpu-medium baseline (configs/compare-gpu-medium.toml): ~125M parameters
MEDIUM = dict(d_model=768, n_layer=12, n_head=12, vocab_size=50257)


@dataclass
class Section:
    name: str
    file: str
    cap_s: int
    commands: list[list[str]]  # run in order; {out} in an argument is the section's file
    env: dict[str, str] = field(default_factory=dict)
    merge: list[str] | None = None  # keys for the JSON files of several commands, merged into one file


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _bench(kind: str, out: str, *args: str) -> list[str]:
    return _py("-m", "diffattn.cli", "bench", kind, *args, "--json", out, "--quiet")


DEX_ARMS = ("dex", "linear", "lora", "dex-quoted")


@dataclass
class _Flags:
    """What differs between the dry run and the real one: the flags of each section's commands, the sections'
    time caps, and the DEX section's commands."""
    dev: list[str]          # device, dtype and kernel of every benchmark
    att: list[str]          # bench attention
    trn: list[str]          # bench train (eager)
    trn_compile: list[str]  # bench train (torch.compile)
    dec: list[str]          # bench generate
    cmp: list[str]          # compare
    caps: dict[str, int]
    dex: list[list[str]]


def _dry_flags(x) -> _Flags:
    """CPU, tiny shapes, the Triton interpreter; the DEX section on a tiny base it builds itself."""
    trn = ["--seq-len", "64", "--batch", "2", "--d-model", "64", "--n-head", "4", "--n-layer", "2",
           "--vocab-size", "256", "--repeats", "2", "--warmup", "1", "--no-memory"]
    tiny = x("dex-tiny")
    return _Flags(
        dev=["--device", "cpu", "--dtype", "fp32", "--kernel", "sdpa"],
        att=["--seq-len", "64", "128", "--d-model", "64", "--n-head", "4", "--head-dim", "16", "--repeats", "2",
             "--warmup", "1"],
        trn=trn, trn_compile=trn + ["--compile", "--variants", "diff_v1", "--no-references"],
        dec=["--seq-len", "32", "--batch", "1", "4", "--new-tokens", "4", "--d-model", "64", "--n-head", "4",
             "--n-layer", "2", "--vocab-size", "256", "--repeats", "1", "--warmup", "1"],
        cmp=["--preset", "micro", "--set", 'study.tasks=["recall"]', "--set", "recall.seeds=1",
             "--variants", "standard,diff_v1"],
        caps=dict(env=60, correctness=240, attention=60, train=150, decode=60, compare=120, dex=150),
        dex=[_py("-m", "diffattn.bench.gpu_check", "--make-tiny-base", tiny),
             _py("-m", "diffattn.dex.study", "--out", x("dex"), "--base", f"{tiny}/base", "--text",
                 f"{tiny}/text.txt", "--arms", "dex", "linear", "--seeds", "1", "--steps", "4", "--batch-size", "2",
                 "--seq-len", "128", "--val-tokens", "128", "--evals", "ppl",
                 "--device", "cpu")])


def _gpu_flags(x, dex_base: str | None, dex_data: str | None) -> _Flags:
    """One CUDA GPU in bf16 with the fused kernel, the gpu-medium shapes; the DEX section only with ``dex_base``."""
    trn = ["--seq-len", "2048", "--batch", "8", "--d-model", str(MEDIUM["d_model"]), "--n-head",
           str(MEDIUM["n_head"]), "--n-layer", str(MEDIUM["n_layer"]), "--vocab-size", str(MEDIUM["vocab_size"]),
           "--repeats", "5", "--warmup", "2"]
    return _Flags(
        dev=["--device", "cuda", "--dtype", "bf16", "--kernel", "triton"],
        att=["--seq-len", "2048", "4096", "8192", "--d-model", "2048", "--n-head", "16", "--head-dim", "128",
             "--repeats", "10", "--warmup", "3"],
        trn=trn, trn_compile=trn + ["--compile", "--no-references"],
        dec=["--seq-len", "2048", "--batch", "1", "16", "--new-tokens", "64", "--d-model", str(MEDIUM["d_model"]),
             "--n-head", str(MEDIUM["n_head"]), "--n-layer", str(MEDIUM["n_layer"]), "--vocab-size",
             str(MEDIUM["vocab_size"]), "--repeats", "3", "--warmup", "1"],
        cmp=["--preset", "gpu-small", "--set", "train.max_steps=150", "--set", "train.warmup_steps=15",
             "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", "--set", "study.bench_repeats=3",
             "--set", 'study.tasks=["ppl","outliers","lambda"]', "--set", "needle_mix.share=0",
             "--variants", "standard,diff_v1,diff_v2"],
        caps=dict(env=30, correctness=150, attention=90, train=150, decode=90, compare=240, dex=570),
        dex=[_py("-m", "diffattn.dex.study", "--out", x("dex"), "--base", dex_base, "--preset", "gpu", "--seeds", "1",
                 "--arms", *DEX_ARMS, "--evals", "ppl", "needle", *(["--data", dex_data] if dex_data else []))
             ] if dex_base else [])


def plan(dry: bool, out: Path, compare_data: str | None, scratch: Path | None = None,
         dex_base: str | None = None, dex_data: str | None = None) -> list[Section]:
    """The sections, dry (CPU, tiny shapes, Triton interpreter) or real (one CUDA GPU). ``scratch``: a
    directory outside OUTDIR for intermediate files (OUTDIR holds only the sections' files). The dex section
    needs ``dex_base`` on a GPU; the dry run builds a tiny base of its own."""
    o = lambda f: str(out / f)  # noqa: E731
    scratch = scratch or out
    x = lambda f: str(scratch / f)  # noqa: E731
    f = _dry_flags(x) if dry else _gpu_flags(x, dex_base, dex_data)
    dev, caps = f.dev, f.caps
    cmp = f.cmp + (["--data", compare_data] if compare_data else [])
    interp = {"TRITON_INTERPRET": "1"} if dry else {}
    cdir = x("compare")
    return [
        Section("env", "1_env.json", caps["env"], [_py("-m", "diffattn.bench.gpu_check", "--env-only", o("1_env.json"))
                                                     + (["--dry-run"] if dry else [])]),
        Section("correctness", "2_correctness.json", caps["correctness"],
                [_py("-m", "diffattn.bench.gpu_correctness", o("2_correctness.json")) + (["--dry-run"] if dry else [])],
                env=interp),
        Section("attention", "3_attention.json", caps["attention"],
                [_bench("attention", o("3_attention.json"), *dev, *f.att)]),
        Section("train", "4_train.json", caps["train"],
                [_bench("train", x("4_eager.json"), *dev, *f.trn),
                 _bench("train", x("4_compile.json"), *dev, *f.trn_compile)],
                merge=["eager", "compile"]),
        Section("decode", "5_decode.json", caps["decode"], [_bench("generate", o("5_decode.json"), *dev, *f.dec)]),
        Section("compare", "6_compare.json", caps["compare"],
                [_py("-m", "diffattn.cli", "compare", *cmp, "--out", cdir, "--quiet")]),
        Section("dex", "7_dex.json", caps["dex"], f.dex),
    ]


# ------------------------------------------------------------------------------------------ section 1
def _tuple(v: str | None) -> tuple[int, ...]:
    out = []
    for part in (v or "0").split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def environment(dry: bool) -> dict:
    """Section 1: the environment record (utils/environment.py), the dry-run flag, and the problems that stop the
    check (a package older than :data:`MIN_VERSIONS`, no CUDA GPU on a real run)."""
    import torch

    from ..utils.environment import environment as environment_record

    env = {**environment_record(), "dry_run": dry}
    problems = [f"{m} {env[m]} < {'.'.join(map(str, v))}" if env[m] else f"{m} missing"
                for m, v in MIN_VERSIONS.items() if _tuple(env[m]) < v]
    if not dry and not torch.cuda.is_available():
        problems.append("no CUDA GPU visible (torch.cuda.is_available() is False)")
    env["problems"] = problems
    return env


# ------------------------------------------------------------------------------------------ the runner
def _write_json(path: Path, data) -> None:
    from ..fsutil import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=1, default=str) + "\n")


def _run_section(sec: Section, out: Path, scratch: Path, cap: float, log) -> dict:
    t0 = time.time()
    env = {**os.environ, **sec.env}
    src = str(Path(__file__).resolve().parents[2])  # the project used in place (PYTHONPATH=src)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    status, tails = "ok", []
    for cmd in sec.commands:
        left = cap - (time.time() - t0)
        if left <= 1:
            status = "timed out"
            break
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left, env=env)
        except subprocess.TimeoutExpired as e:
            status = "timed out"
            tails.append(((e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes)
                          else (e.stderr or ""))[-1500:])
            break
        tails.append((proc.stderr or "")[-1500:])
        if proc.returncode != 0:
            status = "failed" if proc.returncode != 1 or sec.name != "correctness" else "checks failed"
            if sec.name != "correctness":
                break
    if sec.merge:  # several commands' JSON into the section's one file
        parts = {}
        for key, cmd in zip(sec.merge, sec.commands):
            part = Path(cmd[cmd.index("--json") + 1])
            if part.is_file():
                parts[key] = json.loads(part.read_text())
                part.unlink()
        if parts:
            _write_json(out / sec.file, parts)
    if sec.name == "dex":
        ddir = scratch / "dex"
        if (ddir / "results.json").is_file():
            study = json.loads((ddir / "study.json").read_text()) if (ddir / "study.json").is_file() else {}
            _write_json(out / sec.file, {"results": json.loads((ddir / "results.json").read_text()),
                                         "commands": study.get("commands"), "wall_s": study.get("wall_s"),
                                         "args": study.get("args")})
    if sec.name == "compare":
        cdir = scratch / "compare"
        if (cdir / "results.json").is_file():
            res = json.loads((cdir / "results.json").read_text())
            report = (cdir / "REPORT.md").read_text() if (cdir / "REPORT.md").is_file() else None
            _write_json(out / sec.file, {"results": res, "report_md": report})
    produced = (out / sec.file).is_file()
    if status == "ok" and not produced:
        status = "failed"
    record = {"status": status, "seconds": round(time.time() - t0, 1), "cap_s": round(cap), "file": sec.file,
              "produced": produced, "commands": [shlex.join(c) for c in sec.commands]}
    if status != "ok":
        record["stderr_tail"] = "\n".join(tails)[-2000:]
    log(f"[gpu-check] {sec.name}: {status} in {record['seconds']:.0f}s (cap {record['cap_s']}s)")
    return record


def run(out: Path, *, dry: bool, compare_data: str | None = None, budget_s: float = TOTAL_BUDGET_S,
        skip: tuple[str, ...] = (), log=lambda m: print(m, file=sys.stderr, flush=True),
        dex_base: str | None = None, dex_data: str | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary = {"command": shlex.join(["benchmarks/gpu_check.sh", str(out)] + (["--dry-run"] if dry else [])),
               "dry_run": dry, "budget_s": budget_s, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    sections = plan(dry, out, compare_data, scratch, dex_base, dex_data)
    for sec in sections:
        if sec.name in skip or not sec.commands:
            summary["sections"][sec.name] = {"status": "skipped", "file": sec.file, "produced": False}
            if not sec.commands:
                summary["sections"][sec.name]["why"] = "no --dex-base (the base model must be on the machine)"
            continue
        left = budget_s - (time.time() - t0) - 5  # a section never runs past the budget
        cap = min(sec.cap_s, left)
        if left < 10:
            summary["sections"][sec.name] = {"status": "no time left", "file": sec.file, "produced": False}
            log(f"[gpu-check] {sec.name}: no time left")
        else:
            summary["sections"][sec.name] = _run_section(sec, out, scratch, cap, log)
        summary["elapsed_s"] = round(time.time() - t0, 1)
        _write_json(out / "summary.json", summary)
        if sec.name == "env":
            env = json.loads((out / sec.file).read_text()) if (out / sec.file).is_file() else {}
            if env.get("problems"):
                summary["aborted"] = "environment: " + "; ".join(env["problems"])
                _write_json(out / "summary.json", summary)
                log(f"[gpu-check] stopping: {summary['aborted']}")
                break
    summary["elapsed_s"] = round(time.time() - t0, 1)
    _write_json(out / "summary.json", summary)  # the skipped sections too
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    return summary


def make_tiny_base(directory: Path) -> None:
    """The dry run's DEX base: a tiny random Llama with a word-level tokenizer, and a text file to adapt on."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    words = [f"w{i}" for i in range(40)]
    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1,
                      bos_token_id=None, initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(directory / "base")
    fast.save_pretrained(directory / "base")
    rng = random.Random(0)
    (directory / "text.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(120))
                                                     for _ in range(60)) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output directory (created; at most 8 flat files)")
    p.add_argument("--dry-run", action="store_true", help="the same plan on CPU, tiny shapes, Triton interpreter")
    p.add_argument("--compare-data", help="a prepared shard directory for section 6 (gpu-small's data/gpu-small)")
    p.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="wall-clock budget in seconds (default 480)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip (e.g. compare)")
    p.add_argument("--only", default="", help="comma-separated sections to run (env always runs), e.g. dex")
    p.add_argument("--dex-base", help="the DEX study's base model directory on this machine (section 7)")
    p.add_argument("--dex-data", help="a prepared shard directory of the base's tokenizer for section 7")
    p.add_argument("--env-only", action="store_true", help=argparse.SUPPRESS)  # section 1, in its own process
    p.add_argument("--make-tiny-base", action="store_true", help=argparse.SUPPRESS)  # the dry run's DEX base
    args = p.parse_args(argv)
    if args.env_only:
        _write_json(Path(args.out), environment(args.dry_run))
        return 0
    if args.make_tiny_base:
        make_tiny_base(Path(args.out))
        return 0
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"gpu_check: error: {out} exists and is not empty; choose a new OUTDIR", file=sys.stderr)
        return 2
    valid = [s.name for s in plan(args.dry_run, out, None)]
    names, only = ([s.strip() for s in v.split(",") if s.strip()] for v in (args.skip, args.only))
    for flag, given in (("--skip", names), ("--only", only)):
        if any(n not in valid for n in given):
            print(f"gpu_check: error: {flag}: unknown section(s) {[n for n in given if n not in valid]}; valid: "
                  f"{', '.join(valid)}", file=sys.stderr)
            return 2
    if only:
        names = sorted(set(names) | {n for n in valid if n not in only and n != "env"})
    for flag, path in (("--dex-base", args.dex_base), ("--dex-data", args.dex_data)):
        if path and not Path(path).is_dir():
            print(f"gpu_check: error: {flag} {path}: no such directory", file=sys.stderr)
            return 2
    summary = run(out, dry=args.dry_run, compare_data=args.compare_data, budget_s=args.budget, skip=tuple(names),
                  dex_base=args.dex_base, dex_data=args.dex_data)
    ok = sum(1 for s in summary["sections"].values() if s["status"] == "ok")
    print(f"gpu_check: {ok}/{len(summary['sections'])} sections ok in {summary.get('elapsed_s', 0):.0f}s; "
          f"results in {out}", file=sys.stderr)
    return 0 if "aborted" not in summary else 3


if __name__ == "__main__":
    sys.exit(main())
