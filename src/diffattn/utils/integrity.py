"""Checksums of the files of a directory: ``checksums.json`` (sha256 and size of each file).

Written last into a checkpoint directory (after every other file is complete and fsynced), so a
directory with a ``checksums.json`` has a record of every byte that was meant to be there.
:func:`verify_checksums` re-hashes the files and raises :class:`~diffattn.utils.errors.CorruptFileError`
naming the first file that is missing, truncated or changed. Format::

    {"format": "diffattn-checksums-v1", "algorithm": "sha256",
     "files": {"model.safetensors": {"sha256": "<hex>", "bytes": 12345}, ...}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..fsutil import sha256_file  # noqa: F401 (the one file hasher; re-exported here)
from .errors import CorruptFileError

CHECKSUMS_NAME = "checksums.json"
CHECKSUMS_FORMAT = "diffattn-checksums-v1"


def write_checksums(directory: str | os.PathLike, names: list[str] | None = None) -> Path:
    """Hash ``names`` (default: every plain file except checksums.json) and write ``checksums.json``
    (fsynced). Returns its path."""
    directory = Path(directory)
    if names is None:
        names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != CHECKSUMS_NAME)
    files = {name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
             for name in names}
    path = directory / CHECKSUMS_NAME
    with open(path, "w") as fh:
        fh.write(json.dumps({"format": CHECKSUMS_FORMAT, "algorithm": "sha256", "files": files}, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return path


def read_checksums(directory: str | os.PathLike) -> dict[str, dict] | None:
    """The ``files`` table of ``DIR/checksums.json``; None when the directory has none (older writers)."""
    path = Path(directory) / CHECKSUMS_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(path, f"not valid JSON ({e})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if (not isinstance(data, dict) or data.get("format") != CHECKSUMS_FORMAT or not isinstance(files, dict)
            or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                       for v in files.values())):
        raise CorruptFileError(path, f"not a {CHECKSUMS_FORMAT} file")
    return files


def verify_file(directory: str | os.PathLike, name: str, files: dict[str, dict] | None = None) -> None:
    """Check one file of ``directory`` against its checksums.json entry (no-op without checksums.json)."""
    directory = Path(directory)
    files = read_checksums(directory) if files is None else files
    if files is None or name not in files:
        return
    path, entry = directory / name, files[name]
    if not path.is_file():
        raise CorruptFileError(path, "missing (listed in checksums.json)")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CorruptFileError(path, f"{size} bytes, checksums.json says {entry['bytes']} (truncated or overwritten)")
    if sha256_file(path) != entry["sha256"]:
        raise CorruptFileError(path, "sha256 does not match checksums.json (the file is corrupt)")


def verify_checksums(directory: str | os.PathLike) -> bool:
    """Verify every file listed in ``DIR/checksums.json``. Returns False when there is no
    checksums.json (nothing to verify), True when all match; raises CorruptFileError otherwise."""
    files = read_checksums(directory)
    if files is None:
        return False
    for name in sorted(files):
        verify_file(directory, name, files)
    return True


__all__ = ["CHECKSUMS_NAME", "sha256_file", "write_checksums", "read_checksums", "verify_file", "verify_checksums"]
