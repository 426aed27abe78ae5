"""`dvc repro` cannot call a stale output up to date: every package file a stage's notebook imports,
transitively, lies under one of the stage's DVC deps."""
from __future__ import annotations

from pathlib import Path

import pytest

from import_graph import ROOT, closure
from nifi_utils.pipeline.params import dvc_stages

# files a stage imports that cannot change its outputs, each with the reason
EXEMPT = {
    "nifi_utils/pipeline/lab.py": "the notebooks' input guard: it only stops a notebook, before anything is "
                                  "written, when an upstream output is missing",
}


def _docstring_only(path: Path) -> bool:
    import ast

    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def missing_deps(stage: dict, root: Path = ROOT) -> list[str]:
    deps = [Path(d) for d in stage.get("deps", [])]
    notebook = root / next(d for d in deps if d.suffix == ".py" and d.parts[0] == "notebooks")
    needed = closure(notebook, root, skip=frozenset(root / e for e in EXEMPT))
    out = []
    for f in sorted(needed):
        rel = f.relative_to(root)
        if f.name == "__init__.py" and _docstring_only(f):
            continue  # a package's docstring changes no output
        if not any(rel == d or d in rel.parents for d in deps):
            out.append(str(rel))
    return out


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_stage_deps_cover_every_imported_module(name):
    missing = missing_deps(dvc_stages()[name])
    assert not missing, f"dvc.yaml stage {name!r} misses deps its notebook imports: {', '.join(missing)}"


def test_a_missing_module_is_found(tmp_path):
    (tmp_path / "notebooks").mkdir()
    pkg = tmp_path / "nifi_utils"
    (pkg / "gs").mkdir(parents=True)
    (pkg / "core").mkdir()
    for p in (pkg / "__init__.py", pkg / "gs/__init__.py", pkg / "core/__init__.py"):
        p.write_text('"""docs"""\n')
    (pkg / "gs/scenes.py").write_text("from nifi_utils.core.common import x\n")
    (pkg / "core/common.py").write_text("x = 1\n")
    (tmp_path / "notebooks/00.py").write_text("from nifi_utils.gs import scenes\n")
    stage = {"deps": ["notebooks/00.py", "nifi_utils/gs"]}
    assert missing_deps(stage, tmp_path) == ["nifi_utils/core/common.py"]
    assert missing_deps({"deps": ["notebooks/00.py", "nifi_utils/gs", "nifi_utils/core"]}, tmp_path) == []
    (pkg / "__init__.py").write_text("import os\n")
    assert missing_deps({"deps": ["notebooks/00.py", "nifi_utils/gs", "nifi_utils/core"]}, tmp_path) == [
        "nifi_utils/__init__.py"]


def test_exemptions_exist():
    for rel in EXEMPT:
        assert (ROOT / rel).is_file(), f"EXEMPT names {rel}, which does not exist"
