"""Token shard directories (format ``diffattn-shards-v1``, the contract with the loader):

```
DIR/index.json      {"format": "diffattn-shards-v1", "dtype": "uint16"|"uint32", "vocab_size", "eos_id",
                     "tokenizer": "tokenizer.json", "content_hash",
                     "splits": {"train": [{"file", "tokens", "sha256"}, ...], "val": [...]},
                     "documents": {"train", "val"}, "sources": [...], "tokens": {"train", "val"}, ...}
DIR/train-00000.bin raw little-endian token ids; documents concatenated, each followed by eos_id
DIR/val-00000.bin   (uint16 when vocab_size <= 65536, else uint32); a document never straddles files
DIR/tokenizer.json  HF tokenizers file
DIR/manifest.json   per-source provenance (written by ``prepare``)
```

``write_shards`` writes one atomically (temporary sibling directory + rename). Other engineers'
tests use it with token-id lists and no real tokenizer: a stand-in *id tokenizer* (WordLevel, token
``<i>`` for id i, EOS ``<|endoftext|>``) is then saved so the directory is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..fsutil import make_tempdir, read_json, replace_dir

FORMAT = "diffattn-shards-v1"
DEFAULT_SHARD_TOKENS = 100_000_000
EOS = "<|endoftext|>"


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def id_tokenizer(vocab_size: int, eos_id: int):
    """A WordLevel tokenizer over tokens ``<0> .. <V-1>`` (EOS spelled ``<|endoftext|>``)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {(EOS if i == eos_id else f"<{i}>"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(EOS, special=True)])
    return tok


def _is_shard_dir(path: Path) -> bool:
    try:
        return json.loads((path / "index.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _write_split(dirpath: Path, split: str, docs: Iterable[Sequence[int]], dtype: str, vocab_size: int,
                 eos_id: int, shard_tokens: int) -> tuple[list[dict], int]:
    entries: list[dict] = []
    le = np.dtype(dtype).newbyteorder("<")
    state = {"f": None, "h": None, "n": 0}

    def close():
        if state["f"] is not None:
            state["f"].close()
            entries[-1].update(tokens=state["n"], sha256=state["h"].hexdigest())
            state["f"] = None

    def open_next():
        close()
        name = f"{split}-{len(entries):05d}.bin"
        entries.append({"file": name, "tokens": 0, "sha256": ""})
        state.update(f=open(dirpath / name, "wb"), h=hashlib.sha256(), n=0)

    n_docs = 0
    for doc in docs:
        arr = np.asarray(doc, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(f"{split} document {n_docs}: token id out of range [0, {vocab_size})")
        arr = np.concatenate([arr, np.array([eos_id], dtype=np.int64)]).astype(le)
        if state["f"] is None or (state["n"] and state["n"] + arr.size > shard_tokens):
            open_next()
        data = arr.tobytes()
        state["f"].write(data)
        state["h"].update(data)
        state["n"] += arr.size
        n_docs += 1
    close()
    return entries, n_docs


def write_shards(out_dir: str | os.PathLike, train_docs: Iterable[Sequence[int]], val_docs: Iterable[Sequence[int]],
                 tokenizer=None, *, vocab_size: int | None = None, eos_id: int | None = None,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, content_hash: str | None = None,
                 sources: list | None = None, extra: dict | None = None, extra_files: dict[str, str] | None = None,
                 overwrite: bool = False) -> dict:
    """Write a shard directory from token-id sequences (one per document); returns the index.

    ``tokenizer``: a ``tokenizers.Tokenizer``, a path to a tokenizer.json, or None (then
    ``vocab_size`` and ``eos_id`` are required and an id tokenizer is saved). ``vocab_size``
    defaults to the tokenizer's id space, ``eos_id`` to the id of ``<|endoftext|>``.
    ``content_hash`` defaults to a hash of the shard contents. ``extra`` adds index keys,
    ``extra_files`` adds text files (e.g. manifest.json). An existing ``out_dir`` is refused unless
    ``overwrite`` and it is a shard directory (then it is replaced).
    """
    from tokenizers import Tokenizer

    out = Path(out_dir)
    if out.exists() and not (overwrite and _is_shard_dir(out)) and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder or a shard folder to overwrite")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.from_file(str(tokenizer))
    if tokenizer is None:
        if vocab_size is None or eos_id is None:
            raise ValueError("write_shards without a tokenizer needs vocab_size and eos_id")
        tokenizer = id_tokenizer(vocab_size, eos_id)
    if vocab_size is None:
        vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    if eos_id is None:
        eos_id = tokenizer.token_to_id(EOS)
        if eos_id is None:
            raise ValueError(f"tokenizer has no {EOS} token: pass eos_id")
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside [0, {vocab_size})")
    if shard_tokens < 1:
        raise ValueError("shard_tokens must be >= 1")
    dtype = dtype_for(vocab_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tempdir(out.parent, out.name)
    try:
        train, n_train = _write_split(tmp, "train", train_docs, dtype, vocab_size, eos_id, shard_tokens)
        val, n_val = _write_split(tmp, "val", val_docs, dtype, vocab_size, eos_id, shard_tokens)
        tokenizer.save(str(tmp / "tokenizer.json"))
        if content_hash is None:
            content_hash = hashlib.sha256(json.dumps([train, val, vocab_size, eos_id]).encode()).hexdigest()
        index = {"format": FORMAT, "dtype": dtype, "vocab_size": int(vocab_size), "eos_id": int(eos_id),
                 "tokenizer": "tokenizer.json", "content_hash": content_hash,
                 "splits": {"train": train, "val": val}, "documents": {"train": n_train, "val": n_val},
                 "tokens": {"train": sum(e["tokens"] for e in train), "val": sum(e["tokens"] for e in val)},
                 "sources": list(sources or []), **(extra or {})}
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        replace_dir(tmp, out)  # fsyncs every shard, then the rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def read_index(shard_dir: str | os.PathLike) -> dict:
    """The parsed index.json of a shard directory (ValueError naming the file if it is not one)."""
    return read_json(Path(shard_dir) / "index.json", format=FORMAT, format_error=f"not a {FORMAT} index",
                     missing="no index.json (not a shard directory; run `diffattn data prepare`)")


def verify(shard_dir: str | os.PathLike, checksums: bool = True) -> bool:
    """True if every file the index names exists with the right size (and sha256)."""
    d = Path(shard_dir)
    try:
        index = read_index(d)
    except (OSError, ValueError):
        return False
    itemsize = np.dtype(index["dtype"]).itemsize
    if not (d / index["tokenizer"]).is_file():
        return False
    for entries in index["splits"].values():
        for e in entries:
            f = d / e["file"]
            if not f.is_file() or f.stat().st_size != e["tokens"] * itemsize:
                return False
            if checksums:
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
                if h.hexdigest() != e["sha256"]:
                    return False
    return True


def load_tokenizer(shard_dir: str | os.PathLike, hf: bool = False):
    """The tokenizer of a shard directory: a ``tokenizers.Tokenizer``, or with ``hf=True`` a
    ``transformers.PreTrainedTokenizerFast`` whose ``eos_token`` is the index's EOS."""
    d = Path(shard_dir)
    index = read_index(d)
    path = d / index["tokenizer"]
    if not hf:
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(path))
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    tok.eos_token = tok.convert_ids_to_tokens(index["eos_id"])
    return tok


def read_tokens(shard_dir: str | os.PathLike, split: str) -> np.ndarray:
    """All tokens of a split as one array (small data / tests; the loader memory-maps instead)."""
    d = Path(shard_dir)
    index = read_index(d)
    parts = [np.fromfile(d / e["file"], dtype=np.dtype(index["dtype"]).newbyteorder("<"))
             for e in index["splits"][split]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=index["dtype"])
