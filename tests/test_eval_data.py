"""Evaluation data: the named ICL / summarisation sets parsed from hand-made copies of the package
layouts (never fetched in tests), token-shard and text corpora for ``--data``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from diffattn.eval import datasets as D
from diffattn.eval.tokenizer import TextTokenizer
from helpers import ScriptedAdapter, train_tokenizer, write_icl_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

WIKI = {
    "Hat": {"title": "Hat", "extract": "A hat is a head covering. It is worn for various reasons.",
            "description": "Shaped head covering", "topic": "Everyday life"},
    "Paris": {"title": "Paris", "extract": "Paris is the capital of France. It has 2 million people.",
              "description": "Capital city of France", "topic": "Geography"},
    "Zero": {"title": "Zero", "extract": "0 is a number. Adding 0 changes nothing.", "description": "",
             "topic": "Mathematics"},
    "Misc": {"title": "Misc", "extract": "Something odd. More.", "description": "Odd thing", "topic": "Uncategorized"},
}
WORDNET = """  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known  
10204177 18 n 01 importer 0 001 @ 09882007 n 0000 | someone whose business involves importing goods; "an importer of wine"  
03623556 06 n 02 knife 0 tool 0 000 | edge tool used as a cutting instrument  
"""


@pytest.fixture()
def raw(tmp_path, monkeypatch):
    wiki = tmp_path / "wiki"
    wiki.mkdir()
    (wiki / "summaries_en-us.json").write_text(json.dumps(WIKI))
    bbc = tmp_path / "bbc"
    (bbc / "business").mkdir(parents=True)
    (bbc / "sports").mkdir()
    (bbc / "business" / "001.txt").write_text("Shares rise in Tokyo\n\nShares rose 3% in Tokyo on Monday.\n\nTraders cheered.\n")
    (bbc / "sports" / "001.txt").write_bytes("Chelsea win\n\nChelsea paid \xa310m for a striker.\n".encode("cp1252"))
    wn = tmp_path / "wordnet"
    wn.mkdir()
    (wn / "data.noun").write_text(WORDNET)
    dirs = {"wikipedia": wiki, "bbc": bbc, "wordnet": wn}
    monkeypatch.setattr(D, "source_dir", lambda name: dirs[name])
    return dirs


def test_icl_datasets_from_package_layouts(raw):
    wiki = D.load_icl_dataset("wiki-topic")
    assert sorted(wiki.examples) == [("0 is a number.", "Mathematics"), ("A hat is a head covering.", "Everyday life"),
                                     ("Paris is the capital of France.", "Geography")]  # Uncategorized dropped
    bbc = D.load_icl_dataset("bbc-topic")
    assert sorted(bbc.examples) == [("Chelsea win", "sports"), ("Shares rise in Tokyo", "business")]
    wn = D.load_icl_dataset("wordnet-supersense")
    assert wn.examples == [("entity: that which is perceived or known", "tops"),
                           ("importer: someone whose business involves importing goods", "person"),
                           ("knife: edge tool used as a cutting instrument", "artifact")]
    assert wn.template.endswith("Category:") and len(D.NOUN_LEXNAMES) == 26


def test_grounded_datasets_from_package_layouts(raw):
    head = D.load_grounded_dataset("bbc-headline")
    chelsea = next(it for it in head.items if it.reference == "Chelsea win")
    assert chelsea.source == "Chelsea paid £10m for a striker."  # cp1252 decoded
    business = next(it for it in head.items if it.reference == "Shares rise in Tokyo")
    assert business.source == "Shares rose 3% in Tokyo on Monday.\nTraders cheered."
    desc = D.load_grounded_dataset("wiki-description")
    assert {it.reference for it in desc.items} == {"Shaped head covering", "Capital city of France", "Odd thing"}
    qa = D.load_grounded_dataset("wiki-qa", seed=0, qa_docs=2)
    assert qa.kind == "qa"
    for it in qa.items:
        title = it.question[len("What is "):-1]
        assert WIKI[title]["extract"] in it.source.split("\n") and len(it.source.split("\n")) == 2
        assert it.reference == WIKI[title]["description"]


def test_unavailable_dataset_is_skipped_with_a_note(raw, monkeypatch, tmp_path):
    from diffattn.eval import IclOptions, run_icl

    def no_wordnet(name):
        if name == "wordnet":
            raise D.DatasetUnavailable("apt-get is not available")
        return raw[name]

    monkeypatch.setattr(D, "source_dir", no_wordnet)
    tok = TextTokenizer.from_file(train_tokenizer(tmp_path / "t.json"))
    path = write_icl_jsonl(tmp_path / "icl.jsonl", n=20)
    adapter = ScriptedAdapter(tok, score=lambda ids: np.zeros(tok.vocab_size), max_len=512)
    opts = IclOptions(datasets=["wordnet-supersense", str(path)], shots=[1], runs=1, test_size=3, robustness=False)
    rec = run_icl(adapter, tok, opts, None)
    assert [d["dataset"] for d in rec["results"]["datasets"]] == ["icl.jsonl"]
    assert any("skipped wordnet-supersense" in n and "apt-get" in n for n in rec["notes"])
    with pytest.raises(ValueError, match="no ICL dataset could be loaded"):
        run_icl(adapter, tok, IclOptions(datasets=["wordnet-supersense"], shots=[1]), None)


def test_bad_jsonl_datasets(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="needs the fields text, label"):
        D.load_icl_dataset(str(p))
    p.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        D.load_grounded_dataset(str(p))
    with pytest.raises(FileNotFoundError):
        D.check_icl_dataset_name(str(tmp_path / "missing.jsonl"))


def _write_shards(directory, docs, tokenizer_file, eos):
    directory.mkdir()
    shutil.copyfile(tokenizer_file, directory / "tokenizer.json")
    val = np.array([t for d in docs for t in (*d, eos)], dtype="<u2")
    val.tofile(directory / "val-00000.bin")
    train = np.array([5, 6, eos], dtype="<u2")
    train.tofile(directory / "train-00000.bin")
    import hashlib

    index = {"format": "diffattn-shards-v1", "dtype": "uint16", "vocab_size": 420, "eos_id": eos,
             "tokenizer": "tokenizer.json", "content_hash": "x",
             "splits": {"train": [{"file": "train-00000.bin", "tokens": 3,
                                   "sha256": hashlib.sha256(train.tobytes()).hexdigest()}],
                        "val": [{"file": "val-00000.bin", "tokens": int(val.size),
                                 "sha256": hashlib.sha256(val.tobytes()).hexdigest()}]},
             "documents": {"train": 1, "val": len(docs)}, "sources": []}
    (directory / "index.json").write_text(json.dumps(index))


def test_shard_corpus_val_split(tmp_path):
    tok_file = train_tokenizer(tmp_path / "tokenizer.json")
    tok = TextTokenizer.from_file(tok_file)
    texts = ["The quick brown fox jumps.", "Paris is the capital of France.", "Once upon a time."]
    docs = tok.encode_batch(texts)
    _write_shards(tmp_path / "shards", docs, tok_file, tok.eos_id)
    corpus = D.load_corpus(str(tmp_path / "shards"), tok)
    assert corpus.kind == "shards" and corpus.info["split"] == "val"
    assert corpus.token_docs(tok) == docs  # same tokenizer: the shard tokens themselves
    assert corpus.texts() == texts
    # a model with another tokenizer reads the same documents re-encoded with its own
    from tokenizers import Tokenizer

    other = Tokenizer.from_file(str(tok_file))
    other.add_tokens(["capital"])
    other.save(str(tmp_path / "other.json"))
    tok2 = TextTokenizer.from_file(tmp_path / "other.json")
    assert tok2.sha256 != tok.sha256
    assert corpus.token_docs(tok2) == tok2.encode_batch(texts) != docs
    assert D.stream_tokens(docs, 0) == [*docs[0], 0, *docs[1], 0, *docs[2], 0]


def test_text_corpora(tmp_path):
    tok = TextTokenizer.from_file(train_tokenizer(tmp_path / "tokenizer.json"))
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("First document.\n")
    (folder / "b.txt").write_text("Second document.\n")
    assert D.load_corpus(str(folder), tok).texts() == ["First document.", "Second document."]
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert D.load_corpus(str(jl), tok).texts() == ["one", "two"]
    with pytest.raises(ValueError, match="not a known source"):
        D.load_corpus("no-such-source", tok)
