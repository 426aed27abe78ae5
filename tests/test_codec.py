"""The .nifi codec: quantization bounds, exact round trips, size accounting, entropy bound, corrupt files."""
import struct
import zlib

import numpy as np
import pytest
import torch

from conftest import random_scene
from nifi_utils.codec import container as codec
from nifi_utils.core.common import NifiError


def test_quantization_error_is_at_most_half_a_step():
    rng = np.random.default_rng(0)
    vals = rng.normal(size=(500, 4)).astype(np.float32) * [1, 10, 0.01, 100]
    for bits in (1, 4, 8, 12):
        lo, hi = codec.channel_ranges(vals)
        sym = codec.quantize(vals, [bits] * 4, lo, hi)
        assert sym.min() >= 0 and sym.max() <= 2**bits - 1
        back = codec.dequantize(sym, [bits] * 4, lo, hi)
        step = (hi.astype(np.float64) - lo) / (2**bits - 1)
        assert np.all(np.abs(back - vals) <= step / 2 * (1 + 1e-5) + 1e-6)
        # extremes are representable exactly (up to float32)
        np.testing.assert_allclose(back.min(0), lo, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(back.max(0), hi, rtol=1e-6, atol=1e-6)


def test_constant_channel_quantizes_to_one_symbol():
    vals = np.full((10, 2), 3.25, np.float32)
    lo, hi = codec.channel_ranges(vals)
    sym = codec.quantize(vals, [8, 8], lo, hi)
    assert (sym == 0).all() and np.array_equal(codec.dequantize(sym, [8, 8], lo, hi), vals)


def test_fake_quantize_matches_codec_and_passes_gradients():
    x = torch.randn(50, 3, dtype=torch.float64, requires_grad=True)
    q = codec.fake_quantize(x, [6, 6, 6])
    lo, hi = codec.channel_ranges(x.detach().float().numpy())
    ref = codec.dequantize(codec.quantize(x.detach().numpy(), [6] * 3, lo, hi), [6] * 3, lo, hi)
    assert np.abs(q.detach().numpy() - ref).max() < 1e-5
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through


@pytest.mark.parametrize("deg", [0, 1, 3])
def test_round_trip_equals_quantized_attributes(deg):
    scene = random_scene(300, sh_degree=3, seed=deg)
    enc = codec.encode_scene(scene, sh_degree=deg, bits=8, pos_bits=12, level=2)
    dec, head = codec.decode_bytes(enc.data)
    assert head["n_gaussians"] == 300 and head["sh_degree"] == deg and head["level"] == 2
    vals = codec.scene_to_channels(scene, deg).numpy()
    lo, hi = codec.channel_ranges(vals)
    bits = codec.default_bits(deg, 8, 12)
    expect = codec.dequantize(codec.quantize(vals, bits, lo, hi), bits, lo, hi)
    got = codec.scene_to_channels(dec, deg).numpy()
    got[:, 3:7] = dec.quats.numpy()  # stored quaternions are already unit, w >= 0: compare them as decoded
    rows = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731 - the codec may reorder Gaussians
    assert np.array_equal(rows(got), rows(expect))
    # decoding twice gives bit-identical scenes; re-encoding the decoded scene gives the same symbols
    dec2, _ = codec.decode_bytes(enc.data)
    assert all(torch.equal(a, b) for a, b in zip(dec.tensors().values(), dec2.tensors().values()))


def test_quaternion_sign_is_canonical_and_rotation_kept():
    scene = random_scene(50, seed=3)
    scene.quats[:25] *= -2.0  # same rotations, other sign and norm
    ch = codec.scene_to_channels(scene, 0)
    assert (ch[:, 3] >= 0).all()
    assert torch.allclose(ch[:, 3:7].norm(dim=1), torch.ones(50), atol=1e-6)


@pytest.mark.parametrize("models", [("categorical",), ("gaussian",), ("laplace",), ("categorical", "gaussian", "laplace")])
@pytest.mark.parametrize("delta", [False, True])
def test_every_entropy_model_round_trips(models, delta):
    scene = random_scene(200, seed=5)
    scene.sh[:, 0] = torch.linspace(0, 1, 200)[:, None]  # a smooth channel, where delta coding wins
    enc = codec.encode_scene(scene, sh_degree=1, models=models, allow_delta=delta)
    predicted = [name for name, t in enc.stats["transforms"].items() if t != "raw"]
    assert bool(predicted) == delta  # the smooth channel and the quaternion's w are worth predicting
    dec, _ = codec.decode_bytes(enc.data)
    ref, _ = codec.decode_bytes(codec.encode_scene(scene, sh_degree=1, models=("categorical",), allow_delta=False).data)
    assert all(torch.equal(a, b) for a, b in zip(dec.tensors().values(), ref.tensors().values()))


def test_size_is_the_file_and_payload_near_entropy(tmp_path):
    scene = random_scene(4000, seed=1)
    enc = codec.encode_scene(scene, sh_degree=0, models=("categorical",), allow_delta=False)
    path = enc.save(tmp_path / "a.nifi")
    assert path.stat().st_size == enc.nbytes == enc.stats["bytes"]
    assert enc.stats["payload_bytes"] + enc.stats["side_bytes"] == enc.nbytes
    # ANS with the exact empirical histograms: payload within 2% of N*H (computed independently here).
    # Positions are sent as the gaps between sorted Morton codes: bit length (entropy-coded) + the bits
    # below the leading one (uniform); every other channel as is (no prediction without allow_delta).
    vals = codec.scene_to_channels(scene, 0).numpy()
    lo, hi = codec.channel_ranges(vals)
    sym = codec.quantize(vals, codec.default_bits(0), lo, hi)

    def entropy_bytes(x):
        _, counts = np.unique(x, return_counts=True)
        return -(counts * np.log2(counts / counts.sum())).sum() / 8

    code = sorted(sum(((int(p[a]) >> b) & 1) << (3 * b + a) for b in range(12) for a in range(3)) for p in sym[:, :3])
    gaps = np.diff([0] + code)
    e = np.array([int(g).bit_length() for g in gaps])
    h = entropy_bytes(e) + np.maximum(e - 1, 0).sum() / 8
    h += sum(entropy_bytes(sym[:, c]) for c in range(3, sym.shape[1]))
    assert h <= enc.stats["payload_bytes"] <= 1.02 * h + 8
    rep = codec.size_report(enc.nbytes, ply_bytes=248 * 4000)
    assert rep["MB"] == enc.nbytes / 1e6 and rep["MiB"] == enc.nbytes / 2**20
    assert rep["ratio_to_ply"] == pytest.approx(248 * 4000 / enc.nbytes)


def test_auto_models_never_larger_than_histograms_alone():
    scene = random_scene(300, seed=2)
    auto = codec.encode_scene(scene, sh_degree=0).nbytes
    hist = codec.encode_scene(scene, sh_degree=0, models=("categorical",)).nbytes
    assert auto <= hist + 16  # model choice uses estimates; allow a few bytes of ANS rounding


def test_empty_scene_round_trips():
    scene = random_scene(10).subset(torch.zeros(10, dtype=torch.bool))
    dec, head = codec.decode_bytes(codec.encode_scene(scene, sh_degree=0).data)
    assert head["n_gaussians"] == 0 and len(dec) == 0


def test_non_finite_and_bad_arguments_are_refused():
    scene = random_scene(20)
    with pytest.raises(NifiError, match="bits"):
        codec.encode_scene(scene, bits=0)
    with pytest.raises(NifiError, match="sh_degree"):
        codec.encode_scene(scene, sh_degree=4)
    scene.means[3, 0] = float("nan")
    with pytest.raises(NifiError, match="non-finite"):
        codec.encode_scene(scene)


@pytest.fixture
def small_file():
    return codec.encode_scene(random_scene(120, seed=4), sh_degree=1).data


def test_foreign_truncated_and_flipped_files_raise_one_clear_error(small_file, tmp_path):
    with pytest.raises(NifiError, match="not a .nifi file"):
        codec.decode_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(NifiError, match="not a .nifi file"):
        codec.decode_bytes(b"")
    for cut in (9, 20, len(small_file) // 2, len(small_file) - 1):
        with pytest.raises(NifiError, match="truncated|checksum"):
            codec.decode_bytes(small_file[:cut])
    flipped = bytearray(small_file)
    flipped[len(flipped) // 2] ^= 0x10
    with pytest.raises(NifiError, match="checksum"):
        codec.decode_bytes(bytes(flipped))
    bad_version = bytearray(small_file)
    bad_version[8] = 99
    with pytest.raises(NifiError, match="version 99"):
        codec.decode_bytes(bytes(bad_version))
    with pytest.raises(NifiError, match="no such"):
        codec.load(tmp_path / "missing.nifi")


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_huge_count_with_valid_checksum_is_refused_before_allocation(small_file):
    body = bytearray(small_file[:-4])
    struct.pack_into("<I", body, 14, codec.MAX_GAUSSIANS - 1)  # n_gaussians field
    with pytest.raises(NifiError, match="histogram counts|cannot hold|implausible"):
        codec.decode_bytes(_with_crc(bytes(body)))
    struct.pack_into("<I", body, 14, codec.MAX_GAUSSIANS + 1)
    with pytest.raises(NifiError, match="exceed"):
        codec.decode_bytes(_with_crc(bytes(body)))


def test_fuzz_mutated_files_fail_cleanly(small_file):
    """Random byte mutations, with the checksum recomputed so the parser itself is exercised: every
    outcome is a NifiError or a successful decode with the header's count (never another exception)."""
    rng = np.random.default_rng(0)
    outcomes = {"error": 0, "decoded": 0}
    for _ in range(300):
        body = bytearray(small_file[:-4])
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, min(len(body), 400)))  # header, models and the start of the payload
            body[pos] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            body = body[: int(rng.integers(8, len(body)))]
        try:
            scene, head = codec.decode_bytes(_with_crc(bytes(body)))
            assert len(scene) == head["n_gaussians"] <= codec.MAX_GAUSSIANS
            outcomes["decoded"] += 1
        except NifiError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 0


def test_delta_coding_and_z_order_round_trip():
    sym = np.array([5, 0, 255, 3, 3, 200], np.int32)
    assert np.array_equal(codec.delta_decode(codec.delta_encode(sym, 8), 8), sym)
    pos = np.array([[3, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 1]])
    order = codec.morton_order(pos, 2)
    assert order.tolist() == [1, 3, 2, 0]  # codes: (0,0,0)=0, (0,0,1)=4, (1,1,1)=7, (3,0,0)=9


def test_version_1_files_are_refused_in_one_line():
    """Version-1 files (an early encoder's) are no longer read: a clear error, not a wrong scene."""
    from pathlib import Path

    data = bytearray(codec.encode_scene(random_scene(20, seed=3), sh_degree=1, bits=6, pos_bits=9).data)
    struct.pack_into("<H", data, 8, 1)
    struct.pack_into("<I", data, len(data) - 4, zlib.crc32(bytes(data[:-4])))
    with pytest.raises(NifiError, match="version 1 is not supported"):
        codec.decode_bytes(bytes(data))


def test_morton_codes_invert():
    rng = np.random.default_rng(1)
    for bits in (1, 10, 16):
        pos = rng.integers(0, 2**bits, size=(500, 3))
        assert np.array_equal(codec.morton_positions(codec.morton_codes(pos, bits), bits), pos)


@pytest.mark.parametrize("transform", sorted(codec.TRANSFORMS))
@pytest.mark.parametrize("context", sorted(codec.CONTEXTS))
def test_every_transform_and_context_decodes_exactly(monkeypatch, transform, context):
    """Force one prediction and one context split on every channel that allows them, so that each
    decoder path runs; the Gaussians must equal those of the plainest coding."""
    def forced(sym_c, bits, cand, ctx, models):
        t = transform if transform in cand else 0
        r = sym_c if cand[t] is None else codec._residual(sym_c, cand[t], bits)
        kind = context if context in ctx and codec._thresholds(ctx[context], 4) else 0
        th = codec._thresholds(ctx[kind], 4) if kind else []
        b = codec._buckets(ctx[kind], th) if kind else np.zeros(len(r), np.int64)
        return codec._ChannelCode(t, kind, th, codec._fit(r, b, len(th) + 1, bits, models), r, b)

    scene = random_scene(400, seed=7)
    plain, _ = codec.decode_bytes(codec.encode_scene(scene, sh_degree=1, allow_delta=False).data)
    monkeypatch.setattr(codec, "_code_channel", forced)
    enc = codec.encode_scene(scene, sh_degree=1)
    used = set(enc.stats["transforms"].values()), {k for k, _ in enc.stats["contexts"].values()}
    assert codec.TRANSFORMS[transform] in used[0] and codec.CONTEXTS[context] in used[1]
    dec, _ = codec.decode_bytes(enc.data)
    assert all(torch.equal(a, b) for a, b in zip(dec.tensors().values(), plain.tensors().values()))


def test_quaternion_w_costs_few_bits_once_x_y_z_are_known():
    """A unit quaternion has 3 degrees of freedom: w is sent as a correction to sqrt(1 - x^2 - y^2 - z^2)."""
    scene = random_scene(3000, seed=8)
    per = codec.encode_scene(scene, sh_degree=0).stats["channel_bits_per_gaussian"]
    assert per["qw"] < 0.5 * min(per["qx"], per["qy"], per["qz"])


def test_invalid_channel_description_is_refused(small_file):
    body = bytearray(small_file[:-4])
    struct.pack_into("<B", body, 18, 0)  # first channel (after the 18-byte header): 0 bits
    with pytest.raises(NifiError, match="invalid description"):
        codec.decode_bytes(_with_crc(bytes(body)))
