"""The offline prior: PCA autoencoder, SD3 folder layout round trip, a tiny training run."""
import numpy as np
import pytest
import torch
from PIL import Image

from nifi_utils.models.folders import patch_autoencoder_class, save_prior
from nifi_utils.models.prior import PriorConfig, augment, build_prior, fit_patch_pca, shifted_sigmas, training_sigmas
from nifi_utils.models.restorer import Restorer, vae_lora_targets


def _images(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([torch.sin(6 * xx + k) * torch.cos(4 * yy - k) for k in range(3)])
    return (base[None] * torch.rand(n, 3, 1, 1, generator=g) + 0.1 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)


def test_full_rank_patch_pca_is_an_exact_autoencoder():
    x = _images()
    cm, basis = fit_patch_pca(x, 2, 12)  # 2x2x3 = 12: the complete basis
    ae = patch_autoencoder_class()(latent_channels=12, patch=2, hidden=8, pixel_hidden=4, downsample_factor=2)
    ae.set_pca(cm, basis)
    with torch.no_grad():
        y = ae.decode(ae.encode(x).latent_dist.mode()).sample
    assert torch.allclose(y, x, atol=1e-4)


def test_truncated_pca_equals_the_projection_onto_its_basis():
    x = _images(seed=1)
    cm, basis = fit_patch_pca(x, 4, 16)
    assert torch.allclose(basis @ basis.T, torch.eye(16), atol=1e-4)  # orthonormal rows
    ae = patch_autoencoder_class()(latent_channels=16, patch=4, hidden=8, pixel_hidden=4)
    ae.set_pca(cm, basis)
    with torch.no_grad():
        y = ae(x).sample
    pt = torch.nn.functional.unfold(x - cm[None, :, None, None], 4, stride=4)  # [B, 48, L]
    proj = basis.T @ (basis @ pt)
    ref = torch.nn.functional.fold(proj, x.shape[-2:], 4, stride=4) + cm[None, :, None, None]
    assert torch.allclose(y, ref, atol=1e-4)


def test_prior_folder_round_trip_keeps_weights_and_scaling_factor(tmp_path):
    cfg = PriorConfig(vae_steps=0, dit_steps=0, vae_hidden=8, vae_pixel_hidden=4, dit_layers=1, dit_heads=2,
                      dit_head_dim=8, text_dim=16, caption_dim=16, pooled_dim=8, text_len=4, image_size=32,
                      augment_copies=1, vae_lambda_stlpips=0.0)
    r, _, _ = build_prior(_images(), cfg, seed=0)
    sf = r.scaling_factor
    assert sf != 1.0  # set from the latents' spread
    save_prior(r, tmp_path / "prior")
    r2 = Restorer.from_pretrained(tmp_path / "prior")
    assert type(r2.vae).__name__ == "PatchAutoencoder" and r2.scaling_factor == sf
    for a, b in zip(r.vae.state_dict().values(), r2.vae.state_dict().values()):
        assert torch.equal(a, b)
    img = _images(1, 32, seed=3) * 0.5 + 0.5
    assert torch.allclose(r.restore(img, seed=1), r2.restore(img, seed=1), atol=1e-6)
    assert torch.equal(r2.null_embeds, torch.zeros_like(r2.null_embeds))
    names = vae_lora_targets(r2.vae)
    assert "encoder.conv_in" in names and "encoder.conv_out" in names and any("mid_block.resnets" in n for n in names)
    assert not any(n.startswith("decoder") for n in names)


def test_tiny_training_run_is_finite_and_learns():
    cfg = PriorConfig(vae_steps=8, vae_batch=4, vae_crop=16, dit_steps=40, dit_batch=8, vae_hidden=8,
                      vae_pixel_hidden=4, dit_layers=1, dit_heads=2, dit_head_dim=8, text_dim=16, caption_dim=16,
                      pooled_dim=8, text_len=4, image_size=32, augment_copies=2, vae_lambda_stlpips=0.0, dit_lr=1e-3)
    r, log, timings = build_prior(_images(8), cfg, seed=0)
    dit = [e["loss"] for e in log if e["phase"] == "dit"]
    vae = [e["l1"] for e in log if e["phase"] == "vae"]
    assert len(dit) == 40 and len(vae) == 8 and np.isfinite(dit + vae).all()
    assert np.mean(dit[-10:]) < np.mean(dit[:10])


def test_augmentation_and_sigma_shift():
    x = _images(4)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.abs().max() <= 1
    u = torch.linspace(0, 1, 11)
    s = shifted_sigmas(u, 3.0)
    assert s[0] == 0 and s[-1] == 1 and torch.all(s >= u)  # the shift moves mass to high noise


def test_training_sigmas_mix_the_shifted_logit_normal_with_the_low_noise_range():
    def draw(frac):
        cfg = PriorConfig(dit_batch=4000, low_sigma_frac=frac, low_sigma_max=0.3)
        return training_sigmas(cfg, torch.Generator().manual_seed(0))

    plain, mixed, low = draw(0.0), draw(0.5), draw(1.0)
    assert torch.equal(plain, shifted_sigmas(torch.sigmoid(torch.randn(4000, generator=torch.Generator().manual_seed(0))), 3.0))
    assert low.min() >= 0 and low.max() <= 0.3 and low.std() > 0.05  # spread over the range, not a constant
    below = [float((s < 0.25).float().mean()) for s in (plain, mixed, low)]
    assert below[0] < 0.05 and 0.35 < below[1] < 0.5 and below[2] > 0.8  # the mixture puts its share where t0 is


def test_overlapping_autoencoder_starts_as_patch_pca_and_reaches_its_neighbours():
    x = _images(seed=2)
    cm, basis = fit_patch_pca(x, 4, 16)
    cls = patch_autoencoder_class()
    plain = cls(latent_channels=16, patch=4, hidden=8, pixel_hidden=4).set_pca(cm, basis)
    lapped = cls(latent_channels=16, patch=4, hidden=8, pixel_hidden=4, overlap=2, n_res_pixel=3).set_pca(cm, basis)
    with torch.no_grad():
        assert torch.allclose(plain(x).sample, lapped(x).sample, atol=1e-5)
        # with trained (here: random) border taps, one latent's footprint is its patch plus 2 px on every side
        lapped.decoder.conv_out.weight.normal_()
        z = torch.zeros(1, 16, 6, 6)
        d = lapped.decoder.conv_out(z + torch.nn.functional.pad(torch.ones(1, 16, 1, 1), (2, 3, 2, 3)))
        d0 = lapped.decoder.conv_out(z)
        rows, cols = torch.nonzero((d - d0).abs().sum((0, 1)) > 1e-6, as_tuple=True)
        assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (6, 13, 6, 13)


def test_training_with_latent_noise_runs_and_logs_it():
    cfg = PriorConfig(vae_steps=3, dit_steps=2, vae_hidden=8, vae_pixel_hidden=4, dit_layers=1, dit_heads=2,
                      dit_head_dim=8, text_dim=16, caption_dim=16, pooled_dim=8, text_len=4, image_size=32, vae_crop=16,
                      vae_batch=2, dit_batch=2, augment_copies=1, vae_lambda_stlpips=0.0, vae_overlap=2, vae_res_pixel=2,
                      vae_latent_noise=0.3)
    r, log, _ = build_prior(_images(), cfg, seed=0, dit_time_budget_s=60)
    vae = [e for e in log if e["phase"] == "vae"]
    assert len(vae) == 3 and all(np.isfinite(e["noisy_l1"]) for e in vae)
    assert r.vae.config.overlap == 2


# ---------------------------------------------------------------------- the stage's pieces (notebooks/02_prior.py)
def _tiny_prior():
    cfg = PriorConfig(vae_steps=0, dit_steps=0, vae_hidden=8, vae_pixel_hidden=4, dit_layers=1, dit_heads=2,
                      dit_head_dim=8, text_dim=16, caption_dim=16, pooled_dim=8, text_len=4, image_size=32,
                      augment_copies=1, vae_lambda_stlpips=0.0)
    return build_prior(_images(), cfg, seed=0)[0]


def test_heldout_reconstructions_draw_what_the_stage_drew():
    from nifi_utils.models.prior import denoise_from_t0, heldout_reconstructions

    prior, held, t0, seed = _tiny_prior(), _images(20, seed=4), 199, 3
    rt, den, nz = heldout_reconstructions(prior, held, t0, seed)
    # the stage's loop as it was written inline: per batch of 16, the t0 noise, then the latent error
    g = torch.Generator().manual_seed(seed)
    _, s0, _ = prior.schedule(t0)
    want = [], [], []
    with torch.no_grad():
        for i in range(0, len(held), 16):
            x = held[i:i + 16]
            z = prior.encode(x, sample=False)
            want[0].append(prior.decode(z, x.shape[-2:]).clamp(-1, 1))
            noise = torch.randn(z.shape, generator=g)
            x_t = s0 * noise + (1 - s0) * z
            want[1].append(prior.decode(x_t - s0 * prior.velocity(x_t, t0), x.shape[-2:]).clamp(-1, 1))
            want[2].append(prior.decode(z + 0.1 * torch.randn(z.shape, generator=g), x.shape[-2:]).clamp(-1, 1))
            assert torch.equal(denoise_from_t0(prior, z, t0, noise), x_t - s0 * prior.velocity(x_t, t0))
    for got, w in zip((rt, den, nz), want):
        assert torch.equal(got, torch.cat(w) * 0.5 + 0.5)
    assert rt.shape == held.shape and 0 <= float(nz.min()) and float(nz.max()) <= 1


def test_samples_from_noise_are_the_stage_euler_loop():
    from nifi_utils.models.prior import sample_from_noise

    prior = _tiny_prior()
    got = sample_from_noise(prior, 2, 32, seed=5, steps=4, guidance=3.0)
    with torch.no_grad():
        sig = prior.sampler_sigmas(1000, 4)
        gs = torch.Generator().manual_seed(5)
        xs = torch.randn(2, prior.transformer.config.in_channels, 32 // prior.vae_scale_factor,
                         32 // prior.vae_scale_factor, generator=gs)
        for a, b in zip(sig[:-1], sig[1:]):
            xs = xs - (a - b) * prior.guided_velocity(xs, 1000 * a, guidance=3.0)
        want = (prior.decode(xs, (32, 32)) * 0.5 + 0.5).clamp(0, 1)
    assert torch.equal(got, want) and got.shape == (2, 3, 32, 32)


def test_compressed_test_views_are_scene_by_scene_in_file_order(tmp_path):
    from nifi_utils.models.prior import compressed_test_views

    rng = np.random.default_rng(0)
    for s in ("train_00", "train_01"):
        for sub in ("gt", "level0", "level1"):
            (tmp_path / s / sub).mkdir(parents=True)
            for v in ("0000.png", "0008.png"):
                Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(tmp_path / s / sub / v)
    lq, gt = compressed_test_views(tmp_path, ["train_00", "train_01"])
    # what the stage read before: every train_*/level*/*.png in sorted path order, its ground truth beside it
    files = sorted(tmp_path.glob("train_*/level*/*.png"))
    read = lambda f: torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)  # noqa: E731
    assert torch.equal(lq, torch.stack([read(f) for f in files]).float() / 255)
    assert torch.equal(gt, torch.stack([read(f.parent.parent / "gt" / f.name) for f in files]).float() / 255)
    assert lq.is_contiguous() and gt.is_contiguous() and lq.shape == (8, 3, 6, 5)


def test_quality_gates_measure_each_pair_and_keep_their_order():
    from nifi_utils.measure.metrics import psnr
    from nifi_utils.models.prior import quality_gates

    a, b = _images(4, 32, seed=6) * 0.5 + 0.5, _images(4, 32, seed=7) * 0.5 + 0.5
    g = quality_gates(a, a, b, a, b, a, a, 10)
    assert list(g)[:5] == [f"periodic_excess_{k}" for k in ("vae", "denoise_t0", "decoder_noise", "img2img", "compressed")]
    assert g["vae_psnr_db"] == float("inf") and g["vae_stlpips_alex"] < 1e-6 and g["periodic_excess_vae"] == 0
    assert g["denoise_t0_psnr_db"] == float(np.mean([psnr(x[None], y[None]) for x, y in zip(b, a)]))
    assert g["img2img_pairs"] == 4 and g["img2img_steps"] == 10 and g["compressed_psnr_db"] == g["denoise_t0_psnr_db"]


def test_sd3_folder_check(tmp_path):
    from nifi_utils.core.common import NifiError
    from nifi_utils.models.folders import TinySD3Config, tiny_sd3
    from nifi_utils.models.prior import check_sd3_folder
    from nifi_utils.models.restorer import save_embeddings

    with pytest.raises(NifiError, match="lacks"):
        check_sd3_folder(tmp_path / "nothing", tmp_path / "e.npz")
    r = tiny_sd3(TinySD3Config(text_dim=32, pooled_dim=16, text_len=8))
    save_prior(r, tmp_path / "sd3")
    with pytest.raises(NifiError, match="prompt embeddings .* missing"):
        check_sd3_folder(tmp_path / "sd3", tmp_path / "e.npz")
    emb = save_embeddings(tmp_path / "e.npz", r.prompt_embeds, r.pooled)
    got = check_sd3_folder(tmp_path / "sd3", emb)
    assert got == {"sd3_dir": str(tmp_path / "sd3"), "embeddings": str(emb), "prompt_embeds": [1, 8, 32], "pooled": [1, 16]}
    save_embeddings(tmp_path / "wide.npz", torch.zeros(1, 8, 64), r.pooled)
    with pytest.raises(NifiError, match="does not fit SD3"):
        check_sd3_folder(tmp_path / "sd3", tmp_path / "wide.npz")


def test_adopting_a_prior_checks_its_run_before_copying(tmp_path):
    import json
    from dataclasses import asdict

    from nifi_utils.core.common import NifiError
    from nifi_utils.models.prior import PRIOR_SUBFOLDERS, adopt_prior

    cfg = PriorConfig()
    src = tmp_path / "gpu_prior"
    for sub in PRIOR_SUBFOLDERS:
        (src / sub).mkdir(parents=True)
        (src / sub / "x.bin").write_bytes(sub.encode())
    scenes = tmp_path / "scenes"
    (scenes / "train_00" / "images").mkdir(parents=True)
    im = np.zeros((4, 4, 3), np.uint8)
    for i in range(9):
        Image.fromarray(im + i).save(scenes / "train_00" / "images" / f"{i:04d}.png")
    (scenes / "train_00" / "transforms.json").write_text(json.dumps({
        "split": "train", "seed": 1, "layout_id": "ab", "test_ids": [0, 8],
        "frames": [{"file_path": f"images/{i:04d}.png"} for i in range(9)]}))
    log = {"config": asdict(cfg), "seed": 0, "profile": "cpu", "device": "cuda", "seconds_dit": 12.0,
           "latents": [4, 16, 8, 8], "corpus": {"scenes": [{"name": "train_00", "seed": 1, "layout_id": "ab"}],
                                                "counts": {"a": 5, "b": 2}},
           "loss_curve": [{"step": 0, "loss_mean": 1.0, "lr": 1e-4}]}
    out = tmp_path / "prior"

    def write(**kw):
        (src / "dit_log.json").write_text(json.dumps({**log, **kw}))

    write(config={**asdict(cfg), "dit_steps": 1})
    with pytest.raises(NifiError, match="other parameters"):
        adopt_prior(src, out, scenes, cfg, 0, "cpu")
    write(seed=1)
    with pytest.raises(NifiError, match="seed/profile"):
        adopt_prior(src, out, scenes, cfg, 0, "cpu")
    write(corpus={**log["corpus"], "scenes": []})
    with pytest.raises(NifiError, match="training scenes"):
        adopt_prior(src, out, scenes, cfg, 0, "cpu")
    assert not out.exists()  # nothing copied on a mismatch
    write()
    a = adopt_prior(src, out, scenes, cfg, 0, "cpu")
    assert all((out / sub / "x.bin").read_bytes() == sub.encode() for sub in PRIOR_SUBFOLDERS)
    assert a["n_train"] == 7 and len(a["held"]) == 2 and int(a["held"][1][0, 0, 0]) == 8
    assert a["log"] == [{"phase": "dit", "step": 0, "loss": 1.0, "lr": 1e-4}] and a["timings"]["dit_device"] == "cuda"
