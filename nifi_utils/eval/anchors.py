"""Anchors for the `.nifi` codec: the 3DGS ecosystem's formats and general-purpose compressors.

On the same (decoded) Gaussians of one level, each anchor row says how many bytes another way of
storing them takes and how well its decoded Gaussians render:
- `.spz` (Niantic), `.sog` and `.compressed.ply` (PlayCanvas), written and read back by the pinned
  `@playcanvas/splat-transform` (`splat_tools`); rows are marked skipped, with the reason, without it;
- LZMA (preset 9e) and zstd (level 19) on our own quantized symbols, in the codec's Z-order, packed
  channel-major (uint8, uint16 above 8 bits): what a general-purpose compressor finds in them. zstd
  needs the optional `zstandard` package (skipped row without it).

Every row: {"anchor", "bytes", "psnr_db" (test views against the ground truth, if given),
"psnr_vs_input_db" (against the renders of the input Gaussians), "skipped" (None or the reason)}.
The symbol anchors decode to exactly the `.nifi` Gaussians, so their PSNR is the `.nifi` row's.
"""
from __future__ import annotations

import lzma
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMATS = ("spz", "sog", "compressed.ply")


def raw_symbols(scene, sh_degree: int, bits: int, pos_bits: int) -> tuple[np.ndarray, list[int]]:
    """The codec's quantized symbols [N, C] in its own (Z-)order, and the bits of each channel."""
    from nifi_utils.codec import container as codec

    vals = codec.scene_to_channels(scene.detach().to("cpu", torch.float32), sh_degree).numpy()
    lo, hi = codec.channel_ranges(vals)
    b = codec.default_bits(sh_degree, bits, pos_bits)
    sym = codec.quantize(vals, b, lo, hi)
    return sym[codec.morton_order(sym[:, :3], pos_bits)], b


def packed_symbols(sym: np.ndarray, bits: list[int]) -> bytes:
    """Channel-major bytes of the symbols: what LZMA / zstd are given."""
    return b"".join(sym[:, c].astype(np.uint8 if b <= 8 else "<u2").tobytes() for c, b in enumerate(bits))


def symbol_anchor_rows(scene, sh_degree: int, bits: int, pos_bits: int) -> list[dict]:
    """LZMA-9e and zstd-19 on the packed symbols (the ranges header is not counted: it is ~100 B)."""
    raw = packed_symbols(*raw_symbols(scene, sh_degree, bits, pos_bits))
    rows = [{"anchor": "lzma9e_symbols", "bytes": len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)),
             "skipped": None}]
    try:
        import zstandard
    except ImportError:
        rows.append({"anchor": "zstd19_symbols", "bytes": None,
                     "skipped": "zstandard not installed (pip install zstandard)"})
    else:
        rows.append({"anchor": "zstd19_symbols", "bytes": len(zstandard.ZstdCompressor(level=19).compress(raw)),
                     "skipped": None})
    return rows


def _quality(scene, cameras, background, gt_images, ref_images) -> dict:
    """Mean test-view PSNR of the scene's renders against the ground truth and against the input's renders."""
    from nifi_utils.measure.metrics import psnr
    from nifi_utils.gs.scenes import render_views

    imgs = render_views(scene, cameras, supersample=1, background=tuple(background), desc="render")
    out = {"psnr_db": None if gt_images is None else float(np.mean([psnr(a, b) for a, b in zip(imgs, gt_images)]))}
    if ref_images is not None:
        out["psnr_vs_input_db"] = float(np.mean([psnr(a, b) for a, b in zip(imgs, ref_images)]))
    return out


def codec_anchors(scene, sh_degree: int, bits: int = 8, pos_bits: int = 10, cameras=None,
                  background=(0.0, 0.0, 0.0), gt_images: list[np.ndarray] | None = None,
                  formats=FORMATS, workdir: str | Path | None = None) -> list[dict]:
    """Rows for `.nifi` and every anchor on the same Gaussians (one level). `cameras` (a CameraSet or list
    of cameras) turns on the render PSNR; without splat-transform the format rows say why they are skipped."""
    from nifi_utils.codec import container as codec
    from nifi_utils.gs.gaussians import read_ply, write_ply
    from nifi_utils.gs.splat_tools import missing_reason, run_splat_transform, splat_transform_path

    scene = scene.detach().to("cpu", torch.float32).with_sh_degree(sh_degree)
    enc = codec.encode_scene(scene, sh_degree=sh_degree, bits=bits, pos_bits=pos_bits)
    nifi_row = {"anchor": "nifi", "bytes": enc.nbytes, "skipped": None}
    ref = None
    if cameras is not None:
        from nifi_utils.gs.scenes import render_views

        ref = render_views(scene, cameras, supersample=1, background=tuple(background), desc="render")
        nifi_row.update(_quality(codec.decode_bytes(enc.data)[0], cameras, background, gt_images, ref))
    rows = [nifi_row]
    sym_rows = symbol_anchor_rows(scene, sh_degree, bits, pos_bits)
    for r in sym_rows:  # they decode to the .nifi Gaussians exactly
        if cameras is not None and r["skipped"] is None:
            r.update({k: nifi_row[k] for k in ("psnr_db", "psnr_vs_input_db")})
    if splat_transform_path() is None:
        rows += [{"anchor": f, "bytes": None, "skipped": missing_reason()} for f in formats]
        return rows + sym_rows
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        src = write_ply(scene, tmp / "input.ply")
        for f in formats:
            out = tmp / f"anchor.{f}"
            try:
                run_splat_transform(["-q", "-w", src, out])
            except RuntimeError as e:  # e.g. .sog of SH > 0 wants a GPU: the row says so, the stage goes on
                why = "it wants a GPU device for SH > 0" if "device" in str(e).lower() else str(e)[-200:]
                rows.append({"anchor": f, "bytes": None, "skipped": f"splat-transform could not write .{f} here: {why}"})
                continue
            row = {"anchor": f, "bytes": out.stat().st_size, "skipped": None}
            if cameras is not None:
                back = tmp / f"back_{f.replace('.', '_')}.ply"
                run_splat_transform(["-q", "-w", out, back])
                dec = read_ply(back).with_sh_degree(sh_degree)
                row.update(_quality(dec, cameras, background, gt_images, ref))
            rows.append(row)
    return rows + sym_rows
