# .venv/bin/python -m pytest tests/test_reliability_untrusted.py -q
"""Untrusted files (docs/reliability.md): the package never unpickles (no pickle/dill/marshal/shelve
imports, every ``torch.load`` passes ``weights_only=True``, no ``numpy.load(allow_pickle=True)``),
never enables ``trust_remote_code`` implicitly (no literal True, every default False, the CLI flag
is opt-in), and never calls ``eval``/``exec`` on text. Checked on the syntax tree of every module.
Archive extraction and pinned checksums are tested in tests/test_data_archive.py and
tests/test_data_sources.py."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffattn"
FILES = sorted(PACKAGE.rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}


def trees():
    for path in FILES:
        yield path.relative_to(PACKAGE.parent), ast.parse(path.read_text(), str(path))


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_the_package_is_found():
    assert len(FILES) > 30 and (PACKAGE / "train" / "checkpoint.py") in FILES


def test_no_pickle_modules():
    bad = []
    for rel, tree in trees():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{rel}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
    assert not bad, bad


def test_torch_load_only_with_weights_only_and_no_pickled_numpy():
    bad = []
    for rel, tree in trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name, kw = dotted(node.func), {k.arg: k.value for k in node.keywords}
            if name.endswith("torch.load") and not is_true(kw.get("weights_only")):
                bad.append(f"{rel}:{node.lineno} torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and "allow_pickle" in kw and not (
                    isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
                bad.append(f"{rel}:{node.lineno} numpy.load with allow_pickle")
            if name in ("eval", "exec") and node.args and not isinstance(node.args[0], ast.Constant):
                bad.append(f"{rel}:{node.lineno} {name}() of a non-literal")
            if name in ("yaml.load", "yaml.unsafe_load"):
                bad.append(f"{rel}:{node.lineno} {name}")
    assert not bad, bad


def test_trust_remote_code_is_never_enabled_implicitly():
    bad, flags = [], 0
    for rel, tree in trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and is_true(node.value):
                bad.append(f"{rel}:{node.value.lineno} trust_remote_code=True")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults \
                    + node.args.kw_defaults
                for arg, default in zip(args, defaults):
                    if arg.arg == "trust_remote_code" and default is not None and not (
                            isinstance(default, ast.Constant) and default.value in (False, None)):
                        bad.append(f"{rel}:{node.lineno} {node.name}(trust_remote_code=...) default is not False")
            if (isinstance(node, ast.Call) and dotted(node.func).endswith("add_argument") and node.args
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value == "--trust-remote-code"):
                flags += 1
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("action"), ast.Constant) and kw["action"].value == "store_true") \
                        or is_true(kw.get("default")):
                    bad.append(f"{rel}:{node.lineno} --trust-remote-code is not an opt-in flag")
    assert not bad, bad
    assert flags >= 1  # the eval CLI exposes it, opt-in


@pytest.mark.parametrize("module,test", [("tests/test_data_archive.py", "test_malicious_tar_refused"),
                                         ("tests/test_data_archive.py", "test_zip_with_dotdot_refused"),
                                         ("tests/test_data_sources.py", "test_download_verifies_sha256_and_caches")])
def test_archive_and_checksum_tests_exist(module, test):
    """The doc table points to these tests; keep them there."""
    text = (PACKAGE.parents[1] / module).read_text()
    assert f"def {test}(" in text
