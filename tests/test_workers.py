"""Independent jobs over worker processes (scenes, distillation variants): the same files and numbers as one
process, results in job order, and a worker's error as one line naming the job."""
import hashlib

import pytest
import torch

from nifi_utils.core.common import NifiError
from nifi_utils.models.distill import DistillConfig, HeldoutEval, PairSet, train_variants
from nifi_utils.models.folders import save_prior, tiny_sd3
from nifi_utils.gs.scenes import SceneSpec, build_scenes


def _specs():
    return [SceneSpec("train_00", 11, "train", 400, 4, 24, 24), SceneSpec("eval_00", 22, "eval", 400, 4, 24, 24)]


def _digests(root):
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_scenes_over_two_workers_are_byte_identical_and_in_spec_order(tmp_path):
    one = build_scenes(_specs(), tmp_path / "one", gt_supersample=2, workers=1)
    two = build_scenes(_specs(), tmp_path / "two", gt_supersample=2, workers=2)
    assert [r["name"] for r in two] == ["train_00", "eval_00"]
    assert one == two
    d1, d2 = _digests(tmp_path / "one"), _digests(tmp_path / "two")
    assert d1 == d2 and any(k.endswith("point_cloud.ply") for k in d1) and any(k.endswith(".png") for k in d1)


def test_a_failing_scene_worker_is_one_line_naming_the_scene(tmp_path):
    (tmp_path / "eval_00").write_text("a file where the scene folder should go")
    with pytest.raises(NifiError, match=r"^scene eval_00 failed in a worker process: \w+") as e:
        build_scenes(_specs(), tmp_path, workers=2)
    assert "\n" not in str(e.value)


def _pairs(n=4, size=32):
    g = torch.Generator().manual_seed(0)
    hq = torch.rand(n, 3, size, size, generator=g)
    lq = torch.nn.functional.avg_pool2d(hq, 3, 1, 1)
    to8 = lambda t: (t.clamp(0, 1) * 255).round().byte()  # noqa: E731
    return PairSet(to8(lq), to8(hq), [("s", 0, str(i)) for i in range(n)])


def _jobs(tmp_path, base, tag):
    pairs = _pairs()
    held = HeldoutEval(pairs.lq[:2].float() / 255, pairs.hq[:2].float() / 255, torch.zeros(2, dtype=torch.long).numpy(), 0,
                       trained="stlpips_vgg")
    cfg = dict(rank=2, critic_rank=2, batch=2, crop=32, cfg_scale=2.0, steps=2, eval_every=1, checkpoint_every=0,
               perceptual_weight=0.0, seed=0)
    return [{"name": name, "cfg": DistillConfig(**{**cfg, **over}), "base_model": str(base),
             "ckpt": str(tmp_path / f"ckpt_{tag}_{name}"), "out_path": str(tmp_path / f"{tag}_{name}.pt"),
             "pairs": pairs, "evaluate": held}
            for name, over in [("nifi", {}), ("nifi_no_tsd", {"tsd_weight": 0.0})]]


def test_variants_over_two_workers_match_one_process(tmp_path):
    base = save_prior(tiny_sd3(seed=0), tmp_path / "prior")
    one = train_variants(_jobs(tmp_path, base, "one"), workers=1)
    two = train_variants(_jobs(tmp_path, base, "two"), workers=2)
    assert [r["name"] for r in two] == ["nifi", "nifi_no_tsd"]
    for a, b in zip(one, two):
        assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] == [0, 1, 2]
        for ha, hb in zip(a["history"], b["history"]):
            assert ha.keys() == hb.keys()
            for k in ha:  # thread counts differ (one process: the default; workers: one each): float noise only
                assert ha[k] == pytest.approx(hb[k], rel=1e-4, abs=1e-6), (a["name"], k)
        assert (tmp_path / f"two_{b['name']}.pt").is_file()


def test_a_failing_variant_worker_is_one_line_naming_the_variant(tmp_path):
    jobs = _jobs(tmp_path, tmp_path / "no_prior_here", "x")
    with pytest.raises(NifiError, match=r"^variant nifi(_no_tsd)? failed in a worker process: NifiError") as e:
        train_variants(jobs, workers=2)
    assert "\n" not in str(e.value)
