"""``diffattn compare`` end to end on a micro study (local corpus, a few steps), its report, determinism,
parameter matching, the needle training mix, and bad input."""

import json
import random
import re

import pytest
import torch

from diffattn.cli import main
from diffattn.experiments import compare, report
from diffattn.experiments.needle_mix import TRAIN_CITIES, TRAIN_NUMBERS, NeedleMixSampler
from diffattn.experiments.paper import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, verdict
from diffattn import variants
from diffattn.experiments.presets import load_study
from helpers import WORDS  # tests/helpers.py

SAME_HEADS = variants.get("diff_v2").same_heads.name  # DIFF V2's same-heads control (its registry row)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A prepared shard directory (BPE 512) from 60 local documents."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(60):
        rng = random.Random(i)
        text = " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 25))).capitalize() + "."
                        for _ in range(12))
        (root / f"doc{i:02d}.txt").write_text(text + "\n")
    out = tmp_path_factory.mktemp("data") / "shards"
    assert main(["data", "prepare", "--corpus", str(root), "--tokenizer", "bpe:512", "--out", str(out),
                 "--val-fraction", "0.2", "--quiet"]) == 0
    return out


MICRO = {  # the test tokenizer (BPE 512 on a 60-word corpus) spends ~100 tokens on the needle template
    "model.max_seq_len": 320,
    "train.seq_len": 320,
    "study.tasks": ["ppl", "needle", "attention-noise", "outliers", "lambda"],
    "study.bench_repeats": 1,
    "train.max_steps": 4,
    "train.eval_every": 2,
    "train.eval_tokens": 384,
    "eval.ppl.max_tokens": 384,
    "eval.needle.nr": ["1/1", "2/2"],
    "eval.needle.lengths": [310],
    "eval.needle.depths": [0, 100],
    "eval.needle.max_new_tokens": 4,
    "eval.attention-noise.length": 300,
    "eval.attention-noise.depths": [0, 50],
    "eval.outliers.tokens": 384,
}


def test_compare_end_to_end_report_agrees_with_results(data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["compare", "--preset", "micro", "--variants", "standard,diff_v1", "--data", str(data_dir),
            "--out", str(out), "--quiet"]
    for k, v in MICRO.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'REPORT.md'}" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["variants"] == ["standard", "diff_v1"]
    for key in ("preset", "seeds", "tasks", "models", "runs", "cost", "environment", "wall_time_s", "data"):
        assert key in results
    md = (out / "REPORT.md").read_text()
    for png in ("loss_curves.png", "needle_heatmaps.png", "attention_noise.png", "lambda_by_depth.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in md

    # the report's numbers are the results' numbers
    for variant in results["variants"]:
        val = results["runs"][variant]["0"]["summary"]["val_loss"]
        label = report.label(variant)
        assert re.search(rf"\| {re.escape(label)} \| {val:.4f} \|", md), variant
        params = results["models"][variant]["params"]["total"]
        assert f"| {label} | " in md and f"{params:,}" in md
        assert (out / results["runs"][variant]["0"]["run_dir"] / "eval" / "needle" / "results.json").is_file()
    by_nr = results["runs"]["diff_v1"]["0"]["eval"]["needle"]["results"]["by_nr"]
    acc = [row["accuracy"] for row in by_nr]
    assert re.search(r"\| DIFF V1 \| " + r" \| ".join(f"{a:.2f}" for a in acc) + r" \|", md)

    # parameter matching is asserted in the report: V1 within 0.5% of its baseline
    v1, base = (results["models"][v]["params"]["total"] for v in ("diff_v1", "standard"))
    assert abs(v1 - base) / base < 0.005
    assert "(within the 0.5% tolerance)" in md
    assert results["models"]["diff_v1"]["params"]["attention.qkvo"] == results["models"]["standard"]["params"]["attention.qkvo"]

    # every headline claim has the paper's number and a verdict
    assert "## Summary: the papers' claims, checked" in md
    assert md.count("Paper: ") >= 4
    assert re.search(r"\*\*(reproduced|not reproduced|inconclusive)\*\*", md)
    cost = results["cost"]["variants"]
    assert cost["standard"]["throughput_ratio"] == 1.0 and cost["diff_v1"]["tokens_per_s"] > 0

    # `diffattn report` regenerates it, also as one self-contained HTML page
    (out / "REPORT.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "REPORT.md").read_text() == md
    assert main(["report", str(out), "--format", "html"]) == 0
    page = (out / "REPORT.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<table>" in page

    # re-running the same study reuses every finished run and evaluation
    before = (out / "runs" / "diff_v1" / "seed0" / "summary.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "runs" / "diff_v1" / "seed0" / "summary.json").stat().st_mtime_ns == before
    # more seeds extend the study: seed 0 is reused as it is, seed 1 is added; another setting is refused
    assert main(args + ["--seeds", "2"]) == 0
    assert (out / "runs" / "diff_v1" / "seed0" / "summary.json").stat().st_mtime_ns == before
    assert (out / "runs" / "diff_v1" / "seed1" / "summary.json").is_file()
    assert json.loads((out / "results.json").read_text())["seeds"] == [0, 1]
    capsys.readouterr()
    assert main(args + ["--set", "train.lr=0.5"]) == 2
    assert "holds a different study" in capsys.readouterr().err


def test_same_seed_same_losses(data_dir, tmp_path):
    """Two runs of the same study settings see the same tokens and give the same losses (CPU)."""
    from diffattn.eval.tokenizer import TextTokenizer

    study = load_study("micro", {"model.max_seq_len": 320, "train.seq_len": 320, "train.max_steps": 3,
                                 "train.eval_tokens": 384})
    tok = TextTokenizer.from_file(data_dir / "tokenizer.json")
    hay = compare.haystack_texts(data_dir, tok)
    losses = []
    for name in ("a", "b"):
        compare.train_run(study, "diff_v1", 0, data_dir, tmp_path / name, tok, hay, log=lambda m: None)
        losses.append([r["loss"] for r in compare.read_metrics(tmp_path / name)["train"]])
    assert losses[0] == losses[1] and len(losses[0]) >= 1


def test_study_variants_and_v2_baselines():
    study = load_study("micro", {"study.variants": ["diff_v2"]})
    assert study.variants == ("standard", "diff_v2", SAME_HEADS)  # the baseline is always there
    v2, same, base = (study.model_config(v) for v in study.variants[1:] + ("standard",))
    assert (base.n_head, v2.n_head, same.n_head) == (6, 4, 4)  # 1.5x-heads baseline and same-heads baseline
    assert same.attention == "standard" and same.head_dim == v2.head_dim == base.head_dim


def test_needle_mix_rows_are_deterministic_and_disjoint_from_evaluation(data_dir):
    from diffattn.data.loader import TokenShards, WindowSampler
    from diffattn.eval.needle import CITIES
    from diffattn.eval.tokenizer import TextTokenizer

    tok = TextTokenizer.from_file(data_dir / "tokenizer.json")
    base = WindowSampler(TokenShards(data_dir, "train"), 300, 8, seed=3)
    texts = compare.haystack_texts(data_dir, tok)
    mix = NeedleMixSampler(base, tok, texts, share=0.5, seed=3, max_needles=3)
    x, y = mix.batch(5)
    x2, _ = mix.batch(5)
    assert torch.equal(x, x2) and x.shape == (8, 300) and torch.equal(x[:, 1:], y[:, :-1])
    # micro-batches of an accumulation step are slices of the same global batch
    parts = torch.cat([mix.batch(5, micro=m, n_micro=2)[0] for m in range(2)])
    assert torch.equal(parts, x)
    replaced = [i for i in range(8) if mix.sequence(5, i) is not None]
    assert 0 < len(replaced) < 8
    for i in replaced:
        text = tok.decode(x[i].tolist() + [int(y[i, -1])])
        assert "The special magic" in text
        city = re.search(r"What is the special magic (.+?) number\?", text).group(1)
        number = int(re.findall(r"\d+", text.rsplit("number is", 1)[1])[0])
        assert city in TRAIN_CITIES and city not in CITIES
        assert TRAIN_NUMBERS[0] <= number <= TRAIN_NUMBERS[1]
        assert f"The special magic {city} number is: {number}" in text  # the answer is in the context


def test_verdicts():
    assert verdict([2.9, 2.91], [3.0, 3.01], "lower").verdict == REPRODUCED
    assert verdict([3.1, 3.11], [3.0, 3.01], "lower").verdict == NOT_REPRODUCED
    assert verdict([2.9, 3.2], [3.0, 3.05], "lower").verdict == INCONCLUSIVE  # within the spread
    assert verdict([0.9], [0.5], "higher", min_effect=0.1).verdict == REPRODUCED
    assert verdict([0.55], [0.5], "higher", min_effect=0.1).verdict == INCONCLUSIVE
    with pytest.raises(ValueError):
        verdict([1.0], [1.0], "sideways")


def test_bad_input_exits_2(data_dir, tmp_path, capsys):
    cases = [
        (["compare", "--preset", "nope"], "unknown preset 'nope'"),
        (["compare", "--preset", "micro", "--variants", "standard,diff_v9"], "unknown ['diff_v9']"),
        (["compare", "--preset", "micro", "--set", "train.max_steps=-1", "--data", str(data_dir),
          "--out", str(tmp_path / "x")], "TrainConfig.max_steps"),
        (["compare", "--preset", "micro", "--set", "train.out=elsewhere"], "[train] out is set by the study"),
        (["compare", "--preset", "micro", "--data", str(tmp_path / "missing")], "not a shard directory"),
        (["compare", "--preset", "micro", "--set", "model.n_head=5"], "no parameter-matched"),
        (["report", str(tmp_path)], "no results.json"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert not (tmp_path / "x").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["compare", "--preset", "micro", "--data", str(data_dir), "--out", str(other)]) == 2
    assert "not a compare output directory" in capsys.readouterr().err


def test_compare_log_lines_when_stderr_is_a_file(data_dir, tmp_path, capsys):
    """`diffattn compare ... 2> log`: each training run prints a line per log_every steps and per evaluation, and
    compare a line per phase with its duration; --quiet prints none of them."""
    base = ["compare", "--preset", "micro", "--variants", "standard", "--data", str(data_dir)]
    sets = {**MICRO, "study.tasks": ["ppl"], "study.bench_repeats": 0, "train.log_every": 2, "train.progress": True}
    for k, v in sets.items():
        base += ["--set", f"{k}={json.dumps(v)}"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err.splitlines()
    steps = [line for line in err if line.startswith("train standard: step ")]
    assert [line.split()[3] for line in steps] == ["2/4", "4/4"] and all(" tok/s" in line for line in steps)
    assert [line.split()[3] for line in err if line.startswith("evaluation at step")] == ["0:", "2:", "4:"]
    assert any(re.match(r"\[compare\] standard seed 0: trained in \d+\.\ds, val_loss \d+\.\d{4}$", line) for line in err)
    assert any(re.match(r"\[compare\]   eval ppl: \d+\.\ds$", line) for line in err)
    assert main([*base, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
