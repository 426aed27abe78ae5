"""The package's import graph has no cycle (DESIGN.md: a module imports only from layers below it).

Every `import`/`from ... import` statement of every module counts, at module level and inside functions
(a deferred import still ties the two modules together; it only hides the circle until run time)."""
from __future__ import annotations

import ast
from pathlib import Path

import nifi_utils

PACKAGE = "nifi_utils"
PKG_DIR = Path(nifi_utils.__file__).resolve().parent


def _targets(node: ast.AST, modules: set[str]) -> set[str]:
    """The package's modules one import statement names ("__init__" for the package itself)."""
    out = set()

    def add(dotted: str, names=()):
        parts = dotted.split(".")
        if parts[0] != PACKAGE:
            return
        if len(parts) == 1:  # `from nifi_utils import x` / `from . import x`: x may be a module
            for n in names:
                out.add(n if n in modules else "__init__")
            if not names:
                out.add("__init__")
        elif parts[1] in modules:
            out.add(parts[1])

    if isinstance(node, ast.Import):
        for a in node.names:
            add(a.name)
    elif isinstance(node, ast.ImportFrom):
        if node.level == 0:
            add(node.module or "", [a.name for a in node.names])
        elif node.level == 1:  # the package is flat: `.x` is nifi_utils.x
            add(PACKAGE + ("." + node.module if node.module else ""), [a.name for a in node.names])
        else:
            raise AssertionError(f"line {node.lineno}: import above the package ({'.' * node.level}{node.module or ''})")
    return out


def import_graph(pkg_dir: Path = PKG_DIR) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its body)."""
    modules = {p.stem for p in pkg_dir.glob("*.py")}
    graph = {}
    for m in sorted(modules):
        tree = ast.parse((pkg_dir / f"{m}.py").read_text(), filename=str(pkg_dir / f"{m}.py"))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(node, modules)
        edges.discard(m)
        graph[m] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative DFS, colours white/grey/black)."""
    state = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                path.append(nxt)
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles found one at a time, dropping the closing edge of each before looking again (enough to list
    what to fix; not every elementary cycle)."""
    g = {k: set(v) for k, v in graph.items()}
    found = []
    while (c := find_cycle(g)) is not None:
        found.append(c)
        g[c[-2]].discard(c[-1])
    return found


def test_graph_sees_relative_absolute_and_deferred_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    import nifi_utils.c\n")
    (pkg / "c.py").write_text("def g():\n    from . import a\n")
    (pkg / "d.py").write_text("from nifi_utils import a, __version__\nfrom nifi_utils.c import g\nimport os\n")
    g = import_graph(pkg)
    assert g == {"__init__": set(), "a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "__init__", "c"}}
    assert find_cycle(g) == ["a", "b", "c", "a"]
    (pkg / "c.py").write_text("def g():\n    import json\n")
    assert find_cycle(import_graph(pkg)) is None


def test_no_import_cycle():
    cycles = all_cycles(import_graph())
    assert not cycles, "import cycles in nifi_utils (each module imports the next):\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles)
