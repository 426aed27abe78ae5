import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from nifi_utils.core.common import NifiError
from nifi_utils.gs.gaussians import GaussianScene, ply_property_names, read_ply, write_ply

from conftest import random_scene


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_ply_round_trip_is_exact(tmp_path, degree):
    s = random_scene(n=57, sh_degree=degree)
    p = write_ply(s, tmp_path / "a.ply")
    t = read_ply(p)
    for k, v in s.tensors().items():
        assert torch.equal(v, getattr(t, k)), k
    assert t.sh_degree == degree


def test_ply_layout_matches_inria(tmp_path):
    """Property order, float32 little endian, f_rest channel-major as the original 3DGS code."""
    s = random_scene(n=5, sh_degree=3)
    p = write_ply(s, tmp_path / "a.ply")
    ply = PlyData.read(str(p))
    v = ply["vertex"]
    assert [pp.name for pp in v.properties] == ply_property_names(3)
    assert len(ply_property_names(3)) == 62  # 248 bytes per Gaussian
    assert all(pp.val_dtype in ("f4", "float32") for pp in v.properties)
    assert ply.byte_order == "<" and not ply.text
    # f_rest_0..14 are the 15 red coefficients of bands 1-3, then green, then blue
    assert np.isclose(v["f_rest_0"][2], s.sh[2, 1, 0].item())
    assert np.isclose(v["f_rest_15"][2], s.sh[2, 1, 1].item())
    assert np.isclose(v["f_rest_16"][2], s.sh[2, 2, 1].item())


def _write_custom(path, names, n=4):
    arr = np.zeros(n, dtype=[(nm, "<f4") for nm in names])
    for i, nm in enumerate(names):
        arr[nm] = np.arange(n) + i
    PlyData([PlyElement.describe(arr, "vertex")]).write(str(path))


def test_reads_files_without_normals(tmp_path):
    """gsplat's exporter omits nx/ny/nz; such files must load."""
    names = [n for n in ply_property_names(1) if n not in ("nx", "ny", "nz")]
    _write_custom(tmp_path / "g.ply", names)
    s = read_ply(tmp_path / "g.ply")
    assert len(s) == 4 and s.sh_degree == 1


def test_missing_property_is_one_clear_error(tmp_path):
    names = [n for n in ply_property_names(0) if n != "opacity"]
    _write_custom(tmp_path / "m.ply", names)
    with pytest.raises(NifiError, match="missing 3DGS properties: opacity"):
        read_ply(tmp_path / "m.ply")


def test_wrong_sh_count_is_rejected(tmp_path):
    names = ply_property_names(0) + [f"f_rest_{i}" for i in range(6)]
    _write_custom(tmp_path / "w.ply", names)
    with pytest.raises(NifiError, match="6 f_rest"):
        read_ply(tmp_path / "w.ply")


def test_truncated_and_foreign_files(tmp_path):
    p = write_ply(random_scene(n=50), tmp_path / "t.ply")
    data = p.read_bytes()
    (tmp_path / "cut.ply").write_bytes(data[: len(data) - 100])
    with pytest.raises(NifiError, match="cannot read PLY"):
        read_ply(tmp_path / "cut.ply")
    (tmp_path / "junk.ply").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(NifiError, match="cannot read PLY"):
        read_ply(tmp_path / "junk.ply")
    with pytest.raises(NifiError, match="not found"):
        read_ply(tmp_path / "absent.ply")


def test_scene_validates_shapes():
    s = random_scene(n=3)
    with pytest.raises(NifiError, match="quats"):
        GaussianScene(s.means, s.quats[:, :3], s.log_scales, s.opacity_logits, s.sh)
    with pytest.raises(NifiError, match="SH coefficients"):
        GaussianScene(s.means, s.quats, s.log_scales, s.opacity_logits, s.sh[:, :5])


def test_subset_concat_and_sh_degree():
    s = random_scene(n=10, sh_degree=3)
    a, b = s.subset(torch.arange(4)), s.subset(torch.arange(4, 10))
    c = GaussianScene.concat([a, b])
    assert torch.equal(c.sh, s.sh)
    d = s.with_sh_degree(1)
    assert d.sh.shape == (10, 4, 3) and torch.equal(d.sh, s.sh[:, :4])
    assert torch.equal(d.with_sh_degree(3).sh[:, 4:], torch.zeros(10, 12, 3))
