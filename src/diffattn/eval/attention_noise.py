"""``attention-noise``: attention allocated to the answer vs to irrelevant context on needle prompts
(DIFF V1 Table 3 and Fig. 1; methods.md §5 P4; author answer in microsoft/unilm#1654: "averaged over
heads and layers").

For each needle prompt (``needles`` needles, one asked, pinned at each depth; see ``needle.py``) we
take, in every layer and head, the attention row(s) of the **final query position(s)** — the
position(s) that produce the answer — from the *effective* map: the softmax map for ordinary
attention, the signed differential map A1 − λ·A2 for DIFF variants (V2: per-token λ; DiffLlama:
its head halves). Each row is normalised, split into token categories and summed per category;
the shares are averaged over heads, rows and layers, then over prompts, per depth.

Categories (they partition the row):

* ``answer``: the asked needle's tokens (``answer_span="needle"``, default) or only its number's
  tokens (``"number"``);
* ``bos``: the tokenizer's BOS token(s); a tokenizer without one has no BOS, and the first token
  (the usual attention sink) takes that role — Fig. 1 shows BOS as its own bar, so it is excluded
  from noise (P4's reading, UNCONFIRMED);
* ``query``: the question tokens at the end (the final position attends to them and to itself);
* ``noise``: every other context token (instruction, haystack, the other needles); ``distractors``
  reports the part of ``noise`` that falls on the other needles.

Normalisation of signed DIFF rows is UNCONFIRMED (P4): ``normalize="sum"`` (default) divides a row
by its sum (for softmax rows a no-op; for A1 − λA2 rows the sum is 1 − λ), ``"abs"`` by the sum of
absolute values (shares in [−1, 1], robust when 1 − λ is small), ``"none"`` keeps raw weights.
For DIFF models the shares of the first component map alone are reported too (``components``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .common import (start_task, integer_xaxis, TaskOptions, TaskResult, UsageError, check_choice, check_int, finish, markdown_table, mean,
                     new_figure, opt)
from .datasets import load_corpus
from .needle import CITIES, DEPTHS, NeedleGenerator, NeedlePrompt

NORMALIZATIONS = ("sum", "abs", "none")
CATEGORIES = ("answer", "noise", "bos", "query", "distractors")


@dataclass(frozen=True, kw_only=True)
class AttentionNoiseOptions(TaskOptions):
    data: str | None = opt(None, "haystack: held-out text (shard dir val split, text file/dir, .jsonl, source name)")
    length: int | None = opt(None, "prompt length in tokens (default: the model's context, at most 2048)")
    depths: list[float] = opt(list(DEPTHS), "depths (percent) of the answer needle")
    needles: int = opt(1, "needles per prompt (1 answer + needles-1 distractors)")
    samples: int = opt(5, "prompts per depth")
    normalize: str = opt("sum", "row normalisation for signed DIFF maps: sum, abs, none (UNCONFIRMED in the paper)")
    query_positions: int = opt(1, "average over this many final query positions")
    answer_span: str = opt("needle", "answer tokens: the whole needle sentence or only its number")

    def check(self):
        if self.length is not None:
            check_int("length", self.length, 1)
        if not self.depths:
            raise UsageError("--depths: give at least one depth")
        for d in self.depths:
            if not 0 <= d <= 100:
                raise UsageError(f"--depths: {d} is outside 0..100 (percent)")
        check_int("needles", self.needles, 1, len(CITIES))
        check_int("samples", self.samples, 1)
        check_choice("normalize", self.normalize, NORMALIZATIONS)
        check_int("query_positions", self.query_positions, 1)
        check_choice("answer_span", self.answer_span, ("needle", "number"))

    def check_model(self, adapter):
        if self.data is None:
            raise UsageError("--data is required: the haystack text (a shard dir, text file/dir, .jsonl, source name)")
        if self.length is not None and self.length > adapter.max_len:
            raise UsageError(f"--length {self.length} is above the model's context ({adapter.max_len} tokens)")


def category_masks(prompt: NeedlePrompt, answer_span: str = "needle") -> dict[str, torch.Tensor]:
    """Boolean masks over the prompt's key positions for each category (answer/bos/query/noise/distractors)."""
    t = prompt.length
    m = {k: torch.zeros(t, dtype=torch.bool) for k in CATEGORIES}
    a = prompt.answer
    if answer_span == "number":
        m["answer"][a.number_start:a.end] = True
    else:
        m["answer"][a.start:a.end] = True
    b0, b1 = prompt.spans["bos"]
    if b1 > b0:
        m["bos"][b0:b1] = True
    else:
        m["bos"][0] = True  # no BOS token: the first token is the sink
    q0, q1 = prompt.spans["question"]
    m["query"][q0:q1] = True
    m["noise"] = ~(m["answer"] | m["bos"] | m["query"])
    for nd in prompt.needles:
        if nd is not a:
            m["distractors"][nd.start:nd.end] = True
    m["distractors"] &= m["noise"]
    return m


def attention_shares(rows: Sequence[torch.Tensor], masks: dict[str, torch.Tensor], normalize: str = "sum") -> dict:
    """Shares per category from per-layer attention rows.

    rows: one tensor per layer, (H, Q, S) — the attention rows of the final Q query positions over
    the S key positions. Each row is normalised (``normalize``), summed over each category's
    positions, then averaged over heads and query rows (per layer), and over layers.
    Returns ``{category: share, ..., "per_layer": {category: [share per layer]}}``.
    """
    per_layer: dict[str, list[float]] = {k: [] for k in masks}
    for r in rows:
        r = r.double()
        if normalize == "sum":
            denom = r.sum(-1, keepdim=True)
        elif normalize == "abs":
            denom = r.abs().sum(-1, keepdim=True)
        else:
            denom = torch.ones_like(r[..., :1])
        denom = torch.where(denom.abs() < 1e-12, torch.full_like(denom, 1e-12), denom)
        r = r / denom
        for k, mask in masks.items():
            per_layer[k].append(float(r[..., mask.to(r.device)].sum(-1).mean()))
    out = {k: (sum(v) / len(v) if v else None) for k, v in per_layer.items()}
    out["per_layer"] = per_layer
    return out


def _depth_row(adapter, gen, options: AttentionNoiseOptions, length: int, k: int, depth) -> tuple[dict, dict | None]:
    """The shares at one answer depth, averaged over the samples (and per layer for answer and noise), and the
    same on the first softmax map A1 when the adapter returns the maps' components (else None)."""
    shares, comp_shares = [], []
    for s in range(options.samples):
        prompt = gen.trial(length, depth, options.needles, 1, options.seed, "attention-noise", s)[0]
        masks = category_masks(prompt, options.answer_span)
        maps = adapter.attention_maps(torch.tensor([prompt.ids], device=adapter.device), last_rows=k)
        rows = [m.effective[0, :, -k:, :] for m in maps]
        sh = attention_shares(rows, masks, options.normalize)
        shares.append(sh)
        if all(m.components is not None for m in maps):
            comp_shares.append(attention_shares([m.components[0, :, 0, -k:, :] for m in maps], masks, "sum"))
    row = {"depth": depth, **{c: mean([s[c] for s in shares]) for c in CATEGORIES}}
    row["per_layer"] = {c: [mean([s["per_layer"][c][i] for s in shares]) for i in range(len(shares[0]["per_layer"][c]))]
                        for c in ("answer", "noise")}
    comp = {"depth": depth, **{c: mean([s[c] for s in comp_shares]) for c in CATEGORIES}} if comp_shares else None
    return row, comp


def _markdown(by_depth: list[dict], comp_by_depth: list[dict], overall: dict) -> str:
    """The shares by depth and their mean (and the same on A1 alone when measured)."""
    header = ["depth", "answer", "noise", "BOS", "query", "(noise on distractor needles)"]
    md = "## Attention shares of the final query position (mean over heads and layers)\n\n" + markdown_table(
        header, [[f"{r['depth']:g}%", r["answer"], r["noise"], r["bos"], r["query"], r["distractors"]] for r in by_depth]
        + [["mean", overall["answer"], overall["noise"], overall["bos"], overall["query"], overall["distractors"]]])
    if comp_by_depth:
        md += "\n\n## Same, on the first softmax map A1 alone\n\n" + markdown_table(
            header, [[f"{r['depth']:g}%", r["answer"], r["noise"], r["bos"], r["query"], r["distractors"]]
                     for r in comp_by_depth])
    return md


def _figure(adapter, by_depth: list[dict], per_layer_acc: dict, n_layers: int):
    """Answer and noise shares by depth (bars) and by layer (lines)."""
    fig, (ax1, ax2) = new_figure(10, 4, ncols=2)
    xs = list(range(len(by_depth)))
    ax1.bar([x - 0.2 for x in xs], [r["answer"] for r in by_depth], 0.4, label="answer span")
    ax1.bar([x + 0.2 for x in xs], [r["noise"] for r in by_depth], 0.4, label="attention noise")
    ax1.set_xticks(xs, [f"{r['depth']:g}%" for r in by_depth])
    ax1.set_xlabel("answer depth")
    ax1.set_ylabel("attention share")
    ax1.axhline(0, color="0.5", linewidth=0.5)
    ax1.legend()
    ax1.set_title("by depth (mean over heads, layers)")
    ax2.plot(range(n_layers), per_layer_acc["answer"], marker="o", label="answer span")
    ax2.plot(range(n_layers), per_layer_acc["noise"], marker="s", label="attention noise")
    ax2.set_xlabel("layer")
    integer_xaxis(ax2)
    ax2.set_title("by layer (mean over depths)")
    ax2.legend()
    fig.suptitle(f"{adapter.name}: attention to answer vs noise")
    return fig


def run_attention_noise(adapter, tokenizer, options: AttentionNoiseOptions, out_dir=None) -> dict:
    """Answer vs noise attention shares on needle prompts, per depth."""
    started = start_task(adapter, options)
    length = options.length or min(adapter.max_len, 2048)
    corpus = load_corpus(options.data, tokenizer)
    gen = NeedleGenerator(tokenizer, corpus.texts())
    if length < gen.min_length(options.needles):
        raise UsageError(f"--length {length}: too short for {options.needles} needle(s) and the template "
                         f"(use at least {gen.min_length(options.needles)} tokens)")
    k = min(options.query_positions, length)
    by_depth, comp_by_depth = [], []
    for depth in options.depths:
        row, comp = _depth_row(adapter, gen, options, length, k, depth)
        by_depth.append(row)
        if comp is not None:
            comp_by_depth.append(comp)
    overall = {c: mean([r[c] for r in by_depth]) for c in CATEGORIES}
    n_layers = len(by_depth[0]["per_layer"]["answer"])
    per_layer_acc = {c: [mean([r["per_layer"][c][i] for r in by_depth]) for i in range(n_layers)] for c in ("answer", "noise")}
    data = {"length": length, "needles": options.needles, "normalize": options.normalize,
            "map": "effective (A1 - lambda*A2)" if adapter.differential else "softmax",
            "by_depth": by_depth, "mean": overall, "per_layer_mean": per_layer_acc,
            "components": {"map": "first softmax map (A1)", "by_depth": comp_by_depth} if comp_by_depth else None,
            "haystack": {"spec": corpus.spec, "kind": corpus.kind}}
    md = _markdown(by_depth, comp_by_depth, overall)
    fig = _figure(adapter, by_depth, per_layer_acc, n_layers)
    notes = [f"normalize={options.normalize}; BOS = the tokenizer's BOS, else the first token; "
             "noise excludes BOS and the question (UNCONFIRMED reading of Table 3)"]
    result = TaskResult("attention-noise", data, md, {"attention_noise.png": fig}, notes)
    return finish(result, adapter, tokenizer, options, out_dir, started)


__all__ = ["AttentionNoiseOptions", "run_attention_noise", "attention_shares", "category_masks"]
