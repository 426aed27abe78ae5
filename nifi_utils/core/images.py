"""Image files, read and written in one place for the whole lab.

Two pairs, for two kinds of caller:
- `read_rgb(path)` / `write_rgb(path, u8)`: the pipeline's images (ground truth, renders, restored views) as
  uint8 HxWx3 arrays, exactly what PIL's `convert("RGB")` gives and what `Image.fromarray(...).save` writes;
- `read_image(path)` / `write_image(path, img01, info)`: a user's image for the restorer CLI as a [1,3,H,W]
  float tensor in [0,1], plus what it takes to write the result back in the same layout (grayscale stays
  grayscale, an alpha channel is carried over, 16-bit stays 16-bit).

A missing or unreadable file is one NifiError line naming it. PIL is imported where an image is touched, so
importing this module costs nothing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nifi_utils.core.common import NifiError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _open(path: Path, missing: str):
    """The opened, fully decoded PIL image at `path` (NifiError `missing` if there is no file, one line if PIL
    cannot read it)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise NifiError(missing)
    try:
        im = Image.open(path)
        im.load()
    except (UnidentifiedImageError, OSError) as e:
        raise NifiError(f"{path}: not a readable image ({e})") from None
    return im


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as uint8 HxWx3 RGB (grey, palette and alpha images converted by PIL's `convert("RGB")`)."""
    path = Path(path)
    with _open(path, f"image {path} not found") as im:
        return np.asarray(im.convert("RGB"))


def write_rgb(path: str | Path, img: np.ndarray) -> Path:
    """Write a uint8 HxWx3 array as it is (PNG for a .png path), making the parent folders."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise NifiError(f"image {path} not found")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise NifiError(f"{path}: not a readable image ({e})") from None


def read_image(path: str | Path):
    """An image file as [1,3,H,W] float in [0,1], plus what is needed to write the result back in the
    same layout: grayscale stays grayscale, an alpha channel is carried over, 16-bit stays 16-bit."""
    import torch

    path = Path(path)
    im = _open(path, f"input image not found: {path}")
    info = {"mode": im.mode, "alpha": None, "bits": 8}
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        info["bits"] = 16 if scale > 255 else 8
        rgb = np.repeat((a / scale)[..., None], 3, -1)
        info["mode"] = "L"
    elif im.mode == "F":
        rgb = np.repeat(np.clip(np.asarray(im, np.float64), 0, 1)[..., None], 3, -1)
        info["mode"] = "L"
    else:
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            info["alpha"] = np.asarray(im.convert("RGBA"))[..., 3]
        gray = im.mode in ("L", "LA", "1")
        info["mode"] = "L" if gray else "RGB"
        rgb = np.asarray(im.convert("RGB"), np.float64) / 255.0
    t = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None].contiguous()
    return t, info


def write_image(path: str | Path, img01, info: dict | None = None) -> Path:
    """Write [1,3,H,W] (or [3,H,W]) in [0,1] in the layout `read_image` recorded."""
    from PIL import Image

    info = info or {"mode": "RGB", "alpha": None, "bits": 8}
    a = img01.detach().float().cpu().clamp(0, 1)
    a = a[0] if a.ndim == 4 else a
    rgb = a.permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if info["mode"] == "L":
        gray = rgb @ np.array([0.299, 0.587, 0.114])
        if info.get("bits", 8) == 16:
            Image.fromarray((gray * 65535 + 0.5).astype(np.uint16)).save(path)
            return path
        out = Image.fromarray((gray * 255 + 0.5).astype(np.uint8), "L")
        if info.get("alpha") is not None:
            out = Image.merge("LA", (out, Image.fromarray(info["alpha"])))
    else:
        out = Image.fromarray((rgb * 255 + 0.5).astype(np.uint8), "RGB")
        if info.get("alpha") is not None:
            out.putalpha(Image.fromarray(info["alpha"]))
    out.save(path)
    return path
