"""Layer 7 (pipeline): the command line, `python -m nifi_utils <command>`.

User mistakes (missing file, malformed .ply or cameras, bad sizes) end with one `error:` line and
exit status 2; nothing is written before the inputs are validated.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import NifiError


def cmd_render(args) -> int:
    import numpy as np
    from PIL import Image

    from .cameras import read_transforms
    from .common import pick_device
    from .gaussians import read_ply
    from .scenes import render_views

    scene = read_ply(args.ply)
    cams = read_transforms(args.cameras)
    if (args.width is None) != (args.height is None):
        raise NifiError("give both --width and --height, or neither")
    if args.width is not None:
        if args.width <= 0 or args.height <= 0:
            raise NifiError(f"--width/--height must be positive, got {args.width}x{args.height}")
        cams.cameras = [c.resized(args.width, args.height) for c in cams]
    bg = tuple(float(v) for v in args.background.split(","))
    if len(bg) != 3:
        raise NifiError(f"--background wants three comma-separated numbers, got {args.background!r}")
    device = pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = render_views(scene.to(device), cams, background=bg, desc="render")
    for cam, fp, im in zip(cams, cams.file_paths, images):
        name = Path(fp).stem or cam.name
        Image.fromarray(np.asarray(im)).save(out / f"{name}.png")
    print(f"wrote {len(images)} images to {out}")
    return 0


def cmd_run(args) -> int:
    from .run import run_stage

    run_stage(args.stage, args.profile, args.timeout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nifi_utils", description="NiFi lab command line")
    sub = ap.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="render a 3DGS .ply from the cameras of a transforms.json, one PNG per frame")
    r.add_argument("--ply", required=True, help="INRIA-format 3DGS point_cloud.ply")
    r.add_argument("--cameras", required=True, help="NeRF-style transforms.json")
    r.add_argument("--out", required=True, help="output folder for the PNGs")
    r.add_argument("--width", type=int, help="override the image width (intrinsics are scaled)")
    r.add_argument("--height", type=int, help="override the image height")
    r.add_argument("--background", default="0,0,0", help="background RGB in [0,1], e.g. 1,1,1")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.set_defaults(fn=cmd_render)

    s = sub.add_parser("run", help="run one pipeline stage through papermill (same as python -m nifi_utils.run)")
    s.add_argument("stage")
    s.add_argument("--profile", choices=["cpu", "tiny", "paper"])
    s.add_argument("--timeout", type=int, default=3600)
    s.set_defaults(fn=cmd_run)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except NifiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
