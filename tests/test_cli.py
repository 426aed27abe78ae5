import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nifi_utils.cameras import CameraSet, write_transforms
from nifi_utils.cli import main
from nifi_utils.common import REPO_ROOT
from nifi_utils.render import render

from conftest import front_camera, random_scene


@pytest.fixture
def scene_files(tmp_path):
    scene = random_scene(n=400)
    cams = [front_camera(40, 32), front_camera(40, 32, dist=2.0)]
    scene.save_ply(tmp_path / "pc.ply")
    write_transforms(CameraSet(cams, ["images/a.png", "images/b.png"]), tmp_path / "transforms.json")
    return tmp_path, scene, cams


def test_render_cli_writes_one_png_per_frame(scene_files):
    tmp, scene, cams = scene_files
    assert main(["render", "--ply", str(tmp / "pc.ply"), "--cameras", str(tmp / "transforms.json"), "--out", str(tmp / "out")]) == 0
    a = np.asarray(Image.open(tmp / "out" / "a.png"))
    assert a.shape == (32, 40, 3)
    expected = (render(scene, cams[0])["rgb"].clamp(0, 1) * 255 + 0.5).byte().numpy()
    assert np.abs(a.astype(int) - expected.astype(int)).max() <= 1
    assert main(["render", "--ply", str(tmp / "pc.ply"), "--cameras", str(tmp / "transforms.json"),
                 "--out", str(tmp / "big"), "--width", "80", "--height", "64"]) == 0
    assert np.asarray(Image.open(tmp / "big" / "b.png")).shape == (64, 80, 3)


@pytest.mark.parametrize("extra,msg", [
    (["--ply", "missing.ply"], "PLY file not found"),
    (["--cameras", "missing.json"], "cameras file not found"),
    (["--width", "10"], "both --width and --height"),
    (["--width", "0", "--height", "5"], "must be positive"),
])
def test_render_cli_errors_are_one_line(scene_files, extra, msg):
    tmp, _, _ = scene_files
    args = {"--ply": str(tmp / "pc.ply"), "--cameras": str(tmp / "transforms.json"), "--out": str(tmp / "o")}
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = str(tmp / v) if v.endswith((".ply", ".json")) else v
    cmd = [sys.executable, "-m", "nifi_utils", "render"] + [x for kv in args.items() for x in kv]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], r.stderr
    assert not (tmp / "o").exists()  # nothing written on a user mistake


def test_corrupt_ply_on_the_command_line(tmp_path):
    (tmp_path / "bad.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 10\n")
    (tmp_path / "t.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "nifi_utils", "render", "--ply", str(tmp_path / "bad.ply"), "--cameras",
                        str(tmp_path / "t.json"), "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot read PLY" in r.stderr
