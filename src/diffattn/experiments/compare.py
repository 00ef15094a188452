"""``diffattn compare``: a parameter-matched study of the differential-attention family.

For one preset (experiments/presets.py, ``configs/compare-*.toml``):

1. **Data**: ``diffattn data prepare`` with the preset's corpus and tokenizer (cached; a no-op when
   the shards are up to date), or a ready shard directory (``--data``).
2. **Training**: every variant (parameter-matched to the baseline by ``presets.matched``; DIFF V2
   also against its same-heads Transformer) and every seed, on the *identical* token stream
   (``WindowSampler`` is a pure function of (seed, step)), schedule and optimiser, with the same
   share of needle-retrieval rows (needle_mix.py). Each run is a normal training run directory
   under ``OUT/runs/<variant>/seed<k>``; an interrupted study resumes where it stopped.
3. **Evaluation**: the preset's ``diffattn eval`` tasks on every final checkpoint, on held-out text.
4. **Cost**: training-step time (round-robin over the variants in this process, the same shapes)
   and peak memory (CUDA allocator peak, or a fresh child process's peak RSS on CPU), as ratios to
   the baseline measured in the same run.
5. **Report**: ``results.json`` + ``REPORT.md`` + PNG plots in ``OUT`` (experiments/report.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import ModelConfig
from ..fsutil import write_text_atomic
from ..model import build_model
from ..model.loss import lm_loss
from ..utils.environment import environment
from ..utils.runtime import resolve_device
from .presets import BASELINE, StudyConfig, variant_config

STUDY_FILE = "study.json"
RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.json"  # written into a run directory once its training finished


# ------------------------------------------------------------------------------------------- data
def prepare_data(study: StudyConfig, data_dir: str | None, log: Callable[[str], None]) -> Path:
    if data_dir is not None:
        path = Path(data_dir)
        if not (path / "index.json").is_file():
            raise FileNotFoundError(f"--data {path}: not a shard directory (no index.json); "
                                    f"run `diffattn data prepare --out {path}` first")
        return path
    from ..data.prepare import PrepareOptions, prepare

    spec = dict(study.data)
    out = Path(spec.pop("out", f"data/{study.name}"))
    corpus = spec.pop("corpus", ["default"])
    opts = PrepareOptions(corpus=[corpus] if isinstance(corpus, str) else list(corpus),
                          tokenizer=spec.pop("tokenizer", "bpe:8192"), out=out,
                          val_fraction=spec.pop("val_fraction", 0.05), seed=spec.pop("seed", 0))
    if spec:
        raise ValueError(f"[data] unknown key(s) {', '.join(sorted(spec))}; valid: corpus, tokenizer, out, "
                         f"val_fraction, seed")
    prepare(opts, log=log)
    return out


def haystack_texts(data_dir: Path, tokenizer, split: str = "train", max_tokens: int = 400_000) -> list[str]:
    """Documents of a split, decoded, up to ``max_tokens`` tokens (the needle-mix filler)."""
    from ..data.shards import read_index, read_tokens

    tokens = read_tokens(data_dir, split)[:max_tokens]
    eos = read_index(data_dir)["eos_id"]
    cuts = np.flatnonzero(tokens == eos)
    docs, start = [], 0
    for end in list(cuts) + [len(tokens)]:
        if end - start > 16:
            docs.append(tokenizer.decode(tokens[start:end].tolist()))
        start = end + 1
    return docs


# ------------------------------------------------------------------------------------------- training
def read_metrics(run_dir: Path) -> dict[str, list]:
    train, val = [], []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of an interrupted run
            if rec.get("kind") == "train":
                train.append(rec)
            elif rec.get("kind") == "eval":
                val.append(rec)
    return {"train": train, "val": val}


def train_run(study: StudyConfig, variant: str, seed: int, data_dir: Path, run_dir: Path, tokenizer,
              haystack: list[str], log: Callable[[str], None]) -> dict:
    """Train (or resume, or skip when finished) one (variant, seed) run; returns its summary."""
    from ..train.checkpoint import latest_checkpoint
    from ..train.config import TrainConfig
    from ..train.trainer import plan_configs, train
    from . import needle_mix

    done = run_dir / SUMMARY_FILE
    if done.is_file():
        log(f"[compare] {variant} seed {seed}: finished earlier, reusing {run_dir}")
        return json.loads(done.read_text())
    cfg = study.model_config(variant).replace(vocab_size=tokenizer.vocab_size)
    tcfg = TrainConfig.from_dict({**study.train, "data": str(data_dir), "out": str(run_dir), "seed": seed})
    latest = latest_checkpoint(run_dir)
    log(f"[compare] {variant} seed {seed}: {'resuming ' + latest.name if latest else 'training'} "
        f"({build_model_params(cfg):,} parameters)")
    plan = plan_configs(cfg, tcfg, resume=latest is not None)
    sampler = None
    if study.needle_share > 0:  # the same data order with a share of retrieval rows mixed in
        sampler = needle_mix.NeedleMixSampler(plan.window_sampler(), tokenizer, haystack, share=study.needle_share,
                                              seed=seed, max_needles=study.needle_max)
    t0 = time.time()
    built: dict = {}
    summary = train(plan, sampler=sampler, on_start=lambda trainer: built.update(params=trainer.n_params))
    if not summary.get("finished"):
        raise KeyboardInterrupt  # stopped by a signal: the checkpoint is saved, `compare` resumes it
    summary.update(variant=variant, seed=seed, train_wall_s=time.time() - t0, params=built["params"],
                   config=cfg.to_dict())
    val = f", val_loss {summary['val_loss']:.4f}" if summary.get("val_loss") is not None else ""
    log(f"[compare] {variant} seed {seed}: trained in {summary['train_wall_s']:.1f}s{val}")
    write_text_atomic(done, json.dumps(summary, indent=1) + "\n")
    return summary


def build_model_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return build_model(cfg).param_counts()["total"]


# ------------------------------------------------------------------------------------------- evaluation
def _task_runner(task: str):
    """(run function, options class) of evaluation task ``task``: the one task table, ``diffattn.eval.TASKS``."""
    from ..eval import TASKS

    options_cls, run = TASKS[task]
    return run, options_cls


def evaluate_run(study: StudyConfig, checkpoint: Path, data_dir: Path, eval_dir: Path, seed: int,
                 log: Callable[[str], None]) -> dict[str, dict]:
    from ..eval.loader import load as load_adapter

    device = resolve_device("auto").type
    adapter, tok = load_adapter(checkpoint, device=device)
    records = {}
    for task in study.tasks:
        if task == "recall":
            continue  # not an evaluation of the LM checkpoint: trained per variant and seed (recall_study)
        out = eval_dir / task
        if (out / "results.json").is_file():
            records[task] = json.loads((out / "results.json").read_text())
            continue
        if task == "lambda" and not getattr(adapter, "differential", False):
            continue  # no λ in a standard Transformer
        run, options_cls = _task_runner(task)
        opts = dict(study.eval.get(task, {}))
        if "data" in {f for f in options_cls.__dataclass_fields__} and "data" not in opts:
            opts["data"] = str(data_dir)  # held-out text: the shard directory's val split
        opts.setdefault("seed", seed)
        t0 = time.time()
        records[task] = run(adapter, tok, options_cls.from_mapping(opts, source=f"[eval.{task}]"), out)
        log(f"[compare]   eval {task}: {time.time() - t0:.1f}s")
    return records


# ------------------------------------------------------------------------------------------- recall
def _recall_worker(args: tuple) -> tuple[str, int, dict]:
    """One (variant, seed) recall run in a worker process (one thread: the models are tiny)."""
    variant, seed, cfg_dict, opts_dict = args
    torch.set_num_threads(1)
    from .recall import RecallStudyOptions, run_one

    opts = RecallStudyOptions.from_mapping(opts_dict)
    return variant, seed, run_one(ModelConfig.from_dict(cfg_dict), opts, seed)


def recall_study(study: StudyConfig, out: Path, log: Callable[[str], None]) -> dict:
    """Train and evaluate the recall task for every variant and recall seed (experiments/recall.py).

    Each (variant, seed) record is written to ``OUT/recall/<variant>/seed<k>.json`` when it finishes;
    a restarted study reuses the finished ones and reruns the rest (a run takes seconds; every run is a
    pure function of its configuration and seed, so a rerun gives the same numbers). Runs go to
    ``[recall] workers`` processes (default: one per CPU core, at most 4), one thread each.
    """
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from .recall import RecallStudyOptions
    from .recall_records import mean_accuracy

    opts = RecallStudyOptions.from_mapping(study.recall)
    base = opts.baseline(init=study.baseline.init, init_std=study.baseline.init_std)
    configs = {v: variant_config(base, v, study.variant_options) for v in study.variants}
    runs: dict[str, dict[str, dict]] = {v: {} for v in study.variants}
    todo = []
    for seed in opts.seed_list:
        for v in study.variants:
            path = out / "recall" / v / f"seed{seed}.json"
            if path.is_file():
                runs[v][str(seed)] = json.loads(path.read_text())
            else:
                todo.append((v, seed, configs[v].to_dict(), opts.to_dict()))
    n_workers = max(1, min(opts.workers or min(os.cpu_count() or 1, 4), len(todo) or 1))
    log(f"[compare] recall: {len(todo)} run(s) to train ({len(opts.seed_list)} seeds x {len(study.variants)} variants, "
        f"{sum(len(r) for r in runs.values())} reused), {n_workers} worker process(es)")
    t0 = time.time()

    def store(v: str, seed: int, rec: dict) -> None:
        path = out / "recall" / v / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(rec) + "\n")
        runs[v][str(seed)] = rec
        log(f"[compare] recall {v} seed {seed}: mean accuracy {mean_accuracy(rec):.3f} over N=1..{opts.task.max_n} "
            f"({rec['train_s']:.0f}s train, {rec['eval_s']:.0f}s eval)")

    if n_workers == 1:
        threads = torch.get_num_threads()  # the worker sets one thread: give this process its own back
        try:
            for item in todo:
                store(*_recall_worker(item))
        finally:
            torch.set_num_threads(threads)
    elif todo:
        with ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for v, seed, rec in pool.map(_recall_worker, todo):
                store(v, seed, rec)
    log(f"[compare] recall done in {time.time() - t0:.0f}s")
    models = {v: {"config": configs[v].to_dict(), "params": _param_counts(configs[v])} for v in study.variants}
    return {"options": opts.to_dict(), "seeds": opts.seed_list, "models": models, "runs": runs}


# ------------------------------------------------------------------------------------------- cost
def measure_cost(study: StudyConfig, vocab_size: int, seq_len: int, micro_batch: int, repeats: int,
                 log: Callable[[str], None]) -> dict[str, dict]:
    """Training-step time (round-robin, same process, same shapes) and peak memory per variant."""
    from ..utils.timing import round_robin

    device = resolve_device("auto").type
    dtype = torch.bfloat16 if device == "cuda" else None
    steps, out = {}, {}
    for variant in study.variants:
        cfg = study.model_config(variant).replace(vocab_size=vocab_size)
        steps[variant] = _train_step(cfg, seq_len, micro_batch, device, dtype)
    timings = round_robin(steps, warmup=2, repeats=repeats, device=device, progress=None)
    for variant in study.variants:
        med = timings[variant]["median_s"]
        out[variant] = {"step_median_s": med, "step_q1_s": timings[variant]["q1_s"], "step_q3_s": timings[variant]["q3_s"],
                        "tokens_per_s": micro_batch * seq_len / med,
                        "peak_memory_bytes": _peak_memory(study.model_config(variant).replace(vocab_size=vocab_size),
                                                          seq_len, micro_batch, device, dtype)}
    base = out[BASELINE]
    for variant, row in out.items():
        row["throughput_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["memory_ratio"] = (row["peak_memory_bytes"] / base["peak_memory_bytes"]
                               if row["peak_memory_bytes"] and base["peak_memory_bytes"] else None)
    log("[compare] cost measured: " + ", ".join(f"{v} {r['throughput_ratio']:.2f}x" for v, r in out.items()))
    return {"device": device, "seq_len": seq_len, "micro_batch": micro_batch, "repeats": repeats,
            "method": "median of round-robin training steps (forward, backward, AdamW) on random tokens; "
                      "memory: torch.cuda.max_memory_allocated on GPU, else peak RSS of a fresh child process",
            "variants": out}


def _train_step(cfg: ModelConfig, seq_len: int, batch: int, device: str, dtype):
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1)).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            logits = model(ids[:, :-1])
        loss = lm_loss(logits, ids[:, 1:])
        loss.backward()
        opt.step()

    return step


def _peak_memory(cfg: ModelConfig, seq_len: int, batch: int, device: str, dtype) -> int | None:
    if device == "cuda":
        step = _train_step(cfg, seq_len, batch, device, dtype)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    if not sys.platform.startswith("linux"):
        return None
    import subprocess

    code = ("import json, sys; from diffattn.experiments.compare import _memory_child; "
            "_memory_child(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg.to_dict()), str(seq_len), str(batch)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return int(proc.stdout.strip().splitlines()[-1])


def _status_kib(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(name)


def _memory_child(cfg: dict, seq_len: int, batch: int) -> None:
    """Peak RSS of model + optimizer state + one training step, above the interpreter's baseline."""
    base = _status_kib("VmRSS")
    step = _train_step(ModelConfig.from_dict(cfg), seq_len, batch, "cpu", None)
    step()
    step()
    print((_status_kib("VmHWM") - base) * 1024)


# ------------------------------------------------------------------------------------------- the study
def _check_out(out: Path, study_record: dict) -> None:
    marker = out / STUDY_FILE
    if marker.is_file():
        previous = json.loads(marker.read_text())
        if previous.get("fingerprint") != study_record["fingerprint"]:
            raise ValueError(f"--out {out} holds a different study (preset {previous.get('preset')!r} with other "
                             f"settings); choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not a compare output directory; choose another --out")


def study_fingerprint(study: StudyConfig) -> str:
    """What an output directory's runs depend on. The seed count is not part of it: every run is a directory
    of its own seed and a pure function of (settings, seed), so a rerun with more seeds reuses the finished
    ones and adds the rest (the init study extends its language models this way)."""
    import hashlib

    payload = json.dumps({"variants": study.variants, "tasks": study.tasks, "data": study.data,
                          "baseline": study.baseline.to_dict(), "train": study.train, "needle": [study.needle_share,
                          study.needle_max], "eval": study.eval, "variant_options": study.variant_options,
                          "recall": study.recall if "recall" in study.tasks else None}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _run_recall_only(study: StudyConfig, out: Path, record: dict, t_start: float, log) -> dict:
    """A study of the recall task alone: no language model is trained and no corpus is needed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / STUDY_FILE).write_text(json.dumps(record, indent=1) + "\n")
    recall = recall_study(study, out, log)
    results = {"preset": study.name, "source": study.source, "fingerprint": record["fingerprint"],
               "variants": list(study.variants), "seeds": [], "tasks": list(study.tasks), "data": None,
               "train": {}, "needle_mix": {}, "models": recall["models"], "runs": {}, "cost": None,
               "recall": recall, "environment": environment(), "wall_time_s": time.time() - t_start}
    return _write_results(out, results)


def _train_and_evaluate_all(study: StudyConfig, out: Path, data: Path, tokenizer, haystack, log) -> dict:
    """Every (seed, variant) run, seed by seed: train it, evaluate its checkpoint, read its metrics."""
    runs: dict[str, dict[int, dict]] = {v: {} for v in study.variants}
    for seed in study.seeds:
        for variant in study.variants:
            run_dir = out / "runs" / variant / f"seed{seed}"
            summary = train_run(study, variant, seed, data, run_dir, tokenizer, haystack, log)
            evals = evaluate_run(study, Path(summary["checkpoint"]), data, run_dir / "eval", seed, log)
            runs[variant][seed] = {"summary": summary, "metrics": read_metrics(run_dir), "eval": evals,
                                   "run_dir": str(run_dir.relative_to(out))}
    return runs


def _study_cost(study: StudyConfig, out: Path, data: Path, vocab_size: int, log) -> dict | None:
    """Speed and memory of every variant at the baseline's training shape (None with ``bench_repeats = 0``)."""
    from ..train.config import TrainConfig

    if study.bench_repeats <= 0:
        return None
    tcfg = TrainConfig.from_dict({**study.train, "data": str(data), "out": str(out)})
    seq_len = tcfg.resolved_seq_len(study.baseline)
    micro = tcfg.batch_size // tcfg.grad_accum
    return measure_cost(study, vocab_size, seq_len, micro, study.bench_repeats, log)


def run_compare(study: StudyConfig, out: str | os.PathLike, *, data_dir: str | None = None,
                log: Callable[[str], None] = print) -> dict:
    from ..eval.tokenizer import TextTokenizer

    out = Path(out)
    record = {"preset": study.name, "source": study.source, "fingerprint": study_fingerprint(study)}
    _check_out(out, record)
    from ..train.config import TrainConfig

    t_start = time.time()
    if all(t == "recall" for t in study.tasks):  # recall alone trains no language model and needs no corpus
        return _run_recall_only(study, out, record, t_start, log)
    data = prepare_data(study, data_dir, log)
    for variant in study.variants:  # validate every run's settings before anything is written
        TrainConfig.from_dict({**study.train, "data": str(data), "out": str(out), "seed": study.seeds[0]}
                              ).resolved_seq_len(study.model_config(variant))
    out.mkdir(parents=True, exist_ok=True)
    (out / STUDY_FILE).write_text(json.dumps(record, indent=1) + "\n")
    tokenizer = TextTokenizer.from_file(data / "tokenizer.json")
    haystack = haystack_texts(data, tokenizer) if study.needle_share > 0 else []
    runs = _train_and_evaluate_all(study, out, data, tokenizer, haystack, log)
    recall = recall_study(study, out, log) if "recall" in study.tasks else None
    cost = _study_cost(study, out, data, tokenizer.vocab_size, log)

    results = {
        "preset": study.name, "source": study.source, "fingerprint": record["fingerprint"],
        "variants": list(study.variants), "seeds": list(study.seeds), "tasks": list(study.tasks),
        "data": {"dir": str(data), "index": json.loads((data / "index.json").read_text())},
        "train": study.train, "needle_mix": {"share": study.needle_share, "max_needles": study.needle_max},
        "models": {v: {"config": study.model_config(v).replace(vocab_size=tokenizer.vocab_size).to_dict(),
                       "params": _param_counts(study.model_config(v).replace(vocab_size=tokenizer.vocab_size))}
                   for v in study.variants},
        "runs": {v: {str(s): r for s, r in by_seed.items()} for v, by_seed in runs.items()},
        "cost": cost,
        "recall": recall,
        "environment": environment(),
        "wall_time_s": time.time() - t_start,
    }
    results["data"]["index"].pop("splits", None)  # file lists: not needed in the report
    return _write_results(out, results)


def _write_results(out: Path, results: dict) -> dict:
    from . import report

    write_text_atomic(out / RESULTS_FILE, json.dumps(results, indent=1, default=_json_default) + "\n")
    report.write_report(out)
    return results


def _param_counts(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        return dict(build_model(cfg).param_counts())


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


__all__ = ["run_compare"]
