# %% [markdown]
# # 02 · The flow-matching prior (a tiny SD3 for the offline profiles)
#
# **Purpose.** NiFi's restorer is distilled from a pretrained flow-matching prior and decodes through
# that prior's VAE (paper §3-4, SD3-medium). The offline `cpu` profile cannot download SD3, so this
# stage pretrains an SD3-*architecture* prior of its own on clean images of the training split:
# 1. **Autoencoder.** A `PatchAutoencoder` (diffusers `ModelMixin`/`ConfigMixin`, `AutoencoderKL`'s
#    interface) whose linear path starts as the PCA of 4x4 pixel patches (16 latent channels, 4x
#    downsampling), refined by zero-initialised residual blocks trained with L1 + ST-LPIPS. Why PCA: a
#    randomly initialised `AutoencoderKL` given the same CPU budget stays near 17 dB, while the PCA alone
#    already reconstructs held-out images at > 30 dB. Why overlap: with a
#    per-patch transform, any error of one latent pixel becomes a 4x4 block and a restorer's latent
#    errors draw the latent grid. Here each latent's encoder and decoder footprint reaches
#    `vae_overlap` px into its neighbours (an 8x8 kernel at stride 4, PCA in its centre at the start),
#    full-resolution residual blocks see across patch boundaries, and the decoder also learns to decode
#    a *noisy* latent (white noise up to `vae_latent_noise` x the latent std) to the clean image.
# 2. **Transformer.** A small `SD3Transformer2DModel` trained by rectified flow,
#    $x_t = (1-\sigma)x + \sigma\epsilon$, target $v = \epsilon - x$, $\sigma$ from the scheduler's
#    shift ($\sigma = 3u/(1+2u)$, $u$ logit-normal), fixed "default prompt" embeddings dropped to the
#    null embeddings with $p = 0.1$ (so classifier-free guidance works). Half of every batch is drawn
#    uniformly in $\sigma \in [0, 0.3]$ instead: the shifted logit-normal alone puts ~1 % of its samples
#    below $\sigma = 0.25$, where NiFi's $t_0$ ($\sigma = 0.198$) and the img2img baseline work.
#
# Everything is saved in SD3's diffusers layout, so the restorer loads this prior and SD3-medium
# through one code path.
#
# **Three ways through the stage** (`source`, `prior_from`), each its own cells below:
# - `source: train` (cpu, tiny): build the corpus, train the autoencoder and the transformer here (`dit_device:
#   auto` trains the transformer on CUDA when there is one);
# - `source: train` with `prior_from`: a complete prior folder made by `scripts/prior_gpu.py train` with this
#   stage's parameters (e.g. on a lent GPU machine: the committed VAE, a transformer trained there; `dit_log.json`
#   says how). The stage trains nothing: it checks that the folder was trained with this section's configuration
#   and corpus, copies it to `data/<profile>/prior` and computes the same gates, figure and `prior.json`
#   (recording where the transformer was trained);
# - `source: sd3` (paper): check the SD3 folder and embeddings you give; nothing is trained, nothing large written.
#
# **Inputs.** `data/<profile>/scenes/` (training scenes only), `data/<profile>/renders/` (compressed
# test views of training scenes, for the img2img gate); `sd3`: your SD3 folder. **Outputs.** `data/<profile>/prior/`
# (committed to git: the stage is `frozen`), `reports/<profile>/prior.json`,
# `reports/<profile>/figures/prior.png`.
#
# **Runtime.** The transformer's training dominates (`dit_time_budget_s` caps it); `prior.json` records the
# autoencoder's and the transformer's seconds and the last cell prints the stage's. The stage is frozen and its
# weights are committed, so `make repro` does not run it: `python -m nifi_utils.pipeline.run prior && dvc commit -f prior`
# trains it again. `paper` only reads a few files.
#
# **Opened in JupyterLab** (tiny parameters) it trains the tiny prior again and writes it over the committed
# `data/tiny/prior/`: `git status` shows the change and `git checkout -- data/tiny/prior reports/tiny` restores the
# committed one.

# %% tags=["parameters"]
profile = "tiny"
seed = 0
source = "train"
prior_from = ""
sd3_dir = ""
sd3_embeddings = ""
latent_channels = 16
patch = 4
vae_hidden = 16
vae_res_enc = 1
vae_res_dec = 1
vae_pixel_hidden = 8
vae_steps = 5
vae_batch = 4
vae_crop = 32
vae_lr = 0.001
vae_lambda_stlpips = 0.5
dit_layers = 1
dit_heads = 2
dit_head_dim = 16
text_dim = 16
caption_dim = 32
pooled_dim = 16
text_len = 4
dit_steps = 20
dit_batch = 8
dit_lr = 0.0003
dit_time_budget_s = 600
dit_device = "auto"
image_size = 48
augment_copies = 2
prompt_dropout = 0.1
shift = 3.0
low_sigma_frac = 0.5
low_sigma_max = 0.3
n_textures = 4
pos_embed_max_size = 32
vae_overlap = 2
vae_res_pixel = 2
vae_latent_noise = 0.3
vae_noise_weight = 0.5
n_prior_scenes = 1
prior_scene_views = 4
prior_scene_gaussians = 2000
n_photo_crops = 8
t0 = 199
img2img_steps = 10
gate_vae_psnr = 28.0
gate_vae_stlpips = 0.10
gate_denoise_gap_db = 2.5
gate_periodic_excess = 0.05
enforce_gates = False

# %%
import json
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from nifi_utils.core.common import NifiError, pick_device, provenance, repo_path, seed_everything
from nifi_utils.measure.metrics import METRIC_BACKENDS
from nifi_utils.models.folders import save_prior
from nifi_utils.models.prior import (PriorConfig, adopt_prior, build_prior, check_sd3_folder, compressed_test_views,
                                     folder_mb, heldout_reconstructions, parameter_counts, quality_gates,
                                     sample_from_noise, to_pm1, training_images)
from nifi_utils.models.restorer import Restorer
from nifi_utils.pipeline.lab import require_inputs

if source not in ("train", "sd3"):
    raise NifiError(f"prior.source must be 'train' or 'sd3', got {source!r}")
train_here = source == "train" and not prior_from  # build the corpus, train both models in this stage
adopted = source == "train" and bool(prior_from)  # a prior folder trained elsewhere on this stage's corpus
if source == "train":  # training reads the scenes and renders (dvc.yaml); `sd3` only checks the SD3 folder
    require_inputs("prior", profile)  # an upstream output missing: one line naming what to run first, nothing written
out_dir = repo_path("data", profile, "prior")
report_path = repo_path("reports", profile, "prior.json")
fig_path = repo_path("reports", profile, "figures", "prior.png")
fig_path.parent.mkdir(parents=True, exist_ok=True)
seed_everything(seed)
torch.set_num_threads(max(1, torch.get_num_threads()))
t_start = time.time()
cfg = PriorConfig(latent_channels=latent_channels, patch=patch, vae_hidden=vae_hidden, vae_res_enc=vae_res_enc,
                  vae_res_dec=vae_res_dec, vae_pixel_hidden=vae_pixel_hidden, vae_steps=vae_steps,
                  vae_batch=vae_batch, vae_crop=vae_crop, vae_lr=vae_lr, vae_lambda_stlpips=vae_lambda_stlpips,
                  dit_layers=dit_layers, dit_heads=dit_heads, dit_head_dim=dit_head_dim, text_dim=text_dim,
                  caption_dim=caption_dim, pooled_dim=pooled_dim, text_len=text_len, dit_steps=dit_steps,
                  dit_batch=dit_batch, dit_lr=dit_lr, image_size=image_size, augment_copies=augment_copies,
                  prompt_dropout=prompt_dropout, shift=shift, low_sigma_frac=low_sigma_frac,
                  low_sigma_max=low_sigma_max, n_textures=n_textures,
                  pos_embed_max_size=pos_embed_max_size, vae_overlap=vae_overlap, vae_res_pixel=vae_res_pixel,
                  vae_latent_noise=vae_latent_noise, vae_noise_weight=vae_noise_weight,
                  n_prior_scenes=n_prior_scenes, prior_scene_views=prior_scene_views,
                  prior_scene_gaussians=prior_scene_gaussians, n_photo_crops=n_photo_crops)
print(f"source {source}" + (f", prior from {prior_from}" if adopted else ""))

# %% [markdown]
# ## Paper profile: check the SD3 folder (nothing is trained or copied)
# `check_sd3_folder` reads the folder's configs and the three embeddings files the stages load (yours, and the
# folder's `embeddings/default.npz` and `embeddings/null.npz`, the null prompt for classifier-free guidance), and
# stops on the first one that is missing or does not fit the transformer, before hours of synthesis. The stage
# then records where SD3 is (`prior/source.json`, `prior.json`) and draws the figure every profile has.

# %%
if source == "sd3":
    sd3 = check_sd3_folder(sd3_dir, sd3_embeddings)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "source.json").write_text(json.dumps({"sd3_dir": sd3["sd3_dir"], "embeddings": sd3["embeddings"]}, indent=1))
    report_path.write_text(json.dumps({"source": "sd3", "sd3_dir": sd3["sd3_dir"], "prompt_embeds": sd3["prompt_embeds"],
                                       "provenance": provenance(profile, seed, "cpu")}, indent=1))
    fig = plt.figure(figsize=(6, 1.0))  # the stage's figure output exists in every profile (DVC checks it)
    fig.text(0.02, 0.5, f"SD3 prior: {sd3['sd3_dir']}\nprompt_embeds {tuple(sd3['prompt_embeds'])}, "
             f"pooled {tuple(sd3['pooled'])}", fontsize=8, va="center")
    fig.savefig(fig_path, dpi=110)
    print("SD3 folder and embeddings look complete")

# %% [markdown]
# ## Training data: the training split only, thousands of images
# Training scenes' training views; `n_prior_scenes` more procedural *training-split* scenes rendered
# here for the prior alone (their own seed stream, training photographs only, no codec); multi-scale
# crops of the training photographs (from close-ups to whole photos); procedural textures. Held out:
# the training scenes' test views (every 8th), never trained on. Evaluation scenes and photographs are
# not read; the corpus's seeds and layouts go into `prior.json`, and the benchmark asserts that no
# evaluation scene is among them.

# %%
if train_here:
    train_imgs, held_imgs, corpus = training_images(repo_path("data", profile, "scenes"), n_textures, image_size, seed,
                                                    n_prior_scenes, prior_scene_views, prior_scene_gaussians, n_photo_crops)
    n_train = len(train_imgs)
    print(f"{n_train} training images ({corpus['counts']}), {len(held_imgs)} held-out images, "
          f"{held_imgs[0].shape[0]}x{held_imgs[0].shape[1]} px")

# %% [markdown]
# ## Train the autoencoder, then the transformer
# `build_prior` trains the autoencoder on CPU, then the transformer on `dit_device` for `dit_steps` steps or
# `dit_time_budget_s` seconds, whichever ends first; `save_prior` writes SD3's folder layout in fp16.

# %%
if train_here:
    restorer, log, timings = build_prior(to_pm1(train_imgs), cfg, seed, dit_time_budget_s, device=pick_device(dit_device))
    save_prior(restorer, out_dir, dtype=torch.float16)
    print(f"trained in {timings['vae_s']:.0f} s (VAE) + {timings['dit_s']:.0f} s (DiT on {timings['dit_device']})")

# %% [markdown]
# ## Or: a transformer trained elsewhere (`prior_from`)
# `adopt_prior` checks the folder's `dit_log.json` against this stage (configuration, seed, profile, training
# scenes) and copies it to `data/<profile>/prior`; only the held-out views are read here, and the run's loss curve
# (block means) stands in for the training log.

# %%
if adopted:
    a = adopt_prior(repo_path(prior_from), out_dir, repo_path("data", profile, "scenes"), cfg, seed, profile)
    dit_log, corpus, held_imgs, n_train, log, timings = (a[k] for k in ("dit_log", "corpus", "held", "n_train", "log",
                                                                          "timings"))
    print(f"copied {prior_from}: transformer trained on {dit_log['device']} for {dit_log['steps_done']} steps "
          f"({dit_log['seconds_dit']:.0f} s, batch {dit_log['batch']}); {n_train} training images there")

# %% [markdown]
# ## Quality gates, on what downstream stages load (the fp16 folder, read back)
# - VAE round trip on held-out images: PSNR >= 28 dB and ST-LPIPS <= 0.10;
# - one-step denoising at t0: encode a clean held-out image, noise it to $\sigma_{t_0}$, take
#   $\hat x = x_{t_0} - \sigma_{t_0} v$, decode (`denoise_from_t0`): within 2.5 dB of the round trip, the ceiling
#   of what a restorer distilled from this prior can denoise;
# - K-step img2img from t0 (`Restorer.img2img`) on compressed renders (training scenes' test views) must not make
#   them worse on average (ST-LPIPS);
# - no lattice: the periodic-artifact score (`nifi_utils.measure.metrics.periodic_artifact`, 8-px lattice
#   frequencies against their spectral neighbourhood) of one-step denoising and of img2img exceeds the
#   clean images' by less than 0.05 (log10 power ratio). Also reported, not gated: the round trip's, and
#   the decoder's on a latent off by white noise (does a small latent error become a block?).

# %%
if source == "train":
    prior = Restorer.from_pretrained(out_dir, dtype=torch.float32)
    n_params, size_mb = parameter_counts(prior), folder_mb(out_dir)
    print(f"{out_dir.relative_to(repo_path())}: {n_params} parameters, {size_mb:.1f} MB")
    held = to_pm1(held_imgs)
    clean = held * 0.5 + 0.5
    rt, den, nz = heldout_reconstructions(prior, held, t0, seed)
    lq, gt = compressed_test_views(repo_path("data", profile, "renders"), [sc["name"] for sc in corpus["scenes"]])
    i2i = torch.cat([prior.img2img(lq[i:i + 16], t0=t0, steps=img2img_steps, seed=seed) for i in range(0, len(lq), 16)])
    gates = quality_gates(clean, rt, den, nz, lq, gt, i2i, img2img_steps)
    checks = {
        f"vae_psnr_at_least_{gate_vae_psnr}": gates["vae_psnr_db"] >= gate_vae_psnr,
        f"vae_stlpips_at_most_{gate_vae_stlpips}": gates["vae_stlpips_alex"] <= gate_vae_stlpips,
        f"denoise_within_{gate_denoise_gap_db}_db_of_vae": gates["denoise_gap_db"] <= gate_denoise_gap_db,
        "img2img_not_worse_than_compressed": gates["img2img_stlpips_alex"] <= gates["compressed_stlpips_alex"],
        f"denoise_periodic_excess_below_{gate_periodic_excess}": gates["periodic_excess_denoise_t0"] < gate_periodic_excess,
        f"img2img_periodic_excess_below_{gate_periodic_excess}": gates["periodic_excess_img2img"] < gate_periodic_excess,
    }
    for k, v in gates.items():
        print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
    for k, v in checks.items():
        print(f"{'PASS' if v else 'FAIL'}  {k}")

# %% [markdown]
# ## What the prior can do: reconstructions, one-step denoising, img2img, samples, loss curves
# The samples start from pure noise (`sample_from_noise`: 20 Euler steps, classifier-free guidance 3).

# %%
if source == "train":
    samples = sample_from_noise(prior, 4, image_size, seed + 1)
    n = min(4, len(held))
    rows = [("held-out clean", clean[:n]), ("VAE round trip", rt[:n]), ("decode(z + 0.1 noise)", nz[:n]),
            (f"one-step denoise t0={t0}", den[:n]),
            ("compressed", lq[:n]), (f"img2img K={img2img_steps}", i2i[:n]), ("samples (CFG 3)", samples[:n])]
    fig, axes = plt.subplots(len(rows) + 1, n, figsize=(2.2 * n, 2.2 * (len(rows) + 1)))
    for r, (name, ims) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(ims[c].permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    for ax in axes[-1]:
        ax.remove()
    ax = fig.add_subplot(len(rows) + 1, 1, len(rows) + 1)
    dl = [e["loss"] for e in log if e["phase"] == "dit"]
    vl = [e["l1"] + vae_lambda_stlpips * e["stlpips"] for e in log if e["phase"] == "vae"]
    if adopted:  # block means of the run's loss, at their steps
        ax.plot([e["step"] for e in log if e["phase"] == "dit"], dl,
                label=f"DiT flow loss ({dit_log['device']}, means of {dit_log['loss_every']} steps)")
    else:
        ax.plot(np.convolve(dl, np.ones(20) / 20, mode="valid") if len(dl) > 40 else dl, label="DiT flow loss")
    if vl:
        ax.plot(vl, label="VAE L1 + ST-LPIPS")
    ax.set_yscale("log"), ax.legend(fontsize=7), ax.set_xlabel("step", fontsize=7)
    fig.tight_layout()
    fig.savefig(fig_path, dpi=110)
    plt.show()

# %% [markdown]
# ## Report
# At this size the prior is a good autoencoder and a competent low-noise denoiser; its samples from
# pure noise are not scenes (a few-million-parameter transformer trained on CPU).
# NiFi only needs the low-noise end (t0 = 199) and the score differences along it.

# %%
if source == "train":
    report = {"source": "train", "config": cfg.__dict__, "timings": timings, "n_params": n_params, "corpus": corpus,
              "folder_mb": size_mb, "n_train_images": n_train, "n_held_out": len(held), "gates": gates,
              "checks": checks, "gates_enforced": enforce_gates, "scaling_factor": prior.scaling_factor,
              "loss_log": log[:: max(1, len(log) // 400)], "metric_backends": {k: METRIC_BACKENDS[k] for k in ("psnr", "stlpips_alex", "periodic")},
              "seconds": round(time.time() - t_start, 1), "provenance": provenance(profile, seed, "cpu")}
    if adopted:  # where the transformer was trained, and how (the training log's loss curve is `loss_log` above)
        report["prior_from"] = {"folder": prior_from, "dit_log": {k: v for k, v in dit_log.items() if k != "loss_curve"}}
    report_path.write_text(json.dumps(report, indent=1))
    if enforce_gates and not all(checks.values()):
        raise NifiError(f"prior quality gates failed: {[k for k, v in checks.items() if not v]}")
print(f"stage time {time.time() - t_start:.0f} s")
