"""What the front page and the reference pages point at is there, and the times they quote are measured ones.

- No file of the project names a document outside the repository (a reader of a clone has none of them).
- Every `nifi_utils/...` path and `nifi_utils.x.y` module (or module attribute) that README.md and docs/*.md
  mention exists, and so does every file they name under benchmarks/, studies/, scripts/, tests/, notebooks/, conf/.
- Stage times: the only typed ones are the stage table of docs/pipeline.md (written by `python
  scripts/stage_times.py --write` from reports/cpu/timings.json, which every `python -m nifi_utils.pipeline.run`
  updates) and the README's total of it; both must equal the file, at the table's rounding (0.1 min, whole
  seconds). Elsewhere in README.md and docs/*.md no duration in minutes or hours is typed.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

import pytest

from import_graph import module_file

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# documents that live outside the repository; spelled in pieces so that this file does not name them itself
OUTSIDE = ["DESIGN" + ".md", "paper_" + "spec.md", "offline_" + "facts.md", "STYLE" + ".md", "shared" + "/docs",
           "../" + "shared"]
SCANNED = ("README.md", "docs/", "nifi_utils/", "conf/", "tests/", "benchmarks/", "scripts/", "studies/")

BEGIN, END = "<!-- stage-times:begin -->", "<!-- stage-times:end -->"
TIMINGS = ROOT / "reports" / "cpu" / "timings.json"


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def _project_files() -> list[Path]:
    """Tracked files plus new ones git does not ignore (a page being written counts), that exist in the tree."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode().split("\0")
    files = []
    for name in filter(None, out):
        if name.startswith(SCANNED) or re.fullmatch(r"notebooks/[^/]+\.py", name):
            p = ROOT / name
            if p.is_file():
                files.append(p)
    return sorted(set(files))


def _text(p: Path) -> str | None:
    """The file as text, or None for a binary file (a NUL byte, or not UTF-8)."""
    data = p.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_file_names_a_document_outside_the_repository():
    hits = []
    for p in _project_files():
        text = _text(p)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            hits += [f"{_rel(p)}:{n}: {name}" for name in OUTSIDE if name in line]
    assert not hits, "documents outside the repository named:\n" + "\n".join(hits)


# ---------------------------------------------------------------------------------------------- module paths
PATH_RE = re.compile(r"(?<![\w./-])(nifi_utils(?:/[A-Za-z_][\w]*)+(?:\.py)?)")
DOTTED_RE = re.compile(r"(?<![\w./-])(nifi_utils(?:\.[A-Za-z_]\w*)+)")
OTHER_RE = re.compile(r"(?<![\w-])(?:\.\./)?((?:benchmarks|studies|scripts|tests|notebooks|conf)/[\w./-]*[\w/])")


def _names(body: list[ast.stmt]) -> set[str]:
    """Names a module (or class) body binds: functions, classes, assignments, imports (re-exports count)."""
    out = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            out |= _names(node.body) | _names(getattr(node, "orelse", []))
    return out


def resolve_dotted(dotted: str) -> str | None:
    """None where `dotted` names a module of the package, or an attribute (Class, function, Class.method) of one;
    else what is missing."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        f = module_file(".".join(parts[:i]))
        if f is not None:
            break
    else:
        return f"no module {parts[0]}"
    rest = parts[i:]
    if not rest:
        return None
    if len(rest) > 2:
        return f"no module {'.'.join(parts[:i + 1])}"
    source = f.read_text()
    tree = ast.parse(source)
    top = _names(tree.body)
    if rest[0] not in top:
        lazy = "__getattr__" in top and re.search(rf"\b{re.escape(rest[0])}\b", source)
        return None if lazy and len(rest) == 1 else f"{_rel(f)} defines no {rest[0]}"
    if len(rest) == 2:
        cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == rest[0]), None)
        if cls is None or rest[1] not in _names(cls.body):
            return f"{_rel(f)}: {rest[0]} has no {rest[1]}"
    return None


def _page_refs(regex: re.Pattern) -> list[tuple[str, str]]:
    return [(f"{_rel(p)}:{n}", m.group(1)) for p in PAGES for n, line in enumerate(p.read_text().splitlines(), 1)
            for m in regex.finditer(line)]


def test_every_module_path_in_the_docs_exists():
    bad = [f"{where}: {ref}" for where, ref in _page_refs(PATH_RE) if not (ROOT / ref).exists()]
    assert not bad, "package paths that do not exist:\n" + "\n".join(bad)


def test_every_dotted_module_in_the_docs_exists():
    bad = [f"{where}: {ref} ({why})" for where, ref in _page_refs(DOTTED_RE) if (why := resolve_dotted(ref))]
    assert not bad, "modules or attributes that do not exist:\n" + "\n".join(bad)


def test_every_project_file_the_docs_name_exists():
    bad = []
    for where, ref in _page_refs(OTHER_RE):
        if "." not in Path(ref).name and not ref.endswith("/"):
            continue  # a word such as "tests/CI", not a path
        if not (ROOT / ref).exists():
            bad.append(f"{where}: {ref}")
    assert not bad, "files named in the docs that do not exist:\n" + "\n".join(bad)


def test_the_reference_checks_catch_stale_names():
    assert resolve_dotted("nifi_utils.models.restorer.Restorer.one_step") is None
    assert resolve_dotted("nifi_utils.models.distill.judge_metric") is None  # re-exported from core.facts
    assert resolve_dotted("nifi_utils.pipeline.run") is None
    assert resolve_dotted("nifi_utils.lab") is not None  # the flat module before the layers
    assert resolve_dotted("nifi_utils.models.restorer.Restorer.no_such_method") is not None
    assert [m.group(1) for m in PATH_RE.finditer("see `nifi_utils/distill.py` and nifi_utils/models/.")] == [
        "nifi_utils/distill.py", "nifi_utils/models"]
    assert [m.group(1) for m in DOTTED_RE.finditer("`python -m nifi_utils.pipeline.run prior`.")] == [
        "nifi_utils.pipeline.run"]


# ---------------------------------------------------------------------------------------------- stage times
ROW = re.compile(r"^\| `(\w+)` \| (\d+\.\d) min \((\d+) s\) \| ([\d-]+ [\d:]+) \|")
TOTAL = re.compile(r"^\| all but the frozen `prior` \| \*\*(\d+\.\d) min\*\* \|")
DURATION = re.compile(r"\b\d+(?:\.\d+)?(?:\s*-\s*\d+(?:\.\d+)?)?\s*(?:min|minutes?|h|hours?)\b")


def _timings() -> dict:
    return json.loads(TIMINGS.read_text())["stages"]


def _block(text: str) -> str:
    assert BEGIN in text and END in text, f"docs/pipeline.md lacks the {BEGIN} / {END} lines"
    return text[text.index(BEGIN) + len(BEGIN): text.index(END)]


def _total_min(stages: dict) -> str:
    return f"{sum(e['seconds'] for s, e in stages.items() if s != 'prior') / 60:.1f}"


def test_the_stage_table_is_what_timings_json_records():
    stages = _timings()
    rows, total = {}, None
    for line in _block((ROOT / "docs" / "pipeline.md").read_text()).splitlines():
        if m := ROW.match(line):
            rows[m.group(1)] = m.groups()[1:]
        elif m := TOTAL.match(line):
            total = m.group(1)
    assert set(rows) == set(stages), (f"the table's stages {sorted(rows)} are not timings.json's {sorted(stages)}: "
                                      f"run `python scripts/stage_times.py --write`")
    for s, (minutes, seconds, finished) in rows.items():
        e = stages[s]
        want = (f"{e['seconds'] / 60:.1f}", f"{e['seconds']:.0f}", e["finished"][:16].replace("T", " "))
        assert (minutes, seconds, finished) == want, (f"docs/pipeline.md: {s} says {minutes} min ({seconds} s), "
                                                      f"{finished}; timings.json {want}: run `python scripts/stage_times.py --write`")
    assert total == _total_min(stages), f"docs/pipeline.md: total {total} min, timings.json {_total_min(stages)}"


def test_the_front_page_quotes_the_recorded_total():
    row = next((ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("| `cpu`")), None)
    assert row is not None, "README.md has no `cpu` row in its profile table"
    quoted = re.findall(r"(\d+\.\d) min", row)
    assert quoted == [_total_min(_timings())], (f"README.md's cpu row quotes {quoted} min; reports/cpu/timings.json "
                                                f"sums to {_total_min(_timings())} min (all but the frozen prior)")


@pytest.mark.parametrize("page", PAGES, ids=[_rel(p) for p in PAGES])
def test_no_other_typed_duration_in_minutes_or_hours(page):
    text = page.read_text()
    if page.name == "pipeline.md":
        text = text.replace(_block(text), "\n")
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        if page.name == "README.md" and line.startswith("| `cpu`"):
            continue  # the recorded total, checked above
        hits += [f"{_rel(page)}:{n}: {m.group(0)!r}" for m in DURATION.finditer(line)]
    assert not hits, ("durations typed outside the stage table (quote reports/<profile>/timings.json through "
                      "scripts/stage_times.py, or say it in words):\n" + "\n".join(hits))


def test_the_duration_guard_reads_durations():
    text = "~26 min on 2 cores, 1-2 h, 3 hours, 81 ms, 0.67 s, 3 heads, c_min 4096, 45 GPU-hours"
    assert [m.group(0) for m in DURATION.finditer(text)] == ["26 min", "1-2 h", "3 hours"]
