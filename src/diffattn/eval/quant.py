"""``quant``: simulated low-bit quantisation of the attention logits (DIFF V1 §3.7 Fig. 8;
methods.md §5 P10).

Dynamic post-training **absmax** quantisation (Wan et al. 2024) of the pre-softmax logits
S = QKᵀ/√d, symmetric, before the mask and the softmax:

    s = max|S| / (2^(b−1) − 1),   Ŝ = clamp(round(S / s), −(2^(b−1) − 1), 2^(b−1) − 1) · s

* ``bits``: 16 means *no quantisation* (the paper's 16-bit reference row), others in 2..15
  (paper: 8, 6, 4).
* ``granularity`` (UNCONFIRMED in the paper; P10 says pick one and report it): ``tensor``
  (default: one scale per logit tensor, i.e. per layer and kernel call, over all heads and rows),
  ``head`` (per batch row and head) or ``row`` (per query row). The max runs over the positions
  the mask allows (future positions are masked anyway).
* DIFF variants: **both** maps' logits are quantised. V1/Shared DIFF compute them in two kernel
  calls, so ``tensor`` means one scale per map; V2 computes both in one call (its 2h query heads),
  so one scale covers both.

Metrics (the paper used zero-shot HellaSwag, not available offline): validation loss on held-out
text (``loss_tokens``), and multi-needle accuracy (``needle_*`` options, see ``needle.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import (start_task, TaskOptions, TaskResult, UsageError, check_choice, check_int, finish, markdown_table, new_figure,
                     opt, parse_nr)
from .datasets import load_corpus
from .needle import DEPTHS, MATCH_MODES, NeedleGenerator, auto_lengths, evaluate_needles, summarise_cells
from .ppl import corpus_stream, mean_nll

GRANULARITIES = ("tensor", "head", "row")


def absmax_quantize(x: torch.Tensor, allowed: torch.Tensor | None, bits: int, granularity: str = "tensor") -> torch.Tensor:
    """Symmetric absmax fake-quantisation of ``x`` (…, T, S) to ``bits`` (see the module docstring)."""
    qmax = 2 ** (bits - 1) - 1
    a = x.abs()
    if allowed is not None:
        a = a.masked_fill(~allowed, 0)
    if granularity == "tensor":
        m = a.amax()
    elif granularity == "head":
        m = a.amax(dim=(-1, -2), keepdim=True)
    elif granularity == "row":
        m = a.amax(dim=-1, keepdim=True)
    else:
        raise ValueError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}")
    s = m / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.clamp(torch.round(x / s), -qmax, qmax) * s


@dataclass(frozen=True, kw_only=True)
class QuantOptions(TaskOptions):
    data: str | None = opt(None, "held-out text for the loss and the needle haystack")
    bits: list[int] = opt([16, 8, 6, 4], "bit widths (16 = not quantised)")
    granularity: str = opt("tensor", "absmax scope: tensor, head or row (UNCONFIRMED in the paper)")
    loss_tokens: int = opt(16384, "predicted-token budget of the validation loss")
    seq_len: int | None = opt(None, "loss window length (default: the model's context)")
    batch_size: int = opt(1, "loss windows per forward pass")
    needle: bool = opt(True, "also measure multi-needle accuracy")
    needle_nr: list[str] = opt(["2/2"], "needle N/R pairs")
    needle_lengths: list[int] | None = opt(None, "needle prompt lengths (default: the longest that fits)")
    needle_depths: list[float] = opt(list(DEPTHS), "needle depths (percent)")
    needle_samples: int = opt(5, "needle trials per (N/R, length, depth) cell")
    needle_max_new_tokens: int = opt(20, "greedy tokens per needle question")
    needle_match: str = opt("contains", "needle scoring: contains, substring, first")

    def check(self):
        if not self.bits:
            raise UsageError("--bits: give at least one bit width")
        for b in self.bits:
            check_int("bits", b, 2, 16)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_int("loss_tokens", self.loss_tokens, 1)
        if self.seq_len is not None:
            check_int("seq_len", self.seq_len, 2)
        check_int("batch_size", self.batch_size, 1)
        parse_nr(self.needle_nr)
        for x in self.needle_lengths or []:
            check_int("needle_lengths", x, 1)
        for d in self.needle_depths:
            if not 0 <= d <= 100:
                raise UsageError(f"--needle-depths: {d} is outside 0..100 (percent)")
        check_int("needle_samples", self.needle_samples, 1)
        check_int("needle_max_new_tokens", self.needle_max_new_tokens, 1)
        check_choice("needle_match", self.needle_match, MATCH_MODES)

    def check_model(self, adapter):
        if self.data is None:
            raise UsageError("--data is required: held-out text (a shard dir, text file/dir, .jsonl, source name)")
        if self.seq_len is not None and self.seq_len > adapter.max_len:
            raise UsageError(f"--seq-len {self.seq_len} is above the model's context ({adapter.max_len} tokens)")
        room = adapter.max_len - self.needle_max_new_tokens
        for x in self.needle_lengths or []:
            if x > room:
                raise UsageError(f"--needle-lengths {x}: prompt + {self.needle_max_new_tokens} generated tokens is "
                                 f"above the model's context ({adapter.max_len} tokens)")


def quantizer(bits: int, granularity: str):
    """A logit-probe function that fake-quantises every logit tensor."""
    def fn(site, scores, allowed):
        return absmax_quantize(scores, allowed, bits, granularity)
    return fn


def _needle_setup(adapter, tokenizer, corpus, options: QuantOptions):
    """The needle generator, the (N, R) pairs and the prompt lengths of the needle check (None, [], [] without
    ``--needle``); a length too short for the needles is an error."""
    gen, nr, lengths = None, [], []
    if options.needle:
        gen = NeedleGenerator(tokenizer, corpus.texts())
        nr = parse_nr(options.needle_nr)
        lengths = sorted(set(options.needle_lengths)) if options.needle_lengths else \
            auto_lengths(adapter.max_len - options.needle_max_new_tokens)[-1:]
        need = max(gen.min_length(n) for n, _ in nr)
        for x in lengths:
            if x < need:
                raise UsageError(f"--needle-lengths {x}: too short for the needles and the template (need {need})")
    return gen, nr, lengths


def _rows(adapter, tokenizer, options: QuantOptions, stream, width: int, prefix, gen, nr, lengths) -> list[dict]:
    """One row per bit width, the most bits first: validation loss (and needle accuracy) with the attention logits
    fake-quantised (16 bits: unquantised), and the loss difference to the unquantised row."""
    rows = []
    for bits in sorted(set(options.bits), reverse=True):
        def measure():
            nll, count = mean_nll(adapter, stream, width, prefix, options.loss_tokens, options.batch_size)
            row = {"bits": bits, "quantized": bits < 16, "val_loss": nll, "perplexity": math.exp(nll),
                   "tokens_scored": count}
            if gen is not None:
                cells, _ = evaluate_needles(adapter, tokenizer, gen, nr, lengths, options.needle_depths,
                                            options.needle_samples, options.needle_max_new_tokens,
                                            options.needle_match, options.seed)
                by_nr, _ = summarise_cells(cells)
                row["needle_accuracy"] = sum(b["accuracy"] for b in by_nr) / len(by_nr)
                row["needle_by_nr"] = by_nr
            return row

        if bits >= 16:
            rows.append(measure())
        else:
            with adapter.logit_probe(quantizer(bits, options.granularity)):
                rows.append(measure())
    base = next((r for r in rows if not r["quantized"]), None)
    for r in rows:
        r["delta_loss"] = (r["val_loss"] - base["val_loss"]) if base else None
    return rows


def _figure(adapter, rows: list[dict], granularity: str, needle: bool):
    """Validation loss (and needle accuracy) against the logit bits."""
    fig, axes = new_figure(10 if needle else 6, 3.8, ncols=2 if needle else 1)
    axes = axes if isinstance(axes, list) else [axes]
    bits_sorted = [r["bits"] for r in rows]
    axes[0].plot(bits_sorted, [r["val_loss"] for r in rows], marker="o")
    axes[0].set_xlabel("attention-logit bits")
    axes[0].set_ylabel("validation loss")
    axes[0].invert_xaxis()
    if needle:
        axes[1].plot(bits_sorted, [r["needle_accuracy"] for r in rows], marker="o", color="C1")
        axes[1].set_xlabel("attention-logit bits")
        axes[1].set_ylabel("needle accuracy")
        axes[1].set_ylim(-0.02, 1.02)
        axes[1].invert_xaxis()
    fig.suptitle(f"{adapter.name}: low-bit attention logits ({granularity} absmax)")
    return fig


def run_quant(adapter, tokenizer, options: QuantOptions, out_dir=None) -> dict:
    """Validation loss and needle accuracy with k-bit attention logits."""
    started = start_task(adapter, options)
    corpus = load_corpus(options.data, tokenizer)
    _, stream = corpus_stream(corpus, tokenizer)
    seq_len = options.seq_len or adapter.max_len
    prefix = tokenizer.prefix_ids
    width = seq_len - len(prefix)
    gen, nr, lengths = _needle_setup(adapter, tokenizer, corpus, options)
    rows = _rows(adapter, tokenizer, options, stream, width, prefix, gen, nr, lengths)
    header = ["bits", "val loss", "Δ loss vs 16-bit", "perplexity"] + (["needle accuracy"] if gen else [])
    md = (f"## Attention logits quantised (absmax, symmetric, per {options.granularity})\n\n"
          + markdown_table(header, [[("16 (none)" if not r["quantized"] else r["bits"]), r["val_loss"], r["delta_loss"],
                                     r["perplexity"]] + ([r["needle_accuracy"]] if gen else []) for r in rows]))
    fig = _figure(adapter, rows, options.granularity, bool(gen))
    data = {"granularity": options.granularity, "seq_len": seq_len, "rows": rows,
            "needle": {"nr": [f"{n}/{r}" for n, r in nr], "lengths": lengths, "depths": options.needle_depths,
                       "samples": options.needle_samples} if gen else None,
            "data": {"spec": corpus.spec, "kind": corpus.kind}}
    notes = ["16 bits = the unquantised model; the paper's metric (HellaSwag) is replaced by validation loss and "
             "needle accuracy"]
    result = TaskResult("quant", data, md, {"quant.png": fig}, notes)
    return finish(result, adapter, tokenizer, options, out_dir, started)


__all__ = ["QuantOptions", "run_quant", "absmax_quantize", "quantizer"]
