"""Check that no function in src/diffattn is longer than 60 lines (issue #27). Run from the repository root:

    python tools/check_function_length.py   # prints each long function as "file:line name N lines"; exit 1 if any

A function's length is ``end_lineno - lineno + 1`` of its ``def`` statement: from the ``def`` line (decorators
not counted) to its last line, docstring and comments inside it included. Every ``def`` is measured, methods and
nested functions too; a nested function is also counted as part of the function that holds it.

The Triton kernels are exempt: a function decorated with ``triton.jit`` (or ``triton.jit(...)``) is one GPU
program whose body is the algorithm, and splitting it would mean more launches or more ``tl.constexpr`` plumbing.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "diffattn"
MAX_FUNCTION_LINES = 60


def _is_triton_jit(decorator: ast.expr) -> bool:
    """True for ``@triton.jit`` and ``@triton.jit(...)``."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Attribute) and target.attr == "jit"
            and isinstance(target.value, ast.Name) and target.value.id == "triton")


def function_lengths(path: Path):
    """Yield (line, qualified name, length in lines) for every non-exempt ``def`` in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                if not any(_is_triton_jit(d) for d in child.decorator_list):
                    yield child.lineno, name, child.end_lineno - child.lineno + 1
                yield from visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, prefix + child.name + ".")
            else:
                yield from visit(child, prefix)

    yield from visit(tree, "")


def check(root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """One line ``file:line name N lines`` per function longer than ``limit``."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for line, name, n in function_lengths(path):
            if n > limit:
                problems.append(f"{rel}:{line} {name} {n} lines")
    return problems


def main() -> int:
    problems = check()
    for p in problems:
        print(p)
    print(f"function length: {len(problems)} function(s) over {MAX_FUNCTION_LINES} lines" if problems
          else f"function length: ok (none over {MAX_FUNCTION_LINES} lines)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
