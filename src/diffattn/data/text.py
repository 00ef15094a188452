"""Decoding and normalising text files for the corpus (docs/data.md, "Encodings").

Decoding rule, applied per file (per JSONL file for JSONL), decided once for every source:

1. A file that starts with a UTF-8/UTF-16 byte-order mark is decoded with that codec.
2. A file with a NUL byte, or a known binary signature (PNG, JPEG, GIF, PDF, zip, gzip, ELF, ...),
   is binary: ``BinaryFileError``.
3. Strict UTF-8 is tried first (nearly every source is UTF-8).
4. Otherwise strict cp1252 (Windows Western European; a superset of printable Latin-1, used by the
   BBC news files: ``£`` = 0xA3). A file is accepted as cp1252 only if it decodes strictly (the five
   bytes cp1252 leaves undefined are refused) and the result has no C0 control characters other
   than tab/newline/carriage return/form feed; more than 2% of other control characters means
   binary. Anything else is ``EncodingError`` ("neither UTF-8 nor cp1252").

Normalisation (``normalize``): Unicode NFC, newlines to ``\\n``, no-break spaces to spaces, other
control characters and a leading BOM removed, trailing spaces stripped from every line, runs of
blank lines collapsed to one, leading/trailing blank space stripped. ``strip_markup`` turns OSIS/XML
fragments (the World English Bible) into plain text: footnotes dropped, tags removed, entities
unescaped.
"""

from __future__ import annotations

import html
import re
import unicodedata
from pathlib import Path

_BINARY_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"%PDF", b"PK\x03\x04", b"\x1f\x8b", b"\x7fELF", b"BZh",
                 b"\xfd7zXZ", b"(\xb5/\xfd", b"\x00asm", b"RIFF", b"OggS", b"ID3", b"\x28\xb5\x2f\xfd")
_ALLOWED_CONTROLS = {"\t", "\n", "\r", "\f"}
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


class BinaryFileError(ValueError):
    """The file is not text."""


class EncodingError(ValueError):
    """The file is neither UTF-8 nor cp1252 text."""


def decode_bytes(data: bytes, name: str = "<bytes>") -> tuple[str, str]:
    """Decode file contents by the rule in the module docstring: ``(text, encoding)``."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="strict"), "utf-8-sig"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            raise EncodingError(f"{name}: has a UTF-16 byte-order mark but is not valid UTF-16") from None
    if b"\x00" in data or data.startswith(_BINARY_MAGIC):
        raise BinaryFileError(f"{name}: is a binary file, not text")
    try:
        text, enc = data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as e:
        try:
            text, enc = data.decode("cp1252"), "cp1252"
        except UnicodeDecodeError:
            raise EncodingError(f"{name}: is neither UTF-8 (invalid byte at offset {e.start}) nor cp1252 text") from None
    n_ctrl = len(_CONTROL_RE.findall(text))
    if n_ctrl and n_ctrl > 0.02 * len(text):
        raise BinaryFileError(f"{name}: is a binary file, not text ({n_ctrl} control characters)")
    if enc == "cp1252" and n_ctrl:
        raise EncodingError(f"{name}: is neither UTF-8 nor cp1252 text (control characters after cp1252 decoding)")
    return text, enc


def read_text(path: str | Path) -> str:
    """Read and decode a text file by the rule above (not normalised)."""
    path = Path(path)
    return decode_bytes(path.read_bytes(), str(path))[0]


_BLANKS_RE = re.compile(r"\n{3,}")
_TRAILING_RE = re.compile(r"[ \t]+\n")


def normalize(text: str) -> str:
    """Canonical form of a document (see module docstring)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    text = text.lstrip("\ufeff").replace("\u00a0", " ")
    text = _CONTROL_RE.sub("", text)
    text = unicodedata.normalize("NFC", text)
    text = _TRAILING_RE.sub("\n", text + "\n")
    return _BLANKS_RE.sub("\n\n", text).strip()


_NOTE_RE = re.compile(r"<note\b[^>]*>.*?</note>|<note\b[^>]*/>", re.S)
_NOTE_BEFORE_PUNCT_RE = re.compile(r"\x01+(?=[\s,.;:!?\u2019\u201d)\]]|$)")
_TAG_RE = re.compile(r"<[^>]+>|<[^>]*$")  # a tag cut off at the end of a fragment too
_SPACES_RE = re.compile(r"[ \t]{2,}")


def strip_markup(fragment: str) -> str:
    """Plain text of an OSIS/XML/HTML fragment: notes dropped, tags removed, entities unescaped."""
    # a footnote between two words separates them ("God<note>..</note><w>created"): keep a space
    # there, but none before punctuation or an existing space
    fragment = _NOTE_RE.sub("\x01", fragment)
    fragment = _TAG_RE.sub("", fragment)
    fragment = _NOTE_BEFORE_PUNCT_RE.sub("", fragment).replace("\x01", " ")
    fragment = html.unescape(fragment)
    return _SPACES_RE.sub(" ", fragment).strip()
