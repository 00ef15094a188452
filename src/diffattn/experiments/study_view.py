"""Read-only accessors over a compare study's results.json, shared by the report's sections
(experiments/report.py, experiments/report_recall.py): the study, the variants' printed labels and the
baselines each variant is judged against."""

from __future__ import annotations

from typing import Any, Sequence

from .. import variants

BASELINE = variants.BASELINE


def label(v: str) -> str:
    """The name the report prints for variant ``v`` or a same-heads control (the registry rows; variants.py)."""
    return variants.label(v)


def _is_diff(v: str) -> bool:
    """A differential variant (the registry's ``differential`` flag; variants.py)."""
    return v in variants.names() and variants.get(v).differential


PARAM_MATCH_TOLERANCE = 0.005  # V1 vs its baseline: relative difference in parameters


class Study:
    """Convenience accessors over results.json."""

    def __init__(self, results: dict):
        self.r = results
        self.variants: list[str] = results["variants"]
        self.seeds = [str(s) for s in results["seeds"]]

    def runs(self, variant: str) -> list[dict]:
        return [self.r["runs"][variant][s] for s in self.seeds if s in self.r["runs"].get(variant, {})]

    def runs_by_seed(self, variant: str) -> list[dict | None]:
        """One entry per study seed, in seed order (None where the run is missing): verdicts pair by position."""
        return [self.r["runs"].get(variant, {}).get(s) for s in self.seeds]

    def first_eval_value(self, task: str, path: Sequence[Any]):
        """The value at ``path`` of the first variant whose ``task`` record has it (grids shared by every run)."""
        for v in self.variants:
            vals = self.eval_values(v, task, path)
            if vals:
                return vals[0]
        return None

    def eval_values(self, variant: str, task: str, path: Sequence[Any], *, paired: bool = False) -> list:
        """The value at ``path`` of ``task``'s results per run; ``paired``: one entry per seed (None if missing)."""
        out = []
        for run in self.runs_by_seed(variant):
            node = (run or {}).get("eval", {}).get(task, {}).get("results")
            for key in path:
                if node is None:
                    break
                node = node[key] if isinstance(node, list) and isinstance(key, int) else (
                    node.get(key) if isinstance(node, dict) else None)
            if node is not None or paired:
                out.append(node)
        return out

    def final_val(self, variant: str, *, paired: bool = False) -> list:
        vals = []
        for run in self.runs_by_seed(variant):
            v = run["summary"].get("val_loss") if run else None
            if v is not None or paired:
                vals.append(None if v is None else float(v))
        return vals

    def label(self, v: str) -> str:
        return label(v)


def _baselines_for(variant: str, study: Study) -> list[str]:
    """The baseline, and the variant's same-heads control when the study trained one (DIFF V2's)."""
    control = variants.control_of(variant)
    return [BASELINE, control] if control in study.variants else [BASELINE]


def describe_init(init: str, init_std: float, diff_norm_gain_init: float | None) -> str:
    """One line naming an initialisation (what the compare report states)."""
    text = {
        "torch": "`init=torch`: PyTorch defaults as in the DIFF authors' reference modules (Linear U(±1/√fan_in), "
                 "Embedding N(0, 1))",
        "mixed": f"`init=mixed`: PyTorch-default Linears (U(±1/√fan_in)), token embedding N(0, {init_std:g}²)",
        "scaled": "`init=scaled`: PyTorch-default Linears, token embedding and output head N(0, 1/d_model)",
    }.get(init, f"`init=gpt2`: N(0, {init_std:g}²) for embeddings and every Linear, residual outputs /√(2·n_layer)")
    if diff_norm_gain_init is not None:
        text += f"; DIFF per-head norm gain starts at {diff_norm_gain_init:g}" + (
            " (reference: 1)" if diff_norm_gain_init != 1.0 else " (as the reference)")
    return text + " (docs/results/init.md)"
