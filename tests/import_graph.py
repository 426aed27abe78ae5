"""The package's import graph, read from the source (no import is executed): which `nifi_utils` files a
Python file needs, directly and transitively. The layer test and the DVC deps test both stand on it.

Every `import` / `from ... import` statement counts, at module level and inside functions: a deferred
import still ties the two files together, it only hides the tie until run time."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "nifi_utils"
ROOT = Path(__file__).resolve().parent.parent


def module_file(dotted: str, root: Path = ROOT) -> Path | None:
    """The file that defines module `dotted` (a package's `__init__.py`), or None."""
    base = root.joinpath(*dotted.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _with_parents(dotted: str, root: Path) -> list[Path]:
    """The module's file and the `__init__.py` of every package above it (Python runs them all)."""
    parts = dotted.split(".")
    out = [f for i in range(1, len(parts) + 1) if (f := module_file(".".join(parts[:i]), root))]
    return out


def _package_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1])
    return ".".join(parts[:-1])


def direct_imports(path: Path, root: Path = ROOT) -> set[Path]:
    """The package files one Python file imports (relative imports resolved from its own package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[Path] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
            for n in names:
                if n.split(".")[0] == PACKAGE:
                    out.update(_with_parents(n, root))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = _package_of(path, root).split(".")
                pkg = pkg[: len(pkg) - (node.level - 1)]
                if not pkg or pkg[0] != PACKAGE:
                    raise AssertionError(f"{path}:{node.lineno}: relative import above the package")
                base = ".".join(pkg + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            out.update(_with_parents(base, root))
            for a in node.names:  # `from nifi_utils.x import y`: y may be a module
                if (f := module_file(f"{base}.{a.name}", root)) is not None:
                    out.add(f)
    out.discard(path)
    return out


def closure(path: Path, root: Path = ROOT, skip: frozenset[Path] = frozenset()) -> set[Path]:
    """Every package file `path` needs, transitively; files in `skip` are neither counted nor followed."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        for f in direct_imports(todo.pop(), root):
            if f not in seen and f not in skip:
                seen.add(f)
                todo.append(f)
    return seen


def package_files(root: Path = ROOT) -> list[Path]:
    return sorted((root / PACKAGE).rglob("*.py"))
