# .venv/bin/python -m pytest tests/test_reliability_fuzz.py -q
"""Bad input everywhere, fuzzed with hypothesis (docs/reliability.md): run files (unknown keys,
wrong types, NaN/inf, negative sizes, huge values), ``--set`` overrides, corpora for ``data
prepare`` (empty, binary, invalid UTF-8, one enormous line, non-text JSONL fields), token ids out
of range, prompts longer than the context, sampling and eval options out of range. Every case
exits with code 2 and ONE stderr line naming the problem — never a traceback — and leaves no
output directory behind. Example counts are kept small for CI (``max_examples``)."""

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from diffattn.checkpoint import save_model
from diffattn.cli import main
from diffattn.config import ModelConfig
from diffattn.model import build_model
from diffattn.train import trainer as trainer_mod
from helpers import MODEL, TRAIN, VOCAB, make_corpus

FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

MODEL_INTS = ["vocab_size", "d_model", "n_layer", "n_head", "max_seq_len", "ffn_hidden"]
MODEL_FLOATS = ["rope_theta", "norm_eps", "init_std"]
TRAIN_SIZES = ["batch_size", "grad_accum", "max_steps", "max_tokens", "seq_len", "eval_tokens", "log_every",
               "keep_checkpoints", "eval_batch_size", "max_skipped_steps"]
TRAIN_FLOATS = ["lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip", "lambda_alarm", "grad_spike_factor"]


def run_cli(argv):
    """(exit code, stdout, stderr) of ``diffattn ARGV`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(map(str, argv)))
        except SystemExit as e:  # argparse's own refusals (exit 2, one usage line + one error line)
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def assert_refused(rc, err, *, mention: str | None = None, out_dir: Path | None = None):
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("diffattn "), err
    if mention is not None:
        assert mention in lines[0], err
    if out_dir is not None:
        assert not out_dir.exists(), f"{out_dir} was written: {sorted(p.name for p in out_dir.rglob('*'))}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("fuzz-corpus") / "shards", n_train=60, n_val=10)


@pytest.fixture(autouse=True)
def never_train(monkeypatch):
    """A config that passes validation would start training: make that a test failure instead of a run."""
    def refuse(self, *a, **k):
        raise AssertionError("the run was accepted (validation passed)")
    monkeypatch.setattr(trainer_mod.Trainer, "__init__", refuse)


# ---------------------------------------------------------------------- run files and --set
def toml_value(v) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


wrong_type = st.one_of(st.text(alphabet="abcxyz -", min_size=1, max_size=6), st.lists(st.integers(0, 3), max_size=2),
                       st.dictionaries(st.sampled_from("ab"), st.integers(0, 3), max_size=1))
bad_number = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(-(1 << 70), 0),
                       st.integers(1 << 62, 1 << 80), st.floats(1e30, 1e300))

mutations = st.one_of(
    st.tuples(st.sampled_from(["model", "train"]), st.from_regex(r"[a-z]{3,10}_[a-z]{2,5}", fullmatch=True),
              st.integers(0, 5)),  # unknown key
    st.tuples(st.just("model"), st.sampled_from(MODEL_INTS + MODEL_FLOATS), st.one_of(wrong_type, bad_number)),
    st.tuples(st.just("train"), st.sampled_from(TRAIN_SIZES + TRAIN_FLOATS), st.one_of(wrong_type, bad_number)),
    st.tuples(st.just("train"), st.sampled_from(["schedule", "device", "dtype", "parallel", "recipe"]),
              st.text(alphabet="qwz", min_size=1, max_size=4)),
)


def run_file(path: Path, data: Path, out: Path, table=None, key=None, value=None) -> Path:
    tables = {"model": dict(MODEL), "train": {"data": str(data), "out": str(out), **TRAIN, "max_steps": 5}}
    if table is not None:
        tables[table][key] = value
    path.write_text("".join(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in t.items()) + "\n"
                            for name, t in tables.items()))
    return path


@FUZZ
@given(mutation=mutations, via_set=st.booleans())
def test_bad_run_file_or_override_is_refused(corpus, mutation, via_set):
    table, key, value = mutation
    assume(not (table == "train" and key in ("max_skipped_steps", "keep_checkpoints", "log_every", "eval_tokens",
                                             "max_steps", "max_tokens")
                and isinstance(value, int) and not isinstance(value, bool) and value > 0 and value < (1 << 63)))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        out = d / "out"
        if via_set:
            cfg = run_file(d / "r.toml", corpus, out)
            rc, _, err = run_cli(["train", "--config", cfg, "--set", f"{table}.{key}={toml_value(value)}"])
        else:
            rc, _, err = run_cli(["train", "--config", run_file(d / "r.toml", corpus, out, table, key, value)])
        assert_refused(rc, err, mention=key if key != "recipe" else "recipe", out_dir=out)


@FUZZ
@given(text=st.one_of(st.binary(min_size=1, max_size=64).map(lambda b: b.decode("latin-1")),
                      st.sampled_from(["[model", "model = 3", "[train]\nlr = ", "[[train]]\nx=1", "[train]\n[train]",
                                       "[oops]\nx = 1", "\x00\x01"])))
def test_garbage_run_file_is_refused(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.toml"
        path.write_bytes(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)
        rc, _, err = run_cli(["train", "--config", path])
        assert_refused(rc, err)


@pytest.mark.parametrize("override", ["=3", "train.=3", "nosuchfield=1", "train.lr", "model.model.d=1",
                                      "train.lr=[1, 2]", "train.out=", "train.lr=1e-3=4"])
def test_malformed_overrides_are_refused(corpus, tmp_path, override):
    cfg = run_file(tmp_path / "r.toml", corpus, tmp_path / "out")
    rc, _, err = run_cli(["train", "--config", cfg, "--set", override])
    assert_refused(rc, err, out_dir=tmp_path / "out")


def test_huge_model_is_refused_before_allocation(corpus, tmp_path):
    cfg = run_file(tmp_path / "r.toml", corpus, tmp_path / "out")
    rc, _, err = run_cli(["train", "--config", cfg, "--set", "model.d_model=1048576", "--set", "model.n_layer=512",
                          "--set", "model.n_head=8192"])
    assert_refused(rc, err, out_dir=tmp_path / "out")
    rc, _, err = run_cli(["train", "--config", cfg, "--set", "model.d_model=65536", "--set", "model.n_layer=64",
                          "--set", "model.n_head=512", "--set", "model.vocab_size=1000000"])
    assert_refused(rc, err, mention="memory", out_dir=tmp_path / "out")


# ---------------------------------------------------------------------- corpora
CORPORA = {
    "empty.txt": b"",
    "blank.txt": b"\n\n   \n\t\n",
    "binary.bin": bytes(range(256)) * 8,
    "nul.txt": b"hello\x00world\x00" * 50,
    "invalid-utf8.txt": b"good text \xff\xfe\xc3\x28 more \x80\x81 text\n" * 20,
    "empty.jsonl": b"",
    "numbers.jsonl": b'{"text": 1}\n{"text": 2.5}\n',
    "nulls.jsonl": b'{"text": null}\n{"text": null}\n',
    "lists.jsonl": b'{"text": ["a", "b"]}\n{"text": {"x": 1}}\n',
    "notjson.jsonl": b'{"text": "ok"}\n{not json}\n',
    "nofield.jsonl": b'{"body": "some text here"}\n',
    "array.jsonl": b'[1, 2, 3]\n',
}


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_bad_corpus_is_refused(name, tmp_path):
    src = tmp_path / name
    src.write_bytes(CORPORA[name])
    out = tmp_path / "shards"
    rc, _, err = run_cli(["data", "prepare", "--corpus", src, "--tokenizer", "bpe:300", "--out", out, "--quiet"])
    assert_refused(rc, err, mention=name, out_dir=out)


@settings(max_examples=6, deadline=None, derandomize=True, database=None)
@given(junk=st.binary(min_size=0, max_size=200))
def test_fuzzed_binary_corpus_never_crashes(junk):
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "c.txt", Path(d) / "shards"
        src.write_bytes(junk)
        rc, _, err = run_cli(["data", "prepare", "--corpus", src, "--tokenizer", "bpe:300", "--out", out, "--quiet"])
        assert "Traceback" not in err
        if rc == 0:  # valid text after all: a complete shard directory
            assert (out / "index.json").is_file()
        else:
            assert_refused(rc, err, out_dir=out)


def test_one_enormous_line_is_prepared(tmp_path):
    """A 2 MB corpus on one line is valid text: it is tokenized into a complete shard directory."""
    src = tmp_path / "one-line.txt"
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    src.write_text(" ".join(words[i % 5] + str(i % 97) for i in range(300_000)))
    out = tmp_path / "shards"
    rc, _, err = run_cli(["data", "prepare", "--corpus", src, "--tokenizer", "bpe:300", "--out", out, "--quiet",
                          "--val-fraction", "0.5"])
    assert rc in (0, 2) and "Traceback" not in err
    if rc == 0:
        assert (out / "index.json").is_file()
    else:
        assert_refused(rc, err, out_dir=out)


# ---------------------------------------------------------------------- token ids out of range
def test_token_ids_out_of_range_in_shards_are_refused(tmp_path):
    from helpers import write_raw_shards

    data = tmp_path / "data"
    ids = list(range(2, 60)) * 20
    ids[100] = 5000  # beyond vocab_size 64
    write_raw_shards(data, [ids], [list(range(2, 60)) * 3], vocab_size=VOCAB, eos_id=0)
    out = tmp_path / "out"
    cfg = run_file(tmp_path / "r.toml", data, out)
    rc, _, err = run_cli(["train", "--config", cfg])
    assert_refused(rc, err, mention="5000", out_dir=out)


def test_model_refuses_out_of_range_ids():
    model = build_model(ModelConfig(**MODEL, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[1, VOCAB]]))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[-1, 2]]))


# ---------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def saved_model(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("gen") / "model"
    torch.manual_seed(0)
    save_model(build_model(ModelConfig(**MODEL, vocab_size=VOCAB)), d, tokenizer_file=corpus / "tokenizer.json")
    return d


@FUZZ
@given(n_words=st.integers(MODEL["max_seq_len"] - 4, 400), new=st.integers(1, 64))
def test_prompt_longer_than_context_is_refused(saved_model, n_words, new):
    assume(n_words + new > MODEL["max_seq_len"])
    prompt = " ".join(f"w{2 + i % 60}" for i in range(n_words))
    rc, out, err = run_cli(["generate", "--model", saved_model, "--prompt", prompt, "--max-new-tokens", new])
    assert_refused(rc, err, mention="max_seq_len")
    assert out == ""


@FUZZ
@given(option=st.sampled_from([("--max-new-tokens", st.integers(-100, -1)), ("--temperature", st.floats(-10, -1e-3)),
                               ("--temperature", st.sampled_from([math.nan, math.inf])),
                               ("--top-k", st.integers(-50, -1)), ("--top-p", st.floats(1.0001, 50)),
                               ("--top-p", st.floats(-5, 0)), ("--top-p", st.just(math.nan))]), data=st.data())
def test_generate_options_out_of_range_are_refused(saved_model, option, data):
    flag, values = option
    value = data.draw(values)
    extra = [] if flag == "--max-new-tokens" else ["--max-new-tokens", 4]
    rc, out, err = run_cli(["generate", "--model", saved_model, "--prompt", "w2 w3", flag, value, *extra])
    assert_refused(rc, err, mention=flag.lstrip("-").split("-")[0])


# ---------------------------------------------------------------------- eval
@FUZZ
@given(option=st.sampled_from(["--max-tokens", "--seq-len", "--batch-size", "--min-docs", "--max-docs"]),
       value=st.one_of(st.integers(-(1 << 40), 0), st.integers(1 << 40, 1 << 70), st.just("x")))
def test_eval_options_out_of_range_are_refused(saved_model, corpus, option, value):
    # huge caps (--max-tokens, --max-docs, ...) mean "all of it"; a huge --seq-len exceeds the context
    assume(not (isinstance(value, int) and value > 0 and option != "--seq-len"))
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "eval"
        rc, _, err = run_cli(["eval", "ppl", "--model", saved_model, "--data", corpus, "--out", out, option, value])
        if rc != 2 or len(err.strip().splitlines()) != 1:
            pytest.fail(f"{option} {value}: rc {rc}, stderr {err[-500:]}")
        assert "Traceback" not in err and not out.exists()
