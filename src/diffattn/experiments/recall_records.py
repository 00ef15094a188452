"""The recall study's rules over its *records* (results.json), apart from the runner (recall.py): the attention
categories, steps to competence, the validity gate and the headline accuracy. No torch: the report
(report_recall.py) and the init study read records through this module and never import the runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

CATEGORIES = ("answer", "other_pairs", "filler", "rest")  # where a query's attention goes (recall.evaluate_model)


def steps_to(record: dict, n: int, level: float) -> int | None:
    """The first curve step at which accuracy at ``n`` reached ``level``; None: never within the budget."""
    curve = record.get("curve")
    if not curve:
        raise ValueError("the record has no learning curve (trained before curves were recorded)")
    for step, acc in zip(curve["steps"], curve["accuracy"][str(n)]):
        if acc >= level:
            return step
    return None


def steps_or_budget(record: dict, n: int, options: Mapping[str, Any]) -> float:
    """``steps_to`` at the options' competence level, with a run that never got there counted as the budget
    plus one curve interval ("> budget"): later than any run that did, level with any other that did not.
    ``options``: the study's recall options as stored in results.json (RecallStudyOptions.to_dict)."""
    k = steps_to(record, n, options["competence"])
    return options["steps"] + options["steps"] / min(options["curve_points"], options["steps"]) if k is None else k


GATE_RULE = ("Validity gate: a recall verdict is drawn only from models that have learned retrieval in the easy "
             "case. When the baseline Transformer's median accuracy at N = 1 over seeds is below the competence "
             "level ({level:g}), every recall verdict reads \"not testable at this budget\".")


@dataclass(frozen=True)
class Gate:
    """The validity gate's outcome (``validity_gate``)."""

    valid: bool
    median: float
    level: float

    @property
    def not_testable(self) -> str:
        return f"not testable at this budget (baseline N = 1 accuracy {self.median:.2f})"

    def line(self) -> str:
        state = "passed" if self.valid else "failed"
        return (f"Validity gate {state}: the baseline's median accuracy at N = 1 is {self.median:.3f} "
                f"({'≥' if self.valid else '<'} {self.level:g}).")


def validity_gate(baseline_n1: Sequence[float], level: float) -> Gate:
    """The gate over the baseline's N = 1 accuracies, one per seed (GATE_RULE)."""
    xs = sorted(float(x) for x in baseline_n1)
    if not xs:
        raise ValueError("the validity gate needs at least one baseline run")
    mid = len(xs) // 2
    median = xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2
    return Gate(median >= level, median, float(level))


def mean_accuracy(record: dict) -> float:
    """Accuracy averaged over every evaluated N (the headline recall number)."""
    return sum(r["accuracy"] for r in record["by_n"]) / len(record["by_n"])


__all__ = ["CATEGORIES", "steps_to", "steps_or_budget", "GATE_RULE", "Gate", "validity_gate", "mean_accuracy"]
