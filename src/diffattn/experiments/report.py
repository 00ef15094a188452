"""The comparison report: ``REPORT.md`` (or one self-contained ``REPORT.html``) + PNG plots.

Built from ``results.json`` alone (``diffattn report DIR`` regenerates it), as a list of blocks
(headings, paragraphs, tables, images) rendered to Markdown or HTML. Every headline number stands
next to the paper's (experiments/paper.py) with a verdict: reproduced, not reproduced or
inconclusive (the difference is within the seed spread).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..fsutil import read_json, write_text_atomic
from .render import Block, _fmt, _inline_md, _mean, _pm, to_html, to_markdown  # noqa: F401 (_inline_md: tests)
from .. import variants
from .paper import NOT_MEASURED, PAPER, PAPER_TABLES, VERDICT_RULE, verdict
from .report_recall import section_recall  # noqa: F401 (tests)
from .study_view import (BASELINE, PARAM_MATCH_TOLERANCE, Study, _baselines_for, _is_diff,  # noqa: F401
                         describe_init, label)


def _verdict_cells(study: Study, variant: str, values_fn, better: str, min_effect: float, baselines=None):
    """Verdict cells of ``variant`` against each baseline."""
    cells = []
    for base in baselines or [BASELINE]:
        if base not in study.variants:
            continue
        v = verdict(values_fn(variant, paired=True), values_fn(base, paired=True), better, min_effect=min_effect)
        note = f" (vs {study.label(base)})" if base != BASELINE else ""
        cells.append(f"**{v.verdict}**{note}: Δ {v.diff:+.3g}" if v.verdict != NOT_MEASURED else v.verdict)
    return "; ".join(cells)


# ---------------------------------------------------------------------------------------- sections
def section_setup(study: Study) -> list[Block]:
    r = study.r
    env = r.get("environment", {})
    idx = (r.get("data") or {}).get("index", {})
    train = r.get("train", {})
    blocks = [Block("h1", f"diffattn compare — preset `{r['preset']}`"),
              Block("list", items=[
                  f"command: `{env.get('command', '')}`",
                  f"date: {env.get('date', '')}; wall time {r.get('wall_time_s', 0) / 60:.1f} min",
                  f"hardware: {env.get('device', '')} ({env.get('cpu_count')} CPU cores), {env.get('platform', '')}",
                  f"versions: diffattn {env.get('diffattn')}, torch {env.get('torch')}, transformers "
                  f"{env.get('transformers')}, Python {env.get('python')}",
                  (f"data: `{r['data'].get('dir')}`, vocabulary {idx.get('vocab_size')}, documents "
                   f"{idx.get('documents')}" if r.get("data") else "data: none (recall only: no language model)"),
                  "training (identical for every variant and seed): " + ", ".join(
                      f"{k}={v}" for k, v in train.items() if k not in ("progress", "tensorboard")),
                  _init_line(r),
                  (f"needle-retrieval share of training rows: {r['needle_mix']['share']:.0%} "
                   f"(training cities/numbers disjoint from the evaluation's; haystack from the train split)"
                   if r.get("needle_mix", {}).get("share") else "needle-retrieval rows in training: none"),
                  f"seeds: {', '.join(study.seeds)}; variants: {', '.join(study.label(v) for v in study.variants)}",
              ]),
              Block("p", "Scale note: the paper's numbers come from 3B-parameter models trained on 350B-1T tokens. "
                         "A study of this size can only test the *direction* of each effect."),
              Block("p", VERDICT_RULE + (f" The language models here use {len(study.seeds)} seed"
                                         f"{'s' if len(study.seeds) > 1 else ''}"
                                         + (" (single-seed margins, weaker verdicts)" if len(study.seeds) == 1 else "")
                                         if study.seeds else " No language model in this study")
                         + (f"; the recall task {len(r['recall']['seeds'])}." if r.get("recall") else "."))]
    return blocks


def _init_line(r: dict) -> str:
    """The initialisation the study's models used (docs/results/init.md has the evidence behind it)."""
    cfg = r["models"][BASELINE]["config"]
    gains = [m["config"]["diff_norm_gain_init"] for m in r["models"].values()
             if m["config"].get("diff_norm_gain_init") is not None]  # the variants with a per-head norm gain
    return "initialisation: " + describe_init(cfg.get("init", "gpt2"), cfg.get("init_std", 0.02),
                                              gains[0] if gains else None)


def section_models(study: Study) -> list[Block]:
    models = study.r["models"]
    base_total = models[BASELINE]["params"]["total"]
    rows = []
    for v in study.variants:
        c, p = models[v]["config"], models[v]["params"]
        attn = p["attention.qkvo"] + p["attention.lambda"] + p["attention.norm"]
        rows.append([study.label(v), f"{c['n_head']}/{c['n_kv_head']}/{c['head_dim']}", p["total"], attn,
                     p["attention.lambda"] + p["attention.norm"], f"{(p['total'] - base_total) / base_total:+.2%}"])
    blocks = [Block("h2", "Models and parameter counts"),
              Block("table", header=["variant", "heads / KV heads / head dim", "parameters", "attention",
                                     "λ + norm", "vs baseline"], rows=rows)]
    notes = [_model_note(study, v, base_total) for v in study.variants if v in variants.names()]
    blocks.append(Block("list", items=[n for n in notes if n]))
    return blocks


def _model_note(study: Study, v: str, base_total: int) -> str:
    """The registry row's note on variant ``v``'s parameters; for a variant matched exactly (DIFF V1) the gap to
    the baseline is checked against the tolerance first."""
    spec = variants.get(v)
    note = spec.report_note.format(same_heads=study.label(spec.same_heads.name) if spec.same_heads else "")
    if not spec.matched_exactly:
        return note
    d = (study.r["models"][v]["params"]["total"] - base_total) / base_total
    ok = abs(d) < PARAM_MATCH_TOLERANCE
    return (f"Parameter matching {spec.label} ↔ baseline: {d:+.3%} ({'within' if ok else 'OUTSIDE'} the "
            f"{PARAM_MATCH_TOLERANCE:.1%} tolerance): {note}")


def section_loss(study: Study, out: Path, summary: list) -> list[Block]:
    from ..eval.common import new_figure

    fig, axes = new_figure(11, 4, ncols=2)
    for v in study.variants:
        for i, run in enumerate(study.runs(v)):
            tr = run["metrics"]["train"]
            va = run["metrics"]["val"]
            kw = dict(label=study.label(v) if i == 0 else None, alpha=0.9 if i == 0 else 0.5)
            axes[0].plot([x["tokens"] for x in tr], [x["loss"] for x in tr], **kw)
            axes[1].plot([x["tokens"] for x in va], [x["val_loss"] for x in va], marker="o", ms=3, **kw)
    axes[0].set(title="training loss", xlabel="tokens", ylabel="loss")
    axes[1].set(title="validation loss", xlabel="tokens", ylabel="loss")
    if all(len(run["metrics"]["val"]) < 2 for v in study.variants for run in study.runs(v)):
        # one evaluation per run (eval_every = 0): a curve of single points says nothing; show the final losses
        axes[1].clear()
        finals = [(study.label(v), _mean(study.final_val(v))) for v in study.variants if study.final_val(v)]
        axes[1].bar(range(len(finals)), [f for _, f in finals], color=[f"C{i}" for i in range(len(finals))])
        axes[1].set_xticks(range(len(finals)), [name for name, _ in finals], rotation=20, ha="right", fontsize=8)
        lo = min(f for _, f in finals) if finals else 0.0
        axes[1].set(title="final validation loss (mean over seeds)", ylabel="loss", ylim=(lo - 0.1, None))
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.savefig(out / "loss_curves.png", dpi=110)

    base = study.final_val(BASELINE)
    rows = []
    for v in study.variants:
        vals = study.final_val(v)
        dv = (_mean(vals) - _mean(base)) if vals and base else None
        cell = _verdict_cells(study, v, study.final_val, "lower", 0.01, _baselines_for(v, study)) \
            if _is_diff(v) else ""
        if cell:
            summary.append([study.label(v), "lower validation loss", _pm(vals, 4) + " vs " + _pm(base, 4), cell])
        rows.append([study.label(v), _pm(vals, 4), _fmt(dv, 4) if v != BASELINE else "", cell])
    return [Block("h2", "Language-modelling loss"), Block("image", "loss_curves.png"),
            Block("table", header=["variant", "final validation loss (mean ± std over seeds)", "Δ vs baseline",
                                   "verdict (paper: lower)"], rows=rows),
            Block("p", f"Paper: {PAPER['val_loss']['text']}. Single-seed margin: 0.01 nats.")]


def section_needle(study: Study, out: Path, summary: list) -> list[Block]:
    if "needle" not in study.r["tasks"]:
        return []
    nr_list = study.first_eval_value("needle", ["nr"])
    if not nr_list:
        return []

    def acc(v, nr, paired=False):
        out_vals = []
        for by in study.eval_values(v, "needle", ["by_nr"], paired=paired):
            hit = [row["accuracy"] for row in by or [] if f"{row['n']}/{row['r']}" == nr]
            if hit or paired:
                out_vals.append(hit[0] if hit else None)
        return out_vals

    rows = [[study.label(v)] + [_pm(acc(v, nr), 2) for nr in nr_list] for v in study.variants]
    paper = PAPER_TABLES["needle"]
    rows.append(["paper, Transformer (3B, 4K)"] + [paper.get(nr, ("—", "—"))[0] for nr in nr_list])
    rows.append(["paper, DIFF (3B, 4K)"] + [paper.get(nr, ("—", "—"))[1] for nr in nr_list])
    hardest = max(nr_list, key=lambda s: tuple(int(x) for x in s.split("/")))
    verdict_rows = [[study.label(v), hardest, _verdict_cells(study, v, lambda x, paired=False, nr=hardest: acc(x, nr, paired), "higher",
                                                             0.1, _baselines_for(v, study))]
                    for v in study.variants if _is_diff(v)]
    for row in verdict_rows:
        v = next(x for x in study.variants if study.label(x) == row[0])
        summary.append([row[0], f"higher needle accuracy (N/R {hardest})",
                        _pm(acc(v, hardest), 2) + " vs " + _pm(acc(BASELINE, hardest), 2), row[2]])

    # heat-maps: pinned accuracy by (length, depth), averaged over N/R and seeds
    from ..eval.common import new_figure

    shown = [v for v in study.variants if study.eval_values(v, "needle", ["cells"])]
    fig, axes = new_figure(3.4 * len(shown), 3.2, ncols=len(shown))
    axes = axes if isinstance(axes, (list, tuple)) or hasattr(axes, "__len__") else [axes]
    for ax, v in zip(axes, shown):
        cells = [c for cs in study.eval_values(v, "needle", ["cells"]) for c in cs]
        lengths = sorted({c["length"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        grid = [[_mean([c["pinned_accuracy"] for c in cells if c["length"] == L and c["depth"] == d]) or 0.0
                 for d in depths] for L in lengths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set(xticks=range(len(depths)), xticklabels=[f"{d:g}%" for d in depths], yticks=range(len(lengths)),
               yticklabels=lengths, xlabel="answer depth", ylabel="prompt tokens", title=study.label(v))
        for i, row in enumerate(grid):
            for j, val in enumerate(row):
                ax.text(j, i, f"{val:.2f}", ha="center", va="center", color="w" if val < 0.6 else "k", fontsize=8)
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    fig.savefig(out / "needle_heatmaps.png", dpi=110, bbox_inches="tight")
    return [Block("h2", "Multi-needle retrieval"),
            Block("table", header=["variant"] + [f"N/R {nr}" for nr in nr_list], rows=rows),
            Block("table", header=["variant", "hardest N/R", "verdict (paper: higher)"], rows=verdict_rows),
            Block("p", f"Paper: {PAPER['needle']['text']}; headline {PAPER['needle_4k_6_2']['text']}. "
                       "Accuracy: exact number in ≤ the generated tokens, one question per prompt, mean over the R "
                       "queried needles (the paper's R = 2 scoring is UNCONFIRMED). Single-seed margin: 0.1."),
            Block("image", "needle_heatmaps.png")]


def section_attention(study: Study, out: Path, summary: list) -> list[Block]:
    if "attention-noise" not in study.r["tasks"]:
        return []
    by = study.first_eval_value("attention-noise", ["by_depth"])
    depths = [row["depth"] for row in by] if by else None
    if not depths:
        return []

    def share(v, key, depth=None, paired=False):
        vals = []
        for by in study.eval_values(v, "attention-noise", ["by_depth"], paired=paired):
            rows = [r for r in by or [] if depth is None or r["depth"] == depth]
            vals.append(_mean([r[key] for r in rows]))
        return vals

    rows = []
    for v in study.variants:
        rows.append([study.label(v), "answer"] + [_pm(share(v, "answer", d), 3) for d in depths])
        rows.append([study.label(v), "noise"] + [_pm(share(v, "noise", d), 3) for d in depths])
    rows += [list(row)[:2 + len(depths)] for row in PAPER_TABLES["attention_noise"]]
    verdict_rows = []
    for v in study.variants:
        if _is_diff(v):
            verdict_rows.append([study.label(v),
                                 _verdict_cells(study, v, lambda x, paired=False: share(x, "answer", paired=paired), "higher", 0.02,
                                                _baselines_for(v, study)),
                                 _verdict_cells(study, v, lambda x, paired=False: share(x, "noise", paired=paired), "lower", 0.02,
                                                _baselines_for(v, study))])
    for row in verdict_rows:
        v = next(x for x in study.variants if study.label(x) == row[0])
        summary.append([row[0], "more attention to the answer",
                        _pm(share(v, "answer"), 3) + " vs " + _pm(share(BASELINE, "answer"), 3), row[1]])
        summary.append([row[0], "less attention noise",
                        _pm(share(v, "noise"), 3) + " vs " + _pm(share(BASELINE, "noise"), 3), row[2]])
    from ..eval.common import new_figure

    fig, axes = new_figure(11, 4, ncols=2)
    for v in study.variants:
        axes[0].plot(depths, [_mean(share(v, "answer", d)) for d in depths], marker="o", label=study.label(v))
        axes[1].plot(depths, [_mean(share(v, "noise", d)) for d in depths], marker="o", label=study.label(v))
    axes[0].set(title="attention to the answer", xlabel="answer depth (%)", ylabel="share")
    axes[1].set(title="attention noise (other context)", xlabel="answer depth (%)", ylabel="share")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(out / "attention_noise.png", dpi=110)
    return [Block("h2", "Attention to the answer vs noise"),
            Block("table", header=["variant", "share"] + [f"depth {d:g}%" for d in depths], rows=rows),
            Block("table", header=["variant", "answer (paper: higher)", "noise (paper: lower)"], rows=verdict_rows),
            Block("p", f"Paper: {PAPER['attention_answer']['text']}; {PAPER['attention_noise']['text']}. "
                       "Final query position, averaged over heads and layers, on the effective map (DIFF: A1 − λ·A2, "
                       "rows normalised to sum 1 — the normalisation of signed maps is UNCONFIRMED in the paper); "
                       "BOS and question tokens are excluded from noise. Single-seed margin: 0.02."),
            Block("image", "attention_noise.png")]


def section_outliers(study: Study, summary: list) -> list[Block]:
    if "outliers" not in study.r["tasks"]:
        return []
    keys = ["top1", "top2", "top3", "top10", "top100", "median"]
    rows = []
    for what, label in (("attention_logits", "attention logits"), ("hidden_states", "hidden states")):
        for v in study.variants:
            rows.append([label, study.label(v)] + [_fmt(_mean(study.eval_values(v, "outliers", [what, k])), 2)
                                                   for k in keys])
    rows += [list(row) for row in PAPER_TABLES["outliers"]]
    verdict_rows = []
    for v in study.variants:
        if _is_diff(v):
            rel = lambda what: (lambda x, paired=False: [  # noqa: E731
                math.log(val) if val and val > 0 else None
                for val in study.eval_values(x, "outliers", [what, "top1"], paired=paired)])
            verdict_rows.append([study.label(v),
                                 _verdict_cells(study, v, rel("attention_logits"), "lower", math.log(1.1),
                                                _baselines_for(v, study)),
                                 _verdict_cells(study, v, rel("hidden_states"), "lower", math.log(1.1),
                                                _baselines_for(v, study))])
    for row in verdict_rows:
        v = next(x for x in study.variants if study.label(x) == row[0])
        top1 = lambda x: _fmt(_mean(study.eval_values(x, "outliers", ["attention_logits", "top1"])), 2)  # noqa: E731
        summary.append([row[0], "smaller top-1 attention logit", f"{top1(v)} vs {top1(BASELINE)}", row[1]])
    return [Block("h2", "Activation outliers"),
            Block("table", header=["activation", "variant"] + keys, rows=rows),
            Block("table", header=["variant", "top-1 attention logit (paper: lower)", "top-1 hidden state (paper: lower)"],
                  rows=verdict_rows),
            Block("p", f"Paper: {PAPER['outlier_logits']['text']}; {PAPER['outlier_hidden']['text']}. |pre-softmax "
                       "scaled logits| of all layers and heads (DIFF: both maps), masked positions excluded; hidden "
                       "states at each layer's output. Verdicts on log(top-1); single-seed margin: a factor 1.1.")]


def section_lambda(study: Study, out: Path) -> list[Block]:
    shown = [v for v in study.variants if study.eval_values(v, "lambda", ["layers"])]
    if not shown:
        return []
    from ..eval.common import integer_xaxis, new_figure

    fig, ax = new_figure(6.4, 4)
    rows = []
    for v in shown:
        per_seed = study.eval_values(v, "lambda", ["layers"])
        n = len(per_seed[0])
        lam = [_mean([layers[i]["lambda"] for layers in per_seed]) for i in range(n)]
        init = [per_seed[0][i].get("lambda_init") for i in range(n)]
        ax.plot(range(n), lam, marker="o", label=f"{study.label(v)} (learned)")
        if any(x is not None for x in init):
            ax.plot(range(n), init, ls="--", alpha=0.6, label=f"{study.label(v)} λ_init")
        rows.append([study.label(v)] + [_fmt(x, 3) for x in lam])
    ax.set(xlabel="layer (depth)", ylabel="λ", title="λ by depth")
    integer_xaxis(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out / "lambda_by_depth.png", dpi=110)
    n = max(len(r) for r in rows) - 1
    return [Block("h2", "λ by depth"),
            Block("table", header=["variant"] + [f"layer {i}" for i in range(n)], rows=rows),
            Block("p", f"Paper: {PAPER['lambda']['text']}. DIFF V2's λ is per token and head: the table shows its "
                       "mean over held-out tokens."),
            Block("image", "lambda_by_depth.png")]


def section_cost(study: Study, summary: list) -> list[Block]:
    cost = study.r.get("cost")
    if not cost:
        return [Block("h2", "Cost"), Block("p", "Not measured (bench_repeats = 0).")]
    rows = []
    for v in study.variants:
        c = cost["variants"][v]
        if _is_diff(v):
            summary.append([study.label(v), f"training throughput (paper V1: {PAPER['throughput']['ratio']})",
                            f"{c['throughput_ratio']:.2f}× baseline", "measured (one machine, one run)"])
        mem = c.get("peak_memory_bytes")
        rows.append([study.label(v), f"{c['tokens_per_s']:,.0f}", f"{c['throughput_ratio']:.3f}",
                     f"{mem / 2**20:,.0f} MiB" if mem else "—",
                     f"{c['memory_ratio']:.3f}" if c.get("memory_ratio") else "—"])
    return [Block("h2", "Cost: throughput and memory"),
            Block("table", header=["variant", "training tokens/s", "× baseline", "peak memory", "× baseline"],
                  rows=rows),
            Block("p", f"Measured in this run on {cost['device']}, sequence {cost['seq_len']}, micro-batch "
                       f"{cost['micro_batch']}, {cost['repeats']} round-robin repeats: {cost['method']}. Paper: "
                       f"{PAPER['throughput']['text']}.")]


def build(results: dict, out: Path) -> list[Block]:
    import matplotlib

    matplotlib.use("Agg")
    study = Study(results)
    summary: list[list[str]] = []  # the sections add their headline verdicts here
    body = section_models(study) + (section_loss(study, out, summary) if study.r["runs"] else [])
    body += section_needle(study, out, summary) + section_attention(study, out, summary)
    body += section_recall(study, out, summary)
    body += section_outliers(study, summary) + section_lambda(study, out) + section_cost(study, summary)
    head = [Block("h2", "Summary: the papers' claims, checked"),
            Block("table", header=["variant", "claim (direction from the paper)", "this study (variant vs baseline)",
                                   "verdict"], rows=summary)] if summary else []
    blocks = section_setup(study) + head + body
    blocks.append(Block("p", "Per-run details (curves, per-task results.json/results.md and plots) are under "
                             "`runs/<variant>/seed<k>/`."))
    import matplotlib.pyplot as plt

    plt.close("all")
    return blocks


def write_report(out: str | os.PathLike, fmt: str = "md") -> Path:
    """(Re)generate the report of a compare output directory from its results.json."""
    out = Path(out)
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out}: no results.json (not a `diffattn compare` output directory)")
    results = read_json(path)
    for key in ("preset", "variants", "seeds", "runs", "models"):
        if key not in results:
            raise ValueError(f"{path}: missing key {key!r} (not a compare results file)")
    if fmt not in ("md", "html"):
        raise ValueError(f"--format must be md or html, got {fmt!r}")
    blocks = build(results, out)
    target = out / ("REPORT.md" if fmt == "md" else "REPORT.html")
    text = to_markdown(blocks) if fmt == "md" else to_html(blocks, out)
    write_text_atomic(target, text)
    return target


def summary_table(out: str | os.PathLike) -> str:
    """The headline per variant as plain text (what `make demo` prints): parameters, validation loss and,
    when the study ran the recall task, recall accuracy (mean over N; mean ± std over its seeds)."""
    results = read_json(Path(out) / "results.json")
    study = Study(results)
    rec = results.get("recall")
    rows = [f"{'variant':26s} {'params':>12s} {'val loss':>18s}" + (f" {'recall acc (mean over N)':>26s}" if rec else "")]
    for v in study.variants:
        line = f"{study.label(v):26s} {results['models'][v]['params']['total']:>12,} {_pm(study.final_val(v), 4):>18s}"
        if rec and rec["runs"].get(v):
            accs = [sum(x["accuracy"] for x in r["by_n"]) / len(r["by_n"]) for r in rec["runs"][v].values()]
            line += f" {_pm(accs, 3):>26s}"
        rows.append(line)
    return "\n".join(rows)
