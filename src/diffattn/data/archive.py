"""Safe extraction of the archives that registry clients hand us: tar (.tar.gz/.tgz, npm packs and
sdists), zip (wheels) and Debian .deb (an ``ar`` archive holding ``data.tar.*``).

Every archive is extracted into a fresh temporary directory beside the target and renamed into
place only when all of it was extracted, so a refused or broken archive leaves nothing behind.
Refused (``UnsafeArchiveError``, a ``ValueError`` naming the member):

- absolute member names (``/etc/passwd``, ``C:\\x``) and names with a ``..`` component;
- symbolic or hard links whose target, resolved on disk (``os.path.realpath``, so links through
  earlier links are followed), lies outside the target directory;
- device files and FIFOs;
- regular files whose parent directory resolves (through an earlier link) outside the target.

Links that stay inside the target are created as links. Permissions are reduced to rw for the owner
plus the archive's execute bits; owners are not restored.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from ..fsutil import make_tempdir  # noqa: F401 (also re-exported: data.sources uses it from here)


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the extraction directory (or is not a file)."""


def _check_name(name: str, archive: str) -> PurePosixPath:
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path")
    parts = PurePosixPath(norm).parts
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..'")
    return PurePosixPath(*[p for p in parts if p not in ("", ".")]) if parts else PurePosixPath()


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _target(root: str, rel: PurePosixPath, archive: str, name: str) -> str:
    """Where member ``rel`` goes, after checking that its parent resolves inside ``root``."""
    dest = os.path.join(root, *rel.parts)
    parent = os.path.realpath(os.path.dirname(dest))
    if not _inside(parent, root):
        raise UnsafeArchiveError(f"{archive}: member {name!r} would be written outside the target (through a link)")
    return os.path.join(parent, os.path.basename(dest))


def _extract_tar(tf: tarfile.TarFile, root: str, archive: str) -> None:
    members = tf.getmembers()
    for m in members:  # lexical checks first: refuse before writing anything
        _check_name(m.name, archive)
        if m.islnk():
            _check_name(m.linkname, archive)
        elif m.issym():
            if m.linkname.startswith(("/", "\\")):
                raise UnsafeArchiveError(f"{archive}: link {m.name!r} points to an absolute path {m.linkname!r}")
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device file or FIFO")
    for m, dest in _destinations(members, lambda m: m.name, lambda m: m.isdir(), root, archive):
        if m.issym():
            resolved = os.path.realpath(os.path.join(os.path.dirname(dest), m.linkname))
            if not _inside(resolved, root):
                raise UnsafeArchiveError(f"{archive}: link {m.name!r} -> {m.linkname!r} escapes the target")
            os.symlink(m.linkname, dest)
        elif m.islnk():
            src = os.path.realpath(os.path.join(root, *_check_name(m.linkname, archive).parts))
            if not _inside(src, root) or not os.path.isfile(src):
                raise UnsafeArchiveError(f"{archive}: hard link {m.name!r} -> {m.linkname!r} escapes the target")
            os.link(src, dest)
        else:
            src = tf.extractfile(m)
            with open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            os.chmod(dest, 0o644 | (m.mode & 0o111))


def _destinations(entries, name_of, is_dir, root: str, archive: str):
    """(entry, destination path) of each file or link entry, in order, after the name checks; directories are
    created on the way (tar and zip alike)."""
    for entry in entries:
        rel = _check_name(name_of(entry), archive)
        if not rel.parts:
            continue
        dest = _target(root, rel, archive, name_of(entry))
        if is_dir(entry):
            os.makedirs(dest, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        yield entry, dest


def _extract_zip(zf: zipfile.ZipFile, root: str, archive: str) -> None:
    infos = zf.infolist()
    for info in infos:
        _check_name(info.filename, archive)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a link (not supported in zip files)")
    for info, dest in _destinations(infos, lambda i: i.filename, lambda i: i.is_dir(), root, archive):
        with zf.open(info) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)


def _deb_data_tar(path: Path) -> tarfile.TarFile:
    """The ``data.tar.*`` member of a Debian package (an ``ar`` archive), opened as a tar file."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{path}: not a Debian package (no ar header)")
        while True:
            header = f.read(60)
            if len(header) < 60:
                break
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            data = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                if name.endswith(".zst"):
                    raise ValueError(f"{path}: zstd-compressed data.tar is not supported")
                return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    raise ValueError(f"{path}: no data.tar member in the Debian package")


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Extract ``archive`` (tar/tgz, zip/whl, deb) into ``target``, which must not exist yet.

    Atomic: extraction goes to a temporary sibling directory renamed to ``target`` at the end;
    on any error (``UnsafeArchiveError`` included) nothing is left behind.
    """
    archive, target = Path(archive), Path(target)
    if target.exists():
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(make_tempdir(target.parent, target.name))
    root = os.path.realpath(tmp)
    try:
        name = archive.name
        if name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf:
                _extract_zip(zf, root, name)
        elif name.endswith(".deb"):
            with _deb_data_tar(archive) as tf:
                _extract_tar(tf, root, name)
        else:
            with tarfile.open(archive, mode="r:*") as tf:
                _extract_tar(tf, root, name)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
