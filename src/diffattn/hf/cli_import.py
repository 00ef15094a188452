"""``diffattn import``: a stock transformers DiffLlama / Llama directory as a diffattn checkpoint.

DiffLlamaForCausalLM -> diff_v1 and LlamaForCausalLM -> standard, with the exact weight mapping of
:mod:`diffattn.hf.convert` (the inverse of ``diffattn export``).
"""

from __future__ import annotations

import argparse

from .cli_export import _print_report, _quiet_transformers, add_common


def run(args: argparse.Namespace) -> int:
    from .convert import import_model

    _quiet_transformers()

    r = import_model(args.src, args.dst, dtype=args.dtype, verify=not args.no_verify, overwrite=args.overwrite)
    _print_report("imported", r)
    return 0


DESCRIPTION = ("Convert a local Hugging Face model directory (safetensors) into a diffattn checkpoint: "
               "DiffLlamaForCausalLM -> diff_v1, LlamaForCausalLM -> standard. The mapping is exact; "
               "unsupported features (rotary scaling, biases, non-SiLU activations, unpaired heads) are "
               "refused. The result is verified by comparing logits and written atomically; tokenizer "
               "files are copied so AutoTokenizer.from_pretrained(DST) works.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="transformers model directory (config.json + model.safetensors)")
    p.add_argument("dst", metavar="DST", help="output diffattn checkpoint directory")
    add_common(p)
    p.set_defaults(func=run)
