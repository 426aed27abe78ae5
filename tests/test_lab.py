"""The lab as a newcomer opens it: JupyterLab in the install, `make lab`'s preparation, every notebook run the way
JupyterLab runs it (kernel in notebooks/, committed parameters), the one-line stop when inputs are missing, the tour,
and JupyterLab itself driven through its UI in headless Chromium.

The expensive tests share one scratch copy of the repository whose tiny-profile outputs `python -m nifi_utils.pipeline.lab
prepare` made (the `tiny_lab` fixture); its kernels import that copy's nifi_utils (PYTHONPATH)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jupytext
import pytest

from nifi_utils.pipeline import lab
from nifi_utils.eval import viewer
from nifi_utils.core.common import REPO_ROOT
from nifi_utils.pipeline.params import stage_spec
from nifi_utils.gs.splat_tools import splat_transform_path

STAGE_NOTEBOOKS = {stage_spec(s).notebook.stem: s for s in lab._stages()}
BIN = Path(sys.executable).parent


def test_jupyterlab_is_in_the_pinned_install_and_make_lab_starts_it():
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", (REPO_ROOT / "requirements.txt").read_text(), re.M))
    assert "jupyterlab" in pins
    assert (BIN / "jupyter-lab").is_file(), "jupyterlab is not installed in this environment: `make setup`"
    from importlib.metadata import version

    assert version("jupyterlab") == pins["jupyterlab"]
    make = (REPO_ROOT / "Makefile").read_text()
    recipe = make.split("\nlab: setup\n", 1)[1].split("\n\n", 1)[0]
    assert "nifi_utils.pipeline.lab prepare --profile tiny" in recipe
    assert "jupyter lab --no-browser --ip=127.0.0.1" in recipe  # prints its URL, opens no browser, local only
    readme = (REPO_ROOT / "README.md").read_text()
    assert all(f"make {c}" in readme for c in ("repro", "test", "lab"))


# ---------------------------------------------------------------- the one-line stop, without outputs

def test_every_stage_notebook_opens_with_the_guard_on_its_own_stage():
    for stem, stage in STAGE_NOTEBOOKS.items():
        nb = jupytext.read(REPO_ROOT / "notebooks" / f"{stem}.py")
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        setup = next(c for c in nb.cells[at + 1:] if c.cell_type == "code")
        assert f'require_inputs("{stage}", profile)' in setup.source, f"{stem}: its setup cell lacks the guard"
        # the guard comes before the cell writes or removes anything
        head = setup.source.split(f'require_inputs("{stage}", profile)')[0]
        assert not re.search(r"mkdir|rmtree|write_|unlink", head), f"{stem}: writes before the guard"


def test_every_notebook_names_its_kernel():
    """JupyterLab starts the kernel a notebook names; without one it asks the user to pick."""
    for ipynb in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        assert json.loads(ipynb.read_text())["metadata"].get("kernelspec", {}).get("name") == "python3", ipynb.name


def _fake_repo(tmp_path, monkeypatch):
    """repo_path and REPO_ROOT pointed at an empty folder with the real dvc.yaml and params: no outputs at all."""
    import nifi_utils.core.common as C
    import nifi_utils.pipeline.params as P

    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO_ROOT / f, tmp_path / f)
    shutil.copytree(REPO_ROOT / "conf", tmp_path / "conf")
    fake = lambda *parts: Path(*parts) if Path(*parts).is_absolute() else tmp_path.joinpath(*parts)  # noqa: E731
    for mod in (C, P, lab):
        monkeypatch.setattr(mod, "repo_path", fake)
    monkeypatch.setattr(lab, "REPO_ROOT", tmp_path)
    return tmp_path


def test_missing_inputs_name_the_stages_and_the_command(tmp_path, monkeypatch):
    root = _fake_repo(tmp_path, monkeypatch)
    lab.require_inputs("scenes", "tiny")  # nothing upstream
    with pytest.raises(lab.MissingInputs) as e:
        lab.require_inputs("distill", "tiny")
    msg = e.value._render_traceback_()
    assert len(msg) == 1 and "\n" not in msg[0]
    assert "data/tiny/pairs" in msg[0] and "stages scenes, synthesis, prior" in msg[0] and "`make lab`" in msg[0]
    with pytest.raises(lab.MissingInputs, match=r"`make repro` first"):
        lab.require_inputs("plots", "cpu")  # the default profile: the README's command
    with pytest.raises(lab.MissingInputs, match=r"`python -m nifi_utils.pipeline.lab prepare distill --profile paper` first"):
        lab.require_inputs("distill", "paper")
    # an empty folder a failed run left behind counts as missing
    for o in stage_spec("synthesis", "tiny").outs + stage_spec("scenes", "tiny").outs + stage_spec("prior", "tiny").outs:
        (o.parent if o.suffix else o).mkdir(parents=True, exist_ok=True)
        if o.suffix:
            o.write_text("x")
        else:
            (o / "f").write_text("x")
    (root / "data/tiny/restorer").mkdir(parents=True)
    with pytest.raises(lab.MissingInputs, match=r"needs data/tiny/restorer .*stage distill\)"):
        lab.require_inputs("refine", "tiny")
    with pytest.raises(lab.MissingInputs, match="make lab.*make repro"):
        lab.pick_profile(["benchmark"])
    # prepare runs what is missing, in dvc.yaml's order, and only what a stage reads when one is named
    ran = []
    assert lab.prepare("tiny", "refine", run=ran.append) == ["distill"]
    assert lab.prepare("tiny", run=lambda s: None) == ["distill", "refine", "benchmark", "plots", "viewer"]


def _copy_repo(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (pipeline outputs left out, the frozen prior kept)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO_ROOT / f).is_file() and (not re.match(r"(data|reports)/[^/]+/", f) or "prior" in f):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / f, dest / f)
    return dest


def _env(work: Path) -> dict:
    env = dict(os.environ, NIFI_QUIET="1", DVC_NO_ANALYTICS="1", PYTHONPATH=str(work))
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    exe = splat_transform_path()
    if exe is not None:  # the copy has no .venv/npm: use this checkout's splat-transform
        env["NIFI_SPLAT_TRANSFORM"] = str(exe)
    return env


def _execute(work: Path, name: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`cd notebooks && jupyter execute X.ipynb`, as JupyterLab runs a notebook (its folder, its parameters)."""
    return subprocess.run([str(BIN / "jupyter"), "execute", "--inplace", f"{name}.ipynb"], cwd=work / "notebooks",
                          env=_env(work), capture_output=True, text=True, timeout=timeout)


def _tree(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
def test_a_stage_notebook_without_its_inputs_stops_in_one_line_and_writes_nothing(tmp_path):
    work = _copy_repo(tmp_path / "lab")
    before = _tree(work / "data") | _tree(work / "reports")
    r = _execute(work, "03_distillation", timeout=300)
    assert r.returncode != 0
    # nbclient reports a failing cell as its source between two rules, then what the cell showed: here one line
    shown = r.stderr.split("CellExecutionError")[-1].split("-" * 18 + "\n")[-1].strip()
    assert len(shown.splitlines()) == 1 and "Traceback" not in shown, shown
    assert shown.startswith("MissingInputs: notebook 03_distillation needs data/tiny/") and "`make lab`" in shown, shown
    assert (_tree(work / "data") | _tree(work / "reports")) == before  # no empty data/tiny/restorer left behind


# ---------------------------------------------------------------- after `make lab`'s preparation

@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
    """A fresh copy of the repository after `python -m nifi_utils.pipeline.lab prepare` (what `make lab` runs first). Where this
    checkout already has every tiny output (after `make lab`), they are copied instead of made again (minutes on
    2 cores); in a fresh clone (CI) prepare makes them. A second prepare must then run nothing."""
    work = _copy_repo(tmp_path_factory.mktemp("tiny_lab"))
    if not any(lab.missing_outputs(s, "tiny") for s in lab._stages()):
        for top in ("data", "reports"):
            shutil.copytree(REPO_ROOT / top / "tiny", work / top / "tiny", dirs_exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "nifi_utils.pipeline.lab", "prepare", "--profile", "tiny"], cwd=work,
                       env=_env(work), capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "nifi_utils.pipeline.lab", "prepare"], cwd=work, env=_env(work),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "every stage's outputs are there" in r.stderr, r.stderr[-2000:]  # idempotent
    return work


def _outputs(nb: dict) -> tuple[list, list, list]:
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o["output_type"] == "error"]
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    return code, errors, images


@pytest.mark.slow
def test_the_tour_runs_top_to_bottom_on_the_tiny_outputs(tiny_lab):
    t0 = time.time()
    r = _execute(tiny_lab, "tour", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    nb = json.loads((tiny_lab / "notebooks" / "tour.ipynb").read_text())
    code, errors, images = _outputs(nb)
    assert not errors and all(c["execution_count"] for c in code)
    assert len(nb["cells"]) <= 25 and len(images) >= 4  # scene, rates, restorers, the plane
    text = "".join("".join(o.get("text", "")) for c in code for o in c.get("outputs", []))
    assert "profile tiny" in text
    html = "".join("".join(o.get("data", {}).get("text/html", "")) for c in code for o in c.get("outputs", []))
    if splat_transform_path() is not None:
        assert "<iframe" in html and "reports/tiny/viewer/" in html
    print(f"tour: {time.time() - t0:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NOTEBOOK_STATE = """(() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!w || !w.content || !w.content.model || !w.sessionContext.session || !w.sessionContext.session.kernel) return null;
  const cells = w.content.model.toJSON().cells.filter(c => c.cell_type === 'code');
  const outs = cells.flatMap(c => c.outputs);
  return JSON.stringify({kernel: w.sessionContext.session.kernel.status, cells: cells.length,
    executed: cells.filter(c => c.execution_count).length,
    errors: outs.filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue),
    images: document.querySelectorAll('.jp-OutputArea-output img').length});
})()"""


@pytest.mark.slow
@pytest.mark.skipif(viewer.chromium_path() is None, reason="chromium not installed (.ci/run installs Debian's chromium as root)")
def test_jupyterlab_runs_the_tour_through_its_ui_in_headless_chromium(tiny_lab, tmp_path_factory):
    """JupyterLab served on a free local port with a token; Chromium opens the tour, runs Run > Run All Cells and
    waits: every code cell has an execution count, no cell shows an error, figures are drawn."""
    port, token = _free_port(), "nifi-test-token"
    (tiny_lab / "notebooks" / "tour.ipynb").write_text((REPO_ROOT / "notebooks" / "tour.ipynb").read_text())  # unrun
    home = tmp_path_factory.mktemp("jupyter_home")  # no settings or workspace of this machine's user
    news = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')  # no "get notified about Jupyter news?" toast over the notebook
    env = dict(_env(tiny_lab), JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "ws"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"))
    server = subprocess.Popen(
        [str(BIN / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={tiny_lab}", "--LabApp.expose_app_in_browser=True", "--ServerApp.port_retries=0",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=tiny_lab, env=env, stdout=subprocess.DEVNULL, stderr=open(home / "server.log", "w"))
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):  # the server answers its REST API
            assert server.poll() is None, (home / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not answer in 120 s")
        with viewer.Browser(1280, 1000, loopback=True) as browser:
            state = lambda: json.loads(browser.evaluate(NOTEBOOK_STATE) or "null")  # noqa: E731
            browser.open(f"{base}/lab/tree/notebooks/tour.ipynb?token={token}",
                         wait_for=f"({NOTEBOOK_STATE}) !== null && JSON.parse({NOTEBOOK_STATE}).kernel === 'idle'",
                         timeout=180, settle=1.0)
            assert browser.evaluate("window.jupyterapp.commands.hasCommand('runmenu:run-all')")
            browser.evaluate("window.jupyterapp.commands.execute('runmenu:run-all'), true")
            t0, s = time.time(), state()
            while time.time() - t0 < 300:
                s = state()
                if s["errors"] or (s["executed"] == s["cells"] and s["kernel"] == "idle"):
                    break
                time.sleep(1.0)
            assert not s["errors"], s["errors"]
            assert s["executed"] == s["cells"] > 0, s
            assert s["images"] >= 1, s
            time.sleep(2.0)  # let the last figures and the viewer's frame render before the picture
            browser.evaluate("window.jupyterapp.shell.collapseLeft(), document.querySelectorAll("
                             "'.jp-OutputArea-output img')[2]?.scrollIntoView({block: 'center'}), true")
            time.sleep(1.0)
            out = REPO_ROOT / "tests" / "artifacts"
            out.mkdir(exist_ok=True)
            shot = browser.screenshot(out / "jupyterlab.png")
            assert shot.std() > 5
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.mark.slow
def test_every_stage_notebook_runs_from_jupyterlabs_folder_in_any_order(tiny_lab):
    """After `make lab`: each stage notebook, opened on its own with its committed parameters, runs top to bottom
    (last stage first, so no notebook relies on an earlier one having just run)."""
    for stem in reversed(list(STAGE_NOTEBOOKS)):
        r = _execute(tiny_lab, stem, timeout=900)
        assert r.returncode == 0, f"{stem}: {r.stderr[-3000:]}"
        code, errors, _ = _outputs(json.loads((tiny_lab / "notebooks" / f"{stem}.ipynb").read_text()))
        assert not errors and all(c["execution_count"] for c in code), stem
