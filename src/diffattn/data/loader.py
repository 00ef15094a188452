"""Deterministic training windows over token shards (the loader half of issue #3).

Reads the shard directory contract ``diffattn-shards-v1`` written by ``diffattn data prepare``
(``index.json`` + raw little-endian ``uint16``/``uint32`` token files, documents concatenated, each
followed by ``eos_id``; see docs/data.md) and serves

* :class:`TokenShards` — one split memory-mapped as a single logical token array;
* :class:`WindowSampler` — training batches of fixed-length windows at uniformly random offsets
  (nanoGPT-style: windows may cross document boundaries, which the EOS separators mark). The global
  batch of optimizer step ``s`` is a pure function of ``(seed, s)``: a ``torch.Generator`` is seeded
  from a hash of the pair, so nothing carries over between steps. Ranks and gradient-accumulation
  micro-steps take disjoint contiguous slices of that one global batch, which is why a resumed run,
  an N-process DDP/FSDP run and a 1-process run with gradient accumulation all see the same tokens
  as one uninterrupted process;
* :func:`eval_batches` — non-overlapping validation windows from the start of the split, in order.

Inputs are ``x = tokens[o : o+T]`` and targets ``y = tokens[o+1 : o+T+1]`` (int64).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..fsutil import file_in_dir, read_json, sha256_file

SHARD_FORMAT = "diffattn-shards-v1"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
SPLITS = ("train", "val")


class TokenShards:
    """The token files of one split (``"train"`` or ``"val"``) of a shard directory, memory-mapped.

    ``len(shards)`` is the total number of tokens; ``shards.window(start, length)`` returns a copy of
    ``length`` consecutive tokens (as int64), reading across file boundaries. Raises ``ValueError``
    naming the file for a missing/invalid ``index.json`` or a token file whose size disagrees with
    the index, and ``FileNotFoundError`` for a missing directory or token file.
    """

    def __init__(self, directory: str | os.PathLike, split: str = "train"):
        self.dir = Path(directory)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        self.split = split
        self.index = read_shard_index(self.dir)
        self.dtype = _DTYPES[self.index["dtype"]]
        self.vocab_size: int = self.index["vocab_size"]
        self.eos_id: int = self.index["eos_id"]
        self._arrays: list[np.memmap] = []
        offsets = [0]
        for entry in self.index["splits"][split]:
            path = self.dir / entry["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: token file listed in index.json is missing")
            size = path.stat().st_size
            if size != entry["tokens"] * self.dtype.itemsize:
                raise ValueError(f"{path}: {size} bytes, but index.json says {entry['tokens']} tokens of "
                                 f"{self.index['dtype']} ({entry['tokens'] * self.dtype.itemsize} bytes)")
            if entry["tokens"] == 0:
                continue  # np.memmap cannot map an empty file
            self._arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
            offsets.append(offsets[-1] + entry["tokens"])
        self._offsets = np.asarray(offsets, dtype=np.int64)  # start of each array in the logical stream

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def tokenizer_file(self) -> Path | None:
        """The shard directory's tokenizer.json, or None when the index names none that exists."""
        name = self.index.get("tokenizer")
        path = self.dir / name if isinstance(name, str) else None
        return path if path is not None and path.is_file() else None

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split as an int64 array (a copy)."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside the {len(self)} tokens of split {self.split!r}")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        done = 0
        while done < length:
            arr = self._arrays[i]
            lo = start + done - int(self._offsets[i])
            n = min(length - done, len(arr) - lo)
            out[done:done + n] = arr[lo:lo + n]
            done += n
            i += 1
        return out

    def verify(self) -> None:
        """Check every token file against the sha256 recorded in index.json (reads all data)."""
        for entry in self.index["splits"][self.split]:
            path = self.dir / entry["file"]
            digest = sha256_file(path)
            if "sha256" in entry and digest != entry["sha256"]:
                raise ValueError(f"{path}: sha256 {digest} does not match index.json ({entry['sha256']})")


def read_shard_index(directory: str | os.PathLike) -> dict:
    """Read and validate ``DIR/index.json`` (format ``diffattn-shards-v1``); errors name the file."""
    directory = Path(directory)
    path = file_in_dir(directory, "index.json", missing="data directory not found: {dir}",
                       not_dir="data path is not a directory: {dir}",
                       no_file="{path}: no index.json (prepare the data with `diffattn data prepare --out {dir}`)")
    index = read_json(path)

    def bad(msg: str) -> ValueError:
        return ValueError(f"{path}: {msg}")

    if not isinstance(index, dict):
        raise bad("expected a JSON object")
    if index.get("format") != SHARD_FORMAT:
        raise bad(f"format is {index.get('format')!r}, expected {SHARD_FORMAT!r}")
    if index.get("dtype") not in _DTYPES:
        raise bad(f"dtype is {index.get('dtype')!r}, expected one of {', '.join(_DTYPES)}")
    for key in ("vocab_size", "eos_id"):
        value = index.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(f"{key} must be a non-negative integer, got {value!r}")
    if index["vocab_size"] < 1 or index["eos_id"] >= index["vocab_size"]:
        raise bad(f"eos_id {index['eos_id']} is not below vocab_size {index['vocab_size']}")
    if index["dtype"] == "uint16" and index["vocab_size"] > 1 << 16:
        raise bad(f"vocab_size {index['vocab_size']} does not fit dtype uint16")
    splits = index.get("splits")
    if not isinstance(splits, dict):
        raise bad("'splits' must be an object with 'train' and 'val' lists")
    for split in SPLITS:
        entries = splits.get(split)
        if not isinstance(entries, list):
            raise bad(f"splits.{split} must be a list of {{file, tokens, sha256}}")
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise bad(f"splits.{split}: every entry needs a 'file' name")
            name = entry["file"]
            if Path(name).name != name or name in ("", ".", ".."):
                raise bad(f"splits.{split}: file {name!r} must be a plain file name inside the directory")
            tokens = entry.get("tokens")
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                raise bad(f"splits.{split}: {name}: tokens must be a non-negative integer, got {tokens!r}")
    return index


def _step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from (seed, step): counter-based, so every step is independent."""
    digest = hashlib.blake2b(f"diffattn-window-v1:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class WindowSampler:
    """Training batches of ``seq_len``-token windows, a pure function of ``(seed, step)``.

    ``batch(step, rank, world_size, micro, n_micro)`` returns ``(x, y)`` of shape
    ``(global_batch // (world_size * n_micro), seq_len)``: slice number ``rank * n_micro + micro``
    of the step's global batch. ``global_batch`` must be divisible by ``world_size * n_micro``.
    """

    def __init__(self, shards: TokenShards, seq_len: int, global_batch: int, seed: int):
        if seq_len < 1 or global_batch < 1:
            raise ValueError(f"seq_len and global_batch must be positive, got {seq_len}, {global_batch}")
        self.n_starts = len(shards) - seq_len  # window = seq_len + 1 tokens (inputs and shifted targets)
        if self.n_starts < 1:
            raise ValueError(f"{shards.dir}: split {shards.split!r} has {len(shards)} tokens, "
                             f"fewer than seq_len + 1 = {seq_len + 1}")
        self.shards, self.seq_len, self.global_batch, self.seed = shards, seq_len, global_batch, seed

    def starts(self, step: int) -> torch.Tensor:
        """Window offsets (global_batch,) of the global batch of ``step``."""
        g = torch.Generator().manual_seed(_step_seed(self.seed, step))
        return torch.randint(0, self.n_starts, (self.global_batch,), generator=g)

    def batch(self, step: int, rank: int = 0, world_size: int = 1, micro: int = 0, n_micro: int = 1):
        parts = world_size * n_micro
        if self.global_batch % parts:
            raise ValueError(f"global batch {self.global_batch} is not divisible by world_size*grad_accum = {parts}")
        if not (0 <= rank < world_size and 0 <= micro < n_micro):
            raise ValueError(f"rank {rank} / micro {micro} out of range for world_size {world_size}, n_micro {n_micro}")
        per = self.global_batch // parts
        chunk = rank * n_micro + micro
        starts = self.starts(step)[chunk * per:(chunk + 1) * per]
        rows = np.stack([self.shards.window(int(s), self.seq_len + 1) for s in starts])
        xy = torch.from_numpy(rows)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


def eval_batches(shards: TokenShards, seq_len: int, batch_size: int, max_tokens: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches: windows ``i·seq_len .. (i+1)·seq_len`` (+1 target token) from the start of the
    split, in order, so every token is predicted at most once; at most ``max_tokens`` predicted tokens
    (at least one window). The last batch may be smaller than ``batch_size``."""
    n = (len(shards) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{shards.dir}: split {shards.split!r} has {len(shards)} tokens, "
                         f"fewer than seq_len + 1 = {seq_len + 1}")
    if max_tokens is not None:
        n = max(1, min(n, max_tokens // seq_len))
    for lo in range(0, n, batch_size):
        rows = np.stack([shards.window(i * seq_len, seq_len + 1) for i in range(lo, min(n, lo + batch_size))])
        xy = torch.from_numpy(rows)
        yield xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


def n_eval_windows(shards: TokenShards, seq_len: int, max_tokens: int | None = None) -> int:
    """How many windows :func:`eval_batches` yields in total."""
    n = max(0, (len(shards) - 1) // seq_len)
    return n if max_tokens is None or n == 0 else max(1, min(n, max_tokens // seq_len))


__all__ = ["TokenShards", "WindowSampler", "eval_batches", "n_eval_windows", "read_shard_index", "SHARD_FORMAT"]
