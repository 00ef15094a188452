"""The recall section of the comparison report (experiments/recall.py's study): validity, accuracy vs N,
learning curves and steps to competence, verdicts, attention shares."""

from __future__ import annotations

from pathlib import Path

from .paper import NOT_MEASURED, verdict
from .render import Block, _pm
from .recall_records import CATEGORIES, GATE_RULE, steps_or_budget, steps_to, validity_gate
from .study_view import BASELINE, Study, _baselines_for, _is_diff


class RecallView:
    """Accessors over results.json's ``recall`` record: per-seed values of any per-run metric."""

    def __init__(self, study: Study):
        rec = study.r["recall"]
        self.study, self.rec, self.o = study, rec, rec["options"]
        self.seeds = [str(s) for s in rec["seeds"]]
        self.shown = [v for v in study.variants if rec["runs"].get(v)]
        self.ns = [row["n"] for row in next(iter(rec["runs"][self.shown[0]].values()))["by_n"]]
        self.hard = [n for n in self.ns if n >= max(self.ns) // 2]  # the distractor-heavy half
        first = next(iter(rec["runs"][self.shown[0]].values()))
        self.has_curves = bool(first.get("curve"))
        self.n_layer = len(first["by_n"][0]["shares"]["answer"])
        self.level = self.o.get("competence", 0.9)
        self.gate = validity_gate(self.per_seed(BASELINE, self.acc_at(1)).values(), self.level) \
            if BASELINE in self.shown else None

    def per_seed(self, v: str, fn) -> dict[str, float]:
        return {s: fn(r) for s, r in self.rec["runs"].get(v, {}).items() if s in self.seeds}

    def values(self, v: str, fn) -> list[float]:
        return list(self.per_seed(v, fn).values())

    @staticmethod
    def acc_at(n):
        return lambda r: next(x["accuracy"] for x in r["by_n"] if x["n"] == n)

    @staticmethod
    def mean_acc(r):
        return sum(x["accuracy"] for x in r["by_n"]) / len(r["by_n"])

    def hard_acc(self, r):
        return sum(x["accuracy"] for x in r["by_n"] if x["n"] in self.hard) / len(self.hard)

    def share(self, cat, n=None, layer=None):  # layer None: the mean over layers (the papers' Table 3 averages them)
        n = max(self.ns) if n is None else n

        def get(r):
            per_layer = next(x for x in r["by_n"] if x["n"] == n)["shares"][cat]
            return sum(per_layer) / len(per_layer) if layer is None else per_layer[layer]
        return get

    def noise(self, r):
        return self.share("other_pairs")(r) + self.share("filler")(r)

    def steps(self, n):
        return lambda r: steps_or_budget(r, n, self.o)

    def steps_cell(self, v, n) -> str:
        """Steps to competence per seed, '> budget' where a run never got there."""
        return ", ".join(str(k) if k is not None else "> budget"
                         for k in self.per_seed(v, lambda r: steps_to(r, n, self.level)).values())

    def verdict_cell(self, v, fn, better, margin) -> str:
        """The verdict against each of ``v``'s baselines, or the gate's 'not testable'."""
        if self.gate is not None and not self.gate.valid:
            return self.gate.not_testable
        parts = []
        for b in _baselines_for(v, self.study):
            if b not in self.shown:
                continue
            vd = verdict(self.per_seed(v, fn), self.per_seed(b, fn), better, min_effect=margin)
            note = f" (vs {self.study.label(b)})" if b != BASELINE else ""
            parts.append(f"**{vd.verdict}**{note}: Δ {vd.diff:+.3g}" if vd.verdict != NOT_MEASURED else vd.verdict)
        return "; ".join(parts)


def _band_plot(ax, xs, curves: list[list[float]], label_: str) -> None:
    """Mean over seeds with a min-max band."""
    mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(xs))]
    line, = ax.plot(xs, mean, marker="o", ms=3, label=label_)
    ax.fill_between(xs, [min(c[i] for c in curves) for i in range(len(xs))],
                    [max(c[i] for c in curves) for i in range(len(xs))], color=line.get_color(), alpha=0.15)


def _recall_accuracy(rv: RecallView, out: Path) -> list[Block]:
    from ..eval.common import new_figure

    fig, ax = new_figure(6.8, 4.2)
    for v in rv.shown:
        _band_plot(ax, rv.ns, [[rv.acc_at(n)(r) for n in rv.ns] for r in rv.per_seed(v, lambda r: r).values()],
                   rv.study.label(v))
    ax.axhline(1.0 / rv.o["values"], color="grey", ls=":", label="chance (1/V)")
    ax.set(xlabel="key-value pairs in the context (N)", ylabel="accuracy", ylim=(0, 1.02),
           title="recall amid distractors (mean over seeds, band: min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out / "recall_accuracy.png", dpi=110)
    cols = [n for n in rv.ns if n in (1, 2, 4, 8) or n % 4 == 0 or n == max(rv.ns)]
    rows = [[rv.study.label(v), rv.rec["models"][v]["params"]["total"]]
            + [_pm(rv.values(v, rv.acc_at(n)), 2) for n in cols] + [_pm(rv.values(v, rv.mean_acc), 3)]
            for v in rv.shown]
    return [Block("image", "recall_accuracy.png"),
            Block("table", header=["variant", "parameters"] + [f"N={n}" for n in cols] + ["mean over N"], rows=rows),
            Block("p", "Accuracy of the value predicted after each queried key, on fresh sequences after training "
                       "(mean ± sample std over seeds).")]


def _recall_validity(rv: RecallView) -> list[Block]:
    rows = [[rv.study.label(v), s, f"{acc:.3f}", "yes" if acc >= rv.level else "no"]
            for v in rv.shown for s, acc in rv.per_seed(v, rv.acc_at(1)).items()]
    blocks = [Block("h3", "Validity: have the models learned the task?"),
              Block("table", header=["variant", "seed", "accuracy at N = 1", f"≥ {rv.level:g}"], rows=rows),
              Block("p", GATE_RULE.format(level=rv.level))]
    if rv.gate is not None:
        blocks.append(Block("p", f"**{rv.gate.line()}**"))
    return blocks


def _recall_curves(rv: RecallView, out: Path) -> list[Block]:
    if not rv.has_curves:
        return [Block("p", "No learning curves: these runs predate them (retrain to record them).")]
    from ..eval.common import new_figure

    first = next(iter(rv.rec["runs"][rv.shown[0]].values()))["curve"]
    curve_ns = [int(n) for n in first["accuracy"]]
    fig, axes = new_figure(4.0 * len(curve_ns), 3.6, ncols=len(curve_ns))
    for ax, n in zip(axes, curve_ns):
        for v in rv.shown:
            runs = rv.per_seed(v, lambda r: r["curve"]["accuracy"][str(n)]).values()
            _band_plot(ax, first["steps"], list(runs), rv.study.label(v))
        ax.axhline(rv.level, color="grey", ls="--", lw=0.8)
        ax.set(xlabel="training step", ylabel="accuracy", ylim=(0, 1.02), title=f"N = {n}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(out / "recall_curves.png", dpi=110)
    rows = [[rv.study.label(v)] + [rv.steps_cell(v, n) for n in curve_ns] for v in rv.shown]
    interval = rv.o["steps"] // min(rv.o["curve_points"], rv.o["steps"])
    return [Block("h3", "Learning curves and sample efficiency"), Block("image", "recall_curves.png"),
            Block("table", header=["variant"] + [f"steps to {rv.level:g}, N = {n} (per seed)" for n in curve_ns],
                  rows=rows),
            Block("p", f"Accuracy on {rv.o.get('curve_queries', '')} fixed queries per N, measured every {interval} "
                       "steps during training (mean over seeds, band: min-max; dashed: the competence level). Steps "
                       f"to competence: the first measured step at or above {rv.level:g}; \"> budget\": never within "
                       f"the {rv.o['steps']} steps, compared as {rv.o['steps'] + interval} (later than any run that "
                       "got there).")]


def _recall_verdicts(rv: RecallView, summary: list) -> list[Block]:
    speed_n = max(1, max(rv.ns) // 2)
    checks = [(rv.mean_acc, "higher", 0.05), (rv.hard_acc, "higher", 0.05), (rv.share("answer"), "higher", 0.02),
              (rv.noise, "lower", 0.02)]
    if rv.has_curves:
        checks.append((rv.steps(speed_n), "lower", 0))
    rows = []
    for v in rv.shown:
        if not _is_diff(v):
            continue
        cells = [rv.verdict_cell(v, fn, better, margin) for fn, better, margin in checks]
        rows.append([rv.study.label(v)] + cells)
        summary.append([rv.study.label(v), "higher recall accuracy amid distractors (mean over N)",
                        _pm(rv.values(v, rv.mean_acc), 3) + " vs " + _pm(rv.values(BASELINE, rv.mean_acc), 3), cells[0]])
        summary.append([rv.study.label(v), "more attention on the answer (recall, mean over layers, N = C/2)",
                        _pm(rv.values(v, rv.share("answer")), 3) + " vs "
                        + _pm(rv.values(BASELINE, rv.share("answer")), 3), cells[2]])
        if rv.has_curves:
            summary.append([rv.study.label(v), f"learns retrieval faster (steps to {rv.level:g} at N = {speed_n})",
                            rv.steps_cell(v, speed_n) + " vs " + rv.steps_cell(BASELINE, speed_n), cells[4]])
    header = ["variant", "mean accuracy (higher)", f"accuracy, N ≥ {min(rv.hard)} (higher)",
              f"answer share, mean over layers, N={max(rv.ns)} (higher)",
              f"other pairs + filler share, mean over layers, N={max(rv.ns)} (lower)"]
    if rv.has_curves:
        header.append(f"steps to {rv.level:g} at N = {speed_n} (fewer)")
    return [Block("h3", "Verdicts"), Block("table", header=header, rows=rows),
            Block("p", "Single-seed margins: 0.05 accuracy, 0.02 share, any number of steps. The directions are the "
                       "papers' claims carried over to this task: DIFF should retrieve better amid distractors, put "
                       "more of its attention on the answer and less on the rest, and (our reading) learn retrieval "
                       "in fewer steps.")]


def _recall_shares(rv: RecallView) -> list[Block]:
    rows = [[rv.study.label(v), layer] + [_pm(rv.values(v, rv.share(c, layer=layer)), 3) for c in CATEGORIES]
            for v in rv.shown for layer in range(rv.n_layer)]
    return [Block("h2", f"Recall: where the query's attention goes (N = {max(rv.ns)})"),
            Block("table", header=["variant", "layer", "answer pair", "other pairs", "filler", "rest (BOS, SEP, queries)"],
                  rows=rows),
            Block("p", f"Share of the effective map at each scored query-key position (DIFF: A1 − λ·A2; rows normalised "
                       f"by their {'sum' if rv.o['normalize'] == 'sum' else 'absolute sum'}, as the attention-noise task "
                       "does), averaged over heads and queries, mean ± std over seeds. Shares of signed DIFF maps can "
                       "be negative.")]


def _recall_task_text(rv: RecallView) -> str:
    o = rv.o
    return ("The task (experiments/recall.py, after Zoology's MQAR): "
            f"`BOS | {o['context']} context slots | SEP | {o['queries']} queries`; K = {o['keys']} keys, "
            f"V = {o['values']} values (chance {1 / o['values']:.3f}); "
            + ("one token per pair (a K×V pair vocabulary)" if o["pair_tokens"] == 1 else
               "two-token pairs (key, value: needs an induction circuit)")
            + f"; filler: {o['filler']}; trained {o['steps']} steps × batch {o['batch_size']} with N drawn from "
            f"{o['train_n'] or list(range(2, o['context'] // 2 + 1, 2))}; evaluated on fresh sequences for every N "
            f"in 1..{max(rv.ns)}, ≥ {o['eval_queries']} scored queries each; seeds {', '.join(rv.seeds)}. Models: the "
            f"baseline {o['n_layer']} layers × d_model {o['d_model']}, {o['n_head']} heads of {o['head_dim']}, "
            "every variant parameter-matched to it as in the language-model study.")


def section_recall(study: Study, out: Path, summary: list) -> list[Block]:
    """Recall amid distractors (experiments/recall.py): validity, accuracy vs N, learning curves, verdicts,
    attention shares."""
    if not study.r.get("recall"):
        return []
    rv = RecallView(study)
    return ([Block("h2", "Recall amid distractors (synthetic multi-query associative recall)"),
             Block("p", _recall_task_text(rv))]
            + _recall_accuracy(rv, out) + _recall_validity(rv) + _recall_curves(rv, out)
            + _recall_verdicts(rv, summary) + _recall_shares(rv))
