"""Tokenizer files next to a model, so that ``AutoTokenizer.from_pretrained(DIR)`` works.

diffattn checkpoints carry a bare ``tokenizer.json`` (HF ``tokenizers`` format). transformers can load
it alone, but then knows no special tokens; tools such as lm-evaluation-harness need an EOS. When a
directory has ``tokenizer.json`` and no ``tokenizer_config.json``, conversions write one naming the
generic fast tokenizer class and the EOS/BOS/PAD strings: from the model config's ``*_token_id`` when
given, else EOS is the special token ``<|endoftext|>`` (the one diffattn's data pipeline uses) or the
tokenizer's only special token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..fsutil import read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
DEFAULT_EOS = "<|endoftext|>"


def _tokenizer_json(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a tokenizers JSON file")
    return data


def special_tokens(tokenizer_json: Path) -> dict[str, int]:
    """Special added tokens of a tokenizer.json: content -> id."""
    return {t["content"]: t["id"] for t in _tokenizer_json(tokenizer_json).get("added_tokens") or []
            if t.get("special")}


def token_strings(tokenizer_json: Path) -> dict[int, str]:
    """id -> token string for the added tokens and a dict vocabulary (BPE / WordLevel / WordPiece)."""
    data = _tokenizer_json(tokenizer_json)
    vocab = (data.get("model") or {}).get("vocab")
    out = {i: s for s, i in vocab.items()} if isinstance(vocab, dict) else {}
    out.update({t["id"]: t["content"] for t in data.get("added_tokens") or []})
    return out


def special_token_ids(src: Path, config_json: dict) -> dict[str, int | None]:
    """bos/eos/pad ids from a model config, else EOS guessed from src/tokenizer.json (see module doc)."""
    ids = {k: config_json.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    for k, v in ids.items():
        if isinstance(v, list):  # some configs list several EOS ids; the first is the canonical one
            ids[k] = v[0] if v else None
    if ids["eos_token_id"] is None and (src / "tokenizer.json").is_file():
        specials = special_tokens(src / "tokenizer.json")
        if DEFAULT_EOS in specials:
            ids["eos_token_id"] = specials[DEFAULT_EOS]
        elif len(specials) == 1:
            ids["eos_token_id"] = next(iter(specials.values()))
    return ids


def tokenizer_config(tokenizer_json: Path, *, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                     max_len: int | None = None) -> dict:
    strings = token_strings(tokenizer_json)
    cfg: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if max_len is not None:
        cfg["model_max_length"] = max_len
    for name, tid in (("bos_token", bos_token_id), ("eos_token", eos_token_id), ("pad_token", pad_token_id)):
        if tid is not None and tid in strings:
            cfg[name] = strings[tid]
    return cfg


def copy_tokenizer(src: Path, dst: Path, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                   pad_token_id: int | None = None, max_len: int | None = None) -> list[str]:
    """Copy the tokenizer files of ``src`` to ``dst``; add tokenizer_config.json when only tokenizer.json exists."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if "tokenizer.json" in copied and "tokenizer_config.json" not in copied:
        cfg = tokenizer_config(src / "tokenizer.json", bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id, max_len=max_len)
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        copied.append("tokenizer_config.json")
    return copied


def load_tokenizer(directory: str | Path):
    """``AutoTokenizer.from_pretrained(directory)`` with the special tokens of the rule above filled in."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    tok = AutoTokenizer.from_pretrained(str(directory))
    if (directory / "tokenizer_config.json").is_file() or not (directory / "tokenizer.json").is_file():
        return tok
    config_json = {}
    if (directory / "config.json").is_file():
        try:
            config_json = json.loads((directory / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            config_json = {}
    cfg = tokenizer_config(directory / "tokenizer.json", **special_token_ids(directory, config_json))
    for name in ("bos_token", "eos_token", "pad_token"):
        if name in cfg and getattr(tok, name) is None:
            setattr(tok, name, cfg[name])
    return tok


__all__ = ["TOKENIZER_FILES", "copy_tokenizer", "load_tokenizer", "special_token_ids", "special_tokens",
           "token_strings", "tokenizer_config"]
