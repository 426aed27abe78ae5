"""Pretraining the offline profiles' tiny SD3-architecture prior.

The paper downloads SD3-medium; the `cpu` profile has no download, so it trains its own prior on
clean images of the training split only (training scenes' training views, training photographs and
procedural textures; never an evaluation scene or photograph):
1. autoencoder: `PatchAutoencoder` initialised as patch PCA of training patches (a near-optimal
   linear latent, fitted in a second), then its residual refinement trained with L1 + ST-LPIPS;
2. `SD3Transformer2DModel`: rectified flow on the scheduler's shifted sigmas (logit-normal in
   unshifted time, as SD3), v-target eps - x, prompt dropout to the null embeddings so CFG works.
   A share `low_sigma_frac` of every batch is drawn uniformly in [0, low_sigma_max] instead: the
   shifted logit-normal puts ~1 % of its samples below sigma 0.25, yet NiFi's t0 (sigma 0.198), the
   img2img baseline and the restorer's one step all live there (SD3's paper treats the timestep
   density as a free design choice; this is a mixture of two of them).
Colour augmentation (channel permutation, per-channel gain, flips) from the first step.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nifi_utils.core.common import NifiError, progress
from nifi_utils.core.images import read_rgb


@dataclass
class PriorConfig:
    latent_channels: int = 16
    patch: int = 4
    vae_hidden: int = 64
    vae_res_enc: int = 1
    vae_res_dec: int = 2
    vae_pixel_hidden: int = 32
    vae_steps: int = 200
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 1e-3
    vae_lambda_stlpips: float = 0.5
    dit_layers: int = 4
    dit_heads: int = 4
    dit_head_dim: int = 32
    text_dim: int = 64
    caption_dim: int = 128
    pooled_dim: int = 64
    text_len: int = 16
    dit_steps: int = 2000
    dit_batch: int = 32
    dit_lr: float = 3e-4
    image_size: int = 128
    augment_copies: int = 4
    prompt_dropout: float = 0.1
    shift: float = 3.0
    low_sigma_frac: float = 0.0  # share of each batch drawn uniformly in [0, low_sigma_max] (NiFi's t0 region)
    low_sigma_max: float = 0.3
    n_textures: int = 64
    pos_embed_max_size: int = 128  # in patches; the buffer is saved with the model (128: 4 MB at width 128)
    vae_overlap: int = 0  # px each patch's encoder/decoder footprint reaches into its neighbours (0: per-patch)
    vae_res_pixel: int = 1  # full-resolution residual refinement blocks of the decoder
    vae_latent_noise: float = 0.0  # decoder also learns to decode latents + U(0, this) x std noise to the clean image
    vae_noise_weight: float = 0.5  # weight of that noisy-latent term
    n_prior_scenes: int = 0  # extra procedural training-split scenes rendered for the prior alone
    prior_scene_views: int = 16  # views per such scene
    prior_scene_gaussians: int = 30000  # Gaussians per such scene
    n_photo_crops: int = 0  # multi-scale crops of the training photographs


# ---------------------------------------------------------------------- data
def prior_corpus_scenes(n: int, size: int, views: int, n_gaussians: int, seed: int, supersample: int = 2):
    """Procedural training-split scenes rendered for the prior alone (no codec): their own seed stream,
    training photographs only. Returns (images, [{name, seed, layout_id}])."""
    from nifi_utils.gs.scenes import SceneSpec, generate_scene, prior_scene_seeds, render_views

    images, meta = [], []
    for i, s in enumerate(progress(prior_scene_seeds(seed, n), desc="prior scenes")):
        spec = SceneSpec(f"prior_{i:03d}", s, "train", n_gaussians, views, size, size)
        scene, cams = generate_scene(spec)
        images += render_views(scene, cams, supersample=supersample, desc=spec.name)
        meta.append({"name": spec.name, "seed": s, "layout_id": spec.layout_id})
    return images, meta


def _resized_crop(photo: np.ndarray, y: int, x: int, side: int, size: int) -> np.ndarray:
    """The side x side crop of a float RGB photo at (y, x), area-downsampled to size x size, as uint8."""
    crop = torch.from_numpy(np.ascontiguousarray(photo[y:y + side, x:x + side])).permute(2, 0, 1)[None].float()
    im = F.interpolate(crop, size=(size, size), mode="area")[0].permute(1, 2, 0).numpy()
    return (np.clip(im, 0, 1) * 255 + 0.5).astype(np.uint8)


def photo_crops(n: int, size: int, rng: np.random.Generator, load=None) -> list[np.ndarray]:
    """`n` crops of the training photographs at random scales (side from `size` to the whole photo's short
    side, area-downsampled to `size`): from texture close-ups to whole-photo views. `load(name)` returns a
    photograph as `scenes.load_photo` does (its default)."""
    from nifi_utils.gs.scenes import TRAIN_PHOTOS, load_photo

    load = load or load_photo
    out = []
    for k in range(n):
        photo = load(TRAIN_PHOTOS[int(rng.integers(len(TRAIN_PHOTOS)))])
        h, w = photo.shape[:2]
        lo, hi = np.log(size), np.log(max(size + 1, min(h, w)))
        sd = int(np.exp(rng.uniform(lo, hi)))
        y, x = int(rng.integers(0, h - sd + 1)), int(rng.integers(0, w - sd + 1))
        out.append(_resized_crop(photo, y, x, sd, size))
    return out


def generated_images(n_photo_crops: int, n_textures: int, size: int, seed: int, load=None) -> list[np.ndarray]:
    """The corpus's seeded part, a pure function of its arguments: `n_photo_crops` multi-scale crops of the
    training photographs, then `n_textures` textures (training-photo crops and procedural ones alternating),
    all from one `np.random.default_rng(seed)` stream. `load` as in `photo_crops`."""
    from nifi_utils.gs.scenes import PROCEDURAL, TRAIN_PHOTOS, load_photo, procedural_texture

    load = load or load_photo
    rng = np.random.default_rng(seed)
    out = photo_crops(n_photo_crops, size, rng, load)
    for k in range(n_textures):
        if k % 2 == 0:
            photo = load(TRAIN_PHOTOS[(k // 2) % len(TRAIN_PHOTOS)])
            h, w = photo.shape[:2]
            s = int(rng.integers(size, max(size + 1, min(h, w))))
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            out.append(_resized_crop(photo, y, x, s, size))
        else:
            tex = procedural_texture(PROCEDURAL[(k // 2) % len(PROCEDURAL)], rng, size)
            out.append((np.clip(tex, 0, 1) * 255 + 0.5).astype(np.uint8))
    return out


def training_scene_views(scenes_root: Path):
    """(train, held_out, [{name, seed, layout_id}]) uint8 views of the training-split scenes under
    `scenes_root`: held out are the test views (idx % 8 == 0). Evaluation scenes are never read."""
    train, held, meta_out = [], [], []
    dirs = sorted(d for d in scenes_root.iterdir() if d.is_dir()) if scenes_root.is_dir() else []
    for d in dirs:
        meta = json.loads((d / "transforms.json").read_text())
        if meta.get("split") != "train":
            continue  # evaluation scenes never enter the prior's data
        meta_out.append({"name": d.name, "seed": meta.get("seed"), "layout_id": meta.get("layout_id")})
        for i, fr in enumerate(meta["frames"]):
            im = read_rgb(d / fr["file_path"])
            (held if i in meta["test_ids"] else train).append(im)
    if not train:
        raise NifiError(f"no training scenes under {scenes_root}: run the scenes stage first")
    return train, held, meta_out


def training_images(scenes_root: Path, n_textures: int, size: int, seed: int, n_prior_scenes: int = 0,
                    prior_scene_views: int = 16, prior_scene_gaussians: int = 30000, n_photo_crops: int = 0):
    """(train, held_out, corpus) uint8 HxWx3 images and what they came from. Train, in this order: training
    scenes' training views, procedural training-split scenes rendered for the prior alone, multi-scale crops of
    the training photographs and procedural textures (`corpus["counts"]`, in the same order, splits the list).
    Held out: training scenes' test views (idx % 8 == 0). Evaluation scenes and photographs are never read;
    `corpus` lists seeds and layouts so the benchmark can assert it."""
    from nifi_utils.gs.scenes import TRAIN_PHOTOS

    train, held, scenes = training_scene_views(Path(scenes_root))
    corpus = {"scenes": scenes, "prior_scenes": [], "photos": list(TRAIN_PHOTOS), "counts": {}}
    corpus["counts"]["training_scene_views"] = len(train)
    if n_prior_scenes:
        ims, corpus["prior_scenes"] = prior_corpus_scenes(n_prior_scenes, size, prior_scene_views, prior_scene_gaussians, seed)
        train += ims
    corpus["counts"]["prior_scene_views"] = n_prior_scenes * prior_scene_views
    train += generated_images(n_photo_crops, n_textures, size, seed)
    corpus["counts"]["photo_crops"] = n_photo_crops
    corpus["counts"]["textures"] = n_textures
    return train, held, corpus


def to_pm1(imgs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Colour and geometry augmentation of a [B,3,H,W] batch in [-1,1]: a random channel permutation,
    per-channel gains in [0.8, 1.2] about mid-grey, horizontal flips."""
    b = x.shape[0]
    perm = torch.stack([torch.randperm(3, generator=g) for _ in range(b)])
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    gain = 0.8 + 0.4 * torch.rand(b, 3, 1, 1, generator=g)
    x = (x * gain).clamp(-1, 1)
    flip = torch.rand(b, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_crops(x: torch.Tensor, n: int, size: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.randint(len(x), (n,), generator=g)
    h, w = x.shape[-2:]
    ys = torch.randint(0, h - size + 1, (n,), generator=g)
    xs = torch.randint(0, w - size + 1, (n,), generator=g)
    return torch.stack([x[i, :, y:y + size, xx:xx + size] for i, y, xx in zip(idx, ys, xs)])


# ---------------------------------------------------------------------- autoencoder
def fit_patch_pca(x: torch.Tensor, patch: int, channels: int, max_patches: int = 200_000, seed: int = 0):
    """(per-channel mean [3], basis [channels, 3*p*p]) of the patches of images x [B,3,H,W]."""
    cm = x.mean((0, 2, 3))
    pt = F.unfold(x - cm[None, :, None, None], patch, stride=patch).permute(0, 2, 1).reshape(-1, 3 * patch * patch)
    if len(pt) > max_patches:
        pt = pt[torch.randperm(len(pt), generator=torch.Generator().manual_seed(seed))[:max_patches]]
    cov = pt.double().T @ pt.double() / len(pt)
    evals, evecs = torch.linalg.eigh(cov)
    basis = evecs[:, torch.argsort(evals, descending=True)[:channels]].T.float()
    return cm, basis


def train_autoencoder(train: torch.Tensor, cfg: PriorConfig, seed: int, log: list) -> torch.nn.Module:
    from nifi_utils.measure.metrics import stlpips_model
    from nifi_utils.models.folders import patch_autoencoder_class

    g = torch.Generator().manual_seed(seed)
    ae = patch_autoencoder_class()(latent_channels=cfg.latent_channels, patch=cfg.patch, hidden=cfg.vae_hidden,
                                   n_res_enc=cfg.vae_res_enc, n_res_dec=cfg.vae_res_dec,
                                   pixel_hidden=cfg.vae_pixel_hidden, downsample_factor=cfg.patch,
                                   overlap=cfg.vae_overlap, n_res_pixel=cfg.vae_res_pixel)
    cm, basis = fit_patch_pca(augment(train[torch.randperm(len(train), generator=g)[:512]], g), cfg.patch,
                              cfg.latent_channels, seed=seed)
    ae.set_pca(cm, basis)
    perc = stlpips_model("alex", "cpu") if cfg.vae_lambda_stlpips > 0 else None
    opt = torch.optim.AdamW([p for n, p in ae.named_parameters() if n != "logvar"], lr=cfg.vae_lr, weight_decay=0.0)

    def rec_loss(y, x):
        l1 = (y - x).abs().mean()
        lp = perc(y, x).mean() if perc is not None else torch.zeros(())
        return l1, lp

    for step in progress(range(cfg.vae_steps), desc="autoencoder"):
        x = augment(random_crops(train, cfg.vae_batch, cfg.vae_crop, g), g)
        z = ae.encode(x).latent_dist.mode()
        l1, lp = rec_loss(ae.decode(z).sample, x)
        loss = l1 + cfg.vae_lambda_stlpips * lp
        entry = {"phase": "vae", "step": step, "l1": float(l1.detach()), "stlpips": float(lp.detach())}
        if cfg.vae_latent_noise > 0:
            # a restorer's latent is never exact: the decoder learns to turn a latent off by a little into the
            # clean image rather than into that error's footprint (a block on the latent grid). The latent is
            # detached, so the encoder cannot escape the noise by growing its latents.
            zd = z.detach()
            sig = cfg.vae_latent_noise * torch.rand(len(zd), 1, 1, 1, generator=g)
            zn = zd + sig * zd.std() * torch.randn(zd.shape, generator=g)
            nl1, nlp = rec_loss(ae.decode(zn).sample, x)
            loss = loss + cfg.vae_noise_weight * (nl1 + cfg.vae_lambda_stlpips * nlp)
            entry.update(noisy_l1=float(nl1.detach()), noisy_stlpips=float(nlp.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append(entry)
    with torch.no_grad():
        z = torch.cat([ae.encode(train[i:i + 32]).latent_dist.mean for i in range(0, len(train), 32)])
    ae.register_to_config(scaling_factor=float(1.0 / z.std()), shift_factor=0.0)
    return ae.eval()


# ---------------------------------------------------------------------- flow-matching transformer
def build_transformer(cfg: PriorConfig):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=cfg.image_size // cfg.patch, patch_size=2, in_channels=cfg.latent_channels,
        num_layers=cfg.dit_layers, attention_head_dim=cfg.dit_head_dim, num_attention_heads=cfg.dit_heads,
        joint_attention_dim=cfg.text_dim, caption_projection_dim=cfg.caption_dim, pooled_projection_dim=cfg.pooled_dim,
        out_channels=cfg.latent_channels, pos_embed_max_size=cfg.pos_embed_max_size)


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def training_sigmas(cfg: PriorConfig, g: torch.Generator) -> torch.Tensor:
    """A batch of training sigmas: the shifted logit-normal, mixed with U(0, low_sigma_max)."""
    sig = shifted_sigmas(torch.sigmoid(torch.randn(cfg.dit_batch, generator=g)), cfg.shift)
    if cfg.low_sigma_frac > 0:
        low = torch.rand(cfg.dit_batch, generator=g) < cfg.low_sigma_frac
        sig = torch.where(low, cfg.low_sigma_max * torch.rand(cfg.dit_batch, generator=g), sig)
    return sig


def train_transformer(restorer, latents: torch.Tensor, cfg: PriorConfig, seed: int, log: list,
                      time_budget_s: float | None = None, device: str | torch.device | None = None,
                      hook=None, hook_every: int = 0):
    """Rectified flow: x_t = (1 - s) x + s eps, v = eps - x, s = shift(sigmoid(N(0,1))), or with
    probability `low_sigma_frac` s ~ U(0, low_sigma_max).

    `device` (default: the latents' device) gets the transformer, the embeddings and the latents. Batch indices,
    sigmas and prompt dropout always come from the CPU generator (seed + 7); so does the noise eps on CPU, so the
    CPU path computes what it always did. On CUDA eps (the one large draw, 4 M numbers per step at batch 256,
    which a CPU generator makes at ~20 ms) comes from a CUDA generator with the same seed, the forward pass runs
    under bf16 autocast (fp32 master weights, fused AdamW), the small CPU draws travel pinned and non-blocking and
    losses are read back in blocks of 100 steps: nothing makes the CPU wait for the GPU every step.
    `hook(step)` runs every `hook_every` steps (0: never) and after the last step (e.g. a held-out loss; the
    model is in train mode, the hook switches what it needs)."""
    g = torch.Generator().manual_seed(seed + 7)
    dev = torch.device(device) if device is not None else latents.device
    cuda = dev.type == "cuda"
    if cuda and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())

    def h2d(t):
        # CUDA: a plain .to() of a CPU tensor waits for the GPU; pinned + non_blocking lets the CPU run ahead
        return t.pin_memory().to(dev, non_blocking=True) if cuda else t

    tr = restorer.transformer.to(dev)
    latents = latents.to(dev)
    pe_c, pe_n, pp_c, pp_n = (t.to(dev) for t in (restorer.prompt_embeds, restorer.null_embeds, restorer.pooled,
                                                  restorer.null_pooled))
    g_eps = torch.Generator(dev).manual_seed(seed + 7) if cuda else g
    tr.train()
    opt = torch.optim.AdamW(tr.parameters(), lr=cfg.dit_lr, weight_decay=1e-4, **({"fused": True} if cuda else {}))
    t_start = time.time()

    def lr_factor(s):
        # warm-up 100 steps, then cosine decay over the run's progress: steps done or time spent, whichever is
        # further along, so a run cut by the time budget (a slower or busier machine) still ends annealed
        done = s / max(cfg.dit_steps, 1)
        if time_budget_s:
            done = max(done, (time.time() - t_start) / time_budget_s)
        return min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))) + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    pending: list = []  # CUDA: (log entry, loss on the GPU), read back in blocks

    def flush():
        if pending:
            for (entry, _), v in zip(pending, torch.stack([l for _, l in pending]).tolist()):
                entry["loss"] = v
            bar.set_postfix(loss=f"{np.mean([e['loss'] for e, _ in pending]):.4f}", refresh=False)
            pending.clear()

    bar = progress(range(cfg.dit_steps), desc="transformer")
    step = -1
    for step in bar:
        idx = torch.randint(len(latents), (cfg.dit_batch,), generator=g)
        x = latents[h2d(idx)]
        eps = torch.randn(x.shape, generator=g_eps, device=dev)
        sig = h2d(training_sigmas(cfg, g))
        x_t = (1 - sig[:, None, None, None]) * x + sig[:, None, None, None] * eps
        drop = h2d(torch.rand(cfg.dit_batch, generator=g) < cfg.prompt_dropout)
        pe = torch.where(drop[:, None, None], pe_n, pe_c).expand(cfg.dit_batch, -1, -1)
        pp = torch.where(drop[:, None], pp_n, pp_c).expand(cfg.dit_batch, -1)
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            v = tr(hidden_states=x_t, encoder_hidden_states=pe, pooled_projections=pp, timestep=1000 * sig,
                   return_dict=False)[0]
        loss = F.mse_loss(v.float(), eps - x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        sched.step()
        entry = {"phase": "dit", "step": step, "loss": None, "lr": sched.get_last_lr()[0]}
        if cuda:
            pending.append((entry, loss.detach()))
            if len(pending) >= 100:
                flush()
        else:
            entry["loss"] = float(loss.detach())
        log.append(entry)
        if hook is not None and hook_every and (step + 1) % hook_every == 0:
            hook(step)
        if time_budget_s is not None and time.time() - t_start > time_budget_s:
            break
    flush()
    bar.close()
    if hook is not None and step >= 0 and not (hook_every and (step + 1) % hook_every == 0):
        hook(step)  # after the last step, unless it just ran
    tr.eval()
    return restorer


def encode_latents(ae, images: torch.Tensor, copies: int, seed: int, device: str | torch.device | None = None) -> torch.Tensor:
    """Scaled latent means of `copies` augmented versions of every image (the DiT's training set), on `device`
    (default: the autoencoder's; given, the autoencoder is moved there). Augmentation draws from the CPU
    generator (seed + 3) on CPU images, so the latents do not depend on the device beyond float rounding."""
    g = torch.Generator().manual_seed(seed + 3)
    if device is not None:
        ae.to(device)
    dev = next(ae.parameters()).device
    out = []
    with torch.no_grad():
        for c in range(copies):
            for i in range(0, len(images), 32):
                x = images[i:i + 32] if c == 0 else augment(images[i:i + 32], g)
                out.append(ae.encode(x.to(dev)).latent_dist.mean * ae.config.scaling_factor)
    return torch.cat(out)


def prompt_embeddings(cfg: PriorConfig, seed: int):
    """(prompt_embeds, pooled, null_embeds, null_pooled): the fixed random "default prompt" (seed + 11) and zeros."""
    g = torch.Generator().manual_seed(seed + 11)
    pe = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)  # the fixed "default prompt" embedding
    pp = torch.randn(1, cfg.pooled_dim, generator=g)
    return pe, pp, torch.zeros_like(pe), torch.zeros_like(pp)


def build_prior(train: torch.Tensor, cfg: PriorConfig, seed: int, dit_time_budget_s: float | None = None,
                device: str | torch.device | None = None):
    """Train the autoencoder (on CPU) then the transformer (on `device`, default CPU); returns (Restorer on CPU,
    training log, timings)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from nifi_utils.models.restorer import Restorer

    torch.manual_seed(seed)
    log: list = []
    t0 = time.time()
    ae = train_autoencoder(train, cfg, seed, log)
    t_vae = time.time() - t0
    tr = build_transformer(cfg)
    r = Restorer(ae, tr, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift),
                 *prompt_embeddings(cfg, seed))
    latents = encode_latents(ae, train, cfg.augment_copies, seed, device)
    t1 = time.time()
    train_transformer(r, latents, cfg, seed, log, dit_time_budget_s, device)
    r.to("cpu")
    timings = {"vae_s": t_vae, "dit_s": time.time() - t1, "latents": list(latents.shape),
               "dit_device": str(device or "cpu")}
    return r, log, timings


def config_dict(cfg: PriorConfig) -> dict:
    return asdict(cfg)


# ---------------------------------------------------------------------- the prior stage: its sources and its gates
SD3_FILES = ("vae/config.json", "transformer/config.json", "scheduler/scheduler_config.json")
PRIOR_SUBFOLDERS = ("vae", "transformer", "scheduler", "embeddings")  # a complete prior folder (SD3's layout)


def check_sd3_folder(sd3_dir: str | Path, sd3_embeddings: str | Path) -> dict:
    """The paper profile's prior, checked where the stage runs (nothing is trained or copied): `sd3_dir` is an
    SD3 folder in diffusers layout, and the prompt embeddings the stages load (`sd3_embeddings`; distill and the
    benchmark also read `<sd3_dir>/embeddings/{default,null}.npz`, the null prompt for CFG) fit its transformer,
    so a wrong file stops this stage before hours of synthesis. A problem is one NifiError line. Returns
    {sd3_dir, embeddings, prompt_embeds, pooled} (the shapes of `sd3_embeddings`' two arrays)."""
    from nifi_utils.models.restorer import load_embeddings

    base = Path(sd3_dir)
    missing = [s for s in SD3_FILES if not (base / s).is_file()]
    if missing:
        raise NifiError(f"SD3 folder {base} lacks {missing}: download stabilityai/stable-diffusion-3-medium-diffusers by hand")
    tcfg = json.loads((base / "transformer" / "config.json").read_text())
    for emb in (sd3_embeddings, base / "embeddings" / "default.npz", base / "embeddings" / "null.npz"):
        if not Path(emb).is_file():
            raise NifiError(f"prompt embeddings {emb} missing: encode NiFi's default prompt and the empty prompt "
                            "with SD3's text encoders (keys prompt_embeds, pooled_prompt_embeds; see docs/gpu.md)")
        pe, pp = load_embeddings(emb)
        if pe.shape[-1] != tcfg["joint_attention_dim"] or pp.shape[-1] != tcfg["pooled_projection_dim"]:
            raise NifiError(f"{emb} does not fit SD3 (widths {pe.shape[-1]}/{pp.shape[-1]}, the transformer's "
                            f"{tcfg['joint_attention_dim']}/{tcfg['pooled_projection_dim']})")
    pe, pp = load_embeddings(sd3_embeddings)
    return {"sd3_dir": str(base), "embeddings": str(sd3_embeddings), "prompt_embeds": list(pe.shape),
            "pooled": list(pp.shape)}


def adopt_prior(prior_from: str | Path, out_dir: str | Path, scenes_root: str | Path, cfg: PriorConfig, seed: int,
                profile: str) -> dict:
    """A complete prior folder trained elsewhere (`scripts/prior_gpu.py train` with the stage's parameters, e.g. on
    a lent GPU machine) in place of training here. Its `dit_log.json` must show it was trained on this stage's
    corpus (the same training scenes), with this configuration (every `PriorConfig` field), seed and profile; then
    its vae/, transformer/, scheduler/ and embeddings/ replace `out_dir`. A mismatch is one NifiError line and
    nothing is copied.

    Returns {dit_log, corpus, held (the training scenes' held-out views, uint8, read here), n_train, log (the
    run's block means of the flow loss, as training log entries), timings}."""
    import shutil

    src = Path(prior_from)
    log_path = src / "dit_log.json"
    if not log_path.is_file():
        raise NifiError(f"{log_path} not found: prior_from names a folder made by scripts/prior_gpu.py train")
    dit_log = json.loads(log_path.read_text())
    # the folder must have been trained with this section's configuration (dit_steps/dit_batch/dit_lr included)
    diff = {k: (dit_log["config"].get(k), v) for k, v in asdict(cfg).items() if dit_log["config"].get(k) != v}
    if diff:
        raise NifiError(f"{prior_from} was trained with other parameters (theirs, ours): {diff}")
    if dit_log["seed"] != seed or dit_log["profile"] != profile:
        raise NifiError(f"{prior_from}: seed/profile differ (theirs {dit_log['seed']}/{dit_log['profile']}, "
                        f"ours {seed}/{profile})")
    _, held, scenes_here = training_scene_views(Path(scenes_root))
    corpus = dit_log["corpus"]
    if corpus["scenes"] != scenes_here:
        raise NifiError(f"{prior_from} was trained on training scenes {corpus['scenes']}, this stage's are {scenes_here}")
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    for sub in PRIOR_SUBFOLDERS:
        shutil.copytree(src / sub, out_dir / sub)
    log = [{"phase": "dit", "step": e["step"], "loss": e["loss_mean"], "lr": e["lr"]} for e in dit_log["loss_curve"]]
    timings = {"vae_s": None, "dit_s": dit_log["seconds_dit"], "latents": dit_log["latents"], "dit_device": dit_log["device"]}
    return {"dit_log": dit_log, "corpus": corpus, "held": held, "n_train": sum(corpus["counts"].values()), "log": log,
            "timings": timings}


def parameter_counts(restorer) -> dict:
    """{"vae": n, "transformer": n} parameters of a restorer's two models."""
    return {"vae": sum(p.numel() for p in restorer.vae.parameters()),
            "transformer": sum(p.numel() for p in restorer.transformer.parameters())}


def folder_mb(folder: str | Path) -> float:
    """Megabytes (1e6 bytes) of every file under `folder`."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6


def denoise_from_t0(prior, z: torch.Tensor, t0: float, noise: torch.Tensor) -> torch.Tensor:
    """The prior's one-step estimate of a clean latent `z` [B,C,h,w] noised to sigma_t0 with `noise`:
    x_t0 = sigma_t0 noise + (1 - sigma_t0) z, then x^ = x_t0 - sigma_t0 v(x_t0, t0), the flow straight to
    sigma = 0 (the denoising ceiling of a restorer distilled from this prior). `Restorer.one_step` is NiFi's
    step, which stops at the scheduler's sigma nearest t = 0."""
    _, s0, _ = prior.schedule(t0)
    x_t = s0 * noise + (1 - s0) * z
    return x_t - s0 * prior.velocity(x_t, t0)


def heldout_reconstructions(prior, held: torch.Tensor, t0: float, seed: int, batch: int = 16):
    """(round trip, one-step denoised from t0, decoded from a latent off by white noise of 0.1) of held-out
    images `held` [N,3,H,W] in [-1, 1], each [N,3,H,W] in [0, 1]: what the autoencoder keeps, what the
    transformer can denoise at NiFi's t0 (`denoise_from_t0`) and what the decoder draws from a small latent
    error (a block on the latent grid?). One CPU generator (`seed`) draws, per batch, the t0 noise and then the
    latent error."""
    g = torch.Generator().manual_seed(seed)
    rt, den, nz = [], [], []
    with torch.no_grad():
        for i in range(0, len(held), batch):
            x = held[i:i + batch]
            z = prior.encode(x, sample=False)
            rt.append(prior.decode(z, x.shape[-2:]).clamp(-1, 1))
            z0 = denoise_from_t0(prior, z, t0, torch.randn(z.shape, generator=g))
            den.append(prior.decode(z0, x.shape[-2:]).clamp(-1, 1))
            nz.append(prior.decode(z + 0.1 * torch.randn(z.shape, generator=g), x.shape[-2:]).clamp(-1, 1))
    return torch.cat(rt) * 0.5 + 0.5, torch.cat(den) * 0.5 + 0.5, torch.cat(nz) * 0.5 + 0.5


def compressed_test_views(renders_root: str | Path, scenes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(compressed, ground truth) [N,3,H,W] in [0, 1]: every test view of the training scenes `scenes` at every
    compression level (the synthesis stage's renders), scene by scene, each scene's levels in order
    (`distill.heldout_pairs`, all views)."""
    from nifi_utils.models.distill import heldout_pairs

    root = Path(renders_root)
    # per scene, every view of every level: as many per level as the scene has ground-truth test views
    parts = [heldout_pairs(root, [s], per_level=len(list((root / s / "gt").glob("*.png"))))[:2] for s in scenes]
    return (torch.cat([lq for lq, _ in parts]).contiguous(), torch.cat([gt for _, gt in parts]).contiguous())


def sample_from_noise(prior, n: int, size: int, seed: int, steps: int = 20, guidance: float = 3.0) -> torch.Tensor:
    """`n` images [n,3,size,size] in [0, 1] sampled from pure noise (CPU generator `seed`): `steps` Euler steps
    of the guided velocity over `Restorer.sampler_sigmas(1000, steps)`, the schedule img2img integrates from t0."""
    with torch.no_grad():
        sig = prior.sampler_sigmas(1000, steps)
        gs = torch.Generator().manual_seed(seed)
        hw = size // prior.vae_scale_factor
        xs = torch.randn(n, prior.transformer.config.in_channels, hw, hw, generator=gs)
        for a, b in zip(sig[:-1], sig[1:]):
            xs = xs - (a - b) * prior.guided_velocity(xs, 1000 * a, guidance=guidance)
        return (prior.decode(xs, (size, size)) * 0.5 + 0.5).clamp(0, 1)


def _mean_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    from nifi_utils.measure.metrics import psnr

    return float(np.mean([psnr(x, y) for x, y in zip(a[:, None], b[:, None])]))


def quality_gates(clean, rt, den, nz, lq, gt, i2i, img2img_steps: int) -> dict:
    """The prior stage's measurements (images [N,3,H,W] in [0, 1]): the periodic-artifact excess over the reference
    (`metrics.periodic_artifact`) of the round trip `rt`, the one-step denoising `den` and the noisy-latent decode
    `nz` (against the held-out `clean`) and of img2img `i2i` and the compressed renders `lq` (against `gt`); PSNR
    and ST-LPIPS (alex) of the round trip, the denoising, the compressed renders and img2img."""
    from nifi_utils.measure.metrics import periodic_artifact, stlpips

    vae_psnr, vae_lp = _mean_psnr(rt, clean), float(stlpips(rt, clean).mean())
    den_psnr, den_lp = _mean_psnr(den, clean), float(stlpips(den, clean).mean())
    lp_in, lp_out = float(stlpips(lq, gt).mean()), float(stlpips(i2i, gt).mean())
    lattice = {name: float((periodic_artifact(ims) - periodic_artifact(ref)).mean())
               for name, ims, ref in (("vae", rt, clean), ("denoise_t0", den, clean), ("decoder_noise", nz, clean),
                                      ("img2img", i2i, gt), ("compressed", lq, gt))}
    return {
        **{f"periodic_excess_{k}": v for k, v in lattice.items()},
        "vae_psnr_db": vae_psnr, "vae_stlpips_alex": vae_lp,
        "denoise_t0_psnr_db": den_psnr, "denoise_t0_stlpips_alex": den_lp, "denoise_gap_db": vae_psnr - den_psnr,
        "img2img_pairs": len(lq), "img2img_steps": img2img_steps,
        "compressed_stlpips_alex": lp_in, "img2img_stlpips_alex": lp_out,
        "compressed_psnr_db": _mean_psnr(lq, gt), "img2img_psnr_db": _mean_psnr(i2i, gt),
    }
