"""The Gaussian scene and INRIA-format `.ply` read/write.

The `.ply` layout is the one written by the original 3DGS code (and gsplat / nerfstudio exports):
``x y z nx ny nz f_dc_0..2 f_rest_0.. opacity scale_0..2 rot_0..3``, float32, binary little
endian. ``f_rest`` is stored channel-major (all R coefficients of bands 1..d, then G, then B);
opacity is a logit, scales are logs and ``rot`` is a (w, x, y, z) quaternion.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from nifi_utils.core.common import NifiError

SH_C0 = 0.28209479177387814  # Y_0^0: rgb = SH_C0 * f_dc + 0.5


def num_sh_bases(degree: int) -> int:
    return (degree + 1) ** 2


def sh_degree_from_bases(k: int) -> int:
    d = int(round(k**0.5)) - 1
    if d < 0 or num_sh_bases(d) != k or d > 3:
        raise NifiError(f"{k} SH coefficients per channel is not (d+1)^2 for a degree d in 0..3")
    return d


def rgb_to_sh0(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - 0.5) / SH_C0


def sh0_to_rgb(sh0: torch.Tensor) -> torch.Tensor:
    return sh0 * SH_C0 + 0.5


@dataclass
class GaussianScene:
    """A 3DGS scene in its stored (unconstrained) parameterisation.

    means [N,3]; quats [N,4] (w,x,y,z, any norm); log_scales [N,3]; opacity_logits [N];
    sh [N,K,3] with K = (degree+1)^2 (band-major, DC first).
    """

    means: torch.Tensor
    quats: torch.Tensor
    log_scales: torch.Tensor
    opacity_logits: torch.Tensor
    sh: torch.Tensor

    def __post_init__(self):
        n = self.means.shape[0]
        shapes = {
            "means": (n, 3), "quats": (n, 4), "log_scales": (n, 3), "opacity_logits": (n,),
        }
        for name, shape in shapes.items():
            if tuple(getattr(self, name).shape) != shape:
                raise NifiError(f"GaussianScene.{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")
        if self.sh.ndim != 3 or self.sh.shape[0] != n or self.sh.shape[2] != 3:
            raise NifiError(f"GaussianScene.sh has shape {tuple(self.sh.shape)}, expected ({n}, K, 3)")
        sh_degree_from_bases(self.sh.shape[1])

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        return sh_degree_from_bases(self.sh.shape[1])

    @property
    def scales(self) -> torch.Tensor:
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logits)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def map(self, fn) -> "GaussianScene":
        return GaussianScene(**{k: fn(v) for k, v in self.tensors().items()})

    def to(self, *args, **kwargs) -> "GaussianScene":
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "GaussianScene":
        return self.map(lambda t: t.detach())

    def subset(self, index) -> "GaussianScene":
        """Gaussians selected by a boolean mask or an index tensor."""
        return self.map(lambda t: t[index])

    def with_sh_degree(self, degree: int) -> "GaussianScene":
        """Drop (or zero-pad) higher SH bands."""
        k = num_sh_bases(degree)
        sh = self.sh[:, :k]
        if sh.shape[1] < k:
            sh = torch.cat([sh, sh.new_zeros(len(self), k - sh.shape[1], 3)], 1)
        return GaussianScene(self.means, self.quats, self.log_scales, self.opacity_logits, sh)

    @staticmethod
    def concat(scenes: list["GaussianScene"]) -> "GaussianScene":
        names = [f.name for f in fields(GaussianScene)]
        return GaussianScene(**{n: torch.cat([getattr(s, n) for s in scenes], 0) for n in names})

    def save_ply(self, path: str | Path) -> Path:
        return write_ply(self, path)

    @staticmethod
    def load_ply(path: str | Path) -> "GaussianScene":
        return read_ply(path)


# the properties a 3DGS .ply must have (f_rest_* and the normals are optional)
REQUIRED_PLY_PROPERTIES = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                           "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


def ply_property_names(sh_degree: int) -> list[str]:
    n_rest = 3 * (num_sh_bases(sh_degree) - 1)
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(n_rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def write_ply(scene: GaussianScene, path: str | Path) -> Path:
    """Write the INRIA 3DGS `.ply` (float32, binary little endian); normals are zeros."""
    from plyfile import PlyData, PlyElement

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    s = scene.detach().to("cpu", torch.float32)
    n = len(s)
    rest = s.sh[:, 1:, :].transpose(1, 2).reshape(n, -1)  # channel-major, as the INRIA code
    cols = [s.means, torch.zeros(n, 3), s.sh[:, 0, :], rest, s.opacity_logits[:, None], s.log_scales, s.quats]
    data = torch.cat(cols, 1).numpy()
    names = ply_property_names(s.sh_degree)
    arr = np.empty(n, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate(names):
        arr[name] = data[:, i]
    PlyData([PlyElement.describe(arr, "vertex")], byte_order="<").write(str(path))
    return path


def read_ply(path: str | Path) -> GaussianScene:
    """Read an INRIA-format 3DGS `.ply`; one clear NifiError for anything malformed."""
    from plyfile import PlyData

    path = Path(path)
    if not path.is_file():
        raise NifiError(f"PLY file not found: {path}")
    try:
        ply = PlyData.read(str(path))
    except Exception as e:  # plyfile raises several types for truncated/garbled files
        raise NifiError(f"cannot read PLY {path}: {type(e).__name__}: {e}".rstrip(": ")) from None
    if "vertex" not in [el.name for el in ply.elements]:
        raise NifiError(f"PLY {path} has no 'vertex' element: not a 3DGS point cloud")
    v = ply["vertex"].data
    names = set(v.dtype.names or ())
    missing = [p for p in REQUIRED_PLY_PROPERTIES if p not in names]
    if missing:
        raise NifiError(f"PLY {path} is missing 3DGS properties: {', '.join(missing)}")
    rest_names = sorted((p for p in names if p.startswith("f_rest_")), key=lambda p: int(p.split("_")[-1]))
    n_rest = len(rest_names)
    if rest_names != [f"f_rest_{i}" for i in range(n_rest)] or n_rest % 3:
        raise NifiError(f"PLY {path} has {n_rest} f_rest_* properties: expected 0, 9, 24 or 45 (SH degree 0-3)")
    k = n_rest // 3 + 1
    try:
        sh_degree_from_bases(k)
    except NifiError:
        raise NifiError(f"PLY {path} has {n_rest} f_rest_* properties: expected 0, 9, 24 or 45 (SH degree 0-3)") from None

    def col(names_):
        return torch.from_numpy(np.stack([np.asarray(v[p], dtype=np.float32) for p in names_], 1))

    n = len(v)
    dc = col(["f_dc_0", "f_dc_1", "f_dc_2"])
    rest = col(rest_names).reshape(n, 3, k - 1).transpose(1, 2) if k > 1 else torch.zeros(n, 0, 3)
    return GaussianScene(
        means=col(["x", "y", "z"]),
        quats=col(["rot_0", "rot_1", "rot_2", "rot_3"]),
        log_scales=col(["scale_0", "scale_1", "scale_2"]),
        opacity_logits=col(["opacity"])[:, 0].contiguous(),
        sh=torch.cat([dc[:, None, :], rest], 1).contiguous(),
    )
