# .venv/bin/python -m pytest tests/test_loader.py -q
"""The training data loader (src/diffattn/data/loader.py): shard validation, deterministic windows
that are a pure function of (seed, step) and split disjointly over ranks and micro-steps, eval windows."""

import json

import numpy as np
import pytest
import torch

from diffattn.data.loader import TokenShards, WindowSampler, eval_batches, n_eval_windows
from helpers import write_raw_shards  # tests/helpers.py


@pytest.fixture
def shard_dir(tmp_path):
    # train = 0..249 spread over three files (one empty), val = 1000..1099 (uint16 ok: < 65536)
    return write_raw_shards(tmp_path / "shards", [list(range(0, 100)), [], list(range(100, 250))],
                            [list(range(1000, 1100))], vocab_size=2000)


def test_token_shards_reads_across_files(shard_dir):
    train = TokenShards(shard_dir, "train")
    assert len(train) == 250 and train.vocab_size == 2000 and train.eos_id == 0
    np.testing.assert_array_equal(train.window(95, 10), np.arange(95, 105))  # crosses the file boundary
    np.testing.assert_array_equal(train.window(0, 250), np.arange(250))
    assert train.window(0, 3).dtype == np.int64
    with pytest.raises(IndexError):
        train.window(245, 10)
    assert len(TokenShards(shard_dir, "val")) == 100


def test_uint32_shards(tmp_path):
    d = write_raw_shards(tmp_path / "s32", [[70000, 1, 2, 99999]], [[5, 6]], vocab_size=100000, dtype="uint32")
    np.testing.assert_array_equal(TokenShards(d, "train").window(0, 4), [70000, 1, 2, 99999])


def test_sampler_is_a_pure_function_of_seed_and_step(shard_dir):
    shards = TokenShards(shard_dir, "train")
    s = WindowSampler(shards, seq_len=16, global_batch=8, seed=3)
    x5, y5 = s.batch(5)
    assert x5.shape == (8, 16) and x5.dtype == torch.int64
    torch.testing.assert_close(y5[:, :-1], x5[:, 1:])  # targets are inputs shifted by one
    assert torch.equal((y5[:, -1] - x5[:, -1]), torch.ones(8, dtype=torch.int64))  # the data is 0..249
    s.batch(0), s.batch(99)  # other steps in between change nothing
    assert torch.equal(WindowSampler(shards, 16, 8, seed=3).batch(5)[0], x5)  # a fresh sampler (= a resumed run)
    assert not torch.equal(s.batch(6)[0], x5)
    assert not torch.equal(WindowSampler(shards, 16, 8, seed=4).batch(5)[0], x5)
    starts = torch.cat([s.starts(k) for k in range(50)])
    assert int(starts.min()) >= 0 and int(starts.max()) <= len(shards) - 17  # every window fits (x and y)


@pytest.mark.parametrize("world,n_micro", [(2, 1), (1, 4), (2, 2), (4, 2)])
def test_ranks_and_micro_steps_partition_the_global_batch(shard_dir, world, n_micro):
    s = WindowSampler(TokenShards(shard_dir, "train"), seq_len=8, global_batch=8, seed=0)
    full_x, full_y = s.batch(7)
    parts = [s.batch(7, rank=r, world_size=world, micro=m, n_micro=n_micro) for r in range(world) for m in range(n_micro)]
    assert all(p[0].shape == (8 // (world * n_micro), 8) for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_y)


def test_sampler_errors(shard_dir):
    shards = TokenShards(shard_dir, "train")
    with pytest.raises(ValueError, match="not divisible"):
        WindowSampler(shards, 8, 6, 0).batch(0, world_size=4)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        WindowSampler(shards, 250, 2, 0)
    with pytest.raises(ValueError, match="out of range"):
        WindowSampler(shards, 8, 4, 0).batch(0, rank=2, world_size=2)


def test_eval_batches_are_ordered_and_non_overlapping(shard_dir):
    val = TokenShards(shard_dir, "val")
    batches = list(eval_batches(val, seq_len=10, batch_size=4))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert [b[0].shape[0] for b in batches] == [4, 4, 1]  # (100 - 1) // 10 = 9 windows
    assert torch.equal(x.flatten(), torch.arange(1000, 1090))  # every input token once, in order
    assert torch.equal(y.flatten(), torch.arange(1001, 1091))
    assert n_eval_windows(val, 10) == 9
    limited = list(eval_batches(val, seq_len=10, batch_size=4, max_tokens=35))
    assert sum(b[0].shape[0] for b in limited) == 3 == n_eval_windows(val, 10, 35)
    assert sum(b[0].shape[0] for b in eval_batches(val, 10, 4, max_tokens=1)) == 1  # at least one window
    with pytest.raises(ValueError, match="fewer than seq_len"):
        list(eval_batches(val, seq_len=100, batch_size=1))


def test_bad_shard_directories_name_the_file(tmp_path, shard_dir):
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        TokenShards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="index.json"):
        TokenShards(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown split"):
        TokenShards(shard_dir, "test")

    # a token file whose size disagrees with the index
    with open(shard_dir / "train-00002.bin", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ValueError, match="train-00002.bin"):
        TokenShards(shard_dir, "train")
    (shard_dir / "train-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="train-00002.bin"):
        TokenShards(shard_dir, "train")

    bad = tmp_path / "bad"
    bad.mkdir()
    for text, match in [("{not json", "not valid JSON"), ('{"format": "other"}', "format"),
                        (json.dumps({"format": "diffattn-shards-v1", "dtype": "int8"}), "dtype"),
                        (json.dumps({"format": "diffattn-shards-v1", "dtype": "uint16", "vocab_size": 10,
                                     "eos_id": 3, "splits": {"train": [{"file": "../x.bin", "tokens": 1}],
                                                             "val": []}}), "plain file name")]:
        (bad / "index.json").write_text(text)
        with pytest.raises(ValueError, match=match) as err:
            TokenShards(bad, "train")
        assert "index.json" in str(err.value)


def test_written_by_the_data_pipeline(tmp_path):
    """The loader reads what the data engineer's writer produces (the shared contract)."""
    shards = pytest.importorskip("diffattn.data.shards")
    docs = [[5, 6, 7], [8, 9]]
    shards.write_shards(tmp_path / "d", docs, [[3, 4]], vocab_size=16, eos_id=1)
    train = TokenShards(tmp_path / "d", "train")
    assert train.window(0, len(train)).tolist() == [5, 6, 7, 1, 8, 9, 1]  # each document followed by EOS
    assert train.tokenizer_file is not None and train.tokenizer_file.name == "tokenizer.json"
    train.verify()
