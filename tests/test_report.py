"""The compare report's rendering, on the committed cpu-tiny results: HTML emphasis, the validation-loss panel
of runs with a single evaluation, integer layer ticks on the λ plot."""

import copy
import json
import shutil
from pathlib import Path

import pytest

from diffattn.experiments import report

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "cpu-tiny" / "results.json"


@pytest.fixture()
def figures(monkeypatch):
    """Every figure the report makes, still open (the report closes them when done)."""
    import matplotlib.pyplot as plt

    from diffattn.eval import common

    made = []
    real = common.new_figure

    def spy(*a, **k):
        fig, axes = real(*a, **k)
        made.append(fig)
        return fig, axes

    monkeypatch.setattr(common, "new_figure", spy)
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    return made


def test_html_renders_emphasis_not_asterisks():
    assert report._inline_md("only the *direction* of **each** effect, 2 * 3, `a*b`") == (
        "only the <em>direction</em> of <b>each</b> effect, 2 * 3, <code>a*b</code>")


def test_cpu_tiny_report_html_has_no_literal_markdown(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    shutil.copy(RESULTS, out / "results.json")
    page = report.write_report(out, "html").read_text()
    assert "*direction*" not in page and "<em>direction</em>" in page and "**" not in page


def test_single_evaluation_runs_get_a_final_loss_panel_and_layers_integer_ticks(tmp_path, figures):
    from matplotlib.ticker import MaxNLocator

    results = json.loads(RESULTS.read_text())
    one_eval = copy.deepcopy(results)
    for by_seed in one_eval["runs"].values():
        for run in by_seed.values():
            run["metrics"]["val"] = run["metrics"]["val"][-1:]
    report.build(one_eval, tmp_path)
    loss_fig = figures[0]
    val_ax = loss_fig.axes[1]
    assert val_ax.get_title() == "final validation loss (mean over seeds)"
    bars = [p.get_height() for p in val_ax.patches]
    assert bars == pytest.approx([run["0"]["summary"]["val_loss"] for run in results["runs"].values()])
    lam_ax = next(f.axes[0] for f in figures if f.axes and f.axes[0].get_title() == "λ by depth")
    loc = lam_ax.xaxis.get_major_locator()
    assert isinstance(loc, MaxNLocator) and all(float(t).is_integer() for t in lam_ax.get_xticks())
    figures.clear()
    report.build(results, tmp_path)  # several evaluations per run: the curves stay
    assert figures[0].axes[1].get_title() == "validation loss"


def test_write_text_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    """The one atomic file writer (fsutil) the report, compare, the init study and the GPU check use."""
    import os

    from diffattn.fsutil import write_text_atomic

    target = tmp_path / "results.json"
    write_text_atomic(target, "old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    monkeypatch.undo()
    assert write_text_atomic(target, "new").read_text() == "new"
