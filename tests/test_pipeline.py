"""The lab's machinery: conf/ and params.yaml, params/notebook agreement, install pins, the runner, DVC."""
import ast
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import numpy as np
import pytest
import yaml

from nifi_utils.core.common import REPO_ROOT, NifiError
from nifi_utils.pipeline.params import (CONF_DIR, CONF_NAME, PROFILES, compose_params, compose_yaml, load_params, stage_params,
                               stage_spec)

CONF = REPO_ROOT / CONF_DIR
DVC = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
STAGES = list(DVC["stages"])


def _parameters_cell(nb_path):
    """(name -> literal of the notebook's parameters cell, the names its later code cells read)."""
    nb = jupytext.read(nb_path)
    at = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(at) == 1, f"{nb_path} must have exactly one parameters cell"
    names = {}
    for line in nb.cells[at[0]].source.splitlines():
        m = re.match(r"^([A-Za-z_]\w*)\s*=\s*(.+)$", line)
        if m:
            names[m.group(1)] = eval(m.group(2), {})  # literals only: eval fails on anything else
    read = {n.id for c in nb.cells[at[0] + 1:] if c.cell_type == "code" for n in ast.walk(ast.parse(c.source))
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return names, read


@pytest.mark.parametrize("stage", STAGES)
def test_every_key_of_every_profile_is_read_and_every_key_read_is_there(stage):
    """The stage's notebook declares (parameters cell) and reads (later cells) exactly the keys conf/ composes for
    each profile, plus profile and seed."""
    spec = stage_spec(stage)
    cell, read = _parameters_cell(spec.notebook)
    for profile in PROFILES:
        keys = set(stage_params(stage, profile))
        assert set(cell) == keys, f"{spec.notebook.name} vs conf/ {stage} (profile {profile}): {set(cell) ^ keys}"
    assert not set(cell) - read, f"{spec.notebook.name} never reads {sorted(set(cell) - read)}"
    # the defaults of the parameters cell are the tiny profile
    tiny = stage_params(stage, "tiny")
    assert {k: v for k, v in cell.items() if k != "profile"} == {k: v for k, v in tiny.items() if k != "profile"}
    assert cell["profile"] == "tiny"


@pytest.mark.parametrize("profile", PROFILES)
def test_keys_the_library_reads_are_in_every_profile(profile):
    """Beyond the notebooks: the config classes built from a section (prior_gpu, the screening and scaling
    benchmarks, decompress --refine) and the runner's check of `processes` find their keys."""
    from dataclasses import fields

    from nifi_utils.models.distill import DistillConfig
    from nifi_utils.models.prior import PriorConfig
    from nifi_utils.models.refine import RefineConfig

    assert {f.name for f in fields(PriorConfig)} <= set(stage_params("prior", profile))
    assert {f.name for f in fields(DistillConfig)} <= set(stage_params("distill", profile))
    RefineConfig.from_params(stage_params("refine", profile)["config"])  # an unknown field raises
    for stage in ("synthesis", "distill"):  # ranks through accelerate launch
        assert isinstance(stage_params(stage, profile)["processes"], int)


def _stage_files():
    return {s: CONF / f"{s}.yaml" for s in STAGES}


def test_conf_has_one_file_per_stage_and_one_override_file_per_profile():
    config = yaml.safe_load((CONF / f"{CONF_NAME}.yaml").read_text())
    assert config["defaults"] == ["_self_", *STAGES, {"profile": "cpu"}]
    assert all(f.is_file() for f in _stage_files().values())
    assert {f.stem for f in (CONF / "profile").glob("*.yaml")} == set(PROFILES)
    cpu = compose_params("cpu")
    for profile in PROFILES:
        text = (CONF / "profile" / f"{profile}.yaml").read_text()
        assert text.startswith("# @package _global_\n")  # the profile file sets top-level keys, `profile` among them
        composed = compose_params(profile)
        assert composed["profile"] == profile
        # an override file only overrides: the same stages and keys as the cpu defaults ...
        assert list(composed) == list(cpu)
        for stage in STAGES:
            assert set(composed[stage]) == set(cpu[stage]), f"{profile}: {stage} {set(composed[stage]) ^ set(cpu[stage])}"
        # ... and holds only what differs from them
        own = yaml.safe_load(text)
        assert own.pop("profile") == profile
        for stage, section in own.items():
            for key in section:
                assert composed[stage][key] != cpu[stage][key], f"conf/profile/{profile}.yaml repeats {stage}.{key}"


@pytest.mark.parametrize("stage", STAGES)
def test_every_key_has_one_comment_in_its_stage_file(stage):
    """conf/<stage>.yaml: the stage's keys in order, each with its comment (on its line or the lines above it); the
    profile files do not say it again."""
    lines = _stage_files()[stage].read_text().splitlines()
    comments, above = {}, []
    for line in lines:
        if line.lstrip().startswith("#"):
            above.append(line.strip().lstrip("#").strip())
            continue
        m = re.match(r"^  (\w+): [^#]*?(?:\s+#\s*(.*))?$", line)
        if m:
            comments[m.group(1)] = " ".join(above + [m.group(2)] if m.group(2) else above)
        above = []
    assert list(comments) == list(compose_params("cpu")[stage]), f"conf/{stage}.yaml: keys out of order or nested"
    for key, text in comments.items():
        assert text, f"conf/{stage}.yaml: {key!r} has no comment"
    profile_files = {f.name: f.read_text() for f in (CONF / "profile").glob("*.yaml")}
    for key, text in comments.items():
        for name, profile_text in profile_files.items():
            assert text[:40] not in profile_text, f"conf/profile/{name} repeats the comment of {stage}.{key}"


def test_committed_params_yaml_is_the_cpu_composition_of_conf():
    """`dvc repro` (and `make repro`) read the committed params.yaml: it must be what `dvc exp run` composes from conf/
    for the default profile, byte for byte (`python -m nifi_utils.pipeline.params` rewrites it)."""
    assert (REPO_ROOT / "params.yaml").read_text() == compose_yaml(), \
        "params.yaml is not conf/ composed: run `python -m nifi_utils.pipeline.params`"
    assert load_params()["profile"] == "cpu"
    dvc_config = configparser.ConfigParser()
    dvc_config.read(REPO_ROOT / ".dvc" / "config")
    hydra = dict(dvc_config["hydra"]) if dvc_config.has_section("hydra") else {}
    assert hydra.get("enabled") == "true", ".dvc/config: `dvc config hydra.enabled true`"
    assert hydra.get("config_dir", CONF_DIR) == CONF_DIR and hydra.get("config_name", CONF_NAME) == CONF_NAME


def test_overrides_compose_like_dvc_exp_run_set_param(tmp_path):
    """`-S distill.t0=99` sets one key of the default profile; `-S profile=tiny` takes the tiny file; paths that
    name the profile follow it; DVC's own composition (dvc.utils.hydra) writes the same text."""
    from dvc.utils.hydra import compose_and_dump

    p = compose_params(None, ["distill.t0=99"])
    assert p["distill"]["t0"] == 99 and p["profile"] == "cpu" and p["benchmark"]["t0"] == compose_params()["benchmark"]["t0"]
    tiny = compose_params("tiny", ["distill.t0=99"])
    assert tiny["profile"] == "tiny" and tiny["distill"]["t0"] == 99 and tiny["distill"]["base_model"] == "data/tiny/prior"
    with pytest.raises(NifiError, match="does not compose"):
        compose_params(None, ["distill.no_such_key=1"])
    out = tmp_path / "params.yaml"
    for overrides in ([], ["profile=paper"], ["profile=tiny", "distill.t0=99"]):
        compose_and_dump(out, str(CONF), None, CONF_NAME, str(REPO_ROOT), overrides)
        profile = next((o.split("=")[1] for o in overrides if o.startswith("profile=")), None)
        assert out.read_text() == compose_yaml(profile, [o for o in overrides if not o.startswith("profile=")])


def test_params_command_writes_what_dvc_exp_run_writes(tmp_path, monkeypatch, capsys):
    import nifi_utils.pipeline.params as P

    real = P.repo_path
    monkeypatch.setattr(P, "repo_path", lambda *parts: tmp_path / "params.yaml" if parts == ("params.yaml",) else real(*parts))
    assert P.main(["profile=tiny", "distill.t0=99"]) == 0
    assert (tmp_path / "params.yaml").read_text() == compose_yaml("tiny", ["distill.t0=99"])
    assert P.main(["profile=nope"]) == 2 and "profile/nope" in capsys.readouterr().err


def test_dvc_stages_use_the_profile_in_every_output():
    for name, st in DVC["stages"].items():
        assert st["cmd"].startswith("python -m nifi_utils.pipeline.run " + name)
        for o in st["outs"]:
            o = next(iter(o)) if isinstance(o, dict) else o
            assert "${profile}" in o, f"stage {name}: output {o} is not per profile"
        assert st["params"] == ["profile", "seed", name]


def test_notebooks_are_paired_and_have_no_outputs():
    for py in sorted((REPO_ROOT / "notebooks").glob("*.py")):
        ipynb = py.with_suffix(".ipynb")
        assert ipynb.exists(), f"{ipynb.name} missing: run `make notebooks`"
        raw = json.loads(ipynb.read_text())
        for c in raw["cells"]:
            assert not c.get("outputs") and not c.get("execution_count"), f"{ipynb.name} has outputs committed"
        a, b = jupytext.read(py), jupytext.read(ipynb)
        assert [c.source for c in a.cells] == [c.source for c in b.cells], f"{ipynb.name} out of sync with {py.name}"
        first = a.cells[0]
        assert first.cell_type == "markdown" and all(w in first.source for w in ("Purpose", "Inputs", "Outputs", "Runtime"))


def _pins(lines):
    out = {}
    for line in lines:
        line = line.split("#")[0].strip().lstrip("- ").strip()
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_yml_has_the_same_pins_as_requirements():
    req = _pins((REPO_ROOT / "requirements.txt").read_text().splitlines())
    nodeps = (REPO_ROOT / "requirements-nodeps.txt").read_text().splitlines()
    env_text = (REPO_ROOT / "environment.yml").read_text()
    env = yaml.safe_load(env_text)
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip_list) == req
    # the --no-deps packages are named (as comments) with the same versions
    commented = _pins([l.replace("#", "", 1) for l in env_text.splitlines() if l.strip().startswith("# -")])
    assert commented == _pins(nodeps)
    assert req["torch"] == "2.13.0" and "torchvision" not in req
    assert "torchvision<0" in (REPO_ROOT / "constraints.txt").read_text()


def test_ci_runs_make_test_only():
    lines = [l for l in (REPO_ROOT / ".ci/run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[-1].strip() == "make test" and not any("pytest" in l for l in lines)
    readme = (REPO_ROOT / "README.md").read_text()
    assert "make repro" in readme and "make test" in readme


def test_unknown_stage_and_profile_are_clear():
    with pytest.raises(NifiError, match="unknown stage"):
        stage_spec("nope")
    with pytest.raises(NifiError, match="unknown profile"):
        stage_params("scenes", "huge")


def _env():
    env = dict(os.environ, DVC_NO_ANALYTICS="1", NIFI_QUIET="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


@pytest.mark.slow
def test_runner_on_the_tiny_profile_writes_outputs():
    r = subprocess.run([sys.executable, "-m", "nifi_utils.pipeline.run", "scenes", "--profile", "tiny", "--quiet"],
                       cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    spec = stage_spec("scenes", "tiny")
    for o in spec.outs:
        assert o.exists(), o
        assert (any(o.iterdir()) if o.is_dir() else o.stat().st_size > 0), f"{o} is empty"
    assert "tiny" in str(spec.executed)
    summary = json.loads((REPO_ROOT / "reports/tiny/scenes.json").read_text())
    assert summary["n_train"] >= 1 and summary["n_eval"] >= 1 and summary["provenance"]["profile"] == "tiny"
    for scene in summary["scenes"]:
        d = REPO_ROOT / "data/tiny/scenes" / scene["name"]
        n_png = len(list((d / "images").glob("*.png")))
        assert n_png == scene["n_views"] > 0


@pytest.mark.slow
def test_synthesis_stage_on_tiny_and_decompress_render_matches():
    """The stage's files are what its report says, and decompress + render reproduces its renders."""
    from PIL import Image

    from nifi_utils.pipeline.cli import main as cli

    env = _env()
    if not (REPO_ROOT / "data/tiny/scenes").is_dir():
        subprocess.run([sys.executable, "-m", "nifi_utils.pipeline.run", "scenes", "--profile", "tiny", "--quiet"],
                       cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=600)
    r = subprocess.run([sys.executable, "-m", "nifi_utils.pipeline.run", "synthesis", "--profile", "tiny", "--quiet"],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for o in stage_spec("synthesis", "tiny").outs:
        assert o.exists() and (any(o.iterdir()) if o.is_dir() else o.stat().st_size > 0), o
    rep = json.loads((REPO_ROOT / "reports/tiny/synthesis.json").read_text())
    p = stage_params("synthesis", "tiny")
    data = REPO_ROOT / "data/tiny"
    for sc in rep["scenes"]:
        ply = (data / "scenes" / sc["scene"] / "point_cloud.ply").stat().st_size
        meta = json.loads((data / "scenes" / sc["scene"] / "transforms.json").read_text())
        sizes = []
        for lv in sc["levels"]:
            f = data / "bitstreams" / sc["scene"] / f"level{lv['level']}.nifi"
            assert f.stat().st_size == lv["bytes"] and lv["ratio_to_ply"] == pytest.approx(ply / lv["bytes"])
            sizes.append(lv["bytes"])
            n_test = len(list((data / "renders" / sc["scene"] / f"level{lv['level']}").glob("*.png")))
            assert n_test == len(meta["test_ids"])
            if sc["split"] == "train":
                assert len(list((data / "pairs" / sc["scene"] / f"level{lv['level']}").glob("*.png"))) == len(meta["train_ids"])
        assert sizes == sorted(sizes) and len(sizes) == p["n_levels"]
    # decompress + the render CLI == the stage's own render, pixel for pixel
    sc = rep["scenes"][0]["scene"]
    tmp = REPO_ROOT / "data/tiny/_cli_check"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        assert cli(["decompress", str(data / "bitstreams" / sc / "level0.nifi"), "--out", str(tmp / "l0.ply")]) == 0
        bg = ",".join(str(v) for v in p["background"])
        assert cli(["render", "--ply", str(tmp / "l0.ply"), "--cameras", str(data / "scenes" / sc / "transforms.json"),
                    "--out", str(tmp / "png"), "--background", bg, "--device", "cpu"]) == 0
        stage_pngs = sorted((data / "renders" / sc / "level0").glob("*.png"))
        assert stage_pngs
        for f in stage_pngs:
            assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(tmp / "png" / f.name))), f.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_runner_names_the_failing_cell(tmp_path, monkeypatch):
    import nifi_utils.pipeline.run as run
    from nifi_utils.pipeline.params import StageSpec

    nb = tmp_path / "bad.py"
    nb.write_text('# %% tags=["parameters"]\nprofile = "tiny"\n\n# %%\nx = 1\n\n# %%\nraise ValueError("boom")\n')
    out = tmp_path / "out" / "bad.ipynb"
    monkeypatch.setattr(run, "stage_spec", lambda *a, **k: StageSpec("bad", nb, [out], out))
    monkeypatch.setattr(run, "stage_params", lambda *a, **k: {"profile": "tiny"})
    with pytest.raises(NifiError, match=r"stage bad failed in cell \d+ \(ValueError: boom\)"):
        run.run_stage("bad", log_output=False)
    assert out.exists()  # the executed notebook is kept for inspection


@pytest.mark.slow
def test_dvc_profile_switch_and_noop_second_repro(tmp_path):
    """The README's way to switch profile, in a scratch copy of the repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    work = tmp_path / "lab"
    for f in files:
        # data/<profile>/ and reports/<profile>/ are pipeline outputs; the frozen prior's committed outputs and
        # data files beside the profiles (data/paper_table1.csv) are inputs here
        if (REPO_ROOT / f).is_file() and (not re.match(r"(data|reports)/[^/]+/", f) or "prior" in f):
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / f, work / f)
    env = _env()
    run = lambda *cmd: subprocess.run(list(cmd), cwd=work, env=env, capture_output=True, text=True, timeout=600)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        assert run(*cmd).returncode == 0
    r = run("dvc", "exp", "run", "-S", "profile=tiny")
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:]
    assert (work / "data/tiny/scenes").is_dir() and not (work / "data/cpu/scenes").exists()
    assert (work / "params.yaml").read_text() == compose_yaml("tiny")  # DVC composed conf/ for the profile
    # one key (`-S distill.t0=99` in the README): composed over the profile, only the stage that reads it reruns
    r = run("dvc", "exp", "run", "-S", "profile=tiny", "-S", "plots.grid_crop=12")
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:]
    assert re.findall(r"Running stage '(\w+)'", r.stdout) == ["plots"], r.stdout[-1500:]
    assert (work / "params.yaml").read_text() == compose_yaml("tiny", ["plots.grid_crop=12"])
    r = run("dvc", "repro")
    assert r.returncode == 0 and "Running stage" not in r.stdout, r.stdout[-1500:]
    r = run("dvc", "status")
    assert "up to date" in r.stdout.lower(), r.stdout


def test_stage_times_are_recorded_merged_and_tabled(tmp_path, monkeypatch):
    import json
    import sys

    from nifi_utils.pipeline import run as R

    monkeypatch.setattr(R, "REPO_ROOT", tmp_path)
    R.record_timing("cpu", "distill", 900.0, 1.0, 2.0)
    R.record_timing("cpu", "scenes", 120.0, 5.0, 1.0)
    R.record_timing("cpu", "distill", 800.0, 1.0, 1.0)  # a rerun replaces its own entry only
    data = json.loads((tmp_path / "reports" / "cpu" / "timings.json").read_text())
    assert data["stages"]["distill"]["seconds"] == 800.0 and data["stages"]["scenes"]["seconds"] == 120.0
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import stage_times

    text = stage_times.table(data)
    lines = text.splitlines()
    assert lines[2].startswith("| `scenes`") and lines[3].startswith("| `distill`")  # pipeline order
    assert "15.3 min" in lines[-1]  # (800 + 120) / 60
    assert ("**busy**" in lines[2]) == (5.0 > 1.25 * data["stages"]["scenes"]["cores"])
