"""Version-1 `.nifi` files: the decoder (bitstreams written before version 2 still decode) and the
encoder, kept only as the "before" of the codec benchmark (`benchmarks/codec.py`); the pipeline writes
version 2 (`codec.py`).

Version 1 (one model per channel, each channel raw or as differences to the previous Gaussian):

    magic b"NIFI3DGS" | version u16 = 1 | level u8 | sh_degree u8 | n_channels u16 | n_gaussians u32
    per channel: bits u8 | model u8 (low 4 bits: model; high 4: 0 raw, 1 delta) | lo f32 | hi f32 |
                 side_len u16 | side bytes (histogram: zlib of varints; parametric: mean, scale f32)
    payload_words u32 | payload (u32 ANS words) | crc32 u32 (over everything before it)
"""
from __future__ import annotations

import math
import struct

import numpy as np
import torch

from . import codec_common as c_
from .codec_common import delta_decode
from .common import NifiError

_CHAN = struct.Struct("<BBffH")
TRANSFORMS = {0: "raw", 1: "delta"}


def encode_v1(scene, sh_degree: int, bits: int = 8, pos_bits: int = 12, level: int = 0,
              models=("categorical", "gaussian", "laplace")):
    """The version-1 encoder (as of commit 596adc1): an `EncodedLevel` with its per-channel stats."""
    import zlib

    import constriction

    n = len(scene)
    bits_c = c_.default_bits(sh_degree, bits, pos_bits)
    values = c_.scene_to_channels(scene.detach().to("cpu", torch.float32), sh_degree).numpy()
    lo, hi = c_.channel_ranges(values)
    sym = c_.quantize(values, bits_c, lo, hi)
    sym = sym[c_.morton_order(sym[:, :3], pos_bits)]
    sent, chosen, transforms = [], [], []
    for c in range(sym.shape[1]):
        best = None
        for t in ((0, 1) if n > 1 else (0,)):
            x = sym[:, c] if t == 0 else c_.delta_encode(sym[:, c], bits_c[c])
            m = c_.choose_model(x, bits_c[c], models if n else ("categorical",))
            if m.kind == "categorical":  # version 1 stored histograms as zlib streams (with header)
                m.side = zlib.compress(zlib.decompress(m.side, -15), 9)
            if best is None or m.est_bits + 8 * len(m.side) < best[1].est_bits + 8 * len(best[1].side):
                best = (t, m, x)
        transforms.append(best[0]), chosen.append(best[1]), sent.append(best[2])
    coder = constriction.stream.stack.AnsCoder()
    for c in reversed(range(sym.shape[1])):
        if n:
            m = chosen[c]
            coder.encode_reverse((sent[c] - m.offset).astype(np.int32), m.constriction_model(bits_c[c]))
    payload = coder.get_compressed().astype("<u4").tobytes() if n else b""
    parts = [c_._HEAD.pack(c_.MAGIC, 1, level, sh_degree, sym.shape[1], n)]
    for c, m in enumerate(chosen):
        mode = c_.MODEL_IDS[m.kind] | (transforms[c] << 4)
        parts.append(_CHAN.pack(bits_c[c], mode, float(lo[c]), float(hi[c]), len(m.side)) + m.side)
    parts.append(struct.pack("<I", len(payload) // 4) + payload)
    body = b"".join(parts)
    data = body + struct.pack("<I", zlib.crc32(body))
    names = c_.channel_names(sh_degree)
    stats = {"bytes": len(data), "payload_bytes": len(payload), "side_bytes": len(data) - len(payload),
             "bits_per_gaussian": 8 * len(data) / max(n, 1),
             "channel_bits_per_gaussian": {name: (m.est_bits + 8 * len(m.side)) / max(n, 1)
                                           for name, m in zip(names, chosen)}}
    return c_.EncodedLevel(data, n, sh_degree, stats)


def decode_v1(data: bytes, head: dict):
    """Decode version-1 bytes whose header `codec.read_header` has validated."""
    import constriction

    n, deg = head["n_gaussians"], head["sh_degree"]
    body_end = len(data) - 4
    pos = c_._HEAD.size
    bits, models, lo, hi, transforms = [], [], [], [], []
    for c in range(head["n_channels"]):
        c_._need(data[:body_end], pos, _CHAN.size, f"channel {c}")
        b, mode, l, h, side_len = _CHAN.unpack_from(data, pos)
        mid, tr = mode & 0x0F, mode >> 4
        pos += _CHAN.size
        if (not 1 <= b <= c_.MAX_BITS or mid not in c_.MODELS or tr not in TRANSFORMS
                or not (math.isfinite(l) and math.isfinite(h) and l <= h)):
            raise NifiError(f"corrupt .nifi file: channel {c} has an invalid description")
        c_._need(data[:body_end], pos, side_len, f"channel {c} model")
        models.append(c_._model_from_side(c_.MODELS[mid], data[pos:pos + side_len], b, n, raw_deflate=False))
        pos += side_len
        bits.append(b), lo.append(l), hi.append(h), transforms.append(tr)
    c_._need(data[:body_end], pos, 4, "payload length")
    (words,) = struct.unpack_from("<I", data, pos)
    pos += 4
    if pos + 4 * words != body_end:
        raise NifiError(f"corrupt .nifi file: payload of {words} words does not fill the file")
    min_bits = sum(c_._min_bits(m, n, b) for b, m in zip(bits, models))
    if 32 * words + 64 < 0.98 * min_bits:  # 2% slack for fixed-point model rounding
        raise NifiError(f"corrupt .nifi file: {words * 4} payload bytes cannot hold {n} Gaussians")
    if min_bits == 0 and n > c_.ZERO_ENTROPY_MAX:
        raise NifiError(f"corrupt .nifi file: {n} identical Gaussians is implausible")
    payload = np.frombuffer(data, dtype="<u4", count=words, offset=pos).astype(np.uint32)
    sym = np.zeros((n, len(bits)), np.int32)
    if n:
        coder = constriction.stream.stack.AnsCoder(payload)
        for c, m in enumerate(models):
            sym[:, c] = np.asarray(coder.decode(m.constriction_model(bits[c]), n), np.int32) + m.offset
            if transforms[c] == 1:
                sym[:, c] = delta_decode(sym[:, c], bits[c])
        if not coder.is_empty():
            raise NifiError("corrupt .nifi file: payload has data left after the last symbol")
    values = c_.dequantize(sym, bits, np.array(lo, np.float32), np.array(hi, np.float32))
    return c_.channels_to_scene(torch.from_numpy(values), deg), head
