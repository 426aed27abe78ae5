"""The package's layers are its subpackages, bottom to top; a file imports only from its own layer or the
ones below, and no import cycle hides inside a layer."""
from __future__ import annotations

from pathlib import Path

import pytest

from import_graph import PACKAGE, ROOT, direct_imports, package_files

# bottom to top; nifi_utils/__init__.py and __main__.py sit above all of them
LAYERS = ["core", "measure", "gs", "codec", "models", "eval", "pipeline"]


def layer_of(path: Path, root: Path = ROOT) -> int:
    parts = path.relative_to(root / PACKAGE).parts
    if len(parts) == 1:
        return len(LAYERS)
    if parts[0] not in LAYERS:
        raise AssertionError(f"{path}: in no layer (nifi_utils/<layer>/...: {', '.join(LAYERS)})")
    return LAYERS.index(parts[0])


def upward_imports(root: Path = ROOT) -> list[str]:
    bad = []
    for f in package_files(root):
        for g in direct_imports(f, root):
            if g.name != "__init__.py" and layer_of(g, root) > layer_of(f, root):
                bad.append(f"{f.relative_to(root)} imports {g.relative_to(root)} (a higher layer)")
    return sorted(bad)


def cycles(root: Path = ROOT) -> list[list[Path]]:
    graph = {f: {g for g in direct_imports(f, root) if g.name != "__init__.py"} for f in package_files(root)}
    found, state = [], {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif not state.get(nxt):
                visit(nxt, path + [nxt])
        state[node] = 2

    for f in sorted(graph):
        if not state.get(f):
            visit(f, [f])
    return found


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp_path / PACKAGE / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_the_graph_sees_relative_absolute_and_deferred_imports(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "", "core/__init__.py": "", "core/a.py": "from .b import f\n",
        "core/b.py": "def f():\n    import nifi_utils.core.c\n", "core/c.py": "def g():\n    from . import a\n",
        "models/__init__.py": "", "models/d.py": "from nifi_utils.core import a\nfrom ..core.c import g\nimport os\n"})
    p = root / PACKAGE
    assert direct_imports(p / "models/d.py", root) >= {p / "core/a.py", p / "core/c.py", p / "core/__init__.py"}
    assert [[x.name for x in c] for c in cycles(root)] == [["a.py", "b.py", "c.py", "a.py"]]
    assert upward_imports(root) == []


def test_an_import_from_a_higher_layer_is_found(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "", "core/__init__.py": "", "eval/__init__.py": "",
                            "eval/x.py": "X = 1\n", "core/y.py": "def f():\n    from nifi_utils.eval.x import X\n"})
    assert upward_imports(root) == ["nifi_utils/core/y.py imports nifi_utils/eval/x.py (a higher layer)"]


def test_every_module_is_in_a_layer():
    for f in package_files():
        layer_of(f)


def test_no_module_imports_from_a_higher_layer():
    bad = upward_imports()
    assert not bad, "layer order broken (bottom to top: " + " < ".join(LAYERS) + "):\n" + "\n".join(bad)


def test_no_import_cycle():
    found = cycles()
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(str(x.relative_to(ROOT)) for x in c) for c in found)


@pytest.mark.parametrize("module", ["nifi_utils.measure.stats", "nifi_utils.core.facts"])
def test_facts_and_stats_import_without_torch(module):
    """plots and stats read the shared facts without importing torch (a plot or an interval needs none)."""
    import subprocess
    import sys

    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1]
