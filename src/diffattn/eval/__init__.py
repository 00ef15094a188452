"""Evaluation suite: the papers' protocols as tasks (methods.md §5 P3–P10), on diffattn checkpoints
and on any Hugging Face causal LM, through one adapter interface (``adapter.py``; ``loader.py`` loads a model
into it).

Each task is a module with an options dataclass and ``run_<task>(adapter, tokenizer, options,
out_dir=None) -> dict`` (the ``results.json`` record); ``diffattn eval TASK --model DIR`` is the
command line (``cli.py``). ``TASKS`` maps the command-line task name to (options class, run
function). See docs/eval.md.

    from diffattn.eval import load, TASKS
    adapter, tokenizer = load("runs/diff-small")
    options_cls, run = TASKS["needle"]
    record = run(adapter, tokenizer, options_cls(data="wikipedia", samples=5), "out/needle")
"""

from __future__ import annotations

from .adapter import LayerMaps, ModelAdapter, ProbeSite
from .adapter_diffattn import DiffattnAdapter
from .adapter_hf import HFAdapter
from .loader import load, load_model_adapter
from .attention_noise import AttentionNoiseOptions, run_attention_noise
from .hallucination import HallucinationOptions, run_hallucination
from .icl import IclOptions, run_icl
from .lambdas import LambdaOptions, run_lambda
from .needle import NeedleOptions, run_needle
from .outliers import OutliersOptions, run_outliers
from .ppl import PplOptions, run_ppl
from .quant import QuantOptions, run_quant
from .tokenizer import TextTokenizer, load_tokenizer

TASKS = {
    "ppl": (PplOptions, run_ppl),
    "needle": (NeedleOptions, run_needle),
    "attention-noise": (AttentionNoiseOptions, run_attention_noise),
    "icl": (IclOptions, run_icl),
    "hallucination": (HallucinationOptions, run_hallucination),
    "outliers": (OutliersOptions, run_outliers),
    "quant": (QuantOptions, run_quant),
    "lambda": (LambdaOptions, run_lambda),
}

__all__ = ["TASKS", "ModelAdapter", "DiffattnAdapter", "HFAdapter", "LayerMaps", "ProbeSite", "TextTokenizer", "load",
           "load_model_adapter", "load_tokenizer", "PplOptions", "run_ppl", "NeedleOptions", "run_needle",
           "AttentionNoiseOptions", "run_attention_noise", "IclOptions", "run_icl", "HallucinationOptions",
           "run_hallucination", "OutliersOptions", "run_outliers", "QuantOptions", "run_quant", "LambdaOptions",
           "run_lambda"]
