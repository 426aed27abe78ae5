"""The 3DGS ecosystem's converter, `@playcanvas/splat-transform` (npm, pinned in the Makefile).

`make setup` installs it under ``.venv/npm``; every caller finds it here and gets one clear error
(or a skip reason) where npm was absent at set-up. Used for the codec anchors (.spz, .sog,
compressed.ply) and the offline HTML viewer.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

PINNED = "@playcanvas/splat-transform@3.7.0"
_REPO = Path(__file__).resolve().parents[2]


class SplatTransformMissing(RuntimeError):
    """splat-transform (or node) is not installed."""


def splat_transform_path() -> Path | None:
    """The installed CLI: ``$NIFI_SPLAT_TRANSFORM``, ``.venv/npm`` of this checkout, or PATH; None if absent."""
    env = os.environ.get("NIFI_SPLAT_TRANSFORM")
    candidates = [Path(env)] if env else []
    candidates.append(_REPO / ".venv" / "npm" / "node_modules" / ".bin" / "splat-transform")
    found = shutil.which("splat-transform")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK) and shutil.which("node"):
            return c
    return None


def missing_reason() -> str:
    return (f"splat-transform not installed ({PINNED}; `make setup` installs it into .venv/npm "
            "when npm is available)")


def run_splat_transform(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``splat-transform ARGS``; raises SplatTransformMissing or RuntimeError with its stderr tail."""
    exe = splat_transform_path()
    if exe is None:
        raise SplatTransformMissing(missing_reason())
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"splat-transform {' '.join(map(str, args))} failed: {' | '.join(tail)}")
    return proc
