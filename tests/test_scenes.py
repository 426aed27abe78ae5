import numpy as np
import pytest
import torch

import nifi_utils.gs.scenes as sc
from nifi_utils.core.common import NifiError


def _spec(seed=5, split="train", n=3000):
    return sc.SceneSpec("s", seed, split, n, 9, 32, 24)


def test_generation_is_a_pure_function_of_the_seed():
    a, ca = sc.generate_scene(_spec())
    b, cb = sc.generate_scene(_spec())
    for k, v in a.tensors().items():
        assert torch.equal(v, getattr(b, k)), k
    assert all(np.array_equal(x.c2w, y.c2w) for x, y in zip(ca, cb))
    c, _ = sc.generate_scene(_spec(seed=6))
    assert not torch.equal(a.means, c.means)


def test_scene_content():
    scene, cams = sc.generate_scene(_spec(n=4000))
    assert len(scene) == 4000 and scene.sh_degree == 3 and len(cams) == 9
    assert torch.isfinite(scene.means).all() and torch.isfinite(scene.sh).all()
    assert torch.allclose(scene.quats.norm(dim=-1), torch.ones(4000), atol=1e-5)
    # view-dependent colour exists: SH bands above DC are not all zero
    assert scene.sh[:, 1:].abs().max() > 0
    # every camera sees the scene
    from nifi_utils.gs.render import render

    for cam in list(cams)[:3]:
        assert render(scene, cam)["alpha"].mean() > 0.9


def test_train_and_eval_seed_streams_are_disjoint():
    tr, ev = sc.scene_seeds(0, 50, 20)
    assert len(set(tr)) == 50 and len(set(ev)) == 20 and not set(tr) & set(ev)
    assert sc.scene_seeds(0, 3, 2)[0] == tr[:3]  # adding scenes does not change earlier ones


def test_eval_photos_never_reach_training_scenes(monkeypatch):
    assert not set(sc.EVAL_PHOTOS) & set(sc.TRAIN_PHOTOS)
    used = []
    real = sc.load_photo

    def spy(name):
        used.append(name)
        return real(name)

    monkeypatch.setattr(sc, "load_photo", spy)
    for seed in range(4):
        sc.generate_scene(_spec(seed=seed, n=1500))
    assert used and not set(used) & set(sc.EVAL_PHOTOS)
    used.clear()
    for seed in range(4):
        sc.generate_scene(_spec(seed=seed, split="eval", n=1500))
    assert used and set(used) <= set(sc.EVAL_PHOTOS)


def test_photos_load_offline():
    for name in sc.EVAL_PHOTOS + sc.TRAIN_PHOTOS:
        im = sc.load_photo(name)
        assert im.ndim == 3 and im.shape[2] == 3 and 0 <= im.min() and im.max() <= 1


def test_save_and_load_scene_folder(tmp_path):
    scene, cams = sc.generate_scene(_spec(n=800))
    images = sc.render_views(scene, cams, supersample=2)
    assert images[0].shape == (24, 32, 3) and images[0].dtype == np.uint8
    folder = sc.save_scene(tmp_path / "s", scene, cams, images, {"split": "train"})
    s2, c2 = sc.load_scene_folder(folder)
    assert torch.equal(s2.means, scene.means) and len(c2) == 9
    assert c2.extra["test_ids"] == [0, 8] and (folder / "images" / "0000.png").exists()


def _write_colmap(root, n_images=10, w=60, h=40):
    """A COLMAP text reconstruction (cameras/images/points3D.txt), the canonical interchange format."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    sparse = root / "sparse" / "0"
    sparse.mkdir(parents=True)
    (sparse / "cameras.txt").write_text(f"1 PINHOLE {w} {h} 50.0 52.0 30.0 20.0\n")
    lines = []
    for i in range(n_images):
        name = f"img_{9 - i:03d}.jpg"  # listed in reverse order: the loader must sort by name
        lines += [f"{i + 1} 1 0 0 0 {0.1 * i} 0 2 1 {name}", ""]
        Image.fromarray(np.full((h * 2, w * 2, 3), 10 * i, np.uint8)).save(root / "images" / name)
    (sparse / "images.txt").write_text("\n".join(lines) + "\n")
    (sparse / "points3D.txt").write_text("")


def test_colmap_import(tmp_path):
    _write_colmap(tmp_path / "ds")
    from conftest import random_scene

    random_scene(n=20).save_ply(tmp_path / "pc.ply")
    out = sc.import_colmap_scene("ds", tmp_path / "ds", tmp_path / "pc.ply", tmp_path / "out", max_width=100)
    from nifi_utils.gs.cameras import read_transforms

    cams = read_transforms(out / "transforms.json")
    assert [c.name for c in cams] == [f"img_{i:03d}" for i in range(10)]
    c = cams[0]
    # images are 120x80 (2x the COLMAP camera) then downscaled to width 100
    assert (c.width, c.height) == (100, 67) and abs(c.fx - 50 * 2 * 100 / 120) < 1e-6
    # identity rotation, t=(0.9,0,2) for img_000 (i=9): camera centre = -R^T t
    assert np.allclose(c.c2w[:3, 3], [-0.9, 0, -2]) and np.allclose(c.c2w[:3, :3], np.diag([1, -1, -1]))
    assert cams.extra["test_ids"] == [0, 8]


def test_colmap_missing_paths_are_clear(tmp_path):
    with pytest.raises(NifiError, match="COLMAP dataset folder not found"):
        sc.import_colmap_scene("x", tmp_path / "nope", tmp_path / "nope.ply", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NifiError, match="no COLMAP reconstruction"):
        sc.colmap_cameras(tmp_path / "empty")
