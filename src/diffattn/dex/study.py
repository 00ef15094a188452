"""The DEX study (docs/results/dex.md): base model vs DEX vs parameter-matched controls on the same tokens.

    python -m diffattn.dex.study --out runs/dex-study                 # CPU-sized (docs/results/dex.md)
    python -m diffattn.dex.study --out runs/dex-study --preset gpu    # one H100/H200 in bf16 (about 8M tokens/arm)

Arms (every arm of a seed sees the same training batches, the same heads and the same budget):

* ``base``: the unmodified model;
* ``dex``: DEX with the defaults (entropy-selected heads, W_D per layer, the additive λ schedule, ``--train dex``);
* ``dex-quoted``: the same with the quoted schedule (λ = λ_learn after T: the collapse the issue measured);
* ``linear``: control, O + O·W on the same heads, no λ/schedule (same function class as DEX);
* ``lora``: control, rank-matched LoRA on ``o_proj`` of the same layers (no differential structure);
* optional: ``all`` (DEX trained together with every base weight, ``--train all``) and its control ``finetune``
  (the same training of every base weight without DEX), ``dex-lambda0.5``.

``--seeds N`` runs the DEX and linear arms with N seeds (``dex-s1`` is seed 1, ...), for seed-paired verdicts.
A killed study resumes per arm: a finished arm (its adapter_config.json) and a finished evaluation
(its results.json) are not run again.

Each arm is trained with ``diffattn adapt dex``, merged with ``diffattn adapt load --merge`` (a stock
model directory), then evaluated with ``diffattn eval`` tasks (small CPU grids, listed in the report).
Every command, its wall time and exit code go to ``<out>/study.json``; a markdown table of the numbers
goes to ``<out>/summary.md`` (rewritten after every arm), and the numbers as data to ``<out>/results.json`` at
the end. A failing evaluation task is recorded, not fatal. Each arm is trained, merged and evaluated before
the next one starts, seed pairs first (dex, linear, dex-s1, linear-s1, then the other arms), so a stopped
study holds whole arms and whole seed pairs.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ..fsutil import write_text_atomic
from ..utils.stats import sampling_margin

ARMS = {"dex": [], "dex-quoted": ["--schedule", "quoted"], "linear": ["--control", "linear"],
        "lora": ["--control", "lora"], "all": ["--train", "all"],
        "finetune": ["--control", "finetune", "--train", "all"],  # the control of "all": the same without DEX
        # sensitivity to the UNCONFIRMED "λ_learn starts near zero": the same DEX with λ_learn starting at 0.5
        "dex-lambda0.5": ["--lambda-learn-init", "0.5"]}
DEFAULT_ARMS = ["dex", "dex-quoted", "linear", "lora"]
SEEDED_ARMS = ("dex", "linear")  # run with every seed of --seeds (the others with seed 0)
PRESETS = {  # budget per arm
    # 524k tokens/arm; about 36 min per trained arm on 2 cores (SmolLM2, ~240 tokens/s), ~4 h for the default arms
    "cpu": dict(steps=256, batch_size=4, seq_len=512, lr=2e-3, device="cpu"),
    "gpu": dict(steps=1024, batch_size=16, seq_len=512, lr=1e-3, device="cuda"),   # 8.4M tokens/arm
}
CLEAN_TEXT = ("source:sotu", "source:shakespeare", "source:moby_dick")  # the default corpus minus the sources the evaluations use


_BAR = None  # the study's progress bar (a terminal only); command lines are written above it


def _echo(line: str) -> None:
    if _BAR is not None and not _BAR.disable:
        _BAR.write(line)
    else:
        print(line, flush=True)


def _cmd(args: list[str], log: list, out: Path, name: str, timeout: float | None = None) -> int:
    t = time.time()
    logf = out / "logs" / f"{name}.log"
    logf.parent.mkdir(parents=True, exist_ok=True)
    if _BAR is None or _BAR.disable:  # no bar (not a terminal): say what runs now; its progress lines go to its log
        _echo(f"[{name}] started; log {logf}")
    with open(logf, "w") as fh:
        try:
            rc = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = round(time.time() - t, 1)
    entry = {"name": name, "cmd": shlex.join(args), "rc": rc, "wall_s": wall}
    log.append(entry)
    _echo(f"[{name}] rc={rc} {wall:.0f}s  {entry['cmd']}")
    write_text_atomic(out / "study.json", json.dumps({"commands": log}, indent=1) + "\n")
    return rc


def eval_grids(shard_dir: str, scale: int = 1, preset: str = "cpu", seq_len: int = 512) -> dict[str, list[str]]:
    """The `diffattn eval TASK` options of each task (issue #16's set): perplexity; multi-needle at 1-2K tokens, N/R
    1/1, 4/2, 6/2; ICL with more shots on wordnet-supersense and bbc-topic; the hallucination proxy. CPU-sized
    grids by default (2 cores); ``scale`` multiplies the samples; ``preset="gpu"`` adds 2K prompts and 32 shots."""
    c = lambda *xs: ",".join(str(x) for x in xs)  # noqa: E731  (list options are comma-separated)
    gpu = preset == "gpu"
    return {
        "ppl": ["--data", shard_dir, "--max-tokens", "32768", "--seq-len", str(seq_len)],  # the training windows
        "needle": ["--data", shard_dir, "--nr", c("1/1", "4/2", "6/2"), "--lengths", c(1024, 2048) if gpu else "1024",
                   "--samples", str((10 if gpu else 2) * scale), "--depths", c(0, 50, 100)],
        "icl": ["--datasets", c("wordnet-supersense", "bbc-topic"), "--shots", c(8, 16, 32) if gpu else c(8, 16),
                "--runs", str(scale), "--test-size", str(40 * scale), "--no-robustness"],
        "hallucination": ["--datasets", "bbc-headline", "--samples", str(20 * scale)],
        "attention-noise": ["--data", shard_dir, "--length", "512", "--samples", str(2 * scale)],
    }


def _parser() -> argparse.ArgumentParser:
    from ..utils.options import OneLineParser

    p = OneLineParser(prog="python -m diffattn.dex.study", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--base", default="smollm2")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="budget per arm (default: cpu)")
    p.add_argument("--steps", type=int, help="optimizer steps per arm (default: the preset's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seeds", type=int, default=2, help=f"seeds of the {' and '.join(SEEDED_ARMS)} arms")
    p.add_argument("--retrieval-share", type=float, default=0.25,
                   help="share of training rows that are needle-retrieval sequences (every arm the same)")
    p.add_argument("--val-tokens", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    # the evaluation sets are built from the BBC and Wikipedia sources of the default corpus: adapting on them
    # would train on the evaluated articles, so the study adapts on the rest of the default corpus
    p.add_argument("--text", nargs="+", default=list(CLEAN_TEXT), help="adaptation text (default: %(default)s)")
    p.add_argument("--data", help="a prepared shard directory of the base's tokenizer instead of --text (e.g. carried "
                                  "to a machine without the corpora)")
    p.add_argument("--device")
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    p.add_argument("--evals", nargs="*", default=["ppl", "needle", "icl", "hallucination"],
                   choices=list(eval_grids("-")))
    p.add_argument("--eval-timeout", type=float, default=3600)
    p.add_argument("--grid-scale", type=int, default=1, help="multiply the evaluation sample counts")
    return p


def check_args(args: argparse.Namespace) -> str | None:
    """The first thing wrong with the study options (a one-line message), or None. Runs before anything is written."""
    from .run import DexRun

    for name in ("seeds", "grid_scale"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if not args.eval_timeout > 0:
        return f"--eval-timeout must be > 0, got {args.eval_timeout}"
    out = Path(args.out)
    try:  # every arm's own options: the checks of `adapt dex` itself
        DexRun(base=args.base, out=str(out / "dex"), steps=args.steps, batch_size=args.batch_size,
               seq_len=args.seq_len, lr=args.lr, val_tokens=args.val_tokens, retrieval_share=args.retrieval_share,
               data=args.data, text=None if args.data else args.text).check()
    except (ValueError, FileNotFoundError) as e:
        return str(e).splitlines()[0]
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a directory"
    if out.is_dir() and any(out.iterdir()) and not (out / "study.json").is_file():
        return f"--out {out} exists, is not empty and holds no study.json (not a study to resume; not overwriting)"
    return None


def run_order(arms: list[str], seeds: int, first_seed: int) -> list[tuple[str, str, int]]:
    """(name, arm, seed) in the order they run: the seeded arms seed by seed (dex, linear, dex-s1, linear-s1: a
    stopped study has whole seed pairs first, and each linear arm finds its DEX heads), then the other arms."""
    seeded = [a for a in arms if a in SEEDED_ARMS]
    runs = [(a if k == 0 else f"{a}-s{k}", a, first_seed + k) for k in range(seeds) for a in seeded]
    return runs + [(a, a, first_seed) for a in arms if a not in SEEDED_ARMS]


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    problem = check_args(args)
    if problem:
        p.exit(2, f"{p.prog}: error: {problem}\n")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    da = [sys.executable, "-m", "diffattn"]
    prev = _load(out / "study.json")  # a resumed study keeps the record of the commands that already ran
    log: list = list(prev.get("commands", [])) if isinstance(prev, dict) else []
    t0 = time.time()
    runs = run_order(args.arms, args.seeds, args.seed)
    names = ["base", *[name for name, _, _ in runs]]
    global _BAR
    from tqdm.auto import tqdm

    # one tick per train / merge / evaluation command, done or found done (shown on a terminal only)
    _BAR = tqdm(total=len(runs) * (2 + len(args.evals)) + len(args.evals), desc="study", unit="cmd",
                dynamic_ncols=True, disable=None)
    try:
        return _run_study(args, out, da, log, t0, runs, names)
    finally:
        _BAR.close()
        _BAR = None


def _arm_flags(args, out: Path, arm: str, seed: int) -> list[str]:
    """The arm's own ``adapt dex`` flags: its ``ARMS`` entry, and the heads of the linear and LoRA controls."""
    extra = list(ARMS[arm])
    dex_cfg = out / ("dex" if seed == args.seed else f"dex-s{seed - args.seed}") / "adapter_config.json"
    if arm == "linear" and dex_cfg.is_file():  # exactly DEX's heads (of the same seed), without recalibrating
        heads = json.loads(dex_cfg.read_text())["heads"]
        extra += ["--heads", ",".join(f"{l}:{h}" for l, hs in heads.items() for h in hs)]
    elif arm == "lora":  # LoRA acts on o_proj as a whole: heads only pick layers (all of them)
        extra += ["--heads", "all"]
    return extra


def _train_and_merge(args, out: Path, da: list[str], log: list, name: str, arm: str, seed: int) -> int:
    """Train one arm's adapter, then merge it into a model directory (each skipped when already done); the exit
    code of the first command that fails, else 0."""
    extra = _arm_flags(args, out, arm, seed)
    if not (out / name / "adapter_config.json").is_file():
        rc = _cmd(da + ["adapt", "dex", "--base", args.base, "--out", str(out / name), "--steps", str(args.steps),
                        "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lr", str(args.lr),
                        "--val-tokens", str(args.val_tokens), "--seed", str(seed), "--device", args.device,
                        *(["--data", args.data] if args.data else ["--text", *args.text]),
                        "--retrieval-share", str(args.retrieval_share),
                        "--dtype", "bfloat16" if args.device.startswith("cuda") else "float32",
                        *extra], log, out, f"train-{name}")  # its log is a file: progress lines, phase times
        if rc:
            return rc
    _BAR.update()
    if not (out / f"{name}-merged" / "config.json").is_file():
        rc = _cmd(da + ["adapt", "load", args.base, str(out / name), "--merge", "--out", str(out / f"{name}-merged"),
                        "--device", args.device], log, out, f"merge-{name}")
        if rc:
            return rc
    _BAR.update()
    return 0


def _study_record(args, log: list, t0: float, grids) -> dict:
    """``study.json``: every command with its exit code and wall time, the study's options and evaluation grids,
    and the environment (utils/environment.py)."""
    from ..utils.environment import environment

    return {"commands": log, "wall_s": round(time.time() - t0, 1), "args": vars(args), "grids": grids,
            "environment": environment(args.device)}


def _run_study(args, out: Path, da: list[str], log: list, t0: float, runs, names) -> int:
    grids = None

    def evaluate(name: str, model: str) -> None:
        for task in args.evals:
            dest = out / "eval" / f"{name}-{task}"
            if not (dest / "results.json").is_file():
                _cmd(da + ["eval", task, "--model", model, "--out", str(dest), "--device", args.device, "--seed",
                           str(args.seed), *grids[task]], log, out, f"eval-{task}-{name}", timeout=args.eval_timeout)
            _BAR.update()

    # each arm is trained, merged and evaluated before the next starts, so a stopped study has whole arms
    for name, arm, seed in runs:
        rc = _train_and_merge(args, out, da, log, name, arm, seed)
        if rc:
            return rc
        if grids is None:  # the evaluations read the adaptation shards (the same for every arm)
            from .bases import resolve_base_path

            base_dir, _, _ = resolve_base_path(args.base, log=lambda m: None)
            shard_dir = json.loads((out / name / "adapter_config.json").read_text())["training"]["data"]["dir"]
            grids = eval_grids(shard_dir, args.grid_scale, args.preset, args.seq_len)
            evaluate("base", str(base_dir))
        evaluate(name, str(out / f"{name}-merged"))
        write_text_atomic(out / "summary.md", summarize(out, names))  # a partial summary after every arm

    write_text_atomic(out / "study.json", json.dumps(_study_record(args, log, t0, grids), indent=1) + "\n")
    write_text_atomic(out / "results.json", json.dumps(results(out, names), indent=1) + "\n")
    write_text_atomic(out / "summary.md", summarize(out, names))
    _echo((out / "summary.md").read_text())
    return 0


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _metrics(out: Path, name: str) -> dict:
    """The headline numbers of one arm: val loss (the adapter's own before/after evaluation), eval-task ppl,
    needle accuracy (mean over N/R), ICL accuracy (mean over datasets and shots), unsupported rate."""
    ev = out / "eval"
    res = lambda task: ((_load(ev / f"{name}-{task}" / "results.json") or {}).get("results"))  # noqa: E731
    m = {}
    training = (_load(out / name / "adapter_config.json") or {}).get("training") or {}
    if name == "base":  # the base model's: any arm's "before" evaluation (same validation windows)
        arms = [d for d in sorted(out.iterdir()) if (d / "adapter_config.json").is_file()] if out.is_dir() else []
        training = {"val_after": ((_load(arms[0] / "adapter_config.json") or {}).get("training") or {}).get(
            "val_before")} if arms else {}
    if (training.get("val_after") or {}).get("val_loss") is not None:
        m["val_loss"] = training["val_after"]["val_loss"]
    r = res("ppl")
    if r:
        m["ppl"] = r.get("perplexity")
    r = res("needle")
    if r:
        m["needle"] = sum(b["accuracy"] for b in r["by_nr"]) / len(r["by_nr"])
        m["needle_n"] = len(r.get("trials") or [])
    r = res("icl")
    if r:
        accs = [c["accuracy_mean"] for d in r["datasets"] for c in d["curve"]]
        m["icl"] = sum(accs) / len(accs) if accs else None
        m["icl_n"] = sum(int(d.get("test_size") or 0) * len(d["curve"]) for d in r["datasets"])
    r = res("hallucination")
    if r:
        rates = [d.get("unsupported_rate") for d in r["datasets"] if d.get("unsupported_rate") is not None]
        m["unsupported"] = sum(rates) / len(rates) if rates else None
        m["unsupported_n"] = sum(int(d.get("samples") or 0) for d in r["datasets"])
    return m


SAMPLING_RULE = ("The evaluations score a few hundred items at most, the same items for every arm, so seeds do not "
                 "sample the evaluation's own noise. For the proportion metrics (needle, ICL, unsupported rate) a "
                 "difference must also exceed the evaluation's sampling margin 2·√(2·0.25/n) (twice the largest "
                 "standard error of a difference of two proportions over n items; the 'margin' column), or the "
                 "verdict is **inconclusive** whatever the seeds say.")


def results(out: Path, names: list[str]) -> dict:
    """The study's numbers as data: each arm's headline metrics, training record and λ; the summary's Markdown."""
    arms = {}
    for name in names:
        cfg = _load(out / name / "adapter_config.json") or {}
        tr = cfg.get("training") or {}
        arms[name] = {"metrics": _metrics(out, name), "trainable_params": tr.get("trainable_params"),
                      "tokens": tr.get("tokens"), "train_s": tr.get("elapsed_s"), "lambda": cfg.get("lambda"),
                      "method": (cfg.get("options") or {}).get("method")}
    return {"arms": arms, "summary_md": summarize(out, names)}


def verdicts(out: Path, names: list[str]) -> list[str]:
    """Seed-paired verdicts (utils/stats.py VERDICT_RULE) of DEX against the base model and the linear control,
    and, where the study ran them, against the LoRA control and the quoted schedule (one seed each: the new
    default must beat the form it replaced), and of DEX with every base weight trained (`all`) against plain
    fine-tuning of every weight (`finetune`)."""
    from ..utils.stats import VERDICT_RULE, verdict

    seeds = sorted({0, *[int(n.rsplit("-s", 1)[1]) for n in names if "-s" in n and n.rsplit("-s", 1)[1].isdigit()]})
    arm = lambda base, k: base if k == 0 else f"{base}-s{k}"  # noqa: E731
    pairs = [("dex", "base"), ("dex", "linear")] + [
        p for p in (("dex", "lora"), ("dex", "dex-quoted"), ("all", "finetune")) if p[0] in names and p[1] in names]
    cache: dict[str, dict] = {}

    def metrics(name: str) -> dict:  # each arm's records are read once, not once per metric and comparison
        if name not in cache:
            cache[name] = _metrics(out, name)
        return cache[name]

    rows = []
    for metric, better, margin in (("val_loss", "lower", 0.01), ("ppl", "lower", 0.5), ("needle", "higher", 0.05),
                                   ("icl", "higher", 0.02),
                                   ("unsupported", "lower", 0.02)):
        for variant, other in pairs:
            dex_m = [metrics(arm(variant, k)) for k in seeds]
            dex = [m.get(metric) for m in dex_m]
            if other == "base" and metric == "val_loss":  # each seed has its own validation split: its "before"
                ref_m = []
                ref = [(((_load(out / arm(variant, k) / "adapter_config.json") or {}).get("training") or {})
                        .get("val_before") or {}).get("val_loss") for k in seeds]
            else:
                ref_m = [metrics("base" if other == "base" else arm(other, k)) for k in seeds]
                ref = [m.get(metric) for m in ref_m]
            paired = [k for k in range(len(seeds)) if dex[k] is not None and ref[k] is not None]  # seeds with both
            counts = [m[k].get(f"{metric}_n") for k in paired for m in (dex_m, ref_m) if m]
            sampled = None if metric in ("val_loss", "ppl") else sampling_margin(min((c or 0) for c in counts or [0]))
            v = verdict(dex, ref, better, min_effect=margin, noise=sampled)
            label = "DEX" if variant == "dex" else variant
            rows.append(f"| {label} vs {other} | {metric} ({better} is better) | {_f(v.diff, 4)} | "
                        f"{_f(sampled) if sampled is not None and math.isfinite(sampled) else '—'} | {v.verdict} | "
                        f"{v.reason} |")
    return ["", "## Verdicts (seed-paired)", "", VERDICT_RULE, "", SAMPLING_RULE, "",
            "| comparison | metric | mean difference | margin | verdict | why |", "|---|---|---|---|---|---|", *rows]


def _eval_results(out: Path, name: str, task: str) -> dict | None:
    """The ``results`` of one arm's evaluation task, or None when it has not run."""
    r = _load(out / "eval" / f"{name}-{task}" / "results.json")
    return r.get("results") if isinstance(r, dict) else None


def _training_table(out: Path, names: list[str]) -> list[str]:
    """The base's and every arm's trained parameters, tokens, time, mean λ and validation loss after training."""
    lines = ["## Training and validation perplexity", "",
             "| arm | trained params | tokens | train time (s) | mean λ | val loss | val ppl |", "|---|---|---|---|---|---|---|"]
    base_val = None
    for name in names:
        if name == "base":
            continue
        cfg = _load(out / name / "adapter_config.json") or {}
        tr = cfg.get("training", {})
        base_val = base_val or tr.get("val_before")
    if base_val:
        lines.append(f"| base | 0 | 0 | — | — | {base_val['val_loss']:.4f} | {base_val['val_ppl']:.3f} |")
    for name in names:
        if name == "base":
            continue
        cfg = _load(out / name / "adapter_config.json") or {}
        tr = cfg.get("training", {})
        lam = cfg.get("lambda") or {}
        control = (cfg.get("options") or {}).get("method") in ("linear", "lora", "finetune")  # no λ: the controls
        va = tr.get("val_after") or {}
        lines.append(f"| {name} | {_n(tr.get('trainable_params'))} | {_n(tr.get('tokens'))} | "
                     f"{tr.get('elapsed_s', '—')} | {_f(sum(lam.values()) / len(lam) if lam and not control else None, 4)} | "
                     f"{_f(va.get('val_loss'), 4)} | {_f(va.get('val_ppl'))} |")
    return lines


def _arm_results(out: Path, names: list[str], task: str):
    """(arm, results) for every arm whose evaluation ``task`` has results, in ``names`` order."""
    for name in names:
        r = _eval_results(out, name, task)
        if r:
            yield name, r


def _section(title: str, header: list[str], rows: list[str]) -> list[str]:
    """A Markdown section: a blank line, its title and its table (nothing at all when there is no row)."""
    return ["", title, ""] + header + rows if rows else []


def _needle_table(out: Path, names: list[str]) -> list[str]:
    rows = []
    for name, r in _arm_results(out, names, "needle"):
        rows.append("| " + " | ".join([name] + [f"{b['accuracy']:.3f}" for b in r["by_nr"]]) + " |")
        nr = [f"N/R {b['n']}/{b['r']}" for b in r["by_nr"]]
    return _section("## Multi-needle retrieval (accuracy, mean over lengths and depths)",
                    ["| arm | " + " | ".join(nr) + " |", "|---|" + "---|" * len(nr)] if rows else [], rows)


def _icl_table(out: Path, names: list[str]) -> list[str]:
    rows = []
    for name, r in _arm_results(out, names, "icl"):
        for d in r["datasets"]:
            rob = (d.get("robustness") or {}).get("arrangements", {})
            curve = ", ".join(f"{c['shots']}: {c['accuracy_mean']:.3f}" for c in d["curve"])
            spread = ", ".join(f"{k} {v['spread']:.3f}" for k, v in rob.items())
            rows.append(f"| {name} | {d['dataset']} | {curve} | {d['majority_baseline']:.3f} | {spread or '—'} |")
    return _section("## In-context learning (accuracy by shots; order robustness: best − worst)",
                    ["| arm | dataset | accuracy by shots | majority | spread by arrangement |",
                     "|---|---|---|---|---|"], rows)


def _attention_table(out: Path, names: list[str]) -> list[str]:
    rows = [f"| {name} | {m['answer']:.4f} | {m['noise']:.4f} | {m['bos']:.4f} | {m['query']:.4f} |"
            for name, m in ((name, r["mean"]) for name, r in _arm_results(out, names, "attention-noise"))]
    return _section("## Attention allocation (softmax maps, final query position)",
                    ["| arm | answer | noise | BOS | query |", "|---|---|---|---|---|"], rows)


def _hallucination_table(out: Path, names: list[str]) -> list[str]:
    rows = [f"| {name} | {d['dataset']} | {_f(d.get('unsupported_rate'))} | {_f(d.get('faithful_share'))} | "
            f"{_f(d.get('rougeL_f1'))} |"
            for name, r in _arm_results(out, names, "hallucination") for d in r["datasets"]]
    return _section("## Contextual hallucination proxy (lexical 'unsupported' rate; lower is better)",
                    ["| arm | dataset | unsupported rate | faithful share | ROUGE-L F1 |", "|---|---|---|---|---|"],
                    rows)


def _ppl_table(out: Path, names: list[str]) -> list[str]:
    rows = []
    for name in names:
        r = (_load(out / "eval" / f"{name}-ppl" / "results.json") or {}).get("results")
        if r:
            rows.append(f"| {name} | {_f(r.get('perplexity'))} | {_f(r.get('val_loss'), 4)} |")
    return _section("## Perplexity on held-out adaptation text (diffattn eval ppl)",
                    ["| arm | ppl | NLL |", "|---|---|---|"], rows)


def summarize(out: Path, names: list[str]) -> str:
    """Markdown tables of the numbers found under ``out`` (missing ones are '—'; a table no arm has is left out)."""
    lines = _training_table(out, names)
    for table in (_needle_table, _icl_table, _attention_table, _hallucination_table, _ppl_table):
        lines += table(out, names)
    lines += verdicts(out, names)
    return "\n".join(lines) + "\n"


def _f(v, digits: int = 3) -> str:
    return "—" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.{digits}f}"


def _n(v) -> str:
    return "—" if not isinstance(v, int) else f"{v:,}"


if __name__ == "__main__":
    sys.exit(main())
