"""Output paths on the command line: every `--out` that cannot be written ends in one `error:`
line naming it, exit status 2, no traceback, and nothing left behind; checked before any expensive work.

Unwritable folders come two ways: a chmod 0o500 folder (skipped as root, whom permission bits do not stop)
and /proc, where no one can create a file (so the case also runs as root, as CI does)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nifi_utils.codec import container as codec
from nifi_utils.gs.cameras import CameraSet, write_transforms
from nifi_utils.pipeline.cli import main
from nifi_utils.core.common import REPO_ROOT, NifiError
from nifi_utils.core.outputs import check_out_dir, check_out_file, staged

from conftest import front_camera, random_scene

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
HAS_PROC = Path("/proc").is_dir() and sys.platform.startswith("linux")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Valid inputs for every command, in their own folder (the tests' output folders stay apart)."""
    from nifi_utils.models.folders import save_prior, tiny_sd3

    d = tmp_path_factory.mktemp("inputs")
    scene = random_scene(n=200, sh_degree=1)
    scene.save_ply(d / "pc.ply")
    write_transforms(CameraSet([front_camera(24, 16)], ["images/a.png"]), d / "transforms.json")
    (d / "x.nifi").write_bytes(codec.encode_scene(scene).data)
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(d / "lq.png")
    (d / "lq").mkdir()
    Image.fromarray(np.full((8, 8, 3), 30, np.uint8)).save(d / "lq" / "v0.png")
    save_prior(tiny_sd3(seed=0), d / "prior")
    return d


# command -> (what --out is: "file" or "dir", suffix of a good name, the command line with OUT for --out)
COMMANDS = {
    "render": ("dir", "", lambda i: ["render", "--ply", i / "pc.ply", "--cameras", i / "transforms.json", "--out", "OUT",
                                     "--device", "cpu"]),
    "compress": ("file", ".nifi", lambda i: ["compress", "--ply", i / "pc.ply", "--gaussians", "50", "--out", "OUT",
                                             "--device", "cpu"]),
    "decompress": ("file", ".ply", lambda i: ["decompress", i / "x.nifi", "--out", "OUT"]),
    "decompress --refine": ("file", ".ply", lambda i: ["decompress", i / "x.nifi", "--refine", "--base-model",
                                                       i / "prior", "--ckpt", i / "no-such.pt", "--out", "OUT",
                                                       "--device", "cpu"]),
    "restore": ("file", ".png", lambda i: ["restore", "--lq", i / "lq.png", "--base-model", i / "prior", "--ckpt",
                                           "none", "--device", "cpu", "--out", "OUT"]),
    "restore folder": ("dir", "", lambda i: ["restore", "--lq", i / "lq", "--base-model", i / "prior", "--ckpt", "none",
                                             "--device", "cpu", "--out", "OUT"]),
    "view": ("file", ".html", lambda i: ["view", i / "pc.ply", "--out", "OUT"]),
}


def _argv(command, inputs, out):
    return [str(out) if a == "OUT" else str(a) for a in COMMANDS[command][2](inputs)]


def _listing(d: Path) -> list:
    return sorted((str(p.relative_to(d)), p.is_dir() or p.read_bytes()) for p in d.rglob("*"))


def _assert_error_line(rc, stderr, out):
    lines = stderr.strip().splitlines()
    assert rc == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and str(out) in lines[0], stderr


def _run_in_process(capsys, argv):
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def _cli(argv):
    r = subprocess.run([sys.executable, "-m", "nifi_utils", *argv], capture_output=True, text=True, cwd=REPO_ROOT,
                       timeout=300)
    return r.returncode, r.stderr


@pytest.fixture(params=["chmod", "proc"])
def unwritable(request, tmp_path):
    """A folder in which no file can be created."""
    if request.param == "chmod":
        if IS_ROOT:
            pytest.skip("runs as root: permission bits do not stop root's writes (the /proc case covers this)")
        d = tmp_path / "read_only"
        d.mkdir()
        d.chmod(0o500)
        yield d
        d.chmod(0o700)
    else:
        if not HAS_PROC:
            pytest.skip("no /proc on this system")
        yield Path("/proc")


# ------------------------------------------------------------------ the known cases (as a user runs them)
def test_restore_out_under_a_file(inputs, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    before = _listing(tmp_path)
    out = tmp_path / "notes.txt" / "restored.png"
    _assert_error_line(*_cli(_argv("restore", inputs, out)), out)
    assert _listing(tmp_path) == before


def test_restore_out_under_a_folder_that_cannot_be_made(inputs, tmp_path, unwritable):
    before = _listing(tmp_path)
    out = unwritable / "new_folder" / "restored.png"
    _assert_error_line(*_cli(_argv("restore", inputs, out)), out)
    assert _listing(tmp_path) == before and not out.parent.exists()


def test_decompress_out_is_an_existing_folder(inputs, tmp_path):
    (tmp_path / "scene.ply").mkdir()
    before = _listing(tmp_path)
    out = tmp_path / "scene.ply"
    rc, err = _cli(_argv("decompress", inputs, out))
    _assert_error_line(rc, err, out)
    assert "is a folder" in err and _listing(tmp_path) == before


def test_compress_into_an_unwritable_folder(inputs, tmp_path, unwritable):
    before = _listing(tmp_path)
    out = unwritable / "x.nifi"
    _assert_error_line(*_cli(_argv("compress", inputs, out)), out)
    assert _listing(tmp_path) == before and not out.exists()


# ------------------------------------------------------------------ every command x every way --out can be wrong
@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "restore"])  # restore --out DIR writes DIR/<stem>.png
def test_out_of_the_wrong_kind(capsys, inputs, tmp_path, command):
    """A folder where a file is expected, or a file where a folder is expected."""
    kind, suffix, _ = COMMANDS[command]
    out = tmp_path / f"taken{suffix}"
    if kind == "file":
        out.mkdir()
        (out / "inside.txt").write_text("keep me")
    else:
        out.write_text("keep me")
    before = _listing(tmp_path)
    rc, err = _run_in_process(capsys, _argv(command, inputs, out))
    _assert_error_line(rc, err, out)
    assert ("is a folder" if kind == "file" else "is a file") in err
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("command", list(COMMANDS))
def test_out_whose_parent_is_a_file(capsys, inputs, tmp_path, command):
    _, suffix, _ = COMMANDS[command]
    (tmp_path / "a_file").write_text("keep me")
    before = _listing(tmp_path)
    out = tmp_path / "a_file" / "deeper" / f"out{suffix}"
    rc, err = _run_in_process(capsys, _argv(command, inputs, out))
    _assert_error_line(rc, err, out)
    assert "a_file is a file, not a folder" in err and _listing(tmp_path) == before


@pytest.mark.parametrize("command", list(COMMANDS))
def test_out_in_a_folder_that_cannot_be_written_or_made(capsys, inputs, tmp_path, unwritable, command):
    _, suffix, _ = COMMANDS[command]
    before = _listing(tmp_path)
    for out in (unwritable / f"out{suffix}", unwritable / "new" / f"out{suffix}"):
        rc, err = _run_in_process(capsys, _argv(command, inputs, out))
        _assert_error_line(rc, err, out)
        assert "cannot create files in" in err and not out.exists()
    assert _listing(tmp_path) == before


def test_output_checks_come_before_the_work(capsys, inputs, tmp_path):
    """restore fails on its --out before it loads a model (here a missing one): the first error is the output's."""
    (tmp_path / "f").write_text("")
    out = tmp_path / "f" / "o.png"
    rc, err = _run_in_process(capsys, ["restore", "--lq", str(inputs / "lq.png"), "--out", str(out),
                                       "--base-model", str(tmp_path / "no-prior")])
    _assert_error_line(rc, err, out)
    assert "no-prior" not in err
    rc, err = _run_in_process(capsys, ["restore", "--lq", str(inputs / "lq.png"), "--out", str(tmp_path / "o.txt")])
    assert rc == 2 and "not an image type" in err


# ------------------------------------------------------------------ synthesize and run: no --out, fixed output folders
def test_synthesize_checks_its_folders_before_the_work(capsys, tmp_path, monkeypatch):
    import nifi_utils.core.common

    monkeypatch.setattr(nifi_utils.core.common, "repo_path", lambda *parts: tmp_path.joinpath(*parts))
    rc, err = _run_in_process(capsys, ["synthesize", "--profile", "tiny"])
    _assert_error_line(rc, err, tmp_path / "data" / "tiny" / "scenes")
    assert "run the scenes stage" in err
    (tmp_path / "data" / "tiny" / "scenes").mkdir(parents=True)
    (tmp_path / "data" / "tiny" / "pairs").write_text("not a folder")
    before = _listing(tmp_path)
    rc, err = _run_in_process(capsys, ["synthesize", "--profile", "tiny"])
    _assert_error_line(rc, err, tmp_path / "data" / "tiny" / "pairs")
    assert _listing(tmp_path) == before


def test_run_checks_the_stage_outputs_before_making_folders(tmp_path):
    from nifi_utils.pipeline.run import prepare_outputs

    (tmp_path / "reports").write_text("a file where a folder belongs")
    outs = [tmp_path / "data" / "scenes", tmp_path / "reports" / "scenes.json"]
    with pytest.raises(NifiError, match=r"stage output .*scenes\.json: .*reports is a file, not a folder"):
        prepare_outputs(outs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]  # data/scenes not made either
    (tmp_path / "reports").unlink()
    prepare_outputs(outs)
    assert (tmp_path / "data" / "scenes").is_dir() and (tmp_path / "reports").is_dir()


# ------------------------------------------------------------------ the helpers
def test_checks_accept_what_can_be_written(tmp_path):
    assert check_out_file(tmp_path / "new" / "deeper" / "x.ply") == tmp_path / "new" / "deeper" / "x.ply"
    (tmp_path / "old.ply").write_text("overwritten later")
    check_out_file(tmp_path / "old.ply")
    check_out_dir(tmp_path)
    check_out_dir(tmp_path / "not" / "yet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.ply"]  # the checks write nothing


def test_staged_writes_all_or_nothing(tmp_path):
    (tmp_path / "b.txt").write_text("old")
    with staged() as st:
        st.write(tmp_path / "new" / "a.txt", lambda t: t.write_text("A"))
        st.write(tmp_path / "b.txt", lambda t: t.write_text("B"))
        assert not (tmp_path / "new" / "a.txt").exists() and (tmp_path / "b.txt").read_text() == "old"
    assert (tmp_path / "new" / "a.txt").read_text() == "A" and (tmp_path / "b.txt").read_text() == "B"
    with staged() as st:  # one target twice (two frames with one name): the last wins, as with plain writes
        st.write(tmp_path / "b.txt", lambda t: t.write_text("B1"))
        st.write(tmp_path / "b.txt", lambda t: t.write_text("B"))
    assert (tmp_path / "b.txt").read_text() == "B"
    before = _listing(tmp_path)

    def fails(t):
        t.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(NifiError, match=r"cannot write .*c\.txt \(No space left on device\)"):
        with staged() as st:
            st.write(tmp_path / "made" / "sub" / "a.txt", lambda t: t.write_text("A2"))
            st.write(tmp_path / "b.txt", lambda t: t.write_text("B2"))
            st.write(tmp_path / "made" / "c.txt", fails)
    assert _listing(tmp_path) == before  # no temporaries, no folder made, old files untouched
    with pytest.raises(RuntimeError):
        with staged() as st:
            st.write(tmp_path / "d.txt", lambda t: t.write_text("D"))
            raise RuntimeError("any error half way")
    assert _listing(tmp_path) == before
