"""The initialisation study: every init option on both of the study's tasks, the language model and recall.

    python -m diffattn.experiments.init_study --out runs/init-study --doc docs/results/init.md

For every option below it runs ``diffattn compare --preset cpu-tiny`` twice with ``--seeds`` seeds: once
restricted to the language model (task ``ppl``, no cost bench) and once to the recall task (``recall``,
with its learning curves). It tabulates, per option, the Transformer's own numbers (the rule for the default
reads only those) and each DIFF variant's seed-paired gap to the Transformer trained with the *same* option
and seed. Every run is an ordinary compare run directory under ``OUT/<option>/lm`` and ``OUT/<option>/recall``:
a killed study resumes where it stopped when started again with the same arguments. The Markdown is what
``docs/results/init.md`` commits.

The rule for the default (``choose``): the option under which **the baseline Transformer** is best on both
tasks (lowest LM validation loss; highest recall accuracy, mean over N). If no option is best on both, the
one with the best mean rank over the two, ties broken by the recall accuracy. The same option then applies to
every variant; a DIFF-only knob (``diff_norm_gain_init``) is never chosen this way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from ..variants import BASELINE

# option name -> (ModelConfig fields of the baseline, variant-only fields, what it is)
OPTIONS: dict[str, tuple[dict, dict, str]] = {
    "gpt2": ({"init": "gpt2"}, {}, "N(0, 0.02²) for embeddings and every Linear, residual outputs /√(2L) (GPT-2)"),
    "torch": ({"init": "torch"}, {}, "PyTorch defaults (Linear U(±1/√fan_in), Embedding N(0, 1)), as the "
                                     "authors' reference attention modules"),
    "mixed": ({"init": "mixed"}, {}, "PyTorch-default Linears, token embedding N(0, 0.02²)"),
    "scaled": ({"init": "scaled"}, {}, "PyTorch-default Linears, token embedding and output head N(0, 1/d_model), "
                                       "as the authors' framework builds them (torchscale/fairseq)"),
    "gpt2-gain0.1": ({"init": "gpt2"}, {"diff_norm_gain_init": 0.1}, "gpt2, DIFF per-head norm gain starts at 0.1"),
    "torch-gain0.1": ({"init": "torch"}, {"diff_norm_gain_init": 0.1}, "torch, DIFF per-head norm gain starts at 0.1"),
}
DEFAULT_OPTIONS = ("gpt2", "torch", "mixed", "scaled")
TASKS = ("lm", "recall")


def run(options: list[str], seeds: int, out: Path, preset: str, data: str | None, log,
        variants: tuple[str, ...] = (BASELINE, "diff_v1"), tasks: tuple[str, ...] = TASKS,
        lm_variants: tuple[str, ...] | None = None, lm_seeds: int | None = None) -> dict:
    """{option: {"lm": compare results, "recall": compare results}}, each task a compare run of its own. The
    cheap recall runs of every option go first, then the language models (``lm_variants``, default
    ``variants``): a study stopped part-way has the whole recall side."""
    from .compare import run_compare
    from .presets import load_study

    results: dict[str, dict] = {name: {} for name in options}
    for task in sorted(tasks, key=lambda t: t != "recall"):
        for name in options:
            model, variant_opts, _ = OPTIONS[name]
            vs = variants if task == "recall" else (lm_variants or variants)
            overrides = {"study.tasks": ["ppl"] if task == "lm" else ["recall"], "study.bench_repeats": 0,
                         "study.variants": list(vs), "study.v2_same_heads_baseline": False,
                         "study.variant_options": variant_opts, **{f"model.{k}": v for k, v in model.items()},
                         **({"study.seeds": lm_seeds or seeds} if task == "lm" else {"recall.seeds": seeds})}
            study = load_study(preset, overrides)
            log(f"[init-study] option {name}, {task}: {OPTIONS[name][2]}")
            results[name][task] = run_compare(study, out / name / task, data_dir=data, log=log)
    return results


def _val(results: dict, variant: str) -> dict[str, float]:
    """Final LM validation loss per seed."""
    return {s: r["summary"]["val_loss"] for s, r in results["runs"].get(variant, {}).items()
            if r["summary"].get("val_loss") is not None}


def _recall(results: dict, variant: str, fn) -> dict[str, float]:
    """``fn(record)`` per recall seed."""
    return {s: fn(r) for s, r in results["recall"]["runs"].get(variant, {}).items()}


def _acc_n1(r: dict) -> float:
    return next(x["accuracy"] for x in r["by_n"] if x["n"] == 1)


def _steps(opts: dict, n: int):
    from .recall_records import steps_or_budget

    return lambda r: steps_or_budget(r, n, opts)


def metrics(res: dict) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant: {metric: {seed: value}} for the LM (val_loss) and recall (mean accuracy, N = 1 accuracy,
    steps to competence at N = 1 and N = C/4)."""
    from .recall_records import mean_accuracy

    out: dict[str, dict] = {}
    lm, rc = res.get("lm"), res.get("recall")
    variants = list(dict.fromkeys((rc or {}).get("variants", []) + (lm or {}).get("variants", [])))
    for v in variants:
        m = {}
        if lm:
            m["val_loss"] = _val(lm, v)
        if rc and rc.get("recall"):
            o = rc["recall"]["options"]
            quarter = max(1, o["context"] // 4)
            m.update(recall_mean=_recall(rc, v, mean_accuracy), recall_n1=_recall(rc, v, _acc_n1),
                     steps_n1=_recall(rc, v, _steps(o, 1)), steps_quarter=_recall(rc, v, _steps(o, quarter)))
        out[v] = m
    return out


METRICS = {  # name -> (label, better, single-seed margin, format)
    "val_loss": ("LM val loss", "lower", 0.01, ".3f"),
    "recall_mean": ("recall accuracy, mean over N", "higher", 0.05, ".3f"),
    "recall_n1": ("recall accuracy, N = 1", "higher", 0.05, ".3f"),
    "steps_n1": ("steps to competence, N = 1", "lower", 0, ".0f"),
    "steps_quarter": ("steps to competence, N = C/4", "lower", 0, ".0f"),
}


def choose(results: dict[str, dict]) -> tuple[str, str]:
    """The default by the module's rule, and one line saying why (reads only the baseline's numbers)."""
    base = {name: metrics(res)[BASELINE] for name, res in results.items()}
    lm = {n: statistics.fmean(m["val_loss"].values()) for n, m in base.items() if m.get("val_loss")}
    rc = {n: statistics.fmean(m["recall_mean"].values()) for n, m in base.items() if m.get("recall_mean")}
    names = [n for n in results if n in lm and n in rc]
    if not names:
        raise ValueError("the rule needs both tasks for at least one option")
    best_lm, best_rc = min(names, key=lm.get), max(names, key=rc.get)
    if best_lm == best_rc:
        return best_lm, (f"`{best_lm}` gives the Transformer both the lowest LM validation loss ({lm[best_lm]:.3f}) "
                         f"and the highest recall accuracy ({rc[best_rc]:.3f})")
    rank_lm = {n: i for i, n in enumerate(sorted(names, key=lm.get))}
    rank_rc = {n: i for i, n in enumerate(sorted(names, key=rc.get, reverse=True))}
    pick = min(names, key=lambda n: (rank_lm[n] + rank_rc[n], -rc[n]))
    return pick, (f"No option is best on both (LM: `{best_lm}` {lm[best_lm]:.3f}; recall: `{best_rc}` "
                  f"{rc[best_rc]:.3f}); `{pick}` has the best mean rank (LM {rank_lm[pick] + 1}, recall "
                  f"{rank_rc[pick] + 1} of {len(names)}; LM {lm[pick]:.3f}, recall {rc[pick]:.3f})")


def baseline_table(results: dict[str, dict]) -> str:
    """The Transformer under each option: what the rule reads (mean ± sample std over seeds)."""
    keys = [k for k in METRICS if any(k in metrics(r)[BASELINE] for r in results.values())]
    lines = ["| init option | " + " | ".join(f"{METRICS[k][0]} ({METRICS[k][1]})" for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for name, res in results.items():
        m = metrics(res)[BASELINE]
        lines.append(f"| {name} | " + " | ".join(_pm(m.get(k, {}).values(), METRICS[k][3]) for k in keys) + " |")
    return "\n".join(lines)


def table(results: dict[str, dict]) -> str:
    """Each DIFF variant against the Transformer trained with the same option and seed, per metric."""
    from .paper import verdict

    lines = ["| init option | variant | metric | Transformer | variant | difference per seed | verdict (paper: "
             "DIFF better) |", "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        ms = metrics(res)
        for v in (x for x in ms if x != BASELINE):
            for k, (label, better, margin, fmt) in METRICS.items():
                a, b = ms[v].get(k), ms[BASELINE].get(k)
                if not a or not b:
                    continue
                seeds = [s for s in a if s in b]
                diffs = ", ".join(format(a[s] - b[s], "+" + fmt) for s in seeds)
                vd = verdict(a, b, better, min_effect=margin)
                lines.append(f"| {name} | {v} | {label} | {_pm(b.values(), fmt)} | {_pm(a.values(), fmt)} | {diffs} "
                             f"| {vd.verdict} |")
    return "\n".join(lines)


def _pm(xs, fmt: str = ".3f") -> str:
    xs = list(xs)
    if not xs:
        return "—"
    m = statistics.fmean(xs)
    return format(m, fmt) + (f" ± {format(statistics.stdev(xs), fmt)}" if len(xs) > 1 else "")


def write_doc(results: dict[str, dict], path: Path, command: str) -> None:
    from ..fsutil import write_text_atomic
    from ..utils.environment import environment
    from .paper import VERDICT_RULE

    env = environment()
    runs = [r for res in results.values() for r in res.values()]
    lm = next((r for r in runs if r["runs"]), None)
    rc = next((r for r in runs if r.get("recall")), None)
    train_s = sum(run["summary"].get("train_wall_s", 0) for r in runs for by in r["runs"].values() for run in by.values())
    train_s += sum(rec.get("train_s", 0) for r in runs if r.get("recall") for by in r["recall"]["runs"].values()
                   for rec in by.values())
    pick, why = choose(results)
    text = [
        "# Initialisation study: every init option on the language model and the recall task", "",
        f"- command: `{command}`",
        f"- date: {env['date']}; hardware: {env['device']} ({env['cpu_count']} CPU cores), {env['platform']}; "
        f"torch {env['torch']}; {train_s / 60:.0f} min of training in all (summed over runs; runs of an interrupted "
        "invocation are reused, and runs ran beside other jobs, which changes only their time: every run is "
        "deterministic)"]
    if lm:
        text.append(f"- language model: preset `{lm['preset']}`, task ppl, seeds {', '.join(map(str, lm['seeds']))}; "
                    "training: " + ", ".join(f"{k}={v}" for k, v in lm["train"].items()
                                              if k not in ("progress", "tensorboard")))
    if rc:
        o = rc["recall"]["options"]
        text.append(f"- recall: the preset's task (context {o['context']}, {o['pair_tokens']}-token pairs, filler "
                    f"{o['filler']}), {o['steps']} steps × batch {o['batch_size']}, seeds "
                    f"{', '.join(map(str, rc['recall']['seeds']))}; learning curve every {o['steps'] // min(o['curve_points'], o['steps'])} "
                    f"steps; competence {o['competence']}")
    text += ["- each variant's differences are to the Transformer trained with the same init option and seed", "",
             "Init options:", ""]
    text += [f"- `{name}`: {OPTIONS[name][2]}" for name in results]
    text += ["", "## The Transformer under each option (what the rule reads)", "", baseline_table(results), "",
             "Mean ± sample std over seeds. Steps to competence: the first learning-curve step at which accuracy "
             "reached the competence level; a run that never did counts as the budget plus one curve interval.", "",
             "## The rule and the choice", "",
             "The default is the option under which the baseline Transformer is best on both tasks (lowest LM "
             "validation loss, highest recall accuracy averaged over N); if none is, the best mean rank over the "
             "two, ties broken by recall. The same option applies to every variant; DIFF-only knobs are not "
             "chosen this way.", "", f"**Chosen: `{pick}`.** {why}.", "",
             "## Each DIFF variant against the Transformer of the same option", "", table(results), "",
             VERDICT_RULE + " Single-seed margins: 0.01 nats, 0.05 accuracy; steps: any difference.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(text))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffattn.experiments.init_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/init-study")
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--data", help="a ready shard directory (default: the preset's, prepared if needed)")
    p.add_argument("--options", default=",".join(DEFAULT_OPTIONS), help=f"comma-separated: {', '.join(OPTIONS)}")
    p.add_argument("--variants", default="standard,diff_v1", help="comma-separated; the first must be standard")
    p.add_argument("--lm-variants", default=BASELINE,
                   help="the language models' variants (default: standard, what the rule reads; a DIFF variant adds "
                        "its LM gap per option); must start with standard")
    p.add_argument("--tasks", default="lm,recall", help="comma-separated: lm, recall")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lm-seeds", type=int, help="the language models' seeds (default: --seeds; a rerun with more "
                                                "reuses the finished ones)")
    p.add_argument("--doc", help="write the Markdown here (e.g. docs/results/init.md)")
    args = p.parse_args(argv)
    names = [o.strip() for o in args.options.split(",") if o.strip()]
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    lm_variants = tuple(v.strip() for v in (args.lm_variants or args.variants).split(",") if v.strip())
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    bad = [o for o in names if o not in OPTIONS]
    problem = (f"--options: unknown {bad}; valid: {', '.join(OPTIONS)}" if bad or not names
               else "--seeds and --lm-seeds must be >= 1" if args.seeds < 1 or (args.lm_seeds or 1) < 1
               else "--variants and --lm-variants must start with standard (the baseline)"
               if any(not vs or vs[0] != BASELINE for vs in (variants, lm_variants))
               else f"--tasks: valid: {', '.join(TASKS)}" if not tasks or any(t not in TASKS for t in tasks) else None)
    if problem:
        print(f"init_study: error: {problem}", file=sys.stderr)
        return 2
    t0 = time.time()
    results = run(names, args.seeds, Path(args.out), args.preset, args.data,
                  lambda m: print(m, file=sys.stderr, flush=True), variants, tasks, lm_variants, args.lm_seeds)
    print(baseline_table(results))
    if args.doc:
        write_doc(results, Path(args.doc), "python -m diffattn.experiments.init_study " + " ".join(
            argv if argv is not None else sys.argv[1:]))
    print(f"[init-study] done in {(time.time() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
