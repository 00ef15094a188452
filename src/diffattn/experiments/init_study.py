"""The initialisation study: the cpu-tiny language-model gap of each DIFF variant under each init option.

    python -m diffattn.experiments.init_study --out runs/init-study --doc docs/results/init.md

For every option below it runs ``diffattn compare --preset cpu-tiny`` restricted to the language model
(task ``ppl``, no cost bench) with ``--seeds`` seeds, then tabulates, per option and variant, the final
validation loss and the seed-paired gap to the Transformer trained with the *same* option and seed,
with the seed-paired verdict of experiments/paper.py. Every run is an ordinary compare run directory
under ``OUT/<option>/``: a killed study resumes where it stopped when started again with the same
arguments. The Markdown table is what ``docs/results/init.md`` commits.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

# option name -> (ModelConfig fields of the baseline, variant-only fields, what it is)
OPTIONS: dict[str, tuple[dict, dict, str]] = {
    "gpt2": ({"init": "gpt2"}, {}, "N(0, 0.02²) for embeddings and every Linear, residual outputs /√(2L); "
                                   "DIFF norm gain 1 (the library's init before this study)"),
    "torch": ({"init": "torch"}, {}, "PyTorch defaults (Linear U(±1/√fan_in), Embedding N(0, 1)), as the "
                                     "authors' reference modules; DIFF norm gain 1"),
    "gpt2-gain0.1": ({"init": "gpt2"}, {"diff_norm_gain_init": 0.1}, "gpt2, DIFF per-head norm gain starts at 0.1"),
    "torch-gain0.1": ({"init": "torch"}, {"diff_norm_gain_init": 0.1}, "torch, DIFF per-head norm gain starts at 0.1"),
}
DIFFS = ("diff_v1", "diff_v2", "shared_diff")


def describe_init(init: str, init_std: float, diff_norm_gain_init: float | None) -> str:
    """One line naming an initialisation (what the compare report states)."""
    if init == "torch":
        text = "`init=torch`: PyTorch defaults as in the DIFF authors' reference modules (Linear U(±1/√fan_in), " \
               "Embedding N(0, 1))"
    else:
        text = f"`init=gpt2`: N(0, {init_std:g}²) for embeddings and every Linear, residual outputs /√(2·n_layer)"
    if diff_norm_gain_init is not None:
        text += f"; DIFF per-head norm gain starts at {diff_norm_gain_init:g}" + (
            " (reference: 1)" if diff_norm_gain_init != 1.0 else " (as the reference)")
    return text + " (docs/results/init.md)"


def run(options: list[str], seeds: int, out: Path, preset: str, data: str | None, log) -> dict:
    from .compare import run_compare
    from .presets import load_study

    results = {}
    for name in options:
        model, variant_opts, _ = OPTIONS[name]
        overrides = {"study.tasks": ["ppl"], "study.seeds": seeds, "study.bench_repeats": 0,
                     "study.v2_same_heads_baseline": False, "study.variant_options": variant_opts,
                     **{f"model.{k}": v for k, v in model.items()}}
        study = load_study(preset, overrides)
        log(f"[init-study] option {name}: {OPTIONS[name][2]}")
        results[name] = run_compare(study, out / name, data_dir=data, log=log)
    return results


def _val(results: dict, variant: str) -> dict[str, float]:
    return {s: r["summary"]["val_loss"] for s, r in results["runs"].get(variant, {}).items()
            if r["summary"].get("val_loss") is not None}


def table(results: dict[str, dict]) -> str:
    from .paper import verdict

    lines = ["| init option | Transformer val loss | variant | variant val loss | gap per seed (variant − Transformer) "
             "| mean gap ± SE | verdict (paper: lower) |", "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        base = _val(res, "standard")
        for v in DIFFS:
            vals = _val(res, v)
            if not vals:
                continue
            seeds = [s for s in vals if s in base]
            gaps = [vals[s] - base[s] for s in seeds]
            m = sum(gaps) / len(gaps)
            se = (math.sqrt(sum((g - m) ** 2 for g in gaps) / (len(gaps) - 1) / len(gaps))
                  if len(gaps) > 1 else float("nan"))
            verdict_ = verdict(vals, base, "lower", min_effect=0.01)
            lines.append(f"| {name} | {_mean_str(base.values())} | {v} | {_mean_str(vals.values())} | "
                         f"{', '.join(f'{g:+.3f}' for g in gaps)} | {m:+.3f} ± {se:.3f} | {verdict_.verdict} |")
    return "\n".join(lines)


def _mean_str(xs) -> str:
    xs = list(xs)
    return f"{sum(xs) / len(xs):.3f}" if xs else "—"


def write_doc(results: dict[str, dict], path: Path, command: str) -> None:
    from ..fsutil import write_text_atomic
    from .compare import environment
    from .paper import VERDICT_RULE

    env = environment()
    any_res = next(iter(results.values()))
    train_s = sum(run["summary"].get("train_wall_s", 0) for r in results.values() for by in r["runs"].values()
                  for run in by.values())
    n_runs = sum(len(by) for r in results.values() for by in r["runs"].values())
    text = [
        "# Initialisation study: the cpu-tiny language-model gap under each init option", "",
        f"- command: `{command}`",
        f"- date: {env['date']}; hardware: {env['device']} ({env['cpu_count']} CPU cores), {env['platform']}; "
        f"torch {env['torch']}; {n_runs} training runs, {train_s / 60:.0f} min of training in all (runs of an "
        "interrupted invocation are reused; some ran beside other jobs, which changes only their time: every run is "
        "deterministic, and the options that leave a variant unchanged reproduce its loss exactly)",
        f"- recipe: preset `{any_res['preset']}` language model only (task ppl), seeds {', '.join(map(str, any_res['seeds']))}; "
        "training: " + ", ".join(f"{k}={v}" for k, v in any_res["train"].items() if k not in ("progress", "tensorboard")),
        "- each variant's gap is to the Transformer trained with the same init option and the same seed", "",
        "Init options:", ""]
    text += [f"- `{name}`: {OPTIONS[name][2]}" for name in results] + ["", table(results), "",
             "The gain options change only DIFF V1 and Shared DIFF (V2 has no per-head norm): their Transformer and "
             "V2 rows are the base option's models, retrained, and reproduce its losses bit for bit.", "",
             VERDICT_RULE + " Single-seed margin: 0.01 nats.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(text))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffattn.experiments.init_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/init-study")
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--data", help="a ready shard directory (default: the preset's, prepared if needed)")
    p.add_argument("--options", default="gpt2,torch,gpt2-gain0.1,torch-gain0.1", help=f"comma-separated: {', '.join(OPTIONS)}")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--doc", help="write the Markdown table here (e.g. docs/results/init.md)")
    args = p.parse_args(argv)
    names = [o.strip() for o in args.options.split(",") if o.strip()]
    bad = [o for o in names if o not in OPTIONS]
    if bad or not names or args.seeds < 1:
        print(f"error: --options: unknown {bad}; valid: {', '.join(OPTIONS)}" if bad or not names
              else "error: --seeds must be >= 1", file=sys.stderr)
        return 2
    t0 = time.time()
    results = run(names, args.seeds, Path(args.out), args.preset, args.data,
                  lambda m: print(m, file=sys.stderr, flush=True))
    print(table(results))
    if args.doc:
        write_doc(results, Path(args.doc), "python -m diffattn.experiments.init_study " + " ".join(
            argv if argv is not None else sys.argv[1:]))
    print(f"[init-study] done in {(time.time() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
