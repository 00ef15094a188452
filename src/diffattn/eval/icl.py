"""``icl``: many-shot in-context classification and its robustness to demonstration order
(DIFF V1 §3.5 and App. F; methods.md §5 P6, P7; protocol of Bertsch et al. 2024, rewritten).

Datasets (offline, see ``datasets.py``): ``wiki-topic`` (11-way), ``bbc-topic`` (5-way),
``wordnet-supersense`` (26-way), or a JSONL file. Per dataset and seed, the examples are shuffled
once; the first ``test_size`` are the test set, the next ``pool_size`` the demonstration pool.
Each example's text is cut to ``max_text_tokens`` tokens so that many shots fit a small context.

* **Prompt**: demonstrations ``template(text) + " " + label`` joined by ``separator`` (P6's
  ``TEXT_BETWEEN_SHOTS`` is UNCONFIRMED, "probably a newline": default ``"\\n"``), then the test
  example's ``template(text)``, which ends with the label prefix (e.g. ``Category:``). BOS first
  when the tokenizer has one. If a prompt would not fit the context, the *earliest*
  demonstrations are dropped until it does (the mean effective shot count is reported).
* **Scoring: constrained decoding** (Ratner et al. 2023 / PCW, as in P6): greedy decoding
  restricted, token by token, to continuations of the tokenised labels (``" " + label``); it stops
  as soon as the prefix identifies one label (the shortest unique prefix). When one label's tokens
  are a prefix of another's, the separator's first token (end of label) competes too. Accuracy =
  exact match with the gold label.
* **Accuracy vs shots**: ``shots`` (default 1, 2, 4, ... up to what fits the context), ``runs``
  random demonstration draws (nested: run r uses the first k of one seeded permutation of the
  pool); mean and std over runs. ``stable_accuracy`` averages the upper half of the shot counts
  (the paper's "stable" window is UNCONFIRMED).
* **Order robustness** (P7): one fixed, class-balanced demonstration set of ``robust_shots``
  examples (default: the largest shot count that fits without dropping), evaluated under
  ``permutations`` seeded orders for each arrangement: ``random`` order, ``grouped`` by class
  (class order and within-class order permuted) and ``alternating`` classes (round robin, class
  order permuted; the paper's format (b)). Reported: accuracy per permutation, mean, std
  (population) and spread = best − worst.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .common import (start_task, TaskOptions, TaskResult, UsageError, check_int, finish, markdown_table, mean, new_figure, opt,
                     seeded, std)
from .datasets import (ICL_DATASETS, DatasetUnavailable, ICLDataset, check_icl_dataset_name, load_icl_dataset)

ARRANGEMENTS = ("random", "grouped", "alternating")


@dataclass(frozen=True, kw_only=True)
class IclOptions(TaskOptions):
    datasets: list[str] = opt(list(ICL_DATASETS), "datasets: wiki-topic, bbc-topic, wordnet-supersense or .jsonl files")
    shots: list[int] | None = opt(None, "numbers of demonstrations (default: 1, 2, 4, ... up to the context)")
    runs: int = opt(3, "random demonstration draws per shot count (Bertsch et al.: 10)")
    test_size: int = opt(100, "test examples per dataset (Bertsch et al.: 250)")
    pool_size: int = opt(2000, "demonstration pool size per dataset")
    max_text_tokens: int = opt(48, "cut every example's text to this many tokens")
    separator: str = opt("\n", "text between demonstrations (UNCONFIRMED in the paper; PCW used a newline)",
                         escapes=True)
    robustness: bool = opt(True, "also run the order-robustness test")
    robust_shots: int | None = opt(None, "demonstrations in the robustness test (default: the largest that fits)")
    permutations: int = opt(10, "orders per arrangement in the robustness test")
    arrangements: list[str] = opt(list(ARRANGEMENTS), "robustness arrangements: random, grouped, alternating")
    robust_test_size: int | None = opt(None, "test examples for the robustness test (default: test_size)")

    def check(self):
        if not self.datasets:
            raise UsageError("--datasets: give at least one dataset")
        for d in self.datasets:
            check_icl_dataset_name(d)
        if self.shots is not None:
            if not self.shots:
                raise UsageError("--shots: give at least one shot count")
            for k in self.shots:
                check_int("shots", k, 0)
        check_int("runs", self.runs, 1)
        check_int("test_size", self.test_size, 1)
        check_int("pool_size", self.pool_size, 1)
        check_int("max_text_tokens", self.max_text_tokens, 1)
        if self.robust_shots is not None:
            check_int("robust_shots", self.robust_shots, 1)
        check_int("permutations", self.permutations, 1)
        if not self.arrangements:
            raise UsageError("--arrangements: give at least one arrangement")
        for a in self.arrangements:
            if a not in ARRANGEMENTS:
                raise UsageError(f"--arrangements: unknown {a!r}; valid: {', '.join(ARRANGEMENTS)}")
        if self.robust_test_size is not None:
            check_int("robust_test_size", self.robust_test_size, 1)


# --------------------------------------------------------------------------- constrained decoding

class LabelChooser:
    """Constrained greedy choice among label token sequences (shortest unique prefix; PCW style)."""

    def __init__(self, tokenizer, labels: Sequence[str], separator: str):
        self.labels = list(labels)
        self.seqs = [tokenizer.encode(" " + lab) for lab in self.labels]
        seen: dict[tuple, str] = {}
        for lab, seq in zip(self.labels, self.seqs):
            if not seq:
                raise ValueError(f"label {lab!r} encodes to no tokens")
            if tuple(seq) in seen:
                raise ValueError(f"labels {seen[tuple(seq)]!r} and {lab!r} have the same tokens")
            seen[tuple(seq)] = lab
        sep = tokenizer.encode(separator) or tokenizer.encode("\n")
        self.end_id = sep[0] if sep else None
        self.max_len = max(len(s) for s in self.seqs) + 1

    def choose(self, adapter, prompt: Sequence[int]) -> int:
        cand = list(range(len(self.labels)))
        pos, gen = 0, []
        while len(cand) > 1:
            nxt = {self.seqs[c][pos] for c in cand if len(self.seqs[c]) > pos}
            done = [c for c in cand if len(self.seqs[c]) == pos]
            logits = adapter.last_logits(torch.tensor([list(prompt) + gen], device=adapter.device))[0]
            options = sorted(nxt | ({self.end_id} if done and self.end_id is not None else set()))
            best = max(options, key=lambda t: float(logits[t]))
            if done and best == self.end_id and best not in nxt:
                cand = done
                break
            cand = [c for c in cand if len(self.seqs[c]) > pos and self.seqs[c][pos] == best]
            gen.append(best)
            pos += 1
        return cand[0]


# --------------------------------------------------------------------------- prompts

@dataclass
class Encoded:
    demos: list[tuple[list[int], str]]   # (ids of "template(text) label", label) per pool example
    tests: list[tuple[list[int], str]]   # (ids of "template(text)", gold label)


def encode_dataset(tokenizer, ds: ICLDataset, options: IclOptions, seed: int) -> Encoded:
    items = list(dict.fromkeys(ds.examples))  # drop exact duplicates, keep order
    rng = seeded(seed, "icl-split", ds.name)
    rng.shuffle(items)
    test = items[:options.test_size]
    pool = items[options.test_size:options.test_size + options.pool_size]
    if not pool:
        raise ValueError(f"{ds.name}: {len(items)} examples leave no demonstrations after {options.test_size} "
                         "test examples (lower --test-size)")

    def cut(text: str) -> str:
        ids = tokenizer.encode(text)
        return text if len(ids) <= options.max_text_tokens else tokenizer.decode(ids[:options.max_text_tokens]).strip()

    demo_texts = [ds.template.format(text=cut(t)) + " " + lab for t, lab in pool]
    test_texts = [ds.template.format(text=cut(t)) for t, _ in test]
    demos = list(zip(tokenizer.encode_batch(demo_texts), [lab for _, lab in pool]))
    tests = list(zip(tokenizer.encode_batch(test_texts), [lab for _, lab in test]))
    return Encoded(demos, tests)


def build_prompt(prefix: Sequence[int], demos: Sequence[list[int]], sep: list[int], test: list[int],
                 budget: int) -> tuple[list[int], int]:
    """prefix + d1 + sep + d2 + ... + sep + test, dropping the earliest demos until len <= budget."""
    start = 0
    while True:
        ids = list(prefix)
        for d in demos[start:]:
            ids += d + sep
        ids += test
        if len(ids) <= budget or start == len(demos):
            return ids, len(demos) - start
        start += 1


def arrange(demos: list[tuple[list[int], str]], how: str, rng) -> list[tuple[list[int], str]]:
    """Order demonstrations: random, grouped by class, or alternating classes (round robin)."""
    if how == "random":
        out = list(demos)
        rng.shuffle(out)
        return out
    by: dict[str, list] = {}
    for d in demos:
        by.setdefault(d[1], []).append(d)
    classes = sorted(by)
    rng.shuffle(classes)
    for c in classes:
        rng.shuffle(by[c])
    if how == "grouped":
        return [d for c in classes for d in by[c]]
    out = []
    while any(by[c] for c in classes):
        for c in classes:
            if by[c]:
                out.append(by[c].pop(0))
    return out


def balanced_draw(demos: list[tuple[list[int], str]], k: int, rng) -> list[tuple[list[int], str]]:
    by: dict[str, list] = {}
    for d in demos:
        by.setdefault(d[1], []).append(d)
    classes = sorted(by)
    for c in classes:
        rng.shuffle(by[c])
    out = []
    while len(out) < k and any(by[c] for c in classes):
        for c in classes:
            if by[c] and len(out) < k:
                out.append(by[c].pop(0))
    return out


def accuracy(adapter, chooser: LabelChooser, prefix, demo_ids, sep, tests, budget) -> tuple[float, float]:
    """(accuracy, mean effective shots) of one demonstration sequence over the tests."""
    correct, eff = 0, []
    for test_ids, gold in tests:
        prompt, k = build_prompt(prefix, demo_ids, sep, test_ids, budget)
        if len(prompt) > budget:
            raise ValueError(f"a test example alone ({len(test_ids)} tokens) does not fit the context")
        eff.append(k)
        correct += chooser.labels[chooser.choose(adapter, prompt)] == gold
    return correct / len(tests), sum(eff) / len(eff)


def auto_shots(enc: Encoded, prefix, sep, budget) -> tuple[list[int], int]:
    avg = sum(len(d) + len(sep) for d, _ in enc.demos) / len(enc.demos)
    longest_test = max(len(t) for t, _ in enc.tests)
    k_fit = int((budget - len(prefix) - longest_test) // max(avg, 1))
    k_fit = min(k_fit, len(enc.demos))
    if k_fit < 1:
        return [], 0
    out, k = [], 1
    while k < k_fit:
        out.append(k)
        k *= 2
    return out + [k_fit], k_fit


def run_dataset(adapter, tokenizer, ds: ICLDataset, options: IclOptions) -> dict:
    enc = encode_dataset(tokenizer, ds, options, options.seed)
    labels = ds.labels  # every class of the dataset competes, also those absent from this draw
    if len(labels) < 2:
        raise ValueError(f"{ds.name}: needs at least two labels, found {labels}")
    chooser = LabelChooser(tokenizer, labels, options.separator)
    prefix, sep = tokenizer.prefix_ids, tokenizer.encode(options.separator)
    budget = adapter.max_len - chooser.max_len
    if options.shots is not None:
        shots, k_fit = sorted(set(options.shots)), None
    else:
        shots, k_fit = auto_shots(enc, prefix, sep, budget)
        if not shots:
            raise UsageError(f"{ds.name}: not even one demonstration fits the model's context ({adapter.max_len}); "
                             "lower --max-text-tokens")
    curve = []
    for k in shots:
        accs, effs = [], []
        for r in range(options.runs):
            order = list(range(len(enc.demos)))
            seeded(options.seed, "icl-draw", ds.name, r).shuffle(order)
            demo_ids = [enc.demos[i][0] for i in order[:k]]
            acc, eff = accuracy(adapter, chooser, prefix, demo_ids, sep, enc.tests, budget)
            accs.append(acc)
            effs.append(eff)
        curve.append({"shots": k, "accuracy_mean": mean(accs), "accuracy_std": std(accs), "runs": accs,
                      "effective_shots_mean": mean(effs)})
    upper = curve[len(curve) // 2:] if len(curve) > 1 else curve
    out = {"dataset": ds.name, "source": ds.source, "labels": labels, "n_labels": len(labels),
           "test_size": len(enc.tests), "pool_size": len(enc.demos), "shots": shots, "curve": curve,
           "stable_accuracy": mean([c["accuracy_mean"] for c in upper]),
           "majority_baseline": max(sum(1 for _, g in enc.tests if g == lab) for lab in labels) / len(enc.tests)}
    if options.robustness:
        fitting = [c["shots"] for c in curve if c["effective_shots_mean"] == c["shots"] and c["shots"] > 0]
        k = options.robust_shots or (max(fitting) if fitting else (k_fit or max(shots)))
        rng = seeded(options.seed, "icl-robust-set", ds.name)
        demo_set = balanced_draw(enc.demos, k, rng)
        tests = enc.tests[:options.robust_test_size or options.test_size]
        arr = {}
        for how in options.arrangements:
            accs, effs = [], []
            for p in range(options.permutations):
                ordered = arrange(demo_set, how, seeded(options.seed, "icl-order", ds.name, how, p))
                acc, eff = accuracy(adapter, chooser, prefix, [d[0] for d in ordered], sep, tests, budget)
                accs.append(acc)
                effs.append(eff)
            arr[how] = {"accuracies": accs, "mean": mean(accs), "std": std(accs), "spread": max(accs) - min(accs),
                        "best": max(accs), "worst": min(accs), "effective_shots_mean": mean(effs)}
        out["robustness"] = {"shots": len(demo_set), "test_size": len(tests), "permutations": options.permutations,
                             "arrangements": arr}
    return out


def _markdown(results: list[dict]) -> str:
    """Accuracy by shots, each dataset's summary, and the order robustness where it was measured."""
    md = "## Accuracy vs number of demonstrations (mean ± std over draws)\n\n"
    rows = []
    for r in results:
        for c in r["curve"]:
            rows.append([r["dataset"], c["shots"], c["effective_shots_mean"], c["accuracy_mean"], c["accuracy_std"]])
    md += markdown_table(["dataset", "shots", "effective shots", "accuracy", "std"], rows)
    md += "\n\n" + markdown_table(["dataset", "classes", "test", "stable accuracy (upper half of shots)", "majority"],
                                  [[r["dataset"], r["n_labels"], r["test_size"], r["stable_accuracy"],
                                    r["majority_baseline"]] for r in results])
    rob = [r for r in results if "robustness" in r]
    if rob:
        md += "\n\n## Order robustness (accuracy over permutations of one demonstration set)\n\n"
        rows = []
        for r in rob:
            for how, a in r["robustness"]["arrangements"].items():
                rows.append([r["dataset"], r["robustness"]["shots"], how, a["mean"], a["std"], a["spread"], a["best"],
                             a["worst"]])
        md += markdown_table(["dataset", "shots", "arrangement", "mean", "std", "spread (best − worst)", "best",
                              "worst"], rows)
    return md


def _accuracy_figure(adapter, results: list[dict]):
    """Accuracy (mean ± std over draws) against the number of demonstrations, one line per dataset."""
    fig, ax = new_figure()
    for r in results:
        xs = [c["shots"] for c in r["curve"]]
        ax.errorbar(xs, [c["accuracy_mean"] for c in r["curve"]], yerr=[c["accuracy_std"] for c in r["curve"]],
                    marker="o", capsize=3, label=f"{r['dataset']} ({r['n_labels']}-way)")
    if all(c["shots"] > 0 for r in results for c in r["curve"]):
        ax.set_xscale("log", base=2)
    ax.set_xlabel("demonstrations")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"{adapter.name}: many-shot ICL")
    return fig


def _robustness_figure(adapter, rob: list[dict]):
    """The accuracies over permutations, one box per arrangement, one panel per dataset."""
    fig2, axes = new_figure(4.0 * len(rob), 3.8, ncols=len(rob))
    axes = axes if isinstance(axes, list) else [axes]
    for ax2, r in zip(axes, rob):
        arr = r["robustness"]["arrangements"]
        names = list(arr)
        ax2.boxplot([arr[n]["accuracies"] for n in names])
        ax2.set_xticks(range(1, len(names) + 1), names)
        for i, n in enumerate(names, 1):
            ax2.scatter([i] * len(arr[n]["accuracies"]), arr[n]["accuracies"], s=10, color="C1", zorder=3)
        ax2.set_title(f"{r['dataset']}, {r['robustness']['shots']} shots")
        ax2.set_ylabel("accuracy")
    fig2.suptitle(f"{adapter.name}: order robustness")
    return fig2


def run_icl(adapter, tokenizer, options: IclOptions, out_dir=None) -> dict:
    """Accuracy vs number of demonstrations (+ order robustness) for each dataset."""
    started = start_task(adapter, options)
    results, notes = [], []
    for name in options.datasets:
        try:
            ds = load_icl_dataset(name)
        except DatasetUnavailable as e:
            notes.append(f"skipped {name}: {e}")
            continue
        results.append(run_dataset(adapter, tokenizer, ds, options))
    if not results:
        raise ValueError("no ICL dataset could be loaded: " + "; ".join(notes))
    figs = {"icl_accuracy.png": _accuracy_figure(adapter, results)}
    rob = [r for r in results if "robustness" in r]
    if rob:
        figs["icl_robustness.png"] = _robustness_figure(adapter, rob)
    result = TaskResult("icl", {"datasets": results}, _markdown(results), figs, notes)
    return finish(result, adapter, tokenizer, options, out_dir, started)


__all__ = ["IclOptions", "run_icl", "LabelChooser", "arrange", "build_prompt", "balanced_draw"]
