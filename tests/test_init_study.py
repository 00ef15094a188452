"""The init study's rule for the default (experiments/init_study.py ``choose``), on constructed results."""

import pytest

from diffattn.experiments import init_study


def _option(val_loss: float, recall_mean: float) -> dict:
    """One option's {"lm", "recall"} compare results: the baseline's LM loss and its recall accuracy (3 seeds);
    the DIFF variant is deliberately better on both, which the rule must ignore."""
    def rec(acc):
        by_n = [{"n": n, "accuracy": acc} for n in (1, 2, 3, 4)]
        return {"by_n": by_n, "curve": {"steps": [10, 20], "accuracy": {"1": [acc, acc], "2": [acc, acc]}}}
    seeds = ("0", "1", "2")
    lm = {"variants": ["standard", "diff_v1"],
          "runs": {"standard": {s: {"summary": {"val_loss": val_loss + 0.001 * i}} for i, s in enumerate(seeds)},
                   "diff_v1": {s: {"summary": {"val_loss": val_loss - 1}} for s in seeds}}}
    opts = {"context": 8, "steps": 20, "curve_points": 2, "competence": 0.9}
    recall = {"variants": ["standard", "diff_v1"], "runs": {},
              "recall": {"options": opts, "runs": {"standard": {s: rec(recall_mean) for s in seeds},
                                                   "diff_v1": {s: rec(1.0) for s in seeds}}}}
    return {"lm": lm, "recall": recall}


def test_rule_picks_the_option_best_for_the_baseline_on_both_tasks():
    results = {"gpt2": _option(5.7, 0.5), "torch": _option(5.6, 0.2), "mixed": _option(5.5, 0.6)}
    pick, why = init_study.choose(results)
    assert pick == "mixed" and "both the lowest LM validation loss" in why


def test_rule_falls_back_to_the_best_mean_rank_then_recall():
    # torch best on LM, gpt2 best on recall, mixed second on both: rank sums 2 (mixed) vs 3, 3 and 4
    results = {"gpt2": _option(5.9, 0.9), "torch": _option(5.4, 0.1), "mixed": _option(5.5, 0.8),
               "scaled": _option(5.6, 0.7)}
    pick, why = init_study.choose(results)
    assert pick == "mixed" and "No option is best on both" in why
    # two options tied on mean rank: the better recall wins
    tied = {"gpt2": _option(5.9, 0.9), "torch": _option(5.4, 0.1)}
    assert init_study.choose(tied)[0] == "gpt2"


def test_tables_and_metrics_read_every_seed():
    results = {"gpt2": _option(5.7, 0.5), "mixed": _option(5.5, 0.95)}
    m = init_study.metrics(results["mixed"])["standard"]
    assert m["val_loss"] == pytest.approx({"0": 5.5, "1": 5.501, "2": 5.502})
    assert m["steps_n1"] == {"0": 10, "1": 10, "2": 10}
    assert init_study.metrics(results["gpt2"])["standard"]["steps_n1"] == {"0": 30.0, "1": 30.0, "2": 30.0}  # > budget
    base = init_study.baseline_table(results)
    assert "| mixed | 5.501 ± 0.001 | 0.950 ± 0.000 |" in base
    table = init_study.table(results)
    assert "| mixed | diff_v1 | LM val loss |" in table and "reproduced" in table


def test_bad_arguments_are_one_line_and_exit_2(capsys, tmp_path):
    for argv in (["--options", "xavier"], ["--seeds", "0"], ["--variants", "diff_v1"], ["--tasks", "lm,vision"]):
        assert init_study.main(argv + ["--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("init_study: error:") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
