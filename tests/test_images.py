"""The lab's one image reader and writer (nifi_utils.core.images): the arrays every caller read before."""
import numpy as np
import pytest
from PIL import Image

from nifi_utils.core.common import NifiError
from nifi_utils.core.images import image_size, read_image, read_rgb, write_image, write_rgb


def _saved(tmp_path, name, im: Image.Image):
    p = tmp_path / name
    im.save(p)
    return p


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA"])
def test_read_rgb_is_pils_rgb_conversion(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8), "RGB")
    im = rgb.convert(mode) if mode != "P" else rgb.quantize(16)
    p = _saved(tmp_path, f"x_{mode}.png", im)
    got = read_rgb(p)
    want = np.asarray(Image.open(p).convert("RGB"))  # what every reader of the lab wrote before
    assert got.dtype == np.uint8 and got.shape == (7, 9, 3)
    assert np.array_equal(got, want)


def test_write_rgb_writes_what_pil_writes(tmp_path):
    u8 = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    out = write_rgb(tmp_path / "a" / "b" / "x.png", u8)  # parents made
    Image.fromarray(u8).save(tmp_path / "ref.png")
    assert out.read_bytes() == (tmp_path / "ref.png").read_bytes()
    assert np.array_equal(read_rgb(out), u8)
    assert image_size(out) == (6, 5)


def test_missing_and_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(NifiError, match="not found"):
        read_rgb(tmp_path / "missing.png")
    with pytest.raises(NifiError, match="not found"):
        image_size(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    for fn in (read_rgb, image_size, read_image):
        with pytest.raises(NifiError, match="not a readable image"):
            fn(tmp_path / "bad.png")
    with pytest.raises(NifiError, match="input image not found"):
        read_image(tmp_path / "missing.png")


def test_read_image_float_layout_round_trip(tmp_path):
    u8 = np.random.default_rng(2).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    p = write_rgb(tmp_path / "x.png", u8)
    t, info = read_image(p)
    assert t.shape == (1, 3, 4, 5) and t.dtype.is_floating_point and info["mode"] == "RGB"
    assert np.array_equal(t[0].permute(1, 2, 0).numpy(), (u8 / 255.0).astype(np.float32))
    write_image(tmp_path / "y.png", t, info)
    assert np.array_equal(read_rgb(tmp_path / "y.png"), u8)  # [0,1] -> 8 bit is exact for 8-bit inputs


def test_the_restorer_and_the_benchmark_read_through_core_images(tmp_path):
    from nifi_utils.eval import benchmark, plots
    from nifi_utils.models import restorer

    assert restorer.read_image is read_image and restorer.write_image is write_image  # the CLI's names stay
    u8 = np.random.default_rng(3).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    p = write_rgb(tmp_path / "renders" / "v.png", u8)
    assert np.array_equal(benchmark.load_rgb(p), u8) and np.array_equal(plots.read_image(p), u8)
