"""The command line, `python -m nifi_utils <command>`.

User mistakes (missing file, malformed .ply or cameras, bad sizes, an output path that cannot be
written) end with one `error:` line and exit status 2; nothing is written before the inputs are
validated. Every `--out` is checked before any expensive work (`outputs.check_out_file`/`check_out_dir`)
and written all-or-nothing (`outputs.staged`): a command that fails leaves no partial file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nifi_utils.core.common import NifiError
from nifi_utils.core.facts import OFFICIAL_T0
from nifi_utils.core.outputs import check_out_dir, check_out_file, staged


def cmd_render(args) -> int:
    import numpy as np
    from PIL import Image

    from nifi_utils.gs.cameras import read_transforms
    from nifi_utils.core.common import pick_device
    from nifi_utils.gs.gaussians import read_ply
    from nifi_utils.gs.scenes import render_views

    out = check_out_dir(args.out)
    scene = read_ply(args.ply)
    cams = read_transforms(args.cameras)
    if (args.width is None) != (args.height is None):
        raise NifiError("give both --width and --height, or neither")
    if args.width is not None:
        if args.width <= 0 or args.height <= 0:
            raise NifiError(f"--width/--height must be positive, got {args.width}x{args.height}")
        cams.cameras = [c.resized(args.width, args.height) for c in cams]
    bg = _background(args.background)
    device = pick_device(args.device)
    images = render_views(scene.to(device), cams, background=bg, desc="render")
    with staged() as st:
        st.folder(out)
        for cam, fp, im in zip(cams, cams.file_paths, images):
            name = Path(fp).stem or cam.name
            st.write(out / f"{name}.png", lambda tmp, im=im: Image.fromarray(np.asarray(im)).save(tmp))
    print(f"wrote {len(images)} images to {out}")
    return 0


def _load_view_images(cams, images_dir: Path):
    from nifi_utils.core.images import read_rgb

    if not images_dir.is_dir():
        raise NifiError(f"--images folder not found: {images_dir}")
    out = []
    for fp in cams.file_paths:
        p = images_dir / Path(fp).name
        if not p.is_file():
            cands = sorted(images_dir.glob(Path(fp).stem + ".*"))
            if not cands:
                raise NifiError(f"no image for frame {fp!r} in {images_dir}")
            p = cands[0]
        out.append(read_rgb(p))
    for cam, im in zip(cams, out):
        if im.shape[:2] != (cam.height, cam.width):
            raise NifiError(f"image {im.shape[1]}x{im.shape[0]} does not match its camera {cam.width}x{cam.height}")
    return out


def cmd_compress(args) -> int:
    import time

    from nifi_utils.codec import container as codec
    from nifi_utils.gs.cameras import read_transforms
    from nifi_utils.core.common import pick_device
    from nifi_utils.gs.gaussians import read_ply
    from nifi_utils.codec.levels import FinetuneConfig, finetune_levels, gradient_scores, opacity_volume_scores, prune_levels

    if (args.cameras is None) != (args.images is None):
        raise NifiError("give both --cameras and --images (gradient pruning + fine-tuning), or neither")
    if not args.out.endswith(".nifi"):
        raise NifiError(f"--out should end with .nifi, got {args.out!r}")
    check_out_file(args.out)
    device = pick_device(args.device)
    scene = read_ply(args.ply).to(device)
    if not 1 <= args.gaussians <= len(scene):
        raise NifiError(f"--gaussians must be between 1 and the scene's {len(scene)} Gaussians, got {args.gaussians}")
    deg = scene.sh_degree if args.sh_degree is None else args.sh_degree
    if not 0 <= deg <= scene.sh_degree:
        raise NifiError(f"--sh-degree must be between 0 and the scene's degree {scene.sh_degree}, got {deg}")
    bg = _background(args.background)
    t0 = time.time()
    if args.cameras:
        cams = read_transforms(args.cameras)
        images = _load_view_images(cams, Path(args.images))
        levels = prune_levels(scene, [args.gaussians], lambda s: gradient_scores(s, list(cams), images, bg))
        cfg = FinetuneConfig(steps=args.finetune_steps, bits=args.bits, pos_bits=args.pos_bits)
        (scene,), _ = finetune_levels(scene, levels, [deg], list(cams), images, bg, cfg)
    else:
        scene = scene.subset(prune_levels(scene, [args.gaussians], opacity_volume_scores)[0])
    enc = codec.encode_scene(scene, sh_degree=deg, bits=args.bits, pos_bits=args.pos_bits)
    with staged() as st:
        st.write(args.out, lambda tmp: tmp.write_bytes(enc.data))
    ply_bytes = Path(args.ply).stat().st_size
    print(f"wrote {args.out}: {len(scene)} Gaussians, {enc.nbytes} bytes ({enc.nbytes / 1e6:.4f} MB, "
          f"{ply_bytes / enc.nbytes:.0f}x smaller than the .ply), {time.time() - t0:.1f} s")
    return 0


def cmd_decompress(args) -> int:
    from nifi_utils.codec import container as codec

    if args.refine:
        return _refine(args)
    check_out_file(args.out)
    scene, head = codec.load(args.input)
    with staged() as st:
        st.write(args.out, scene.save_ply)
    print(f"wrote {args.out}: {head['n_gaussians']} Gaussians, SH degree {head['sh_degree']}")
    return 0


def _refine(args) -> int:
    """`decompress --refine`: NiFi-3D at the receiver (nifi_utils.models.refine), settings from the profile's refine section."""
    import time

    from nifi_utils.core.common import pick_device, repo_path
    from nifi_utils.pipeline.params import stage_params
    from nifi_utils.models.refine import RefineConfig, refine_file
    from nifi_utils.models.restorer import checkpoint_meta

    out = Path(args.out)
    if out.suffix.lower() != ".ply":
        raise NifiError(f"--out must be a .ply file, got {out}")
    check_out_file(out)  # refine_file writes it atomically, minutes from now
    over = dict(stage_params("refine", args.profile)["config"])
    if args.steps is not None:
        over["steps_per_round"] = args.steps
    if args.rounds is not None:
        over["rounds"] = args.rounds
    if args.up:
        over["up"] = list(_background(args.up, "--up"))
    if args.background:
        over["background"] = list(_background(args.background))
    base = repo_path(args.base_model)
    ckpt = repo_path(args.ckpt) if args.ckpt else (repo_path(DEFAULT_CKPT) if args.base_model == DEFAULT_BASE else None)
    if ckpt is None:
        raise NifiError("--refine with another --base-model needs --ckpt (the restorer LoRA distilled from that prior)")
    # the checkpoint's own t0 and latent mode unless --t0 says
    use = _restore_settings(checkpoint_meta(ckpt) if ckpt.is_file() else {}, args.t0, None)
    cfg = RefineConfig.from_params({**over, "t0": use["t0"], "latent": "sample" if use["sample"] else "mean",
                                    "seed": args.seed})
    device = pick_device(args.device)
    t_start = time.time()
    rep = refine_file(args.input, out, base, ckpt, cfg, device=device, desc=Path(args.input).name)
    print(f"wrote {out}: {rep['n_decoded']} decoded -> {rep['n_refined']} refined Gaussians "
          f"({rep['n_cameras']} synthesised cameras, {cfg.rounds} x {cfg.steps_per_round} steps, "
          f"loss {rep['loss'][0]:.4f} -> {rep['loss'][-1]:.4f}), {time.time() - t_start:.1f} s on {device}")
    return 0


def _background(text: str, flag: str = "--background") -> tuple:
    try:
        bg = tuple(float(v) for v in text.split(","))
    except ValueError:
        bg = ()
    if len(bg) != 3:
        raise NifiError(f"{flag} wants three comma-separated numbers, got {text!r}")
    return bg


def cmd_synthesize(args) -> int:
    from nifi_utils.core.common import repo_path
    from nifi_utils.pipeline.params import stage_params
    from nifi_utils.pipeline.synthesis import SynthesisConfig, synthesize

    p = stage_params("synthesis", args.profile)
    cfg = SynthesisConfig.from_params(p)
    scenes, data = repo_path("data", p["profile"], "scenes"), repo_path("data", p["profile"])
    if not scenes.is_dir():
        raise NifiError(f"no scenes folder at {scenes} (run the scenes stage first: python -m nifi_utils run scenes)")
    for sub in ("bitstreams", "pairs", "renders", "records"):  # what synthesize writes, checked before hours of work
        check_out_dir(data / sub, flag="synthesis output")
    dirs = sorted(d for d in scenes.iterdir() if d.is_dir())
    recs = synthesize(dirs, data, cfg, p["seed"], args.shard, args.device)
    print(f"synthesized {len(recs)} scenes (shard {args.shard})")
    return 0


DEFAULT_BASE = "data/cpu/prior"
DEFAULT_CKPT = "data/cpu/restorer/nifi.pt"
DEFAULT_REGRESSION = "data/cpu/restorer/regression.pt"


def _parse_t0(text):
    try:
        t0 = None if str(text).lower() in ("none", "null") else float(text)
    except ValueError:
        raise NifiError(f"--t0 must be a number in [0, 1000] or 'none', got {text!r}") from None
    if t0 is not None and not 0 <= t0 <= 1000:
        raise NifiError(f"--t0 must be in [0, 1000] or 'none', got {text}")
    return t0


def _restore_settings(meta: dict, t0_arg, latent_arg) -> dict:
    """{'t0', 'sample'}: the checkpoint's own (`restorer.restore_settings`), overridden by --t0 / --latent where given."""
    from nifi_utils.models.restorer import restore_settings

    return restore_settings(meta, ... if t0_arg is None else _parse_t0(t0_arg), latent_arg)


def cmd_restore(args) -> int:
    import time

    import torch

    from nifi_utils.core.common import pick_device, repo_path
    from nifi_utils.models.restorer import DTYPES, IMAGE_SUFFIXES, Restorer, read_image, write_image

    lq, out = Path(args.lq), Path(args.out)
    if lq.is_dir():
        inputs = sorted(p for p in lq.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not inputs:
            raise NifiError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {lq}")
        if out.suffix:
            raise NifiError(f"--lq is a folder, so --out must be a folder too, got {out}")
        check_out_dir(out)
        targets = [out / (p.stem + ".png") for p in inputs]
    elif lq.is_file():
        to_folder = out.is_dir() or not out.suffix
        if to_folder:
            check_out_dir(out)
        inputs, targets = [lq], [out / (lq.stem + ".png") if to_folder else check_out_file(out)]
    else:
        raise NifiError(f"--lq not found: {lq}")
    if targets[0].suffix.lower() not in IMAGE_SUFFIXES:
        raise NifiError(f"--out {out}: {targets[0].suffix!r} is not an image type this can write "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    if args.dtype not in DTYPES:
        raise NifiError(f"--dtype must be one of {sorted(set(DTYPES))}, got {args.dtype!r}")
    if args.t0 is not None:
        _parse_t0(args.t0)
    if args.tile is not None and args.tile < 2:
        raise NifiError(f"--tile is a latent tile size in pixels (>= 2), got {args.tile}")
    device = pick_device(args.device)
    if args.method == "regression":
        return _restore_regression(args, inputs, targets, device)
    base = repo_path(args.base_model)
    r = Restorer.from_pretrained(base, args.embeddings, device=device, dtype=DTYPES[args.dtype])
    no_lora = args.ckpt is not None and args.ckpt.lower() == "none"  # before repo_path makes it <repo>/none
    ckpt = repo_path(args.ckpt) if args.ckpt and not no_lora else None
    if ckpt is None and not no_lora and args.base_model == DEFAULT_BASE:
        ckpt = repo_path(DEFAULT_CKPT)
    if ckpt is not None:
        if not ckpt.is_file():
            raise NifiError(f"restorer checkpoint not found: {ckpt} (run the pipeline's distill stage, or pass "
                            f"--ckpt FILE; --ckpt none runs the prior without LoRA)")
        r.load_lora(ckpt)
    r.to(device, DTYPES[args.dtype])
    use = _restore_settings(r.meta, args.t0, args.latent)  # the loaded checkpoint's "nifi" entry ({} if none)
    images = [read_image(p) for p in inputs]  # validate every input before writing anything
    t_start = time.time()
    with staged() as st:  # every image appears at the end, or none (a failure half way leaves no partial set)
        for (img, info), dst in zip(images, targets):
            with torch.no_grad():
                res = r.restore(img, t0=use["t0"], seed=args.seed, tile=args.tile, sample=use["sample"])
            st.write(dst, lambda tmp, res=res, info=info: write_image(tmp, res, info))
    print(f"restored {len(images)} image(s) -> {targets[0] if len(targets) == 1 else out} "
          f"({(time.time() - t_start) / len(images) * 1000:.0f} ms/image, {device}, {args.dtype}, t0 {use['t0']}, "
          f"latent {'sample' if use['sample'] else 'mean'})")
    return 0


def _restore_regression(args, inputs: list, targets: list, device) -> int:
    """`restore --method regression`: the regression baseline the distill stage trains (no prior needed)."""
    import time

    from nifi_utils.core.common import repo_path
    from nifi_utils.models.regression import load_regression
    from nifi_utils.models.restorer import read_image, write_image

    if args.t0 is not None or args.latent is not None or args.tile is not None:
        raise NifiError("--t0, --latent and --tile are settings of the diffusion restorer, not of --method regression")
    model = load_regression(repo_path(args.ckpt or DEFAULT_REGRESSION), device)
    images = [read_image(p) for p in inputs]
    t_start = time.time()
    with staged() as st:
        for (img, info), dst in zip(images, targets):
            res = model.restore(img)
            st.write(dst, lambda tmp, res=res, info=info: write_image(tmp, res, info))
    print(f"restored {len(images)} image(s) with the regression baseline -> {targets[0] if len(targets) == 1 else args.out} "
          f"({(time.time() - t_start) / len(images) * 1000:.0f} ms/image, {device})")
    return 0


def cmd_run(args) -> int:
    from nifi_utils.pipeline.run import run_stage

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

    c = sub.add_parser("compress", help="prune + quantize + entropy-code a 3DGS .ply into a .nifi bitstream")
    c.add_argument("--ply", required=True, help="INRIA-format 3DGS point_cloud.ply")
    c.add_argument("--cameras", help="transforms.json of training views (enables gradient pruning + fine-tuning)")
    c.add_argument("--images", help="folder with the training images named as in --cameras")
    c.add_argument("--gaussians", type=int, required=True, help="number of Gaussians to keep")
    c.add_argument("--out", required=True, help="output .nifi file")
    c.add_argument("--bits", type=int, default=8, help="bits per attribute channel (default 8)")
    c.add_argument("--pos-bits", type=int, default=12, help="bits per position coordinate (default 12)")
    c.add_argument("--sh-degree", type=int, help="SH degree to keep (default: the scene's)")
    c.add_argument("--finetune-steps", type=int, default=200, help="QAT fine-tuning steps with --cameras (default 200)")
    c.add_argument("--background", default="0,0,0", help="background RGB of the training images")
    c.add_argument("--device", default="auto", help="auto, cpu or cuda")
    c.set_defaults(fn=cmd_compress)

    d = sub.add_parser("decompress", help="decode a .nifi bitstream into an INRIA-format .ply")
    d.add_argument("input", help=".nifi file")
    d.add_argument("--out", required=True, help="output .ply")
    d.add_argument("--refine", action="store_true",
                   help="NiFi-3D: restore renders around the content and bake them into the Gaussians (a few minutes on CPU)")
    d.add_argument("--base-model", default=DEFAULT_BASE, help=f"with --refine: the prior (default {DEFAULT_BASE})")
    d.add_argument("--ckpt", help=f"with --refine: restorer LoRA (default with the default base: {DEFAULT_CKPT})")
    d.add_argument("--profile", default="cpu", choices=["cpu", "tiny", "paper"],
                   help="with --refine: whose refine settings to use (default cpu)")
    d.add_argument("--steps", type=int, help="with --refine: fitting steps per round (default: the profile's)")
    d.add_argument("--rounds", type=int, help="with --refine: render-restore-fit rounds (default: the profile's)")
    d.add_argument("--up", help="with --refine: the scene's up axis x,y,z (default: estimated from the Gaussians)")
    d.add_argument("--background", help="with --refine: background colour r,g,b in [0,1] (default: the profile's)")
    d.add_argument("--t0", help="with --refine: the restorer's start timestep (default: the checkpoint's; 'none': w/o t0)")
    d.add_argument("--seed", type=int, default=0, help="with --refine: seed")
    d.add_argument("--device", default="auto", help="with --refine: auto, cpu or cuda")
    d.set_defaults(fn=cmd_decompress)

    y = sub.add_parser("synthesize", help="artifact synthesis for a shard of the scenes (params.yaml: synthesis)")
    y.add_argument("--profile", choices=["cpu", "tiny", "paper"])
    y.add_argument("--shard", default="0/1", help="k/n: scenes i with i %% n == k, the scenes of rank k of n under "
                   "`accelerate launch` (the stage's `processes` > 1 launches the ranks itself)")
    y.add_argument("--device", default="auto")
    y.set_defaults(fn=cmd_synthesize)

    rs = sub.add_parser("restore", help="restore a compressed render (or a folder of them) in one step (NiFi)")
    rs.add_argument("--lq", required=True, help="degraded image, or a folder of images")
    rs.add_argument("--out", required=True, help="output image (or folder)")
    rs.add_argument("--base-model", default=DEFAULT_BASE,
                    help=f"prior folder in SD3's diffusers layout (default {DEFAULT_BASE}; or an SD3-medium folder)")
    rs.add_argument("--method", choices=["nifi", "regression"], default="nifi",
                    help="nifi (the one-step diffusion restorer, default) or regression (the baseline U-Net)")
    rs.add_argument("--ckpt", help=f"restorer LoRA checkpoint {{'vae','transformer'}} (default with the default "
                                   f"base: {DEFAULT_CKPT}; 'none' = no LoRA; --method regression: {DEFAULT_REGRESSION})")
    rs.add_argument("--embeddings", help="prompt embeddings .npz (default: <base-model>/embeddings/default.npz)")
    rs.add_argument("--t0", help=f"start timestep (default: the checkpoint's, {OFFICIAL_T0} for a file that does not say); "
                                 "'none' = the w/o-t0 variant")
    rs.add_argument("--latent", choices=["sample", "mean"],
                    help="encode with a posterior sample or its mean (default: the checkpoint's, sample if it does not say)")
    rs.add_argument("--device", default="auto", help="auto, cpu or cuda")
    rs.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (official default on GPU: bf16)")
    rs.add_argument("--seed", type=int, default=0, help="seed of the posterior and t0 noise")
    rs.add_argument("--tile", type=int, help="latent tile size for large images (e.g. 32)")
    rs.set_defaults(fn=cmd_restore)

    from nifi_utils.eval.viewer import add_view_command  # `view`: an offline HTML viewer; its logic lives in viewer.py

    add_view_command(sub)

    s = sub.add_parser("run", help="run one pipeline stage through papermill (same as python -m nifi_utils.pipeline.run)")
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
