"""Pinhole cameras in the NeRF `transforms.json` convention.

`transform_matrix` is camera-to-world with OpenGL axes (x right, y up, camera looks down -z).
gsplat wants world-to-camera with OpenCV axes (x right, y down, looks down +z): `viewmat()`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nifi_utils.core.facts import TEST_EVERY, is_test_view
from nifi_utils.core.common import NifiError

GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass
class Camera:
    c2w: np.ndarray  # [4,4] camera-to-world, OpenGL axes
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    name: str = ""

    def viewmat(self) -> torch.Tensor:
        """World-to-camera [4,4] in OpenCV axes (gsplat's `viewmats`)."""
        return torch.from_numpy(np.linalg.inv(self.c2w @ GL_TO_CV)).float()

    def K(self) -> torch.Tensor:
        k = [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]]
        return torch.tensor([[float(v) for v in row] for row in k], dtype=torch.float32)

    @property
    def position(self) -> np.ndarray:
        return self.c2w[:3, 3].copy()

    def resized(self, width: int, height: int) -> "Camera":
        """The same camera at another resolution (intrinsics scaled)."""
        sx, sy = width / self.width, height / self.height
        return Camera(self.c2w.copy(), self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy, width, height, self.name)


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Camera-to-world (OpenGL axes) for a camera at `eye` looking at `target`."""
    eye, target, up = (np.asarray(a, dtype=np.float64) for a in (eye, target, up))
    back = eye - target
    back /= np.linalg.norm(back)
    right = np.cross(up, back)
    if np.linalg.norm(right) < 1e-8:
        right = np.cross(np.array([0.0, 1.0, 0.0]), back)
    right /= np.linalg.norm(right)
    cam_up = np.cross(back, right)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, cam_up, back, eye
    return m


@dataclass
class CameraSet:
    cameras: list[Camera]
    file_paths: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.cameras)

    def __getitem__(self, i):
        return self.cameras[i]

    def __iter__(self):
        return iter(self.cameras)


def _intrinsics(d: dict, where: str, defaults: dict | None = None):
    d = {**(defaults or {}), **d}
    try:
        w, h = int(d["w"]), int(d["h"])
    except KeyError as e:
        raise NifiError(f"{where}: missing image size key {e.args[0]!r} (need 'w' and 'h')") from None
    if "fl_x" in d:
        fx = float(d["fl_x"])
        fy = float(d.get("fl_y", fx))
    elif "camera_angle_x" in d:
        fx = 0.5 * w / math.tan(0.5 * float(d["camera_angle_x"]))
        fy = 0.5 * h / math.tan(0.5 * float(d["camera_angle_y"])) if "camera_angle_y" in d else fx
    else:
        raise NifiError(f"{where}: no focal length (need 'fl_x' or 'camera_angle_x')")
    cx = float(d.get("cx", w / 2))
    cy = float(d.get("cy", h / 2))
    return fx, fy, cx, cy, w, h


_INTRINSIC_KEYS = ("w", "h", "fl_x", "fl_y", "cx", "cy", "camera_angle_x", "camera_angle_y")


def read_transforms(path: str | Path) -> CameraSet:
    """Read a NeRF/nerfstudio `transforms.json` (global or per-frame intrinsics)."""
    path = Path(path)
    if not path.is_file():
        raise NifiError(f"cameras file not found: {path}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NifiError(f"{path} is not valid JSON: {e}") from None
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not frames:
        raise NifiError(f"{path} has no 'frames' list")
    defaults = {k: meta[k] for k in _INTRINSIC_KEYS if k in meta}
    cams, paths = [], []
    for i, fr in enumerate(frames):
        where = f"{path} frame {i}"
        if "transform_matrix" not in fr:
            raise NifiError(f"{where}: missing 'transform_matrix'")
        m = np.asarray(fr["transform_matrix"], dtype=np.float64)
        if m.shape != (4, 4) or not np.isfinite(m).all():
            raise NifiError(f"{where}: 'transform_matrix' must be a finite 4x4 matrix")
        fx, fy, cx, cy, w, h = _intrinsics(fr, where, defaults)
        fp = str(fr.get("file_path", f"frame_{i:04d}"))
        cams.append(Camera(m, fx, fy, cx, cy, w, h, name=Path(fp).stem))
        paths.append(fp)
    extra = {k: v for k, v in meta.items() if k not in _INTRINSIC_KEYS and k != "frames"}
    return CameraSet(cams, paths, extra)


def write_transforms(cams: CameraSet | list[Camera], path: str | Path, file_paths=None, extra=None) -> Path:
    """Write `transforms.json` with per-frame intrinsics (and global ones when all frames agree)."""
    if isinstance(cams, CameraSet):
        file_paths = file_paths or cams.file_paths
        extra = {**cams.extra, **(extra or {})}
        cams = cams.cameras
    file_paths = file_paths or [f"images/{c.name or f'frame_{i:04d}'}.png" for i, c in enumerate(cams)]
    frames = []
    for c, fp in zip(cams, file_paths):
        frames.append({
            "file_path": fp, "w": c.width, "h": c.height, "fl_x": c.fx, "fl_y": c.fy, "cx": c.cx, "cy": c.cy,
            "transform_matrix": np.asarray(c.c2w).tolist(),
        })
    meta: dict = {}
    c0 = cams[0]
    if all((c.width, c.height, c.fx, c.fy, c.cx, c.cy) == (c0.width, c0.height, c0.fx, c0.fy, c0.cx, c0.cy) for c in cams):
        meta.update(w=c0.width, h=c0.height, fl_x=c0.fx, fl_y=c0.fy, cx=c0.cx, cy=c0.cy,
                    camera_angle_x=2 * math.atan(0.5 * c0.width / c0.fx))
    meta.update(extra or {})
    meta["frames"] = frames
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=1))
    return path


def split_indices(n: int, llffhold: int = TEST_EVERY) -> tuple[list[int], list[int]]:
    """3DGS-literature split: test = every `llffhold`-th view (`facts.is_test_view`), train = the rest."""
    test = [i for i in range(n) if is_test_view(i, llffhold)]
    train = [i for i in range(n) if not is_test_view(i, llffhold)]
    return train, test
