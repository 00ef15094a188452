"""The one home of file I/O helpers: atomic files and directories, JSON reading, file hashing.

Atomic writes go into a temporary sibling, are fsynced, then renamed into place, and the parent
directory is fsynced so the rename itself survives a power cut. An interrupted or failing writer never
leaves a half-written file or directory at the target: either the old one (if any) or the complete new
one is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def file_in_dir(directory: str | os.PathLike, name: str, *, missing: str, not_dir: str, no_file: str) -> Path:
    """``directory/name``, after checking that ``directory`` exists, is a directory and holds that file; else a
    one-line FileNotFoundError / NotADirectoryError with the given message (``{dir}``, ``{path}`` filled in)."""
    directory = Path(directory)
    path = directory / name
    if not directory.exists():
        raise FileNotFoundError(missing.format(dir=directory, path=path))
    if not directory.is_dir():
        raise NotADirectoryError(not_dir.format(dir=directory, path=path))
    if not path.is_file():
        raise FileNotFoundError(no_file.format(dir=directory, path=path))
    return path


def read_json(path: str | os.PathLike, *, missing: str | None = None, format: str | None = None,
              format_error: str | None = None):
    """Parse a JSON file; malformed content raises ``ValueError("<path>: not valid JSON (...)")``.

    A missing file raises FileNotFoundError: ``"<path>: <missing>"`` when ``missing`` is given, else the usual
    one, so callers can word that case themselves. With ``format``, the content must be an object whose
    ``"format"`` is that string (else ``ValueError("<path>: <format_error or 'format is not ...'>")``).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if missing is None:
            raise
        raise FileNotFoundError(f"{path}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if format is not None and (not isinstance(data, dict) or data.get("format") != format):
        raise ValueError(f"{path}: {format_error or f'format is not {format!r}'}")
    return data


def sha256_file(path: str | os.PathLike) -> str:
    """Lowercase hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so that renames inside it are durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_tempdir(parent: str | os.PathLike, name: str) -> Path:
    """A fresh hidden directory ``.NAME.tmp-*`` in ``parent`` for atomic writes, with the permissions a plain
    ``mkdir`` would give (``tempfile.mkdtemp`` makes it 0700)."""
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return Path(tmp)


def jsonl_records(text: str, path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, parsed record) for each non-blank line of JSON Lines ``text``; a bad line raises
    ``ValueError("<path> line N: not valid JSON (...)")``."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling (fsynced, then renamed over ``path``): a reader or
    a killed writer never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def replace_dir(tmp: Path, target: Path) -> None:
    """fsync every file of the finished ``tmp`` and move it to ``target`` (replacing an existing dir, which is
    moved aside first and deleted after), then fsync the parent directory."""
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    for f in sorted(tmp.rglob("*")):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_directory(out) as tmp:`` write into ``tmp``; on success it becomes ``out``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tempdir(target.parent, target.name)
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
