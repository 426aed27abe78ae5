"""`dvc plots show/diff` render offline: vega libraries inlined into the DVC HTML template."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from nifi_utils.pipeline import plots_offline

ROOT = Path(__file__).resolve().parents[1]
NODE_MODULES = ROOT / ".venv" / "npm" / "node_modules"  # written by `make setup`
CDN_SRC = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", re.IGNORECASE)


def fake_node_modules(root: Path, skip: str = "") -> Path:
    nm = root / "node_modules"
    for name, rel in plots_offline.PACKAGES:
        if name == skip:
            continue
        path = nm / name / rel
        path.parent.mkdir(parents=True)
        (nm / name / "package.json").write_text(f'{{"name": "{name}", "version": "9.9.9"}}')
        body = f'window.fake_{name.replace("-", "_")} = "</script>";'
        path.write_text(f"{body}\n//# sourceMappingURL={path.name}.map\n")
    return nm


def test_inliner_on_fake_node_modules(tmp_path):
    out = tmp_path / "tpl" / "plots.html"
    assert plots_offline.main(["--node-modules", str(fake_node_modules(tmp_path)), "--out", str(out)]) == 0
    html = out.read_text()
    assert "{plot_divs}" in html and "{refresh_tag}" in html
    assert "{scripts}" not in html  # where dvc_render would put its CDN <script src=...> tags
    assert not CDN_SRC.search(html) and "src=" not in html
    assert "sourceMappingURL" not in html
    bodies = re.findall(r"<script[^>]*>(.*?)</script>", html, flags=re.DOTALL)
    assert len(bodies) == 3  # the "</script>" inside the JS was escaped, so it can't end a block early
    for (name, _), body in zip(plots_offline.PACKAGES, bodies):
        assert f'window.fake_{name.replace("-", "_")} = "<\\/script>";' in body
    assert "vega@9.9.9 vega-lite@9.9.9 vega-embed@9.9.9" in html
    mtime = out.stat().st_mtime_ns
    plots_offline.write_template(tmp_path / "node_modules", out)  # unchanged text: file not rewritten
    assert out.stat().st_mtime_ns == mtime


def test_inliner_missing_package(tmp_path, capsys):
    nm = fake_node_modules(tmp_path, skip="vega-lite")
    with pytest.raises(plots_offline.MissingPackageError, match="vega-lite"):
        plots_offline.build_template(nm)
    out = tmp_path / "plots.html"
    assert plots_offline.main(["--node-modules", str(nm), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("plots_offline: error:") and "vega-lite" in err
    assert not out.exists()


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, check=True, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def plots_html(tmp_path_factory) -> Path:
    """`dvc plots show` in a scratch DVC repo configured the way `make setup` configures this one."""
    if not (NODE_MODULES / "vega").is_dir():
        pytest.skip(f"{NODE_MODULES} missing (npm absent at `make setup`?)")
    repo = tmp_path_factory.mktemp("plots_repo")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    (repo / "loss.csv").write_text("step,loss\n0,1.0\n1,0.6\n2,0.4\n3,0.3\n")
    (repo / "dvc.yaml").write_text("plots:\n  - loss.csv:\n      x: step\n      y: loss\n")
    plots_offline.write_template(NODE_MODULES, repo / ".venv" / "dvc-plots-offline.html")
    dvc(repo, "config", "--local", "plots.html_template", "../.venv/dvc-plots-offline.html")  # relative to .dvc/
    dvc(repo, "plots", "show", "-o", "plots_out")
    return repo / "plots_out" / "index.html"


@pytest.mark.slow
def test_dvc_plots_show_uses_offline_template(plots_html):
    html = plots_html.read_text()
    assert not CDN_SRC.search(html), "a <script src=http...> tag is left in the page"
    assert "vegaEmbed(" in html and 'data-package="vega-embed"' in html


def find_chromium():
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


@pytest.mark.slow
def test_dvc_plots_render_in_headless_chromium(plots_html):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium not installed: the rendering check needs a headless Chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", plots_html.as_uri()],
            capture_output=True, text=True, timeout=90, check=True,
        ).stdout
    # vega-embed draws the chart into a <canvas class="marks"> (or an <svg class="marks">)
    assert re.search(r"<(canvas|svg)\b[^>]*class=\"marks\"", dom), "the vega plot did not render:\n" + dom[-2000:]
