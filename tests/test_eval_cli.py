"""``diffattn eval``: malformed options exit with code 2 and one line naming the problem, and write
nothing; options come from flags and a TOML file; output directories are replaced atomically."""

from __future__ import annotations

import json

import pytest

from diffattn.cli import UsageError
from diffattn.eval import NeedleOptions
from diffattn.eval.common import TaskResult, write_outputs
from helpers import cli, make_diffattn, make_llama, train_tokenizer, write_docs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-cli")
    tok = train_tokenizer(root / "tokenizer.json")
    return {"model": make_diffattn(root / "m", tok, max_seq_len=256), "llama": make_llama(root / "llama", tok),
            "docs": write_docs(root / "docs"), "root": root}


BAD = [
    (["needle", "--nr", "1/2"], "N=1 needles < R=2"),
    (["needle", "--nr", "two/one"], "not N/R"),
    (["needle", "--depths", "0,50,101"], "101"),
    (["attention-noise", "--depths", "-5"], "outside 0..100"),
    (["needle", "--lengths", "4096"], "above the model's context (256 tokens)"),
    (["attention-noise", "--length", "1000"], "above the model's context"),
    (["ppl", "--seq-len", "257"], "above the model's context"),
    (["quant", "--needle-lengths", "300"], "above the model's context"),
    (["icl", "--datasets", "trec"], "unknown ICL dataset 'trec'"),
    (["hallucination", "--datasets", "xsum"], "unknown hallucination dataset 'xsum'"),
    (["ppl", "--data", "no-such-corpus"], "not a known source"),
    (["needle", "--samples", "0"], "--samples must be an integer >= 1"),
    (["quant", "--bits", "1"], "--bits must be an integer in [2, 16]"),
    (["quant", "--granularity", "block"], "unknown value 'block'"),
    (["attention-noise", "--normalize", "softmax"], "unknown value 'softmax'"),
    (["icl", "--arrangements", "sorted"], "unknown 'sorted'"),
    (["needle", "--lengths", "12,abc"], "comma-separated list"),
    (["ppl", "--max-tokens", "many"], "not a valid int"),
    (["needle", "--lengths", "60"], "too short"),
    (["ppl"], "--data is required"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_malformed_options_exit_2_with_one_line(env, monkeypatch, capsys, args, message):
    out = env["root"] / "never"
    needs_data = args[0] not in ("icl", "hallucination") and "--data" not in args and args != ["ppl"]
    argv = ["eval", args[0], "--model", str(env["model"]), "--out", str(out), *args[1:]]
    if needs_data:
        argv += ["--data", str(env["docs"])]
    try:
        rc = cli(argv, monkeypatch)
    except SystemExit as e:  # argparse-level errors (a value that does not parse)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_missing_model_and_bad_model(env, monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli(["eval", "ppl", "--data", str(env["docs"])], monkeypatch)
    assert e.value.code == 2 and "--model" in capsys.readouterr().err
    assert cli(["eval", "ppl", "--model", str(tmp_path / "nope"), "--data", str(env["docs"])], monkeypatch) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli(["eval", "lambda", "--model", str(env["llama"])], monkeypatch) == 2
    assert "no λ" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli(["eval", "nosuchtask", "--model", str(env["model"])], monkeypatch)
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert cli(["eval"], monkeypatch) == 2  # no task: help on stderr


def test_help_shows_task_protocol(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["eval", "needle", "--help"], monkeypatch)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "special magic" in out and "--nr" in out and "--samples" in out


def test_toml_config_and_flag_precedence(env, monkeypatch, capsys, tmp_path):
    cfg = tmp_path / "needle.toml"
    cfg.write_text('nr = ["2/1"]\nlengths = [236]\ndepths = [25]\nsamples = 3\nmax-new-tokens = 2\n')
    out = tmp_path / "out"
    rc = cli(["eval", "needle", "--model", str(env["model"]), "--data", str(env["docs"]), "--config", str(cfg),
              "--samples", "1", "--seed", "5", "--out", str(out)], monkeypatch)
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "results.json").read_text())
    assert rec["options"]["samples"] == 1 and rec["options"]["nr"] == ["2/1"] and rec["options"]["depths"] == [25]
    assert rec["options"]["max_new_tokens"] == 2 and rec["seed"] == 5
    bad = tmp_path / "bad.toml"
    bad.write_text("smaples = 3\n")
    assert cli(["eval", "needle", "--model", str(env["model"]), "--data", str(env["docs"]), "--config", str(bad)],
               monkeypatch) == 2
    assert "unknown option(s) smaples" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("samples = = 3\n")
    assert cli(["eval", "needle", "--model", str(env["model"]), "--config", str(broken)], monkeypatch) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_options_validate_in_python_too():
    with pytest.raises(UsageError, match="N=2 needles < R=3"):
        NeedleOptions(data="x", nr=["2/3"])
    with pytest.raises(UsageError, match="outside 0..100"):
        NeedleOptions(data="x", depths=[150])
    with pytest.raises(UsageError, match="--seed"):
        NeedleOptions(data="x", seed=-1)


def test_outputs_replace_atomically(tmp_path):
    from diffattn.eval.common import new_figure

    out = tmp_path / "res"
    out.mkdir()
    (out / "old.txt").write_text("old")
    fig, ax = new_figure()
    ax.plot([0, 1], [1, 0])
    write_outputs(out, {"a": 1}, "# md\n", {"p.png": fig})
    assert sorted(p.name for p in out.iterdir()) == ["p.png", "results.json", "results.md"]

    class Broken:
        def savefig(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_outputs(out, {"a": 2}, "# md2\n", {"q.png": Broken()})
    assert json.loads((out / "results.json").read_text()) == {"a": 1}  # the previous results survive
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]  # no temporary directory left behind
    a, b = TaskResult("t", {}, ""), TaskResult("t", {}, "")
    a.figures["x.png"] = Broken()
    a.notes.append("n")
    assert b.figures == {} and b.notes == []  # each result owns its containers (no shared mutable default)


@pytest.mark.parametrize("task", ["ppl", "needle", "attention-noise", "outliers", "lambda", "quant", "icl",
                                  "hallucination"])
def test_help_never_shows_a_none_default(task, capsys):
    """Options decided at run time say how in their help text; "(default: None)" says nothing."""
    from diffattn.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", task, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "--seed" in text
