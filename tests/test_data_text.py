"""Decoding rule (UTF-8, then strict cp1252; binary refused), normalisation and markup stripping."""

import pytest

from diffattn.data.text import BinaryFileError, EncodingError, decode_bytes, normalize, strip_markup


def test_utf8_and_bom():
    assert decode_bytes("naïve – “quoted” £".encode()) == ("naïve – “quoted” £", "utf-8")
    assert decode_bytes(b"\xef\xbb\xbfhello") == ("hello", "utf-8-sig")
    assert decode_bytes("héllo".encode("utf-16")) == ("héllo", "utf-16")


def test_cp1252_fallback_decodes_pound_and_smart_quotes():
    # BBC news files: 0xA3 is the pound sign, 0x93/0x94 curly quotes, 0x96 an en dash
    text, enc = decode_bytes(b"a \xa315.8m fee, \x93Mutu\x94 \x96 caf\xe9")
    assert enc == "cp1252"
    assert text == "a £15.8m fee, “Mutu” – café"


@pytest.mark.parametrize("data", [
    b"abc\x81\x8d\x90 def",          # invalid UTF-8 and bytes that cp1252 leaves undefined
    b"caf\xe9 \x1b[0m" + b"colour codes " * 10,  # cp1252-decodable, but a control character
])
def test_neither_utf8_nor_cp1252(data):
    with pytest.raises(EncodingError, match="neither UTF-8"):
        decode_bytes(data, "f.txt")


@pytest.mark.parametrize("data", [b"text\x00with nul", b"\x89PNG\r\n\x1a\n....", b"%PDF-1.4 ...",
                                  bytes(range(1, 32)) * 10])
def test_binary_refused(data):
    with pytest.raises(BinaryFileError, match="binary"):
        decode_bytes(data, "f.bin")


def test_normalize():
    raw = "\ufeffTitle\r\n\r\n\r\n\r\nline one   \r\nline\u00a0two\x07\f\n\n\n\nCafe\u0301\n   "
    assert normalize(raw) == "Title\n\nline one\nline two\n\nCafé"
    assert normalize("  \n\t \n") == ""


def test_strip_markup_osis():
    frag = ('<w lemma="strong:H0430">God</w><note placement="foot"><reference>1:1 </reference>The Hebrew'
            ' word</note><w lemma="x">created</w> the <w>heavens</w><note n="a">x</note>, &amp; the earth.')
    assert strip_markup(frag) == "God created the heavens, & the earth."
    assert strip_markup('because he had trusted in his God. <d') == "because he had trusted in his God."
