"""An offline browser viewer of a scene at every rate, and a headless-Chromium check.

One self-contained HTML page per scene (works from ``file://``, no network): the SuperSplat viewer
that ``splat-transform`` (pinned in the Makefile) bundles, with every variant of the scene embedded
(uncompressed, each decoded ``.nifi`` level and, where present, the refined Gaussians of NiFi-3D) and
a small panel that switches between them, shows size in MB and ratio, and starts from each test camera.
The viewer's JavaScript (~3.3 MB) is in each page once, whatever the number of variants.

splat-transform converts each variant to PlayCanvas' chunk-quantized ``.compressed.ply`` (no GPU needed;
its SOG format needs WebGPU for SH k-means): the page shows the Gaussians at that precision, which is
what the size label does not count. The viewer rotates content 180 degrees about z and orbits about +y,
so each scene is first rotated to put its cameras' mean up vector on the viewer's up.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nifi_utils.core.common import NifiError
from nifi_utils.gs.gaussians import REQUIRED_PLY_PROPERTIES
from nifi_utils.core.outputs import check_out_file, staged
from nifi_utils.gs.splat_tools import missing_reason, run_splat_transform, splat_transform_path

_BOOTSTRAP = re.compile(r'<script type="application/json" id="sse-bootstrap">([\s\S]*?)</script>')
_BODY_OPEN = re.compile(r"<body\b[^>]*>")
# the viewer rotates loaded content by 180 degrees about z (supersplat-viewer's loadGsplat)
_VIEWER_ROT = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Variant:
    """One thing a page can show: a .ply of Gaussians with the size a receiver had to download."""

    key: str  # URL-safe id, e.g. "level0"
    label: str  # what the panel says, e.g. "level0 (.nifi, decoded)"
    ply: Path  # Gaussians to show (INRIA .ply)
    size_bytes: int  # bytes transmitted: the .ply itself (uncompressed) or the .nifi
    ratio: float  # uncompressed .ply bytes / size_bytes
    n_gaussians: int | None = None


# ---------------------------------------------------------------- inputs

def check_ply(path: str | Path) -> int:
    """Header check of an INRIA .ply (cheap: the 20 MB body is not read); returns the Gaussian count."""
    from plyfile import PlyData

    path = Path(path)
    if not path.is_file():
        raise NifiError(f"PLY file not found: {path}")
    try:
        with open(path, "rb") as f:
            ply = PlyData._parse_header(f)  # plyfile's header parser: PlyData.read would load the body too
    except Exception as e:  # plyfile raises several types for garbled headers
        raise NifiError(f"cannot read PLY {path}: {type(e).__name__}: {e}".rstrip(": ")) from None
    vertex = next((el for el in ply.elements if el.name == "vertex"), None)
    if vertex is None:
        raise NifiError(f"PLY {path} has no 'vertex' element: not a 3DGS point cloud")
    names = {p.name for p in vertex.properties}
    missing = [p for p in REQUIRED_PLY_PROPERTIES if p not in names]
    if missing:
        raise NifiError(f"PLY {path} is missing 3DGS properties: {', '.join(missing)}")
    if vertex.count == 0:
        raise NifiError(f"PLY {path} has no Gaussians")
    return int(vertex.count)


def decode_nifi(path: str | Path, out_ply: str | Path) -> int:
    """Decode a .nifi bitstream into an INRIA .ply; NifiError for a missing or corrupt file."""
    from nifi_utils.codec import container as codec

    scene, head = codec.load(path)  # one clear error for a missing, corrupt or foreign file
    scene.save_ply(out_ply)
    return int(head["n_gaussians"])


# ---------------------------------------------------------------- geometry

def rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation matrix taking the direction of a to that of b: scipy's `Rotation.align_vectors` of one
    pair (the shortest arc). Antiparallel (cos within 1e-9 of -1), where that arc's axis is undefined and
    align_vectors loses precision (scipy 1.17: |R a - b| up to 1.6 for b = -a up to rounding), a half turn about an
    axis orthogonal to a, then the short arc from -a to b."""
    from scipy.spatial.transform import Rotation

    a, b = (np.asarray(v, dtype=float) / np.linalg.norm(v) for v in (a, b))
    if float(a @ b) > -1 + 1e-9:
        return Rotation.align_vectors(b, a)[0].as_matrix()
    axis = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
    half = Rotation.from_rotvec(np.pi * axis / np.linalg.norm(axis))
    return (Rotation.align_vectors(b, -a)[0] * half).as_matrix()  # the half turn first


def euler_xyz_degrees(R: np.ndarray) -> tuple[float, float, float]:
    """Angles for splat-transform's ``-r x,y,z`` that rotate a .ply's points by R.

    splat-transform 3.7.0 applies ``-r x,y,z`` as D @ Rz @ Ry @ Rx @ D with D = diag(1, 1, -1) (measured:
    it rotates in a z-flipped frame); tests/test_viewer.py checks this against the installed tool.
    """
    from scipy.spatial.transform import Rotation

    D = np.diag([1.0, 1.0, -1.0])
    return tuple(float(a) for a in Rotation.from_matrix(D @ R @ D).as_euler("xyz", degrees=True))


def scene_alignment(cams) -> np.ndarray:
    """Rotation applied to the Gaussians so that the cameras' mean up vector is the viewer's +y."""
    up = np.mean([np.asarray(c.c2w)[:3, 1] for c in cams], 0)  # OpenGL camera axes: y is up
    if np.linalg.norm(up) < 1e-6:
        up = np.array([0.0, 0.0, 1.0])
    # viewer_world = _VIEWER_ROT @ R @ world; want _VIEWER_ROT @ R @ up = +y
    return rotation_between(up, _VIEWER_ROT.T @ np.array([0.0, 1.0, 0.0]))


def viewer_camera(cam, center: np.ndarray, R: np.ndarray) -> dict:
    """A transforms.json camera as the viewer's {position, target, fov} (vertical fov in degrees)."""
    c2w = np.asarray(cam.c2w, dtype=float)
    eye, forward = c2w[:3, 3], -c2w[:3, 2]  # OpenGL: the camera looks down -z
    dist = max(float((center - eye) @ forward), 1e-3)  # orbit about the scene centre's depth on the axis
    M = _VIEWER_ROT @ R
    fov = math.degrees(2 * math.atan(cam.height / (2 * cam.fy)))
    return {"position": [round(float(x), 6) for x in M @ eye],
            "target": [round(float(x), 6) for x in M @ (eye + dist * forward)],
            "fov": round(fov, 4)}


def test_view_ids(meta: dict, n_frames: int) -> list[int]:
    """Test views: transforms.json's ``test_ids`` where written, else the 3DGS literature's split."""
    from nifi_utils.gs.cameras import split_indices

    ids = meta.get("test_ids")
    return [int(i) for i in ids] if ids else split_indices(n_frames)[1]


# ---------------------------------------------------------------- page assembly

def viewer_template(settings: dict | None = None, workdir: Path | None = None) -> tuple[str, dict]:
    """splat-transform's bundled viewer page (made from a one-Gaussian .ply) and its default settings.

    With ``settings``, splat-transform validates them against the viewer version it bundles.
    """
    from nifi_utils.gs.gaussians import GaussianScene
    import torch

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        one = GaussianScene(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), -3.0),
                            torch.zeros(1), torch.zeros(1, 1, 3))
        one.save_ply(tmp / "one.ply")
        args = ["-q", "-w", tmp / "one.ply", tmp / "page.html"]
        if settings is not None:
            (tmp / "settings.json").write_text(json.dumps(settings))
            args[:0] = ["--viewer-settings", tmp / "settings.json"]
        run_splat_transform(args)
        page = (tmp / "page.html").read_text()
    m = _BOOTSTRAP.search(page)
    if m is None or _BODY_OPEN.search(page) is None:
        raise RuntimeError("splat-transform's viewer page has no sse-bootstrap block or <body>: version drift?")
    return page, json.loads(m.group(1))["settings"]


def to_viewer_ply(ply: Path, out: Path, R: np.ndarray) -> Path:
    """Rotate and convert a .ply to PlayCanvas' compressed .ply (what the page embeds)."""
    x, y, z = euler_xyz_degrees(R)
    run_splat_transform(["-q", "-w", ply, "-r", f"{x:.6f},{y:.6f},{z:.6f}", out])
    return out


def _json_for_script(value) -> str:
    return json.dumps(value).replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


_CHOOSER_JS = r"""
(function () {
  // start still, at the chosen test camera (the viewer otherwise starts an orbit animation); '?anim' plays it
  var search = new URLSearchParams(location.search);
  if (!search.has('anim') && !search.has('noanim')) {
    search.set('noanim', '');
    history.replaceState(null, '', location.pathname + '?' + search.toString().replace(/=(&|$)/g, '$1') + location.hash);
  }
  var meta = JSON.parse(document.getElementById('nifi-meta').textContent);
  var q = new URLSearchParams(location.hash.slice(1));
  var keys = meta.variants.map(function (v) { return v.key; });
  var key = keys.indexOf(q.get('v')) >= 0 ? q.get('v') : keys[0];
  var cam = Math.min(Math.max(parseInt(q.get('cam') || '0', 10) || 0, 0), meta.cameras.length - 1);
  var settings = meta.settings;
  if (meta.cameras.length) settings.cameras = [{ initial: meta.cameras[cam] }];
  var data = document.getElementById('nifi-data-' + key).textContent.trim();
  document.getElementById('sse-bootstrap').textContent = JSON.stringify({
    settings: settings,
    contentUrl: 'data:application/octet-stream;base64,' + data,
    contentFilename: 'scene.compressed.ply'
  });
  window.nifiView = { variant: key, camera: cam, drawn: false };
  // the viewer calls window.firstFrame() once the first frame with the scene is rendered
  window.firstFrame = function () {
    window.nifiView.drawn = true;
    // the key-binding hint opens over the scene on a first visit; the controls button brings it back
    setTimeout(function () {
      var close = document.querySelector('.sse-controlsHint:not(.sse-hidden) .sse-controlsHintClose');
      if (close) close.click();
    }, 0);
  };
  window.addEventListener('hashchange', function () { location.reload(); });
})();
"""

_PANEL_CSS = """
#nifi-panel { position: fixed; top: 12px; left: 12px; z-index: 1000; max-width: 340px; padding: 10px 12px;
  border-radius: 10px; background: rgba(20, 20, 20, 0.78); color: #eee; font: 13px/1.35 Arial, sans-serif; }
#nifi-panel h1 { font-size: 15px; margin: 0 0 6px 0; }
#nifi-panel table { border-collapse: collapse; }
#nifi-panel td { padding: 1px 6px 1px 0; white-space: nowrap; }
#nifi-panel td.num { text-align: right; }
#nifi-panel a { color: #ffb070; text-decoration: none; }
#nifi-panel tr.current a { color: #fff; font-weight: bold; }
#nifi-panel .cams a { margin-right: 6px; }
#nifi-panel .cams a.current { color: #fff; font-weight: bold; }
#nifi-panel .note { color: #aaa; font-size: 11px; margin-top: 6px; }
"""


def _panel_html(title: str, variants: list[Variant], n_cameras: int, index_href: str | None, note: str) -> str:
    rows = []
    for v in variants:
        n = f"{v.n_gaussians:,}" if v.n_gaussians else ""
        rows.append(f'<tr data-key="{html.escape(v.key)}"><td><a href="#v={html.escape(v.key)}">{html.escape(v.label)}</a>'
                    f'</td><td class="num">{v.size_bytes / 1e6:.4g} MB</td><td class="num">{v.ratio:.0f}x</td>'
                    f'<td class="num">{n}</td></tr>')
    cams = " ".join(f'<a data-cam="{i}" href="#">{i + 1}</a>' for i in range(n_cameras))
    back = f' · <a href="{html.escape(index_href)}">all scenes</a>' if index_href else ""
    return (f'<div id="nifi-panel"><h1>{html.escape(title)}{back}</h1>'
            f'<table><tr><td>variant</td><td class="num">size</td><td class="num">ratio</td>'
            f'<td class="num">Gaussians</td></tr>{"".join(rows)}</table>'
            + (f'<div class="cams">test view: {cams}</div>' if n_cameras else "")
            + f'<div class="note">{html.escape(note)}</div></div>'
            + """<script>
(function () {
  var v = window.nifiView, panel = document.getElementById('nifi-panel');
  if (new URLSearchParams(location.search).has('noui')) { panel.style.display = 'none'; }
  panel.querySelectorAll('tr[data-key]').forEach(function (tr) {
    var a = tr.querySelector('a'); a.href = '#v=' + tr.dataset.key + '&cam=' + v.camera;
    if (tr.dataset.key === v.variant) tr.className = 'current';
  });
  panel.querySelectorAll('a[data-cam]').forEach(function (a) {
    a.href = '#v=' + v.variant + '&cam=' + a.dataset.cam;
    if (+a.dataset.cam === v.camera) a.className = 'current';
  });
})();
</script>""")


def build_page(template: str, title: str, variants: list[Variant], payloads: dict[str, bytes], settings: dict,
               cameras: list[dict], index_href: str | None = None, note: str = "") -> str:
    """One HTML page: the bundled viewer, every variant's Gaussians (base64) and the switching panel."""
    if not variants:
        raise NifiError(f"no variant to show for {title}")
    meta = {"title": title, "settings": settings, "cameras": cameras,
            "variants": [{"key": v.key, "label": v.label, "size_bytes": v.size_bytes, "ratio": v.ratio}
                         for v in variants]}
    blocks = ['<script type="application/json" id="sse-bootstrap">null</script>',
              f'<script type="application/json" id="nifi-meta">{_json_for_script(meta)}</script>']
    for v in variants:
        blocks.append(f'<script type="application/octet-stream" id="nifi-data-{v.key}">'
                      f'{base64.b64encode(payloads[v.key]).decode()}</script>')
    blocks.append(f"<script>{_CHOOSER_JS}</script><style>{_PANEL_CSS}</style>")
    page = _BOOTSTRAP.sub(lambda m: "\n".join(blocks), template, count=1)
    page = page.replace("<title>SuperSplat Viewer</title>", f"<title>{html.escape(title)} · NiFi viewer</title>", 1)
    panel = _panel_html(title, variants, len(cameras), index_href, note)
    return _BODY_OPEN.sub(lambda m: m.group(0) + "\n" + panel, page, count=1)


# ---------------------------------------------------------------- scenes of the pipeline

def scene_variants(scene_dir: Path, bitstream_dir: Path, refined_dir: Path | None, tmp: Path) -> list[Variant]:
    """Uncompressed, every decoded level (level*.nifi) and, where present, the refined Gaussians (level*.ply)."""
    ply = scene_dir / "point_cloud.ply"
    ply_bytes = ply.stat().st_size
    out = [Variant("uncompressed", "uncompressed 3DGS (.ply)", ply, ply_bytes, 1.0, check_ply(ply))]
    levels = sorted(bitstream_dir.glob("*.nifi")) if bitstream_dir.is_dir() else []
    for nifi in levels:
        dec = tmp / f"{scene_dir.name}_{nifi.stem}.ply"
        n = decode_nifi(nifi, dec)
        size = nifi.stat().st_size
        out.append(Variant(nifi.stem, f"{nifi.stem} (.nifi, decoded)", dec, size, ply_bytes / size, n))
    if refined_dir is not None and refined_dir.is_dir():
        for nifi in levels:
            ref = refined_dir / f"{nifi.stem}.ply"
            if ref.is_file():
                size = nifi.stat().st_size  # refined at the receiver: what was sent is still the .nifi
                out.append(Variant(f"refined_{nifi.stem}", f"refined (NiFi-3D) from {nifi.stem}", ref, size,
                                   ply_bytes / size, check_ply(ref)))
    return out


def export_scene(scene_dir: Path, bitstream_dir: Path, refined_dir: Path | None, out_html: Path, template: str,
                 default_settings: dict, background, index_href: str | None = "index.html") -> dict:
    """Write one scene's page; returns a summary row (variants, sizes, page bytes, seconds)."""
    from nifi_utils.gs.cameras import read_transforms
    from nifi_utils.gs.gaussians import read_ply

    t0 = time.time()
    cams = read_transforms(scene_dir / "transforms.json")
    meta = json.loads((scene_dir / "transforms.json").read_text())
    test_ids = [i for i in test_view_ids(meta, len(cams)) if i < len(cams)]
    R = scene_alignment(list(cams))
    center = np.median(read_ply(scene_dir / "point_cloud.ply").means.numpy(), 0)
    cameras = [viewer_camera(cams[i], center, R) for i in test_ids]
    settings = json.loads(json.dumps(default_settings))
    settings["background"] = {"color": [float(c) for c in background]}
    settings["animTracks"], settings["annotations"], settings["startMode"] = [], [], "default"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        variants = scene_variants(scene_dir, bitstream_dir, refined_dir, tmp)
        payloads = {v.key: to_viewer_ply(v.ply, tmp / f"{v.key}.compressed.ply", R).read_bytes() for v in variants}
    note = ("Sizes are what a receiver downloads (the .ply, or the .nifi bitstream); the page itself holds "
            "PlayCanvas compressed .ply. Drag to orbit; test views are the held-out cameras (idx % 8 == 0).")
    page = build_page(template, scene_dir.name, variants, payloads, settings, cameras, index_href, note)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out_html.with_suffix(".html.part")
    tmp_out.write_text(page)
    tmp_out.replace(out_html)
    return {"scene": scene_dir.name, "page": out_html.name, "page_bytes": out_html.stat().st_size,
            "test_views": test_ids, "seconds": round(time.time() - t0, 2),
            "variants": [{"key": v.key, "label": v.label, "size_bytes": v.size_bytes, "MB": v.size_bytes / 1e6,
                          "ratio": round(v.ratio, 1), "n_gaussians": v.n_gaussians,
                          "embedded_bytes": len(payloads[v.key])} for v in variants]}


def write_index(out_dir: Path, rows: list[dict], title: str, note: str = "") -> Path:
    """index.html: one line per scene page, with its variants' sizes and ratios."""
    items = []
    for r in rows:
        vs = ", ".join(f"{html.escape(v['key'])} {v['MB']:.4g} MB ({v['ratio']:.0f}x)" for v in r["variants"])
        items.append(f'<li><a href="{html.escape(r["page"])}">{html.escape(r["scene"])}</a> '
                     f'<span>{vs}</span></li>')
    body = f"<ul>{''.join(items)}</ul>" if items else "<p>No scene pages.</p>"
    page = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"UTF-8\"><title>{html.escape(title)}</title>"
            "<style>body{font:14px/1.5 Arial,sans-serif;margin:2em;max-width:60em} span{color:#555}</style>"
            f"</head><body><h1>{html.escape(title)}</h1><p>{html.escape(note)}</p>{body}</body></html>")
    out = out_dir / "index.html"
    out.write_text(page)
    return out


def evaluation_scene_dirs(scenes_root: Path) -> list[Path]:
    """Scenes whose transforms.json says split 'eval' (all scenes where none says)."""
    dirs = sorted(d for d in scenes_root.iterdir() if (d / "transforms.json").is_file()) if scenes_root.is_dir() else []
    if not dirs:
        raise NifiError(f"no scene folders with transforms.json in {scenes_root} (run the scenes stage)")
    split = {d: json.loads((d / "transforms.json").read_text()).get("split") for d in dirs}
    evals = [d for d in dirs if split[d] == "eval"]
    return evals if any(s is not None for s in split.values()) else dirs


# ---------------------------------------------------------------- one user file

def view_file(path: str | Path, out_html: str | Path, cameras_json: str | Path | None = None,
              background=(0.0, 0.0, 0.0)) -> dict:
    """``python -m nifi_utils view``: a .ply or .nifi as a one-variant page; inputs checked before writing."""
    from nifi_utils.gs.cameras import read_transforms

    path, out_html = Path(path), Path(out_html)
    if out_html.suffix.lower() != ".html":
        raise NifiError(f"--out must be an .html file, got {out_html}")
    if path.suffix.lower() not in (".ply", ".nifi"):
        raise NifiError(f"view wants a 3DGS .ply or a .nifi bitstream, got {path}")
    check_out_file(out_html)
    cams = read_transforms(cameras_json) if cameras_json else None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if path.suffix.lower() == ".nifi":
            ply = tmp / "decoded.ply"
            n = decode_nifi(path, ply)
            size = path.stat().st_size
            label = f"{path.name} (decoded)"
        else:
            ply, n, size, label = path, check_ply(path), path.stat().st_size, path.name
        if splat_transform_path() is None:  # after the input checks: a bad file is reported as such
            raise NifiError(missing_reason())
        from nifi_utils.gs.gaussians import read_ply

        means = read_ply(ply).means.numpy()
        R = scene_alignment(list(cams)) if cams else rotation_between(np.array([0.0, 0, 1]), np.array([0.0, -1, 0]))
        center = np.median(means, 0)
        if cams:
            cameras = [viewer_camera(c, center, R) for c in cams]
        else:  # no cameras: look at the median from outside the bulk of the Gaussians
            radius = float(np.percentile(np.linalg.norm(means - center, axis=1), 90)) or 1.0
            M = _VIEWER_ROT @ R
            eye = center + radius * 2.0 * np.array([0.6, -0.8, 0.5]) / np.linalg.norm([0.6, -0.8, 0.5])
            cameras = [{"position": [float(x) for x in M @ eye], "target": [float(x) for x in M @ center], "fov": 50.0}]
        template, settings = viewer_template()
        settings["background"] = {"color": [float(c) for c in background]}
        settings["animTracks"], settings["annotations"], settings["startMode"] = [], [], "default"
        v = Variant("file", label, ply, size, 1.0, n)
        payload = to_viewer_ply(ply, tmp / "file.compressed.ply", R).read_bytes()
    page = build_page(template, path.name, [v], {"file": payload}, settings, cameras, None,
                      "Drag to orbit. Size is the file's size.")
    with staged() as st:
        st.write(out_html, lambda tmp: tmp.write_text(page))
    return {"out": str(out_html), "n_gaussians": n, "size_bytes": size, "page_bytes": out_html.stat().st_size}


# ---------------------------------------------------------------- headless Chromium

def chromium_path() -> str | None:
    """Debian's `chromium` (or chromium-browser / google-chrome) on PATH, or ``$NIFI_CHROMIUM``."""
    env = os.environ.get("NIFI_CHROMIUM")
    if env:
        return env if shutil.which(env) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


# Chromium's switches: headless software WebGL (SwiftShader, no GPU), no background traffic of its own, and every
# request sent to a dead proxy (port 9, discard) so that a page that needs the network fails to draw
_CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                  "--ignore-gpu-blocklist", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                  "--mute-audio", "--proxy-server=127.0.0.1:9"]


class Browser:
    """Headless Chromium (the system's, see `chromium_path`; Playwright's own browser downloads are not used)
    driven by Playwright.

    Software WebGL (SwiftShader), network off (every request goes to a dead proxy): a page that needs anything
    beyond ``file://`` and ``data:`` fails to draw. ``loopback=True`` lets requests to this machine through (a local
    server, e.g. JupyterLab's in tests/test_lab.py); the rest stays cut. ``console`` collects the page's console
    messages and its uncaught exceptions ("exception: ...") since the last `open`.

    Playwright's sync API refuses a thread with a running asyncio loop (a Jupyter kernel's, where the viewer stage's
    notebook runs), so it runs on a thread of its own and every call is handed to it.
    """

    def __init__(self, width: int = 800, height: int = 600, exe: str | None = None, loopback: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        exe = exe or chromium_path()
        if exe is None:
            raise NifiError("chromium not found (Debian: apt-get install chromium)")
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            raise NifiError("playwright not installed (pip install -r requirements.txt -c constraints.txt)") from None
        self.width, self.height, self.console = width, height, []
        self._pw = self._browser = self._page = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="nifi-browser")
        # Chromium sends loopback past any proxy unless told `<-loopback>`
        args = [*_CHROMIUM_ARGS, *([] if loopback else ["--proxy-bypass-list=<-loopback>"])]
        try:
            self._run(self._start, exe, args)
        except BaseException:
            self.close()
            raise

    def _run(self, fn, *args):
        return self._thread.submit(fn, *args).result()

    def _start(self, exe: str, args: list[str]):
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(executable_path=exe, args=args, timeout=60_000)
        self._page = self._browser.new_page(viewport={"width": self.width, "height": self.height},
                                            device_scale_factor=1)
        self._page.on("console", lambda m: self.console.append(m.text))
        self._page.on("pageerror", lambda e: self.console.append(f"exception: {e}"))

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (a Promise is awaited); RuntimeError if it throws."""
        from playwright.sync_api import Error

        try:
            return self._run(self._page.evaluate, expression)
        except Error as e:
            raise RuntimeError(f"chromium: {str(e).strip().splitlines()[0]}") from None

    def open(self, url: str, wait_for: str = "window.nifiView && window.nifiView.drawn === true",
             timeout: float = 120, settle: float = 1.0) -> float:
        """Load url and wait until ``wait_for`` is true; returns seconds waited; TimeoutError otherwise."""
        self.console.clear()
        return self._run(self._open, url, wait_for, timeout, settle)

    def _open(self, url: str, wait_for: str, timeout: float, settle: float) -> float:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        # a fresh document per page: a hash-only change to the same file would not reload it
        self._page.goto("about:blank")
        self._page.goto(url, wait_until="commit", timeout=timeout * 1000)
        t0 = time.time()
        check = f"(() => {{ try {{ return Boolean({wait_for}); }} catch (e) {{ return false; }} }})()"
        try:  # a check that throws (the page is still loading) counts as not yet
            self._page.wait_for_function(check, timeout=timeout * 1000, polling=250)
        except PlaywrightTimeout:
            seen = " | ".join(self.console[-5:])
            raise TimeoutError(f"{url}: not drawn after {timeout:.0f} s (console: {seen})") from None
        self._page.wait_for_timeout(settle * 1000)  # the first frame is drawn; let sorting and the fade-in finish
        return time.time() - t0

    def screenshot(self, path: str | Path | None = None) -> np.ndarray:
        """The viewport as an RGB array (and a PNG at path)."""
        import io

        from PIL import Image

        data = self._run(lambda: self._page.screenshot(type="png", timeout=60_000))
        if path is not None:
            Path(path).write_bytes(data)
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def close(self):
        def stop():
            for f in (lambda: self._browser and self._browser.close(), lambda: self._pw and self._pw.stop()):
                try:
                    f()
                except Exception:  # already gone: closing is best effort
                    pass
            self._pw = self._browser = self._page = None

        if self._thread is not None:
            self._run(stop)
            self._thread.shutdown()
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def page_url(page: str | Path, variant: str | None = None, camera: int = 0, noui: bool = True) -> str:
    """file:// URL of a viewer page showing one variant from one test camera (``noui``: no panel, no controls)."""
    url = Path(page).resolve().as_uri() + ("?noui" if noui else "")
    return url + (f"#v={variant}&cam={camera}" if variant else "")


def drawn_fraction(img: np.ndarray, background=None, tol: int = 12) -> float:
    """Fraction of pixels that differ from the background colour (the most common one if not given)."""
    flat = img.reshape(-1, 3).astype(int)
    if background is None:
        colors, counts = np.unique(flat, axis=0, return_counts=True)
        bg = colors[counts.argmax()]
    else:
        bg = np.round(np.asarray(background, dtype=float) * 255).astype(int)
    return float((np.abs(flat - bg).max(1) > tol).mean())


# ---------------------------------------------------------------- command line

def cmd_view(args) -> int:
    try:
        bg = tuple(float(v) for v in args.background.split(","))
    except ValueError:
        bg = ()
    if len(bg) != 3:
        raise NifiError(f"--background wants three comma-separated numbers, got {args.background!r}")
    r = view_file(args.input, args.out, args.cameras, bg)
    print(f"wrote {r['out']}: {r['n_gaussians']} Gaussians, {r['size_bytes'] / 1e6:.4g} MB input, "
          f"page {r['page_bytes'] / 1e6:.1f} MB (open it in a browser; works offline)")
    return 0


def add_view_command(sub) -> None:
    """``python -m nifi_utils view SCENE.ply|x.nifi --out page.html`` (wired into cli.build_parser)."""
    v = sub.add_parser("view", help="an offline HTML viewer (one self-contained page) of a 3DGS .ply or a .nifi")
    v.add_argument("input", help="INRIA-format 3DGS .ply or .nifi bitstream")
    v.add_argument("--out", required=True, help="output .html page")
    v.add_argument("--cameras", help="transforms.json: start from its first camera and orbit about its up axis")
    v.add_argument("--background", default="0,0,0", help="background RGB in [0,1], e.g. 1,1,1")
    v.set_defaults(fn=cmd_view)
