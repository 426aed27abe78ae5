"""NiFi distillation on a tiny SD3-architecture model: finite losses, only LoRA moves, alternation,
exact resume through accelerate's save_state/load_state, a NaN that stops training, export, and a short overfit
that helps."""
import random

import numpy as np
import pytest
import torch

from nifi_utils.core.common import NifiError
from nifi_utils.models.distill import Distiller, DistillConfig, PairSet
from nifi_utils.models.folders import tiny_sd3
from nifi_utils.models.restorer import Restorer


def _pairs(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    hq = torch.stack([(0.5 + 0.4 * torch.sin(8 * xx + 3 * k) * torch.cos(5 * yy)) for k in range(3)])
    hq = (hq[None] * (0.7 + 0.3 * torch.rand(n, 3, 1, 1, generator=g))).clamp(0, 1)
    lq = torch.nn.functional.avg_pool2d(hq, 3, 1, 1) + 0.05 * torch.randn(hq.shape, generator=g)
    to8 = lambda t: (t.clamp(0, 1) * 255).round().byte()  # noqa: E731
    return PairSet(to8(lq), to8(hq), [("s", 0, str(i)) for i in range(n)])


CFG = dict(rank=4, critic_rank=4, batch=2, crop=32, lr_g=1e-3, lr_c=1e-3, cfg_scale=2.0, seed=0, perceptual="stlpips_alex")


def _distiller(**kw):
    torch.manual_seed(0)
    return Distiller(tiny_sd3(seed=0), DistillConfig(**{**CFG, **kw}))


def test_losses_finite_only_lora_changes_and_updates_alternate():
    d = _distiller()
    base = {n: p.detach().clone() for m in (d.r.transformer, d.r.vae, d.critic) for n, p in m.named_parameters()
            if "lora_" not in n}
    gen0 = [p.detach().clone() for p in d.gen_params]
    crit0 = [p.detach().clone() for p in d.crit_params]
    hist = d.train(_pairs(), 3)
    assert all(np.isfinite([v for k, v in h.items() if k != "step"]).all() for h in hist)
    assert all({"l_kl", "l2", "perceptual", "loss_g", "loss_c"} <= set(h) for h in hist)
    assert any(not torch.equal(a, b) for a, b in zip(gen0, d.gen_params))  # generator moved
    assert any(not torch.equal(a, b) for a, b in zip(crit0, d.crit_params))  # critic moved
    now = {n: p for m in (d.r.transformer, d.r.vae, d.critic) for n, p in m.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base[n], now[n]) for n in base)  # frozen weights untouched
    assert d.opt_g.state_dict()["state"][0]["step"] == 3 and d.opt_c.state_dict()["state"][0]["step"] == 3


def test_no_tsd_variant_skips_the_critic():
    d = _distiller(tsd_weight=0.0)
    crit0 = [p.detach().clone() for p in d.crit_params]
    hist = d.train(_pairs(), 2)
    assert "l_kl" not in hist[-1] and "loss_c" not in hist[-1]
    assert all(torch.equal(a, b) for a, b in zip(crit0, d.crit_params))


def _global_rngs():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    """5 steps straight = 2 steps, accelerate's save_state, load_state into a fresh distiller, 3 more steps (and
    again from the checkpoint the resumed run wrote at step 4 over the first): same LoRA weights, optimizer states
    and losses, exactly; the global RNGs (accelerate's) and the shared stream (registered) come back."""
    pairs, ckpt = _pairs(), tmp_path / "ckpt"
    a = _distiller(checkpoint_every=2)
    a.train(pairs, 5)
    b = _distiller(checkpoint_every=2)
    b.train(pairs, 2, checkpoint_dir=ckpt)  # "interrupted" after step 2
    saved_rngs, saved_stream = _global_rngs(), b.gen.get_state()
    # accelerate's folder: LoRA weights only (phi-, phi+), both optimizers, this rank's RNGs, the registered state
    assert sorted(f.name for f in ckpt.iterdir()) == ["custom_checkpoint_0.pkl", "model.safetensors",
                                                      "model_1.safetensors", "optimizer.bin", "optimizer_1.bin",
                                                      "random_states_0.pkl"]
    from safetensors.torch import load_file

    lora = [load_file(ckpt / f) for f in ("model.safetensors", "model_1.safetensors")]
    assert [len(w) for w in lora] == [len(b.gen_params), len(b.crit_params)]
    assert all("lora_" in k for w in lora for k in w)
    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # a new process's RNGs
    c = _distiller(checkpoint_every=2)
    assert Distiller.has_checkpoint(ckpt)
    c.load_checkpoint(ckpt)
    assert c.step == 2 and len(c.history) == 2 and c.acc.step == b.acc.step
    assert torch.equal(c.gen.get_state(), saved_stream)
    rngs = _global_rngs()
    assert torch.equal(rngs[0], saved_rngs[0]) and (rngs[1] == saved_rngs[1]).all() and rngs[2] == saved_rngs[2]
    c.train(pairs, 5, checkpoint_dir=ckpt)  # writes step 4 over step 2 (renamed into place)
    assert not any(p.name != "ckpt" for p in tmp_path.iterdir())  # no .partial / .old left behind
    for p, q in zip(a.gen_params + a.crit_params, c.gen_params + c.crit_params):
        assert torch.equal(p, q)
    assert c.history == a.history  # every logged loss, exactly
    for oa, oc in ((a.opt_g, c.opt_g), (a.opt_c, c.opt_c)):
        sa, sc = oa.state_dict()["state"], oc.state_dict()["state"]
        assert all(torch.equal(sa[k][n], sc[k][n]) for k in sa for n in ("step", "exp_avg", "exp_avg_sq"))
    d = _distiller(checkpoint_every=2)
    d.load_checkpoint(ckpt)
    assert d.step == 4
    d.train(pairs, 5)
    assert all(torch.equal(p, q) for p, q in zip(a.gen_params + a.crit_params, d.gen_params + d.crit_params))
    assert d.history == a.history


def test_a_checkpoint_of_other_lora_shapes_is_refused_in_one_line(tmp_path):
    _distiller().save_checkpoint(tmp_path / "ckpt")
    d = _distiller(rank=2)
    with pytest.raises(NifiError, match="other LoRA weights") as e:
        d.load_checkpoint(tmp_path / "ckpt")
    assert "\n" not in str(e.value)


def test_a_nan_in_the_tsd_gradient_stops_training_in_one_line():
    d = _distiller()
    d.train(_pairs(), 1)
    before = [p.detach().clone() for p in d.gen_params]
    cfg = d._cfg
    d._cfg = lambda *a, **k: [v * float("nan") for v in cfg(*a, **k)]  # the teacher's velocities turn NaN
    with pytest.raises(NifiError) as e:
        d.train(_pairs(), 3)
    assert str(e.value).startswith("step 2: the TSD gradient (Eq. 5) has NaN/Inf values") and "\n" not in str(e.value)
    assert d.step == 1 and all(torch.equal(a, b) for a, b in zip(before, d.gen_params))  # stopped before the update


def test_export_is_the_official_format_and_reloads(tmp_path):
    from nifi_utils.models.folders import save_prior

    save_prior(tiny_sd3(seed=0), tmp_path / "prior")
    d = _distiller()
    d.train(_pairs(), 2)
    d.export(tmp_path / "nifi.pt")
    sd = torch.load(tmp_path / "nifi.pt", weights_only=True)
    # the official entries, plus "nifi": how the checkpoint was trained (plain values; the official loader reads
    # only 'vae' and 'transformer')
    assert set(sd) == {"vae", "transformer", "nifi"} and sd["vae"] and sd["transformer"]
    assert sd["nifi"]["t0"] == d.cfg.t0 and sd["nifi"]["latent"] == d.cfg.latent and sd["nifi"]["vae_lora"] == "encoder"
    r = Restorer.from_pretrained(tmp_path / "prior").load_lora(tmp_path / "nifi.pt")
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(r.restore(img, seed=3), d.r.restore(img, seed=3), atol=1e-5)


def test_short_overfit_on_one_pair_reduces_its_stlpips():
    from nifi_utils.measure.metrics import stlpips

    pairs = _pairs(n=1)
    d = _distiller(tsd_weight=0.0, lr_g=3e-3, batch=1, crop=32, latent="mean")
    lq, hq = pairs.lq.float() / 255, pairs.hq.float() / 255
    before = float(stlpips(d.r.restore(lq, seed=0), hq))
    d.train(pairs, 40)
    after = float(stlpips(d.r.restore(lq, seed=0), hq))
    assert after < before


@pytest.mark.gpu
def test_a_training_step_on_cuda_with_bf16_autocast():
    d = Distiller(tiny_sd3(seed=0).to("cuda"), DistillConfig(**{**CFG, "mixed_precision": "bf16"}))
    hist = d.train(_pairs(), 2)
    assert np.isfinite([v for k, v in hist[-1].items() if k != "step"]).all()


# ---------------------------------------------------------------- the lattice term
def test_lattice_l2_sees_a_grid_and_not_white_noise_or_smooth_error():
    from nifi_utils.models.distill import lattice_l2

    g = torch.Generator().manual_seed(0)
    white = 0.1 * torch.randn(4, 3, 64, 64, generator=g)
    # white noise of variance s^2 scores ~s^2 (Parseval, orthonormal DFT): it is not concentrated on the grid
    assert lattice_l2(white, 8).item() == pytest.approx(0.01, rel=0.15)
    # the same energy repeating every 8 px lands entirely on the grid's harmonics: ~64x its pixel MSE
    tile = 0.1 * torch.randn(1, 3, 8, 8, generator=g)
    grid = tile.repeat(4, 1, 8, 8)
    grid = grid - grid.mean((-2, -1), keepdim=True)  # no mean colour: that is not a lattice
    mse = grid.pow(2).mean().item()
    assert lattice_l2(grid, 8).item() > 30 * mse
    # a smooth error (a ramp across the crop) and a constant offset are not a lattice either
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    smooth = 0.1 * torch.sin(torch.pi * xx)[None, None].expand(1, 3, 64, 64)
    assert lattice_l2(smooth, 8).item() < 0.02 * smooth.pow(2).mean().item()
    assert lattice_l2(torch.full((1, 3, 64, 64), 0.3), 8).item() < 1e-10
    assert lattice_l2(torch.zeros(1, 3, 64, 64), 8).item() == 0.0


def test_lattice_l2_gradient_matches_finite_differences():
    from nifi_utils.models.distill import lattice_l2

    x = torch.randn(1, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    # float64 all the way: lattice_l2 promotes only lower precisions to float32
    assert torch.autograd.gradcheck(lambda t: lattice_l2(t, 8), (x,))


def test_lattice_weight_is_a_training_term_logged_every_step():
    d = _distiller(lattice_weight=5.0)
    hist = d.train(_pairs(), 2)
    assert all("lattice" in h and np.isfinite(h["lattice"]) for h in hist)
    d0 = _distiller(lattice_weight=0.0)  # logged even when it is not trained on
    assert "lattice" in d0.train(_pairs(), 1)[-1]
    assert d.lattice_period == d.r.vae_scale_factor * d.r.transformer.config.patch_size
    with pytest.raises(Exception, match="lattice_weight"):
        DistillConfig(lattice_weight=-1.0)
