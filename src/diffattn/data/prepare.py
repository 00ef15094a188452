"""``diffattn data prepare``: corpus -> document split -> tokenizer -> token shards (docs/data.md).

1. Validate everything cheap first (tokenizer spec, options, corpus paths, the output folder):
   bad input raises before anything is written.
2. Collect documents (registry sources are fetched/built once into the cache), drop exact
   duplicates, split by document hash (``corpus.split_documents``).
3. The *content hash* of the job is a sha256 over the sorted (document hash, source) pairs, the
   tokenizer fingerprint and the options. If ``--out`` already holds shards with that hash (and
   its files verify), nothing is done.
4. Otherwise train/load the tokenizer (BPE trains on the train split only), encode every document,
   and write shards, tokenizer.json, index.json and manifest.json atomically.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import corpus as C
from . import shards as SH
from . import tokenizer as T

PREPARE_VERSION = 1  # part of the content hash: bump when the output for the same inputs changes


@dataclass
class PrepareOptions:
    corpus: list[str] = field(default_factory=lambda: ["default"])
    tokenizer: str = "bpe:8192"
    out: Path = Path("data/default")
    val_fraction: float = 0.05
    seed: int = 0
    text_field: str = "text"
    shard_tokens: int = SH.DEFAULT_SHARD_TOKENS
    force: bool = False


def _check_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise NotADirectoryError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()) and not SH._is_shard_dir(out):
            raise ValueError(f"--out {out} exists and is not a diffattn shard directory; refusing to overwrite it")


def content_hash(docs: list[C.Document], spec: T.TokenizerSpec, opts: PrepareOptions) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": SH.FORMAT, "prepare": PREPARE_VERSION, "tokenizer": spec.fingerprint(),
                         "val_fraction": opts.val_fraction, "seed": opts.seed,
                         "shard_tokens": opts.shard_tokens}, sort_keys=True).encode())
    for sha, source in sorted((d.sha256, d.source) for d in docs):
        h.update(f"{sha} {source}\n".encode())
    return h.hexdigest()


def _encode(tok, docs: list[C.Document], batch: int = 512) -> list:
    import numpy as np

    out = []
    for i in range(0, len(docs), batch):
        for enc in tok.encode_batch([d.text for d in docs[i:i + batch]], add_special_tokens=False):
            out.append(np.asarray(enc.ids, dtype=np.int64))
    return out


def _check_options(opts: PrepareOptions) -> tuple[T.TokenizerSpec, Path]:
    """The tokenizer spec and the output folder, after every cheap check (nothing is read or written yet)."""
    spec = T.parse_spec(opts.tokenizer)
    if not 0.0 <= opts.val_fraction < 1.0:
        raise ValueError(f"--val-fraction {opts.val_fraction}: must be in [0, 1)")
    if opts.shard_tokens < 1:
        raise ValueError(f"--shard-tokens {opts.shard_tokens}: must be >= 1")
    if not opts.corpus:
        raise ValueError("--corpus: give at least one source or path")
    out = Path(opts.out)
    _check_out(out)
    C.check_specs(opts.corpus)
    return spec, out


def _count_sources(infos: dict, train: list[C.Document], val: list[C.Document], train_ids: list, val_ids: list,
                   dropped: dict[str, int]) -> list[dict]:
    """Add each document's bytes and tokens (and the duplicates dropped) to its source's record; the records."""
    for split, ds, ids in (("train", train, train_ids), ("val", val, val_ids)):
        for d, a in zip(ds, ids):
            info = infos[d.source]
            info.documents += 1
            info.bytes += len(d.text.encode("utf-8"))
            info.tokens += int(a.size)
            setattr(info, f"documents_{split}", getattr(info, f"documents_{split}") + 1)
    for name, n in dropped.items():
        infos[name].duplicates = n
    return [i.to_dict() for i in infos.values()]


def _write(out: Path, opts: PrepareOptions, key: str, tok, eos: str, eos_id: int, vocab_size: int, train_ids: list,
           val_ids: list, source_list: list[dict]) -> tuple[dict, dict]:
    """Write the shards, tokenizer.json, index.json and manifest.json atomically; the index and the manifest."""
    manifest = {"format": SH.FORMAT, "content_hash": key, "tokenizer": opts.tokenizer, "vocab_size": vocab_size,
                "eos_token": eos, "val_fraction": opts.val_fraction, "seed": opts.seed,
                "note": "tokens exclude the EOS after each document; bytes are UTF-8 of the normalised text",
                "sources": source_list}
    index = SH.write_shards(out, train_ids, val_ids, tok, vocab_size=vocab_size, eos_id=eos_id,
                            shard_tokens=opts.shard_tokens, content_hash=key,
                            sources=[{k: s[k] for k in ("name", "kind", "licence", "documents", "tokens")}
                                     for s in source_list],
                            extra={"tokenizer_spec": opts.tokenizer, "eos_token": eos,
                                   "val_fraction": opts.val_fraction, "seed": opts.seed},
                            extra_files={"manifest.json": json.dumps(manifest, indent=1) + "\n"}, overwrite=True)
    return index, manifest


def _log_sources(log: Callable[[str], None], source_list: list[dict], n_docs: int, n_train: int, n_val: int,
                 dropped: dict[str, int]) -> None:
    """One table line per source and a total (documents, bytes, tokens), and the duplicates dropped."""
    log(f"{'source':<24} {'docs':>7} {'train':>7} {'val':>6} {'bytes':>12} {'tokens':>11}")
    for s in source_list:
        label = s["name"] if len(s["name"]) <= 24 else "..." + s["name"][-21:]
        log(f"{label:<24} {s['documents']:>7,} {s['documents_train']:>7,} {s['documents_val']:>6,} "
            f"{s['bytes']:>12,} {s['tokens']:>11,}")
    log(f"{'total':<24} {n_docs:>7,} {n_train:>7,} {n_val:>6,} {sum(s['bytes'] for s in source_list):>12,} "
        f"{sum(s['tokens'] for s in source_list):>11,}")
    if dropped:
        log(f"dropped {sum(dropped.values())} duplicate document(s)")


def prepare(opts: PrepareOptions, log: Callable[[str], None] = print,
            warn: Callable[[str], None] = lambda m: print(f"warning: {m}", file=sys.stderr)) -> dict:
    """Run the pipeline; returns a summary dict (``"up_to_date": True`` when nothing was done)."""
    t0 = time.perf_counter()
    spec, out = _check_options(opts)
    docs, infos = C.collect(opts.corpus, opts.text_field, warn=warn)
    if not docs:
        raise ValueError(f"the corpus is empty: no document with text in {' '.join(opts.corpus)}")
    docs, dropped = C.dedupe(docs)
    if opts.val_fraction > 0 and len(docs) < 2:
        raise ValueError("the corpus has a single document: a train/validation split needs at least two "
                         "(or use --val-fraction 0)")
    key = content_hash(docs, spec, opts)
    if not opts.force and SH._is_shard_dir(out) and SH.read_index(out).get("content_hash") == key \
            and SH.verify(out):
        log(f"{out} is up to date (content hash {key[:12]}): nothing to do")
        return {"up_to_date": True, "content_hash": key, "out": str(out)}

    train, val = C.split_documents(docs, opts.val_fraction, opts.seed)
    log(f"{len(docs)} documents ({len(train)} train, {len(val)} validation) from {len(infos)} source(s); "
        f"tokenizer {opts.tokenizer}")
    t_tok = time.perf_counter()
    tok, eos = T.build_tokenizer(spec, [d.text for d in train])
    eos_id = tok.token_to_id(eos)
    vocab_size = T.vocab_size_of(tok)
    t_enc = time.perf_counter()
    train_ids, val_ids = _encode(tok, train), _encode(tok, val)
    t_write = time.perf_counter()
    source_list = _count_sources(infos, train, val, train_ids, val_ids, dropped)
    index, manifest = _write(out, opts, key, tok, eos, eos_id, vocab_size, train_ids, val_ids, source_list)
    t_end = time.perf_counter()

    _log_sources(log, source_list, len(docs), len(train), len(val), dropped)
    log(f"vocab {vocab_size} ({index['dtype']}), eos {eos!r}={eos_id}; shards: {len(index['splits']['train'])} train, "
        f"{len(index['splits']['val'])} val; tokens incl. EOS: {index['tokens']['train']:,} train, "
        f"{index['tokens']['val']:,} val")
    log(f"wrote {out} in {t_end - t0:.1f} s (corpus {t_tok - t0:.1f} s, tokenizer {t_enc - t_tok:.1f} s, "
        f"encode {t_write - t_enc:.1f} s, write {t_end - t_write:.1f} s)")
    return {"up_to_date": False, "content_hash": key, "out": str(out), "index": index, "manifest": manifest,
            "seconds": t_end - t0}
