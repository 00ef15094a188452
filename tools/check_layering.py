"""Check the architecture's layering rules over src/diffattn (docs/architecture.md). Run from the repository root:

    python tools/check_layering.py        # prints each violation on one line; exit 1 if any, 0 if none

Rules (every import counts: those inside functions, ``importlib.import_module("diffattn.x")`` / ``__import__``
calls, and ``"diffattn.x:Name"`` strings that code resolves later):

1. Packages import only from lower layers (or their own unit); units in one layer do not import each other; and
   no two modules import each other, directly or through others (a cycle), even inside one unit: a lazy import
   hides a cycle from Python, not from a reader.
2. Command modules (``cli.py``, ``*/cli*.py``, ``generate_cli.py``, ``info.py``, ``__main__.py``) sit above every
   layer and may import anything; library modules never import them, and only ``__main__`` imports ``diffattn.cli``.
3. No module outside ``model/`` assigns to an attention module's attributes (``<x>.attn.<name> = ...`` or
   ``attn.<name> = ...``): kernels are selected with ``set_kernel`` / ``using_kernel``.
4. No source file but the Triton kernel exceeds 600 lines.
5. The report's modules (``RENDERERS``) never import a runner (``RUNNERS``), directly or through other modules.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "diffattn"

# Lowest first. A layer is a list of units; a unit is a set of top-level names that may import each other.
LAYERS: list[list[set[str]]] = [
    [{"utils", "fsutil", "_version", "variants", "config", "presets"}],  # foundation: no model code
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


_MODULE = re.compile(r"diffattn(\.[A-Za-z_]\w*)*")
_MODULE_COLON_NAME = re.compile(r"diffattn(\.[A-Za-z_]\w*)+:[A-Za-z_]\w*")


def _dynamic_import(node) -> str | None:
    """``importlib.import_module("diffattn.x")`` / ``__import__("diffattn.x")``, or a ``"diffattn.x:Name"`` string
    (what code resolves with import_module later). Module names passed to ``python -m`` or used as logger names are
    not imports."""
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
        arg = node.args[0].value
        if name in ("import_module", "__import__") and isinstance(arg, str) and _MODULE.fullmatch(arg):
            return arg
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_COLON_NAME.fullmatch(node.value):
        return node.value.split(":", 1)[0]
    return None


def _imports(path: Path, module: str, is_pkg: bool):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        dynamic = _dynamic_import(node)
        if dynamic is not None:
            yield node.lineno, dynamic
            continue
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


def _module_file(root: Path, name: str) -> str | None:
    """The file (relative to ``root``) that import ``name`` executes: the module, else the package it names
    (``from ..eval import TASKS`` -> ``eval/__init__.py``)."""
    parts = name.split(".")[1:]
    while True:
        for rel in ("/".join(parts) + ".py", "/".join(parts + ["__init__.py"])):
            if parts and (root / rel).is_file() or not parts and rel == "__init__.py":
                return rel
        if not parts:
            return None
        parts = parts[:-1]


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """module file -> {imported module file: first line}, every import counted (lazy, dynamic, string)."""
    graph: dict[str, dict[str, int]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        parts = rel[:-3].split("/")
        is_pkg = parts[-1] == "__init__"
        module = ".".join(["diffattn", *(parts[:-1] if is_pkg else parts)])
        edges = graph.setdefault(rel, {})
        for line, name in _imports(path, module, is_pkg):
            target = _module_file(root, name)
            if target is not None and target != rel:
                edges.setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected component of more than
    one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, {})))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    comps.append(_a_cycle(graph, set(comp)))
    return comps


def _a_cycle(graph, comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    first = min(comp)
    prev = {first: None}
    queue = [first]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph.get(node, {})):
            if nxt == first:
                path = [node]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return [*reversed(path), first]
            if nxt in comp and nxt not in prev:
                prev[nxt] = node
                queue.append(nxt)
    return [first, first]


# The report reads records (results.json) and renders them; it never imports a runner (what trains or evaluates),
# directly or through another module, so that `diffattn report DIR` works on any machine that has the file.
RENDERERS = ("experiments/report.py", "experiments/report_recall.py", "experiments/render.py",
             "experiments/study_view.py", "experiments/recall_records.py", "experiments/paper.py")
RUNNERS = ("experiments/compare.py", "experiments/init_study.py", "experiments/recall.py",
           "experiments/needle_mix.py", "train/trainer.py", "dex/run.py", "dex/study.py")


def check_renderers(root: Path = ROOT) -> list[str]:
    graph = import_graph(root)
    problems = []
    for start in RENDERERS:
        seen, todo, via = {start}, [start], {start: None}
        while todo:
            node = todo.pop()
            for nxt in graph.get(node, {}):
                if nxt not in seen:
                    seen.add(nxt)
                    via[nxt] = node
                    todo.append(nxt)
        for runner in RUNNERS:
            if runner in seen:
                path = [runner]
                while via[path[-1]] is not None:
                    path.append(via[path[-1]])
                problems.append(f"{start}: the report imports a runner: " + " -> ".join(reversed(path)))
    return problems


def check_cycles(root: Path = ROOT) -> list[str]:
    graph = import_graph(root)
    return [f"import cycle: " + " -> ".join(f"{a}:{graph[a][b]}" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"
            for cycle in cycles(graph)]


def main() -> int:
    problems = check() + check_cycles() + check_renderers()
    for p in problems:
        print(p)
    print(f"layering: {len(problems)} violation(s)" if problems else "layering: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
