import subprocess
import sys

import numpy as np
import torch
import pytest
from PIL import Image

from nifi_utils.gs.cameras import CameraSet, write_transforms
from nifi_utils.pipeline.cli import main
from nifi_utils.core.common import REPO_ROOT
from nifi_utils.gs.render import render

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


def _inria_ply_from_another_tool(path, n=500, seed=0):
    """An INRIA-layout .ply as the original 3DGS code writes it (with the unused normals)."""
    from plyfile import PlyData, PlyElement

    rng = np.random.default_rng(seed)
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(45)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    arr = np.zeros(n, dtype=[(k, "f4") for k in names])
    for k in names:
        arr[k] = rng.normal(size=n)
    for k in ("x", "y", "z"):
        arr[k] = rng.uniform(-0.8, 0.8, n)
    for k in ("scale_0", "scale_1", "scale_2"):
        arr[k] = rng.normal(-3.0, 0.3, n)
    for k in ("nx", "ny", "nz"):
        arr[k] = 0
    PlyData([PlyElement.describe(arr, "vertex")]).write(str(path))
    return path


def test_compress_decompress_round_trip_on_an_inria_ply(tmp_path):
    from nifi_utils.codec import container as codec
    from nifi_utils.gs.gaussians import read_ply

    ply = _inria_ply_from_another_tool(tmp_path / "point_cloud.ply")
    out = tmp_path / "x.nifi"
    assert main(["compress", "--ply", str(ply), "--gaussians", "120", "--out", str(out), "--sh-degree", "1"]) == 0
    assert main(["decompress", str(out), "--out", str(tmp_path / "y.ply")]) == 0
    dec = read_ply(tmp_path / "y.ply")
    assert len(dec) == 120 and dec.sh_degree == 1
    # the decoded .ply holds exactly what the bitstream decodes to
    direct, head = codec.load(out)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(direct.tensors().values(), dec.tensors().values()))
    # each kept Gaussian is within half a quantization step of an original one (positions: 12 bits)
    orig = read_ply(ply)
    half_step = (orig.means.max(0).values - orig.means.min(0).values) / (2**12 - 1) / 2
    err = ((dec.means[:, None] - orig.means[None]).abs() / half_step).amax(2).min(1).values
    assert float(err.max()) <= 1 + 1e-4


def test_compress_with_cameras_prunes_by_gradient_and_finetunes(scene_files):
    tmp_path, scene, cams = scene_files
    (tmp_path / "images").mkdir()
    for cam, name in zip(cams, ("a", "b")):
        img = (render(scene, cam, background=(0, 0, 0))["rgb"].clamp(0, 1) * 255).round().byte().numpy()
        Image.fromarray(img).save(tmp_path / "images" / f"{name}.png")
    out = tmp_path / "z.nifi"
    r = main(["compress", "--ply", str(tmp_path / "pc.ply"), "--cameras", str(tmp_path / "transforms.json"),
              "--images", str(tmp_path / "images"), "--gaussians", "100", "--finetune-steps", "5",
              "--out", str(out), "--device", "cpu"])
    assert r == 0 and out.stat().st_size > 0


@pytest.mark.parametrize("extra, msg", [
    (["--gaussians", "0"], "between 1 and"),
    (["--gaussians", "10", "--cameras", "t.json"], "both --cameras and --images"),
    (["--gaussians", "10", "--sh-degree", "5"], "--sh-degree"),
])
def test_compress_errors_are_one_line(scene_files, extra, msg):
    tmp_path = scene_files[0]
    r = subprocess.run([sys.executable, "-m", "nifi_utils", "compress", "--ply", str(tmp_path / "pc.ply"),
                        "--out", str(tmp_path / "o.nifi"), *extra], capture_output=True, text=True, cwd=REPO_ROOT)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o.nifi").exists()


def test_decompress_of_a_foreign_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.nifi"
    bad.write_bytes(b"hello world, not a bitstream")
    r = subprocess.run([sys.executable, "-m", "nifi_utils", "decompress", str(bad), "--out", str(tmp_path / "o.ply")],
                       capture_output=True, text=True, cwd=REPO_ROOT)
    assert r.returncode == 2 and "not a .nifi file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.ply").exists()
