"""Repository paths, seeding, progress bars and the user-facing error type."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[2]


class NifiError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""


def load_weights(path: str | os.PathLike, missing: str = "checkpoint not found: {path}"):
    """`torch.load(path, weights_only=True)` on the CPU; a missing or unreadable file is one NifiError line
    (`missing` formats the first case, so each caller can say how to get the file)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise NifiError(missing.format(path=path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        why = (str(e).strip().splitlines() or [""])[0][:120]
        raise NifiError(f"{path}: not a loadable checkpoint ({type(e).__name__}{': ' + why if why else ''})") from None


def repo_path(*parts: str | os.PathLike) -> Path:
    """Resolve a path from the repository root (notebooks never chdir)."""
    p = Path(*parts)
    return p if p.is_absolute() else REPO_ROOT / p


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU torch.Generator for reproducible sampling."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def quiet() -> bool:
    """True under CI or papermill, where progress bars are throttled to a few text lines."""
    return bool(os.environ.get("CI")) or bool(os.environ.get("NIFI_QUIET")) or not sys.stderr.isatty()


def progress(iterable=None, **kwargs):
    """tqdm.auto progress bar; under CI/papermill it updates at most every 10 s."""
    from tqdm.auto import tqdm

    if quiet():
        kwargs.setdefault("mininterval", 10.0)
        kwargs.setdefault("ascii", True)
    return tqdm(iterable, **kwargs)


def pick_device(device: str | None = None) -> "torch.device":
    """'auto'/None -> cuda if available else cpu."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def provenance(profile: str, seed: int, device: str | torch.device = "cpu", **extra) -> dict:
    """What produced a result: profile, seed, device, platform and package versions."""
    import platform
    from importlib import metadata

    import torch

    versions = {}
    for pkg in ("torch", "numpy", "gsplat", "diffusers", "peft", "constriction", "torchmetrics", "stlpips-pytorch", "lpips"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"profile": profile, "seed": seed, "device": str(device), "python": platform.python_version(),
            "platform": platform.platform(), "cuda": torch.cuda.is_available(), "versions": versions, **extra}
