"""``diffattn data prepare`` on small local corpora (no network): shards, index, tokenizer,
document-level split, no-op re-run, user-data formats, and bad input -> exit 2 with nothing written."""

import json
import random
import shutil

import numpy as np
import pytest

from diffattn.cli import main
from diffattn.data.shards import load_tokenizer, read_index, read_tokens
from diffattn.data.text import normalize

WORDS = ("the river ran past an old mill where children played until evening came and lamps were lit in "
         "every window of the quiet town while boats drifted slowly toward the harbour beyond hills").split()


def _doc(i: int) -> str:
    rng = random.Random(i)
    paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))).capitalize() + "."
             for _ in range(rng.randint(2, 5))]
    return f"Document {i}\n\n" + "\n\n".join(paras) + "\n"


@pytest.fixture
def corpus(tmp_path):
    """16 UTF-8 documents (one in a sub-folder), a cp1252 file, a hidden file that is ignored."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(15):
        (root / f"doc{i:02d}.txt").write_text(_doc(i), encoding="utf-8")
    (root / "sub" / "nested.md").write_text(_doc(99), encoding="utf-8")
    (root / "bbc.txt").write_bytes(b"Mutu fee\r\n\r\nA \xa315.8m fee, \x93he said\x94 \x96 caf\xe9.\r\n")
    (root / ".hidden").write_bytes(b"\x00\x01binary but hidden")
    return root


def _expected_docs(root):
    texts = [normalize(_doc(i)) for i in range(15)] + [normalize(_doc(99))]
    return set(texts) | {"Mutu fee\n\nA £15.8m fee, “he said” – café."}


def _prepare(*args):
    return main(["data", "prepare", *map(str, args)])


def _decoded_docs(out, split):
    index = read_index(out)
    tok = load_tokenizer(out)
    ids = read_tokens(out, split).tolist()
    assert not ids or ids[-1] == index["eos_id"]
    docs, cur = [], []
    for t in ids:
        if t == index["eos_id"]:
            docs.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
        else:
            cur.append(t)
    return docs


def test_prepare_writes_shards_index_tokenizer(corpus, tmp_path, capsys):
    out = tmp_path / "shards"
    assert _prepare("--corpus", corpus, "--tokenizer", "bpe:320", "--out", out, "--val-fraction", "0.2") == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "manifest.json", "tokenizer.json",
                                                     "train-00000.bin", "val-00000.bin"]
    index = read_index(out)
    assert index["dtype"] == "uint16" and index["vocab_size"] == 320 and index["tokenizer"] == "tokenizer.json"
    assert index["documents"]["train"] + index["documents"]["val"] == 17 and index["documents"]["val"] >= 1
    for split in ("train", "val"):
        (entry,) = index["splits"][split]
        assert (out / entry["file"]).stat().st_size == 2 * entry["tokens"]

    # the tokenizer file loads in both libraries; EOS is a special token
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.token_to_id("<|endoftext|>") == index["eos_id"]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert hf.decode(hf("the river ran")["input_ids"]) == "the river ran"
    assert load_tokenizer(out, hf=True).eos_token_id == index["eos_id"]

    # the shards hold exactly the normalised documents, each once, split by document (cp1252 decoded)
    train, val = _decoded_docs(out, "train"), _decoded_docs(out, "val")
    assert len(train) == index["documents"]["train"] and len(val) == index["documents"]["val"]
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(_expected_docs(corpus))

    manifest = json.loads((out / "manifest.json").read_text())
    (src,) = manifest["sources"]
    assert src["documents"] == 17 and src["tokens"] == index["tokens"]["train"] + index["tokens"]["val"] - 17
    assert src["documents_val"] == len(val)
    assert "17 documents" in capsys.readouterr().out


def test_split_is_deterministic_by_document_content(corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _prepare("--corpus", corpus, "--tokenizer", "bpe:300", "--out", a, "--val-fraction", "0.25") == 0
    # the same documents under other file names, listed in another order: same content hash and bytes
    files = sorted(p for p in corpus.rglob("*") if p.is_file() and p.name != ".hidden")
    contents = [f.read_bytes() for f in files]
    shutil.rmtree(corpus)
    corpus.mkdir()
    for i, data in enumerate(reversed(contents)):
        (corpus / f"renamed_{i}.txt").write_bytes(data)
    assert _prepare("--corpus", corpus, "--tokenizer", "bpe:300", "--out", b, "--val-fraction", "0.25") == 0
    ia, ib = read_index(a), read_index(b)
    assert ia["content_hash"] == ib["content_hash"]
    for split in ("train", "val"):
        assert read_tokens(a, split).tolist() == read_tokens(b, split).tolist()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()

    # another seed gives another (still document-level) split
    vals = {tuple(sorted(_decoded_docs(a, "val")))}
    for seed in (1, 2, 3):
        c = tmp_path / f"seed{seed}"
        assert _prepare("--corpus", corpus, "--tokenizer", "bpe:300", "--out", c, "--val-fraction", "0.25",
                        "--seed", seed) == 0
        val, train = _decoded_docs(c, "val"), _decoded_docs(c, "train")
        assert set(val).isdisjoint(train) and len(val) + len(train) == 17
        vals.add(tuple(sorted(val)))
    assert len(vals) > 1


def test_second_run_does_no_work(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "shards"
    args = ("--corpus", corpus, "--tokenizer", "bpe:300", "--out", out)
    assert _prepare(*args) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()

    import diffattn.data.tokenizer as T

    def no_training(*a, **k):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(T, "train_bpe", no_training)
    assert _prepare(*args) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    monkeypatch.undo()

    # a changed document or option rebuilds (and replaces the old shard directory)
    (corpus / "doc00.txt").write_text(_doc(1000))
    assert _prepare(*args) == 0
    assert "up to date" not in capsys.readouterr().out
    assert normalize(_doc(1000)) in _decoded_docs(out, "train") + _decoded_docs(out, "val")
    h = read_index(out)["content_hash"]
    assert _prepare(*args, "--val-fraction", "0.3") == 0 and read_index(out)["content_hash"] != h
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "shards"]  # no temp dirs left


def test_jsonl_text_field_and_files(tmp_path):
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"id": i, "body": _doc(i)}) for i in range(6)) + "\n\n")
    single = tmp_path / "one.txt"
    single.write_text(_doc(50))
    out = tmp_path / "out"
    assert _prepare("--corpus", jl, single, "--text-field", "body", "--tokenizer", "bpe:300", "--out", out) == 0
    docs = _decoded_docs(out, "train") + _decoded_docs(out, "val")
    assert sorted(docs) == sorted(normalize(_doc(i)) for i in [*range(6), 50])
    names = [s["name"] for s in json.loads((out / "manifest.json").read_text())["sources"]]
    assert names == [str(jl), str(single)]


def test_hf_tokenizer_directory(corpus, tmp_path):
    first = tmp_path / "first"
    assert _prepare("--corpus", corpus, "--tokenizer", "bpe:300", "--out", first) == 0
    tokdir = tmp_path / "tok"
    tokdir.mkdir()
    shutil.copy(first / "tokenizer.json", tokdir / "tokenizer.json")
    out = tmp_path / "second"
    assert _prepare("--corpus", corpus, "--tokenizer", tokdir, "--out", out) == 0
    assert read_index(out)["eos_id"] == read_index(first)["eos_id"]
    for split in ("train", "val"):
        assert read_tokens(out, split).tolist() == read_tokens(first, split).tolist()


def test_tokenizer_directory_without_eos_gets_one(corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", *sorted(set(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "wl").mkdir()
    tok.save(str(tmp_path / "wl" / "tokenizer.json"))
    out = tmp_path / "out"
    assert _prepare("--corpus", corpus, "--tokenizer", tmp_path / "wl", "--out", out) == 0
    index = read_index(out)
    assert index["eos_id"] == len(vocab) and index["vocab_size"] == len(vocab) + 1


def test_gpt2_from_files(tmp_path):
    from diffattn.data.tokenizer import gpt2_from_files

    # a miniature of the original files: byte-level symbols, merges in rank order, EOS last
    vocab = {c: i for i, c in enumerate(["h", "e", "l", "o", "Ġ", "w", "r", "d", "he", "ll", "hell", "hello",
                                         "Ġw", "Ġwo"])}
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "encoder.json").write_text(json.dumps(vocab))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nh e\nl l\nhe ll\nhell o\nĠ w\nĠw o\n")
    tok = gpt2_from_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    assert tok.encode("hello world<|endoftext|>").ids == [vocab[t] for t in
                                                          ["hello", "Ġwo", "r", "l", "d", "<|endoftext|>"]]
    assert tok.decode(tok.encode("hello world").ids) == "hello world"


def _bad_corpus(tmp_path, kind):
    d = tmp_path / "bad"
    d.mkdir()
    if kind == "empty":
        pass
    elif kind == "blank":
        (d / "a.txt").write_text("  \n\n\t\n")
    elif kind == "binary":
        (d / "good.txt").write_text(_doc(1))
        (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    elif kind == "nul":
        (d / "good.txt").write_text(_doc(1))
        (d / "data.txt").write_bytes(b"abc\x00def")
    elif kind == "encoding":
        (d / "good.txt").write_text(_doc(1))
        (d / "weird.txt").write_bytes(b"abc \x81\x8d\x90 def")
    elif kind == "jsonl-field":
        (d / "x.jsonl").write_text(json.dumps({"text": _doc(1)}) + "\n" + json.dumps({"body": "b"}) + "\n")
    elif kind == "jsonl-invalid":
        (d / "x.jsonl").write_text("{not json\n")
    return d


@pytest.mark.parametrize("kind, match", [
    ("empty", "corpus is empty"), ("blank", "corpus is empty"), ("binary", "image.png: is a binary file"),
    ("nul", "data.txt: is a binary file"), ("encoding", "weird.txt: is neither UTF-8"),
    ("jsonl-field", "x.jsonl line 2: no field 'text'"), ("jsonl-invalid", "x.jsonl line 1: not valid JSON"),
])
def test_bad_corpus_exit_2_nothing_written(tmp_path, capsys, kind, match):
    corpus = _bad_corpus(tmp_path, kind)
    out = tmp_path / "out"
    assert _prepare("--corpus", corpus, "--tokenizer", "bpe:300", "--out", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and err.startswith("diffattn data: error:")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


@pytest.mark.parametrize("args, match", [
    (["--corpus", "{missing}"], "corpus path not found"),
    (["--tokenizer", "bpe:abc"], "VOCAB must be an integer"),
    (["--tokenizer", "bpe:10"], "VOCAB must be in"),
    (["--tokenizer", "sentencepiece"], "expected bpe:VOCAB, gpt2, or a tokenizer directory"),
    (["--tokenizer", "{emptydir}"], "holds no tokenizer files"),
    (["--val-fraction", "1.5"], "--val-fraction 1.5"),
    (["--corpus", "source:nonesuch"], "unknown source 'nonesuch'"),
    (["--corpus", "{single}"], "single document"),
])
def test_bad_options_exit_2_nothing_written(corpus, tmp_path, capsys, args, match):
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "single.txt").write_text(_doc(3))
    args = [a.format(missing=tmp_path / "nope.txt", emptydir=tmp_path / "emptydir", single=tmp_path / "single.txt")
            for a in args]
    if "--corpus" not in args:
        args = ["--corpus", str(corpus), *args]
    if "--tokenizer" not in args:
        args = [*args, "--tokenizer", "bpe:300"]
    out = tmp_path / "out"
    assert _prepare(*args, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err
    assert not out.exists()


def test_out_dir_that_is_not_shards_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("do not delete")
    assert _prepare("--corpus", corpus, "--tokenizer", "bpe:300", "--out", out) == 2
    assert "not a diffattn shard directory" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_hf_dataset(tmp_path, capsys, monkeypatch):
    """hf:NAME goes through `datasets.load_dataset` when it is installed (here: a local folder, no
    network), and is a one-line error when it is not."""
    data = tmp_path / "ds"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps({"content": _doc(i)}) for i in range(5)) + "\n")
    out = tmp_path / "o"
    try:
        import datasets.config
    except ImportError:
        assert _prepare("--corpus", f"hf:{data}", "--out", out) == 2
        assert "`datasets` package is not installed" in capsys.readouterr().err
        assert not out.exists()
        return
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    assert _prepare("--corpus", f"hf:{data}", "--out", out, "--tokenizer", "bpe:300") == 2  # no "text" column
    assert "no field 'text' (columns: content" in capsys.readouterr().err and not out.exists()
    assert _prepare("--corpus", f"hf:{data}@train", "--text-field", "content", "--out", out,
                    "--tokenizer", "bpe:300") == 0
    assert sorted(_decoded_docs(out, "train") + _decoded_docs(out, "val")) == sorted(normalize(_doc(i))
                                                                                    for i in range(5))


def test_multiple_shards_keep_documents_whole(corpus, tmp_path):
    out = tmp_path / "out"
    assert _prepare("--corpus", corpus, "--tokenizer", "bpe:300", "--out", out, "--shard-tokens", "200") == 0
    index = read_index(out)
    assert len(index["splits"]["train"]) > 3
    eos = index["eos_id"]
    for e in index["splits"]["train"]:
        arr = np.fromfile(out / e["file"], dtype="<u2")
        assert arr[-1] == eos and len(arr) == e["tokens"]
