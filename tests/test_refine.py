"""NiFi-3D at the receiver (nifi_utils.models.refine): cameras around the content, densification, a fit that
cannot diverge, and the `decompress --refine` command line."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from nifi_utils.codec import container as codec
from nifi_utils.core.common import REPO_ROOT, NifiError
from nifi_utils.gs.gaussians import GaussianScene, read_ply
from nifi_utils.measure.metrics import psnr
from nifi_utils.models.refine import (RefineConfig, content_frame, densify, orbit_cameras, refine_scene, render_all,
                               render_meta)


def ground_and_objects(n_ground=400, n_obj=200, seed=0, up=(0.0, 0.0, 1.0)) -> GaussianScene:
    """A flat textured ground square with a few blobs standing on it, the up axis given."""
    g = torch.Generator().manual_seed(seed)
    u = torch.tensor(up, dtype=torch.float32)
    u = u / u.norm()
    a = torch.linalg.cross(u, torch.tensor([1.0, 0, 0]) if abs(float(u[0])) < 0.9 else torch.tensor([0, 1.0, 0]))
    a = a / a.norm()
    b = torch.linalg.cross(u, a)
    xy = (torch.rand(n_ground, 2, generator=g) - 0.5) * 4
    ground = xy[:, :1] * a + xy[:, 1:] * b
    centres = (torch.rand(4, 2, generator=g) - 0.5) * 2
    k = torch.randint(0, 4, (n_obj,), generator=g)
    h = torch.rand(n_obj, 1, generator=g) * 1.2
    objs = centres[k, :1] * a + centres[k, 1:] * b + h * u + torch.randn(n_obj, 3, generator=g) * 0.1
    n = n_ground + n_obj
    sh = torch.zeros(n, 1, 3)
    sh[:, 0] = torch.rand(n, 3, generator=g) * 2 - 1
    return GaussianScene(means=torch.cat([ground, objs]), quats=torch.randn(n, 4, generator=g),
                         log_scales=torch.full((n, 3), -2.3), opacity_logits=torch.full((n,), 2.0), sh=sh)


class ContrastRestorer:
    """A stand-in restorer with a target a 3D model can reach: colours pulled towards mid-grey."""

    def restore(self, x, t0=None, seed=None, sample=False, tile=None):
        return (0.5 + 0.6 * (x - 0.5)).clamp(0, 1)


SMALL = dict(n_cameras=6, width=32, height=32, fov_deg=60.0, background=[0.6, 0.7, 0.8])


@pytest.mark.parametrize("up", [(0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (0.6, 0.0, -0.8)])
def test_content_frame_finds_the_up_axis_and_its_sign(up):
    fr = content_frame(ground_and_objects(up=up))
    assert float(np.dot(fr["up"], np.array(up) / np.linalg.norm(up))) > 0.95
    # the cameras look at the content: most pixels of every synthesised view are opaque Gaussians
    cams = orbit_cameras(fr, RefineConfig(**SMALL))
    _, alpha = render_all(ground_and_objects(up=up), cams, SMALL["background"])
    assert len(cams) == 6 and float((alpha > 0.5).float().mean(dim=(1, 2, 3)).min()) > 0.3


def test_densify_keeps_the_render_and_respects_the_cap():
    scene = ground_and_objects()
    fr = content_frame(scene)
    cams = orbit_cameras(fr, RefineConfig(**SMALL))
    before, _ = render_all(scene, cams, SMALL["background"])
    grads = torch.rand(len(scene), generator=torch.Generator().manual_seed(1))
    cfg = RefineConfig(**SMALL, grad_threshold=0.0, grow_per_event=0.3, split_scale=0.0)  # every selected one splits
    new, counts = densify(scene.tensors(), grads, fr["extent"], cfg, cap=len(scene) + 50, gen=torch.Generator())
    assert counts["split"] == 50 and counts["n"] == len(scene) + 50  # the cap, not grow_per_event, bounded it
    after, _ = render_all(GaussianScene(**new), cams, SMALL["background"])
    # a split keeps the parent's footprint (variance along the axis, extent across it) and halves its opacity
    assert min(psnr(a.permute(2, 0, 1)[None], b.permute(2, 0, 1)[None]) for a, b in zip(after, before)) > 30
    # the Gaussians with the largest gradients were the ones densified
    cfg_clone = RefineConfig(**SMALL, grad_threshold=0.0, grow_per_event=0.1, split_scale=1e9)
    new, counts = densify(scene.tensors(), grads, fr["extent"], cfg_clone, cap=10**6, gen=torch.Generator())
    top = torch.argsort(grads, descending=True)[: counts["cloned"]]
    assert counts["cloned"] == 60 and torch.equal(new["means"][len(scene):].sort(0).values, scene.means[top].sort(0).values)


def test_prune_removes_transparent_gaussians():
    scene = ground_and_objects()
    p = scene.tensors()
    p["opacity_logits"] = p["opacity_logits"].clone()
    p["opacity_logits"][:30] = -10.0
    new, counts = densify(p, torch.zeros(len(scene)), 1.0, RefineConfig(**SMALL), cap=10**6, gen=torch.Generator())
    assert counts["pruned"] == 30 and counts["n"] == len(scene) - 30


def test_refine_fits_a_reachable_target_without_diverging():
    scene = ground_and_objects()
    cfg = RefineConfig(**SMALL, rounds=2, steps_per_round=30, densify_at=[0.5], grad_threshold=0.0,
                       grow_per_event=0.5, max_growth=1.25, anchor_weight=0.05, confidence_tau=1.0, lr_sh=0.02)
    out, rep = refine_scene(scene, ContrastRestorer(), cfg)
    assert all(torch.isfinite(t).all() for t in out.tensors().values())
    assert len(scene) < len(out) <= rep["cap"] == int(1.25 * len(scene))
    losses = np.array(rep["loss"]).reshape(cfg.rounds, -1)
    assert losses[0, -8:].mean() < 0.8 * losses[0, :8].mean()  # the fit moves towards the restored views
    # and the refined scene renders closer to them than the decoded one did
    cams = orbit_cameras(content_frame(scene), cfg)
    dec, alpha = render_all(scene, cams, cfg.background)
    ref, _ = render_all(out, cams, cfg.background)
    target = ContrastRestorer().restore(dec.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    on = (alpha[..., 0] > cfg.alpha_mask)  # the background is the background: only opaque pixels are fitted
    assert (ref - target).abs().mean(-1)[on].mean() < 0.7 * (dec - target).abs().mean(-1)[on].mean()


def test_screen_space_gradient_is_returned_for_visible_gaussians():
    scene = ground_and_objects()
    cams = orbit_cameras(content_frame(scene), RefineConfig(**SMALL))
    p = {k: v.clone().requires_grad_(True) for k, v in scene.tensors().items()}
    rgb, _, m2d, visible = render_meta(GaussianScene(**p), cams[0], SMALL["background"])
    rgb.sum().backward()
    g = m2d.grad.reshape(len(scene), -1)
    assert m2d.grad is not None and bool(visible.any())
    assert float(g[visible].abs().sum()) > 0 and float(g[~visible].abs().sum()) == 0


def test_cameras_that_see_nothing_are_one_clear_error():
    scene = ground_and_objects()
    p = scene.tensors()
    p["opacity_logits"] = torch.full_like(p["opacity_logits"], -7.0)  # everything ~transparent
    with pytest.raises(NifiError, match="see almost nothing"):
        refine_scene(GaussianScene(**p), ContrastRestorer(), RefineConfig(**SMALL))
    with pytest.raises(NifiError, match="up must be"):
        content_frame(scene, up=[0, 0, 0])
    with pytest.raises(NifiError, match="unknown parameters"):
        RefineConfig.from_params({"steps": 3})


@pytest.fixture(scope="module")
def refine_files(tmp_path_factory):
    from nifi_utils.models.folders import save_prior, tiny_sd3

    root = tmp_path_factory.mktemp("refine")
    r = tiny_sd3(seed=0)
    save_prior(r, root / "prior")
    r.add_lora(rank=4)
    r.save_lora(root / "nifi.pt")
    from nifi_utils.models.folders import TinySD3Config

    other = tiny_sd3(TinySD3Config(dit_head_dim=16), seed=1)  # another prior: its LoRA has other shapes
    other.add_lora(rank=2)
    other.save_lora(root / "other_prior.pt")
    codec.encode_scene(ground_and_objects(), sh_degree=0).save(root / "x.nifi")
    return root


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nifi_utils", "decompress", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO_ROOT)


def test_decompress_refine_writes_a_standard_ply(refine_files):
    root = refine_files
    out = root / "refined.ply"
    r = _cli(root / "x.nifi", "--refine", "--profile", "tiny", "--base-model", root / "prior", "--ckpt", root / "nifi.pt",
             "--out", out)
    assert r.returncode == 0, r.stderr
    ref = read_ply(out)
    dec, _ = codec.load(root / "x.nifi")
    assert len(ref) >= len(dec) and all(torch.isfinite(t).all() for t in ref.tensors().values())
    assert not (root / "refined.ply.partial").exists()


@pytest.mark.parametrize("bad, msg", [("other_prior.pt", "other_prior.pt"), ("x.nifi", "checkpoint")])
def test_decompress_refine_with_a_foreign_restorer_is_one_line(refine_files, bad, msg):
    root = refine_files
    out = root / f"bad_{bad}.ply"
    r = _cli(root / "x.nifi", "--refine", "--profile", "tiny", "--base-model", root / "prior", "--ckpt", root / bad,
             "--out", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert msg in r.stderr.lower() and not out.exists()


def test_decompress_refine_of_a_corrupt_bitstream_writes_nothing(refine_files):
    root = refine_files
    data = bytearray((root / "x.nifi").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "corrupt.nifi").write_bytes(bytes(data))
    out = root / "corrupt.ply"
    r = _cli(root / "corrupt.nifi", "--refine", "--profile", "tiny", "--base-model", root / "prior", "--ckpt",
             root / "nifi.pt", "--out", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not out.exists(), r.stderr


@pytest.mark.gpu
def test_refine_runs_on_cuda_through_the_same_code():
    scene = ground_and_objects()
    cfg = RefineConfig(**SMALL, rounds=1, steps_per_round=20, densify_at=[0.5], grad_threshold=0.0, max_growth=1.5)
    out, rep = refine_scene(scene, ContrastRestorer(), cfg, device="cuda")
    assert all(torch.isfinite(t).all() for t in out.tensors().values()) and len(out) <= rep["cap"]
