"""``diffattn bench attention|train|generate``: speed and memory of every variant vs the baseline.

Every run compares, in one process and on the same shapes, the standard Transformer (the baseline,
ratio 1.00), the chosen variants, DIFF V1 with the authors' split-value core and transformers'
DiffLlama (SDPA). Shapes are given as the *baseline* (``--n-head`` standard heads); each variant is
parameter-matched to it (DIFF V1: n_head/2 DIFF heads). Bad arguments exit 2 with one line.
"""

from __future__ import annotations

import argparse

from ..config import ATTENTION_VARIANTS
from . import common

_DEFAULTS = {  # the CPU target shape: fp32, B=1, T=2048, d_model=512, 16 standard heads (8 DIFF)
    "attention": dict(seq_len=[2048], batch=1, n_layer=1, vocab_size=256),
    "train": dict(seq_len=[2048], batch=1, n_layer=4, vocab_size=8192),
    "generate": dict(seq_len=[1024], batch=[1], n_layer=4, vocab_size=8192),
}


def _common(p: argparse.ArgumentParser, kind: str) -> None:
    d = _DEFAULTS[kind]
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default: cpu)")
    p.add_argument("--dtype", choices=list(common.DTYPES), help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument("--kernel", choices=["eager", "sdpa", "triton"],
                   help="kernel of diff_v1/shared_diff (default: sdpa on cpu, triton on cuda); the others use sdpa")
    p.add_argument("--variants", default=",".join(ATTENTION_VARIANTS),
                   help=f"comma-separated, from {', '.join(ATTENTION_VARIANTS)} (standard always runs)")
    p.add_argument("--no-references", dest="references", action="store_false",
                   help="skip the authors' split-value and transformers DiffLlama rows")
    p.add_argument("--seq-len", type=int, nargs="+", default=d["seq_len"], metavar="T",
                   help=f"sequence length(s){' of the prompt' if kind == 'generate' else ''} (default: {d['seq_len'][0]})")
    if kind == "generate":
        p.add_argument("--batch", type=int, nargs="+", default=d["batch"], metavar="B", help="batch size(s) (default: 1)")
        p.add_argument("--new-tokens", type=int, default=32, help="tokens to decode (default: 32)")
    else:
        p.add_argument("--batch", type=int, default=d["batch"], help="batch size (default: 1)")
    p.add_argument("--d-model", type=int, default=512, help="model width (default: 512)")
    p.add_argument("--n-head", type=int, default=16, help="heads of the standard baseline (default: 16)")
    p.add_argument("--n-kv-head", type=int, help="K/V heads of the baseline (default: --n-head)")
    p.add_argument("--head-dim", type=int, help="per-head width (default: d_model / n_head)")
    if kind != "attention":
        p.add_argument("--n-layer", type=int, default=d["n_layer"], help=f"layers (default: {d['n_layer']})")
        p.add_argument("--vocab-size", type=int, default=d["vocab_size"], help=f"vocabulary (default: {d['vocab_size']})")
    p.add_argument("--max-seq-len", type=int, help="model max_seq_len (default: the longest run needs)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per row (default: 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row, round-robin (default: 5)")
    if kind != "generate":
        p.add_argument("--compile", action="store_true", help="torch.compile every row")
    p.add_argument("--json", metavar="OUT", help="also write the results (and environment) to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


DESCRIPTION = (__doc__.splitlines()[0])


def add_arguments(p: argparse.ArgumentParser) -> None:
    kinds = p.add_subparsers(dest="bench_kind", metavar="KIND")
    from . import attention, generate, train

    a = kinds.add_parser("attention", help="one attention layer and the attention core, fwd and fwd+bwd")
    _common(a, "attention")
    a.set_defaults(func=attention.run, n_layer=1, vocab_size=256)
    t = kinds.add_parser("train", help="whole-model training step: tokens/s, peak memory, MFU (GPU)")
    _common(t, "train")
    t.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    t.add_argument("--memory-only", action="store_true", help="measure peak memory only (no timing)")
    t.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs, bf16/fp16)")
    t.set_defaults(func=train.run)
    g = kinds.add_parser("generate", help="prefill and KV-cache decode throughput")
    _common(g, "generate")
    g.set_defaults(func=generate.run)
    p.set_defaults(func=_no_kind)


def _no_kind(args) -> int:
    raise common.UsageError("choose what to benchmark: attention, train or generate (see diffattn bench --help)")
