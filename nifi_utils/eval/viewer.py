"""Layer 6 (evaluation): an offline browser viewer of a scene at every rate, and a headless-Chromium check.

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
import subprocess
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
    """The smallest rotation matrix taking unit vector a to unit vector b (Rodrigues)."""
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    v, c = np.cross(a, b), float(a @ b)
    if c < -1 + 1e-9:  # opposite: half turn about any axis orthogonal to a
        axis = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
        axis /= np.linalg.norm(axis)
        return 2 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


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


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (no port, no extra package).

    Software WebGL (SwiftShader), network off (every request goes to a dead proxy): a page that
    needs anything beyond ``file://`` and ``data:`` fails to draw. ``loopback=True`` lets requests to this
    machine through (a local server, e.g. JupyterLab's in tests/test_lab.py); the rest stays cut.
    """

    def __init__(self, width: int = 800, height: int = 600, exe: str | None = None, loopback: bool = False):
        exe = exe or chromium_path()
        if exe is None:
            raise NifiError("chromium not found (Debian: apt-get install chromium)")
        self.width, self.height = width, height
        self._profile = tempfile.TemporaryDirectory()
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def _fds():  # the DevTools pipe is fds 3 (commands in) and 4 (replies out)
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [exe, "--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                "--ignore-gpu-blocklist", "--proxy-server=127.0.0.1:9",
                # Chromium sends loopback past any proxy unless told `<-loopback>`
                *([] if loopback else ["--proxy-bypass-list=<-loopback>"]),
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}",
                "--remote-debugging-pipe", "about:blank"]
        self._proc = subprocess.Popen(args, preexec_fn=_fds, close_fds=False, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id, self.console = b"", 0, []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for m in ("Runtime.enable", "Page.enable"):
            self.call(m, session=True)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)

    def call(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self._session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        import select

        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                d = json.loads(raw)
                if d.get("method") == "Runtime.exceptionThrown":
                    self.console.append("exception: " + d["params"]["exceptionDetails"].get("text", ""))
                elif d.get("method") == "Runtime.consoleAPICalled":
                    self.console.append(" ".join(str(a.get("value", "")) for a in d["params"]["args"]))
                if d.get("id") == self._id:
                    if "error" in d:
                        raise RuntimeError(f"{method}: {d['error'].get('message')}")
                    return d.get("result", {})
            left = deadline - time.time()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {method} in {timeout:.0f} s")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium exited")
            self._buf += chunk

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        return r.get("result", {}).get("value")

    def open(self, url: str, wait_for: str = "window.nifiView && window.nifiView.drawn === true",
             timeout: float = 120, settle: float = 1.0) -> float:
        """Load url and wait until ``wait_for`` is true; returns seconds waited; TimeoutError otherwise."""
        self.console.clear()
        # a fresh document per page: a hash-only change to the same file would not reload it
        self.call("Page.navigate", {"url": "about:blank"}, session=True)
        self.call("Page.navigate", {"url": url}, session=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.evaluate(f"Boolean({wait_for})"):
                time.sleep(settle)  # the first frame is drawn; let sorting and the fade-in finish
                return time.time() - t0
            time.sleep(0.25)
        raise TimeoutError(f"{url}: not drawn after {timeout:.0f} s (console: {' | '.join(self.console[-5:])})")

    def screenshot(self, path: str | Path | None = None) -> np.ndarray:
        """The viewport as an RGB array (and a PNG at path)."""
        import io

        from PIL import Image

        data = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"])
        if path is not None:
            Path(path).write_bytes(data)
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._profile.cleanup()

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
