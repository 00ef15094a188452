"""One tokenizer interface for the evaluation tasks, over ``tokenizers.Tokenizer`` and HF tokenizers.

Tasks build prompts from text pieces and need exact token counts, so they always encode *without*
special tokens and prepend :attr:`TextTokenizer.prefix_ids` themselves: the special tokens the
tokenizer would put in front of a text (e.g. Llama's BOS), found by encoding a probe string both
ways. A diffattn checkpoint's ``tokenizer.json`` usually has none.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Sequence

from ..fsutil import sha256_file

_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "<|im_end|>", "[EOS]", "<|end|>")


class TextTokenizer:
    """``encode`` (no special tokens), ``decode``, ``prefix_ids``, ``eos_id``, ``newline_ids``."""

    def __init__(self, backend, *, source: str | None = None, file_sha256: str | None = None):
        self.backend = backend
        self.source = source
        self._file_sha256 = file_sha256
        self.is_hf = not _is_raw(backend)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TextTokenizer":
        from tokenizers import Tokenizer

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p}")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises its own exception type
            raise ValueError(f"{p}: cannot load tokenizer ({str(e).splitlines()[0] if str(e) else e})") from None
        return cls(tok, source=str(p.resolve()), file_sha256=sha256_file(p))

    @classmethod
    def from_hf(cls, tok, source: str | None = None) -> "TextTokenizer":
        sha = None
        if source and (Path(source) / "tokenizer.json").is_file():
            sha = sha256_file(Path(source) / "tokenizer.json")
        return cls(tok, source=source, file_sha256=sha)

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        if self.is_hf:
            return list(self.backend(text, add_special_tokens=False, verbose=False)["input_ids"])
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.is_hf:
            return [list(x) for x in self.backend(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]
        return [list(e.ids) for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.is_hf:
            return self.backend.decode(ids, skip_special_tokens=True)
        return self.backend.decode(ids, skip_special_tokens=True)

    @cached_property
    def prefix_ids(self) -> list[int]:
        """Special tokens the tokenizer puts before a text by default (BOS), or []."""
        probe = "Hello world"
        plain = self.encode(probe)
        if self.is_hf:
            full = list(self.backend(probe)["input_ids"])
        else:
            full = list(self.backend.encode(probe, add_special_tokens=True).ids)
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start]
        return []

    @cached_property
    def vocab_size(self) -> int:
        if self.is_hf:
            return len(self.backend)
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    @cached_property
    def eos_id(self) -> int | None:
        if self.is_hf and self.backend.eos_token_id is not None:
            return int(self.backend.eos_token_id)
        for name in _EOS_NAMES:
            tid = self._token_to_id(name)
            if tid is not None:
                return tid
        return None

    def _token_to_id(self, token: str) -> int | None:
        if self.is_hf:
            tid = self.backend.convert_tokens_to_ids(token)
            unk = getattr(self.backend, "unk_token_id", None)
            return None if tid is None or (unk is not None and tid == unk and token != self.backend.unk_token) else int(tid)
        tid = self.backend.token_to_id(token)
        return None if tid is None else int(tid)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        if self.is_hf:
            return frozenset(int(i) for i in self.backend.all_special_ids)
        return frozenset(int(i) for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    @cached_property
    def newline_ids(self) -> frozenset[int]:
        """Every token whose text contains a newline (used as a stop condition)."""
        out = set()
        for i in range(self.vocab_size):
            if i in self.special_ids:
                continue
            try:
                if "\n" in self.decode([i]):
                    out.add(i)
            except Exception:  # ids without a decodable piece
                continue
        return frozenset(out)

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict:
        return {"source": self.source, "kind": "hf" if self.is_hf else "tokenizers", "vocab_size": self.vocab_size,
                "sha256": self.sha256, "prefix_ids": self.prefix_ids, "eos_id": self.eos_id}

    @cached_property
    def sha256(self) -> str:
        """sha256 of tokenizer.json when there is one, else of the serialised vocabulary."""
        if self._file_sha256:
            return self._file_sha256
        if self.is_hf:
            vocab = self.backend.get_vocab()
        else:
            vocab = self.backend.get_vocab(with_added_tokens=True)
        return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()


def _is_raw(backend) -> bool:
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(backend, Tokenizer)


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False) -> TextTokenizer:
    """A tokenizer from a ``tokenizer.json`` file, a diffattn model dir, or an HF model/tokenizer dir."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":  # the tokenizer embedded in a GGUF file
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        except Exception as e:
            raise ValueError(f"{p}: cannot load the GGUF tokenizer ({str(e).splitlines()[0] if str(e) else e})") from None
        return TextTokenizer.from_hf(tok, source=str(p.resolve()))
    if p.is_file():
        return TextTokenizer.from_file(p)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer not found: {p}")
    cfg = p / "config.json"
    is_diffattn = False
    if cfg.is_file():
        try:
            is_diffattn = json.loads(cfg.read_text()).get("model_type") == "diffattn"
        except (json.JSONDecodeError, UnicodeDecodeError):
            is_diffattn = False
    if is_diffattn or not any((p / n).is_file() for n in ("tokenizer_config.json", "tokenizer.model", "vocab.json")):
        if (p / "tokenizer.json").is_file():
            return TextTokenizer.from_file(p / "tokenizer.json")
        raise FileNotFoundError(f"no tokenizer.json in {p} (pass --tokenizer FILE_OR_DIR)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except Exception as e:
        if (p / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast(tokenizer_file=str(p / "tokenizer.json"))
        else:
            raise ValueError(f"{p}: cannot load the tokenizer ({str(e).splitlines()[0] if str(e) else e})") from None
    return TextTokenizer.from_hf(tok, source=str(p.resolve()))


__all__ = ["TextTokenizer", "load_tokenizer"]
