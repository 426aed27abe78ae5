import json
import math

import numpy as np
import pytest
import torch

from nifi_utils.gs.cameras import Camera, CameraSet, look_at, read_transforms, split_indices, write_transforms
from nifi_utils.core.common import NifiError

from conftest import front_camera


def test_transforms_round_trip(tmp_path):
    cams = [front_camera(), Camera(look_at([1, 2, 3], [0, 0, 0]), 50.0, 51.0, 20.5, 15.5, 40, 32, "b")]
    write_transforms(CameraSet(cams, ["images/a.png", "images/b.png"]), tmp_path / "t.json", extra={"split": "eval"})
    back = read_transforms(tmp_path / "t.json")
    assert back.file_paths == ["images/a.png", "images/b.png"] and back.extra["split"] == "eval"
    for a, b in zip(cams, back):
        assert np.allclose(a.c2w, b.c2w) and (a.fx, a.fy, a.cx, a.cy, a.width, a.height) == (b.fx, b.fy, b.cx, b.cy, b.width, b.height)


def test_blender_style_camera_angle_x(tmp_path):
    meta = {"camera_angle_x": 0.6911112070083618, "w": 800, "h": 800,
            "frames": [{"file_path": "./train/r_0", "transform_matrix": np.eye(4).tolist()}]}
    (tmp_path / "t.json").write_text(json.dumps(meta))
    c = read_transforms(tmp_path / "t.json")[0]
    assert math.isclose(c.fx, 400 / math.tan(0.6911112070083618 / 2)) and c.cx == 400 and c.name == "r_0"


def test_opengl_convention_point_in_front_projects_to_centre():
    cam = front_camera(width=64, height=48)
    target = np.array([0.0, 0.0, 0.0, 1.0])
    pc = cam.viewmat().double().numpy() @ target
    assert pc[2] > 0  # OpenCV camera: in front means +z
    uv = cam.K().double().numpy() @ pc[:3]
    assert np.allclose(uv[:2] / uv[2], [cam.cx, cam.cy], atol=1e-6)
    # world "up" (+z) appears towards the top of the image (smaller v)
    up = cam.viewmat().double().numpy() @ np.array([0.0, 0.0, 0.5, 1.0])
    assert (cam.K().double().numpy() @ up[:3])[1] / up[2] < cam.cy


@pytest.mark.parametrize("meta,msg", [
    ({"frames": []}, "no 'frames'"),
    ({"w": 4, "h": 4, "frames": [{"transform_matrix": np.eye(4).tolist()}]}, "no focal length"),
    ({"fl_x": 4, "frames": [{"transform_matrix": np.eye(4).tolist()}]}, "missing image size"),
    ({"fl_x": 4, "w": 4, "h": 4, "frames": [{"transform_matrix": [[1, 0], [0, 1]]}]}, "4x4"),
])
def test_bad_transforms_are_clear_errors(tmp_path, meta, msg):
    (tmp_path / "t.json").write_text(json.dumps(meta))
    with pytest.raises(NifiError, match=msg):
        read_transforms(tmp_path / "t.json")


def test_split_every_eighth_view_is_test():
    train, test = split_indices(17)
    assert test == [0, 8, 16] and sorted(train + test) == list(range(17))


def test_resized_scales_intrinsics():
    c = front_camera(width=40, height=32).resized(80, 64)
    assert (c.width, c.height) == (80, 64) and math.isclose(c.fx, 2 * 1.1 * 40)
