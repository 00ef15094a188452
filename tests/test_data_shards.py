"""write_shards / read_index / load_tokenizer: the shard-directory contract (diffattn-shards-v1)."""

import hashlib
import json

import numpy as np
import pytest

from diffattn.data.shards import FORMAT, load_tokenizer, read_index, read_tokens, verify, write_shards


def test_write_shards_contract_without_tokenizer(tmp_path):
    train = [[1, 2, 3], [4, 5], [6]]
    val = [[7, 8, 9, 10]]
    out = tmp_path / "shards"
    index = write_shards(out, train, val, vocab_size=11, eos_id=0, shard_tokens=5)
    assert index == read_index(out)
    assert index["format"] == FORMAT and index["dtype"] == "uint16"
    assert (index["vocab_size"], index["eos_id"], index["tokenizer"]) == (11, 0, "tokenizer.json")
    assert index["documents"] == {"train": 3, "val": 1}
    # documents never straddle files: [1,2,3,0] | [4,5,0,6,0] (5 tokens fit) ...
    files = [(e["file"], e["tokens"]) for e in index["splits"]["train"]]
    assert files == [("train-00000.bin", 4), ("train-00001.bin", 5)]
    for entries in index["splits"].values():
        for e in entries:
            raw = (out / e["file"]).read_bytes()
            assert len(raw) == 2 * e["tokens"] and hashlib.sha256(raw).hexdigest() == e["sha256"]
    assert read_tokens(out, "train").tolist() == [1, 2, 3, 0, 4, 5, 0, 6, 0]
    assert np.fromfile(out / "val-00000.bin", dtype="<u2").tolist() == [7, 8, 9, 10, 0]
    assert index["tokens"] == {"train": 9, "val": 5}
    # the stand-in id tokenizer round-trips ids and names the EOS
    tok = load_tokenizer(out)
    assert tok.encode("<3> <|endoftext|> <10>").ids == [3, 0, 10]
    hf = load_tokenizer(out, hf=True)
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == 0
    assert verify(out)


def test_uint32_and_real_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel(vocab={"<|endoftext|>": 70_000, "a": 0, "b": 1}, unk_token="a"))
    index = write_shards(tmp_path / "s", [[0, 69_999, 1]], [], tok)
    assert (index["dtype"], index["vocab_size"], index["eos_id"]) == ("uint32", 70_001, 70_000)
    assert read_tokens(tmp_path / "s", "train").tolist() == [0, 69_999, 1, 70_000]
    assert index["splits"]["val"] == [] and index["documents"]["val"] == 0


def test_write_shards_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        write_shards(tmp_path / "a", [[1, 99]], [], vocab_size=10, eos_id=0)
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []  # nothing half-written
    with pytest.raises(ValueError, match="needs vocab_size and eos_id"):
        write_shards(tmp_path / "a", [[1]], [])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_shards(tmp_path / "busy", [[1]], [], vocab_size=4, eos_id=0, overwrite=True)
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep me"


def test_overwrite_and_verify(tmp_path):
    out = tmp_path / "s"
    write_shards(out, [[1, 2]], [[3]], vocab_size=4, eos_id=0)
    with pytest.raises(FileExistsError):
        write_shards(out, [[1]], [], vocab_size=4, eos_id=0)
    write_shards(out, [[2, 2, 2]], [[3]], vocab_size=4, eos_id=0, overwrite=True)
    assert read_tokens(out, "train").tolist() == [2, 2, 2, 0]
    raw = bytearray((out / "train-00000.bin").read_bytes())
    raw[0] ^= 1
    (out / "train-00000.bin").write_bytes(bytes(raw))
    assert not verify(out) and verify(out, checksums=False)
    (out / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a diffattn-shards-v1 index"):
        read_index(out)
