"""The papers' headline numbers the comparison report sits its own results next to, and the verdicts.

Every number cites its place in ../shared/reference/methods.md. They were measured at 350B-1T
tokens and 3B parameters; a CPU-sized study cannot reproduce their *magnitude*, only the
*direction* of an effect, so verdicts compare signs and weigh them against the seed spread.
"""

from __future__ import annotations

from ..utils.stats import (INCONCLUSIVE, NOT_MEASURED, NOT_REPRODUCED, REPRODUCED, VERDICT_RULE,  # noqa: F401
                           Verdict, paired_differences, verdict)

# (claim id) -> what the paper reports, the direction it implies, and the source
PAPER = {
    "val_loss": dict(
        text="DIFF 3.062 vs Transformer 3.087 valid loss (1.4B, Table 6); V2: 0.02-0.03 lower LM loss at 1T tokens (blog)",
        better="lower", source="methods.md §1.9 Table 6; §2.5"),
    "needle_4k_6_2": dict(
        text="multi-needle N=6, R=2 at 4K: DIFF 0.85 vs Transformer 0.55 (Table 2; transcription prints 0.35)",
        better="higher", source="methods.md §1.9 Table 2"),
    "needle": dict(
        text="multi-needle at 4K (N/R 1/1, 2/2, 4/2, 6/2): DIFF 1.00/0.92/0.84/0.85 vs Transformer 1.00/0.85/0.62/0.55",
        better="higher", source="methods.md §1.9 Table 2"),
    "attention_answer": dict(
        text="attention to the answer span: DIFF 0.27-0.40 vs Transformer 0.03-0.09 (Table 3)",
        better="higher", source="methods.md §1.9 Table 3"),
    "attention_noise": dict(
        text="attention noise (other context): DIFF 0.01-0.02 vs Transformer 0.49-0.54 (Table 3)",
        better="lower", source="methods.md §1.9 Table 3"),
    "outlier_logits": dict(
        text="top-1 |attention logit|: DIFF 38.8 vs Transformer 318.0 (Table 5)",
        better="lower", source="methods.md §1.9 Table 5"),
    "outlier_hidden": dict(
        text="top-1 |hidden state|: DIFF 1688.2 vs Transformer 3608.6 (Table 5)",
        better="lower", source="methods.md §1.9 Table 5"),
    "throughput": dict(
        text="V1 training throughput −9% (3B, 2K) to −12% (3B, 4K) vs Transformer, same FlashAttention (Table 7); V2: negligible",
        ratio="0.88-0.91×", better="higher", source="methods.md §1.9 Table 7; §2.3"),
    "lambda": dict(
        text="learned λ ≈ 0.8 in most (deep) layers, 0.2-0.4 in the first few, never negative (author, issue #1699)",
        better=None, source="methods.md §1.3"),
}

# The paper's tables the report prints next to its own, as printed (strings keep the paper's digits).
PAPER_TABLES = {
    # multi-needle accuracy at 4K, N/R -> (Transformer, DIFF), 3B models (methods.md §1.9 Table 2)
    "needle": {"1/1": ("1.00", "1.00"), "2/2": ("0.85", "0.92"), "4/2": ("0.62", "0.84"), "6/2": ("0.55", "0.85")},
    # attention allocation by depth (0, 25, 50, 75, 100 %): rows (model, what, shares...) (methods.md §1.9 Table 3)
    "attention_noise": (
        ("paper, Transformer", "answer", "0.03", "0.03", "0.03", "0.07", "0.09"),
        ("paper, DIFF", "answer", "0.27", "0.30", "0.31", "0.32", "0.40"),
        ("paper, Transformer", "noise", "0.51", "0.54", "0.52", "0.49", "0.49"),
        ("paper, DIFF", "noise", "0.01", "0.02", "0.02", "0.02", "0.01")),
    # largest activations: top-1, 2, 3, 10, 100 and the median (methods.md §1.9 Table 5)
    "outliers": (
        ("attention logits", "paper, Transformer", "318.0", "308.2", "304.9", "284.7", "251.5", "5.4"),
        ("attention logits", "paper, DIFF", "38.8", "38.8", "37.3", "32.0", "27.4", "3.3"),
        ("hidden states", "paper, Transformer", "3608.6", "3607.4", "3603.6", "3552.1", "2448.2", "0.6"),
        ("hidden states", "paper, DIFF", "1688.2", "1672.5", "1672.1", "1624.3", "740.9", "1.2")),
}

# The verdict rule and its machinery (VERDICT_RULE, verdict, ...) live in utils/stats.py, imported above:
# the DEX study judges its arms with them too.
