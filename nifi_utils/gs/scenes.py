"""Procedural multi-view Gaussian scenes (cpu/tiny) and real COLMAP datasets (paper).

A procedural scene is a textured ground, a cylindrical backdrop and several textured objects
(boxes, spheres, cylinders, tori) covered by flat Gaussians tangent to their surfaces, coloured
from photographic (scikit-image/scikit-learn, CC0) or procedural textures, with view-dependent
colour in SH bands 1-3. Its "uncompressed 3DGS" is known exactly; ground-truth views are
supersampled renders of it, so even the uncompressed 3DGS rendered at the target resolution is
not pixel-identical to the ground truth (as a trained 3DGS is not identical to the photographs).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from nifi_utils.core.facts import is_test_view
from nifi_utils.core.images import image_size, read_rgb
from nifi_utils.gs.cameras import Camera, CameraSet, look_at, read_transforms, split_indices, write_transforms
from nifi_utils.core.common import NifiError, progress
from nifi_utils.gs.gaussians import GaussianScene, read_ply, rgb_to_sh0

# ---------------------------------------------------------------- textures
# Photographic textures that evaluation scenes use and training scenes never see (fixed split).
EVAL_PHOTOS = ("coffee", "rocket", "flower", "gravel", "text")
TRAIN_PHOTOS = ("astronaut", "chelsea", "colorwheel", "hubble_deep_field", "immunohistochemistry", "retina",
                "stereo_motorcycle", "logo", "china", "brick", "camera", "coins", "grass", "moon", "page",
                "clock", "cell")
PROCEDURAL = ("checker", "stripes", "bricks", "noise", "dots", "rings")


@lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """A bundled CC0 image as float32 RGB in [0,1] (grey images replicated to 3 channels)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        im = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        im = getattr(skimage.data, name)()
        if isinstance(im, tuple):
            im = im[0]
    im = np.asarray(im)
    if im.dtype == bool:
        im = im.astype(np.float32)
    else:
        im = im.astype(np.float32) / (255.0 if im.dtype == np.uint8 else float(im.max() or 1))
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, -1)
    return np.ascontiguousarray(im[..., :3])


def procedural_texture(kind: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Procedural textures with sharp detail at several scales (unlimited training variety)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c1, c2 = rng.uniform(0.05, 0.95, 3), rng.uniform(0.05, 0.95, 3)
    f = rng.uniform(4, 24)
    if kind == "checker":
        m = ((np.floor(x * f) + np.floor(y * f)) % 2)[..., None]
    elif kind == "stripes":
        ang = rng.uniform(0, np.pi)
        m = (np.sin((x * np.cos(ang) + y * np.sin(ang)) * f * 2 * np.pi) > rng.uniform(-0.5, 0.5))[..., None]
    elif kind == "bricks":
        rows = np.floor(y * f)
        xs = x * f / 2 + 0.5 * (rows % 2)
        mortar = (np.abs(y * f - np.round(y * f)) < 0.08) | (np.abs(xs - np.round(xs)) < 0.05)
        m = mortar[..., None].astype(np.float32)
    elif kind == "noise":
        m = np.zeros((size, size), np.float32)
        for octave in range(5):
            n = 2 ** (octave + 2)
            g = rng.uniform(0, 1, (n + 1, n + 1)).astype(np.float32)
            xi, yi = x * n, y * n
            x0, y0 = np.floor(xi).astype(int), np.floor(yi).astype(int)
            fx, fy = xi - x0, yi - y0
            v = (g[y0, x0] * (1 - fx) * (1 - fy) + g[y0, x0 + 1] * fx * (1 - fy)
                 + g[y0 + 1, x0] * (1 - fx) * fy + g[y0 + 1, x0 + 1] * fx * fy)
            m += v / 2 ** octave
        m = (m / m.max())[..., None]
    elif kind == "dots":
        cx, cy = (x * f) % 1 - 0.5, (y * f) % 1 - 0.5
        m = ((cx**2 + cy**2) < rng.uniform(0.03, 0.2))[..., None].astype(np.float32)
    elif kind == "rings":
        r = np.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2)
        m = ((np.sin(r * f * 2 * np.pi) + np.sin(x * 3 * f * np.pi) * 0.3) > 0)[..., None].astype(np.float32)
    else:
        raise ValueError(f"unknown procedural texture {kind!r}")
    return (c1 * (1 - m) + c2 * m).astype(np.float32)


def pick_texture(rng: np.random.Generator, photos: tuple[str, ...], p_photo: float = 0.6) -> np.ndarray:
    """A random texture: a photo from the allowed pool (randomly cropped/tinted) or a procedural one."""
    if photos and rng.uniform() < p_photo:
        im = load_photo(str(rng.choice(photos)))
        h, w = im.shape[:2]
        s = int(min(h, w) * rng.uniform(0.4, 1.0))
        y0, x0 = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        im = im[y0:y0 + s, x0:x0 + s]
        if np.allclose(im[..., 0], im[..., 1]):  # grey photo: tint it
            im = im * rng.uniform(0.5, 1.0, 3)[None, None]
        return np.ascontiguousarray(im, dtype=np.float32)
    return procedural_texture(str(rng.choice(PROCEDURAL)), rng)


def sample_texture(tex: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup with wrap-around; uv in texture units (1.0 = one texture width)."""
    h, w = tex.shape[:2]
    x = (uv[:, 0] % 1.0) * w - 0.5
    y = (uv[:, 1] % 1.0) * h - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0, x1, y1 = x0 % w, y0 % h, (x0 + 1) % w, (y0 + 1) % h
    return (tex[y0, x0] * (1 - fx) * (1 - fy) + tex[y0, x1] * fx * (1 - fy)
            + tex[y1, x0] * (1 - fx) * fy + tex[y1, x1] * fx * fy)


# ---------------------------------------------------------------- surfaces
@dataclass
class SurfaceSamples:
    points: np.ndarray  # [n,3]
    tu: np.ndarray  # [n,3] unit tangent
    tv: np.ndarray  # [n,3] unit tangent
    uv: np.ndarray  # [n,2] texture coordinates


def _frame(normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.where(np.abs(normals[:, 2:3]) < 0.9, np.array([[0.0, 0.0, 1.0]]), np.array([[1.0, 0.0, 0.0]]))
    tu = np.cross(a, normals)
    tu /= np.linalg.norm(tu, axis=1, keepdims=True)
    return tu, np.cross(normals, tu)


def _rot_z(pts: np.ndarray, ang: float) -> np.ndarray:
    c, s = np.cos(ang), np.sin(ang)
    r = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    return pts @ r.T


class Surface:
    area: float

    def sample(self, n: int, rng: np.random.Generator) -> SurfaceSamples:
        raise NotImplementedError


class Plane(Surface):
    """Axis-aligned ground square at height z, half-size `half`, texture repeated `rep` times."""

    def __init__(self, half: float, z: float = 0.0, rep: float = 3.0):
        self.half, self.z, self.rep = half, z, rep
        self.area = (2 * half) ** 2

    def sample(self, n, rng):
        xy = rng.uniform(-self.half, self.half, (n, 2))
        pts = np.column_stack([xy, np.full(n, self.z)])
        ones = np.ones((n, 1))
        return SurfaceSamples(pts, np.array([1.0, 0, 0]) * ones, np.array([0, 1.0, 0]) * ones,
                              (xy + self.half) / (2 * self.half) * self.rep)


class CylinderSide(Surface):
    """Side of a z-axis cylinder (also the scene backdrop when seen from inside)."""

    def __init__(self, center, radius, height, rep=(4.0, 1.0), ang=0.0):
        self.c, self.r, self.h, self.rep, self.ang = np.asarray(center, float), radius, height, rep, ang
        self.area = 2 * np.pi * radius * height

    def sample(self, n, rng):
        th = rng.uniform(0, 2 * np.pi, n)
        z = rng.uniform(0, self.h, n)
        nrm = np.column_stack([np.cos(th + self.ang), np.sin(th + self.ang), np.zeros(n)])
        pts = self.c + nrm * self.r + np.column_stack([np.zeros((n, 2)), z])
        tv = np.tile([0.0, 0.0, 1.0], (n, 1))
        tu = np.cross(tv, nrm)
        uv = np.column_stack([th / (2 * np.pi) * self.rep[0], z / self.h * self.rep[1]])
        return SurfaceSamples(pts, tu, tv, uv)


class Disk(Surface):
    def __init__(self, center, radius, up=True):
        self.c, self.r, self.up = np.asarray(center, float), radius, up
        self.area = np.pi * radius**2

    def sample(self, n, rng):
        r = self.r * np.sqrt(rng.uniform(0, 1, n))
        th = rng.uniform(0, 2 * np.pi, n)
        xy = np.column_stack([r * np.cos(th), r * np.sin(th)])
        pts = self.c + np.column_stack([xy, np.zeros(n)])
        ones = np.ones((n, 1))
        return SurfaceSamples(pts, np.array([1.0, 0, 0]) * ones, np.array([0, 1.0, 0]) * ones, xy / (2 * self.r) + 0.5)


class Box(Surface):
    """An axis-aligned box (rotated about z), 5 visible faces (the bottom rests on the ground)."""

    def __init__(self, center, size, ang=0.0):
        self.c, self.s, self.ang = np.asarray(center, float), np.asarray(size, float), ang
        sx, sy, sz = self.s
        self.faces = [(0, sy * sz), (1, sx * sz), (2, sx * sy)]
        self.face_areas = np.array([sy * sz, sy * sz, sx * sz, sx * sz, sx * sy])
        self.area = float(self.face_areas.sum())

    def sample(self, n, rng):
        face = rng.choice(5, n, p=self.face_areas / self.area)
        u, v = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
        sx, sy, sz = self.s
        pts, tu, tv = np.zeros((n, 3)), np.zeros((n, 3)), np.zeros((n, 3))
        for f in range(5):
            m = face == f
            axis, sign = [(0, 1), (0, -1), (1, 1), (1, -1), (2, 1)][f]
            other = [a for a in range(3) if a != axis]
            p = np.zeros((m.sum(), 3))
            p[:, axis] = sign * 0.5 * self.s[axis]
            p[:, other[0]] = u[m] * self.s[other[0]]
            p[:, other[1]] = v[m] * self.s[other[1]]
            pts[m] = p
            tu[m, other[0]] = 1.0
            tv[m, other[1]] = 1.0
        pts = _rot_z(pts + np.array([0, 0, sz / 2]), self.ang) + self.c
        tu, tv = _rot_z(tu, self.ang), _rot_z(tv, self.ang)
        uv = np.column_stack([u + 0.5 + face * 0.37, v + 0.5])
        return SurfaceSamples(pts, tu, tv, uv)


class Sphere(Surface):
    def __init__(self, center, radius):
        self.c, self.r = np.asarray(center, float), radius
        self.area = 4 * np.pi * radius**2

    def sample(self, n, rng):
        nrm = rng.normal(size=(n, 3))
        nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
        tu, tv = _frame(nrm)
        uv = np.column_stack([np.arctan2(nrm[:, 1], nrm[:, 0]) / (2 * np.pi) * 2, np.arccos(nrm[:, 2].clip(-1, 1)) / np.pi])
        return SurfaceSamples(self.c + nrm * self.r, tu, tv, uv)


class Torus(Surface):
    """A torus lying on the ground (axis z); area-uniform by rejection on the tube angle."""

    def __init__(self, center, R, r, ang=0.0):
        self.c, self.R, self.r, self.ang = np.asarray(center, float), R, r, ang
        self.area = 4 * np.pi**2 * R * r

    def sample(self, n, rng):
        out_u, out_v = [], []
        while sum(len(a) for a in out_u) < n:
            u = rng.uniform(0, 2 * np.pi, 2 * n)
            v = rng.uniform(0, 2 * np.pi, 2 * n)
            keep = rng.uniform(0, 1, 2 * n) < (self.R + self.r * np.cos(v)) / (self.R + self.r)
            out_u.append(u[keep])
            out_v.append(v[keep])
        u, v = np.concatenate(out_u)[:n], np.concatenate(out_v)[:n]
        nrm = np.column_stack([np.cos(v) * np.cos(u), np.cos(v) * np.sin(u), np.sin(v)])
        ring = np.column_stack([np.cos(u), np.sin(u), np.zeros(n)])
        pts = ring * self.R + nrm * self.r + np.array([0, 0, self.r])
        tu = np.column_stack([-np.sin(u), np.cos(u), np.zeros(n)])
        tv = np.cross(nrm, tu)
        pts, tu, tv = _rot_z(pts, self.ang) + self.c, _rot_z(tu, self.ang), _rot_z(tv, self.ang)
        return SurfaceSamples(pts, tu, tv, np.column_stack([u / (2 * np.pi) * 3, v / (2 * np.pi)]))


# ---------------------------------------------------------------- scene generation
@dataclass
class SceneSpec:
    """Everything that defines a procedural scene; `layout_id` fingerprints its layout."""

    name: str
    seed: int
    split: str  # "train" or "eval"
    n_gaussians: int
    n_views: int
    width: int
    height: int
    fov_deg: float = 50.0

    @property
    def layout_id(self) -> str:
        return hashlib.sha1(f"{self.split}:{self.seed}".encode()).hexdigest()[:12]


def scene_seeds(seed: int, n_train: int, n_eval: int) -> tuple[list[int], list[int]]:
    """Disjoint seed streams for training and evaluation scenes (a train layout never repeats an eval one)."""
    ss = np.random.SeedSequence(seed)
    train_ss, eval_ss = ss.spawn(2)
    tr = [int(s.generate_state(1)[0]) for s in train_ss.spawn(n_train)]
    ev = [int(s.generate_state(1)[0]) for s in eval_ss.spawn(n_eval)]
    if set(tr) & set(ev):
        raise NifiError("training and evaluation scene seeds collide; choose another global seed")
    return tr, ev


def prior_scene_seeds(seed: int, n: int) -> list[int]:
    """A third seed stream (after training and evaluation) for scenes rendered only to pretrain the offline prior.
    They are training-split scenes (training photographs); never an evaluation seed."""
    streams = np.random.SeedSequence(seed).spawn(3)  # children 0 and 1 are scene_seeds' train / eval streams
    seeds = [int(s.generate_state(1)[0]) for s in streams[2].spawn(n)]
    _, ev = scene_seeds(seed, 0, 64)
    if set(seeds) & set(ev):
        raise NifiError("prior-corpus and evaluation scene seeds collide; choose another global seed")
    return seeds


def _surface_gaussians(surf: Surface, n: int, tex: np.ndarray, rng: np.random.Generator,
                       spec: float, flatness: float = 0.08) -> GaussianScene:
    s = surf.sample(n, rng)
    spacing = np.sqrt(surf.area / n)
    nrm = np.cross(s.tu, s.tv)
    rot = np.stack([s.tu, s.tv, nrm], -1)  # columns: local axes in world
    quats = _rotmat_to_quat(rot)
    aniso = np.exp(rng.normal(0, 0.25, (n, 2)))
    sc = np.column_stack([spacing * 0.75 * aniso, np.full(n, spacing * flatness)])
    rgb = sample_texture(tex, s.uv).clip(0, 1)
    sh = np.zeros((n, 16, 3), np.float32)
    sh[:, 0] = rgb_to_sh0(torch.from_numpy(rgb)).numpy()
    # view-dependent colour: a smooth "sheen" towards a random light direction in band 1 ...
    L = rng.normal(size=3)
    L /= np.linalg.norm(L)
    tint = rng.uniform(0.5, 1.0, 3)
    k = spec * 0.8
    c1 = 0.4886025119029199
    sh[:, 1] = (-k * L[1] / c1 * tint)[None]
    sh[:, 2] = (k * L[2] / c1 * tint)[None]
    sh[:, 3] = (-k * L[0] / c1 * tint)[None]
    # ... and per-Gaussian glints in bands 2-3
    sh[:, 4:16] = rng.normal(0, 0.08 * spec, (n, 12, 3))
    op = rng.uniform(0.85, 0.99, n)
    return GaussianScene(
        means=torch.from_numpy(s.points).float(), quats=torch.from_numpy(quats).float(),
        log_scales=torch.from_numpy(np.log(sc)).float(), opacity_logits=torch.from_numpy(np.log(op / (1 - op))).float(),
        sh=torch.from_numpy(sh))


def _rotmat_to_quat(R: np.ndarray) -> np.ndarray:
    """Rotation matrices [n,3,3] -> (w,x,y,z) quaternions (Shepperd's method)."""
    t = np.trace(R, axis1=1, axis2=2)
    cands = np.stack([t, R[:, 0, 0], R[:, 1, 1], R[:, 2, 2]], 1)
    i = np.argmax(cands, 1)
    q = np.zeros((len(R), 4))
    for k in range(4):
        m = i == k
        r = R[m]
        if k == 0:
            s = np.sqrt(1 + t[m]) * 2
            q[m] = np.column_stack([0.25 * s, (r[:, 2, 1] - r[:, 1, 2]) / s, (r[:, 0, 2] - r[:, 2, 0]) / s, (r[:, 1, 0] - r[:, 0, 1]) / s])
        else:
            a, b, c = [(0, 1, 2), (1, 2, 0), (2, 0, 1)][k - 1]
            s = np.sqrt(1 + r[:, a, a] - r[:, b, b] - r[:, c, c]) * 2
            qv = np.zeros((m.sum(), 4))
            qv[:, 0] = (r[:, c, b] - r[:, b, c]) / s
            qv[:, 1 + a] = 0.25 * s
            qv[:, 1 + b] = (r[:, a, b] + r[:, b, a]) / s
            qv[:, 1 + c] = (r[:, a, c] + r[:, c, a]) / s
            q[m] = qv
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def generate_scene(spec: SceneSpec) -> tuple[GaussianScene, CameraSet]:
    """A procedural scene and its orbit cameras, a pure function of `spec`."""
    rng = np.random.default_rng(spec.seed)
    photos = EVAL_PHOTOS if spec.split == "eval" else TRAIN_PHOTOS
    ground_half, wall_r = 4.0, 5.0
    surfaces: list[tuple[Surface, float, float]] = []  # (surface, density weight, specularity)
    surfaces.append((Plane(ground_half, rep=rng.uniform(1.5, 4)), 1.0, 0.1))
    surfaces.append((CylinderSide([0, 0, 0], wall_r, 3.0, rep=(rng.integers(2, 6), 1.0), ang=rng.uniform(0, 6.3)), 0.4, 0.05))
    n_obj = int(rng.integers(5, 9))
    placed: list[tuple[float, float, float]] = []
    for _ in range(n_obj):
        for _try in range(50):
            size = rng.uniform(0.45, 1.0)
            # objects stay well inside the camera orbit so no view is blocked by one
            rad_o, ang_o = 1.9 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
            x, y = rad_o * np.cos(ang_o), rad_o * np.sin(ang_o)
            if all((x - px) ** 2 + (y - py) ** 2 > (0.8 * (size + pr)) ** 2 for px, py, pr in placed):
                break
        placed.append((x, y, size))
        kind = rng.choice(["box", "sphere", "cylinder", "torus"])
        spec_k = float(rng.uniform(0.0, 0.6))
        if kind == "box":
            dims = rng.uniform(0.5, 1.3, 3) * size
            surfaces.append((Box([x, y, 0], dims, ang=rng.uniform(0, np.pi)), 4.0, spec_k))
        elif kind == "sphere":
            r = size * rng.uniform(0.5, 0.8)
            surfaces.append((Sphere([x, y, r], r), 4.0, spec_k))
        elif kind == "cylinder":
            r, h = size * rng.uniform(0.3, 0.6), size * rng.uniform(0.8, 2.0)
            surfaces.append((CylinderSide([x, y, 0], r, h, rep=(2.0, 1.0)), 4.0, spec_k))
            surfaces.append((Disk([x, y, h], r), 4.0, spec_k))
        else:
            R = size * rng.uniform(0.45, 0.6)
            surfaces.append((Torus([x, y, 0], R, R * rng.uniform(0.25, 0.45), ang=rng.uniform(0, np.pi)), 4.0, spec_k))
    weights = np.array([s.area * w for s, w, _ in surfaces])
    if spec.n_gaussians < 32 * len(surfaces):
        raise NifiError(f"scene {spec.name}: {spec.n_gaussians} Gaussians are too few for {len(surfaces)} surfaces")
    counts = np.maximum(16, np.floor(weights / weights.sum() * spec.n_gaussians)).astype(int)
    counts[int(np.argmax(counts))] += spec.n_gaussians - counts.sum()  # exact total
    parts = []
    for (surf, _, spk), n in zip(surfaces, counts):
        parts.append(_surface_gaussians(surf, int(n), pick_texture(rng, photos), rng, spk))
    scene = GaussianScene.concat(parts)
    return scene, orbit_cameras(rng, spec)


def orbit_cameras(rng: np.random.Generator, spec: SceneSpec) -> CameraSet:
    """Cameras orbiting the scene centre at varied radius and height, looking roughly inwards."""
    n = spec.n_views
    az = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi) + rng.normal(0, 0.05, n)
    elev = np.deg2rad(rng.uniform(12, 40, n))
    rad = rng.uniform(3.3, 4.3, n)
    f = 0.5 * spec.width / np.tan(np.deg2rad(spec.fov_deg) / 2)
    cams, paths = [], []
    for i in range(n):
        eye = np.array([rad[i] * np.cos(elev[i]) * np.cos(az[i]), rad[i] * np.cos(elev[i]) * np.sin(az[i]), 0.3 + rad[i] * np.sin(elev[i])])
        target = np.array([*rng.normal(0, 0.3, 2), rng.uniform(0.2, 0.5)])
        name = f"{i:04d}"
        cams.append(Camera(look_at(eye, target), f, f, spec.width / 2, spec.height / 2, spec.width, spec.height, name))
        paths.append(f"images/{name}.png")
    return CameraSet(cams, paths)


# ---------------------------------------------------------------- rendering ground truth / saving
SKY = (0.62, 0.70, 0.80)


def render_views(scene: GaussianScene, cams, supersample: int = 1, background=SKY, desc: str = "render",
                 backend: str = "auto") -> list[np.ndarray]:
    """Render each camera (optionally supersampled then box-filtered) as uint8 HxWx3 arrays."""
    from nifi_utils.gs.render import render

    out = []
    with torch.no_grad():
        for cam in progress(list(cams), desc=desc, leave=False):
            big = cam.resized(cam.width * supersample, cam.height * supersample)
            rgb = render(scene, big, background=background, backend=backend)["rgb"]
            if supersample > 1:
                rgb = torch.nn.functional.avg_pool2d(rgb.permute(2, 0, 1)[None], supersample)[0].permute(1, 2, 0)
            out.append((rgb.clamp(0, 1) * 255 + 0.5).byte().cpu().numpy())
    return out


def save_scene(folder: str | Path, scene: GaussianScene, cams: CameraSet, images: list[np.ndarray], meta: dict) -> Path:
    """Write the scene folder layout: point_cloud.ply, transforms.json (with split), images/*.png."""
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    scene.save_ply(folder / "point_cloud.ply")
    train, test = split_indices(len(cams))
    write_transforms(cams, folder / "transforms.json", extra={**meta, "train_ids": train, "test_ids": test})
    for im, fp in zip(images, cams.file_paths):
        Image.fromarray(im).save(folder / fp)
    return folder


def build_scene(spec: SceneSpec, out_root: str | Path, gt_supersample: int = 1, device="cpu") -> dict:
    """Generate, render and save one procedural scene (a pure function of `spec`); its summary record."""
    scene, cams = generate_scene(spec)
    images = render_views(scene.to(device), cams, supersample=gt_supersample, desc=spec.name)
    meta = {"name": spec.name, "split": spec.split, "seed": spec.seed, "layout_id": spec.layout_id,
            "source": "procedural", "n_gaussians": len(scene), "gt_supersample": gt_supersample}
    folder = save_scene(Path(out_root) / spec.name, scene, cams, images, meta)
    return {**meta, "n_views": len(cams), "ply_bytes": (folder / "point_cloud.ply").stat().st_size}


def build_scenes(specs: list[SceneSpec], out_root: str | Path, gt_supersample: int = 1, device="cpu",
                 workers: int = 1) -> list[dict]:
    """`build_scene` for every spec, over `workers` spawned processes (`workers.process_map`: one torch thread
    each on CPU); records in the order of `specs`."""
    from functools import partial

    from nifi_utils.core.workers import process_map

    fn = partial(build_scene, out_root=out_root, gt_supersample=gt_supersample, device=str(device))
    return process_map(fn, specs, workers, names=[s.name for s in specs], what="scene", desc="scenes")


def load_scene_folder(folder: str | Path) -> tuple[GaussianScene, CameraSet]:
    folder = Path(folder)
    return read_ply(folder / "point_cloud.ply"), read_transforms(folder / "transforms.json")


# ---------------------------------------------------------------- real datasets (paper profile)
def colmap_cameras(colmap_dir: str | Path, images_subdir: str = "images") -> CameraSet:
    """Cameras of a COLMAP reconstruction (`sparse/0` under `colmap_dir`), sorted by image name,
    in the transforms.json convention, with intrinsics scaled to the images in `images_subdir`."""
    import pycolmap

    root = Path(colmap_dir)
    sparse = next((p for p in (root / "sparse" / "0", root / "sparse", root) if (p / "cameras.bin").exists() or (p / "cameras.txt").exists()), None)
    if sparse is None:
        raise NifiError(f"no COLMAP reconstruction (sparse/0/cameras.bin) under {root}")
    rec = pycolmap.Reconstruction(str(sparse))
    img_dir = root / images_subdir
    if not img_dir.is_dir():
        raise NifiError(f"image folder not found: {img_dir}")
    cams, paths = [], []
    for im in sorted(rec.images.values(), key=lambda im: im.name):
        cam = rec.cameras[im.camera_id]
        K = np.asarray(cam.calibration_matrix())
        w2c = np.eye(4)
        pose = im.cam_from_world() if callable(im.cam_from_world) else im.cam_from_world
        w2c[:3, :4] = np.asarray(pose.matrix())
        c2w = np.linalg.inv(w2c) @ np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV -> OpenGL axes
        fp = img_dir / im.name
        if not fp.exists():
            raise NifiError(f"COLMAP image {im.name} not found in {img_dir}")
        w, h = image_size(fp)
        sx, sy = w / cam.width, h / cam.height
        cams.append(Camera(c2w, K[0, 0] * sx, K[1, 1] * sy, K[0, 2] * sx, K[1, 2] * sy, w, h, Path(im.name).stem))
        paths.append(f"images/{im.name}")
    if not cams:
        raise NifiError(f"COLMAP reconstruction in {sparse} has no images")
    return CameraSet(cams, paths)


def import_colmap_scene(name: str, colmap_dir: str | Path, ply: str | Path, out_dir: str | Path,
                        images_subdir: str = "images", max_width: int = 1600, split: str = "eval") -> Path:
    """Copy a real scene into the pipeline layout: the trained 3DGS `.ply`, transforms.json and GT images
    (downscaled to `max_width` as in HAC++/Scaffold-GS). `split`: "train" (a DL3DV-like scene whose pairs
    train the restorer) or "eval" (a benchmark scene)."""
    from PIL import Image

    if split not in ("train", "eval"):
        raise NifiError(f"scene {name}: split must be 'train' or 'eval', got {split!r}")
    for p, what in ((colmap_dir, "COLMAP dataset folder"), (ply, "trained 3DGS point_cloud.ply")):
        if not p or not Path(p).exists():
            raise NifiError(f"scene {name}: {what} not found: {p!r} (set it in scenes.datasets: conf/profile/paper.yaml)")
    cams = colmap_cameras(colmap_dir, images_subdir)
    scene = read_ply(ply)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ply, out / "point_cloud.ply")
    resized = []
    for cam, fp in zip(cams, cams.file_paths):
        src = Path(colmap_dir) / images_subdir / Path(fp).name
        im = Image.fromarray(read_rgb(src))
        if cam.width > max_width:
            h = round(cam.height * max_width / cam.width)
            im = im.resize((max_width, h), Image.LANCZOS)
            cam = cam.resized(max_width, h)
        im.save(out / "images" / (Path(fp).stem + ".png"))
        resized.append(cam)
    cs = CameraSet(resized, [f"images/{Path(fp).stem}.png" for fp in cams.file_paths])
    train, test = split_indices(len(cs))
    write_transforms(cs, out / "transforms.json", extra={"name": name, "split": split, "source": "colmap",
                                                         "n_gaussians": len(scene), "train_ids": train, "test_ids": test})
    return out


def contact_sheet(scene_dirs: list[Path], path: str | Path, n_cols: int = 6, title: str = "") -> Path:
    """A grid: one row per scene (name, split, size), `n_cols` of its ground-truth views."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(scene_dirs)
    fig, axes = plt.subplots(rows, n_cols, figsize=(1.6 * n_cols, 1.75 * rows), squeeze=False)
    for r, d in enumerate(scene_dirs):
        meta = json.loads((Path(d) / "transforms.json").read_text())
        frames = meta["frames"]
        pick = np.linspace(0, len(frames) - 1, n_cols).round().astype(int)
        size_mb = (Path(d) / "point_cloud.ply").stat().st_size / 1e6
        for c, i in enumerate(pick):
            ax = axes[r, c]
            ax.imshow(read_rgb(Path(d) / frames[i]["file_path"]))
            ax.set_xticks([])
            ax.set_yticks([])
            tag = "test" if is_test_view(i) else "train"
            ax.set_title(f"view {i} ({tag})", fontsize=6)
            if c == 0:
                ax.set_ylabel(f"{Path(d).name}\n{meta.get('split', '')} · {size_mb:.1f} MB", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
