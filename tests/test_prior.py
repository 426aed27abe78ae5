"""The offline prior: PCA autoencoder, SD3 folder layout round trip, a tiny training run."""
import numpy as np
import torch

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
