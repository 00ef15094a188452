"""Adaptation text for DEX, tokenised with the **base model's** tokenizer.

Three inputs, one output (a ``diffattn-shards-v1`` directory read with ``diffattn.data.loader``):

* ``--data DIR``: an existing shard directory. Its tokenizer must be the base model's (checked by
  encoding a probe text with both), e.g. ``diffattn data prepare --tokenizer <base dir> --out DIR``.
* ``--text SPEC...``: the user's text files / folders / JSONL / ``hf:`` datasets (anything
  ``diffattn data prepare`` accepts as a corpus spec);
* neither: the project's default corpus (the pinned registry sources of ``diffattn data``).

For the last two the documents are collected and split into train/validation *by document*
(``diffattn.data.corpus.split_documents``), tokenised with the base tokenizer (EOS after each document)
and written once to ``<cache>/dex-data/<key>``, keyed by the tokenizer and the documents' hashes, so
repeated runs (and the study's three arms) read identical tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .bases import cache_dir

PROBE = "DEX probe: The quick brown fox jumps over the lazy dog. 1234 — naïve café, ¿qué?\n\tEnd."
VAL_FRACTION = 0.05


def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer."""
    tok = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if tok is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer")
    return tok


def eos_id_of(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the base model's tokenizer has no EOS token")
    return int(eos)


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(_backend(tokenizer).to_str().encode()).hexdigest()


def check_shards_match(shard_dir: str | Path, tokenizer, model_vocab: int) -> None:
    """A shard directory must use the base model's tokenizer (probe text encodes identically)."""
    from ..data.loader import read_shard_index

    shard_dir = Path(shard_dir)
    index = read_shard_index(shard_dir)
    if index["vocab_size"] > model_vocab:
        raise ValueError(f"{shard_dir}: vocab_size {index['vocab_size']} exceeds the base model's {model_vocab}: "
                         f"tokenized with another tokenizer (prepare it with --tokenizer <base dir>)")
    if tokenizer is None:
        return
    tok_file = shard_dir / index.get("tokenizer", "tokenizer.json")
    if not tok_file.is_file():
        raise ValueError(f"{shard_dir}: no tokenizer.json to compare with the base model's tokenizer")
    from tokenizers import Tokenizer

    theirs = Tokenizer.from_file(str(tok_file)).encode(PROBE, add_special_tokens=False).ids
    ours = _backend(tokenizer).encode(PROBE, add_special_tokens=False).ids
    if theirs != ours:
        raise ValueError(f"{shard_dir} was tokenized with a different tokenizer than the base model; "
                         f"use --text, or prepare it with: diffattn data prepare --tokenizer <base dir>")


def _docs_key(tokenizer, docs_train, docs_val, label: str) -> str:
    h = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    for split, docs in (("train", docs_train), ("val", docs_val)):
        h.update(split.encode())
        for d in docs:
            h.update(d.sha256.encode())
    return f"{label}-{h.hexdigest()[:16]}"


def prepare_text(specs: list[str] | None, tokenizer, *, seed: int = 0, val_fraction: float = VAL_FRACTION,
                 log=print) -> Path:
    """Shard directory for ``specs`` (None = the default corpus) tokenised with ``tokenizer`` (cached)."""
    from ..data import corpus
    from ..data.shards import write_shards

    if tokenizer is None:
        raise ValueError("the base model directory has no tokenizer: pass --data with token shards instead of text")
    spec_list = list(specs) if specs else ["default"]
    docs, _infos = corpus.collect(spec_list, warn=lambda m: log(f"warning: {m}"))
    docs, _ = corpus.dedupe(docs)
    if not docs:
        raise ValueError(f"no text found in {' '.join(spec_list)}")
    train, val = corpus.split_documents(docs, val_fraction, seed)
    if not val:  # a single document: hold out its tail instead
        only = train[0]
        cut = int(len(only.text) * (1 - val_fraction))
        train = [corpus.Document(only.text[:cut], only.source, only.ident + "[train]")]
        val = [corpus.Document(only.text[cut:], only.source, only.ident + "[val]")]
    label = "default" if not specs else "text"
    out = cache_dir() / "dex-data" / _docs_key(tokenizer, train, val, label)
    if (out / "index.json").is_file():
        return out
    backend = _backend(tokenizer)
    eos = eos_id_of(tokenizer)
    log(f"tokenizing {len(train)} + {len(val)} documents with the base tokenizer ...")

    def encode(ds):
        ids = backend.encode_batch([d.text for d in ds], add_special_tokens=False)
        return [e.ids for e in ids]

    vocab = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    write_shards(out, encode(train), encode(val), backend, vocab_size=vocab, eos_id=eos,
                 sources=sorted({d.source for d in docs}), extra={"dex": {"specs": spec_list, "seed": seed}},
                 overwrite=True)
    return out


def with_bos(x: torch.Tensor, y: torch.Tensor, bos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend BOS to inputs: x' = [BOS, x], y' = [x₀, y] (the model also predicts the first token)."""
    if bos_id is None:
        return x, y
    bos = torch.full((x.shape[0], 1), bos_id, dtype=x.dtype)
    return torch.cat([bos, x], 1), torch.cat([x[:, :1], y], 1)


class AdaptationData:
    """Train sampler, validation windows and calibration windows over one shard directory."""

    def __init__(self, shard_dir: str | Path, *, seq_len: int, batch_size: int, seed: int, bos_id: int | None,
                 retrieval_share: float = 0.0, tokenizer=None):
        """``retrieval_share``: that share of the training rows are needle-retrieval sequences built from the
        *train* split (eval/needle_mix.py: cities and numbers disjoint from the evaluation's), with
        ``tokenizer`` (a Hugging Face tokenizer); every arm of a study then sees the identical stream."""
        from ..data.loader import TokenShards, WindowSampler

        self.dir = Path(shard_dir)
        self.train = TokenShards(self.dir, "train")
        self.val = TokenShards(self.dir, "val")
        self.bos_id = bos_id
        self.body = seq_len - (1 if bos_id is not None else 0)   # tokens from the stream per window
        if self.body < 1:
            raise ValueError(f"--seq-len {seq_len} is too short")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.sampler = WindowSampler(self.train, self.body, batch_size, seed)
        self.retrieval_share = float(retrieval_share)
        if self.retrieval_share > 0:
            self.sampler = self._retrieval_mix(tokenizer, seed)

    def _retrieval_mix(self, tokenizer, seed: int):
        from ..eval.needle_mix import NeedleMixSampler
        from ..eval.tokenizer import TextTokenizer

        if tokenizer is None:
            raise ValueError("--retrieval-share needs the base model's tokenizer")
        tok = TextTokenizer.from_hf(tokenizer)
        tok.__dict__["prefix_ids"] = []  # the windows get their BOS from with_bos(), not from the needle generator
        stream = [int(t) for t in self.train.window(0, min(len(self.train), 200_000))]  # haystack: train text
        haystack = [tok.decode(stream[i:i + 512]) for i in range(0, len(stream), 512)]
        return NeedleMixSampler(self.sampler, tok, haystack, share=self.retrieval_share, seed=seed, max_needles=6,
                                eos_id=tok.eos_id if tok.eos_id is not None else 0)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return with_bos(*self.sampler.batch(step), self.bos_id)

    def val_batches(self, max_tokens: int, batch_size: int | None = None):
        from ..data.loader import eval_batches

        for x, y in eval_batches(self.val, self.body, batch_size or self.batch_size, max_tokens):
            yield with_bos(x, y, self.bos_id)

    def calibration_windows(self, n_tokens: int, seq_len: int) -> list[torch.Tensor]:
        """Deterministic windows from the *train* split (adaptation text) for head calibration."""
        from ..data.loader import eval_batches

        body = seq_len - (1 if self.bos_id is not None else 0)
        out = []
        for x, y in eval_batches(self.train, body, 1, max(n_tokens, body)):
            out.append(with_bos(x, y, self.bos_id)[0])
        return out

    def describe(self) -> dict:
        return {"dir": str(self.dir), "train_tokens": len(self.train), "val_tokens": len(self.val),
                "index_sources": json.loads((self.dir / "index.json").read_text()).get("sources", [])}
