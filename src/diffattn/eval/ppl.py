"""``ppl``: validation perplexity and NLL as a function of token position (methods.md §5 P5, P1).

* **Validation perplexity**: the held-out token stream (documents joined by EOS when the tokenizer
  has one) cut into non-overlapping windows of ``seq_len`` (the model's context by default); every
  token is predicted once, from the text before it inside its window; ``ppl = exp(mean NLL)`` over
  ``max_tokens`` predicted tokens.
* **NLL by position** (P5, the paper's Fig. 4): per-token NLL at position p = 1..W (p text tokens
  of context), averaged over windows, and the **cumulative average over positions 1..p**, plotted
  against p on a log axis. P5 uses long documents, each read from its start ("book data within
  64K"; the book set is UNCONFIRMED): ``position_source="documents"`` does that with held-out
  documents of at least W+1 tokens; ``"stream"`` uses the stream windows instead (documents
  shorter than the window are then mixed); ``"auto"`` (default) picks ``documents`` when at least
  ``min_docs`` documents are long enough and says which it used.

Special tokens the tokenizer puts in front of a text (Llama's BOS) are prepended to every window
and never scored, so models with and without a BOS are scored on the same text tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .common import (require_text_and_context, start_task, TaskOptions, TaskResult, UsageError, check_choice, check_int, finish, markdown_table,
                     new_figure, opt, seeded)
from .datasets import load_corpus, stream_tokens

POSITION_SOURCES = ("auto", "documents", "stream")


@dataclass(frozen=True, kw_only=True)
class PplOptions(TaskOptions):
    data: str | None = opt(None, "held-out text: token-shard dir (val split), text file/dir, .jsonl, or a source name")
    max_tokens: int = opt(65536, "predicted-token budget for the validation perplexity")
    seq_len: int | None = opt(None, "window length in tokens (default: the model's context)")
    batch_size: int = opt(2, "windows per forward pass")
    position_source: str = opt("auto", "windows of the NLL-by-position curve: auto, documents, stream")
    min_docs: int = opt(4, "'auto' uses documents when at least this many are long enough")
    max_docs: int = opt(64, "at most this many documents (or windows) for the NLL-by-position curve")

    def check(self):
        check_int("max_tokens", self.max_tokens, 1)
        if self.seq_len is not None:
            check_int("seq_len", self.seq_len, 2)
        check_int("batch_size", self.batch_size, 1)
        check_choice("position_source", self.position_source, POSITION_SOURCES)
        check_int("min_docs", self.min_docs, 1)
        check_int("max_docs", self.max_docs, 1)

    def check_model(self, adapter):
        require_text_and_context(self, adapter)


# --------------------------------------------------------------------------- reusable pieces

def window_batches(stream: Sequence[int], width: int, prefix: Sequence[int], max_targets: int,
                   batch_size: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows of ``stream``: x = prefix + s[o:o+W], y = [-100]*P + s[o+1:o+W+1]."""
    p = len(prefix)
    xs, ys, done = [], [], 0
    o = 0
    while o + width + 1 <= len(stream) and done < max_targets:
        xs.append(list(prefix) + list(stream[o:o + width]))
        ys.append([-100] * p + list(stream[o + 1:o + width + 1]))
        done += width
        o += width
        if len(xs) == batch_size:
            yield torch.tensor(xs, device=device), torch.tensor(ys, device=device)
            xs, ys = [], []
    if xs:
        yield torch.tensor(xs, device=device), torch.tensor(ys, device=device)


def token_nll(adapter, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-position NLL (B, T) of targets ``y`` (-100 = not scored, NLL 0 there)."""
    logits = adapter.logits(x)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1).to(logits.device),
                          ignore_index=-100, reduction="none")
    return nll.view(y.shape).cpu().double()


def mean_nll(adapter, stream: Sequence[int], width: int, prefix: Sequence[int], max_tokens: int,
             batch_size: int) -> tuple[float, int]:
    """Mean NLL over the first ``max_tokens`` predicted tokens of the stream windows, and the count."""
    total, count = 0.0, 0
    for x, y in window_batches(stream, width, prefix, max_tokens, batch_size, adapter.device):
        nll = token_nll(adapter, x, y)
        mask = y.cpu() != -100
        total += float(nll[mask].sum())
        count += int(mask.sum())
    if count == 0:
        raise ValueError(f"the held-out data has fewer than {width + 1} tokens: too short for one window of "
                         f"{width} tokens (lower --seq-len or give more text)")
    return total / count, count


def corpus_stream(corpus, tokenizer) -> tuple[list[list[int]], list[int]]:
    docs = corpus.token_docs(tokenizer)
    return docs, stream_tokens(docs, tokenizer.eos_id)


# --------------------------------------------------------------------------- the task

def _position_windows(docs: list[list[int]], stream: list[int], width: int, prefix: Sequence[int],
                     options: PplOptions) -> tuple[str, list[tuple[list[int], list[int]]]]:
    """The windows (x, y) of the NLL-by-position curve and their source (``documents`` or ``stream``; ``auto``
    resolved): up to ``max_docs`` held-out documents of at least W+1 tokens, each from its start (a seeded
    choice, kept in corpus order), or the first ``max_docs`` stream windows."""
    long_docs = [d for d in docs if len(d) >= width + 1]
    source = options.position_source
    if source == "auto":
        source = "documents" if len(long_docs) >= options.min_docs else "stream"
    if source == "documents":
        if not long_docs:
            raise ValueError(f"--position-source documents: no held-out document has {width + 1} tokens "
                             f"(lower --seq-len or use --position-source stream)")
        order = list(range(len(long_docs)))
        seeded(options.seed, "ppl-docs").shuffle(order)
        chosen = [long_docs[i] for i in sorted(order[:options.max_docs])]
        windows = [(list(prefix) + d[:width], [-100] * len(prefix) + d[1:width + 1]) for d in chosen]
    else:
        windows = []
        for x, y in window_batches(stream, width, prefix, options.max_docs * width, 1, "cpu"):
            windows.append((x[0].tolist(), y[0].tolist()))
    return source, windows


def _nll_by_position(adapter, windows: list[tuple[list[int], list[int]]], width: int, n_prefix: int,
                    batch_size: int) -> tuple[list[float], list[float], int]:
    """Mean NLL at each text position 1..W over the windows, its cumulative average over 1..p, the window count."""
    sums = torch.zeros(width, dtype=torch.float64)
    n_win = 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        x = torch.tensor([c[0] for c in chunk], device=adapter.device)
        y = torch.tensor([c[1] for c in chunk], device=adapter.device)
        sums += token_nll(adapter, x, y)[:, n_prefix:].sum(0)
        n_win += len(chunk)
    per_pos = (sums / max(n_win, 1)).tolist()
    cum = (torch.cumsum(sums / max(n_win, 1), 0) / torch.arange(1, width + 1, dtype=torch.float64)).tolist()
    return per_pos, cum, n_win


def _markdown(data: dict) -> str:
    """The perplexity table and the NLL-by-position table at positions 1, 2, 4, … and W."""
    nll, count, seq_len, width = data["val_loss"], data["tokens_scored"], data["seq_len"], data["window_text_tokens"]
    curve = data["position_curve"]
    per_pos, cum = curve["nll"], curve["cumulative_nll"]
    marks = sorted({p for p in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
                    if p <= width} | {width})
    md = "## Validation perplexity\n\n" + markdown_table(
        ["val loss (nats/token)", "perplexity", "tokens scored", "seq len"], [[nll, math.exp(nll), count, seq_len]])
    md += (f"\n\n## Cumulative average NLL by position ({curve['source']} windows: {curve['windows']})\n\n"
           + markdown_table(["position", "NLL at p", "cumulative NLL (1..p)"],
                            [[p, per_pos[p - 1], cum[p - 1]] for p in marks]))
    return md


def _figure(adapter, data: dict):
    """NLL at each position and its cumulative average against the position (log axis)."""
    curve = data["position_curve"]
    fig, ax = new_figure()
    xs = curve["positions"]
    ax.plot(xs, curve["nll"], color="0.75", linewidth=0.6, label="NLL at position p")
    ax.plot(xs, curve["cumulative_nll"], color="C0", linewidth=2.0, label="cumulative average NLL (1..p)")
    ax.set_xscale("log")
    ax.set_xlabel("token position p")
    ax.set_ylabel("NLL (nats)")
    ax.set_title(f"{adapter.name}: val ppl {math.exp(data['val_loss']):.2f}")
    ax.legend()
    return fig


def run_ppl(adapter, tokenizer, options: PplOptions, out_dir=None) -> dict:
    """Validation perplexity + cumulative NLL by position; writes results into ``out_dir`` (if given)."""
    started = start_task(adapter, options)
    seq_len = options.seq_len or adapter.max_len
    prefix = tokenizer.prefix_ids
    width = seq_len - len(prefix)
    if width < 2:
        raise UsageError(f"--seq-len {seq_len} leaves no room for text after {len(prefix)} special token(s)")
    corpus = load_corpus(options.data, tokenizer)
    docs, stream = corpus_stream(corpus, tokenizer)
    nll, count = mean_nll(adapter, stream, width, prefix, options.max_tokens, options.batch_size)
    source, windows = _position_windows(docs, stream, width, prefix, options)
    per_pos, cum, n_win = _nll_by_position(adapter, windows, width, len(prefix), options.batch_size)

    data = {"val_loss": nll, "perplexity": math.exp(nll), "tokens_scored": count, "seq_len": seq_len,
            "window_text_tokens": width, "prefix_tokens": len(prefix),
            "corpus": {"spec": corpus.spec, "kind": corpus.kind, "documents": len(docs), "tokens": len(stream)},
            "position_curve": {"source": source, "windows": n_win, "positions": list(range(1, width + 1)),
                               "nll": per_pos, "cumulative_nll": cum}}
    notes = [] if source == options.position_source else [f"position_source auto -> {source}"]
    result = TaskResult("ppl", data, _markdown(data), {"nll_by_position.png": _figure(adapter, data)}, notes)
    return finish(result, adapter, tokenizer, options, out_dir, started)


__all__ = ["PplOptions", "run_ppl", "mean_nll", "token_nll", "window_batches", "corpus_stream"]
