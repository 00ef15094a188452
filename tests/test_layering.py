"""The architecture's layering rules (docs/architecture.md) hold: tools/check_layering.py finds no violation,
and it does find each kind of violation in a tree that has one."""

import importlib.util
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_layering", REPO / "tools" / "check_layering.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_source_tree_keeps_the_layering_rules():
    checker = _checker()
    assert checker.check() == []
    assert checker.check_cycles() == []  # no two modules import each other, lazily or not
    assert checker.check_renderers() == []  # the report reads records and imports no runner


def test_a_report_that_imports_a_runner_is_caught(tmp_path):
    checker = _checker()
    root = tmp_path / "diffattn"
    shutil.copytree(REPO / "src" / "diffattn", root)
    (root / "experiments" / "study_view.py").write_text(
        (root / "experiments" / "study_view.py").read_text() + "\n\ndef _lazy():\n    from .recall import train_model  # noqa\n")
    found = checker.check_renderers(root)
    assert any(p.startswith("experiments/report.py: the report imports a runner: experiments/report.py -> ")
               and p.endswith("experiments/study_view.py -> experiments/recall.py") for p in found), found


def test_a_planted_lazy_cycle_is_caught(tmp_path):
    """A cycle that Python never trips over (one side imports inside a function) and one through an importlib
    string are both reported, with the file and line of each edge."""
    checker = _checker()
    root = tmp_path / "diffattn"
    shutil.copytree(REPO / "src" / "diffattn", root)
    assert checker.check_cycles(root) == []
    (root / "eval" / "common.py").write_text((root / "eval" / "common.py").read_text()
                                             + "\n\ndef _lazy():\n    from .ppl import run_ppl  # noqa\n")
    (root / "variants.py").write_text((root / "variants.py").read_text() + "\n\ndef _bad():\n    import importlib\n"
                                      "    return importlib.import_module('diffattn.model.attention')\n")
    found = checker.check_cycles(root)
    assert len(found) == 2, found
    lazy = next(c for c in found if "eval/common.py" in c)
    assert "eval/ppl.py:" in lazy and f"eval/common.py:{len((root / 'eval' / 'common.py').read_text().splitlines())}" in lazy
    assert any("variants.py:" in c and "model/attention.py:" in c for c in found)
    assert any("variants.py" in p and "model is not below variants" in p for p in checker.check(root))


def test_each_rule_catches_its_violation(tmp_path):
    check = _checker().check
    root = tmp_path / "diffattn"
    shutil.copytree(REPO / "src" / "diffattn", root)
    (root / "model" / "kernels.py").write_text((root / "model" / "kernels.py").read_text()
                                               + "\nfrom ..eval.loader import load  # noqa\n")
    (root / "eval" / "ppl.py").write_text((root / "eval" / "ppl.py").read_text()
                                          + "\n\ndef _bad(block):\n    block.attn.kernel = None\n"
                                          + "    from ..cli import main  # noqa\n    from ..dex import apply_dex  # noqa\n")
    (root / "data" / "long.py").write_text("x = 1\n" * 601)
    problems = "\n".join(check(root))
    assert "model/kernels.py" in problems and "eval is not below model" in problems
    assert "eval/ppl.py" in problems and "assigns block.attn.kernel" in problems
    assert "imports diffattn.cli (only __main__ may)" in problems
    assert "dex is not below eval" in problems
    assert "data/long.py: 601 lines" in problems
