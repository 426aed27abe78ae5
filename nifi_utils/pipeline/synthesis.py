"""The `synthesis` stage's per-scene work (codec + renders + metrics), also the CLI's.

For a scene folder of the `scenes` stage: prune to L nested levels, fine-tune them (QAT), write
each level as a `.nifi` bitstream, decode it, and render from the *decoded* scene:
- training scenes: (degraded, clean) pairs for every training view and level
  (`pairs/<scene>/level<l>/<view>.png`, clean images in `pairs/<scene>/clean/`);
- every scene: the test views at each level, the uncompressed 3DGS and the ground truth
  (`renders/<scene>/{level<l>,uncompressed,gt}/<view>.png`), scored with PSNR and ST-LPIPS.
Scenes are independent: `synthesize_ranks` runs them on N ranks through `accelerate launch` (rank r of n takes
scenes i with i % n == r, the assignment `shard_of` also gives the CLI's `--shard r/n`); the main process gathers
the per-scene records.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from nifi_utils.codec import container as codec
from nifi_utils.core.common import NifiError, progress
from nifi_utils.codec.levels import (FinetuneConfig, finetune_levels, gradient_scores, level_sizes, opacity_volume_scores,
                     prune_levels)
from nifi_utils.core.images import read_rgb, write_rgb
from nifi_utils.gs.scenes import load_scene_folder

OUTPUT_DIRS = ("bitstreams", "pairs", "renders", "records")  # what synthesize_scene writes under data_root


@dataclass
class SynthesisConfig:
    n_levels: int = 3
    c_min: int = 512
    n_max: float = 0.85  # int count, or a fraction of the scene's Gaussians if <= 1
    sh_degrees: list = field(default_factory=lambda: [0, 0, 0])
    scoring: str = "gradient"  # gradient | opacity_volume
    score_views: int = 0  # training views the gradient scores accumulate over, evenly spaced (0: all)
    bits: int = 8
    pos_bits: int = 12
    models: list = field(default_factory=lambda: ["categorical", "gaussian", "laplace"])
    finetune: dict = field(default_factory=dict)  # FinetuneConfig fields
    background: list = field(default_factory=lambda: [0.62, 0.70, 0.80])
    # codec anchors on every evaluation scene's decoded levels: splat-transform formats (spz, sog,
    # compressed.ply; LZMA/zstd on our symbols come with them); [] = none
    anchors: list = field(default_factory=list)

    @classmethod
    def from_params(cls, p: dict) -> "SynthesisConfig":
        """Build from the flat `synthesis` section of params.yaml (unknown keys ignored)."""
        ft = {k: p[f"finetune_{k}" if k in ("steps", "qat", "shared") else k]
              for k in ("steps", "qat", "shared", "level_sampling", "lr_means", "lr_quats", "lr_scales", "lr_opacity", "lr_sh", "lambda_dssim")
              if (f"finetune_{k}" if k in ("steps", "qat", "shared") else k) in p}
        keys = ("n_levels", "c_min", "n_max", "sh_degrees", "scoring", "score_views", "bits", "pos_bits", "background",
                "anchors")
        kw = {k: p[k] for k in keys if k in p}
        if "entropy_models" in p:
            kw["models"] = list(p["entropy_models"])
        return cls(**kw, finetune=ft)

    def __post_init__(self):
        if len(self.sh_degrees) != self.n_levels:
            raise NifiError(f"sh_degrees has {len(self.sh_degrees)} entries for {self.n_levels} levels")
        if self.scoring not in ("gradient", "opacity_volume"):
            raise NifiError(f"scoring must be 'gradient' or 'opacity_volume', got {self.scoring!r}")


def shard_of(items: list, shard: str) -> list:
    """Items i with i % n == k for shard 'k/n'."""
    try:
        k, n = (int(v) for v in str(shard).split("/"))
        assert n >= 1 and 0 <= k < n
    except (ValueError, AssertionError):
        raise NifiError(f"shard must look like 'k/n' with 0 <= k < n, got {shard!r}") from None
    return [it for i, it in enumerate(items) if i % n == k]


def scene_folders(scenes_root: Path) -> list[Path]:
    """The scene folders of the `scenes` stage, sorted; none is one NifiError line."""
    scenes_root = Path(scenes_root)
    dirs = sorted(d for d in scenes_root.iterdir() if d.is_dir()) if scenes_root.is_dir() else []
    if not dirs:
        raise NifiError(f"no scenes in {scenes_root}: run the scenes stage first")
    return dirs


def clear_outputs(data_root: Path) -> None:
    """Remove what `synthesize_scene` writes under `data_root` (two runs' outputs never mix)."""
    for sub in OUTPUT_DIRS:
        shutil.rmtree(Path(data_root) / sub, ignore_errors=True)


def load_images(folder: Path, cams) -> list[np.ndarray]:
    """The ground-truth views a scene's transforms.json lists, uint8 HxWx3."""
    out = []
    for fp in cams.file_paths:
        p = folder / fp
        if not p.is_file():
            raise NifiError(f"image {p} listed in transforms.json is missing")
        out.append(read_rgb(p))
    return out


def render_uint8(scene, cams, background) -> list[np.ndarray]:
    """Render at the cameras' own size, uint8 (exactly what `python -m nifi_utils render` writes)."""
    from nifi_utils.gs.scenes import render_views

    return render_views(scene, cams, supersample=1, background=tuple(background), desc="render")


def synthesize_scene(scene_dir: str | Path, data_root: str | Path, cfg: SynthesisConfig, seed: int = 0,
                     device: str | torch.device = "cpu") -> dict:
    """Run the codec on one scene folder; write bitstreams, pairs and renders under `data_root`."""
    from nifi_utils.measure.metrics import lpips, lpips_available, psnr, stlpips

    scene_dir, data_root = Path(scene_dir), Path(data_root)
    name = scene_dir.name
    meta = json.loads((scene_dir / "transforms.json").read_text())
    split = meta.get("split", "eval")
    scene, cams = load_scene_folder(scene_dir)
    scene = scene.to(device)
    images = load_images(scene_dir, cams)
    train_ids, test_ids = meta["train_ids"], meta["test_ids"]
    tcams, timgs = [cams[i] for i in train_ids], [images[i] for i in train_ids]
    bg = tuple(cfg.background)
    timings = {}

    t = time.time()
    sizes = level_sizes(len(scene), cfg.c_min, cfg.n_levels, cfg.n_max)
    if cfg.scoring == "gradient":
        # GoDe sums the gradients over every training view; an evenly spaced subset ranks the Gaussians
        # almost the same at a fraction of the cost (the first round renders the full scene per view)
        pick = (np.linspace(0, len(tcams) - 1, cfg.score_views).round().astype(int).tolist()
                if 0 < cfg.score_views < len(tcams) else list(range(len(tcams))))
        scams, simgs = [tcams[i] for i in pick], [timgs[i] for i in pick]
        scorer = lambda s: gradient_scores(s, scams, simgs, bg, desc=f"{name} scores")  # noqa: E731
    else:
        scorer = opacity_volume_scores
    levels = prune_levels(scene, sizes, scorer)
    timings["prune_s"] = time.time() - t
    t = time.time()
    ft = FinetuneConfig(**{**cfg.finetune, "bits": cfg.bits, "pos_bits": cfg.pos_bits})
    level_scenes, history = finetune_levels(scene, levels, cfg.sh_degrees, tcams, timgs, bg, ft, seed=seed,
                                          desc=f"{name} finetune")
    timings["finetune_s"] = time.time() - t

    ply_bytes = (scene_dir / "point_cloud.ply").stat().st_size
    test_cams = [cams[i] for i in test_ids]
    view = lambda i: Path(cams.file_paths[i]).stem  # noqa: E731
    out_r = data_root / "renders" / name
    if out_r.exists():
        shutil.rmtree(out_r)
    for i in test_ids:
        write_rgb(out_r / "gt" / f"{view(i)}.png", images[i])
    unc = render_uint8(scene, test_cams, bg)
    for i, im in zip(test_ids, unc):
        write_rgb(out_r / "uncompressed" / f"{view(i)}.png", im)
    gts = [images[i] for i in test_ids]
    record = {"scene": name, "split": split, "n_gaussians": len(scene), "ply_bytes": ply_bytes,
              "uncompressed": {"psnr": float(np.mean([psnr(a, b) for a, b in zip(unc, gts)])),
                               "stlpips_alex": float(np.mean([float(stlpips(a, b)) for a, b in zip(unc, gts)]))},
              "levels": [], "finetune_loss": [h[1] for h in history], "timings": timings}
    if split == "train":
        for i in train_ids:
            write_rgb(data_root / "pairs" / name / "clean" / f"{view(i)}.png", images[i])
    for l, sub in enumerate(level_scenes):
        t = time.time()
        enc = codec.encode_scene(sub, sh_degree=cfg.sh_degrees[l], bits=cfg.bits, pos_bits=cfg.pos_bits,
                                 level=l, models=tuple(cfg.models))
        t_enc = time.time() - t
        path = enc.save(data_root / "bitstreams" / name / f"level{l}.nifi")
        t = time.time()
        dec, _ = codec.load(path)
        t_dec = time.time() - t
        dec = dec.to(device)
        rend = render_uint8(dec, test_cams, bg)
        for i, im in zip(test_ids, rend):
            write_rgb(out_r / f"level{l}" / f"{view(i)}.png", im)
        if split == "train":
            for i, im in zip(train_ids, render_uint8(dec, tcams, bg)):
                write_rgb(data_root / "pairs" / name / f"level{l}" / f"{view(i)}.png", im)
        rec = {"level": l, "n_gaussians": len(sub), "sh_degree": cfg.sh_degrees[l],
               **codec.size_report(path.stat().st_size, ply_bytes),
               "psnr": float(np.mean([psnr(a, b) for a, b in zip(rend, gts)])),
               "stlpips_alex": float(np.mean([float(stlpips(a, b)) for a, b in zip(rend, gts)])),
               **({"lpips_alex": float(np.mean([float(lpips(a, b)) for a, b in zip(rend, gts)]))}
                  if lpips_available("alex") else {}),
               "encode_s": t_enc, "decode_s": t_dec,
               "ratio_to_entropy_bound": enc.stats["ratio_to_entropy_bound"],
               "payload_bytes": enc.stats["payload_bytes"], "side_bytes": enc.stats["side_bytes"],
               "bits_per_gaussian": enc.stats["bits_per_gaussian"], "models": enc.stats["models"]}
        if split == "eval" and cfg.anchors:
            from nifi_utils.eval.anchors import codec_anchors

            # the same decoded Gaussians stored by the ecosystem's formats and by general-purpose compressors
            rec["anchors"] = codec_anchors(dec.to("cpu"), cfg.sh_degrees[l], cfg.bits, cfg.pos_bits, cameras=test_cams,
                                           background=bg, gt_images=gts, formats=tuple(cfg.anchors))
        record["levels"].append(rec)
    record["config"] = asdict(cfg)
    (data_root / "records").mkdir(parents=True, exist_ok=True)
    (data_root / "records" / f"{name}.json").write_text(json.dumps(record, indent=1))
    return record


def _bitstream_bytes(path: Path) -> int:
    """A codec's output size: a file's bytes, or the bytes of every file under a folder (e.g. HAC++'s bitstreams/)."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def import_external_codec(entry: dict, data_root: Path, records: list[dict]) -> dict:
    """Another codec's test-view renders of one scene at one rate, copied next to ours
    (`renders/<scene>/external_<name>_<rate>/`) and scored against the ground truth as ours are; its record.

    `entry`: `{name, scene, rate, folder, bytes}` or `{..., bitstreams}` (the codec's output file or folder, whose
    size is the rate); `folder` (and `bitstreams`) relative to the repository root or absolute, one PNG per test
    view named like the files in `renders/<scene>/gt/`. Everything is checked before anything is written: a
    problem is one NifiError line naming the entry."""
    from nifi_utils.core.common import repo_path
    from nifi_utils.measure.metrics import psnr, stlpips

    missing = [k for k in ("name", "scene", "rate", "folder") if k not in entry]
    if missing:
        raise NifiError(f"external codec entry {entry} lacks {', '.join(map(repr, missing))} "
                        f"(needs name, scene, rate, folder and bytes or bitstreams)")
    name, scene, rate = entry["name"], entry["scene"], entry["rate"]
    data_root = Path(data_root)
    gt_dir = data_root / "renders" / scene / "gt"
    rec = next((r for r in records if r["scene"] == scene), None)
    if rec is None or not gt_dir.is_dir():
        raise NifiError(f"external codec {name}: scene {scene!r} is not a scene of this profile")
    src = repo_path(entry["folder"])
    if not src.is_dir():
        raise NifiError(f"external codec {name}: folder {src} not found")
    if entry.get("bitstreams"):
        bs = repo_path(entry["bitstreams"])
        if not bs.exists():
            raise NifiError(f"external codec {name}: bitstreams {bs} not found")
        nbytes = _bitstream_bytes(bs)
    else:
        try:
            nbytes = int(entry.get("bytes", 0))
        except (TypeError, ValueError):
            nbytes = 0
    if nbytes <= 0:
        raise NifiError(f"external codec {name}: give `bytes` (the bitstream size) or `bitstreams` (its path)")
    gt_files = sorted(gt_dir.glob("*.png"))
    if not gt_files:
        raise NifiError(f"external codec {name}: no ground-truth test views in {gt_dir} (run the synthesis stage)")
    pairs = []
    for gt_file in gt_files:
        cand = src / gt_file.name
        if not cand.is_file():
            raise NifiError(f"external codec {name}: {cand} missing (one PNG per test view)")
        im, gt = read_rgb(cand), read_rgb(gt_file)
        if im.shape != gt.shape:
            raise NifiError(f"external codec {name}: {cand.name} is {im.shape}, GT is {gt.shape}")
        pairs.append((gt_file.name, im, gt))
    dst = data_root / "renders" / scene / f"external_{name}_{rate}"
    ps, ls = [], []
    for fname, im, gt in pairs:
        write_rgb(dst / fname, im)
        ps.append(psnr(im, gt))
        ls.append(float(stlpips(im, gt)))
    return {"name": name, "scene": scene, "rate": rate, "bytes": nbytes, "MB": nbytes / 1e6, "MiB": nbytes / 2**20,
            "ratio_to_ply": rec["ply_bytes"] / nbytes, "psnr": float(np.mean(ps)), "stlpips_alex": float(np.mean(ls)),
            "folder": str(dst.relative_to(data_root))}


def synthesize(scene_dirs: list[Path], data_root: Path, cfg: SynthesisConfig, seed: int, shard: str = "0/1",
               device="cpu") -> list[dict]:
    return [synthesize_scene(d, data_root, cfg, seed, device) for d in progress(shard_of(scene_dirs, shard),
                                                                                desc="synthesis")]


def synthesize_ranks(scene_dirs: list[Path], data_root: Path, cfg: SynthesisConfig, seed: int,
                     processes: int) -> list[dict]:
    """`synthesize` over `processes` ranks through `accelerate launch` (one torch thread each on CPU); the records
    in the order of `scene_dirs`. A rank's error is one NifiError naming the rank and the scene, and the partial
    outputs are removed (DVC must not take them for the stage's results)."""
    from nifi_utils.core.launch import launch

    job = {"scene_dirs": [str(d) for d in scene_dirs], "data_root": str(data_root), "cfg": cfg, "seed": seed}
    try:
        recs = launch("nifi_utils.pipeline.synthesis", job, processes, what="scene")
    except NifiError:
        clear_outputs(data_root)
        raise
    by_name = {r["scene"]: r for r in recs}
    return [by_name[Path(d).name] for d in scene_dirs]


def rank_main(argv: list[str] | None = None) -> int:
    """One rank of `synthesize_ranks`: `python -m nifi_utils.pipeline.synthesis JOB.pkl RECORDS.pkl` under `accelerate launch`."""
    import sys

    from accelerate import PartialState
    from accelerate.utils import gather_object

    from nifi_utils.core.launch import finish_rank, rank_jobs, run_rank_jobs

    job_path, out_path = argv if argv is not None else sys.argv[1:]
    state = PartialState(cpu=not torch.cuda.is_available())
    job = rank_jobs(state, job_path)
    mine = shard_of(job["scene_dirs"], f"{state.process_index}/{state.num_processes}")
    recs = run_rank_jobs(state.process_index, progress(mine, desc=f"synthesis rank {state.process_index}"),
                         lambda d: synthesize_scene(d, job["data_root"], job["cfg"], job["seed"], state.device),
                         lambda d: Path(d).name, "scene")
    return finish_rank(state, out_path, gather_object(recs))  # every rank's records, gathered


if __name__ == "__main__":
    import sys

    from nifi_utils.pipeline.synthesis import rank_main as _rank_main  # the package's module, not a second copy as __main__

    sys.exit(_rank_main())
