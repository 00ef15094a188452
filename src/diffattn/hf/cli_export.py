"""``diffattn export``: a diffattn checkpoint as a stock transformers model directory.

``--to diffllama`` (diff_v1 -> DiffLlamaForCausalLM) and ``--to llama`` (standard -> LlamaForCausalLM),
with the exact weight mapping of :mod:`diffattn.hf.convert`; the output loads without diffattn.
"""

from __future__ import annotations

import argparse


def _print_report(verb: str, r) -> None:
    check = ("verified: max |logit difference| %.2g on a fixed probe batch" % r.max_abs_diff
             if r.max_abs_diff is not None else "not verified")
    tok = ", ".join(r.tokenizer_files) if r.tokenizer_files else "none in SRC"
    print(f"{verb} {r.kind}: {r.dst} ({check}; tokenizer files: {tok})")


def _quiet_transformers() -> None:
    """No progress bars or info logs from transformers in our one-line command output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def run(args: argparse.Namespace) -> int:
    from .convert import export_model

    _quiet_transformers()

    r = export_model(args.src, args.dst, args.to, dtype=args.dtype, verify=not args.no_verify,
                     overwrite=args.overwrite)
    _print_report("exported", r)
    return 0


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: that of SRC)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip loading the result back and comparing logits with SRC (saves memory/time)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists and is not empty")


DESCRIPTION = ("Convert a diffattn checkpoint directory into one that stock transformers loads without "
               "diffattn: diff_v1 -> DiffLlamaForCausalLM (--to diffllama), standard -> LlamaForCausalLM "
               "(--to llama). The mapping is exact (row permutations, norm gain folded into o_proj); what "
               "cannot be represented is refused. The result is verified by comparing logits, and written "
               "atomically; tokenizer files are copied.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, choices=["diffllama", "llama"], help="target architecture")
    p.add_argument("src", metavar="SRC", help="diffattn checkpoint directory (config.json + model.safetensors)")
    p.add_argument("dst", metavar="DST", help="output directory")
    add_common(p)
    p.set_defaults(func=run)
