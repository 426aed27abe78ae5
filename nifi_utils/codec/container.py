"""The `.nifi` container of one rate level: quantization, entropy coding and the `.nifi` container of one rate level.

A level is a plain 3DGS scene (after pruning and fine-tuning, see `levels.py`) stored as
per-channel uniformly quantized attributes, entropy-coded with `constriction`'s ANS coder:

    channel c of N Gaussians --quantize(bits_c, [lo_c, hi_c])--> symbols in {0..2^b-1}

Version 2 codes those symbols with prediction and context modelling (all of it lossless: the decoded
Gaussians are exactly the quantized ones, as the quantizer left them):
- Positions: Gaussians are stored in Z-order, so their Morton codes (the three position symbols
  bit-interleaved) increase; the file holds the gaps between consecutive codes, as the gap's bit
  length e (entropy-coded) and the e - 1 bits below its leading one (uniform). This sends the
  *set* of positions (their order carries no information: up to log2(N!) bits saved).
- Every other channel is coded as a residual to a prediction (`TRANSFORMS`): none, the previous
  Gaussian in Z-order (a neighbour on the surface), the previous channel of the same Gaussian
  (colour and scale channels move together), or, for the quaternion's w, sqrt(1 - x^2 - y^2 - z^2)
  of the already decoded x, y, z (a unit quaternion has 3 degrees of freedom; w is sent as the
  small correction the quantization leaves).
- The residuals of a channel are split into up to 4 contexts (`CONTEXTS`) by a value the decoder
  already knows: the Z-order gap to the previous Gaussian (a long jump means a new surface), the
  size of the previous channel's residual, or the predicted w; each context has its own model
  (categorical histogram | quantized Gaussian | quantized Laplace).
The encoder picks, per channel, the prediction, the context split and each context's model that
make that channel's bytes smallest, side information (thresholds, histograms, parameters) included.
Decoding is vectorized: every (channel, context) group is one constriction call.

Container version 2 (little-endian; every count is checked before anything is allocated from it):

    magic b"NIFI3DGS" | version u16 | level u8 | sh_degree u8 | n_channels u16 | n_gaussians u32
    per channel (file order): bits u8 | lo f32 | hi f32
    position gaps: model of e (see below)
    per other channel, in coding order (qx, qy, qz, qw, log-scales, opacity, SH):
        transform u8 | context u8 | n_contexts u8 | thresholds u16 x (n_contexts - 1) |
        per context: model u8 | side_len u16 | side bytes
    payload_words u32 | payload (u32 ANS words) | crc32 u32 (over everything before it)

    model: kind u8 (0 categorical, 1 gaussian, 2 laplace) | side_len u16 | side (categorical:
    raw deflate of varints [first symbol, span, counts...]; parametric: mean, scale f32)

The header, attribute layout, quantization, entropy models, Z-order and `EncodedLevel` are in
`entropy.py`. The rate of a level is the container's byte count.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The coding primitives live in entropy.py; the container is where callers look for them.
from nifi_utils.codec.entropy import (  # noqa: F401  (re-exported)
    _HEAD, MAGIC, MAX_BITS, MAX_GAUSSIANS, MIN_SCALE, MODEL_IDS, MODELS, ZERO_ENTROPY_MAX, ChannelModel, EncodedLevel,
    _categorical, _counts_entropy_bits, _deflate, _min_bits, _model_from_side, _need, _parametric, _parametric_bits,
    _parametric_mass, _read_varints, _steps, _varints, channel_names, channel_ranges, channels_to_scene, choose_model,
    default_bits, delta_decode, delta_encode, dequantize, empirical_entropy_bits, fake_quantize, morton_codes,
    morton_order, morton_positions, quantize, scene_to_channels)
from nifi_utils.core.common import NifiError
from nifi_utils.gs.gaussians import GaussianScene

VERSION = 2
READABLE_VERSIONS = (2,)
_RANGE = struct.Struct("<Bff")
_MODEL = struct.Struct("<BH")
_CTX = struct.Struct("<BBB")


# ---------------------------------------------------------------- order and prediction
TRANSFORMS = {0: "raw", 1: "delta", 2: "previous_channel", 3: "quaternion_w"}
CONTEXTS = {0: "none", 1: "position_gap", 2: "previous_residual", 3: "predicted_w"}
MAX_CONTEXTS = 4
QW, QXYZ = 3, (4, 5, 6)  # channel indices of the quaternion


def coding_order(n_channels: int) -> list[int]:
    """Non-position channels in the order the file codes them: qw after qx, qy, qz (it is predicted from them)."""
    return [*QXYZ, QW, *range(7, n_channels)]


def predict_qw(sym: np.ndarray, bits, lo, hi) -> np.ndarray:
    """Symbol of w = sqrt(1 - x^2 - y^2 - z^2) from the decoded x, y, z symbols (unit quaternion, w >= 0).
    float64 throughout and sqrt is correctly rounded (IEEE 754), so encoder and decoder agree exactly."""
    xyz = np.stack([dequantize(sym[:, c], bits[c], lo[c], hi[c]).astype(np.float64) for c in QXYZ], 1)
    w = np.sqrt(np.clip(1.0 - (xyz * xyz).sum(1), 0.0, 1.0))
    return quantize(w, bits[QW], lo[QW], hi[QW])


def _residual(sym_c: np.ndarray, pred: np.ndarray, bits: int) -> np.ndarray:
    """(symbol - prediction) mod 2^bits, centred so that a perfect prediction is 2^(bits-1)."""
    return ((sym_c.astype(np.int64) - pred + (1 << (bits - 1))) % (1 << bits)).astype(np.int32)


def _unresidual(r: np.ndarray, pred: np.ndarray, bits: int) -> np.ndarray:
    return ((r.astype(np.int64) + pred - (1 << (bits - 1))) % (1 << bits)).astype(np.int32)


def _context_value(kind: int, gap_bits: np.ndarray, prev_r: np.ndarray | None, prev_centred: bool,
                   pred_w: np.ndarray | None, prev_bits: int) -> np.ndarray:
    """The per-Gaussian value a context splits on; the decoder knows it before decoding the channel."""
    if kind == 1:
        return gap_bits
    if kind == 2:
        return np.abs(prev_r.astype(np.int64) - (1 << (prev_bits - 1))) if prev_centred else prev_r.astype(np.int64)
    if kind == 3:
        return pred_w.astype(np.int64)
    return np.zeros(len(gap_bits), np.int64)


def _buckets(value: np.ndarray, thresholds) -> np.ndarray:
    return np.searchsorted(np.asarray(thresholds, np.int64), value, side="right")


def _thresholds(value: np.ndarray, k: int) -> list[int]:
    """Up to k - 1 split points at the value's quantiles, each bucket non-empty."""
    qs = np.unique(np.quantile(value, np.arange(1, k) / k, method="lower").astype(np.int64))
    return [int(t) for t in qs if value.min() < t <= 0xFFFF]


# ---------------------------------------------------------------- encode / decode one level
@dataclass
class _ChannelCode:
    transform: int
    context: int
    thresholds: list
    models: list  # one ChannelModel per context
    residual: np.ndarray
    buckets: np.ndarray

    @property
    def cost_bits(self) -> float:
        fixed = 8 * (_CTX.size + 2 * len(self.thresholds) + _MODEL.size * len(self.models))
        return fixed + sum(m.est_bits + 8 * len(m.side) for m in self.models)


def _fit(residual, buckets, k, bits, models) -> list[ChannelModel]:
    return [choose_model(residual[buckets == j], bits, models) for j in range(k)]


def _code_channel(sym_c, bits, candidates, ctx_values, models) -> _ChannelCode:
    """Cheapest (transform, context split, models) of one channel; `candidates`: {transform: prediction}."""
    best = None
    for t, pred in candidates.items():
        r = sym_c if pred is None else _residual(sym_c, pred, bits)
        one = np.zeros(len(r), np.int64)
        c = _ChannelCode(t, 0, [], _fit(r, one, 1, bits, models), r, one)
        if best is None or c.cost_bits < best.cost_bits:
            best = c
    r = best.residual
    for kind, value in ctx_values.items():
        for k in (2, 3, MAX_CONTEXTS):
            th = _thresholds(value, k)
            if not th:
                continue
            b = _buckets(value, th)
            c = _ChannelCode(best.transform, kind, th, _fit(r, b, len(th) + 1, bits, models), r, b)
            if c.cost_bits < best.cost_bits:
                best = c
    return best


def _push(coder, x: np.ndarray, m: ChannelModel, bits: int):
    if len(x) and not (m.kind == "categorical" and len(m.counts) == 1):  # one possible symbol costs nothing
        coder.encode_reverse((x - m.offset).astype(np.int32), m.constriction_model(bits))


def _pull(coder, n: int, m: ChannelModel, bits: int) -> np.ndarray:
    if n == 0 or (m.kind == "categorical" and len(m.counts) == 1):
        return np.full(n, m.offset, np.int32)
    return np.asarray(coder.decode(m.constriction_model(bits), n), np.int32) + m.offset


def _mantissa_chunks(gap_bits: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(which Gaussians, chunk size in bits) of the e - 1 bits below each gap's leading one, 16 at a time
    (constriction's uniform model takes alphabets below 2^24)."""
    k = np.maximum(gap_bits.astype(np.int64) - 1, 0)
    return [(np.nonzero(k > 16 * j)[0], np.minimum(k - 16 * j, 16)[k > 16 * j]) for j in range(3)]


def _gap_bits_symbols(bits: int) -> int:
    return (3 * bits).bit_length()  # e <= 3 * pos_bits fits this many bits


def encode_scene(scene: GaussianScene, sh_degree: int | None = None, bits: int = 8, pos_bits: int = 12,
                 level: int = 0, models=("categorical", "gaussian", "laplace"), allow_delta: bool = True) -> EncodedLevel:
    """Quantize and entropy-code a scene into `.nifi` bytes (one rate level). The decoded scene holds
    the same Gaussians in Z-order of their positions (rendering does not depend on the order).
    `allow_delta=False` restricts every channel to the raw transform and no contexts (a baseline)."""
    import constriction

    deg = scene.sh_degree if sh_degree is None else int(sh_degree)
    if not 0 <= deg <= 3:
        raise NifiError(f"sh_degree must be 0..3, got {deg}")
    n = len(scene)
    if n > MAX_GAUSSIANS:
        raise NifiError(f"{n} Gaussians exceed the container's limit of {MAX_GAUSSIANS}")
    bits_c = default_bits(deg, bits, pos_bits)
    if not all(1 <= b <= MAX_BITS for b in bits_c):
        raise NifiError(f"bits must be in 1..{MAX_BITS}, got {bits} (positions {pos_bits})")
    for kind in models:
        if kind not in MODEL_IDS:
            raise NifiError(f"unknown entropy model {kind!r}; choose from {sorted(MODEL_IDS)}")
    values = scene_to_channels(scene.detach().to("cpu", torch.float32), deg).numpy()
    if not np.isfinite(values).all():
        raise NifiError("scene has non-finite attributes; refusing to encode")
    lo, hi = channel_ranges(values)
    sym = quantize(values, bits_c, lo, hi)
    codes = morton_codes(sym[:, :3], pos_bits)
    order = np.argsort(codes, kind="stable")  # the order of Gaussians is free: store them in Z-order
    sym, codes = sym[order], codes[order]
    n_ch = sym.shape[1]
    models_n = tuple(models) if n else ("categorical",)
    # positions: gaps between consecutive Morton codes, as bit length e + the bits below the leading one
    gaps = np.diff(codes, prepend=np.uint64(0))
    gap_bits = np.zeros(n, np.int64)
    for b in range(3 * pos_bits):
        gap_bits[(gaps >> np.uint64(b)) > 0] = b + 1
    gap_model = choose_model(gap_bits.astype(np.int32), _gap_bits_symbols(pos_bits), models_n)
    chunks = [(idx, size, ((gaps[idx] >> np.uint64(16 * j)) & np.uint64((1 << 16) - 1)).astype(np.int64)
               % (1 << size)) for j, (idx, size) in enumerate(_mantissa_chunks(gap_bits))]
    # other channels: prediction + context split + per-context model, whichever is cheapest
    pred_w = predict_qw(sym, bits_c, lo, hi) if n else np.zeros(0, np.int32)
    coded, prev = {}, None
    for c in coding_order(n_ch):
        cand = {0: None}
        ctx = {}
        if allow_delta and n > 1:
            cand[1] = np.concatenate([[0], sym[:-1, c]]).astype(np.int64)
            if prev is not None and bits_c[prev] == bits_c[c]:
                cand[2] = sym[:, prev].astype(np.int64)
            if c == QW:
                cand[3] = pred_w.astype(np.int64)
            ctx = {1: gap_bits}
            if prev is not None:
                ctx[2] = _context_value(2, gap_bits, coded[prev].residual, coded[prev].transform != 0, None, bits_c[prev])
            if c == QW:
                ctx[3] = pred_w.astype(np.int64)
        coded[c] = _code_channel(sym[:, c], bits_c[c], cand, ctx, models_n)
        prev = c
    # ANS is a stack: push in the reverse of the decode order
    coder = constriction.stream.stack.AnsCoder()
    for c in reversed(coding_order(n_ch)):
        cc = coded[c]
        for j in reversed(range(len(cc.models))):
            _push(coder, cc.residual[cc.buckets == j], cc.models[j], bits_c[c])
    for idx, size, chunk in reversed(chunks):
        if len(idx):
            coder.encode_reverse(chunk.astype(np.int32), constriction.stream.model.Uniform(),
                                 (1 << size).astype(np.int32))
    _push(coder, gap_bits.astype(np.int32), gap_model, _gap_bits_symbols(pos_bits))
    payload = coder.get_compressed().astype("<u4").tobytes() if n else b""
    parts = [_HEAD.pack(MAGIC, VERSION, level, deg, n_ch, n)]
    parts += [_RANGE.pack(bits_c[c], float(lo[c]), float(hi[c])) for c in range(n_ch)]

    def model_bytes(m: ChannelModel) -> bytes:
        if len(m.side) > 0xFFFF:
            raise NifiError("model side information too large")
        return _MODEL.pack(MODEL_IDS[m.kind], len(m.side)) + m.side

    parts.append(model_bytes(gap_model))
    for c in coding_order(n_ch):
        cc = coded[c]
        parts.append(_CTX.pack(cc.transform, cc.context, len(cc.models)) + struct.pack(f"<{len(cc.thresholds)}H", *cc.thresholds)
                     + b"".join(model_bytes(m) for m in cc.models))
    parts.append(struct.pack("<I", len(payload) // 4) + payload)
    body = b"".join(parts)
    data = body + struct.pack("<I", zlib.crc32(body))
    return EncodedLevel(data, n, deg, _stats(data, payload, n, deg, coded, gap_model, gap_bits, pos_bits))


def _stats(data, payload, n, deg, coded, gap_model, gap_bits, pos_bits) -> dict:
    names = channel_names(deg)
    mantissa = float(np.maximum(gap_bits - 1, 0).sum())
    all_models = [gap_model] + [m for cc in coded.values() for m in cc.models]
    model_side = sum(len(m.side) for m in all_models)
    side_bytes = len(data) - len(payload)
    # The bound: an ideal entropy code of the coded symbols under their own empirical distributions (per
    # context), plus the histograms such a code must send, plus the fixed header and context descriptions.
    groups = [gap_bits] + [cc.residual[cc.buckets == j] for cc in coded.values() for j in range(len(cc.models))]
    entropy_bits = sum(empirical_entropy_bits(g) for g in groups) + mantissa
    hist_side = sum(len(_categorical(g).side) for g in groups)
    per_channel = {names[c]: (cc.cost_bits - 8 * _CTX.size) / max(n, 1) for c, cc in coded.items()}
    pos_bits_per_g = (gap_model.est_bits + 8 * len(gap_model.side) + mantissa) / max(n, 1)
    for a in "xyz":  # the three coordinates are coded jointly; split their cost evenly
        per_channel[a] = pos_bits_per_g / 3
    stats = {
        "bytes": len(data), "payload_bytes": len(payload), "side_bytes": side_bytes,
        "empirical_entropy_bytes": entropy_bits / 8,
        "model_bytes_estimate": (sum(m.est_bits for m in all_models) + mantissa) / 8,
        "entropy_bound_bytes": entropy_bits / 8 + hist_side + (side_bytes - model_side),
        "models": {k: sum(m.kind == k for m in all_models) for k in MODEL_IDS},
        "transforms": {names[c]: TRANSFORMS[cc.transform] for c, cc in coded.items()},
        "contexts": {names[c]: [CONTEXTS[cc.context], len(cc.models)] for c, cc in coded.items()},
        "delta_channels": [names[c] for c, cc in coded.items() if cc.transform == 1],
        "bits_per_gaussian": 8 * len(data) / max(n, 1),
        "channel_bits_per_gaussian": {k: per_channel[k] for k in names},
    }
    stats["ratio_to_entropy_bound"] = len(data) / max(stats["entropy_bound_bytes"], 1e-9)
    return stats


def read_header(data: bytes) -> dict:
    """Validate magic, length and checksum; return the header fields (nothing large allocated)."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise NifiError("not a .nifi file (bad magic bytes)")
    _need(data, 0, _HEAD.size + 8, "header")
    magic, version, level, deg, n_ch, n = _HEAD.unpack_from(data, 0)
    if version not in READABLE_VERSIONS:
        raise NifiError(f".nifi format version {version} is not supported (this build reads versions "
                        f"{', '.join(map(str, READABLE_VERSIONS))})")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(data[:-4]) != crc:
        raise NifiError("corrupt or truncated .nifi file: checksum mismatch")
    if deg > 3 or n_ch != len(channel_names(deg)):
        raise NifiError(f"corrupt .nifi file: {n_ch} channels do not match SH degree {deg}")
    if n > MAX_GAUSSIANS:
        raise NifiError(f"corrupt .nifi file: {n} Gaussians exceed the limit {MAX_GAUSSIANS}")
    return {"version": version, "level": level, "sh_degree": deg, "n_channels": n_ch, "n_gaussians": n}


class _Reader:
    def __init__(self, data: bytes, end: int):
        self.data, self.end, self.pos = data, end, _HEAD.size

    def take(self, st: struct.Struct | str, what: str):
        st = struct.Struct(st) if isinstance(st, str) else st
        _need(self.data[: self.end], self.pos, st.size, what)
        out = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return out

    def model(self, bits: int, n: int | None, what: str) -> ChannelModel:
        kind, side_len = self.take(_MODEL, what)
        if kind not in MODELS:
            raise NifiError(f"corrupt .nifi file: {what} has an unknown model {kind}")
        _need(self.data[: self.end], self.pos, side_len, what)
        m = _model_from_side(MODELS[kind], self.data[self.pos:self.pos + side_len], bits, n)
        self.pos += side_len
        return m


def decode_bytes(data: bytes) -> tuple[GaussianScene, dict]:
    """Decode `.nifi` bytes into a float32 GaussianScene (CPU) and its header."""
    import constriction

    head = read_header(data)
    n, deg, n_ch = head["n_gaussians"], head["sh_degree"], head["n_channels"]
    rd = _Reader(data, len(data) - 4)
    bits, lo, hi = [], [], []
    for c in range(n_ch):
        b, l, h = rd.take(_RANGE, f"channel {c}")
        if not 1 <= b <= MAX_BITS or not (math.isfinite(l) and math.isfinite(h) and l <= h):
            raise NifiError(f"corrupt .nifi file: channel {c} has an invalid description")
        bits.append(b), lo.append(l), hi.append(h)
    if len(set(bits[:3])) != 1:
        raise NifiError("corrupt .nifi file: position channels differ in bits")
    gbits = _gap_bits_symbols(bits[0])
    gap_model = rd.model(gbits, n, "position gaps")
    channels, prev = {}, None
    for c in coding_order(n_ch):
        t, kind, k = rd.take(_CTX, f"channel {c}")
        ok = (t in TRANSFORMS and kind in CONTEXTS and 1 <= k <= MAX_CONTEXTS and (kind == 0) == (k == 1)
              and (t != 2 or (prev is not None and bits[prev] == bits[c])) and (t != 3 or c == QW)
              and (kind != 3 or c == QW) and (kind != 2 or prev is not None))
        if not ok:
            raise NifiError(f"corrupt .nifi file: channel {c} has an invalid coding description")
        th = rd.take(f"<{k - 1}H", f"channel {c} thresholds")
        ms = [rd.model(bits[c], None, f"channel {c} context {j}") for j in range(k)]
        channels[c] = (t, kind, th, ms)
        prev = c
    (words,) = rd.take("<I", "payload length")
    if rd.pos + 4 * words != rd.end:
        raise NifiError(f"corrupt .nifi file: payload of {words} words does not fill the file")
    # Before allocating n x channels symbols: the payload must be long enough to hold them. Each model
    # gives a lower bound on the code length of its symbols (a histogram: its count times its entropy; a
    # parametric model: -log2 of its most probable symbol per symbol); ANS output is never shorter than
    # that minus a word. Histograms also fix how many symbols a context holds.
    min_bits = _min_bits(gap_model, n, gbits)
    if gap_model.kind == "categorical":
        e = np.arange(len(gap_model.counts)) + gap_model.offset
        min_bits += float((gap_model.counts * np.maximum(e - 1, 0)).sum())
    for c, (t, kind, th, ms) in channels.items():
        hist_n = sum(int(m.counts.sum()) for m in ms if m.kind == "categorical")
        if hist_n > n or (hist_n != n and all(m.kind == "categorical" for m in ms)):
            raise NifiError(f"corrupt .nifi file: histogram counts {hist_n} symbols, header says {n}")
        par = [_min_bits(m, 1, bits[c]) for m in ms if m.kind != "categorical"]
        min_bits += sum(_min_bits(m, 0, bits[c]) for m in ms if m.kind == "categorical") + (n - hist_n) * min(par, default=0)
    if 32 * words + 64 < 0.98 * min_bits:  # 2% slack for fixed-point model rounding
        raise NifiError(f"corrupt .nifi file: {words * 4} payload bytes cannot hold {n} Gaussians")
    if min_bits == 0 and n > ZERO_ENTROPY_MAX:
        raise NifiError(f"corrupt .nifi file: {n} identical Gaussians is implausible")
    payload = np.frombuffer(data, dtype="<u4", count=words, offset=rd.pos).astype(np.uint32)
    sym = np.zeros((n, n_ch), np.int32)
    if n:
        coder = constriction.stream.stack.AnsCoder(payload)
        gap_bits = _pull(coder, n, gap_model, gbits).astype(np.int64)
        if gap_bits.min() < 0 or gap_bits.max() > 3 * bits[0]:
            raise NifiError("corrupt .nifi file: position gap out of range")
        gaps = np.where(gap_bits > 0, np.left_shift(np.uint64(1), np.maximum(gap_bits - 1, 0).astype(np.uint64)), 0).astype(np.uint64)
        for j, (idx, size) in enumerate(_mantissa_chunks(gap_bits)):
            if len(idx):
                chunk = np.asarray(coder.decode(constriction.stream.model.Uniform(), (1 << size).astype(np.int32)), np.uint64)
                gaps[idx] |= chunk << np.uint64(16 * j)
        # float64 sums integers below 2^53 exactly; a corrupt file could otherwise wrap uint64
        if float(gaps.astype(np.float64).sum()) >= 2.0 ** (3 * bits[0]):
            raise NifiError("corrupt .nifi file: position codes overflow the grid")
        codes = np.cumsum(gaps, dtype=np.uint64)
        sym[:, :3] = morton_positions(codes, bits[0])
        residuals, prev = {}, None
        for c, (t, kind, th, ms) in channels.items():
            value = _context_value(kind, gap_bits, residuals.get(prev), prev is not None and channels[prev][0] != 0,
                                   predict_qw(sym, bits, lo, hi) if kind == 3 else None, bits[prev] if prev is not None else 1)
            b = _buckets(value, th)
            r = np.zeros(n, np.int32)
            for j, m in enumerate(ms):
                where = np.nonzero(b == j)[0]
                if m.kind == "categorical" and m.counts.sum() != len(where):
                    raise NifiError(f"corrupt .nifi file: channel {c} context {j} histogram does not match its symbols")
                r[where] = _pull(coder, len(where), m, bits[c])
            residuals[c] = r
            if t == 0:
                sym[:, c] = r
            elif t == 1:
                sym[:, c] = delta_decode((r.astype(np.int64) - (1 << (bits[c] - 1))) % (1 << bits[c]), bits[c])
            elif t == 2:
                sym[:, c] = _unresidual(r, sym[:, prev].astype(np.int64), bits[c])
            else:
                sym[:, c] = _unresidual(r, predict_qw(sym, bits, lo, hi).astype(np.int64), bits[c])
            prev = c
        if not coder.is_empty():
            raise NifiError("corrupt .nifi file: payload has data left after the last symbol")
    values = dequantize(sym, bits, np.array(lo, np.float32), np.array(hi, np.float32))
    return channels_to_scene(torch.from_numpy(values), deg), head


def load(path: str | Path) -> tuple[GaussianScene, dict]:
    path = Path(path)
    if not path.is_file():
        raise NifiError(f"no such .nifi file: {path}")
    return decode_bytes(path.read_bytes())


def decoded(scene: GaussianScene, **kwargs) -> GaussianScene:
    """What a decoder will see: encode then decode (used to render exactly what the file holds)."""
    return decode_bytes(encode_scene(scene, **kwargs).data)[0]


def size_report(nbytes: int, ply_bytes: int | None = None) -> dict:
    """Bytes, MB (10^6), MiB (2^20) and the ratio to an uncompressed INRIA .ply."""
    out = {"bytes": int(nbytes), "MB": nbytes / 1e6, "MiB": nbytes / 2**20}
    if ply_bytes:
        out["ratio_to_ply"] = ply_bytes / max(nbytes, 1)
    return out
