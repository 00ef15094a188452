"""``diffattn bench attention|train|generate|compile``: speed and memory of every variant vs the baseline.

Every run compares, in one process and on the same shapes, the standard Transformer (the baseline,
ratio 1.00), the chosen variants, DIFF V1 with the authors' split-value core and transformers'
DiffLlama (SDPA). Shapes are given as the *baseline* (``--n-head`` standard heads); each variant is
parameter-matched to it (DIFF V1: n_head/2 DIFF heads). Bad arguments exit 2 with one line.
"""

from __future__ import annotations

import argparse

from ..utils.options import add_options_to_parser, options_from_args
from . import common
from .options import AttentionBench, GenerateBench, TrainBench


def _runner(options_cls, run):
    """The command's function: the flags -> a validated options object -> the benchmark."""
    return lambda args: run(options_from_args(options_cls, args))


DESCRIPTION = (__doc__.splitlines()[0])


def add_arguments(p: argparse.ArgumentParser) -> None:
    kinds = p.add_subparsers(dest="bench_kind", metavar="KIND")
    from . import attention, generate, train

    for name, cls, module, help_ in (
            ("attention", AttentionBench, attention, "one attention layer and the attention core, fwd and fwd+bwd"),
            ("train", TrainBench, train, "whole-model training step: tokens/s, peak memory, MFU (GPU)"),
            ("generate", GenerateBench, generate, "prefill and KV-cache decode throughput")):
        k = kinds.add_parser(name, help=help_, description=cls.__doc__)
        add_options_to_parser(k, cls, skip=())  # one flag per field (bench/options.py)
        k.set_defaults(func=_runner(cls, module.run))
    from . import compile as compile_check

    k = kinds.add_parser("compile", help="every Triton kernel compiled for sm_80/86/89/90/100 on this CPU: "
                                         "registers, spills, shared memory, tensor cores",
                         description=compile_check.__doc__.split("\n\n")[0])
    compile_check.add_arguments(k)
    p.set_defaults(func=_no_kind)


def _no_kind(args) -> int:
    raise common.UsageError("choose what to benchmark: attention, train, generate or compile "
                            "(see diffattn bench --help)")
