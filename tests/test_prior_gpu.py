"""The prior's transformer trained elsewhere (scripts/prior_gpu.py): pack, train, the CPU path unchanged."""
import json
import sys
from pathlib import Path
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import prior_gpu  # noqa: E402
from nifi_utils.core.common import repo_path
from nifi_utils.models.prior import PriorConfig, build_transformer, train_transformer, training_images, training_sigmas
from nifi_utils.models.restorer import Restorer

TINY_PRIOR = repo_path("data", "tiny", "prior")


def _fake_scenes(root, n_views=9, size=48):
    """One training scene (view 0 held out, as idx % 8 == 0 does) and one evaluation scene that must not be read."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, split in (("train_00", "train"), ("eval_00", "eval")):
        d = root / name / "images"
        d.mkdir(parents=True)
        frames = []
        for i in range(n_views):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
            frames.append({"file_path": f"images/{i:04d}.png"})
        meta = {"split": split, "seed": 5, "layout_id": 1, "frames": frames, "test_ids": [0, 8]}
        (root / name / "transforms.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pg")
    scenes = _fake_scenes(root / "scenes")
    assert prior_gpu.main(["pack", "--profile", "tiny", "--scenes", str(scenes), "--out", str(root / "corpus")]) == 0
    return root / "corpus", scenes


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_pack_stores_what_the_stage_builds_and_train_writes_a_loadable_prior(corpus, tmp_path):
    folder, scenes = corpus
    p, cfg = prior_gpu.stage_config("tiny")
    train, held, meta = training_images(scenes, cfg.n_textures, cfg.image_size, p["seed"], cfg.n_prior_scenes,
                                        cfg.prior_scene_views, cfg.prior_scene_gaussians, cfg.n_photo_crops)
    # the corpus read back (stored + made again from the seed) is the stage's training set, in its order
    got, got_held, manifest, checks = prior_gpu.load_corpus(folder, "tiny", p)
    assert len(got) == len(train) and all(np.array_equal(a, b) for a, b in zip(got, train))
    assert len(got_held) == len(held) == 2 and manifest["corpus"] == meta
    assert [s["name"] for s in meta["scenes"]] == ["train_00"]  # the evaluation scene was not read
    assert checks == {"stored_identical": True, "photos_differing": [], "generated": len(train) - manifest["stored"],
                      "generated_differing": 0}
    assert (folder / "photos" / "china.png").is_file()  # scikit-learn's photograph travels; scikit-image's do not

    out = tmp_path / "prior"
    assert prior_gpu.main(["train", "--profile", "tiny", "--corpus", str(folder), "--prior", str(TINY_PRIOR),
                           "--out", str(out), "--time-budget-s", "60", "--steps", "3", "--batch", "4",
                           "--val-every", "2"]) == 0
    r = Restorer.from_pretrained(out)
    for f in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
              "embeddings/default.npz", "embeddings/null.npz"):
        assert (out / f).read_bytes() == (TINY_PRIOR / f).read_bytes(), f
    old = Restorer.from_pretrained(TINY_PRIOR)
    strip = lambda c: {k: v for k, v in c.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(r.transformer.config) == strip(old.transformer.config)
    assert next(r.transformer.parameters()).dtype == torch.float32  # fp16 on disk, read back as asked
    assert not torch.equal(r.transformer.proj_out.weight, old.transformer.proj_out.weight)  # a new transformer
    log = json.loads((out / "dit_log.json").read_text())
    assert log["steps_done"] == 3 and log["batch"] == 4 and log["device"] == "cpu" and log["config"]["dit_steps"] == 3
    assert [v["step"] for v in log["val"]] == [2, 3] and all(np.isfinite(list(v.values())).all() for v in log["val"])
    assert np.isfinite(log["heldout_final"]["denoise_t0_psnr_db"])
    with torch.no_grad():
        y = r.restore(torch.rand(1, 3, 48, 48), seed=0)
    assert y.shape == (1, 3, 48, 48) and torch.isfinite(y).all()


def test_train_with_tar_writes_one_archive_and_the_log(corpus, tmp_path):
    folder, _ = corpus
    out = tmp_path / "OUT"
    assert prior_gpu.main(["train", "--profile", "tiny", "--corpus", str(folder), "--prior", str(TINY_PRIOR),
                           "--out", str(out), "--time-budget-s", "60", "--steps", "2", "--tar", "--val-every", "0"]) == 0
    assert sorted(f.name for f in out.iterdir()) == ["dit_log.json", "prior.tar"]
    with tarfile.open(out / "prior.tar") as tf:
        tf.extractall(tmp_path / "x", filter="data")
    r = Restorer.from_pretrained(tmp_path / "x" / "prior")
    assert r.transformer.config.num_layers == 1
    log = json.loads((out / "dit_log.json").read_text())
    assert log == json.loads((tmp_path / "x" / "prior" / "dit_log.json").read_text()) and len(log["val"]) == 1


def test_bad_input_is_one_line_and_exit_2(corpus, tmp_path, capsys):
    folder, scenes = corpus
    base = ["train", "--profile", "tiny", "--prior", str(TINY_PRIOR), "--time-budget-s", "10"]
    cases = [
        (base + ["--corpus", str(tmp_path / "nothing"), "--out", str(tmp_path / "o1")], "manifest.json missing"),
        (base + ["--corpus", str(folder), "--out", str(tmp_path / "o2"), "--steps", "0"], "--steps must be at least 1"),
        (base + ["--corpus", str(folder), "--out", str(TINY_PRIOR)], "would overwrite the prior"),
        (["train", "--profile", "tiny", "--corpus", str(folder), "--prior", str(tmp_path), "--out", str(tmp_path / "o3"),
          "--time-budget-s", "10"], "is not a prior folder"),
        (["pack", "--profile", "tiny", "--scenes", str(tmp_path / "none"), "--out", str(tmp_path / "c")], "no scenes folder"),
        (["pack", "--profile", "tiny", "--scenes", str(scenes), "--out", str(scenes)], "is not a corpus folder"),
    ]
    for argv, msg in cases:
        assert prior_gpu.main(argv) == 2
        assert msg in _one_error_line(capsys), argv
    with pytest.raises(SystemExit) as e:  # argparse: a missing option is one line too
        prior_gpu.main(["train", "--profile", "tiny"])
    assert e.value.code == 2
    _one_error_line(capsys)
    # a corpus packed for another profile or with other corpus parameters is refused
    m = json.loads((folder / "manifest.json").read_text())
    bad = tmp_path / "bad"
    (bad / "train").mkdir(parents=True)
    (bad / "manifest.json").write_text(json.dumps({**m, "params": {**m["params"], "n_textures": 99}}))
    assert prior_gpu.main(base + ["--corpus", str(bad), "--out", str(tmp_path / "o4")]) == 2
    assert "packed with other prior.tiny parameters (['n_textures'])" in _one_error_line(capsys)


def test_wheels_picks_only_what_this_python_lacks_or_has_older(tmp_path, capsys):
    for name in ("no_such_dist_xyz-1.0-py3-none-any.whl", "numpy-0.1-py3-none-any.whl", "numpy-999.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    chosen = prior_gpu.install_wheels(tmp_path, tmp_path / "site", dry_run=True)
    assert sorted(c.split("/")[-1] for c in chosen) == ["no_such_dist_xyz-1.0-py3-none-any.whl", "numpy-999.0-py3-none-any.whl"]
    assert prior_gpu.main(["wheels", "--dir", str(tmp_path / "empty"), "--target", str(tmp_path / "s")]) == 2
    assert "no .whl files" in _one_error_line(capsys)


# ---------------------------------------------------------------------- the CPU path computes what it always did
def _reference_loop(restorer, latents, cfg, seed, log):
    """train_transformer as it was before it learnt about devices (commit 6670d73), without the time budget."""
    g = torch.Generator().manual_seed(seed + 7)
    tr = restorer.transformer
    tr.train()
    opt = torch.optim.AdamW(tr.parameters(), lr=cfg.dit_lr, weight_decay=1e-4)

    def lr_factor(s):
        done = s / max(cfg.dit_steps, 1)
        return min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))) + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    for step in range(cfg.dit_steps):
        idx = torch.randint(len(latents), (cfg.dit_batch,), generator=g)
        x = latents[idx]
        eps = torch.randn(x.shape, generator=g)
        sig = training_sigmas(cfg, g)
        x_t = (1 - sig[:, None, None, None]) * x + sig[:, None, None, None] * eps
        drop = torch.rand(cfg.dit_batch, generator=g) < cfg.prompt_dropout
        pe = torch.where(drop[:, None, None], restorer.null_embeds, restorer.prompt_embeds).expand(cfg.dit_batch, -1, -1)
        pp = torch.where(drop[:, None], restorer.null_pooled, restorer.pooled).expand(cfg.dit_batch, -1)
        v = tr(hidden_states=x_t, encoder_hidden_states=pe, pooled_projections=pp, timestep=1000 * sig,
               return_dict=False)[0]
        loss = F.mse_loss(v, eps - x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        sched.step()
        log.append({"phase": "dit", "step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0]})
    tr.eval()


def _tiny_restorer(cfg, seed=0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from nifi_utils.models.prior import prompt_embeddings

    torch.manual_seed(seed)
    return Restorer(None, build_transformer(cfg), FlowMatchEulerDiscreteScheduler(shift=cfg.shift),
                    *prompt_embeddings(cfg, seed))


@pytest.mark.parametrize("device", [None, "cpu"])
def test_cpu_training_is_the_reference_loop_bit_for_bit(device):
    cfg = PriorConfig(dit_steps=6, dit_batch=4, dit_layers=1, dit_heads=2, dit_head_dim=8, text_dim=16, caption_dim=16,
                      pooled_dim=8, text_len=4, image_size=32, low_sigma_frac=0.5, pos_embed_max_size=16)
    latents = torch.randn(10, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    runs = []
    for loop in ("reference", "new", "new"):
        r, log = _tiny_restorer(cfg), []
        if loop == "reference":
            _reference_loop(r, latents, cfg, 0, log)
        else:
            train_transformer(r, latents, cfg, 0, log, device=device)
        runs.append((log, [p.detach().clone() for p in r.transformer.parameters()]))
    for log, params in runs[1:]:
        assert log == runs[0][0]
        assert all(torch.equal(a, b) for a, b in zip(params, runs[0][1]))
