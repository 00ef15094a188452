"""No function in src/diffattn is over 60 lines (issue #27): tools/check_function_length.py finds none, and it does
find one planted in a copy of the tree."""

import importlib.util
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_function_length",
                                                  REPO / "tools" / "check_function_length.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_function_in_the_source_tree_is_over_60_lines():
    assert _checker().check() == []


def test_a_planted_long_function_is_reported(tmp_path):
    check = _checker().check
    root = tmp_path / "diffattn"
    shutil.copytree(REPO / "src" / "diffattn", root)
    body = "".join(f"    x{i} = {i}\n" for i in range(59))  # def line + 59 body lines + return = 61 lines
    long_fn = f"\n\ndef _planted(x):\n{body}    return x\n"
    ok_fn = f"\n\ndef _fits(x):\n{body[:-len('    x58 = 58')-1]}    return x\n"  # 60 lines: allowed
    jit_fn = f"\n\n@triton.jit\ndef _kernel(x):\n{body}    return x\n"  # a Triton kernel: exempt
    path = root / "eval" / "ppl.py"
    lines_before = len(path.read_text().splitlines())
    path.write_text(path.read_text() + long_fn + ok_fn + jit_fn)
    nested = "\n\nclass _Holder:\n    def method(self):\n        def inner():\n" + "".join(
        f"            y{i} = {i}\n" for i in range(60)) + "        return inner\n"
    (root / "data" / "planted.py").write_text(nested)
    problems = set(check(root)) - set(check())  # what the planting added, whatever the real tree holds
    assert f"eval/ppl.py:{lines_before + 3} _planted 61 lines" in problems
    assert not any("_fits" in p or "_kernel" in p for p in problems)
    # the nested function is reported on its own, and its holder (which contains it) too
    assert "data/planted.py:5 _Holder.method.inner 61 lines" in problems
    assert "data/planted.py:4 _Holder.method 63 lines" in problems
    assert len(problems) == 3
