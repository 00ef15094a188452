"""The recall-with-distractors task (experiments/recall.py): generator invariants, determinism, the
attention shares, a micro recall study through ``diffattn compare`` whose report agrees with its
results, the seed-paired verdict rule, the learning curves, steps to competence and the validity gate."""

import json
import math
import re

import numpy as np
import pytest
import torch

from diffattn import presets
from diffattn.cli import main
from diffattn.experiments import recall
from diffattn.experiments.paper import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, VERDICT_RULE, verdict
from diffattn.experiments.recall import FILL, PAIR, REST, RecallStudyOptions, RecallTask, make_batch
from diffattn.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _decode(task: RecallTask, ids: np.ndarray):
    """(kind, key, value) of every token id, from the vocabulary layout alone."""
    out = []
    for t in ids:
        t = int(t)
        if t in (recall.BOS, recall.SEP):
            out.append(("special", None, None))
        elif task.pair_tokens == 1 and task.pair_base <= t < task.filler_base:
            k, v = divmod(t - task.pair_base, task.values)
            out.append(("pair", k, v))
        elif task.filler_base <= t < task.key_base:
            out.append(("noise", None, None))
        elif task.key_base <= t < task.value_base:
            out.append(("key", t - task.key_base, None))
        else:
            assert task.value_base <= t < task.vocab_size
            out.append(("value", None, t - task.value_base))
    return out


@pytest.mark.parametrize("pair_tokens,filler", [(1, "noise"), (1, "lookalike"), (2, "noise"), (2, "lookalike")])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_generator_invariants(pair_tokens, filler, n):
    task = RecallTask(keys=17, values=5, context=16, queries=4, pair_tokens=pair_tokens, filler=filler, filler_vocab=7)
    b = make_batch(task, np.random.default_rng(7), 24, n)
    assert b.ids.shape == (24, task.seq_len) and int(b.ids.max()) < task.vocab_size and int(b.ids.min()) >= 0
    C = task.context
    for i in range(24):
        ids = b.ids[i].numpy()
        assert ids[0] == recall.BOS and ids[1 + C] == recall.SEP
        keys = list(b.keys[i])
        assert len(set(keys)) == n  # keys are distinct within a sequence
        toks = _decode(task, ids)
        ctx = toks[1:1 + C]
        # the N pairs are in the context, at the slots marked PAIR, and the answer mask points at them
        if pair_tokens == 1:
            pairs = {(k, v) for (kind, k, v), kd in zip(ctx, b.kind[i, 1:1 + C].tolist()) if kd == PAIR}
        else:
            pos = [j for j in range(C) if b.kind[i, 1 + j] == PAIR]
            pairs = {(ctx[a][1], ctx[a + 1][2]) for a in pos[0::2]}
            assert all(ctx[a][0] == "key" and ctx[a + 1][0] == "value" for a in pos[0::2])
        assert pairs == set(zip(b.keys[i].tolist(), b.values[i].tolist()))
        assert int((b.kind[i] == PAIR).sum()) == n * pair_tokens
        assert int((b.kind[i] == FILL).sum()) == C - n * pair_tokens
        assert bool((b.kind[i, [0, 1 + C]] == REST).all())
        # filler never holds a queried key (nor any of the N keys)
        queried = set(b.queried[i].tolist())
        assert queried <= set(keys)
        for j in range(C):
            if b.kind[i, 1 + j] == FILL:
                kind, k, _ = ctx[j]
                assert kind in ("noise", "key", "value", "pair")
                assert kind == ("noise" if filler == "noise" else kind)
                assert k is None or k not in keys
        # each query is "key value" with the pair's value; only first occurrences are scored
        value_of = dict(zip(b.keys[i].tolist(), b.values[i].tolist()))
        scored = 0
        for q in range(task.queries):
            p = 2 + C + 2 * q
            k = int(ids[p]) - task.key_base
            assert k == b.queried[i, q] and int(ids[p + 1]) - task.value_base == value_of[k]
            if int(b.targets[i, p]) >= 0:
                scored += 1
                assert int(b.targets[i, p]) == task.value_base + value_of[k]  # the target is the queried value
                answer = torch.nonzero(b.answer[i, p]).flatten().tolist()
                assert len(answer) == pair_tokens and all(b.kind[i, a] == PAIR for a in answer)
                assert _decode(task, ids[answer[:1]])[0][1] == k  # the answer slot holds the queried key
        assert scored == min(n, task.queries)
        assert int((b.targets[i] >= 0).sum()) == scored  # loss counts only the values after the keys


def test_same_seed_same_batches():
    task = RecallTask(context=16, keys=16)
    a = [make_batch(task, np.random.default_rng([3, 1]), 8, n) for n in (2, 5)]
    b = [make_batch(task, np.random.default_rng([3, 1]), 8, n) for n in (2, 5)]
    for x, y in zip(a, b):
        assert torch.equal(x.ids, y.ids) and torch.equal(x.targets, y.targets)
    c = make_batch(task, np.random.default_rng([4, 1]), 8, 2)
    assert not torch.equal(a[0].ids, c.ids)


def test_bad_task_options():
    with pytest.raises(ValueError, match="keys: must be >= 9"):
        RecallTask(keys=8, context=16, filler="lookalike")
    with pytest.raises(ValueError, match="context"):
        RecallTask(context=15)
    with pytest.raises(ValueError, match="unknown key"):
        RecallStudyOptions.from_mapping({"contxt": 8})
    with pytest.raises(ValueError, match="train_n"):
        RecallStudyOptions.from_mapping({"context": 8, "keys": 8, "train_n": [9]})
    with pytest.raises(ValueError, match="n must be in"):
        make_batch(RecallTask(context=8, keys=8), np.random.default_rng(0), 2, 5)


def test_attention_shares_partition_the_row_and_follow_the_maps():
    """Shares sum to 1 per layer (sum-normalised) and equal a hand computation on the effective maps."""
    opts = RecallStudyOptions.from_mapping({"context": 8, "keys": 8, "values": 4, "queries": 2, "d_model": 48,
                                            "n_head": 6, "head_dim": 8, "ffn_hidden": 64})
    for variant in ("standard", "diff_v1"):
        cfg = presets.matched(opts.baseline(kernel="eager"), variant)
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        b = make_batch(opts.task, np.random.default_rng(0), 4, 3)
        with torch.no_grad():
            _, maps = model(b.ids, return_maps=True)
        sh = recall._shares(maps, b, "sum")
        for layer in range(cfg.n_layer):
            assert math.isclose(sum(sh[c][layer] for c in recall.CATEGORIES), 1.0, abs_tol=1e-9)
        # by hand: first scored query of sequence 0, layer 0, head-averaged
        p = int(torch.nonzero(b.targets[0] >= 0)[0])
        rows = maps[0].effective[0, :, p].double()
        rows = rows / rows.sum(-1, keepdim=True)
        ans = rows[:, b.answer[0, p]].sum(-1).mean()
        bidx, pos = torch.nonzero(b.targets >= 0, as_tuple=True)
        all_ans = []
        for i, q in zip(bidx.tolist(), pos.tolist()):
            r = maps[0].effective[i, :, q].double()
            all_ans.append(float((r / r.sum(-1, keepdim=True))[:, b.answer[i, q]].sum(-1).mean()))
        assert math.isclose(sh["answer"][0], sum(all_ans) / len(all_ans), rel_tol=1e-9)
        assert 0 <= float(ans) <= 1 or variant != "standard"


def test_training_is_deterministic_and_learns_something():
    opts = RecallStudyOptions.from_mapping({"context": 8, "keys": 8, "values": 4, "queries": 4, "filler_vocab": 8,
                                            "d_model": 48, "n_head": 6, "head_dim": 8, "ffn_hidden": 64,
                                            "steps": 60, "batch_size": 16, "warmup_steps": 5, "eval_queries": 32})
    cfg = opts.baseline()
    a = recall.run_one(cfg, opts, 0)
    b = recall.run_one(cfg, opts, 0)
    assert a["train_loss"] == b["train_loss"] and a["by_n"] == b["by_n"]
    assert [r["n"] for r in a["by_n"]] == [1, 2, 3, 4]
    assert all(r["queries"] >= 32 for r in a["by_n"])
    assert a["train_loss"][-1] < a["train_loss"][0]  # the loss falls from chance (ln 4)
    assert a["chance"] == 0.25


# ------------------------------------------------------------------------ micro study through compare


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    from helpers import WORDS
    import random

    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        rng = random.Random(i)
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(200)) + ".\n")
    out = tmp_path_factory.mktemp("data") / "shards"
    assert main(["data", "prepare", "--corpus", str(root), "--tokenizer", "bpe:512", "--out", str(out),
                 "--val-fraction", "0.2", "--quiet"]) == 0
    return out


def test_compare_recall_report_json_and_plots_agree(corpus_dir, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["compare", "--preset", "micro", "--variants", "standard,diff_v1,diff_v2", "--data", str(corpus_dir),
            "--out", str(out), "--quiet", "--set", 'study.tasks=["ppl","recall"]', "--set", "study.bench_repeats=0",
            "--set", "train.max_steps=2", "--set", "train.eval_tokens=256", "--set", "eval.ppl.max_tokens=256",
            "--set", "study.v2_same_heads_baseline=false", "--set", "needle_mix.share=0"]  # the micro [recall] table
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    rec = results["recall"]
    assert rec["seeds"] == [0, 1] and set(rec["runs"]) == {"standard", "diff_v1", "diff_v2"}
    md = (out / "REPORT.md").read_text()
    assert (out / "recall_accuracy.png").stat().st_size > 1000 and "](recall_accuracy.png)" in md
    # the accuracy table shows the per-seed mean ± std of results.json
    for v, label in (("standard", "Transformer (baseline)"), ("diff_v1", "DIFF V1")):
        per = [rec["runs"][v][s]["by_n"] for s in ("0", "1")]
        for n in (1, 4):
            xs = [next(r["accuracy"] for r in by if r["n"] == n) for by in per]
            m, sd = sum(xs) / 2, math.sqrt(sum((x - sum(xs) / 2) ** 2 for x in xs))
            assert f"{m:.2f} ± {sd:.2f}" in md
        params = rec["models"][v]["params"]["total"]
        assert re.search(rf"\| {re.escape(label)} \| {params:,} \|", md)
        # attention-share table: one row per layer
        a0 = [rec["runs"][v][s]["by_n"][-1]["shares"]["answer"][0] for s in ("0", "1")]
        assert re.search(rf"\| {re.escape(label)} \| 0 \| {sum(a0) / 2:.3f} ± ", md)
    assert "## Recall amid distractors" in md and "where the query's attention goes" in md
    assert VERDICT_RULE.split(":")[0] in md
    # the validity gate reads the baseline's N = 1 accuracies of results.json
    gate = recall.validity_gate([rec["runs"]["standard"][s]["by_n"][0]["accuracy"] for s in ("0", "1")], 0.9)
    assert f"**{gate.line()}**" in md
    expected = re.escape(gate.not_testable) if not gate.valid else r"\*\*(reproduced|not reproduced|inconclusive)\*\*"
    assert re.search(r"DIFF V1 \| higher recall accuracy amid distractors .*" + expected, md)
    assert (out / "recall_curves.png").stat().st_size > 1000
    # the records are on disk per (variant, seed): a rerun reuses them
    rec_file = out / "recall" / "diff_v1" / "seed1.json"
    before = rec_file.stat().st_mtime_ns
    assert main(args) == 0
    assert rec_file.stat().st_mtime_ns == before
    # a bad [recall] option is one line, exit 2
    capsys.readouterr()
    assert main(args[:-2] + ["--set", "recall.context=7"]) == 2
    assert "[recall] context" in capsys.readouterr().err


def test_recall_only_study_trains_no_language_model(tmp_path, capsys):
    out = tmp_path / "recall-only"
    assert main(["compare", "--preset", "micro", "--variants", "standard,shared_diff", "--out", str(out), "--quiet",
                 "--set", 'study.tasks=["recall"]', "--set", "recall.seeds=1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["runs"] == {} and results["data"] is None and not (out / "runs").exists()
    assert set(results["recall"]["runs"]) == {"standard", "shared_diff"}
    assert results["models"]["shared_diff"] == results["recall"]["models"]["shared_diff"]
    md = (out / "REPORT.md").read_text()
    assert "No language model in this study" in md and "## Language-modelling loss" not in md
    assert "## Recall amid distractors" in md
    # one seed: the fixed margins apply, and the summary printed by the CLI has the recall column
    assert "recall acc (mean over N)" in capsys.readouterr().out


def test_recall_worker_processes_give_the_same_records(tmp_path):
    """Runs spread over worker processes (the demo's two) equal the in-process runs bit for bit."""
    records = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert main(["compare", "--preset", "micro", "--variants", "standard,diff_v1", "--out", str(out), "--quiet",
                     "--set", 'study.tasks=["recall"]', "--set", "recall.seeds=1", "--set", f"recall.workers={workers}"]) == 0
        runs = json.loads((out / "results.json").read_text())["recall"]["runs"]
        records[workers] = {v: {s: {k: x for k, x in r.items() if k not in ("train_s", "eval_s")}
                                for s, r in by.items()} for v, by in runs.items()}
    assert records[1] == records[2] and set(records[1]) == {"standard", "diff_v1"}


# ------------------------------------------------------------------------ the verdict rule
@pytest.mark.parametrize("better", ["higher", "lower"])
def test_paired_verdict_rule_three_seeds(better):
    s = 1 if better == "higher" else -1
    base = [1.0, 2.0, 3.0]  # a large spread across seeds that pairing removes
    # every seed the paper's way, mean beyond 2 SE
    v = verdict([b + s * d for b, d in zip(base, [0.10, 0.12, 0.11])], base, better)
    assert v.verdict == REPRODUCED and v.n == 3
    # mirror image
    assert verdict([b - s * d for b, d in zip(base, [0.10, 0.12, 0.11])], base, better).verdict == NOT_REPRODUCED
    # one seed the other way
    assert verdict([b + s * d for b, d in zip(base, [0.10, 0.12, -0.01])], base, better).verdict == INCONCLUSIVE
    # every seed the paper's way but the mean within 2 SE: d = (0.01, 0.01, 1.0): mean 0.34, SE 0.33
    assert verdict([b + s * d for b, d in zip(base, [0.01, 0.01, 1.0])], base, better).verdict == INCONCLUSIVE
    # unpaired means would call this one inconclusive (the seed spread of 1.0 swamps 0.1); paired, it is clear
    assert verdict({"0": 1.1 * (s > 0) + 0.9 * (s < 0), "1": 2 + 0.1 * s, "2": 3 + 0.1 * s},
                   {"0": 1.0, "1": 2.0, "2": 3.0}, better).verdict == REPRODUCED


def test_paired_verdict_rule_one_seed_and_pairing():
    assert verdict([0.9], [0.5], "higher", min_effect=0.1).verdict == REPRODUCED
    assert verdict([0.3], [0.5], "higher", min_effect=0.1).verdict == NOT_REPRODUCED
    assert verdict([0.55], [0.5], "higher", min_effect=0.1).verdict == INCONCLUSIVE
    # seeds pair by key; a seed missing on one side is left out
    v = verdict({"0": 2.0, "1": 2.1, "7": 9.0}, {"0": 1.0, "1": 1.1, "2": 0.0}, "higher")
    assert v.n == 2 and v.verdict == REPRODUCED and math.isclose(v.diff, 1.0)
    assert verdict([None, 0.9], [0.5, None], "higher").verdict == "not measured"
    with pytest.raises(ValueError, match="one value per seed"):
        verdict([1.0, 2.0], [1.0], "higher")
    with pytest.raises(ValueError):
        verdict([1.0], [1.0], "sideways")


# ------------------------------------------------------------------------ curves, steps to competence, the gate
def _tiny_opts(**kw):
    base = {"context": 8, "keys": 8, "values": 4, "queries": 4, "filler_vocab": 8, "d_model": 48, "n_head": 6,
            "head_dim": 8, "ffn_hidden": 64, "steps": 40, "batch_size": 16, "warmup_steps": 5, "eval_queries": 32,
            "curve_points": 4, "curve_queries": 16}
    return RecallStudyOptions.from_mapping({**base, **kw})


def test_learning_curve_leaves_training_unchanged_and_matches_a_direct_evaluation():
    opts = _tiny_opts()
    cfg = opts.baseline()
    curve: dict = {}
    with_curve, losses_a = recall.train_model(cfg, opts, 3, curve=curve)
    without, losses_b = recall.train_model(cfg, opts, 3)
    # the curve draws no random number the training uses and runs under no_grad in eval mode: both trainings are the
    # same operations in the same order, in one process at one thread count, so bit for bit on any CPU
    assert losses_a == losses_b
    assert all(torch.equal(a, b) for a, b in zip(with_curve.state_dict().values(), without.state_dict().values()))
    assert curve["steps"] == [10, 20, 30, 40] == opts.curve_steps
    assert set(curve["accuracy"]) == {"1", "2", "4"} and opts.curve_ns == [1, 2, 4] and opts.speed_n == 2
    # its last point is the trained model's accuracy on the same fixed batches
    sets = recall.curve_sets(opts, 3)
    for n, batches in sets.items():
        assert curve["accuracy"][str(n)][-1] == recall.batches_accuracy(without, batches)
        assert sum(int((b.targets >= 0).sum()) for b in batches) >= 16
    assert _tiny_opts(curve_points=100, steps=5).curve_steps == [1, 2, 3, 4, 5]  # at most one point per step
    with pytest.raises(ValueError, match="curve_points"):
        _tiny_opts(curve_points=0)
    with pytest.raises(ValueError, match="competence"):
        _tiny_opts(competence=1.5)


def test_steps_to_competence_and_the_budget_stand_in():
    rec = {"curve": {"steps": [25, 50, 75, 100], "accuracy": {"1": [0.2, 0.95, 0.8, 1.0], "4": [0.1, 0.3, 0.5, 0.89]}}}
    assert recall.steps_to(rec, 1, 0.9) == 50  # the first point at or above the level, even if it dips after
    assert recall.steps_to(rec, 1, 0.95) == 50 and recall.steps_to(rec, 1, 0.96) == 100
    assert recall.steps_to(rec, 4, 0.9) is None  # never within the budget
    opts = {"steps": 100, "curve_points": 4, "competence": 0.9}
    assert recall.steps_or_budget(rec, 1, opts) == 50
    assert recall.steps_or_budget(rec, 4, opts) == 125  # "> budget": the budget plus one curve interval
    with pytest.raises(ValueError, match="no learning curve"):
        recall.steps_to({"by_n": []}, 1, 0.9)
    # compared as such: a variant that got there beats one that did not; two that did not are level
    never = {"0": 125.0, "1": 125.0, "2": 125.0}
    assert verdict({"0": 50.0, "1": 75.0, "2": 50.0}, never, "lower").verdict == REPRODUCED
    assert verdict(never, dict(never), "lower").verdict == INCONCLUSIVE


def test_validity_gate_on_constructed_inputs():
    gate = recall.validity_gate([0.95, 0.12, 0.91], 0.9)  # median 0.91: passes although one seed failed
    assert gate.valid and gate.median == 0.91 and "passed" in gate.line()
    low = recall.validity_gate([0.95, 0.12, 0.15], 0.9)  # median 0.15
    assert not low.valid and low.not_testable == "not testable at this budget (baseline N = 1 accuracy 0.15)"
    assert recall.validity_gate([0.8, 1.0], 0.9).valid  # an even count: the mean of the middle two
    assert not recall.validity_gate([0.8, 0.99], 0.9).valid
    with pytest.raises(ValueError):
        recall.validity_gate([], 0.9)


def _constructed_results(n1_base: list[float]) -> dict:
    """A recall-only results.json with hand-set accuracies: the baseline's N = 1 accuracies are ``n1_base``."""
    def record(n1, other, steps_hit):
        by_n = [{"n": n, "queries": 64, "accuracy": n1 if n == 1 else other, "loss": 1.0,
                 "shares": {c: [0.25, 0.25] for c in recall.CATEGORIES}} for n in (1, 2, 3, 4)]
        acc = [0.95 if s >= steps_hit else 0.2 for s in (10, 20, 30, 40)]
        return {"by_n": by_n, "chance": 0.25, "curve": {"steps": [10, 20, 30, 40],
                                                         "accuracy": {"1": acc, "2": acc, "4": acc}}}
    opts = _tiny_opts().to_dict()
    runs = {"standard": {str(s): record(a, 0.3, 40) for s, a in enumerate(n1_base)},
            "diff_v1": {str(s): record(1.0, 0.6, 20) for s in range(len(n1_base))}}
    models = {v: {"config": {}, "params": {"total": 1000}} for v in runs}
    return {"preset": "constructed", "variants": ["standard", "diff_v1"], "seeds": [0], "runs": {}, "models": models,
            "recall": {"options": opts, "seeds": list(range(len(n1_base))), "models": models, "runs": runs}}


@pytest.mark.parametrize("n1_base,testable", [([0.95, 0.97, 0.93], True), ([0.15, 0.95, 0.12], False)])
def test_report_gate_turns_every_recall_verdict_into_not_testable(tmp_path, n1_base, testable):
    from diffattn.experiments.render import Block, to_markdown
    from diffattn.experiments.report import Study, section_recall

    summary: list = []
    blocks = section_recall(Study(_constructed_results(n1_base)), tmp_path, summary)
    md = to_markdown(blocks + [Block("table", header=["variant", "claim", "values", "verdict"], rows=summary)])
    verdict_rows = [line for line in md.splitlines() if line.startswith("| DIFF V1 | ")]
    assert verdict_rows
    assert "Validity gate: a recall verdict is drawn only from models" in md  # the rule is printed
    assert (tmp_path / "recall_curves.png").stat().st_size > 1000
    if testable:
        assert "**Validity gate passed" in md and not any("not testable" in line for line in verdict_rows)
        # DIFF V1 reaches 0.9 at step 20 on every seed, the baseline at 40: fewer steps, reproduced
        assert re.search(r"learns retrieval faster .*\| 20, 20, 20 vs 40, 40, 40 \| \*\*reproduced\*\*", md)
    else:
        assert "**Validity gate failed: the baseline's median accuracy at N = 1 is 0.150 (< 0.9).**" in md
        assert "reproduced" not in md.replace("not reproduced", "")  # no verdict of either sign
        assert "not reproduced" not in md
        table_rows = [line for line in verdict_rows if "not testable" in line]
        assert table_rows and all(line.count("not testable at this budget (baseline N = 1 accuracy 0.15)") >= 1
                                  for line in table_rows)
