"""``outliers``: activation-outlier statistics (DIFF V1 §3.7 Table 5; methods.md §5 P9; author
answer in microsoft/unilm#1666).

Over a fixed budget of held-out tokens (``tokens``; the paper: 0.4M), in windows of ``seq_len``:

* **attention logits**: the absolute pre-softmax scaled logits |QKᵀ|/√d of every layer and head —
  for DIFF variants of **both** maps, |Q1K1ᵀ|/√d and |Q2K2ᵀ|/√d (reported pooled and per map);
  collected through :meth:`ModelAdapter.logit_probe`. Masked (future) positions are excluded by
  default (``exclude_masked``; the paper does not say — UNCONFIRMED, methods.md's recommendation);
* **hidden states**: the absolute values at the output of every layer (after both residual
  additions), every token and channel.

Reported, as in Table 5: Top-1, Top-2, Top-3, Top-10, Top-100 of the pooled values and their
median. The top values are exact (a running top-100); the median comes from a log-spaced
histogram (``MEDIAN_BINS`` bins between 1e-6 and 1e7: relative error below 0.2%), because the
pooled logits of 0.4M tokens do not fit in memory. Plots: the per-layer maxima.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import (require_text_and_context, start_task, integer_xaxis, TaskOptions, TaskResult, check_int, finish, markdown_table, new_figure, opt)
from .datasets import load_corpus
from .ppl import corpus_stream, window_batches

TOPS = (1, 2, 3, 10, 100)
MEDIAN_BINS = 20000
_LO, _HI = 1e-6, 1e7


class AbsStats:
    """Running top-100 and histogram median of non-negative values (streamed, on any device)."""

    def __init__(self, k: int = max(TOPS), bins: int = MEDIAN_BINS):
        self.k = k
        self.bins = bins
        self.top: torch.Tensor | None = None
        self.hist: torch.Tensor | None = None
        self.count = 0
        self._log_lo = math.log10(_LO)
        self._width = (math.log10(_HI) - self._log_lo) / bins

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().reshape(-1).float()
        if v.numel() == 0:
            return
        self.count += v.numel()
        t = torch.topk(v, min(self.k, v.numel())).values
        self.top = t if self.top is None else torch.topk(torch.cat((self.top, t.to(self.top.device))),
                                                          min(self.k, self.top.numel() + t.numel())).values
        # bin 0: below 1e-6 (and zeros); bins 1..B: log-spaced; bin B+1: at or above 1e7
        idx = torch.floor((torch.log10(v.clamp_min(_LO * 0.5)) - self._log_lo) / self._width).long() + 1
        idx = torch.where(v < _LO, torch.zeros_like(idx), idx.clamp(1, self.bins + 1))
        h = torch.bincount(idx, minlength=self.bins + 2).cpu().double()
        self.hist = h if self.hist is None else self.hist + h

    def median(self) -> float | None:
        if not self.count:
            return None
        cum = torch.cumsum(self.hist, 0)
        half = self.count / 2.0
        b = int(torch.searchsorted(cum, torch.tensor(half, dtype=cum.dtype)))
        if b == 0:
            return 0.0
        if b > self.bins:
            return _HI
        before = float(cum[b - 1])
        frac = (half - before) / max(float(self.hist[b]), 1.0)
        return 10 ** (self._log_lo + (b - 1 + frac) * self._width)

    def result(self) -> dict:
        top = self.top.cpu().tolist() if self.top is not None else []
        out = {f"top{k}": (top[k - 1] if len(top) >= k else None) for k in TOPS}
        out.update(median=self.median(), count=self.count)
        return out


@dataclass(frozen=True, kw_only=True)
class OutliersOptions(TaskOptions):
    data: str | None = opt(None, "held-out text (shard dir val split, text file/dir, .jsonl, source name)")
    tokens: int = opt(400_000, "token budget (the paper: 0.4M)")
    seq_len: int | None = opt(None, "window length (default: the model's context, at most 2048)")
    batch_size: int = opt(1, "windows per forward pass")
    exclude_masked: bool = opt(True, "exclude the logits of masked (future) positions (UNCONFIRMED in the paper)")

    def check(self):
        check_int("tokens", self.tokens, 1)
        if self.seq_len is not None:
            check_int("seq_len", self.seq_len, 2)
        check_int("batch_size", self.batch_size, 1)

    def check_model(self, adapter):
        require_text_and_context(self, adapter)


def collect_stats(adapter, batches, exclude_masked: bool = True) -> dict:
    """Pooled statistics of |attention logits| (all / per map) and |layer outputs| over ``batches``."""
    logits = {"all": AbsStats(), "map1": AbsStats(), "map2": AbsStats()}
    hidden = AbsStats()
    layer_logit_max: dict[int, float] = {}
    layer_hidden_max: dict[int, float] = {}
    seen_components = [False]

    def probe(site, scores, allowed):
        if site.duplicate:
            return None
        a = scores.abs()
        mask = allowed.expand_as(a) if exclude_masked else torch.ones_like(a, dtype=torch.bool)
        vals = a[mask]
        logits["all"].add(vals)
        if vals.numel():
            layer_logit_max[site.layer] = max(layer_logit_max.get(site.layer, 0.0), float(vals.max()))
        if site.component is not None:
            seen_components[0] = True
            comp = site.component.to(a.device)
            for c, key in ((0, "map1"), (1, "map2")):
                heads = comp == c
                if bool(heads.any()):
                    logits[key].add(a[:, heads][mask[:, heads]])
        return None

    n_tokens = 0
    with adapter.logit_probe(probe):
        for x, _ in batches:
            outs = adapter.layer_outputs(x)
            for i, h in enumerate(outs):
                ah = h.abs()
                hidden.add(ah)
                layer_hidden_max[i] = max(layer_hidden_max.get(i, 0.0), float(ah.max()))
            n_tokens += x.numel()
    res = {"attention_logits": logits["all"].result(), "hidden_states": hidden.result(), "tokens": n_tokens,
           "layer_max_logit": [layer_logit_max[k] for k in sorted(layer_logit_max)],
           "layer_max_hidden": [layer_hidden_max[k] for k in sorted(layer_hidden_max)]}
    if seen_components[0]:
        res["attention_logits_map1"] = logits["map1"].result()
        res["attention_logits_map2"] = logits["map2"].result()
    return res


def run_outliers(adapter, tokenizer, options: OutliersOptions, out_dir=None) -> dict:
    """Top-k and median of |attention logits| and |hidden states| (Table 5 layout)."""
    started = start_task(adapter, options)
    seq_len = options.seq_len or min(adapter.max_len, 2048)
    corpus = load_corpus(options.data, tokenizer)
    _, stream = corpus_stream(corpus, tokenizer)
    prefix = tokenizer.prefix_ids
    width = seq_len - len(prefix)
    if len(stream) < width + 1:
        raise ValueError(f"the held-out data has {len(stream)} tokens: too short for one window of {seq_len}")
    batches = window_batches(stream, width, prefix, options.tokens, options.batch_size, adapter.device)
    stats = collect_stats(adapter, batches, options.exclude_masked)
    if stats["tokens"] < options.tokens:
        note = [f"the held-out data gave {stats['tokens']} tokens, fewer than the {options.tokens}-token budget"]
    else:
        note = []
    rows = [["attention logits" + (" (both maps)" if "attention_logits_map1" in stats else ""),
             *[stats["attention_logits"][f"top{k}"] for k in TOPS], stats["attention_logits"]["median"]]]
    for key, label in (("attention_logits_map1", "attention logits, map 1 (Q1K1)"),
                       ("attention_logits_map2", "attention logits, map 2 (Q2K2)")):
        if key in stats:
            rows.append([label, *[stats[key][f"top{k}"] for k in TOPS], stats[key]["median"]])
    rows.append(["hidden states", *[stats["hidden_states"][f"top{k}"] for k in TOPS], stats["hidden_states"]["median"]])
    md = f"## Largest activation values over {stats['tokens']} tokens (Table 5 layout)\n\n" + markdown_table(
        ["activation", "Top-1", "Top-2", "Top-3", "Top-10", "Top-100", "Median"], rows, digits=3)
    fig, (ax1, ax2) = new_figure(10, 3.8, ncols=2)
    ax1.plot(range(len(stats["layer_max_logit"])), stats["layer_max_logit"], marker="o")
    ax1.set_xlabel("layer")
    integer_xaxis(ax1)
    ax1.set_ylabel("max |attention logit|")
    ax2.plot(range(len(stats["layer_max_hidden"])), stats["layer_max_hidden"], marker="o", color="C1")
    ax2.set_xlabel("layer")
    integer_xaxis(ax2)
    ax2.set_ylabel("max |hidden state|")
    fig.suptitle(f"{adapter.name}: activation outliers by layer")
    data = {"seq_len": seq_len, "exclude_masked": options.exclude_masked, **stats,
            "median_method": f"log-histogram, {MEDIAN_BINS} bins in [1e-6, 1e7]",
            "data": {"spec": corpus.spec, "kind": corpus.kind}}
    result = TaskResult("outliers", data, md, {"outliers_by_layer.png": fig}, note)
    return finish(result, adapter, tokenizer, options, out_dir, started)


__all__ = ["OutliersOptions", "run_outliers", "AbsStats", "collect_stats"]
