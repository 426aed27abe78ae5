"""The regression baseline (SwinIR's role in Table 1): identity at the start, any size, reflect borders, a file that
says how to rebuild it, training that lowers its loss, and the `restore --method regression` command."""
import numpy as np
import pytest
import torch
from PIL import Image

from nifi_utils.pipeline.cli import main
from nifi_utils.core.common import NifiError
from nifi_utils.models.distill import HeldoutEval, PairSet
from nifi_utils.models.regression import RegressionConfig, RegressionUNet, load_regression, save_regression, train_regression
from nifi_utils.models.restorer import read_image, write_image


def test_starts_as_the_identity_at_any_size():
    net = RegressionUNet(8, 3)
    for h, w in ((32, 32), (29, 41), (3, 5)):
        x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h))
        y = net(x)
        assert y.shape == x.shape
        assert torch.allclose(y, x, atol=1e-6)


def test_the_paper_sized_network_has_about_half_a_million_parameters():
    n = sum(p.numel() for p in RegressionUNet(32, 3).parameters())
    assert 0.4e6 < n < 0.55e6


def test_no_border_frame_on_a_flat_image():
    """Reflect padding: a trained-looking (random) network maps a constant image to a constant image; zero padding
    would make the border pixels differ from the interior (a frame around the image)."""
    net = RegressionUNet(8, 3)
    torch.nn.init.normal_(net.out.weight, std=0.05)
    x = torch.full((1, 3, 40, 40), 0.4)
    with torch.no_grad():
        y = net(x)
    assert float((y - y[..., :1, :1]).abs().max()) < 1e-5  # each channel constant, border included


def test_save_load_round_trip_and_bad_files(tmp_path):
    net = RegressionUNet(8, 2)
    torch.nn.init.normal_(net.out.weight, std=0.05)
    cfg = RegressionConfig(width=8, scales=2)
    save_regression(net, cfg, tmp_path / "r.pt")
    back = load_regression(tmp_path / "r.pt")
    x = torch.rand(1, 3, 20, 24)
    assert torch.equal(back.restore(x), net.restore(x))
    torch.save({"vae": {}, "transformer": {}}, tmp_path / "lora.pt")
    with pytest.raises(NifiError, match="not a regression restorer"):
        load_regression(tmp_path / "lora.pt")
    with pytest.raises(NifiError, match="not found"):
        load_regression(tmp_path / "missing.pt")
    torch.save({"regression": net.state_dict(), "config": {"width": 16, "scales": 2}}, tmp_path / "wrong.pt")
    with pytest.raises(NifiError, match="do not fit"):
        load_regression(tmp_path / "wrong.pt")


def _pairs(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hq = (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8)
    blur = torch.nn.functional.avg_pool2d(hq.float(), 3, stride=1, padding=1, count_include_pad=False)
    return PairSet(blur.round().to(torch.uint8), hq, [("s", 0, str(i)) for i in range(n)])


def test_training_lowers_the_data_loss_and_writes_a_loadable_file(tmp_path):
    pairs = _pairs()
    lq, hq = pairs.lq.float() / 255, pairs.hq.float() / 255
    ev = HeldoutEval(lq[:2], hq[:2], np.zeros(2, int), trained="stlpips_alex")
    cfg = RegressionConfig(width=8, scales=2, steps=60, batch=2, crop=32, perceptual_weight=0.0, lr=3e-3)
    out = train_regression("regression", cfg, tmp_path / "r.pt", pairs, ev)
    h = out["history"]
    first = np.mean([x["l2"] for x in h[1:6]])
    last = np.mean([x["l2"] for x in h[-5:]])
    assert last < first
    assert "heldout_stlpips_vgg" in h[-1] and "heldout_psnr" in h[-1]  # the judge and the full set at the end
    assert load_regression(tmp_path / "r.pt").restore(lq[:1]).shape == (1, 3, 32, 32)


def test_restore_cli_method_regression(tmp_path):
    net = RegressionUNet(8, 3)
    torch.nn.init.normal_(net.out.weight, std=0.05)
    save_regression(net, RegressionConfig(width=8), tmp_path / "r.pt")
    write_image(tmp_path / "lq.png", torch.rand(1, 3, 30, 22, generator=torch.Generator().manual_seed(1)))
    lq, _ = read_image(tmp_path / "lq.png")
    assert main(["restore", "--method", "regression", "--ckpt", str(tmp_path / "r.pt"), "--lq", str(tmp_path / "lq.png"),
                 "--out", str(tmp_path / "out.png"), "--device", "cpu"]) == 0
    ref = (net.restore(lq)[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), ref)
    assert main(["restore", "--method", "regression", "--ckpt", str(tmp_path / "r.pt"), "--lq", str(tmp_path / "lq.png"),
                 "--out", str(tmp_path / "out2.png"), "--t0", "49"]) == 2
    assert not (tmp_path / "out2.png").exists()
