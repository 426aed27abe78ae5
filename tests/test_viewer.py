"""The offline viewer: geometry against the installed splat-transform, page assembly, the `view` CLI's
errors, and a real headless Chromium (network off) that must draw the scene and tell variants apart."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from nifi_utils.codec import container as codec
from nifi_utils.eval import viewer
from nifi_utils.gs.cameras import CameraSet, write_transforms
from nifi_utils.core.common import REPO_ROOT
from nifi_utils.gs.gaussians import GaussianScene, read_ply
from nifi_utils.gs.splat_tools import missing_reason, run_splat_transform, splat_transform_path

from conftest import front_camera, random_scene

needs_splat = pytest.mark.skipif(splat_transform_path() is None, reason=missing_reason())
needs_chromium = pytest.mark.skipif(viewer.chromium_path() is None,
                                    reason="chromium not installed (.ci/run installs Debian's chromium as root)")


def _random_rotation(seed):
    from scipy.spatial.transform import Rotation

    return Rotation.random(random_state=seed).as_matrix()


def _rodrigues(a, b):
    """The shortest-arc rotation taking unit a to unit b, written out (the reference; not antiparallel)."""
    v, c = np.cross(a, b), float(a @ b)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


def test_rotation_between_maps_a_to_b_and_is_a_rotation():
    rng = np.random.default_rng(0)
    for a, b in [(rng.normal(size=3), rng.normal(size=3)), (np.array([0, 0, 1.0]), np.array([0, 0, -1.0]))]:
        R = viewer.rotation_between(a, b)
        np.testing.assert_allclose(R @ (a / np.linalg.norm(a)), b / np.linalg.norm(b), atol=1e-9)
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-9)
        assert np.linalg.det(R) == pytest.approx(1.0)


def test_rotation_between_is_the_shortest_arc_and_holds_up_when_antiparallel():
    rng = np.random.default_rng(1)
    for _ in range(200):
        a, b = (v / np.linalg.norm(v) for v in rng.normal(size=(2, 3)))
        np.testing.assert_allclose(viewer.rotation_between(a, b), _rodrigues(a, b), atol=1e-11)
    np.testing.assert_allclose(viewer.rotation_between([0, 0, 2.0], [0, 0, 3.0]), np.eye(3), atol=1e-15)
    # exactly and nearly opposite (where scipy's one-pair align_vectors alone misses b by up to ~1.6): a half turn
    for _ in range(200):
        a = rng.normal(size=3)
        a /= np.linalg.norm(a)
        for eps in (0.0, 1e-15, 1e-12, 1e-9, 1e-6, 1e-4):
            b = -a + eps * rng.normal(size=3)
            b /= np.linalg.norm(b)
            R = viewer.rotation_between(a, b)
            np.testing.assert_allclose(R @ a, b, atol=1e-11)
            np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
            assert np.linalg.det(R) == pytest.approx(1.0)


def test_alignment_puts_the_cameras_up_on_the_viewers_up_and_cameras_look_at_the_scene():
    cams = [front_camera(64, 48, dist=d) for d in (2.0, 3.0)]
    R = viewer.scene_alignment(cams)
    up = np.mean([c.c2w[:3, 1] for c in cams], 0)
    np.testing.assert_allclose(viewer._VIEWER_ROT @ R @ up / np.linalg.norm(up), [0, 1, 0], atol=1e-9)
    pose = viewer.viewer_camera(cams[0], np.zeros(3), R)
    M = viewer._VIEWER_ROT @ R
    np.testing.assert_allclose(pose["position"], M @ cams[0].c2w[:3, 3], atol=1e-5)
    # the camera looks at the scene centre (look_at targets the origin)
    np.testing.assert_allclose(pose["target"], [0, 0, 0], atol=1e-4)
    assert pose["fov"] == pytest.approx(np.degrees(2 * np.arctan(48 / (2 * cams[0].fy))), rel=1e-4)


def test_test_views_are_the_held_out_ids_or_every_eighth():
    assert viewer.test_view_ids({"test_ids": [0, 8]}, 32) == [0, 8]
    assert viewer.test_view_ids({}, 17) == [0, 8, 16]


@needs_splat
def test_euler_angles_rotate_points_as_splat_transform_does(tmp_path):
    pts = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.3, -0.5, 0.7]])
    n = len(pts)
    GaussianScene(pts, torch.tensor([[1.0, 0, 0, 0]] * n), torch.full((n, 3), -3.0), torch.zeros(n),
                  torch.zeros(n, 1, 3)).save_ply(tmp_path / "p.ply")
    for seed in (0, 1):
        R = _random_rotation(seed)
        x, y, z = viewer.euler_xyz_degrees(R)
        run_splat_transform(["-q", "-w", tmp_path / "p.ply", "-r", f"{x},{y},{z}", tmp_path / "r.ply"])
        got = read_ply(tmp_path / "r.ply").means.numpy()
        np.testing.assert_allclose(got, (R @ pts.numpy().T).T, atol=1e-4)


def _page_bits():
    variants = [viewer.Variant("uncompressed", "uncompressed <3DGS>", None, 19_841_530, 1.0, 80000),
                viewer.Variant("level0", "level0", None, 14_195, 1397.8, 1024)]
    template = ('<html><head><title>SuperSplat Viewer</title><script type="application/json" id="sse-bootstrap">'
                "\n null\n</script></head><body><script type=\"module\">/* viewer */</script></body></html>")
    return variants, template


def test_page_embeds_every_variant_once_with_size_and_ratio():
    variants, template = _page_bits()
    page = viewer.build_page(template, "eval_00", variants, {"uncompressed": b"\x00" * 30, "level0": b"\x01" * 7},
                             {"version": 2}, [{"position": [0, 0, 1], "target": [0, 0, 0], "fov": 50}], "index.html")
    assert page.count('id="nifi-data-') == 2 and page.count('id="sse-bootstrap"') == 1
    assert "0.01419 MB" in page and "1398x" in page and "19.84 MB" in page
    assert "uncompressed &lt;3DGS&gt;" in page and "<3DGS>" not in page.split('id="nifi-meta">')[1].split("</script>")[0]
    assert page.index('id="nifi-meta"') < page.index("/* viewer */")  # chooser runs before the viewer module
    with pytest.raises(Exception, match="no variant"):
        viewer.build_page(template, "x", [], {}, {}, [])


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "nifi_utils", "view", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=timeout)


def test_view_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "bad.ply").write_text("ply\nformat binary_little_endian 1.0\nelement vertex 2\n"
                                      "property float x\nproperty float y\nend_header\n" + "\0" * 16)
    enc = codec.encode_scene(random_scene(n=200, sh_degree=0))
    (tmp_path / "bad.nifi").write_bytes(enc.data[: len(enc.data) // 2])
    cases = [("bad.ply", "missing 3DGS properties"), ("bad.nifi", ".nifi"), ("missing.ply", "not found")]
    for name, msg in cases:
        r = _cli(tmp_path / name, "--out", tmp_path / "o" / "page.html")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, r.stderr
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], r.stderr
        assert not (tmp_path / "o").exists()  # nothing half-written
    r = _cli(tmp_path / "bad.ply", "--out", tmp_path / "page.png")
    assert r.returncode == 2 and "must be an .html" in r.stderr


def _scene_folder(tmp_path):
    """A small scene folder in the pipeline's layout, with two rates."""
    scene = random_scene(n=3000, sh_degree=1, spread=0.6, log_scale=-3.2)
    d = tmp_path / "scenes" / "eval_00"
    d.mkdir(parents=True)
    scene.save_ply(d / "point_cloud.ply")
    cams = [front_camera(64, 48, dist=2.2)] * 9
    write_transforms(CameraSet(cams, [f"images/{i:04d}.png" for i in range(9)]), d / "transforms.json",
                     extra={"split": "eval", "test_ids": [0, 8]})
    b = tmp_path / "bitstreams" / "eval_00"
    for level, n in enumerate((150, 1500)):
        keep = torch.argsort(scene.opacity_logits, descending=True)[:n]
        codec.encode_scene(scene.subset(keep), sh_degree=0).save(b / f"level{level}.nifi")
    return d, b


@needs_splat
def test_export_scene_and_index(tmp_path):
    d, b = _scene_folder(tmp_path)
    template, settings = viewer.viewer_template()
    row = viewer.export_scene(d, b, tmp_path / "refined" / "eval_00", tmp_path / "out" / "eval_00.html", template,
                              settings, (0.6, 0.7, 0.8))
    assert [v["key"] for v in row["variants"]] == ["uncompressed", "level0", "level1"]  # no refined folder: skipped
    assert row["test_views"] == [0, 8]
    sizes = [v["size_bytes"] for v in row["variants"]]
    assert sizes[0] > sizes[2] > sizes[1]
    assert row["variants"][1]["ratio"] == pytest.approx(sizes[0] / sizes[1], rel=1e-3)
    viewer.write_index(tmp_path / "out", [row], "t")
    assert 'href="eval_00.html"' in (tmp_path / "out" / "index.html").read_text()
    # with refined Gaussians present they become variants of the same page
    (tmp_path / "refined" / "eval_00").mkdir(parents=True)
    random_scene(n=500, sh_degree=0, spread=0.6).save_ply(tmp_path / "refined" / "eval_00" / "level0.ply")
    row = viewer.export_scene(d, b, tmp_path / "refined" / "eval_00", tmp_path / "out" / "eval_00.html", template,
                              settings, (0.6, 0.7, 0.8))
    assert row["variants"][-1]["key"] == "refined_level0" and row["variants"][-1]["size_bytes"] == sizes[1]


def _assert_draws(browser, page, variants, camera=0):
    shots = {}
    for key in variants:
        browser.open(viewer.page_url(page, key, camera), timeout=120)
        shots[key] = browser.screenshot()
        frac = viewer.drawn_fraction(shots[key])
        assert shots[key].std() > 5 and frac > 0.02, f"{page.name} {key}: blank (drawn fraction {frac:.3f})"
        assert not any("exception" in c for c in browser.console), browser.console
    return shots


@needs_chromium
def test_browser_cuts_the_network_but_loopback_reports_exceptions_and_times_out(tmp_path):
    """viewer.Browser (Playwright on the system's chromium): requests never leave the machine, reach it only with
    loopback=True, a page's uncaught exception lands in `console`, a check that never holds is a TimeoutError, and
    it runs under a running asyncio loop (a Jupyter kernel's, where the viewer stage's notebook opens it)."""
    import asyncio
    import http.server
    import threading

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    page = tmp_path / "p.html"
    page.write_text("<script>window.done = 0; const end = () => window.done++;"
                    f"fetch('http://127.0.0.1:{server.server_address[1]}/local').finally(end);"
                    "fetch('http://example.com/').finally(end); setTimeout(() => { throw new Error('boom'); });</script>")
    try:
        for loopback in (False, True):
            with viewer.Browser(160, 120, loopback=loopback) as browser:
                browser.open(page.as_uri(), wait_for="window.done === 2", timeout=30, settle=0.2)
                assert any("exception" in c and "boom" in c for c in browser.console), browser.console
                assert any("ERR_PROXY_CONNECTION_FAILED" in c for c in browser.console), browser.console
                assert browser.evaluate("[1, 2].length") == 2 and browser.screenshot().shape == (120, 160, 3)
                with pytest.raises(RuntimeError, match="nope"):
                    browser.evaluate("nope.x")
                if loopback:
                    with pytest.raises(TimeoutError, match="not drawn after 1 s"):
                        browser.open(page.as_uri(), wait_for="window.never", timeout=1, settle=0)
            assert set(hits) == ({"/local"} if loopback else set())
    finally:
        server.shutdown()

    async def in_a_loop():
        with viewer.Browser(160, 120) as browser:
            browser.open("data:text/html,<script>window.ok = 1</script>", wait_for="window.ok === 1", settle=0)
            return browser.evaluate("window.ok")

    assert asyncio.run(in_a_loop()) == 1


@needs_splat
@needs_chromium
def test_page_draws_offline_in_headless_chromium_and_variants_differ(tmp_path):
    d, b = _scene_folder(tmp_path)
    template, settings = viewer.viewer_template()
    page = tmp_path / "out" / "eval_00.html"
    viewer.export_scene(d, b, None, page, template, settings, (0.0, 0.0, 0.0))
    with viewer.Browser(480, 360) as browser:
        shots = _assert_draws(browser, page, ["uncompressed", "level0"])
        assert np.abs(shots["uncompressed"].astype(int) - shots["level0"]).mean() > 1.0
        # the panel names the variant being shown, with its size
        browser.open(viewer.page_url(page, "level0", 1, noui=False))
        text = browser.evaluate("document.getElementById('nifi-panel').innerText")
        assert "MB" in text and "x" in text
        assert browser.evaluate("document.querySelector('#nifi-panel tr.current').dataset.key") == "level0"
        assert browser.evaluate("window.nifiView.camera") == 1


@needs_splat
@needs_chromium
def test_view_cli_page_draws(tmp_path):
    random_scene(n=2000, sh_degree=0, spread=0.6).save_ply(tmp_path / "s.ply")
    r = _cli(tmp_path / "s.ply", "--out", tmp_path / "s.html")
    assert r.returncode == 0, r.stderr
    with viewer.Browser(320, 240) as browser:
        _assert_draws(browser, tmp_path / "s.html", ["file"])


CPU_PAGES = sorted((REPO_ROOT / "reports/cpu/viewer").glob("*.html"))


@needs_chromium
@pytest.mark.skipif(not CPU_PAGES, reason="reports/cpu/viewer not built (dvc repro -s viewer)")
def test_every_cpu_page_draws_offline():
    index = REPO_ROOT / "reports/cpu/viewer/index.html"
    scene_pages = [p for p in CPU_PAGES if p != index]
    assert index in CPU_PAGES and all(f'href="{p.name}"' in index.read_text() for p in scene_pages)
    summary = json.loads((REPO_ROOT / "reports/cpu/viewer/viewer.json").read_text())
    with viewer.Browser(480, 360) as browser:
        for page in scene_pages:
            row = next(r for r in summary["scenes"] if r["page"] == page.name)
            keys = [v["key"] for v in row["variants"]]
            shots = _assert_draws(browser, page, [keys[0], keys[1]])
            assert np.abs(shots[keys[0]].astype(int) - shots[keys[1]]).mean() > 1.0, page.name
