"""Safe extraction: refuses '..', absolute paths, links escaping the target, devices; atomic."""

import io
import os
import tarfile
import zipfile

import pytest

from diffattn.data.archive import UnsafeArchiveError, safe_extract


def _tar(path, members):
    """members: (name, kind, payload) with kind 'file' (payload bytes), 'sym'/'hard' (payload target),
    'dir', 'fifo'."""
    with tarfile.open(path, "w:gz") as tf:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "dir": tarfile.DIRTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            if kind in ("sym", "hard"):
                info.linkname = payload
            tf.addfile(info)
    return path


def _assert_nothing_written(tmp_path, target):
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tgz"]  # no temp dir, nothing escaped


@pytest.mark.parametrize("members, match", [
    ([("ok.txt", "file", b"fine"), ("../escaped", "file", b"owned")], "contains '..'"),
    ([("a/../../escaped", "file", b"owned")], "contains '..'"),
    ([("/tmp/escaped", "file", b"owned")], "absolute path"),
    ([("link", "sym", "/etc/passwd")], "absolute path"),
    ([("link", "sym", "../../escaped")], "escapes the target"),
    ([("d", "dir", None), ("d/link", "sym", "../..")], "escapes the target"),
    # lexically inside, physically outside: `s` is the root itself, so `s/t -> ..` is the root's parent
    ([("s", "sym", "."), ("s/t", "sym", "..")], "escapes the target"),
    ([("hard", "hard", "../escaped")], "contains '..'"),  # hard link to outside
    ([("fifo", "fifo", None)], "device file or FIFO"),
])
def test_malicious_tar_refused(tmp_path, members, match):
    archive = _tar(tmp_path / "evil.tgz", members)
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match=match):
        safe_extract(archive, target)
    _assert_nothing_written(tmp_path, target)


def test_zip_with_dotdot_refused(tmp_path):
    archive = tmp_path / "evil.whl"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pkg/ok.py", "x = 1")
        zf.writestr("../escaped", "owned")
    with pytest.raises(UnsafeArchiveError, match=r"\.\."):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.whl"]


def test_good_tar_with_inside_links(tmp_path):
    archive = _tar(tmp_path / "good.tgz", [("pkg/data/a.txt", "file", b"alpha"), ("pkg/link", "sym", "data/a.txt"),
                                          ("pkg/hard", "hard", "pkg/data/a.txt"), ("pkg/empty", "dir", None)])
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "pkg" / "data" / "a.txt").read_bytes() == b"alpha"
    assert os.readlink(out / "pkg" / "link") == "data/a.txt" and (out / "pkg" / "link").read_bytes() == b"alpha"
    assert (out / "pkg" / "hard").read_bytes() == b"alpha"
    assert (out / "pkg" / "empty").is_dir()
    with pytest.raises(FileExistsError):
        safe_extract(archive, out)


def test_deb_data_tar(tmp_path):
    # a .deb is an ar archive: debian-binary, control.tar.*, data.tar.*
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tf:
        payload = b"In the beginning"
        info = tarfile.TarInfo("./usr/share/doc/x.txt")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    parts = [("debian-binary", b"2.0\n"), ("control.tar.xz", b"\0" * 3), ("data.tar.xz", data.getvalue())]
    blob = b"!<arch>\n"
    for name, body in parts:
        blob += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode() + body
        blob += b"\n" if len(body) % 2 else b""
    deb = tmp_path / "x_1.0_all.deb"
    deb.write_bytes(blob)
    out = safe_extract(deb, tmp_path / "out")
    assert (out / "usr" / "share" / "doc" / "x.txt").read_bytes() == b"In the beginning"
