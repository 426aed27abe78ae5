"""Synthesis on two CPU ranks through `accelerate launch` (gloo): the bitstreams of one process, byte for byte, and
the records gathered in scene order; a failing rank is one line naming the rank and the scene, with no partial
output left behind."""
import hashlib
import os
import shutil

import pytest
import torch

from nifi_utils.core.common import NifiError
from nifi_utils.gs.scenes import SceneSpec, build_scenes
from nifi_utils.pipeline.synthesis import OUTPUT_DIRS, SynthesisConfig, synthesize, synthesize_ranks

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif((os.cpu_count() or 1) < 2 and not torch.cuda.is_available(), reason="needs 2 cores")]


def _scenes(root):
    specs = [SceneSpec("train_00", 11, "train", 400, 4, 24, 24), SceneSpec("eval_00", 22, "eval", 400, 4, 24, 24)]
    build_scenes(specs, root, workers=1)
    return sorted(d for d in root.iterdir() if d.is_dir())


def _cfg():
    return SynthesisConfig(n_levels=2, c_min=64, n_max=200, sh_degrees=[0, 0], pos_bits=10, finetune={"steps": 3},
                           anchors=[])


def _digests(root):
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.nifi"))}


def test_two_ranks_write_the_bitstreams_of_one_process(tmp_path):
    dirs = _scenes(tmp_path / "scenes")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: float sums in the same order
    try:
        one = synthesize(dirs, tmp_path / "one", _cfg(), 0, "0/1", "cpu")
    finally:
        torch.set_num_threads(threads)
    two = synthesize_ranks(dirs, tmp_path / "two", _cfg(), 0, 2)
    assert [r["scene"] for r in two] == [d.name for d in dirs]
    d1, d2 = _digests(tmp_path / "one"), _digests(tmp_path / "two")
    assert len(d1) == 4 and d1 == d2
    for a, b in zip(one, two):  # the gathered records are the scenes' own (timings aside)
        assert [(lv["n_gaussians"], lv["psnr"]) for lv in a["levels"]] == [(lv["n_gaussians"], lv["psnr"]) for lv in b["levels"]]


def test_a_failing_rank_is_one_line_naming_the_scene_and_leaves_no_output(tmp_path):
    dirs = _scenes(tmp_path / "scenes")
    shutil.rmtree(dirs[1] / "images")  # rank 1 takes scene 1: its ground-truth images are missing
    with pytest.raises(NifiError) as e:
        synthesize_ranks(dirs, tmp_path / "out", _cfg(), 0, 2)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"rank 1 failed in scene {dirs[1].name}: ")
    assert not any((tmp_path / "out" / sub).exists() for sub in OUTPUT_DIRS)
