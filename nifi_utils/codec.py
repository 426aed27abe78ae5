"""Layer 4 (codec): quantization, entropy coding and the `.nifi` container of one rate level.

A level is a plain 3DGS scene (after pruning and fine-tuning, see `levels.py`) stored as
per-channel uniformly quantized attributes, entropy-coded with `constriction`'s ANS coder:

    channel c of N Gaussians --quantize(bits_c, [lo_c, hi_c])--> symbols in {0..2^b-1}

Version 2 codes those symbols with prediction and context modelling (all of it lossless: the decoded
Gaussians are exactly the quantized ones, as in version 1):
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

Version-1 files (one model per channel, raw or delta) are still decoded (`codec_v1.py`).
The rate of a level is the container's byte count.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .common import NifiError
from .gaussians import GaussianScene, num_sh_bases

MAGIC = b"NIFI3DGS"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_GAUSSIANS = 1 << 24  # 16.7 M: above any published 3DGS scene (~6 M); bounds every allocation
ZERO_ENTROPY_MAX = 1 << 16  # a level whose symbols carry no information cannot honestly be larger
MAX_BITS = 16
MIN_SCALE = 0.3  # parametric models are never sharper than this (in symbols): each symbol costs > 0.14 bit
MODELS = {0: "categorical", 1: "gaussian", 2: "laplace"}
MODEL_IDS = {v: k for k, v in MODELS.items()}
_HEAD = struct.Struct("<8sHBBHI")
_RANGE = struct.Struct("<Bff")
_MODEL = struct.Struct("<BH")
_CTX = struct.Struct("<BBB")


# ---------------------------------------------------------------- attribute layout
def channel_names(sh_degree: int) -> list[str]:
    """Stored channels in order: position, rotation (unit, w >= 0), log-scale, opacity logit, SH."""
    names = ["x", "y", "z", "qw", "qx", "qy", "qz", "log_s0", "log_s1", "log_s2", "opacity_logit"]
    names += [f"sh{k}_{c}" for k in range(num_sh_bases(sh_degree)) for c in "rgb"]
    return names


def default_bits(sh_degree: int, bits: int = 8, pos_bits: int = 12) -> list[int]:
    return [pos_bits] * 3 + [bits] * (len(channel_names(sh_degree)) - 3)


def scene_to_channels(scene: GaussianScene, sh_degree: int | None = None) -> torch.Tensor:
    """[N, C] float tensor of the stored channels (differentiable: QAT uses it)."""
    deg = scene.sh_degree if sh_degree is None else sh_degree
    s = scene.with_sh_degree(deg)
    q = s.quats / s.quats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    q = torch.where(q[:, :1] < 0, -q, q)  # q and -q are one rotation: halve the range of w
    return torch.cat([s.means, q, s.log_scales, s.opacity_logits[:, None], s.sh.reshape(len(s), 3 * s.sh.shape[1])], 1)


def channels_to_scene(ch: torch.Tensor, sh_degree: int) -> GaussianScene:
    n_sh = num_sh_bases(sh_degree)
    if ch.ndim != 2 or ch.shape[1] != 11 + 3 * n_sh:
        raise NifiError(f"channel array has shape {tuple(ch.shape)}, expected (N, {11 + 3 * n_sh})")
    return GaussianScene(ch[:, 0:3].contiguous(), ch[:, 3:7].contiguous(), ch[:, 7:10].contiguous(),
                         ch[:, 10].contiguous(), ch[:, 11:].reshape(len(ch), n_sh, 3).contiguous())


# ---------------------------------------------------------------- quantization
def channel_ranges(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel [lo, hi] as the float32 numbers the container stores."""
    if len(values) == 0:
        z = np.zeros(values.shape[1], np.float32)
        return z, z.copy()
    return values.min(0).astype(np.float32), values.max(0).astype(np.float32)


def _steps(lo, hi, bits):
    lo64, hi64 = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    levels = (1 << np.asarray(bits, np.int64)) - 1
    return (hi64 - lo64) / levels, levels


def quantize(values: np.ndarray, bits, lo, hi) -> np.ndarray:
    """Uniform per-channel quantization to integers in [0, 2^bits - 1] (round to nearest)."""
    step, levels = _steps(lo, hi, bits)
    safe = np.where(step > 0, step, 1.0)
    sym = np.rint((values.astype(np.float64) - np.asarray(lo, np.float64)) / safe)
    sym = np.where(step > 0, sym, 0)
    return np.clip(sym, 0, levels).astype(np.int32)


def dequantize(symbols: np.ndarray, bits, lo, hi) -> np.ndarray:
    """Inverse of `quantize`; |x - dequantize(quantize(x))| <= step / 2 per channel."""
    step, _ = _steps(lo, hi, bits)
    return (np.asarray(lo, np.float64) + symbols.astype(np.float64) * step).astype(np.float32)


def fake_quantize(x: torch.Tensor, bits) -> torch.Tensor:
    """Quantization-aware training: forward = quantize/dequantize with the tensor's own per-channel
    ranges (as the encoder will compute them), backward = identity (straight-through estimator)."""
    if len(x) < 2:
        return x
    bits_t = torch.as_tensor(bits, dtype=x.dtype, device=x.device)
    lo = x.detach().amin(0)
    hi = x.detach().amax(0)
    step = ((hi - lo) / (2.0 ** bits_t - 1)).clamp_min(1e-12)
    q = torch.round((x.detach() - lo) / step) * step + lo
    return x + (q - x.detach())


# ---------------------------------------------------------------- entropy models
def _varints(values) -> bytes:
    out = bytearray()
    for v in values:
        v = int(v)
        while True:
            b = v & 0x7F
            v >>= 7
            out.append(b | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def _read_varints(buf: bytes, count: int) -> tuple[list[int], int]:
    vals, pos = [], 0
    for _ in range(count):
        v, shift = 0, 0
        while True:
            if pos >= len(buf):
                raise NifiError("corrupt .nifi file: histogram ends early")
            b = buf[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
            if shift > 35:
                raise NifiError("corrupt .nifi file: histogram count out of range")
        vals.append(v)
    return vals, pos


def _counts_entropy_bits(counts: np.ndarray) -> float:
    n = counts.sum()
    c = counts[counts > 0].astype(np.float64)
    return float(-(c * np.log2(c / n)).sum()) if n else 0.0


def empirical_entropy_bits(symbols: np.ndarray) -> float:
    """N * H(empirical distribution of the symbols), in bits."""
    if len(symbols) == 0:
        return 0.0
    return _counts_entropy_bits(np.bincount(symbols - symbols.min()))


def _parametric_mass(kind: str, mean: float, scale: float, top: int) -> np.ndarray:
    """Probability of each symbol 0..top under a quantized Gaussian/Laplace clipped to [0, top]."""
    from scipy.special import ndtr  # the CDF without scipy.stats' per-call distribution objects (~1 ms each)

    z = (np.arange(-0.5, top + 1.0) - mean) / scale
    if kind == "gaussian":
        cdf = ndtr(z)
    else:
        cdf = np.where(z < 0, 0.5 * np.exp(np.minimum(z, 0)), 1 - 0.5 * np.exp(-np.maximum(z, 0)))
    mass = np.diff(cdf) / max(cdf[-1] - cdf[0], 1e-300)
    return np.maximum(mass, 2.0 ** -24)  # constriction's floor for representable probabilities (approx.)


def _parametric_bits(symbols: np.ndarray, kind: str, mean: float, scale: float, top: int) -> float:
    """Ideal code length of `symbols` under a quantized Gaussian/Laplace clipped to [0, top]."""
    return float(-np.log2(_parametric_mass(kind, mean, scale, top)[symbols]).sum())


@dataclass
class ChannelModel:
    kind: str
    side: bytes  # exactly what the container stores for the model
    offset: int = 0  # categorical: first symbol of the histogram
    counts: np.ndarray | None = None
    params: tuple[float, float] = (0.0, 1.0)
    est_bits: float = 0.0

    def constriction_model(self, bits: int):
        import constriction

        m = constriction.stream.model
        if self.kind == "categorical":
            return m.Categorical(self.counts.astype(np.float64), perfect=False)
        top = (1 << bits) - 1
        cls = m.QuantizedGaussian if self.kind == "gaussian" else m.QuantizedLaplace
        return cls(0, top, float(self.params[0]), float(self.params[1]))


def _deflate(raw: bytes) -> bytes:
    """Raw deflate (no zlib header and checksum: the container has its own crc32), 6 bytes less per model."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    return z.compress(raw) + z.flush()


def _categorical(symbols: np.ndarray) -> ChannelModel:
    lo = int(symbols.min()) if len(symbols) else 0
    hi = int(symbols.max()) if len(symbols) else 0
    counts = np.bincount(symbols - lo, minlength=hi - lo + 1) if len(symbols) else np.zeros(1, np.int64)
    side = _deflate(_varints([lo, hi - lo, *counts.tolist()]))
    return ChannelModel("categorical", side, lo, counts, est_bits=empirical_entropy_bits(symbols))


def _parametric(symbols: np.ndarray, kind: str, bits: int) -> ChannelModel:
    x = symbols.astype(np.float64)
    mean = float(np.float32(x.mean()))
    if kind == "gaussian":
        scale = float(np.float32(max(x.std(), MIN_SCALE)))
    else:
        scale = float(np.float32(max(np.abs(x - np.median(x)).mean(), MIN_SCALE)))
    est = _parametric_bits(symbols, kind, mean, scale, (1 << bits) - 1)
    return ChannelModel(kind, struct.pack("<ff", mean, scale), params=(mean, scale), est_bits=est)


def choose_model(symbols: np.ndarray, bits: int, models=("categorical", "gaussian", "laplace")) -> ChannelModel:
    """The model with the smallest estimated payload + side information for this channel."""
    cands = []
    for kind in models:
        if kind not in MODEL_IDS:
            raise NifiError(f"unknown entropy model {kind!r}; choose from {sorted(MODEL_IDS)}")
        cands.append(_categorical(symbols) if kind == "categorical" else _parametric(symbols, kind, bits))
    return min(cands, key=lambda c: c.est_bits + 8 * len(c.side))


def _model_from_side(kind: str, side: bytes, bits: int, n: int | None, raw_deflate: bool = True) -> ChannelModel:
    """The model a container stores; `n`: the number of symbols the histogram must count (None: any)."""
    if kind == "categorical":
        try:
            raw = zlib.decompressobj(-15 if raw_deflate else 15).decompress(side, 12 + 10 * ((1 << bits) + 2))
        except zlib.error as e:
            raise NifiError(f"corrupt .nifi file: histogram does not inflate ({e})") from None
        (lo, span), pos = _read_varints(raw, 2)
        if lo + span >= (1 << bits):
            raise NifiError("corrupt .nifi file: histogram exceeds the channel's symbol range")
        counts, _ = _read_varints(raw[pos:], span + 1)
        counts = np.asarray(counts, np.int64)
        if n is not None and counts.sum() != n:
            raise NifiError(f"corrupt .nifi file: histogram counts {counts.sum()} symbols, header says {n}")
        return ChannelModel(kind, side, lo, counts)
    if len(side) != 8:
        raise NifiError("corrupt .nifi file: parametric model needs 8 bytes")
    mean, scale = struct.unpack("<ff", side)
    if not (math.isfinite(mean) and math.isfinite(scale) and scale >= np.float32(MIN_SCALE)):
        raise NifiError("corrupt .nifi file: invalid parametric model")
    return ChannelModel(kind, side, params=(mean, scale))


def _min_bits(m: ChannelModel, n: int, bits: int) -> float:
    """A lower bound on the code length of n symbols under the model (for the pre-allocation check)."""
    if m.kind == "categorical":
        return _counts_entropy_bits(m.counts)
    return n * -math.log2(float(_parametric_mass(m.kind, *m.params, (1 << bits) - 1).max()))


# ---------------------------------------------------------------- order and prediction
TRANSFORMS = {0: "raw", 1: "delta", 2: "previous_channel", 3: "quaternion_w"}
CONTEXTS = {0: "none", 1: "position_gap", 2: "previous_residual", 3: "predicted_w"}
MAX_CONTEXTS = 4
QW, QXYZ = 3, (4, 5, 6)  # channel indices of the quaternion


def morton_codes(pos_sym: np.ndarray, bits: int) -> np.ndarray:
    """Z-order (Morton) code of quantized positions [N,3]: the bits of x, y, z interleaved."""
    code = np.zeros(len(pos_sym), np.uint64)
    p = pos_sym.astype(np.uint64)
    for b in range(bits):
        for axis in range(3):
            code |= ((p[:, axis] >> np.uint64(b)) & np.uint64(1)) << np.uint64(3 * b + axis)
    return code


def morton_positions(code: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `morton_codes`: [N,3] int32 position symbols."""
    p = np.zeros((len(code), 3), np.uint64)
    for b in range(bits):
        for axis in range(3):
            p[:, axis] |= ((code >> np.uint64(3 * b + axis)) & np.uint64(1)) << np.uint64(b)
    return p.astype(np.int32)


def morton_order(pos_sym: np.ndarray, bits: int) -> np.ndarray:
    """Stable argsort of the Morton codes: neighbours in space become neighbours in the file."""
    return np.argsort(morton_codes(pos_sym, bits), kind="stable")


def delta_encode(sym: np.ndarray, bits: int) -> np.ndarray:
    """Each symbol minus its predecessor (the first minus 0), modulo 2^bits: same alphabet."""
    prev = np.concatenate([[0], sym[:-1]]).astype(np.int64)
    return ((sym.astype(np.int64) - prev) % (1 << bits)).astype(np.int32)


def delta_decode(d: np.ndarray, bits: int) -> np.ndarray:
    return (np.cumsum(d.astype(np.int64)) % (1 << bits)).astype(np.int32)


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
class EncodedLevel:
    data: bytes
    n_gaussians: int
    sh_degree: int
    stats: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.data)
        return path


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


def _need(buf: bytes, pos: int, size: int, what: str):
    if pos + size > len(buf):
        raise NifiError(f"truncated .nifi file: {what} needs {size} bytes at offset {pos}, file has {len(buf)}")


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
    if head["version"] == 1:
        from .codec_v1 import decode_v1

        return decode_v1(data, head)
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
