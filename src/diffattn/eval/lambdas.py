"""``lambda``: the learned λ of every differential layer, as a table and a plot against depth
(DIFF V1 §2.1 Eq. 2, methods.md §1.3 and author answer microsoft/unilm#1699: most layers learn
λ ≈ 0.8, the first few 0.2–0.4, a few above 1, none negative).

* DIFF V1 / Shared DIFF (diffattn) and transformers' DiffLlama: λ = exp(λq1·λk1) − exp(λq2·λk2) +
  λ_init per layer (one λ shared by the layer's heads), with λ_init and both exponentials.
* DIFF V2: λ = sigmoid(x·W_λ) per token and head, so it is measured on held-out text (``--data``,
  ``tokens``): mean and standard deviation over tokens, per head and averaged over heads.
* DEX-adapted models (``diffattn.dex``): every wrapper that exposes ``current_lambda()`` (λ at the
  wrapper's current schedule step), with its λ_init and selected heads.

A model without any such layer (a standard Transformer) is an error: there is no λ to report.
"""

from __future__ import annotations

from dataclasses import dataclass

from .common import (start_task, integer_xaxis, TaskOptions, TaskResult, UsageError, check_int, finish, markdown_table, new_figure, opt)
from .datasets import load_corpus
from .ppl import corpus_stream, window_batches


@dataclass(frozen=True, kw_only=True)
class LambdaOptions(TaskOptions):
    data: str | None = opt(None, "held-out text; needed for DIFF V2's per-token λ only")
    tokens: int = opt(8192, "DIFF V2: tokens over which λ is averaged")
    seq_len: int | None = opt(None, "DIFF V2: window length (default: the model's context, at most 1024)")

    def check(self):
        check_int("tokens", self.tokens, 1)
        if self.seq_len is not None:
            check_int("seq_len", self.seq_len, 2)

    def check_model(self, adapter):
        if self.seq_len is not None and self.seq_len > adapter.max_len:
            raise UsageError(f"--seq-len {self.seq_len} is above the model's context ({adapter.max_len} tokens)")
        if not adapter.differential:
            raise UsageError(f"model {adapter.name!r} has no differential-attention layer, so no λ "
                             "(lambda applies to DIFF V1/V2/Shared DIFF, DiffLlama and DEX-adapted models)")
        if adapter.needs_lambda_data() and self.data is None:
            raise UsageError("this model's λ depends on the input (DIFF V2: sigmoid(x·W_λ)): pass --data")


def run_lambda(adapter, tokenizer, options: LambdaOptions, out_dir=None) -> dict:
    """λ per layer (and head, for V2), table and plot against depth."""
    started = start_task(adapter, options)
    batches = []
    data_info = None
    if adapter.needs_lambda_data():
        corpus = load_corpus(options.data, tokenizer)
        _, stream = corpus_stream(corpus, tokenizer)
        seq_len = options.seq_len or min(adapter.max_len, 1024)
        width = seq_len - len(tokenizer.prefix_ids)
        width = min(width, len(stream) - 1)
        if width < 1:
            raise ValueError("the held-out data is too short to measure λ")
        batches = [x for x, _ in window_batches(stream, width, tokenizer.prefix_ids, options.tokens, 1, adapter.device)]
        data_info = {"spec": corpus.spec, "kind": corpus.kind}
    layers = adapter.lambdas(batches)
    if not layers:
        raise UsageError(f"model {adapter.name!r} exposes no λ")
    kinds = sorted({r["kind"] for r in layers})
    rows = []
    for r in layers:
        rows.append([r["layer"], r["kind"], r["lambda"], r.get("lambda_init"), r.get("exp_q1k1"), r.get("exp_q2k2"),
                     r.get("lambda_std")])
    md = "## λ by layer\n\n" + markdown_table(
        ["layer", "kind", "λ", "λ_init", "exp(λq1·λk1)", "exp(λq2·λk2)", "std over tokens (V2)"], rows)
    v2 = [r for r in layers if "per_head" in r]
    if v2:
        n_head = len(v2[0]["per_head"])
        md += "\n\n## DIFF V2: mean λ per head\n\n" + markdown_table(
            ["layer", *[f"head {h}" for h in range(n_head)]], [[r["layer"], *r["per_head"]] for r in v2])
    fig, ax = new_figure()
    for kind in kinds:
        rs = [r for r in layers if r["kind"] == kind]
        xs = [r["layer"] for r in rs]
        ax.plot(xs, [r["lambda"] for r in rs], marker="o", label=f"λ ({kind})")
        if any(r.get("lambda_std") is not None for r in rs):
            lo = [r["lambda"] - r["lambda_std"] for r in rs]
            hi = [r["lambda"] + r["lambda_std"] for r in rs]
            ax.fill_between(xs, lo, hi, alpha=0.2)
        if any(r.get("lambda_init") is not None for r in rs):
            ax.plot(xs, [r.get("lambda_init") for r in rs], linestyle="--", color="0.5", label="λ_init")
    ax.set_xlabel("layer (depth, 0-based)")
    integer_xaxis(ax)
    ax.set_ylabel("λ")
    ax.axhline(0, color="0.8", linewidth=0.5)
    ax.legend()
    ax.set_title(f"{adapter.name}: learned λ by depth")
    data = {"layers": layers, "kinds": kinds, "data": data_info,
            "tokens": sum(int(b.numel()) for b in batches) if batches else None}
    result = TaskResult("lambda", data, md, {"lambda_by_layer.png": fig})
    return finish(result, adapter, tokenizer, options, out_dir, started)


__all__ = ["LambdaOptions", "run_lambda"]
