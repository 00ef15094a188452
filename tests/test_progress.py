# .venv/bin/python -m pytest tests/test_progress.py -q
"""utils/progress.py: the plain progress lines of log files, phase timing, and the bar on a terminal."""

import pytest

from diffattn.utils.progress import StepProgress, duration, lambda_summary, phase


def test_duration_and_lambda_summary():
    assert [duration(s) for s in (0.04, 42.25, 312, 7500)] == ["0.0 s", "42.2 s", "5m12s", "2h05m"]
    assert lambda_summary([]) is None and lambda_summary(None) is None
    assert lambda_summary([0.8125]) == "λ 0.812"
    assert lambda_summary([0.79, 0.84, 0.81]) == "λ 0.813 [0.790, 0.840]"


def test_plain_lines_off_a_terminal_with_an_eta():
    lines = []
    p = StepProgress("train x", 10, initial=2, write=lines.append, terminal=False)
    assert p.bar is None
    p.advance()  # no output for steps between reports
    p.report(4, loss=1.23456, tokens_per_s=1234.5, lambdas=[0.5, 0.7])
    p.report(10, loss=1.0)
    p.line("evaluation at step 10: val_loss 1.0000 (0.1 s)")
    p.close()
    assert lines[0].startswith("train x: step 4/10 loss 1.2346 1,234 tok/s λ 0.600 [0.500, 0.700] eta ")
    assert lines[1] == "train x: step 10/10 loss 1.0000"  # no ETA at the end
    assert lines[2].startswith("evaluation at step 10")
    quiet = []
    q = StepProgress("x", 3, enabled=False, write=quiet.append, terminal=False)
    q.report(1, loss=1.0)
    assert quiet == []


def test_a_bar_on_a_terminal_and_no_plain_lines(capsys):
    lines = []
    p = StepProgress("train x", 4, write=lines.append, terminal=True)
    assert p.bar is not None
    p.advance()
    p.report(1, loss=2.0, lambdas=[0.3])
    p.close()
    assert lines == [] and p.bar is None


def test_phase_prints_its_duration_and_records_it():
    lines, times = [], {}
    with phase("loading", lines.append, times) as info:
        info["detail"] = "3 files"
    assert times["loading"] >= 0 and len(lines) == 1
    assert lines[0].startswith("loading: ") and lines[0].endswith(" s (3 files)")
    with pytest.raises(ValueError), phase("broken", lines.append, times):
        raise ValueError("bad input")
    assert len(lines) == 1 and "broken" not in times  # the error is the command's one line
