"""Layer 7 (pipeline): the `cpu` prior's transformer trained on a lent GPU machine, in one call.

The prior stage trains its flow-matching transformer for ~45 min on 2 CPU cores. A GPU machine lent for
a few minutes has no scenes folder, no gsplat renderer and no network, so the training images travel:

    python scripts/prior_gpu.py pack --profile cpu --out .device_carry/prior_corpus      # here
    python scripts/prior_gpu.py wheels --dir .whl --target /tmp/site                     # there
    python scripts/prior_gpu.py train --profile cpu --corpus .device_carry/prior_corpus \\
        --prior data/cpu/prior --out OUT --tar --time-budget-s 330 [--steps --batch --lr --augment-copies]

`pack` builds the prior stage's training images exactly as the stage does (`prior.training_images` with
params.yaml's `prior` section) and stores, losslessly (PNG), the part that needs this machine's data or
renderer: the training scenes' training views and the procedural scenes rendered for the prior alone,
plus the held-out views (for a validation loss) and the training photographs that scikit-image does not
bundle (scikit-learn's). The seeded part (photo crops, textures: `prior.generated_images`) is made again
on the device from the same seed; the manifest's per-image SHA-256 says whether it came out identical.

`train` loads the committed VAE, scheduler and embeddings from `--prior` (copied unchanged, byte for
byte), encodes the latents as the stage does (`encode_latents`, augmented copies), trains a new
transformer from scratch (`build_transformer` after `torch.manual_seed(seed)`) with `train_transformer`
(bf16 autocast on CUDA, cosine decay over steps or time budget, whichever is further along) and writes a
complete prior folder, fp16 as the stage saves it, with `dit_log.json` (what was run, where, the loss
curve, held-out flow losses during training, a held-out one-step denoising check at the end).
The prior stage takes such a folder with `prior_from:` (params.yaml) instead of training.

`wheels` installs the carried wheels the device lacks (missing or older there) with pip --target.
Bad input: one `error:` line and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch

from nifi_utils.core.common import NifiError, repo_path

FORMAT = 1
# params of the prior section that decide the corpus's images: pack and train must agree on them
CORPUS_KEYS = ("seed", "image_size", "n_textures", "n_prior_scenes", "prior_scene_views", "prior_scene_gaussians",
               "n_photo_crops")


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _to_u8(photo: np.ndarray) -> np.ndarray:
    """A `load_photo` image (float32 in [0,1]) as the uint8 it came from; refuses one that is not exactly that."""
    u8 = np.round(photo * 255).astype(np.uint8)
    if not np.array_equal(u8.astype(np.float32) / 255.0, photo):
        raise NifiError("a training photograph is not an 8-bit image: it cannot be stored losslessly as PNG")
    return u8


def _from_u8(u8: np.ndarray) -> np.ndarray:
    """What `scenes.load_photo` returns for an 8-bit RGB source."""
    return np.ascontiguousarray(u8.astype(np.float32) / 255.0)


def stage_config(profile: str):
    """(the profile's prior section with the seed, the PriorConfig the stage builds from it)."""
    from nifi_utils.pipeline.params import stage_params
    from nifi_utils.models.prior import PriorConfig

    p = stage_params("prior", profile)
    if p.get("source", "train") != "train":
        raise NifiError(f"prior (profile {profile}) has source {p.get('source')!r}: only a trained prior (source: train) has a "
                        f"transformer to train")
    names = {f.name for f in fields(PriorConfig)}
    missing = sorted(names - set(p))
    if missing:
        raise NifiError(f"the prior section (profile {profile}) lacks {missing}")
    return p, PriorConfig(**{k: p[k] for k in names})


def _write_png(path: Path, im: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(im).save(path, format="PNG", compress_level=9)


def _read_png(path: Path) -> np.ndarray:
    from nifi_utils.core.images import read_rgb

    return read_rgb(path)


# ---------------------------------------------------------------------- pack (here)
def pack(profile: str, out: Path, scenes_root: Path | None = None) -> dict:
    """Build the stage's training images and store what the device cannot make; returns the manifest."""
    import skimage.data

    from nifi_utils.core.common import provenance
    from nifi_utils.models.prior import training_images
    from nifi_utils.gs.scenes import TRAIN_PHOTOS, load_photo

    p, cfg = stage_config(profile)
    scenes_root = Path(scenes_root) if scenes_root else repo_path("data", profile, "scenes")
    if not scenes_root.is_dir():
        raise NifiError(f"no scenes folder {scenes_root}: run `python -m nifi_utils.pipeline.run scenes --profile {profile}` first")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file())):
        raise NifiError(f"{out} exists and is not a corpus folder: refusing to overwrite it")
    t0 = time.time()
    train, held, corpus = training_images(scenes_root, cfg.n_textures, cfg.image_size, p["seed"], cfg.n_prior_scenes,
                                          cfg.prior_scene_views, cfg.prior_scene_gaussians, cfg.n_photo_crops)
    c = corpus["counts"]
    n_store = c["training_scene_views"] + c["prior_scene_views"]
    if len(train) != n_store + c["photo_crops"] + c["textures"]:
        raise NifiError(f"training_images returned {len(train)} images, its counts say {c}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("train", "held", "photos"):
        (tmp / sub).mkdir(parents=True)
    for i, im in enumerate(train[:n_store]):
        _write_png(tmp / "train" / f"{i:05d}.png", im)
    for i, im in enumerate(held):
        _write_png(tmp / "held" / f"{i:05d}.png", im)
    photos = {}
    for name in TRAIN_PHOTOS:
        u8 = _to_u8(load_photo(name))
        entry = {"sha256": _sha(u8), "file": None}
        if not hasattr(skimage.data, name):  # scikit-learn's photographs: the device has no scikit-learn
            entry["file"] = f"photos/{name}.png"
            _write_png(tmp / entry["file"], u8)
        photos[name] = entry
    # read back: PNG is lossless, check it anyway
    for i, im in enumerate(train[:n_store]):
        if not np.array_equal(_read_png(tmp / "train" / f"{i:05d}.png"), im):
            raise NifiError(f"PNG round trip changed training image {i}")
    manifest = {
        "format": FORMAT, "profile": profile, "params": {k: p[k] for k in CORPUS_KEYS}, "corpus": corpus,
        "stored": n_store, "held_out": len(held), "image_shape": list(train[0].shape),
        "stored_sha256": _sha(np.stack(train[:n_store])),
        "generated": {"n": len(train) - n_store, "sha256": [_sha(im) for im in train[n_store:]]},
        "photos": photos, "seconds": round(time.time() - t0, 1), "provenance": provenance(profile, p["seed"]),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"packed {n_store} stored + {manifest['generated']['n']} regenerated training images, {len(held)} held out, "
          f"{len(manifest['photos'])} photo hashes into {out}: {size / 1e6:.1f} MB ({manifest['seconds']:.0f} s)")
    return manifest


# ---------------------------------------------------------------------- load the corpus (there)
def load_corpus(folder: Path, profile: str, p: dict):
    """(train uint8 images in the stage's order, held-out images, manifest, checks): the stored images read back,
    the seeded ones made again and compared with the manifest's hashes."""
    from nifi_utils.models.prior import generated_images
    from nifi_utils.gs.scenes import TRAIN_PHOTOS, load_photo

    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise NifiError(f"no corpus at {folder} (manifest.json missing): run `python scripts/prior_gpu.py pack` first")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise NifiError(f"{mpath}: not valid JSON ({e})") from None
    if m.get("format") != FORMAT:
        raise NifiError(f"{mpath}: corpus format {m.get('format')!r}, this code reads {FORMAT}: pack it again")
    if m.get("profile") != profile:
        raise NifiError(f"{folder} was packed for profile {m.get('profile')!r}, not {profile!r}")
    want = {k: p[k] for k in CORPUS_KEYS}
    if m.get("params") != want:
        diff = sorted(k for k in want if m.get("params", {}).get(k) != want[k])
        raise NifiError(f"{folder} was packed with other prior.{profile} parameters ({diff}): pack it again")
    files = sorted((folder / "train").glob("*.png"))
    if len(files) != m["stored"]:
        raise NifiError(f"{folder}/train has {len(files)} images, the manifest says {m['stored']}")
    stored = [_read_png(f) for f in files]
    held = [_read_png(f) for f in sorted((folder / "held").glob("*.png"))]
    checks = {"stored_identical": _sha(np.stack(stored)) == m["stored_sha256"]}
    if not checks["stored_identical"]:
        raise NifiError(f"{folder}: the stored images do not match the manifest's hash (damaged copy?)")
    carried = {name: _from_u8(_read_png(folder / e["file"])) for name, e in m["photos"].items() if e["file"]}

    def load(name):
        return carried[name] if name in carried else load_photo(name)

    bad_photos = [n for n in TRAIN_PHOTOS if _sha(np.round(load(n) * 255).astype(np.uint8)) != m["photos"][n]["sha256"]]
    c = m["corpus"]["counts"]
    gen = generated_images(c["photo_crops"], c["textures"], p["image_size"], p["seed"], load)
    gen_bad = sum(_sha(a) != h for a, h in zip(gen, m["generated"]["sha256"]))
    checks.update(photos_differing=bad_photos, generated=len(gen), generated_differing=int(gen_bad))
    if bad_photos or gen_bad:
        print(f"WARNING: {len(bad_photos)} photographs ({bad_photos}) and {gen_bad} of {len(gen)} regenerated images "
              f"differ from this machine's corpus (library versions); training on them anyway", flush=True)
    return stored + gen, held, m, checks


# ---------------------------------------------------------------------- train (there)
def _heldout_check(folder: Path, held: torch.Tensor, t0: int, seed: int, device) -> dict:
    """The stage's one-step-denoising gate, on the saved fp16 folder read back in fp32: VAE round-trip and
    one-step denoising PSNR at t0 (the stage recomputes all gates where it runs)."""
    from nifi_utils.measure.metrics import psnr
    from nifi_utils.models.prior import denoise_from_t0
    from nifi_utils.models.restorer import Restorer

    r = Restorer.from_pretrained(folder, device=device)
    g = torch.Generator().manual_seed(seed)
    _, s0, _ = r.schedule(t0)
    rt, den = [], []
    with torch.no_grad():
        for i in range(0, len(held), 16):
            x = held[i:i + 16].to(device)
            z = r.encode(x, sample=False)
            rt.append(r.decode(z, x.shape[-2:]).clamp(-1, 1).cpu())
            noise = torch.randn(z.shape, generator=g).to(z)
            den.append(r.decode(denoise_from_t0(r, z, t0, noise), x.shape[-2:]).clamp(-1, 1).cpu())
    clean = held * 0.5 + 0.5
    rt, den = torch.cat(rt) * 0.5 + 0.5, torch.cat(den) * 0.5 + 0.5
    vae = float(np.mean([psnr(a[None], b[None]) for a, b in zip(rt, clean)]))
    dn = float(np.mean([psnr(a[None], b[None]) for a, b in zip(den, clean)]))
    return {"t0": t0, "sigma_t0": s0, "n": len(held), "vae_psnr_db": vae, "denoise_t0_psnr_db": dn, "denoise_gap_db": vae - dn}


def train(profile: str, corpus: Path, prior: Path, out: Path, time_budget_s: float, steps: int | None = None,
          batch: int | None = None, lr: float | None = None, augment_copies: int | None = None, tar: bool = False,
          device: str = "auto", val_every: int = 250, t0: int = 199) -> dict:
    from diffusers import __version__ as diffusers_version

    from nifi_utils.core.common import pick_device
    from nifi_utils.models.prior import build_transformer, encode_latents, prompt_embeddings, to_pm1, train_transformer
    from nifi_utils.models.restorer import Restorer

    t_all = time.time()
    p, cfg = stage_config(profile)
    for name, v in (("--steps", steps), ("--batch", batch), ("--augment-copies", augment_copies)):
        if v is not None and v < 1:
            raise NifiError(f"{name} must be at least 1, got {v}")
    if lr is not None and not lr > 0:
        raise NifiError(f"--lr must be positive, got {lr}")
    if not time_budget_s > 0:
        raise NifiError(f"--time-budget-s must be positive, got {time_budget_s}")
    prior, out = Path(prior), Path(out)
    for sub in ("vae", "transformer", "scheduler", "embeddings"):
        if not (prior / sub).is_dir():
            raise NifiError(f"{prior} is not a prior folder ({sub}/ missing)")
    if out.resolve() == prior.resolve() or prior.resolve() in out.resolve().parents:
        raise NifiError(f"--out {out} would overwrite the prior it starts from ({prior})")
    if not tar and out.exists() and any(out.iterdir()):
        raise NifiError(f"--out {out} exists and is not empty")
    dev = pick_device(device)
    cfg = replace(cfg, dit_steps=steps or cfg.dit_steps, dit_batch=batch or cfg.dit_batch, dit_lr=lr or cfg.dit_lr,
                  augment_copies=augment_copies or cfg.augment_copies)
    seed = p["seed"]
    train_imgs, held_imgs, manifest, checks = load_corpus(corpus, profile, p)
    if not held_imgs:
        raise NifiError(f"{corpus} has no held-out images (training scenes' test views): pack it again")
    base = Restorer.from_pretrained(prior)  # the committed VAE, scheduler and embeddings
    if base.vae.config.latent_channels != cfg.latent_channels or base.vae_scale_factor != cfg.patch:
        raise NifiError(f"{prior}: its VAE ({base.vae.config.latent_channels} channels, factor {base.vae_scale_factor}) "
                        f"does not fit prior.{profile} (latent_channels {cfg.latent_channels}, patch {cfg.patch})")
    if float(base.scheduler.config.shift) != cfg.shift:
        raise NifiError(f"{prior}: scheduler shift {base.scheduler.config.shift} != prior.{profile}.shift {cfg.shift}")
    emb = prompt_embeddings(cfg, seed)
    if tuple(base.prompt_embeds.shape) != tuple(emb[0].shape) or tuple(base.pooled.shape) != tuple(emb[1].shape):
        raise NifiError(f"{prior}: prompt embeddings {tuple(base.prompt_embeds.shape)} do not fit prior.{profile} "
                        f"(text_len {cfg.text_len}, text_dim {cfg.text_dim}, pooled_dim {cfg.pooled_dim})")
    emb_same = all(torch.equal(a, b) for a, b in zip((base.prompt_embeds, base.pooled), emb[:2]))
    print(f"{len(train_imgs)} training images ({manifest['corpus']['counts']}), {len(held_imgs)} held out; "
          f"device {dev}; steps {cfg.dit_steps}, batch {cfg.dit_batch}, lr {cfg.dit_lr}, copies {cfg.augment_copies}, "
          f"budget {time_budget_s:.0f} s", flush=True)
    torch.manual_seed(seed)  # the stage's init seed (its transformer is drawn after the autoencoder's; not equal)
    tr = build_transformer(cfg)
    r = Restorer(base.vae, tr, base.scheduler, base.prompt_embeds, base.pooled, base.null_embeds, base.null_pooled)
    t_enc = time.time()
    latents = encode_latents(r.vae, to_pm1(train_imgs), cfg.augment_copies, seed, dev)
    held = to_pm1(held_imgs)
    with torch.no_grad():
        zh = torch.cat([r.vae.encode(held[i:i + 32].to(dev)).latent_dist.mean for i in range(0, len(held), 32)])
        zh = zh * r.vae.config.scaling_factor
    t_enc = time.time() - t_enc
    print(f"latents {tuple(latents.shape)} encoded in {t_enc:.1f} s", flush=True)

    # held-out (and as many training) latents, fixed noise, a few sigmas: the flow loss v-MSE, to see over-fitting
    _, s_t0, _ = r.schedule(t0)
    val_sigmas = [0.05, round(s_t0, 4), 0.5, 0.9]
    gv = torch.Generator().manual_seed(seed + 13)
    ztr = latents[torch.randperm(len(train_imgs), generator=gv)[:len(zh)].to(dev)]  # first copy: un-augmented
    noise = {k: torch.randn((len(z),) + tuple(z.shape[1:]), generator=gv).to(dev) for k, z in (("held", zh), ("train", ztr))}
    val_log: list = []
    cuda = dev.type == "cuda"

    def val_hook(step):
        tr.eval()
        row = {"step": step + 1, "seconds": round(time.time() - t_train, 1)}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            for name, z in (("held", zh), ("train", ztr)):
                for s in val_sigmas:
                    x_t = (1 - s) * z + s * noise[name]
                    b = len(z)
                    v = tr(hidden_states=x_t, encoder_hidden_states=r.prompt_embeds.to(dev).expand(b, -1, -1),
                           pooled_projections=r.pooled.to(dev).expand(b, -1),
                           timestep=torch.full((b,), 1000 * s, device=dev), return_dict=False)[0]
                    row[f"{name}_{s}"] = float(torch.nn.functional.mse_loss(v.float(), noise[name] - z))
        tr.train()
        val_log.append(row)
        print("val " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    log: list = []
    t_train = time.time()
    train_transformer(r, latents, cfg, seed, log, time_budget_s, dev, hook=val_hook, hook_every=val_every)
    dit_s = time.time() - t_train
    dl = [e["loss"] for e in log]
    every = max(1, len(dl) // 400)
    curve = [{"step": log[i]["step"], "loss_mean": float(np.mean(dl[i:i + every])), "lr": log[i]["lr"]}
             for i in range(0, len(dl), every)]
    print(f"trained {len(dl)} steps in {dit_s:.0f} s ({len(dl) / max(dit_s, 1e-9):.1f} steps/s); "
          f"loss first/last 100: {np.mean(dl[:100]):.4f} / {np.mean(dl[-100:]):.4f}", flush=True)

    # the folder: everything but the transformer copied byte for byte from --prior, the new transformer in fp16
    import copy
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="prior_gpu_")) if tar else None
    folder = work / "prior" if tar else out
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("vae", "scheduler", "embeddings"):
        shutil.copytree(prior / sub, folder / sub, dirs_exist_ok=True)
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # the "modules to keep in float32: []" notice is empty noise here (as in Restorer.to)
    copy.deepcopy(tr).to("cpu", torch.float16).save_pretrained(folder / "transformer")
    dlog.set_verbosity(level)
    dit_log = {
        "profile": profile, "seed": seed, "config": asdict(cfg), "time_budget_s": time_budget_s,
        "steps_requested": cfg.dit_steps, "steps_done": len(dl), "batch": cfg.dit_batch, "lr": cfg.dit_lr,
        "augment_copies": cfg.augment_copies, "seconds_dit": round(dit_s, 1), "seconds_encode": round(t_enc, 1),
        "latents": list(latents.shape), "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers_version,
        "bf16_autocast": cuda, "prior_from": str(prior), "embeddings_equal_stage_draw": emb_same,
        "corpus": manifest["corpus"], "corpus_checks": checks, "loss_every": every, "loss_curve": curve,
        "val_sigmas": val_sigmas, "val": val_log,
    }
    try:
        dit_log["heldout_final"] = _heldout_check(folder, held, t0, seed, dev)
        print("held-out " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in dit_log["heldout_final"].items()), flush=True)
    except Exception as e:  # noqa: BLE001 - a report, never worth losing the trained folder for
        dit_log["heldout_final"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"held-out check failed: {type(e).__name__}: {e}", flush=True)
    dit_log["seconds_total"] = round(time.time() - t_all, 1)
    (folder / "dit_log.json").write_text(json.dumps(dit_log, indent=1))
    if tar:
        import tarfile

        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / "prior.tar", "w") as tf:
            tf.add(folder, arcname="prior")
        shutil.copy2(folder / "dit_log.json", out / "dit_log.json")
        shutil.rmtree(work, ignore_errors=True)
        print(f"wrote {out / 'prior.tar'} ({(out / 'prior.tar').stat().st_size / 1e6:.1f} MB) and {out / 'dit_log.json'}")
    else:
        print(f"wrote the prior folder {folder}")
    return dit_log


# ---------------------------------------------------------------------- wheels (there)
def _version_key(v: str):
    try:
        from packaging.version import Version

        return Version(v)
    except Exception:  # noqa: BLE001 - no packaging, or an odd version: compare the leading numbers
        import re

        return tuple(int(x) for x in re.findall(r"\d+", v)[:4])


def install_wheels(wheel_dir: Path, target: Path, dry_run: bool = False) -> list[str]:
    """pip-install (--no-deps --target) each wheel whose distribution this Python lacks or has in an older
    version; keeps what the machine has otherwise. Returns the wheels chosen."""
    import subprocess
    from importlib import metadata

    wheels = sorted(Path(wheel_dir).glob("*.whl"))
    if not wheels:
        raise NifiError(f"no .whl files in {wheel_dir}")
    chosen = []
    for w in wheels:
        dist, ver = w.name.split("-")[:2]
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError:
            have = None
        take = have is None or _version_key(have) < _version_key(ver)
        print(f"{dist} {ver}: {'installing' if take else 'skipped'} (this machine has {have or 'none'})")
        if take:
            chosen.append(str(w))
    if chosen and not dry_run:
        import os

        # the machine's pip configuration (a constraints file, require-virtualenv) must not veto a --no-deps install
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull

        def pip(wheels):
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
                   "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target), *wheels]
            return subprocess.run(cmd, env=env).returncode == 0

        if not pip(chosen):  # one at a time, so one bad wheel does not keep the others out; the import will tell
            failed = [w for w in chosen if not pip([w])]
            print(f"WARNING: could not install {[Path(w).name for w in failed]}")
    return chosen


# ---------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python scripts/prior_gpu.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    pk = sub.add_parser("pack", help="store the prior stage's training images for a GPU machine")
    pk.add_argument("--profile", required=True, choices=["cpu", "tiny"])
    pk.add_argument("--out", required=True, help="corpus folder (e.g. .device_carry/prior_corpus)")
    pk.add_argument("--scenes", help="scenes folder (default data/<profile>/scenes)")
    t = sub.add_parser("train", help="train a new transformer on a packed corpus; write a complete prior folder")
    t.add_argument("--profile", required=True, choices=["cpu", "tiny"])
    t.add_argument("--corpus", required=True)
    t.add_argument("--prior", required=True, help="prior folder whose VAE, scheduler and embeddings are kept")
    t.add_argument("--out", required=True, help="output folder (with --tar: gets prior.tar and dit_log.json)")
    t.add_argument("--time-budget-s", type=float, required=True, help="training seconds; the cosine decay ends there")
    t.add_argument("--steps", type=int, help="step bound (default the profile's prior.dit_steps)")
    t.add_argument("--batch", type=int, help="default the profile's prior.dit_batch")
    t.add_argument("--lr", type=float, help="peak learning rate (default the profile's prior.dit_lr)")
    t.add_argument("--augment-copies", type=int, help="default the profile's prior.augment_copies")
    t.add_argument("--device", default="auto")
    t.add_argument("--val-every", type=int, default=250, help="held-out flow loss every N steps (0: at the end only)")
    t.add_argument("--tar", action="store_true", help="write OUT/prior.tar + OUT/dit_log.json instead of a folder")
    w = sub.add_parser("wheels", help="install carried wheels that this machine lacks (pip --target)")
    w.add_argument("--dir", required=True)
    w.add_argument("--target", required=True)
    w.add_argument("--dry-run", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "pack":
            pack(args.profile, Path(args.out), args.scenes)
        elif args.cmd == "train":
            if args.val_every < 0:
                raise NifiError(f"--val-every must be >= 0, got {args.val_every}")
            train(args.profile, Path(args.corpus), Path(args.prior), Path(args.out), args.time_budget_s, args.steps,
                  args.batch, args.lr, args.augment_copies, args.tar, args.device, args.val_every)
        else:
            install_wheels(Path(args.dir), Path(args.target), args.dry_run)
    except NifiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
