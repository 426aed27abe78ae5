import math

import pytest
import torch

from nifi_utils.gs.gaussians import GaussianScene
from dense_raster import rasterization_dense
from nifi_utils.gs.render import rasterization, render

from conftest import front_camera, random_scene


def _args(scene, cams):
    vm = torch.stack([c.viewmat() for c in cams]).to(scene.means.dtype)
    Ks = torch.stack([c.K() for c in cams]).to(scene.means.dtype)
    return (scene.means, scene.quats, scene.scales, scene.opacities, scene.sh, vm, Ks, cams[0].width, cams[0].height)


@pytest.mark.parametrize("seed,n,tile", [(0, 400, 16), (1, 1500, 16), (2, 800, 8), (3, 300, 4)])
def test_tiled_matches_dense_reference(seed, n, tile):
    scene = random_scene(n=n, seed=seed)
    cams = [front_camera(40, 32), front_camera(40, 32, dist=2.2)]
    kw = dict(sh_degree=3, tile_size=tile, render_mode="RGB+ED", backgrounds=torch.tensor([[0.1, 0.2, 0.3]] * 2))
    c1, a1, _ = rasterization(*_args(scene, cams), **kw)
    c2, a2, _ = rasterization_dense(*_args(scene, cams), **kw)
    assert a1.shape == (2, 32, 40, 1) and c1.shape == (2, 32, 40, 4)
    assert (a1 > 0.05).float().mean() > 0.3, "scene should cover the image"
    assert torch.allclose(c1[..., :3], c2[..., :3], atol=1e-4)
    assert torch.allclose(a1, a2, atol=1e-4)
    covered = a2[..., 0] > 0.5
    assert torch.allclose(c1[..., 3][covered], c2[..., 3][covered], atol=1e-4 * 10)  # depth in scene units (~3)


def test_float64_paths_agree_exactly():
    scene = random_scene(n=600, seed=5, dtype=torch.float64)
    cams = [front_camera(24, 20)]
    c1, a1, _ = rasterization(*_args(scene, cams), sh_degree=3)
    c2, a2, _ = rasterization_dense(*_args(scene, cams), sh_degree=3)
    assert torch.allclose(c1, c2, atol=1e-10) and torch.allclose(a1, a2, atol=1e-10)


def _stack_scene(opacities, colors):
    from nifi_utils.gs.gaussians import GaussianScene, rgb_to_sh0

    n = len(opacities)
    op = torch.tensor(opacities, dtype=torch.float64)
    means = torch.tensor([[0.0, 0.0, 0.5 - 0.5 * i] for i in range(n)], dtype=torch.float64)
    return GaussianScene(means, torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64).repeat(n, 1),
                         torch.full((n, 3), math.log(2.0), dtype=torch.float64), torch.log(op / (1 - op)),
                         rgb_to_sh0(torch.tensor(colors, dtype=torch.float64))[:, None, :])


def test_compositing_rules_on_a_stack_of_gaussians():
    """Front-to-back order, the 0.999 alpha clamp and gsplat's exclusive stop at T <= 1e-4."""
    from nifi_utils.gs.cameras import Camera, look_at

    # the pixel (8, 8) has its centre at (8.5, 8.5), exactly under every mean: alpha = opacity
    cam = Camera(look_at([0, 0, 5], [0, 0, 0], up=(0, 1, 0)), 20, 20, 8.5, 8.5, 16, 16)
    R, G, B = [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]
    out = render(_stack_scene([0.9, 0.99, 0.5, 0.9], [R, G, B, R]), cam)
    # T: 1 -> 0.1 -> 0.001 -> 0.0005 -> 0.00005 (<= 1e-4: the 4th Gaussian is excluded)
    assert torch.allclose(out["rgb"][8, 8], torch.tensor([0.9, 0.099, 0.0005], dtype=torch.float64), atol=1e-9)
    assert abs(out["alpha"][8, 8, 0].item() - (1 - 0.0005)) < 1e-9
    expected_depth = (0.9 * 4.5 + 0.099 * 5.0 + 0.0005 * 5.5) / (1 - 0.0005)
    assert abs(out["depth"][8, 8, 0].item() - expected_depth) < 1e-9
    # a single near-opaque Gaussian is clamped to alpha 0.999
    out = render(_stack_scene([0.99999], [R]), cam)
    assert abs(out["alpha"][8, 8, 0].item() - 0.999) < 1e-9


def test_empty_and_offscreen_scenes_render_background():
    scene = random_scene(n=50)
    scene.means[:] += torch.tensor([0.0, -100.0, 0.0])  # behind the camera
    out = render(scene, front_camera(), background=(0.2, 0.4, 0.6))
    assert torch.allclose(out["rgb"], torch.tensor([0.2, 0.4, 0.6]).expand_as(out["rgb"]))
    assert out["alpha"].abs().max() == 0


def test_gradients_match_finite_differences():
    scene = random_scene(n=10, seed=3, sh_degree=1, dtype=torch.float64, log_scale=-1.8, spread=0.5)
    cam = front_camera(12, 10, dist=2.5)
    names = ["means", "quats", "log_scales", "opacity_logits", "sh"]
    params = [getattr(scene, k).clone().requires_grad_(True) for k in names]
    w = torch.randn(10, 12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss(*ps):
        from nifi_utils.gs.gaussians import GaussianScene

        s = GaussianScene(*ps)
        o = render(s, cam, background=(0.3, 0.3, 0.3))
        return (torch.cat([o["rgb"], o["alpha"], o["depth"] * o["alpha"]], -1) * w).sum()

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_backward_reaches_every_parameter_and_matches_dense():
    scene = random_scene(n=300, seed=7)
    cams = [front_camera(32, 24)]
    p1 = [t.clone().requires_grad_(True) for t in _args(scene, cams)[:5]]
    p2 = [t.clone().requires_grad_(True) for t in _args(scene, cams)[:5]]
    rest = _args(scene, cams)[5:]
    c1, a1, _ = rasterization(*p1, *rest, sh_degree=3)
    c2, a2, _ = rasterization_dense(*p2, *rest, sh_degree=3)
    (c1.sum() + a1.sum()).backward()
    (c2.sum() + a2.sum()).backward()
    for x, y in zip(p1, p2):
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert torch.allclose(x.grad, y.grad, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_cpu_path_matches_gsplat_cuda():
    scene = random_scene(n=3000, seed=11)
    cams = [front_camera(96, 64), front_camera(96, 64, dist=2.0)]
    args = _args(scene, cams)
    kw = dict(sh_degree=3, render_mode="RGB+ED", backgrounds=torch.tensor([[0.1, 0.2, 0.3]] * 2), packed=False)
    c_cpu, a_cpu, _ = rasterization(*args, **kw)
    cuda_args = [a.cuda() if torch.is_tensor(a) else a for a in args]
    c_gpu, a_gpu, _ = rasterization(*cuda_args, **{**kw, "backgrounds": kw["backgrounds"].cuda()})
    assert torch.allclose(c_cpu[..., :3], c_gpu.cpu()[..., :3], atol=1e-3)
    assert torch.allclose(a_cpu, a_gpu.cpu(), atol=1e-3)


def test_checkpointed_and_kept_batches_give_the_same_gradients():
    """Large renders recompute tile batches in backward (bounded memory); small ones keep them."""
    from nifi_utils.gs.render import project_gaussians, rasterize_tiles

    scene = random_scene(n=300, seed=9)
    cam = front_camera(32, 24)
    grads = []
    for keep in (0, 10**9):
        ps = [t.clone().requires_grad_(True) for t in (scene.means, scene.quats, scene.scales, scene.opacities)]
        m2d, con, dep, op, radii = project_gaussians(ps[0], torch.nn.functional.normalize(ps[1], dim=-1), ps[2], ps[3],
                                                     cam.viewmat(), cam.K(), 32, 24)
        img, alpha = rasterize_tiles(m2d, con, torch.sigmoid(m2d[:, :1]).expand(-1, 3), op, radii, dep, 32, 24,
                                     max_batch_elems=20_000, keep_elems=keep)
        (img.sum() + alpha.sum()).backward()
        grads.append([p.grad for p in ps])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_gaussian_on_the_camera_plane_has_finite_zero_gradient():
    """z == 0 in camera space (hit in practice after position quantization) must not give NaN."""
    scene = random_scene(n=50, seed=11)
    cam = front_camera(24, 20)
    vm = cam.viewmat()
    # put Gaussian 0 exactly on the camera plane: world point = R^T (p_c - t) with p_c.z = 0
    p_c = torch.tensor([0.3, -0.2, 0.0])
    scene.means[0] = vm[:3, :3].T @ (p_c - vm[:3, 3])
    assert abs(float((vm[:3, :3] @ scene.means[0] + vm[:3, 3])[2])) < 1e-6
    params = {k: v.clone().requires_grad_(True) for k, v in scene.tensors().items()}
    out = render(GaussianScene(**params), cam, background=(0.1, 0.2, 0.3))
    out["rgb"].sum().backward()
    for k, p in params.items():
        assert torch.isfinite(p.grad).all(), k
