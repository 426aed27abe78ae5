"""The coding primitives of the `.nifi` container (`container.py` writes and reads it):

- the header (`_HEAD`: magic, version, level, SH degree, channel and Gaussian counts) and the limits
  every count is checked against before anything is allocated;
- the attribute layout: a scene as [N, C] stored channels and back;
- uniform per-channel quantization (and its straight-through version for QAT);
- the entropy models (categorical histogram | quantized Gaussian | quantized Laplace), their side
  information and the lower bound on a model's code length;
- Z-order (Morton) codes and modular deltas;
- `EncodedLevel`, the bytes of one level with their statistics.

"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nifi_utils.core.common import NifiError
from nifi_utils.gs.gaussians import GaussianScene, num_sh_bases

MAGIC = b"NIFI3DGS"
MAX_GAUSSIANS = 1 << 24  # 16.7 M: above any published 3DGS scene (~6 M); bounds every allocation
ZERO_ENTROPY_MAX = 1 << 16  # a level whose symbols carry no information cannot honestly be larger
MAX_BITS = 16
MIN_SCALE = 0.3  # parametric models are never sharper than this (in symbols): each symbol costs > 0.14 bit
MODELS = {0: "categorical", 1: "gaussian", 2: "laplace"}
MODEL_IDS = {v: k for k, v in MODELS.items()}
_HEAD = struct.Struct("<8sHBBHI")


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


# ---------------------------------------------------------------- Z-order and deltas
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


# ---------------------------------------------------------------- one encoded level
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


def _need(buf: bytes, pos: int, size: int, what: str):
    if pos + size > len(buf):
        raise NifiError(f"truncated .nifi file: {what} needs {size} bytes at offset {pos}, file has {len(buf)}")
