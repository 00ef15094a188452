"""Check the architecture's layering rules over src/diffattn (docs/architecture.md). Run from the repository root:

    python tools/check_layering.py        # prints each violation on one line; exit 1 if any, 0 if none

Rules (every import counts, including those inside functions):

1. Packages import only from lower layers (or their own unit); units in one layer do not import each other.
2. Command modules (``cli.py``, ``*/cli*.py``, ``generate_cli.py``, ``info.py``, ``__main__.py``) sit above every
   layer and may import anything; library modules never import them, and only ``__main__`` imports ``diffattn.cli``.
3. No module outside ``model/`` assigns to an attention module's attributes (``<x>.attn.<name> = ...`` or
   ``attn.<name> = ...``): kernels are selected with ``set_kernel`` / ``using_kernel``.
4. No source file but the Triton kernel exceeds 600 lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "diffattn"

# Lowest first. A layer is a list of units; a unit is a set of top-level names that may import each other.
LAYERS: list[list[set[str]]] = [
    [{"utils", "fsutil", "variants", "config", "presets"}],  # foundation: no model code
    [{"model", "checkpoint"}],  # the model math and its weights on disk
    [{"nn"}],  # the drop-in layers: the model's attention classes behind nn.MultiheadAttention's interface
    [{"data"}],  # corpora, tokenizers, shards
    [{"train"}, {"hf"}],  # the training loop; the Hugging Face bridge
    [{"eval"}],  # evaluation tasks over one adapter interface
    [{"dex"}, {"bench"}, {"experiments"}],  # applications: none imports another
]
MAX_LINES = 600
LONG_FILES_ALLOWED = {"model/triton_diff.py"}  # the Triton kernel: forward and backward kernels of one algorithm
# DEX's method is module surgery on *Hugging Face* attention modules (their o_proj); no diffattn model is touched.
ATTN_ASSIGN_ALLOWED = {"dex/surgery.py"}


def _is_command(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return rel in {"cli.py", "__main__.py", "generate_cli.py", "info.py"} or name.startswith("cli")


def _unit_of(top: str):
    for depth, layer in enumerate(LAYERS):
        for unit in layer:
            if top in unit:
                return depth, frozenset(unit)
    return None


def _imports(path: Path, module: str, is_pkg: bool):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name == "diffattn" or name.startswith("diffattn."):
                yield node.lineno, name


def _attn_assignments(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(t, ast.Attribute):
                    owner = t.value
                    if (isinstance(owner, ast.Name) and owner.id == "attn") or (
                            isinstance(owner, ast.Attribute) and owner.attr == "attn"):
                        yield node.lineno, ast.unparse(t)


def check(root: Path = ROOT) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        parts = rel[:-3].split("/")
        is_pkg = parts[-1] == "__init__"
        module = ".".join(["diffattn", *(parts[:-1] if is_pkg else parts)])
        top = parts[0]
        command = _is_command(rel)
        n_lines = len(path.read_text().splitlines())
        if n_lines > MAX_LINES and rel not in LONG_FILES_ALLOWED:
            problems.append(f"{rel}: {n_lines} lines (more than {MAX_LINES})")
        if not rel.startswith("model/") and rel not in ATTN_ASSIGN_ALLOWED:
            for line, what in _attn_assignments(path):
                problems.append(f"{rel}:{line}: assigns {what} (outside model/; use set_kernel / using_kernel)")
        mine = _unit_of(top)
        for line, name in _imports(path, module, is_pkg):
            target_parts = name.split(".")
            target_top = target_parts[1] if len(target_parts) > 1 else ""
            if name == "diffattn.cli" or name.startswith("diffattn.cli."):
                if rel != "__main__.py":
                    problems.append(f"{rel}:{line}: imports diffattn.cli (only __main__ may)")
                continue
            if command or target_top in ("", "__version__") or rel == "__init__.py":
                continue
            target_file = "/".join(target_parts[1:])
            if _is_command(target_file + ".py") or _is_command(target_file.rsplit("/", 1)[-1] + ".py") and \
                    target_parts[-1].startswith("cli"):
                problems.append(f"{rel}:{line}: a library module imports the command module {name}")
                continue
            theirs = _unit_of(target_top)
            if mine is None or theirs is None:
                problems.append(f"{rel}:{line}: {name}: package not placed in a layer (tools/check_layering.py)")
                continue
            if theirs[1] == mine[1]:
                continue
            if theirs[0] >= mine[0]:
                problems.append(f"{rel}:{line}: imports {name} ({target_top} is not below {top})")
    return problems


def main() -> int:
    problems = check()
    for p in problems:
        print(p)
    print(f"layering: {len(problems)} violation(s)" if problems else "layering: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
