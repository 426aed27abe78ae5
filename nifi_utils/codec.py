"""Layer 4 (codec): quantization, entropy coding and the `.nifi` container of one rate level.

A level is a plain 3DGS scene (after pruning and fine-tuning, see `levels.py`) stored as
per-channel uniformly quantized attributes, entropy-coded with `constriction`'s ANS coder:

    channel c of N Gaussians --quantize(bits_c, [lo_c, hi_c])--> symbols in {0..2^b-1}
    symbols --model_c (categorical histogram | quantized Gaussian | quantized Laplace)--> ANS

Gaussians are stored in Z-order (Morton code of their quantized positions), and each channel is
coded either as is or as differences to the previous Gaussian (mod 2^b): neighbours on a surface
share rotation, scale and colour. The transform and model of each channel are whichever make *that
channel's* bytes smallest, side information (the histogram or the two floats) included, so a
1k-Gaussian level does not pay 256 histogram counts per channel when a two-parameter model is
nearly as good.

Container (little-endian; every count is checked before anything is allocated from it):

    magic b"NIFI3DGS" | version u16 | level u8 | sh_degree u8 | n_channels u16 | n_gaussians u32
    per channel: bits u8 | model u8 (low 4 bits: model; high 4: 0 raw, 1 delta) | lo f32 | hi f32 |
                 side_len u16 | side bytes
    payload_words u32 | payload (u32 ANS words) | crc32 u32 (over everything before it)

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
VERSION = 1
MAX_GAUSSIANS = 1 << 24  # 16.7 M: above any published 3DGS scene (~6 M); bounds every allocation
ZERO_ENTROPY_MAX = 1 << 16  # a level whose symbols carry no information cannot honestly be larger
MAX_BITS = 16
MIN_SCALE = 0.3  # parametric models are never sharper than this (in symbols): each symbol costs > 0.14 bit
MODELS = {0: "categorical", 1: "gaussian", 2: "laplace"}
MODEL_IDS = {v: k for k, v in MODELS.items()}
_HEAD = struct.Struct("<8sHBBHI")
_CHAN = struct.Struct("<BBffH")


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
    from scipy import stats

    dist = stats.norm(mean, scale) if kind == "gaussian" else stats.laplace(mean, scale)
    cdf = dist.cdf(np.arange(-0.5, top + 1.0))
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


def _categorical(symbols: np.ndarray) -> ChannelModel:
    lo = int(symbols.min()) if len(symbols) else 0
    hi = int(symbols.max()) if len(symbols) else 0
    counts = np.bincount(symbols - lo, minlength=hi - lo + 1) if len(symbols) else np.zeros(1, np.int64)
    side = zlib.compress(_varints([lo, hi - lo, *counts.tolist()]), 9)
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


def _model_from_side(kind: str, side: bytes, bits: int, n: int) -> ChannelModel:
    if kind == "categorical":
        try:
            raw = zlib.decompressobj().decompress(side, 12 + 10 * ((1 << bits) + 2))
        except zlib.error as e:
            raise NifiError(f"corrupt .nifi file: histogram does not inflate ({e})") from None
        (lo, span), pos = _read_varints(raw, 2)
        if lo + span >= (1 << bits):
            raise NifiError("corrupt .nifi file: histogram exceeds the channel's symbol range")
        counts, _ = _read_varints(raw[pos:], span + 1)
        counts = np.asarray(counts, np.int64)
        if counts.sum() != n:
            raise NifiError(f"corrupt .nifi file: histogram counts {counts.sum()} symbols, header says {n}")
        return ChannelModel(kind, side, lo, counts)
    if len(side) != 8:
        raise NifiError("corrupt .nifi file: parametric model needs 8 bytes")
    mean, scale = struct.unpack("<ff", side)
    if not (math.isfinite(mean) and math.isfinite(scale) and scale >= np.float32(MIN_SCALE)):
        raise NifiError("corrupt .nifi file: invalid parametric model")
    return ChannelModel(kind, side, params=(mean, scale))


# ---------------------------------------------------------------- order and prediction
TRANSFORMS = {0: "raw", 1: "delta"}


def morton_order(pos_sym: np.ndarray, bits: int) -> np.ndarray:
    """Stable argsort of the Z-order (Morton) code of quantized positions [N,3]: neighbours in space
    become neighbours in the file, which makes the `delta` transform pay off."""
    code = np.zeros(len(pos_sym), np.uint64)
    p = pos_sym.astype(np.uint64)
    for b in range(bits):
        for axis in range(3):
            code |= ((p[:, axis] >> np.uint64(b)) & np.uint64(1)) << np.uint64(3 * b + axis)
    return np.argsort(code, kind="stable")


def delta_encode(sym: np.ndarray, bits: int) -> np.ndarray:
    """Each symbol minus its predecessor (the first minus 0), modulo 2^bits: same alphabet."""
    prev = np.concatenate([[0], sym[:-1]]).astype(np.int64)
    return ((sym.astype(np.int64) - prev) % (1 << bits)).astype(np.int32)


def delta_decode(d: np.ndarray, bits: int) -> np.ndarray:
    return (np.cumsum(d.astype(np.int64)) % (1 << bits)).astype(np.int32)


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


def encode_scene(scene: GaussianScene, sh_degree: int | None = None, bits: int = 8, pos_bits: int = 12,
                 level: int = 0, models=("categorical", "gaussian", "laplace"), allow_delta: bool = True) -> EncodedLevel:
    """Quantize and entropy-code a scene into `.nifi` bytes (one rate level). The decoded scene holds
    the same Gaussians in Z-order of their positions (rendering does not depend on the order)."""
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
    values = scene_to_channels(scene.detach().to("cpu", torch.float32), deg).numpy()
    if not np.isfinite(values).all():
        raise NifiError("scene has non-finite attributes; refusing to encode")
    lo, hi = channel_ranges(values)
    sym = quantize(values, bits_c, lo, hi)
    sym = sym[morton_order(sym[:, :3], pos_bits)]  # the order of Gaussians is free: store them in Z-order
    # per channel: code the symbols or their differences to the previous Gaussian, whichever is smaller
    sent, chosen, transforms = [], [], []
    for c in range(sym.shape[1]):
        best = None
        for t in ((0, 1) if n > 1 and allow_delta else (0,)):
            x = sym[:, c] if t == 0 else delta_encode(sym[:, c], bits_c[c])
            m = choose_model(x, bits_c[c], models if n else ("categorical",))
            if best is None or m.est_bits + 8 * len(m.side) < best[1].est_bits + 8 * len(best[1].side):
                best = (t, m, x)
        transforms.append(best[0]), chosen.append(best[1]), sent.append(best[2])
    sent = np.stack(sent, 1) if n else sym
    coder = constriction.stream.stack.AnsCoder()
    for c in reversed(range(sym.shape[1])):  # ANS is a stack: encode backwards, decode forwards
        if n:
            m = chosen[c]
            coder.encode_reverse((sent[:, c] - m.offset).astype(np.int32), m.constriction_model(bits_c[c]))
    payload = coder.get_compressed().astype("<u4").tobytes() if n else b""
    parts = [_HEAD.pack(MAGIC, VERSION, level, deg, sym.shape[1], n)]
    for c, m in enumerate(chosen):
        if len(m.side) > 0xFFFF:
            raise NifiError(f"channel {c}: model side information too large")
        mode = MODEL_IDS[m.kind] | (transforms[c] << 4)
        parts.append(_CHAN.pack(bits_c[c], mode, float(lo[c]), float(hi[c]), len(m.side)) + m.side)
    parts.append(struct.pack("<I", len(payload) // 4) + payload)
    body = b"".join(parts)
    data = body + struct.pack("<I", zlib.crc32(body))
    side_bytes = len(data) - len(payload)
    entropy_bits = sum(empirical_entropy_bits(sent[:, c]) for c in range(sym.shape[1]))
    hist_side = sum(len(_categorical(sent[:, c]).side) for c in range(sym.shape[1]))
    stats = {
        "bytes": len(data), "payload_bytes": len(payload), "side_bytes": side_bytes,
        "empirical_entropy_bytes": entropy_bits / 8,
        "model_bytes_estimate": sum(m.est_bits for m in chosen) / 8,
        # The bound: an ideal entropy code of the coded symbols (after the raw/delta choice) under their
        # own empirical distributions, plus the histograms such a code must send, plus the fixed header.
        "entropy_bound_bytes": entropy_bits / 8 + hist_side + (side_bytes - sum(len(m.side) for m in chosen)),
        "models": {k: sum(m.kind == k for m in chosen) for k in MODEL_IDS},
        "delta_channels": [name for name, t in zip(channel_names(deg), transforms) if t == 1],
        "bits_per_gaussian": 8 * len(data) / max(n, 1),
        "channel_bits_per_gaussian": {name: (m.est_bits + 8 * len(m.side)) / max(n, 1)
                                      for name, m in zip(channel_names(deg), chosen)},
    }
    stats["ratio_to_entropy_bound"] = len(data) / max(stats["entropy_bound_bytes"], 1e-9)
    return EncodedLevel(data, n, deg, stats)


def _need(buf: bytes, pos: int, size: int, what: str):
    if pos + size > len(buf):
        raise NifiError(f"truncated .nifi file: {what} needs {size} bytes at offset {pos}, file has {len(buf)}")


def read_header(data: bytes) -> dict:
    """Validate magic, length and checksum; return the header fields (nothing large allocated)."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise NifiError("not a .nifi file (bad magic bytes)")
    _need(data, 0, _HEAD.size + 8, "header")
    magic, version, level, deg, n_ch, n = _HEAD.unpack_from(data, 0)
    if version != VERSION:
        raise NifiError(f".nifi format version {version} is not supported (this build reads version {VERSION})")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(data[:-4]) != crc:
        raise NifiError("corrupt or truncated .nifi file: checksum mismatch")
    if deg > 3 or n_ch != len(channel_names(deg)):
        raise NifiError(f"corrupt .nifi file: {n_ch} channels do not match SH degree {deg}")
    if n > MAX_GAUSSIANS:
        raise NifiError(f"corrupt .nifi file: {n} Gaussians exceed the limit {MAX_GAUSSIANS}")
    return {"version": version, "level": level, "sh_degree": deg, "n_channels": n_ch, "n_gaussians": n}


def decode_bytes(data: bytes) -> tuple[GaussianScene, dict]:
    """Decode `.nifi` bytes into a float32 GaussianScene (CPU) and its header."""
    import constriction

    head = read_header(data)
    n, deg = head["n_gaussians"], head["sh_degree"]
    body_end = len(data) - 4
    pos = _HEAD.size
    bits, models, lo, hi, transforms = [], [], [], [], []
    for c in range(head["n_channels"]):
        _need(data[:body_end], pos, _CHAN.size, f"channel {c}")
        b, mode, l, h, side_len = _CHAN.unpack_from(data, pos)
        mid, tr = mode & 0x0F, mode >> 4
        pos += _CHAN.size
        if (not 1 <= b <= MAX_BITS or mid not in MODELS or tr not in TRANSFORMS
                or not (math.isfinite(l) and math.isfinite(h) and l <= h)):
            raise NifiError(f"corrupt .nifi file: channel {c} has an invalid description")
        _need(data[:body_end], pos, side_len, f"channel {c} model")
        models.append(_model_from_side(MODELS[mid], data[pos:pos + side_len], b, n))
        pos += side_len
        bits.append(b), lo.append(l), hi.append(h), transforms.append(tr)
    _need(data[:body_end], pos, 4, "payload length")
    (words,) = struct.unpack_from("<I", data, pos)
    pos += 4
    if pos + 4 * words != body_end:
        raise NifiError(f"corrupt .nifi file: payload of {words} words does not fill the file")
    # Before allocating n x channels symbols: the payload must be long enough to hold them. Each model
    # gives a lower bound on the code length of n symbols (a histogram: n * its entropy; a parametric
    # model: n * -log2 of its most probable symbol); ANS output is never shorter than that minus a word.
    min_bits = 0.0
    for b, m in zip(bits, models):
        if m.kind == "categorical":
            min_bits += _counts_entropy_bits(m.counts)
        else:
            min_bits += n * -math.log2(float(_parametric_mass(m.kind, *m.params, (1 << b) - 1).max()))
    if 32 * words + 64 < 0.98 * min_bits:  # 2% slack for fixed-point model rounding
        raise NifiError(f"corrupt .nifi file: {words * 4} payload bytes cannot hold {n} Gaussians")
    if min_bits == 0 and n > ZERO_ENTROPY_MAX:
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
