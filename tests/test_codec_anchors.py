"""Codec anchors: skipped rows without splat-transform, real rows with it, symbol compressors' bytes."""
import lzma

import numpy as np
import pytest

from conftest import front_camera, random_scene
from nifi_utils.codec import container as codec
from nifi_utils.eval import anchors as codec_anchors
from nifi_utils.gs import splat_tools


def test_missing_splat_transform_gives_skipped_rows_with_the_reason(monkeypatch):
    monkeypatch.setattr(splat_tools, "splat_transform_path", lambda: None)
    rows = codec_anchors.codec_anchors(random_scene(200, seed=1), sh_degree=0)
    by = {r["anchor"]: r for r in rows}
    assert set(codec_anchors.FORMATS) <= set(by)
    for f in codec_anchors.FORMATS:
        assert by[f]["bytes"] is None and "splat-transform" in by[f]["skipped"]
    assert by["nifi"]["skipped"] is None and by["nifi"]["bytes"] > 0
    assert by["lzma9e_symbols"]["skipped"] is None


def test_symbol_anchor_is_lzma_of_the_codec_symbols():
    scene = random_scene(300, seed=2)
    sym, bits = codec_anchors.raw_symbols(scene, 0, 8, 10)
    assert sym.shape == (300, len(codec.channel_names(0))) and bits[:3] == [10] * 3
    raw = codec_anchors.packed_symbols(sym, bits)
    assert len(raw) == 300 * (3 * 2 + 11)  # 10-bit positions take two bytes, the rest one
    row = codec_anchors.symbol_anchor_rows(scene, 0, 8, 10)[0]
    assert lzma.decompress(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)) == raw
    assert row["bytes"] == len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))


@pytest.mark.skipif(splat_tools.splat_transform_path() is None, reason=splat_tools.missing_reason())
def test_spz_anchor_round_trips_through_splat_transform(tmp_path):
    scene = random_scene(256, seed=3, sh_degree=0, spread=0.5, log_scale=-2.5)
    cams = [front_camera()]
    rows = codec_anchors.codec_anchors(scene, sh_degree=0, cameras=cams, formats=("spz",), workdir=tmp_path)
    by = {r["anchor"]: r for r in rows}
    assert by["spz"]["skipped"] is None and 0 < by["spz"]["bytes"] < 256 * 62  # smaller than float32 .ply
    # a lossy format: its renders are close to the input's, not equal
    assert 20 < by["spz"]["psnr_vs_input_db"] < np.inf
    assert by["nifi"]["psnr_vs_input_db"] > 20


def test_a_format_the_tool_cannot_write_is_a_skipped_row_not_an_error():
    from nifi_utils.gs.splat_tools import splat_transform_path

    if splat_transform_path() is None:
        pytest.skip("splat-transform not installed")
    import torch

    from nifi_utils.eval.anchors import codec_anchors
    from nifi_utils.gs.gaussians import GaussianScene

    g = torch.Generator().manual_seed(0)
    n = 300
    scene = GaussianScene(means=torch.rand(n, 3, generator=g), quats=torch.randn(n, 4, generator=g),
                          log_scales=torch.full((n, 3), -3.0), opacity_logits=torch.zeros(n),
                          sh=torch.randn(n, 16, 3, generator=g) * 0.3)
    rows = {r["anchor"]: r for r in codec_anchors(scene, 3, formats=("sog", "spz"))}
    assert rows["spz"]["skipped"] is None and rows["spz"]["bytes"] > 0
    # .sog of view-dependent colour needs a GPU here: a reason, not a crash (or bytes, where a GPU exists)
    assert (rows["sog"]["skipped"] or "").startswith("splat-transform could not write .sog") or rows["sog"]["bytes"] > 0
