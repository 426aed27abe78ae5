"""The one-step restorer: official checkpoint format, Eq. 7, tiling, image layouts, the restore CLI."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nifi_utils.pipeline.cli import main
from nifi_utils.core.common import REPO_ROOT, NifiError
from nifi_utils.models.folders import save_prior, tiny_sd3
from nifi_utils.models.restorer import TRANSFORMER_LORA_TARGETS, Restorer, read_image, vae_lora_targets, write_image


def _randomize_lora(r, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    for m in (r.transformer, r.vae):
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=g) * std


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """A tiny SD3-architecture prior folder and an official-format LoRA checkpoint for it."""
    root = tmp_path_factory.mktemp("prior")
    r = tiny_sd3(seed=0)
    save_prior(r, root / "prior")
    r.add_lora(rank=4)
    _randomize_lora(r)
    r.save_lora(root / "nifi.pt")
    return root / "prior", root / "nifi.pt", r


def test_schedule_matches_the_spec():
    r = tiny_sd3()
    t, s0, s1 = r.schedule(199)
    assert t == 199 and s0 == pytest.approx(0.19792, abs=1e-5) and s1 == pytest.approx(0.002994, abs=1e-6)
    assert r.schedule(None) == (1000.0, 1.0, 0.0)


def test_one_step_equals_an_independent_reimplementation_of_eq7():
    """x^ = x_t0 - (sigma_t0 - sigma_next) v(x_t0, t0), x_t0 = sigma eps + (1 - sigma) x; sigmas from the
    shifted schedule sigma = 3 s / (1 + 2 s), s = k / 1000, written out here without the scheduler."""
    r = tiny_sd3(seed=1)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 8, 10, generator=g)
    eps = torch.randn(2, 4, 8, 10, generator=g)
    s = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    sig = 3 * s / (1 + 2 * s)
    i = int(torch.argmin((1000 * sig - 199).abs()))
    s0, s1 = float(sig[i]), float(sig[-1])
    x_t = s0 * eps + (1 - s0) * z
    with torch.no_grad():
        v = r.transformer(hidden_states=x_t, encoder_hidden_states=r.prompt_embeds.expand(2, -1, -1),
                          pooled_projections=r.pooled.expand(2, -1), timestep=torch.full((2,), 199.0)).sample
        expect = x_t - (s0 - s1) * v
        got = r.one_step(z, 199, noise=eps)
        # w/o t0: no noise, sigma 1 -> 0 at t = 1000
        v1 = r.transformer(hidden_states=z, encoder_hidden_states=r.prompt_embeds.expand(2, -1, -1),
                           pooled_projections=r.pooled.expand(2, -1), timestep=torch.full((2,), 1000.0)).sample
        got1 = r.one_step(z, None)
    assert torch.allclose(got, expect, atol=1e-5)
    assert torch.allclose(got1, z - v1, atol=1e-5)


def test_lora_targets_follow_the_official_lists(prior):
    _, _, r = prior
    names = {n.rsplit(".lora_A", 1)[0] for n, _ in r.transformer.named_parameters() if "lora_A" in n}
    for suffix in ("attn.to_q", "attn.add_k_proj", "attn.to_out.0", "ff.net.0.proj", "norm1.linear", "norm_out.linear",
                   "proj_out", "pos_embed.proj"):
        assert any(n.endswith(suffix) for n in names), suffix
    assert not any("decoder" in n for n in r.vae_targets)
    # SD3's VAE architecture (random weights): the official 32 encoder modules
    from diffusers import AutoencoderKL

    sd3_vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16)
    assert len(vae_lora_targets(sd3_vae)) == 32


def test_checkpoint_reloads_through_the_cli_with_identical_output(prior, tmp_path):
    base, ckpt, r = prior
    img = torch.rand(1, 3, 30, 44, generator=torch.Generator().manual_seed(5))
    write_image(tmp_path / "lq.png", img)
    lq, _ = read_image(tmp_path / "lq.png")
    expect = r.restore(lq, t0=199, seed=7)
    rc = main(["restore", "--lq", str(tmp_path / "lq.png"), "--out", str(tmp_path / "out.png"),
               "--base-model", str(base), "--ckpt", str(ckpt), "--seed", "7", "--device", "cpu"])
    assert rc == 0
    got = np.asarray(Image.open(tmp_path / "out.png"))
    ref = (expect[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(got, ref)
    # a different seed gives a different result; the LoRA matters
    other = Restorer.from_pretrained(base).restore(lq, t0=199, seed=7)
    assert (other - expect).abs().max() > 1e-3


def test_ckpt_none_runs_the_prior_without_lora(prior, tmp_path):
    base, _, _ = prior
    img = torch.rand(1, 3, 16, 12, generator=torch.Generator().manual_seed(8))
    write_image(tmp_path / "lq.png", img)
    lq, _ = read_image(tmp_path / "lq.png")
    expect = Restorer.from_pretrained(base).restore(lq, t0=199, seed=2)
    assert main(["restore", "--lq", str(tmp_path / "lq.png"), "--out", str(tmp_path / "out.png"), "--base-model",
                 str(base), "--ckpt", "none", "--seed", "2", "--device", "cpu"]) == 0
    ref = (expect[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), ref)


def test_checkpoint_errors_are_clear(prior, tmp_path):
    base, ckpt, _ = prior
    sd = torch.load(ckpt, weights_only=True)
    sd["transformer"]["transformer_blocks.9.attn.to_q.lora_A.weight"] = torch.zeros(4, 16)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(NifiError, match="unexpected transformer keys.*transformer_blocks.9"):
        Restorer.from_pretrained(base).load_lora(tmp_path / "extra.pt")
    torch.save({"unet": {}}, tmp_path / "wrong.pt")
    with pytest.raises(NifiError, match="expected a dict with keys 'vae' and 'transformer'"):
        Restorer.from_pretrained(base).load_lora(tmp_path / "wrong.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(NifiError, match="not a loadable checkpoint"):
        Restorer.from_pretrained(base).load_lora(tmp_path / "junk.pt")
    with pytest.raises(NifiError, match="no prior model.*make repro"):
        Restorer.from_pretrained(tmp_path / "nothing")


def _official_model(base, rank=4, seed=None):
    """The prior's models with adapters added the way the official restorer.py does (peft through diffusers'
    add_adapter, adapter name 'default', the official target lists); LoRA B randomised when `seed` is given."""
    from peft import LoraConfig

    r = Restorer.from_pretrained(base)
    r.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=TRANSFORMER_LORA_TARGETS), adapter_name="default")
    r.vae.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                 target_modules=vae_lora_targets(r.vae)), adapter_name="default")
    if seed is not None:
        _randomize_lora(r, seed)
    return r


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nifi_utils", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=300)


def test_official_checkpoint_restores_through_the_cli(prior, tmp_path):
    """(a) a checkpoint saved as the official code's models hold it ({part: lora_ keys of state_dict()})."""
    base, _, _ = prior
    off = _official_model(base, seed=11)
    ckpt = {part: {k: v for k, v in m.state_dict().items() if "lora_" in k}
            for part, m in (("vae", off.vae), ("transformer", off.transformer))}
    assert any(".lora_A.default." in k for k in ckpt["transformer"]) and ckpt["vae"]
    torch.save(ckpt, tmp_path / "official.pt")
    img = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(6))
    write_image(tmp_path / "lq.png", img)
    lq, _ = read_image(tmp_path / "lq.png")
    with torch.no_grad():
        expect = off.restore(lq, seed=3)
    assert main(["restore", "--lq", str(tmp_path / "lq.png"), "--out", str(tmp_path / "out.png"), "--base-model",
                 str(base), "--ckpt", str(tmp_path / "official.pt"), "--seed", "3", "--device", "cpu"]) == 0
    got = np.asarray(Image.open(tmp_path / "out.png")).astype(np.int16)
    ref = (expect[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.int16)
    assert np.abs(got - ref).max() <= 1
    plain = (Restorer.from_pretrained(base).restore(lq, seed=3)[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.int16)
    assert np.abs(got - plain).max() > 3  # the LoRA has an effect


def test_our_checkpoint_loads_the_official_way(prior):
    """(b) load_state_dict(ckpt[part], strict=False) with zero unexpected keys and every LoRA entry set."""
    base, ckpt, r = prior
    sd = torch.load(ckpt, weights_only=True)
    off = _official_model(base)
    for part, m in (("vae", off.vae), ("transformer", off.transformer)):
        res = m.load_state_dict(sd[part], strict=False)
        assert len(res.unexpected_keys) == 0
        assert not [k for k in res.missing_keys if "lora_" in k]
        mine = r.vae if part == "vae" else r.transformer
        theirs = dict(m.named_parameters())
        for k, v in mine.named_parameters():
            if "lora_" in k:
                assert torch.equal(theirs[k], v)


def test_peft_form_checkpoint_still_loads(prior, tmp_path):
    from peft import get_peft_model_state_dict

    base, ckpt, r = prior
    torch.save({"vae": get_peft_model_state_dict(r.vae), "transformer": get_peft_model_state_dict(r.transformer)},
               tmp_path / "peft.pt")
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    a = Restorer.from_pretrained(base).load_lora(tmp_path / "peft.pt").restore(img, seed=1)
    b = Restorer.from_pretrained(base).load_lora(ckpt).restore(img, seed=1)
    assert torch.equal(a, b)


def test_bad_checkpoints_and_tiny_images_give_one_line(prior, tmp_path):
    """(c) one foreign key, a file that is not a checkpoint, another rank: one line, exit 2; a 1x1 image
    restores to a 1x1 image."""
    base, ckpt, _ = prior
    sd = torch.load(ckpt, weights_only=True)
    sd["transformer"]["transformer_blocks.0.attn.to_q.lora_A.default.bias"] = torch.zeros(4)
    torch.save(sd, tmp_path / "foreign.pt")
    (tmp_path / "empty.ply").write_bytes(b"")
    other = _official_model(base, rank=2)
    torch.save({p: {k: v for k, v in m.state_dict().items() if "lora_" in k}
                for p, m in (("vae", other.vae), ("transformer", other.transformer))}, tmp_path / "rank2.pt")
    Image.fromarray(np.full((1, 1, 3), 90, np.uint8)).save(tmp_path / "dot.png")
    common = ["restore", "--lq", str(tmp_path / "dot.png"), "--base-model", str(base), "--device", "cpu"]
    for bad, msg in [("foreign.pt", "unexpected transformer keys"), ("empty.ply", "not a loadable checkpoint")]:
        res = _run_cli(*common, "--out", str(tmp_path / "o.png"), "--ckpt", str(tmp_path / bad))
        assert res.returncode == 2 and msg in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    # rank is read from the tensors: a rank-2 checkpoint loads into a fresh restorer as rank 2
    r2 = Restorer.from_pretrained(base).load_lora(tmp_path / "rank2.pt")
    assert any(p.shape[0] == 2 for n, p in r2.transformer.named_parameters() if "lora_A" in n)
    with pytest.raises(NifiError, match="has shape"):
        Restorer.from_pretrained(base).load_lora(ckpt).load_lora(tmp_path / "rank2.pt")
    res = _run_cli(*common, "--out", str(tmp_path / "dot_out.png"), "--ckpt", str(ckpt))
    assert res.returncode == 0, res.stderr[-800:]
    assert Image.open(tmp_path / "dot_out.png").size == (1, 1)


def test_tiling_without_effect_when_the_tile_covers_the_latent(prior):
    _, _, r = prior
    img = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    plain = r.restore(img, seed=3)
    assert torch.equal(plain, r.restore(img, seed=3, tile=64))
    tiled = r.restore(img, seed=3, tile=4)
    assert tiled.shape == plain.shape and torch.isfinite(tiled).all()


@pytest.mark.parametrize("mode, size", [("L", (31, 17)), ("RGBA", (40, 23)), ("I;16", (25, 19)), ("RGB", (959, 640))])
def test_cli_keeps_size_and_layout(prior, tmp_path, mode, size):
    base, ckpt, _ = prior
    rng = np.random.default_rng(0)
    w, h = size
    if mode == "I;16":
        im = Image.fromarray((rng.random((h, w)) * 65535).astype(np.uint16))
    elif mode == "L":
        im = Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8), "L")
    else:
        im = Image.fromarray((rng.random((h, w, len(mode))) * 255).astype(np.uint8), mode)
    im.save(tmp_path / "in.png")
    extra = ["--tile", "96"] if w > 500 else []
    r = subprocess.run([sys.executable, "-m", "nifi_utils", "restore", "--lq", str(tmp_path / "in.png"),
                        "--out", str(tmp_path / "out.png"), "--base-model", str(base), "--ckpt", str(ckpt),
                        "--device", "cpu", *extra], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    out = Image.open(tmp_path / "out.png")
    assert out.size == (w, h)
    assert {"L": "L", "RGBA": "RGBA", "RGB": "RGB"}.get(mode, "I;16") == out.mode or (mode == "I;16" and out.mode.startswith("I"))
    if mode == "RGBA":
        assert np.array_equal(np.asarray(out)[..., 3], np.asarray(im)[..., 3])


def test_cli_folder_and_errors(prior, tmp_path):
    base, ckpt, _ = prior
    (tmp_path / "lq").mkdir()
    for i in range(2):
        Image.fromarray(np.full((12, 14, 3), 40 * i, np.uint8)).save(tmp_path / "lq" / f"v{i}.png")
    assert main(["restore", "--lq", str(tmp_path / "lq"), "--out", str(tmp_path / "hq"), "--base-model", str(base),
                 "--ckpt", str(ckpt), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "hq").iterdir()) == ["v0.png", "v1.png"]
    for args, msg in [(["--lq", str(tmp_path / "missing.png")], "--lq not found"),
                      (["--lq", str(tmp_path / "lq"), "--base-model", str(tmp_path / "none")], "no prior model"),
                      (["--lq", str(tmp_path / "lq"), "--t0", "5000"], "--t0 must be"),
                      (["--lq", str(tmp_path / "lq"), "--dtype", "fp8"], "--dtype must be")]:
        full = ["restore", "--out", str(tmp_path / "o"), "--device", "cpu", "--ckpt", str(ckpt)] + args
        if "--base-model" not in args:
            full += ["--base-model", str(base)]
        r = subprocess.run([sys.executable, "-m", "nifi_utils", *full], capture_output=True, text=True, cwd=REPO_ROOT)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(NifiError, match="not a readable image"):
        read_image(tmp_path / "bad.png")


def test_bf16_runs_on_cpu(prior):
    base, ckpt, r = prior
    rb = Restorer.from_pretrained(base, dtype=torch.bfloat16)
    rb.load_lora(ckpt)
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    out = rb.restore(img, seed=1)
    assert out.dtype == torch.float32 and (out - r.restore(img, seed=1)).abs().mean() < 0.05


@pytest.mark.gpu
def test_cuda_restore_matches_cpu(prior):
    base, ckpt, _ = prior
    img = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(4))
    cpu = Restorer.from_pretrained(base).load_lora(ckpt).restore(img, seed=2)
    gpu = Restorer.from_pretrained(base, device="cuda").load_lora(ckpt).to("cuda").restore(img, seed=2)
    assert gpu.device == img.device and (gpu - cpu).abs().max() < 1e-3  # same seeded noise on both devices
    bf = Restorer.from_pretrained(base, device="cuda", dtype=torch.bfloat16).load_lora(ckpt).to("cuda").restore(img, seed=2)
    assert (bf - cpu).abs().mean() < 0.05


def test_decoder_lora_is_an_extension_the_official_loader_refuses(prior, tmp_path):
    """`vae_lora: encoder_decoder` adapts the decoder too; its checkpoint says so ("nifi" entry), reloads into a fresh
    restorer with the same output, and a restorer holding the official encoder-only adapters refuses it in one line."""
    base, _, _ = prior
    r = Restorer.from_pretrained(base)
    r.add_lora(rank=4, vae_lora="encoder_decoder")
    assert any(t.startswith("decoder.") for t in r.vae_targets) and any(t.startswith("encoder.") for t in r.vae_targets)
    _randomize_lora(r, seed=4)
    r.save_lora(tmp_path / "dec.pt", meta={"t0": 49, "latent": "mean", "vae_lora": "encoder_decoder"})
    img = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    back = Restorer.from_pretrained(base).load_lora(tmp_path / "dec.pt")
    assert back.meta["t0"] == 49 and back.restore_defaults() == {"t0": 49, "sample": False}
    assert torch.equal(back.restore(img, t0=49, sample=False), r.restore(img, t0=49, sample=False))
    # the decoder's adapter matters
    enc_only = {"transformer": r.lora_state_dict()["transformer"],
                "vae": {k: v for k, v in r.lora_state_dict()["vae"].items() if not k.startswith(("decoder.", "post_quant_conv."))}}
    torch.save(enc_only, tmp_path / "enc.pt")
    assert (Restorer.from_pretrained(base).load_lora(tmp_path / "enc.pt").restore(img, t0=49, sample=False)
            - r.restore(img, t0=49, sample=False)).abs().max() > 1e-3
    # the official loader's strictness: encoder adapters (the official list) refuse decoder keys
    with pytest.raises(NifiError, match="unexpected vae keys.*decoder"):
        _official_model(base).load_lora(tmp_path / "dec.pt")
    with pytest.raises(NifiError, match="vae_lora must be one of"):
        Restorer.from_pretrained(base).add_lora(rank=4, vae_lora="decoder")


def test_restore_without_flags_uses_the_checkpoints_t0_and_latent(prior, tmp_path):
    """A checkpoint trained at t0 49 with the posterior mean restores that way by default (the old default
    t0 199 made a new user's first restore worse than none); flags still override."""
    base, _, _ = prior
    r = Restorer.from_pretrained(base)
    r.add_lora(rank=4)
    _randomize_lora(r, seed=9)
    r.save_lora(tmp_path / "t49.pt", meta={"t0": 49, "latent": "mean"})
    write_image(tmp_path / "lq.png", torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(3)))
    lq, _ = read_image(tmp_path / "lq.png")

    def as_png(x):
        return (x[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)

    common = ["--lq", str(tmp_path / "lq.png"), "--base-model", str(base), "--ckpt", str(tmp_path / "t49.pt"), "--device", "cpu"]
    assert main(["restore", "--out", str(tmp_path / "a.png"), *common]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), as_png(r.restore(lq, t0=49, seed=0, sample=False)))
    assert main(["restore", "--out", str(tmp_path / "b.png"), "--t0", "199", "--latent", "sample", *common]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), as_png(r.restore(lq, t0=199, seed=0, sample=True)))
    assert main(["restore", "--out", str(tmp_path / "c.png"), "--t0", "abc", *common]) == 2


def test_restore_without_flags_gives_the_benchmarks_nifi_images(prior, tmp_path):
    """The benchmark restores each variant with the t0 and latent mode of its distill config; the CLI with no flags
    reads them from the checkpoint: both give the same image (a new user's first restore is the benchmark's)."""
    from nifi_utils.eval import benchmark as B

    base, _, _ = prior
    r = Restorer.from_pretrained(base)
    r.add_lora(rank=4, vae_lora="encoder_decoder")
    _randomize_lora(r, seed=5)
    cfg = {"t0": 49, "latent": "mean"}
    (tmp_path / "restorer").mkdir()
    r.save_lora(tmp_path / "restorer" / "nifi.pt", meta={**cfg, "vae_lora": "encoder_decoder"})
    im = (np.random.default_rng(0).random((24, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(im).save(tmp_path / "view.png")
    fn = B.nifi_restore_fn("nifi", base, tmp_path / "restorer", cfg, torch.device("cpu"), seed=0, tile=None)
    bench, _ = B._timed(fn, im, torch.device("cpu"))
    assert main(["restore", "--lq", str(tmp_path / "view.png"), "--out", str(tmp_path / "out.png"), "--base-model", str(base),
                 "--ckpt", str(tmp_path / "restorer" / "nifi.pt"), "--device", "cpu"]) == 0
    ref = (bench.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), ref)
