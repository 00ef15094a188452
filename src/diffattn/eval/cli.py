"""``diffattn eval TASK --model DIR [options]``: the evaluation tasks on the command line.

One sub-command per task (``ppl``, ``needle``, ``attention-noise``, ``icl``, ``hallucination``,
``outliers``, ``quant``, ``lambda``); each task's flags are generated from its options dataclass,
and ``--config FILE.toml`` sets the same options from a file (command-line flags win). Bad input
gives one line on stderr and exit code 2, before anything is written; results go to ``--out``
(default ``runs/eval/<model>-<task>``) atomically.
"""

from __future__ import annotations

import argparse
import sys
import types
from functools import partial
from pathlib import Path

from ..utils.options import OneLineParser, add_actions  # noqa: F401  (OneLineParser: its home moved to utils)
from .common import add_options_to_parser, options_from_args, read_toml

_HELP = {
    "ppl": "validation perplexity and cumulative NLL by token position (P5)",
    "needle": "multi-needle retrieval: accuracy per (N/R, length, depth), heat-map (P3)",
    "attention-noise": "attention share on the answer span vs irrelevant context on needle prompts (P4)",
    "icl": "many-shot in-context classification and order robustness (P6, P7)",
    "hallucination": "contextual faithfulness: unsupported-content rate (a judge-free proxy) (P8)",
    "outliers": "top-k / median |attention logits| and |hidden states| (P9, Table 5)",
    "quant": "k-bit absmax quantisation of attention logits: loss and needle accuracy (P10)",
    "lambda": "learned λ of every differential layer vs depth",
}


def _task_module_doc(name: str) -> str:
    import importlib

    mod = {"attention-noise": "attention_noise", "lambda": "lambdas"}.get(name, name)
    return importlib.import_module(f"diffattn.eval.{mod}").__doc__ or ""


DESCRIPTION = ("Evaluate a diffattn checkpoint or any Hugging Face causal-LM directory with one "
               "of the papers' protocols; writes results.json, results.md and PNG plots.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import TASKS

    p.error = types.MethodType(OneLineParser.error, p)
    tasks = add_actions(p, "task", "TASK", parser_class=OneLineParser)
    for name, (cls, _) in TASKS.items():
        tp = tasks.add_parser(name, help=_HELP[name], description=_task_module_doc(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        g = tp.add_argument_group("model and output")
        g.add_argument("--model", required=True, help="diffattn checkpoint dir, Hugging Face model dir, .gguf file, "
                                                      "or a known DEX base name (smollm2, gemma3-270m)")
        g.add_argument("--adapter", help="DEX adapter directory (diffattn adapt dex) applied to the --model base")
        g.add_argument("--tokenizer", help="tokenizer.json or tokenizer dir (default: the model's)")
        g.add_argument("--out", help="output directory (default: runs/eval/<model>-<task>)")
        g.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
        g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
        g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="weights dtype (default: float32)")
        g.add_argument("--config", help="TOML file with task options (command-line flags override it)")
        g.add_argument("--trust-remote-code", action="store_true",
                       help="allow a Hugging Face model's own code (never implicit)")
        add_options_to_parser(tp.add_argument_group(f"{name} options"), cls)
        tp.set_defaults(func=partial(run, name))



def run(task: str, args: argparse.Namespace) -> int:
    from . import TASKS
    from .loader import load

    cls, fn = TASKS[task]
    config = read_toml(args.config) if args.config else None
    options = options_from_args(cls, args, config)  # static checks before the model is loaded
    if args.adapter or not Path(args.model).exists():  # DEX registers its known bases and its adapter loader
        import diffattn.dex  # noqa: F401
    adapter, tokenizer = load(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                              trust_remote_code=args.trust_remote_code, dex_adapter=args.adapter)
    out = Path(args.out) if args.out else Path("runs") / "eval" / f"{adapter.name}-{task}"
    fn(adapter, tokenizer, options, out)
    md = (out / "results.md").read_text()
    body = md.split("\n## ", 1)
    try:
        print(("## " + body[1]) if len(body) > 1 else md, end="")
        print(f"\nwrote {out}/results.json, results.md and plots", flush=True)
    except BrokenPipeError:  # `| head`: the results are on disk; stop writing to the closed pipe
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


__all__ = ["add_arguments", "run", "DESCRIPTION"]
